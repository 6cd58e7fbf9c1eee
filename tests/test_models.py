"""Model loading, GGUF conversion, LoRA and adapters, on the embedded SmolLM2 and a tiny model."""

import json
import struct
import time

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from mlx.utils import tree_flatten

from mlx_grpo.errors import UserInputError
from mlx_grpo.adapters import adapters_disabled, apply_lora, has_lora, prepare_full_finetune, save_adapters
from mlx_grpo.gguf import materialize_gguf
from mlx_grpo.gguf.convert import unpermute_rope_rows
from mlx_grpo.models import builtin_gguf_path, is_hf_id, load_model, resolve_model_path, validate_model_path

SMOLLM = "smollm2-135m-instruct"


# ---------------------------------------------------------------------------------------------
# Fixtures: one fp32 conversion of the embedded SmolLM2 per test session, in a private cache.


@pytest.fixture(scope="session")
def smollm_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("mlx-grpo-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLX_GRPO_CACHE", str(cache))
        start = time.perf_counter()
        model_dir = materialize_gguf(builtin_gguf_path(SMOLLM), "float32")
        print(f"\ncold materialise: {time.perf_counter() - start:.2f}s -> {model_dir}")
    return cache, model_dir


@pytest.fixture
def smollm_env(smollm_cache, monkeypatch):
    cache, model_dir = smollm_cache
    monkeypatch.setenv("MLX_GRPO_CACHE", str(cache))
    return model_dir


def chat_prompt(tokenizer, question):
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)


def greedy(model, tokenizer, question, max_tokens=24):
    return mlx_lm.generate(model, tokenizer, chat_prompt(tokenizer, question), max_tokens=max_tokens)


def write_gguf(path, arch="gpt2", truncate_at=None):
    """A minimal valid GGUF v3 header: no tensors, one general.architecture string."""

    def gguf_str(s):
        return struct.pack("<Q", len(s)) + s.encode()

    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 2)
    data += gguf_str("general.name") + struct.pack("<I", 8) + gguf_str("test model")
    data += gguf_str("general.architecture") + struct.pack("<I", 8) + gguf_str(arch)
    path.write_bytes(data[:truncate_at])
    return path


# ---------------------------------------------------------------------------------------------
# The embedded SmolLM2, converted from GGUF


def test_smollm_answers_arithmetic_greedily(smollm_env):
    model, tokenizer, resolved = load_model(SMOLLM)
    assert resolved == str(smollm_env)
    reply = greedy(model, tokenizer, "What is 2+3?")
    print(f"SmolLM2 fp32 greedy reply: {reply!r}")
    assert "5" in reply
    # Generation stopped on <|im_end|> rather than running to max_tokens.
    assert len(tokenizer.encode(reply)) < 24


