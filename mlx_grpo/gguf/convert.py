"""GGUF -> a cached mlx-lm model directory: config from the metadata, tensors renamed (and the
llama Q/K rows un-permuted), dequantised unless the dtype is `native`."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import mlx.core as mx

from mlx_grpo.errors import UserInputError
from mlx_grpo.fileio import atomic_dir
from mlx_grpo.gguf.header import check_arch, gguf_architecture, scalar
from mlx_grpo.gguf.tokenizer import build_tokenizer, tokenizer_config

DTYPES = ("auto", "float32", "float16", "bfloat16", "native")
# Bump when the conversion output changes, so stale cache entries are not reused.
CONVERTER_VERSION = 2
# MLX's GGUF reader unpacks Q4_0/Q4_1/Q8_0 blocks into affine groups of this size.
GGUF_GROUP_SIZE = 32


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise UserInputError(f"model dtype '{dtype}' is not one of {', '.join(DTYPES)}")


def resolve_dtype(dtype: str) -> str:
    """'auto' is bfloat16 where MLX runs on Metal (the GPU's fast type, half the memory) and float32 on
    a CPU (bfloat16 matmuls are slow there); any other value is itself."""
    check_dtype(dtype)
    if dtype != "auto":
        return dtype
    return "bfloat16" if mx.metal.is_available() else "float32"


def cache_root() -> Path:
    """Where converted models live: $MLX_GRPO_CACHE/models, default ~/.cache/mlx-grpo/models."""
    base = os.environ.get("MLX_GRPO_CACHE") or Path.home() / ".cache" / "mlx-grpo"
    return Path(base).expanduser() / "models"


def _cache_name(gguf: Path, dtype: str) -> str:
    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|v{CONVERTER_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return f"{gguf.stem}-{dtype}-{digest}"


def materialize_gguf(gguf_path: str | Path, dtype: str = "float32") -> Path:
    """Convert a GGUF file into a cached mlx-lm model directory (once) and return the directory."""
    check_dtype(dtype)
    gguf = Path(gguf_path).expanduser()
    if not gguf.is_file():
        raise UserInputError(f"GGUF {gguf_path}: file does not exist")
    target = cache_root() / _cache_name(gguf, dtype)
    if (target / "config.json").is_file():
        return target

    check_arch(gguf_architecture(gguf), gguf)
    try:
        weights, metadata = mx.load(str(gguf), return_metadata=True)
    except Exception as err:  # MLX raises RuntimeError/ValueError with its own wording
        raise UserInputError(f"GGUF {gguf}: MLX cannot read it ({err})") from None

    config = gguf_config(metadata, weights, gguf)
    tensors = convert_tensors(weights, config, dtype)
    if dtype == "native":
        config["quantization"] = quantization_config(tensors)
        config["quantization_config"] = config["quantization"]
    tokenizer = build_tokenizer(metadata, gguf)
    tok_config = tokenizer_config(metadata)

    def write(tmp: Path) -> None:
        mx.save_safetensors(str(tmp / "model.safetensors"), tensors, metadata={"format": "mlx"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tok_config)
        _write_json(tmp / "config.json", config)

    # A crash or a concurrent run never leaves half a model; a concurrent run's finished one is kept.
    atomic_dir(target, write, replace=False)
    return target


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def gguf_config(metadata: dict, weights: dict, where: Path) -> dict:
    """An HF-style config.json for mlx-lm, every hyperparameter taken from the GGUF metadata."""
    arch = metadata.get("general.architecture")
    check_arch(arch, where)

    def need(key):
        value = scalar(metadata, f"{arch}.{key}")
        if value is None:
            raise UserInputError(f"GGUF {where}: metadata lacks {arch}.{key}")
        return value

    if "rope_freqs.weight" in weights:
        raise UserInputError(f"GGUF {where}: llama3-style rope frequency scaling is not supported")
    scaling = scalar(metadata, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise UserInputError(f"GGUF {where}: rope scaling '{scaling}' is not supported")

    hidden = need("embedding_length")
    heads = need("attention.head_count")
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    if "token_embd.weight" not in weights:
        raise UserInputError(f"GGUF {where}: has no token_embd.weight tensor")
    vocab = scalar(metadata, f"{arch}.vocab_size") or weights["token_embd.weight"].shape[0]
    config = {
        "model_type": arch,
        "architectures": [_HF_CLASSES[arch]],
        "hidden_size": hidden,
        "num_hidden_layers": need("block_count"),
        "intermediate_size": need("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": scalar(metadata, f"{arch}.attention.head_count_kv", heads),
        "head_dim": scalar(metadata, f"{arch}.attention.key_length", hidden // heads),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "vocab_size": int(vocab),
        "max_position_embeddings": need("context_length"),
        # llama.cpp's default is 10000; SmolLM2 stores 100000 and babbles with the wrong one.
        "rope_theta": float(scalar(metadata, f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in weights,
        "attention_bias": arch == "qwen2",
        "mlp_bias": False,
    }
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(need("rope.scaling.factor"))}
    eos_ids = _eos_ids(metadata, tokens)
    if eos_ids:
        config["eos_token_id"] = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    bos = scalar(metadata, "tokenizer.ggml.bos_token_id")
    if bos is not None:
        config["bos_token_id"] = bos
    return config


def _eos_ids(metadata: dict, tokens: list[str]) -> list[int]:
    """EOS from metadata, plus the ChatML end-of-turn token when the chat template uses it."""
    ids = []
    eos = scalar(metadata, "tokenizer.ggml.eos_token_id")
    if eos is not None:
        ids.append(eos)
    template = metadata.get("tokenizer.chat_template") or ""
    if "<|im_end|>" in template and "<|im_end|>" in tokens:
        im_end = tokens.index("<|im_end|>")
        if im_end not in ids:
            ids.append(im_end)
    return ids


_HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",  # qwen3's per-head norms of queries and keys
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_tensor_name(name: str) -> str | None:
    """GGUF tensor name -> mlx-lm name (None when unknown). Suffixes (.weight/.bias/.scales/.biases) are kept."""
    module, _, suffix = name.rpartition(".")
    if module in _TOP_NAMES:
        return f"{_TOP_NAMES[module]}.{suffix}"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", module)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}.{suffix}"
    return None


def unpermute_rope_rows(w: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's Q/K row permutation (interleaved rope pairs -> HF's half-split layout).

    llama.cpp stores `W.reshape(h, 2, d/2, ...).swapaxes(1, 2)`; quantisation groups run along
    the columns, so the same row shuffle also applies to packed weights, scales and biases.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_tensors(weights: dict, config: dict, dtype: str) -> dict:
    """Rename GGUF tensors for mlx-lm, fix the llama Q/K layout, and dequantise unless `native`."""
    out = {}
    for name, value in weights.items():
        hf = hf_tensor_name(name)
        if hf is None:
            raise UserInputError(f"GGUF tensor '{name}' has no mlx-lm equivalent; this GGUF variant is not supported")
        if config["model_type"] == "llama" and (".q_proj." in hf or ".k_proj." in hf):
            heads = config["num_attention_heads"] if ".q_proj." in hf else config["num_key_value_heads"]
            value = unpermute_rope_rows(value, heads)
        out[hf] = value

    if dtype == "native":
        return out
    target = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[dtype]
    dense = {}
    for name, value in out.items():
        if name.endswith((".scales", ".biases")):
            continue
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and f"{module}.scales" in out:
            value = _dequantize(value, out[f"{module}.scales"], out[f"{module}.biases"])
        dense[name] = value.astype(target)
    mx.eval(dense)
    return dense


def _quant_bits(weight: mx.array, scales: mx.array) -> int:
    return weight.shape[-1] * 32 // (scales.shape[-1] * GGUF_GROUP_SIZE)


def _dequantize(weight: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
    # Dequantise in fp32: the fp16 scales would otherwise round the result a second time.
    return mx.dequantize(
        weight,
        scales.astype(mx.float32),
        biases.astype(mx.float32),
        group_size=GGUF_GROUP_SIZE,
        bits=_quant_bits(weight, scales),
    )


def quantization_config(tensors: dict) -> dict:
    """mlx-lm's `quantization` entry for GGUF-quantised tensors kept as they are.

    The default is the most common bit width; modules with another width (SmolLM2's Q8_0
    embedding next to Q4_1 layers) get a per-module override. Unquantised modules (norms) are
    skipped by mlx-lm automatically because they have no `.scales`.
    """
    bits = {
        name[: -len(".scales")]: _quant_bits(tensors[name.replace(".scales", ".weight")], tensors[name])
        for name in tensors
        if name.endswith(".scales")
    }
    if not bits:
        raise UserInputError("GGUF has no quantised tensors; use dtype float32/float16/bfloat16 instead of native")
    widths = list(bits.values())
    default = max(set(widths), key=widths.count)
    quant = {"group_size": GGUF_GROUP_SIZE, "bits": default, "mode": "affine"}
    for module, width in sorted(bits.items()):
        if width != default:
            quant[module] = {"group_size": GGUF_GROUP_SIZE, "bits": width, "mode": "affine"}
    return quant
