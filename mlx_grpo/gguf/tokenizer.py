"""A Hugging Face `tokenizers` tokenizer rebuilt from a GGUF's vocabulary, merges and metadata."""

from __future__ import annotations

from pathlib import Path

from mlx_grpo.errors import UserInputError
from mlx_grpo.gguf.header import scalar

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

    bos = scalar(metadata, "tokenizer.ggml.bos_token_id")
    if scalar(metadata, "tokenizer.ggml.add_bos_token", False) and bos is not None:
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
        "add_bos_token": bool(scalar(metadata, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(scalar(metadata, "tokenizer.ggml.add_eos_token", False)),
    }
    arch = metadata.get("general.architecture")
    if (ctx := scalar(metadata, f"{arch}.context_length")) is not None:
        config["model_max_length"] = ctx
    # GGUF spells two of the keys out: padding_token_id, unknown_token_id.
    for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        token_id = scalar(metadata, f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            config[f"{role}_token"] = tokens[token_id]
    if template := metadata.get("tokenizer.chat_template"):
        config["chat_template"] = template
    return config