def test_materialized_dir_has_gguf_hyperparameters_and_tokenizer(smollm_env):
    config = json.loads((smollm_env / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["rope_theta"] == 100000.0
    assert (config["hidden_size"], config["num_hidden_layers"]) == (576, 30)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["intermediate_size"] == 1536
    assert config["vocab_size"] == 49152
    assert config["max_position_embeddings"] == 8192
    assert config["tie_word_embeddings"] is True
    assert "quantization" not in config
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (smollm_env / name).is_file()

    weights = mx.load(str(smollm_env / "model.safetensors"))
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == mx.float32
    assert "lm_head.weight" not in weights

    tokenizer = mlx_lm.tokenizer_utils.load(smollm_env)
    text = "Hello, world! 12345 café\n  indented\tTAB <|im_start|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert ids[-1] == 1  # the control token stays one token, not split by BPE
    assert tokenizer.encode("123", add_special_tokens=False) == [33, 34, 35]  # digits split singly
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_ids == {2}
    assert tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.unk_token == "<|endoftext|>"


def test_second_materialize_reuses_cache(smollm_env):
    model_file = smollm_env / "model.safetensors"
    before = model_file.stat().st_mtime_ns
    start = time.perf_counter()
    again = resolve_model_path(SMOLLM)
    warm = time.perf_counter() - start
    print(f"warm materialise: {warm * 1000:.1f} ms")
    assert again == str(smollm_env)
    assert model_file.stat().st_mtime_ns == before
    assert warm < 0.5
    # No temp build directories are left behind next to the cache entry.
    assert [p.name for p in smollm_env.parent.iterdir() if p.name.startswith(".")] == []


def test_dtype_is_part_of_the_cache_key(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_GRPO_CACHE", str(tmp_path))
    half = materialize_gguf(builtin_gguf_path(SMOLLM), "float16")
    assert half.parent == tmp_path / "models" and "float16" in half.name
    weights = mx.load(str(half / "model.safetensors"))
    assert weights["model.embed_tokens.weight"].dtype == mx.float16


def test_save_adapters_round_trips_through_mlx_lm_load(smollm_env, tmp_path):
    model, tokenizer, model_dir = load_model(SMOLLM)
    config = apply_lora(model, rank=4, alpha=8.0, dropout=0.0, num_layers=2, target_modules=None)
    mx.random.seed(1)
    for layer in model.layers[-2:]:
        for proj in (layer.self_attn.q_proj, layer.mlp.down_proj):
            proj.lora_b = 0.05 * mx.random.normal(proj.lora_b.shape)
    model.eval()
    out = tmp_path / "adapters"
    save_adapters(model, out, config)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapters.safetensors"]
    assert json.loads((out / "adapter_config.json").read_text()) == config

    loaded, loaded_tok = mlx_lm.load(model_dir, adapter_path=str(out))
    x = mx.array([tokenizer.encode("The capital of France is")])
    with adapters_disabled(model):
        base = model(x)
    ours, theirs = model(x), loaded(x)
    assert not mx.allclose(ours, base, atol=1e-3)  # the adapters really change the model
    assert mx.array_equal(ours, theirs)
    assert greedy(model, tokenizer, "What is 2+3?", 12) == greedy(loaded, loaded_tok, "What is 2+3?", 12)


def test_native_dtype_keeps_gguf_quantisation(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_GRPO_CACHE", str(tmp_path))
    model, tokenizer, model_dir = load_model(SMOLLM, "native")
    config = json.loads((tmp_path / "models" / model_dir.rsplit("/", 1)[-1] / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8  # SmolLM2's embedding is Q8_0
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    apply_lora(model, rank=2, alpha=4.0, dropout=0.0, num_layers=1, target_modules=["q_proj"])  # QLoRA
    reply = greedy(model, tokenizer, "What is 2+3?", 12)
    print(f"SmolLM2 native (4-bit) greedy reply: {reply!r}")
    assert "5" in reply


# ---------------------------------------------------------------------------------------------
# LoRA on the tiny random model


def perturb_lora(model, seed=3):
    mx.random.seed(seed)
    for name, module in model.named_modules():
        if hasattr(module, "lora_b"):
            module.lora_b = 0.1 * mx.random.normal(module.lora_b.shape)


def test_apply_lora_trains_only_adapters_of_the_last_blocks(tiny_model):
    assert not has_lora(tiny_model)
    config = apply_lora(tiny_model, rank=4, alpha=8.0, dropout=0.05, num_layers=1, target_modules=None)
    assert config == {
        "fine_tune_type": "lora",
        "num_layers": 1,
        "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.05},
    }
    assert has_lora(tiny_model)
    trainable = [name for name, _ in tree_flatten(tiny_model.trainable_parameters())]
    assert trainable and all(name.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for name in trainable)
    assert all(name.startswith("model.layers.1.") for name in trainable)
    assert len(trainable) == 2 * 7  # q, k, v, o, gate, up, down


def test_apply_lora_target_modules_and_all_layers(tiny_model):
    config = apply_lora(tiny_model, 2, 2.0, 0.0, -1, ["q_proj", "self_attn.v_proj"])
    assert config["num_layers"] == 2
    assert config["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    trainable = {name.rsplit(".", 1)[0] for name, _ in tree_flatten(tiny_model.trainable_parameters())}
    assert trainable == {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"target_modules": ["wq"]}, "'wq'"),
        ({"num_layers": 0}, "num_layers"),
        ({"num_layers": 3}, "num_layers"),
        ({"rank": 0}, "rank"),
    ],
)
def test_apply_lora_rejects_bad_settings(tiny_model, kwargs, fragment):
    args = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "num_layers": -1, "target_modules": None} | kwargs
    with pytest.raises(UserInputError, match=fragment):
        apply_lora(tiny_model, **args)


def test_adapters_disabled_gives_the_base_model(tiny_model):
    x = mx.array([[1, 5, 9, 200, 17, 3]])
    with adapters_disabled(tiny_model):  # a no-op without LoRA
        before = tiny_model(x)
    assert mx.array_equal(before, tiny_model(x))

    apply_lora(tiny_model, rank=4, alpha=8.0, dropout=0.0, num_layers=-1, target_modules=None)
    perturb_lora(tiny_model)
    enabled = tiny_model(x)
    with adapters_disabled(tiny_model) as ref:
        disabled = ref(x)
    assert mx.array_equal(disabled, before)
    assert not mx.allclose(enabled, before, atol=1e-3)
    assert mx.array_equal(tiny_model(x), enabled)  # scales restored


def test_adapters_disabled_restores_scales_on_error(tiny_model):
    apply_lora(tiny_model, rank=4, alpha=8.0, dropout=0.0, num_layers=-1, target_modules=None)
    with pytest.raises(RuntimeError):
        with adapters_disabled(tiny_model):
            assert tiny_model.model.layers[0].self_attn.q_proj.scale == 0.0
            raise RuntimeError("boom")
    assert tiny_model.model.layers[0].self_attn.q_proj.scale == 2.0


def test_prepare_full_finetune_unfreezes_everything(tiny_model, tmp_path):
    tiny_model.freeze()
    config = prepare_full_finetune(tiny_model)
    assert config == {"fine_tune_type": "full", "num_layers": 2}
    all_params = {k for k, _ in tree_flatten(tiny_model.parameters())}
    assert {k for k, _ in tree_flatten(tiny_model.trainable_parameters())} == all_params
    save_adapters(tiny_model, tmp_path, config)
    assert set(mx.load(str(tmp_path / "adapters.safetensors"))) == all_params


def test_save_adapters_overwrites_atomically(tiny_model, tmp_path):
    config = apply_lora(tiny_model, rank=4, alpha=8.0, dropout=0.0, num_layers=1, target_modules=None)
    save_adapters(tiny_model, tmp_path, config)
    perturb_lora(tiny_model)
    save_adapters(tiny_model, tmp_path, config)
    saved = mx.load(str(tmp_path / "adapters.safetensors"))
    current = dict(tree_flatten(tiny_model.trainable_parameters()))
    assert saved.keys() == current.keys()
    assert all(mx.array_equal(saved[k], current[k]) for k in saved)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapters.safetensors"]


# ---------------------------------------------------------------------------------------------
# Path handling and errors


def test_llama_cpp_rope_permutation_is_undone():
    heads, head_dim, cols = 3, 8, 5
    hf = mx.arange(heads * head_dim * cols).reshape(heads * head_dim, cols)
    # llama.cpp's convert_hf_to_gguf.py permute(): HF layout -> GGUF layout.
    gguf = hf.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(hf.shape)
    assert not mx.array_equal(gguf, hf)
    assert mx.array_equal(unpermute_rope_rows(gguf, heads), hf)


def test_hf_ids_pass_through_unchanged():
    assert is_hf_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert resolve_model_path("mlx-community/Qwen2.5-0.5B-Instruct-4bit") == "mlx-community/Qwen2.5-0.5B-Instruct-4bit"
    for not_hf in ("./org/name", "/org/name", "~/org/name", "org/name.gguf", "name"):
        assert not is_hf_id(not_hf)


def test_local_dir_resolves_to_itself(smollm_env):
    assert resolve_model_path(str(smollm_env)) == str(smollm_env)
    validate_model_path(str(smollm_env))


def test_validate_accepts_builtin_alias_without_converting(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_GRPO_CACHE", str(tmp_path))
    validate_model_path(SMOLLM)
    assert not (tmp_path / "models").exists()


def test_missing_paths_are_user_errors(tmp_path):
    missing = tmp_path / "no-such-model"
    for path in (str(missing), "./models/missing", str(tmp_path / "missing.gguf")):
        with pytest.raises(UserInputError, match="does not exist") as err:
            validate_model_path(path)
        assert path in str(err.value)
        with pytest.raises(UserInputError):
            resolve_model_path(path)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(UserInputError, match="config.json") as err:
        resolve_model_path(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_non_gguf_file_is_rejected(tmp_path):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0" * 16)
    with pytest.raises(UserInputError, match=r"\.gguf"):
        validate_model_path(str(weights))


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda p: p.write_bytes(b"PK\x03\x04 not a gguf at all"), "bad magic"),
        (lambda p: write_gguf(p, "llama", truncate_at=40), "truncated"),
        (lambda p: write_gguf(p, "gpt2"), "architecture 'gpt2' is not supported"),
    ],
)
def test_bad_gguf_files_are_user_errors(tmp_path, monkeypatch, make, fragment):
    monkeypatch.setenv("MLX_GRPO_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "broken.gguf"
    make(path)
    for check in (validate_model_path, resolve_model_path, materialize_gguf):
        with pytest.raises(UserInputError, match=fragment) as err:
            check(str(path))
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_supported_arch_that_mlx_cannot_read_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_GRPO_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "empty.gguf", "llama")
    validate_model_path(str(path))  # the header alone is fine
    with pytest.raises(UserInputError) as err:
        materialize_gguf(path)
    assert str(path) in str(err.value)


def test_unknown_dtype_is_rejected():
    with pytest.raises(UserInputError, match="int8"):
        resolve_model_path(SMOLLM, "int8")



def test_auto_dtype_is_bfloat16_on_metal_and_float32_on_a_cpu(monkeypatch):
    import mlx.core as mx

    from mlx_grpo.gguf.convert import resolve_dtype

    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    assert resolve_dtype("auto") == "float32"
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    assert resolve_dtype("auto") == "bfloat16"
    assert resolve_dtype("native") == "native" and resolve_dtype("float16") == "float16"


def test_a_model_directory_mlx_lm_cannot_load_is_one_line_exit_2(tmp_path, capsys):
    from mlx_grpo.cli import train_main

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "no_such_architecture", "vocab_size": 10}')
    mx.save_safetensors(str(model_dir / "model.safetensors"), {"w": mx.zeros((2,))})
    code = train_main(["--model", str(model_dir), "--train.output_dir", str(tmp_path / "out"), "--no-wandb"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "cannot load with mlx-lm" in err and "no_such_architecture" in err
