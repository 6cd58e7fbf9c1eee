"""A trained run -> models that other tools run: a fused mlx-lm directory (the adapters merged into
the weights), a GGUF file for llama.cpp, Ollama and LM Studio, and an Ollama Modelfile beside it.

Every file is written under a temporary name and renamed when complete, so a crash or a full disk
never leaves half a model behind. The fused model is checked against the adapter model it came from:
the largest logit difference on a few held-out prompts is measured, not assumed.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_grpo.errors import UserInputError, first_line
from mlx_grpo.fileio import atomic_dir, atomic_write

# Bytes a weight takes in each GGUF type (Q8_0: 34 bytes a block of 32), for the free-space check.
GGUF_BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def fuse_adapters(model: nn.Module, dequantize: bool) -> int:
    """Merge every LoRA (or DoRA) layer into the weight it wraps, in place; returns how many.

    A quantized weight is dequantized, the adapter added, and the sum quantized again with the
    same bits and group size (mlx-lm's fuse), unless `dequantize`: then every quantized layer,
    fused or not, becomes a float one.
    """
    from mlx_lm.utils import dequantize_model

    fused = [(name, module.fuse(dequantize=dequantize)) for name, module in model.named_modules()
             if hasattr(module, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        dequantize_model(model)
    return len(fused)


def prompt_logits(model: nn.Module, prompts: list[list[int]]) -> list[mx.array]:
    """The float32 logits of every position of each prompt, one prompt at a time (no padding)."""
    out = []
    for tokens in prompts:
        logits = model(mx.array([tokens]))[0].astype(mx.float32)
        mx.eval(logits)
        out.append(logits)
    return out


def max_logit_gap(before: list[mx.array], after: list[mx.array]) -> float:
    return max(mx.abs(a - b).max().item() for a, b in zip(before, after))


def merge_adapters(model: nn.Module, prompts: list[list[int]], dequantize: bool) -> tuple[int, float, float | None]:
    """fuse_adapters, measured on `prompts`: (layers merged, how far the merge moved the logits, how far
    the adapters move them from the base model (None for a full fine-tune)). A merge gap near the
    adapters' own effect means rounding (bfloat16 weights, requantization) lost the training."""
    from mlx_grpo.adapters import adapters_disabled, has_lora

    trained = prompt_logits(model, prompts)
    effect = None
    if has_lora(model):
        with adapters_disabled(model):
            effect = max_logit_gap(prompt_logits(model, prompts), trained)
    fused = fuse_adapters(model, dequantize)
    return fused, max_logit_gap(trained, prompt_logits(model, prompts)), effect


# --- writing, never half a file ---------------------------------------------------------------------

@contextmanager
def disk_errors(what: Path):
    """An OSError while writing `what` as one line: a full disk (or a file-size limit) says so."""
    try:
        yield
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise UserInputError(f"export: no space left to write {what} ({err.strerror}); nothing was kept") from None
        raise UserInputError(f"export: cannot write {what} ({err.strerror or err}); nothing was kept") from None
    except RuntimeError as err:
        if "write" not in str(err).lower():
            raise
        # MLX's own file writer says only that the write failed, most likely for want of space.
        raise UserInputError(f"export: writing {what} failed ({first_line(err)}), is the disk full? "
                             "Nothing was kept") from None


def check_free_space(directory: Path, needed_bytes: float) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed_bytes * 1.05:
        raise UserInputError(f"export: not enough disk space in {directory}: the export needs about "
                             f"{needed_bytes / 1e9:.2f} GB and {free / 1e9:.2f} GB are free")


def save_fused_dir(model: nn.Module, tokenizer, config: dict, source_dir: Path, target: Path) -> None:
    """An mlx-lm model directory (weights, config.json, tokenizer, chat template) that `mlx_lm.load`
    and LM Studio's MLX engine load as they would any model."""
    from mlx_lm.utils import save

    weights_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    target.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(target.parent, weights_bytes)
    with disk_errors(target):
        atomic_dir(target, lambda tmp: save(tmp, source_dir, model, tokenizer, config, donate_model=False))


def save_gguf(weights: dict[str, mx.array], config: dict, tokenizer_dir: Path, path: Path, outtype: str,
              name: str) -> None:
    from mlx_grpo.gguf.writer import write_gguf  # (which refuses an architecture it cannot write)

    path.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(path.parent, sum(v.size for v in weights.values()) * GGUF_BYTES_PER_WEIGHT[outtype])
    with disk_errors(path):
        atomic_write(path, lambda tmp: write_gguf(weights, config, tokenizer_dir, Path(tmp), outtype, name))


# --- Ollama ------------------------------------------------------------------------------------------

# Ollama's Go-template spelling of the two chat formats that most small models use; for any other
# template Ollama reads the GGUF's own chat template and matches it to one it knows.
_OLLAMA_TEMPLATES = {
    "<|im_start|>": ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
                     '<|im_start|>assistant\n'),
    "<|start_header_id|>": ('{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
                            '{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n'),
}


def trained_system_prompt(tokenizer, system_prompt: str) -> str:
    """The system prompt the model saw in training: the run's own, or else the one its chat template
    adds by itself when none is given (SmolLM2's does), found by rendering the template."""
    if system_prompt:
        return system_prompt
    marker = "\x00question\x00"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=False)
    except Exception:  # noqa: BLE001  (a tokenizer without a chat template)
        return ""
    found = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.S)
    return found.group(1) if found else ""


def modelfile_text(gguf_name: str, model_name: str, tokenizer, system_prompt: str) -> str:
    """An Ollama Modelfile for the GGUF beside it: the chat format, the system prompt the model was
    trained with, and its end-of-turn tokens as stop words."""
    template = getattr(tokenizer, "chat_template", None) or ""
    lines = [f"# ollama create {model_name} -f Modelfile", f"FROM ./{gguf_name}"]
    for marker, go_template in _OLLAMA_TEMPLATES.items():
        if marker in template:
            lines.append(f'TEMPLATE """{go_template}"""')
            break
    if system := trained_system_prompt(tokenizer, system_prompt):
        lines.append(f'SYSTEM """{system}"""')
    for token_id in sorted(tokenizer.eos_token_ids):
        lines.append(f"PARAMETER stop {json.dumps(tokenizer.convert_ids_to_tokens(token_id))}")
    return "\n".join(lines) + "\n"


def ollama_name(run_name: str) -> str:
    """A model name Ollama accepts: lower case letters, digits, '.', '_' and '-'."""
    return re.sub(r"[^a-z0-9._-]+", "-", run_name.lower()).strip("-._") or "mlx-grpo-model"
