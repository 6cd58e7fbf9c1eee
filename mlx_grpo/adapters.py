"""What is trained: LoRA adapters (mlx-lm's own layers and format) or every weight; the reference
policy as the same model with its adapters switched off; and saving the adapters.

`mlx_lm.load(model, adapter_path=...)` reproduces a trained model exactly from what
`save_adapters` writes.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_grpo.errors import UserInputError
from mlx_grpo.fileio import atomic_write


def _lora_classes() -> tuple[type, ...]:
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

    return (LoRALinear, LoRASwitchLinear, LoRAEmbedding)


def _expand_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Short names ("q_proj") -> mlx-lm's block-relative keys ("self_attn.q_proj")."""
    block_keys = [k for k, m in model.layers[0].named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    keys = []
    for target in targets:
        found = [k for k in block_keys if k == target or k.endswith("." + target)]
        if not found:
            raise UserInputError(
                f"lora target module '{target}' is not in the model (available: {', '.join(sorted(block_keys))})"
            )
        keys.extend(k for k in found if k not in keys)
    return keys


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    dropout: float,
    num_layers: int,
    target_modules: list[str] | None = None,
) -> dict:
    """Freeze `model` and add LoRA to the last `num_layers` blocks (-1 = all). Returns adapter_config."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    total = len(model.layers)
    if rank < 1:
        raise UserInputError(f"lora rank must be >= 1, got {rank}")
    if not 0 <= dropout < 1:
        raise UserInputError(f"lora dropout must be in [0, 1), got {dropout}")
    if num_layers != -1 and not 1 <= num_layers <= total:
        raise UserInputError(f"lora num_layers must be -1 or 1..{total}, got {num_layers}")
    n = total if num_layers == -1 else num_layers
    params = {"rank": int(rank), "scale": float(alpha) / rank, "dropout": float(dropout)}
    if target_modules:
        params["keys"] = _expand_targets(model, list(target_modules))

    model.freeze()
    linear_to_lora_layers(model, n, params)
    return {"fine_tune_type": "lora", "num_layers": n, "lora_parameters": params}


def prepare_full_finetune(model: nn.Module) -> dict:
    """Every parameter trainable; adapter_config for mlx-lm's `full` fine-tune type."""
    model.unfreeze()
    return {"fine_tune_type": "full", "num_layers": len(model.layers)}


def has_lora(model: nn.Module) -> bool:
    lora = _lora_classes()
    return any(isinstance(m, lora) for m in model.modules())


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every LoRA layer contributes nothing: the model is the base (reference) model.

    LoRA adds `scale * B(A(x))`; a zero scale removes it exactly. `scale` is a plain float baked
    into any `mx.compile`d function, so do not reuse one compiled function across this switch.
    """
    from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear

    if any(isinstance(m, (DoRALinear, DoRAEmbedding)) for m in model.modules()):
        raise ValueError("adapters_disabled: DoRA layers cannot be switched off by their scale")
    layers = [m for m in model.modules() if isinstance(m, _lora_classes())]
    scales = [m.scale for m in layers]
    try:
        for m in layers:
            m.scale = 0.0
        yield model
    finally:
        for m, s in zip(layers, scales):
            m.scale = s


def save_adapters(model: nn.Module, out_dir: str | Path, adapter_config: dict) -> None:
    """adapters.safetensors (the trainable parameters) + adapter_config.json, in mlx-lm's format."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.eval(weights)
    # The suffix keeps save_safetensors from appending its own ".safetensors".
    atomic_write(out / "adapters.safetensors", lambda tmp: mx.save_safetensors(tmp, weights))
    text = json.dumps(adapter_config, indent=2) + "\n"
    atomic_write(out / "adapter_config.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
