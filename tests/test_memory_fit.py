"""The memory fit check: the estimate against the measured peak, and the one-line refusal."""

from __future__ import annotations

import json

import pytest

from mlx_grpo import memory_fit
from mlx_grpo.cli import train_main
from mlx_grpo.config import load_config

from conftest import make_tiny_model

RUN = ["--train.steps", "1", "--optim.warmup_steps", "0", "--no-wandb", "--logging.sample_every", "0"]


def first_record(out_dir):
    return json.loads((out_dir / "runs" / "m" / "metrics.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("flags", [
    ["--rollout.batch_size", "1", "--rollout.group_size", "8", "--rollout.max_new_tokens", "32"],
    ["--rollout.batch_size", "2", "--rollout.group_size", "4", "--rollout.max_new_tokens", "32",
     "--optim.grad_checkpoint", "true"],
    ["--rollout.batch_size", "1", "--rollout.group_size", "4", "--rollout.max_new_tokens", "16",
     "--lora.fine_tune_type", "full"],
], ids=["lora", "grad_checkpoint", "full"])
def test_estimate_is_within_a_quarter_of_the_measured_peak(tmp_path, flags, capsys):
    """The demo model, one real step: the logged estimate against the peaks measured per phase."""
    assert train_main([*RUN, "--run-name", "m", "--train.output_dir", str(tmp_path), *flags]) == 0
    assert "Memory estimate:" in capsys.readouterr().out
    record = first_record(tmp_path)
    measured = max(record[f"memory/peak_{phase}_gb"] for phase in ("rollout", "logprobs", "update"))
    estimated = record["memory/estimated_peak_gb"]
    assert abs(estimated / measured - 1) <= 0.25, (estimated, measured)
    assert record["memory/estimated_peak_gb"] == max(record["memory/estimated_rollout_gb"],
                                                     record["memory/estimated_update_gb"])


def test_estimate_parts_follow_the_config():
    model = make_tiny_model()
    small = memory_fit.estimate(model, load_config(None, {"rollout.max_new_tokens": 8}), 40)
    longer = memory_fit.estimate(model, load_config(None, {"rollout.max_new_tokens": 300}), 40)
    assert longer.kv_cache == 2 * small.kv_cache  # 48 -> 340 tokens: two 256-token cache blocks
    assert longer.activations > small.activations and longer.weights == small.weights
    checkpointed = memory_fit.estimate(model, load_config(None, {"optim.grad_checkpoint": True}), 40)
    assert checkpointed.activations < memory_fit.estimate(model, load_config(None, {}), 40).activations
    full = memory_fit.estimate(model, load_config(None, {"lora.fine_tune_type": "full"}), 40)
    assert full.optimizer == 4 * full.weights


def test_refusal_is_one_line_naming_the_knobs():
    found = memory_fit.MemoryEstimate(weights=6 * 1024 ** 3, optimizer=0, kv_cache=4 * 1024 ** 3, activations=0)
    assert memory_fit.refusal(found, 16 * 1024 ** 3, "RAM") is None  # 10 of 16 GB: 62%, fits
    message = memory_fit.refusal(found, 11 * 1024 ** 3, "RAM")
    assert "\n" not in message
    assert message.startswith("this config needs about 10.0 GB at its rollout peak, 91% of the 11.0 GB of RAM")
    assert "rollout.group_size" in message and "--force" in message


def test_train_refuses_a_config_that_does_not_fit_unless_forced(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory_fit, "machine_memory", lambda: (256 * 1024 ** 2, "RAM"))  # a 256 MB machine
    code = train_main([*RUN, "--run-name", "m", "--train.output_dir", str(tmp_path / "a"),
                       "--rollout.batch_size", "1", "--rollout.group_size", "2", "--rollout.max_new_tokens", "4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "error: this config needs about" in err and "of the 0.2 GB of RAM" in err and "--force" in err
    assert not (tmp_path / "a" / "runs" / "m").exists()  # stopped before the run directory is made

    code = train_main([*RUN, "--run-name", "m", "--train.output_dir", str(tmp_path / "b"), "--force",
                       "--rollout.batch_size", "1", "--rollout.group_size", "2", "--rollout.max_new_tokens", "4"])
    out = capsys.readouterr().out
    assert code == 0 and "going on (--force)" in out
    assert first_record(tmp_path / "b")["memory/estimated_peak_gb"] > 0.25


def test_an_architecture_without_readable_sizes_gets_no_estimate():
    model = make_tiny_model()
    del model.args.vocab_size  # as a model whose args name their sizes differently
    assert memory_fit.estimate(model, load_config(None, {}), 40) is None


def test_activations_and_kv_cache_count_the_models_own_dtype():
    """A bfloat16 model's (or a quantised one's) activations and KV cache take 2 bytes per value."""
    import mlx.core as mx
    import mlx.nn as nn

    cfg = load_config(None, {})
    full = make_tiny_model()
    half = make_tiny_model()
    half.set_dtype(mx.bfloat16)
    quantised = make_tiny_model(vocab_size=512)
    quantised.set_dtype(mx.float16)
    nn.quantize(quantised, group_size=32, bits=4)
    assert [memory_fit.activation_bytes(m) for m in (full, half, quantised)] == [4, 2, 2]
    a, b = memory_fit.estimate(full, cfg, 40), memory_fit.estimate(half, cfg, 40)
    assert b.kv_cache == pytest.approx(a.kv_cache / 2, rel=1e-6)
    assert b.activations < a.activations
