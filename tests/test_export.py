"""`uv run export`: a real short run of the demo model, fused and written as an mlx-lm directory and
as GGUF files (llama.cpp's own `gguf` package reads them back), checked against the adapter model
it came from; tiny random qwen2/qwen3/llama models round-trip through the GGUF writer and reader."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import yaml
from mlx_lm.models import llama, qwen2, qwen3

from mlx_grpo.adapters import apply_lora
from mlx_grpo.config import load_run_config
from mlx_grpo.data import build_prompt_tokens
from mlx_grpo.eval_cli import main as eval_main
from mlx_grpo.evaluate import held_out_items, load_run_adapters
from mlx_grpo.export import fuse_adapters, max_logit_gap, modelfile_text, ollama_name, prompt_logits
from mlx_grpo.export_cli import main as export_main
from mlx_grpo.gguf import materialize_gguf
from mlx_grpo.gguf.tokenizer import build_tokenizer
from mlx_grpo.gguf.writer import gguf_pre_tokenizer, write_gguf
from mlx_grpo.models import load_model
from mlx_grpo.rollout import generate_rollout

HELD_OUT = 20
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def exported(short_run, tmp_path_factory):
    """The short run exported once as an mlx-lm directory and f16 and q8_0 GGUF files."""
    out = tmp_path_factory.mktemp("export")
    assert export_main(["--run", str(short_run), "--gguf", "f16", "--output", str(out)]) == 0
    assert export_main(["--run", str(short_run), "--gguf", "q8_0", "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def adapter_model(short_run):
    """The run's model as training left it (base + adapters), and 20 of its held-out prompts."""
    cfg = load_run_config(short_run)
    assert not cfg.data.system_prompt  # the prompts below are built without one, as in the run
    model, tokenizer, _ = load_model(cfg.model.path, cfg.model.dtype)
    load_run_adapters(model, short_run)
    items = held_out_items(cfg)[:HELD_OUT]
    assert len(items) == HELD_OUT
    return model, tokenizer, items, [build_prompt_tokens(tokenizer, item, None) for item in items]


def greedy_tokens(model, tokenizer, prompts) -> list[list[int]]:
    rollout = generate_rollout(model, prompts, group_size=1, max_new_tokens=NEW_TOKENS,
                               eos_token_ids=set(tokenizer.eos_token_ids), temperature=0.0)
    return [list(tokens) for tokens in rollout.completion_tokens]


def test_fused_directory_gives_the_adapter_models_logits(exported, adapter_model, short_run):
    import mlx_lm

    model, tokenizer, _, prompts = adapter_model
    fused, _ = mlx_lm.load(str(exported / "mlx"))
    assert not any(hasattr(m, "fuse") for _, m in fused.named_modules())  # plain layers, no LoRA left
    trained, merged = prompt_logits(model, prompts), prompt_logits(fused, prompts)
    # float32 rounding only: W x + s (x A) B and (W + s A B) x are summed in different orders, 30 layers
    # deep. Over 20 prompts x every position x 49,152 logits of up to ~50 the largest difference is
    # 1-2e-4 (a few parts in a million), the mean about 2e-5, and no greedy token changes.
    largest = max(mx.abs(t).max().item() for t in trained)
    assert max_logit_gap(trained, merged) < 1e-5 * largest
    assert max(mx.abs(t - m).mean().item() for t, m in zip(trained, merged)) < 5e-5
    assert greedy_tokens(fused, tokenizer, prompts) == greedy_tokens(model, tokenizer, prompts)
    # The adapters matter: without them the logits are far off, so the check above can fail.
    cfg = load_run_config(short_run)
    base, _, _ = load_model(cfg.model.path, cfg.model.dtype)
    assert max_logit_gap(prompt_logits(base, prompts[:4]), prompt_logits(fused, prompts[:4])) > 0.1


def load_exported_gguf(exported, outtype, items, prompts):
    model, tokenizer, _ = load_model(str(exported / f"short-{outtype}.gguf"), "float32")
    # The GGUF's own tokenizer and chat template build the very same prompts.
    assert [build_prompt_tokens(tokenizer, item, None) for item in items] == prompts
    return model, tokenizer


