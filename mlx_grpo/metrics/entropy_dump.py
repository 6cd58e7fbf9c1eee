"""logging.entropy_dump_every: the sampling policy's per-token entropy and varentropy, on local disk.

Like TinyZero's entropy logging, these never go to W&B: one file per dumped step,
<run>/entropy_data/entropy_step_{step:06d}.safetensors (safetensors, since there is no torch
here, in place of the seed's .pt), with the seed's keys:

    old_entropy     float32 (batch, response_len)  Shannon entropy of each completion position
    old_varentropy  float32 (batch, response_len)  variance of log p under the same distribution
    attention_mask  int32   (batch, seq_len)       1 on the prompt and completion tokens, 0 on padding
    responses       int32   (batch, response_len)  the sampled token ids, 0 on padding

plus response_mask (batch, response_len), 1 where a completion token exists. Files are written by
a background thread, so the step does not wait for the disk.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mlx_grpo.fileio import atomic_write


def entropy_arrays(entropy, varentropy, tokens, prompt_lengths, completion_lengths) -> dict[str, np.ndarray]:
    """The arrays of one dump. tokens: (N, T) prompt + completion rows; completion_lengths: (N,)."""
    entropy, varentropy = np.asarray(entropy, np.float32), np.asarray(varentropy, np.float32)
    tokens, p = np.asarray(tokens), np.asarray(prompt_lengths)
    c = np.asarray(completion_lengths)
    width = entropy.shape[1]
    response_mask = (np.arange(width)[None, :] < c[:, None]).astype(np.int32)
    index = np.clip(p[:, None] + np.arange(width)[None, :], 0, tokens.shape[1] - 1)
    responses = np.take_along_axis(tokens, index, axis=1).astype(np.int32) * response_mask
    attention = (np.arange(tokens.shape[1])[None, :] < (p + c)[:, None]).astype(np.int32)
    return {"old_entropy": entropy * response_mask, "old_varentropy": varentropy * response_mask,
            "attention_mask": attention, "responses": responses, "response_mask": response_mask}


def dump_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "entropy_data" / f"entropy_step_{step:06d}.safetensors"


class EntropyDumper:
    """Writes dumps in the background; `close` waits for the last one."""

    def __init__(self, run_dir: Path, every: int, enabled: bool = True):
        self.run_dir, self.every, self.enabled = Path(run_dir), every, enabled and every > 0
        self.pool = ThreadPoolExecutor(max_workers=1) if self.enabled else None
        self.pending = []

    def due(self, step: int) -> bool:
        return self.enabled and step % self.every == 0

    def dump(self, step: int, policy, batch, completion_lengths: list[int]) -> None:
        """The batch's entropies under the policy's current weights (one extra forward pass), written
        in the background."""
        entropy, varentropy = policy.token_entropy(batch)
        self.write(step, entropy_arrays(entropy, varentropy, batch.tokens, batch.prompt_lengths, completion_lengths))

    def write(self, step: int, arrays: dict[str, np.ndarray]) -> None:
        self.pending = [f for f in self.pending if not f.done()] + [self.pool.submit(self._save, step, arrays)]

    def _save(self, step: int, arrays: dict[str, np.ndarray]) -> None:
        from safetensors.numpy import save_file

        path = dump_path(self.run_dir, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata={"step": str(step)}))

    def close(self) -> None:
        if self.pool is not None:
            for future in self.pending:
                future.result()  # a failed write is raised here rather than lost
            self.pool.shutdown()
