"""End-to-end: two real GRPO steps on the embedded SmolLM2 through the `train` entry point."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mlx_grpo.cli import train_main
from mlx_grpo.config import load_config
from mlx_grpo.data import build_prompt_tokens, load_dataset
from mlx_grpo.models import load_model
from mlx_grpo.rollout import generate_rollout, to_train_batch
from mlx_grpo.policy import make_loss_fn, prepare_trainable

# A rubric whose score varies with completion length, so every group has reward spread and the
# policy gradient cannot be zero by chance.
LENGTH_RUBRIC = """
name: test_length
criteria:
  - name: Format
    weight: 1
    check: format_approx
  - name: Answer
    weight: 1
    check: number_check
    params: {closeness: 1.0}
"""


@pytest.fixture(scope="module")
def smol():
    model, tokenizer, model_dir = load_model("smollm2-135m-instruct")
    return model, tokenizer, model_dir


def test_two_steps_train_and_log(tmp_path: Path, capsys):
    rubric = tmp_path / "rubric.yaml"
    rubric.write_text(LENGTH_RUBRIC)
    out = tmp_path / "logs"
    code = train_main([
        "--train.steps", "2", "--run-name", "it", "--train.output_dir", str(out), "--rubric", str(rubric),
        "--rollout.batch_size", "1", "--rollout.group_size", "4", "--rollout.max_new_tokens", "24",
        "--train.save_every", "1", "--logging.sample_every", "1", "--optim.warmup_steps", "0",
        "--optim.learning_rate", "1e-3", "--no-wandb", 
    ])
    assert code == 0
    run_dir = out / "runs" / "it"
    printed = capsys.readouterr().out
    for command in ("chat", "eval", "export"):  # the end of the run says what to do with it
        assert f"uv run {command} --run {run_dir}" in printed, command

    # Adapters in mlx-lm's format, changed from their zero initialisation.
    config = json.loads((run_dir / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora"
    adapters = mx.load(str(run_dir / "adapters.safetensors"))
    lora_b = [v for k, v in adapters.items() if k.endswith("lora_b")]
    assert lora_b and any(mx.abs(v).max().item() > 0 for v in lora_b)

    # mlx-lm itself loads the run directory as adapters onto the saved model directory.
    import mlx_lm
    import yaml

    model_dir = yaml.safe_load((run_dir / "config.yaml").read_text())["resolved_model"]
    model, tokenizer = mlx_lm.load(model_dir, adapter_path=str(run_dir))
    steps = list(mlx_lm.stream_generate(model, tokenizer, "What is 2+3?", max_tokens=5))
    assert steps and steps[-1].generation_tokens >= 1
    base, _ = mlx_lm.load(model_dir)
    prompt = mx.array([tokenizer.encode("What is 2+3?")])
    assert not mx.allclose(model(prompt), base(prompt), atol=1e-4)  # the trained adapters are applied

    # One metrics line per step with finite losses.
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(np.isfinite(line["Train/Loss"]) for line in lines)
    assert sum(line.startswith("[Epoch") for line in (run_dir / "learning.log").read_text().splitlines()) == 2
    assert (run_dir / "completions.jsonl").read_text().count("\n") == 8

    # TensorBoard scalars, read back with TensorBoard's own reader.
    events = EventAccumulator(str(out / "tensorboard" / "it"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ["Train/Loss", "Train/PolicyLoss", "Train/KLPenalty", "Train/AvgReward", "Train/RewardStd",
                "Train/RewardMin", "Train/RewardMax", "Train/RewardVariance",
                "Performance/Generation_TokensPerSec", "Scoring/Answer_score"]:
        assert tag in tags, tag
        assert [e.step for e in events.Scalars(tag)] == [1, 2]
    first = events.Scalars("Train/RewardVariance")[0].value
    assert first == pytest.approx(events.Scalars("Train/RewardStd")[0].value ** 2, rel=1e-4)


def test_policy_gradient_reaches_lora_parameters(smol):
    model, tokenizer, _ = smol
    cfg = load_config(None, {"rollout.max_new_tokens": 12})
    prepare_trainable(model, cfg)
    sample = load_dataset("arithmetic", split="train", seed=0, size=1)[0]
    prompt = build_prompt_tokens(tokenizer, sample, None)
    rollout = generate_rollout(model, [prompt], group_size=2, max_new_tokens=12,
                               eos_token_ids=set(tokenizer.eos_token_ids))
    batch = to_train_batch(rollout)
    loss_and_grad = nn.value_and_grad(model, make_loss_fn(cfg))
    (loss, _), grads = loss_and_grad(model, batch, mx.array([1.0, -1.0]), None, None)
    grads = dict(tree_flatten(grads))
    assert np.isfinite(loss.item())
    assert grads and all("lora" in name for name in grads)
    # lora_b starts at zero, so lora_a's gradient is zero at first; lora_b's must not be.
    assert any(mx.abs(g).max().item() > 0 for name, g in grads.items() if name.endswith("lora_b"))
