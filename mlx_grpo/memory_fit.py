"""Will this config fit? An estimate of a training step's peak memory, made before the first step.

A step's peak is the larger of its two phases (measured per phase as memory/peak_<phase>_gb):

    rollout  weights + the KV cache of B*G rows. mlx-lm grows a cache in blocks of 256 tokens,
             and the shared prefill's copy into the G rows holds about 0.8 of it once more;
    update   weights + the optimizer's share (per trainable value: its gradient, two AdamW
             moments, and the updated value made before the old one is freed) + what the backward pass keeps: per completion token, each layer's
             activations (or only its input under optim.grad_checkpoint) and two rows of
             fp32 logits; per row, the prompt's keys and values about four times over.

The per-token constants are counted from the model's shapes, and the multipliers were measured on
SmolLM2-135M (scripts/bench_memory.py). They are an estimate, within about 25% of the measured
peak on the configurations tests/test_memory_fit.py runs, not an accounting of every buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

KV_BLOCK = 256  # tokens: mlx-lm's KVCache grows in steps of this many
SHARED_PREFILL_COPY = 1.8  # the cache, plus the G rows' copy of the shared prompt cache
PROMPT_KV_PASSES = 4  # the update keeps a row's prompt keys and values about this many times
FIT_FRACTION = 0.85  # refuse above this share of the machine's memory


@dataclass
class MemoryEstimate:
    weights: int  # bytes, every parameter (LoRA adapters included)
    optimizer: int  # of the trainable parameters: gradient, two AdamW moments, and the updated copy
    kv_cache: int  # the rollout's cache, for B*G rows of prompt + max_new_tokens
    activations: int  # what the update's backward pass keeps

    @property
    def rollout(self) -> int:
        return self.weights + self.kv_cache

    @property
    def update(self) -> int:
        return self.weights + self.optimizer + self.activations

    @property
    def peak(self) -> int:
        return max(self.rollout, self.update)


def _shape(model) -> dict | None:
    """The sizes the estimate needs, from an mlx-lm model's args; None where they are not there."""
    args = getattr(model, "args", None)
    hidden, heads = getattr(args, "hidden_size", None), getattr(args, "num_attention_heads", None)
    if not hasattr(model, "layers") or not hidden or not heads or not getattr(args, "vocab_size", None):
        return None
    layers = len(model.layers)
    return {"layers": layers, "hidden": hidden, "intermediate": getattr(args, "intermediate_size", 4 * hidden),
            "kv_heads": getattr(args, "num_key_value_heads", None) or heads,
            "head_dim": getattr(args, "head_dim", None) or hidden // heads, "vocab": getattr(args, "vocab_size")}


def activation_bytes(model) -> int:
    """Bytes per activation value: the model's most common floating dtype among its parameters (a
    quantised model computes in the dtype of its scales and norms)."""
    sizes = [v.dtype.size for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
    return max(set(sizes), key=sizes.count) if sizes else 4


def _nbytes(tree) -> int:
    return sum(v.nbytes for _, v in tree_flatten(tree))


def _lora_bytes(model, cfg) -> int:
    """fp32 LoRA A and B for every linear layer of the adapted blocks: an upper bound when
    lora.target_modules names only some of them."""
    blocks = model.layers if cfg.lora.num_layers in (None, -1) else model.layers[-cfg.lora.num_layers:]
    total = 0
    for block in blocks:
        for _, layer in block.named_modules():
            if isinstance(layer, nn.QuantizedLinear):
                out_dims, in_dims = layer.weight.shape[0], layer.weight.shape[1] * 32 // layer.bits
            elif isinstance(layer, nn.Linear):
                out_dims, in_dims = layer.weight.shape
            else:
                continue
            total += cfg.lora.rank * (in_dims + out_dims) * 4
    return total


def estimate(model, cfg, prompt_tokens: int) -> MemoryEstimate | None:
    """The estimate for `cfg` on the loaded `model` (before its adapters are attached), for prompts
    of up to `prompt_tokens` tokens; None for an architecture whose sizes cannot be read."""
    s = _shape(model)
    if s is None:
        return None
    act_bytes = activation_bytes(model)
    rows = cfg.rollout.batch_size * cfg.rollout.group_size
    kv_per_token = 2 * s["layers"] * s["kv_heads"] * s["head_dim"] * act_bytes
    allocated = math.ceil((prompt_tokens + cfg.rollout.max_new_tokens) / KV_BLOCK) * KV_BLOCK
    kv_cache = SHARED_PREFILL_COPY * rows * allocated * kv_per_token

    if cfg.optim.grad_checkpoint:
        per_layer = 2 * s["hidden"]  # the block's input, recomputed from in the backward pass
    else:
        per_layer = 8 * s["hidden"] + 4 * s["intermediate"]  # attention and MLP intermediates
    per_token = s["layers"] * per_layer * act_bytes + 2 * s["vocab"] * 4  # + fp32 logits, chunked
    micro_rows = max(1, rows // cfg.optim.grad_accum_steps)
    activations = micro_rows * (cfg.rollout.max_new_tokens * per_token
                                + PROMPT_KV_PASSES * prompt_tokens * kv_per_token)
    weights = _nbytes(model.parameters())
    adapters = 0 if cfg.lora.fine_tune_type == "full" else _lora_bytes(model, cfg)
    trainable = weights if cfg.lora.fine_tune_type == "full" else adapters
    return MemoryEstimate(weights=weights + adapters, optimizer=4 * trainable,
                          kv_cache=int(kv_cache), activations=int(activations))


def estimate_record(found: MemoryEstimate) -> dict[str, float]:
    """The memory/estimated_*_gb scalars, logged next to the measured memory/peak_*_gb."""
    gb = 1024 ** 3
    return {"memory/estimated_rollout_gb": found.rollout / gb, "memory/estimated_update_gb": found.update / gb,
            "memory/estimated_peak_gb": found.peak / gb}


def longest_prompt(tokenizer, samples: list[dict], system_prompt: str | None, limit: int = 256) -> int:
    """Tokens of the longest of the first `limit` prompts, as the trainer will build them."""
    from mlx_grpo.data import build_prompt_tokens

    return max((len(build_prompt_tokens(tokenizer, s, system_prompt)) for s in samples[:limit]), default=1)


def machine_memory() -> tuple[int, str]:
    """(bytes training may use, what that is): Metal's recommended working set on Apple silicon,
    else the machine's RAM."""
    if mx.metal.is_available():
        return int(mx.device_info()["max_recommended_working_set_size"]), "the GPU's recommended working set"
    import psutil

    return int(psutil.virtual_memory().total), "RAM"


def refusal(found: MemoryEstimate, available: int, what: str) -> str | None:
    """The one-line message when the estimate passes FIT_FRACTION of `available`, else None."""
    if found.peak <= FIT_FRACTION * available:
        return None
    phase = "rollout" if found.rollout >= found.update else "update"
    knobs = ("rollout.batch_size, rollout.group_size, rollout.max_new_tokens" if phase == "rollout" else
             "rollout.batch_size, rollout.max_new_tokens, or turn on optim.grad_checkpoint / raise "
             "optim.grad_accum_steps")
    gb = 1024 ** 3
    return (f"this config needs about {found.peak / gb:.1f} GB at its {phase} peak, {found.peak / available:.0%} of "
            f"the {available / gb:.1f} GB of {what} (limit {FIT_FRACTION:.0%}); lower {knobs}, use a smaller "
            "model or dtype, or pass --force to try anyway")