def test_f16_gguf_loads_through_our_reader_with_the_adapter_models_greedy_answers(exported, adapter_model):
    model, tokenizer, items, prompts = adapter_model
    expected = greedy_tokens(model, tokenizer, prompts)
    assert sum(map(len, expected)) > 5 * len(prompts)  # answers, not just an end-of-turn token
    gguf_model, gguf_tokenizer = load_exported_gguf(exported, "f16", items, prompts)
    assert greedy_tokens(gguf_model, gguf_tokenizer, prompts) == expected


def test_q8_0_gguf_agrees_on_at_least_95_percent_of_greedy_tokens(exported, adapter_model):
    """Each next token of the adapter model's greedy answers, predicted by the q8_0 model from the same
    prefix. (Decoding freely, one early difference would count every later token as different; in
    the run behind this test 16 of the 20 answers come out identical.)"""
    model, tokenizer, items, prompts = adapter_model
    gguf_model, _ = load_exported_gguf(exported, "q8_0", items, prompts)
    agree = total = 0
    for prompt, answer in zip(prompts, greedy_tokens(model, tokenizer, prompts)):
        sequence = mx.array([prompt + answer])
        positions = slice(len(prompt) - 1, len(prompt) - 1 + len(answer))
        ours = mx.argmax(model(sequence)[0, positions], axis=-1)
        agree += (mx.argmax(gguf_model(sequence)[0, positions], axis=-1) == ours).sum().item()
        total += len(answer)
    assert agree / total >= 0.95, f"{agree}/{total} greedy tokens agree"


def test_gguf_metadata_read_by_the_gguf_package(exported, adapter_model):
    import gguf

    _, tokenizer, _, _ = adapter_model
    reader = gguf.GGUFReader(str(exported / "short-f16.gguf"))

    def text(key):
        field = reader.fields[key]
        return bytes(field.parts[field.data[0]]).decode("utf-8")

    def number(key):
        field = reader.fields[key]
        return field.parts[field.data[0]][0]

    assert text("general.architecture") == "llama"
    assert text("tokenizer.ggml.model") == "gpt2"
    assert text("tokenizer.ggml.pre") == "smollm"
    assert text("tokenizer.chat_template") == tokenizer.chat_template
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == len(tokenizer.get_vocab())
    assert len(reader.fields["tokenizer.ggml.merges"].data) > 40_000
    assert number("tokenizer.ggml.eos_token_id") in tokenizer.eos_token_ids
    assert number("llama.block_count") == 30
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    assert gguf.GGUFReader(str(exported / "short-q8_0.gguf")).tensors[1].tensor_type.name in ("Q8_0", "F32")


