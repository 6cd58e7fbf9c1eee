"""An mlx-lm model (dense weights, config.json, tokenizer files) -> one GGUF file that llama.cpp,
Ollama and LM Studio load, written with llama.cpp's own Python package (`gguf`).

The inverse of convert.py: the same architectures (SUPPORTED_ARCHS), the same tokenizer kinds
(byte-level BPE with a pre-tokenizer that tokenizer.py rebuilds), and llama's Q/K rows permuted
back into llama.cpp's interleaved rope layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_grpo.errors import UserInputError
from mlx_grpo.gguf.header import SUPPORTED_ARCHS
from mlx_grpo.gguf.tokenizer import _LLAMA3_REGEX, _QWEN2_REGEX

# --gguf choice -> (the type of 2-D weight matrices, llama.cpp's file type). Norms and biases stay F32,
# as llama.cpp's own converter keeps them.
OUTTYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0")}


def check_exportable(config: dict) -> None:
    """Refuse, in one line, a model that the GGUF export (and llama.cpp) cannot represent."""
    arch = config.get("model_type")
    if arch not in SUPPORTED_ARCHS:
        raise UserInputError(f"GGUF export: architecture '{arch}' is not supported (supported: "
                             f"{', '.join(SUPPORTED_ARCHS)}); the fused mlx-lm directory works with any architecture")
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("type") or scaling.get("rope_type")
    if kind not in (None, "default", "linear"):
        raise UserInputError(f"GGUF export: rope scaling '{kind}' is not supported (only linear)")


def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split rope layout -> llama.cpp's interleaved pairs (convert.unpermute_rope_rows undoes it)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for how this tokenizer splits text before BPE, read from
    its tokenizer.json. Only the splits that llama.cpp and tokenizer.py both know are named."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = (parts[0].get("pattern") or {}).get("Regex")
        names = {_QWEN2_REGEX: "qwen2", _LLAMA3_REGEX: "llama-bpe"}
        if regex in names:
            return names[regex]
    raise UserInputError(f"GGUF export: the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) "
                         "is not one llama.cpp is known to reproduce (gpt2, smollm, qwen2, llama-bpe)")


def _vocab(tokenizer_json: dict, vocab_size: int):
    """Tokens in id order and their llama.cpp types; ids the tokenizer does not use (a padded
    embedding) become unused [PAD<id>] tokens, as in llama.cpp's converter."""
    import gguf

    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise UserInputError(f"GGUF export: tokenizer model '{model.get('type')}' is not supported (only byte-level BPE)")
    by_id = {i: token for token, i in model["vocab"].items()}
    kinds = {}
    for added in tokenizer_json.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        kinds[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    size = max(vocab_size, max(by_id) + 1)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    types = [kinds.get(i, gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED) for i in range(size)]
    return tokens, types


def _add_hyperparameters(writer, config: dict) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    scaling = config.get("rope_scaling") or {}
    if (scaling.get("type") or scaling.get("rope_type")) == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))


def _add_tokenizer(writer, tokenizer_dir: Path, vocab_size: int) -> None:
    import gguf

    tokenizer_json = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tokens, types = _vocab(tokenizer_json, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(gguf_pre_tokenizer(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # Merges, special token ids, add_bos and the chat template, read the way llama.cpp's converter does.
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise UserInputError(f"GGUF export: {tokenizer_dir / 'tokenizer.json'} has no BPE merges")
    special.add_to_gguf(writer, quiet=True)


def _tensors(weights: dict[str, mx.array], config: dict, outtype: str):
    """(GGUF name, numpy data, its GGML type) for each weight, llama's Q/K rows permuted."""
    import gguf

    arch = config["model_type"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    matrix_type = gguf.GGMLQuantizationType[OUTTYPES[outtype][0]]
    for name, value in weights.items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserInputError(f"GGUF export: tensor '{name}' has no llama.cpp name for {arch}")
        data = np.array(value.astype(mx.float32))
        if arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config["num_attention_heads"] if "attn_q" in gguf_name else config["num_key_value_heads"]
            data = permute_rope_rows(data, heads)
        kind = matrix_type if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        if kind == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
            kind = gguf.GGMLQuantizationType.F16  # Q8_0 blocks are 32 wide; llama.cpp falls back the same way
        yield gguf_name, gguf.quants.quantize(data, kind), kind


def write_gguf(weights: dict[str, mx.array], config: dict, tokenizer_dir: Path, path: Path, outtype: str,
               name: str) -> None:
    """Write a GGUF file of `outtype` (f32, f16, q8_0) at `path` from dense mlx-lm weights and their
    config.json, with the tokenizer and chat template of `tokenizer_dir`. The caller makes it atomic."""
    import gguf

    check_exportable(config)
    if outtype not in OUTTYPES:
        raise UserInputError(f"GGUF export: type '{outtype}' is not one of {', '.join(OUTTYPES)}")
    # Each tensor goes to a temporary file as it is converted, so a large model is never held twice in memory.
    writer = gguf.GGUFWriter(str(path), config["model_type"], use_temp_file=True)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[OUTTYPES[outtype][1]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hyperparameters(writer, config)
    _add_tokenizer(writer, tokenizer_dir, config["vocab_size"])
    for gguf_name, data, kind in _tensors(weights, config, outtype):
        writer.add_tensor(gguf_name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
