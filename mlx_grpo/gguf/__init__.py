"""GGUF files: read the header, convert to an mlx-lm model directory, rebuild the tokenizer.

A GGUF file is converted once into an ordinary mlx-lm model directory (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json) in a cache, so everything downstream
only ever sees `mlx_lm.load(dir)`. Only llama, qwen2 and qwen3 GGUFs with byte-level BPE tokenizers
are supported; anything else is a `UserInputError`. writer.py goes the other way, for `uv run export`.
"""

from mlx_grpo.gguf.convert import cache_root, materialize_gguf
from mlx_grpo.gguf.header import SUPPORTED_ARCHS, check_arch, gguf_architecture, gguf_header

__all__ = ["SUPPORTED_ARCHS", "cache_root", "check_arch", "gguf_architecture", "gguf_header", "materialize_gguf"]