def test_modelfile_and_what_export_prints(exported, short_run, capsys):
    modelfile = (exported / "Modelfile").read_text()
    assert "FROM ./short-q8_0.gguf" in modelfile  # the last export wrote it
    assert "<|im_start|>{{ .Role }}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'SYSTEM """You are a helpful AI assistant' in modelfile  # SmolLM2's template adds it in training
    assert not [p for p in exported.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_eval_of_the_exported_gguf_gives_the_runs_accuracy(exported, short_run, tmp_path):
    common = ["--num-prompts", str(HELD_OUT), "--max-new-tokens", str(NEW_TOKENS), "--samples", "1",
              "--temperature", "0"]
    assert eval_main(["--run", str(short_run), "--output", str(tmp_path / "run.json"), *common]) == 0
    assert eval_main(["--config", str(short_run / "config.yaml"), "--model", str(exported / "short-f16.gguf"),
                      "--output", str(tmp_path / "gguf.json"), *common]) == 0
    run = json.loads((tmp_path / "run.json").read_text())["trained"]
    exported_eval = json.loads((tmp_path / "gguf.json").read_text())["base"]
    assert exported_eval["pass_at_1"] == run["pass_at_1"]
    assert exported_eval["mean_reward"] == pytest.approx(run["mean_reward"], abs=1e-6)


# --- tiny random models of each architecture, through the writer and back through our reader ----------

def tiny_model_dir(arch: str, directory: Path, tokenizer_dir: Path, tie: bool) -> tuple[nn.Module, dict]:
    """A random 2-layer model of mlx-lm's own `arch` class, saved as an mlx-lm directory with the
    demo model's tokenizer."""
    from mlx_lm.utils import save_config, save_model

    module = {"llama": llama, "qwen2": qwen2, "qwen3": qwen3}[arch]
    config = {"model_type": arch, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 96,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-6,
              "vocab_size": 49152, "rope_theta": 100000.0, "tie_word_embeddings": tie,
              "max_position_embeddings": 2048}
    mx.random.seed(7)
    model = module.Model(module.ModelArgs.from_dict(config))
    # Norm weights start at one; make them random too, so a misplaced norm cannot pass.
    model.update(nn.utils.tree_map(lambda p: p + 0.1 * mx.random.normal(p.shape), model.parameters()))
    mx.eval(model.parameters())
    directory.mkdir(parents=True)
    save_model(directory, model, donate_model=False)
    save_config(dict(config), config_path=directory / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return model, config


@pytest.fixture(scope="module")
def demo_tokenizer_dir():
    from mlx_grpo.models import resolve_model_path

    return Path(resolve_model_path("smollm2-135m-instruct", "float32"))


@pytest.mark.parametrize("arch, tie", [("llama", True), ("llama", False), ("qwen2", True), ("qwen3", False)])
def test_tiny_models_round_trip_through_gguf(arch, tie, demo_tokenizer_dir, tmp_path, monkeypatch):
    import mlx_lm
    from mlx.utils import tree_flatten

    monkeypatch.setenv("MLX_GRPO_CACHE", str(tmp_path / "cache"))
    model, config = tiny_model_dir(arch, tmp_path / "model", demo_tokenizer_dir, tie)
    path = tmp_path / f"{arch}.gguf"
    write_gguf(dict(tree_flatten(model.parameters())), config, tmp_path / "model", path, "f32", "tiny")
    back, tokenizer = mlx_lm.load(str(materialize_gguf(path, "float32")))
    original = dict(tree_flatten(model.parameters()))
    loaded = dict(tree_flatten(back.parameters()))
    assert loaded.keys() == original.keys()
    for name, value in original.items():
        assert mx.array_equal(loaded[name], value), name  # f32: every weight exactly, Q/K rows in place
    prompt = mx.array([tokenizer.encode("What is 12 + 30? Answer: 42")])
    assert mx.array_equal(back(prompt), model(prompt))


def test_pre_tokenizer_names_round_trip():
    from mlx_grpo.errors import UserInputError

    tokens = ["a", "b", "ab", "<|endoftext|>"]
    for pre in ("gpt2", "smollm", "qwen2", "llama-bpe"):
        metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": ["a b"],
                    "tokenizer.ggml.pre": pre}
        tokenizer_json = json.loads(build_tokenizer(metadata, Path("x.gguf")).to_str())
        assert gguf_pre_tokenizer(tokenizer_json) == pre
    with pytest.raises(UserInputError, match="pre-tokenizer"):
        gguf_pre_tokenizer({"pre_tokenizer": {"type": "Metaspace"}})


def test_quantized_base_is_requantized_at_a_measured_cost_or_kept_dense(tiny_model):
    from mlx_grpo.export import is_quantized

    prompts = [[1, 5, 9, 200, 3, 17], [4, 4, 8]]

    def quantized_lora_model():
        model = type(tiny_model)(tiny_model.args)
        model.update(tiny_model.parameters())
        nn.quantize(model, group_size=32, bits=4)
        apply_lora(model, rank=4, alpha=16, dropout=0.0, num_layers=-1)
        mx.random.seed(3)
        for _, module in model.named_modules():
            if hasattr(module, "lora_b"):
                module.lora_b = 0.05 * mx.random.normal(module.lora_b.shape)
        return model

    gaps = {}
    for dequantize in (False, True):
        model = quantized_lora_model()
        before = prompt_logits(model, prompts)
        assert fuse_adapters(model, dequantize=dequantize) > 0
        assert is_quantized(model) is not dequantize
        gaps[dequantize] = max_logit_gap(before, prompt_logits(model, prompts))
    assert gaps[True] < 1e-4  # dense: exactly the adapter model
    assert gaps[False] > 10 * gaps[True]  # quantized again: the rounding is a real, reported cost


def test_modelfile_for_other_chat_formats():
    class Tokenizer:
        chat_template = "{{ bos_token }}<|start_header_id|>{{ message['role'] }}<|end_header_id|>"
        eos_token_ids = {7}

        def convert_ids_to_tokens(self, token_id):
            return "<|eot_id|>"

        def apply_chat_template(self, *args, **kwargs):
            return "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"

    text = modelfile_text("m.gguf", "my-model", Tokenizer(), "Be brief.")
    assert "FROM ./m.gguf" in text and "<|start_header_id|>{{ .Role }}" in text
    assert 'SYSTEM """Be brief."""' in text and 'PARAMETER stop "<|eot_id|>"' in text
    assert ollama_name("Demo Run_2 (best)") == "demo-run_2-best"


# --- errors: one line, exit 2, nothing half-written --------------------------------------------------

def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_missing_run_and_run_without_adapters(short_run, tmp_path, capsys):
    assert export_main(["--run", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in one_line_error(capsys)
    shutil.copy(short_run / "config.yaml", tmp_path / "config.yaml")
    assert export_main(["--run", str(tmp_path)]) == 2
    assert "no adapter_config.json" in one_line_error(capsys)
    assert export_main(["--run", "latest", "--gguf", "q4_k"]) == 2
    assert "invalid choice" in one_line_error(capsys)


def test_unsupported_architecture_is_refused_before_loading(short_run, tmp_path, capsys):
    model_dir = tmp_path / "gemma"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "gemma"}))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = yaml.safe_load((short_run / "config.yaml").read_text())
    config["model"]["path"] = str(model_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    for name in ("adapter_config.json", "adapters.safetensors"):
        shutil.copy(short_run / name, run_dir / name)
    assert export_main(["--run", str(run_dir), "--gguf", "f16"]) == 2
    assert "architecture 'gemma' is not supported" in one_line_error(capsys)
    assert not (run_dir / "export").exists()


def test_a_full_disk_leaves_nothing_behind(short_run, tmp_path):
    # A real failed write: the file-size limit makes the kernel refuse the weights (EFBIG), as a full disk would.
    script = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (20_000_000, 20_000_000)); "
              "from mlx_grpo.export_cli import main; "
              f"sys.exit(main(['--run', {str(short_run)!r}, '--output', {str(tmp_path / 'out')!r}]))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: export: "), done.stderr[-2000:]
    assert "Nothing was kept" in lines[0] or "nothing was kept" in lines[0]
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("dtype, lost", [(mx.bfloat16, True), (mx.float32, False)])
def test_merge_measures_what_rounding_to_the_weight_type_loses(tiny_model, dtype, lost):
    from mlx_grpo.export import merge_adapters
    from mlx_grpo.export_cli import merge_lines

    model = type(tiny_model)(tiny_model.args)
    model.update(tiny_model.parameters())
    apply_lora(model, rank=4, alpha=16, dropout=0.0, num_layers=-1)
    mx.random.seed(3)
    for _, module in model.named_modules():
        if hasattr(module, "lora_b"):  # a small change, as a few steps at a low learning rate make
            module.lora_b = 1e-4 * mx.random.normal(module.lora_b.shape)
    model.set_dtype(dtype)
    fused, gap, effect = merge_adapters(model, [[1, 5, 9, 200, 3, 17], [4, 4, 8]], dequantize=False)
    assert fused == 14 and effect > 0
    assert (gap > 0.1 * effect) is lost
    assert any("WARNING: the merge lost" in line for line in merge_lines(fused, gap, effect, 2, False, {}, "bfloat16")) \
        is lost
