"""Crash and resume: a real training process is killed with SIGKILL mid-run, resumed from its last
checkpoint, and must end exactly where an uninterrupted run with the same seed ends: the same
adapter weights, the same loss sequence, and no step missing or repeated in any log."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mlx_grpo.checkpoint import complete_checkpoints, latest_checkpoint, save_checkpoint

STEPS = 5
# Scores that vary with the completion, so (almost) every step updates the weights.
RUBRIC = """
name: varied
criteria:
  - {name: Format, weight: 1, check: format_approx}
  - {name: Answer, weight: 1, check: number_check, params: {closeness: 1.0}}
"""


def train_cmd(out: Path, rubric: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mlx_grpo.cli", "--train.steps", str(STEPS), "--run-name", "r",
            "--train.output_dir", str(out), "--rubric", str(rubric), "--rollout.batch_size", "1",
            "--rollout.group_size", "3", "--rollout.max_new_tokens", "12", "--train.save_every", "1",
            "--train.keep_checkpoints", "2", "--optim.warmup_steps", "0", "--optim.learning_rate", "1e-3",
            "--logging.sample_every", "1", "--no-wandb", *extra]


def outputs(out: Path) -> dict:
    run = out / "runs" / "r"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard" / "r"), size_guidance={"scalars": 0})
    events.Reload()
    return {
        "adapters": mx.load(str(run / "adapters.safetensors")),
        "steps": [m["step"] for m in metrics],
        "loss": [m["Train/Loss"] for m in metrics],
        "reward": [m["Train/AvgReward"] for m in metrics],
        "tb_loss": [(e.step, e.value) for e in events.Scalars("Train/Loss")],
        "breakdown_steps": [json.loads(line)["step"] for line in (run / "reward_breakdown.jsonl").read_text().splitlines()],
        "log_lines": sum(line.startswith("[Epoch") for line in (run / "learning.log").read_text().splitlines()),
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    rubric = tmp / "rubric.yaml"
    rubric.write_text(RUBRIC)
    subprocess.run(train_cmd(tmp / "logs", rubric), check=True, capture_output=True, timeout=300)
    return outputs(tmp / "logs"), rubric


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_then_resume_matches_an_uninterrupted_run(reference, tmp_path, seed):
    expected, rubric = reference
    out = tmp_path / "logs"
    metrics = out / "runs" / "r" / "metrics.jsonl"
    rng = random.Random(seed)
    # Kill once this many steps are logged (so step 1 has a checkpoint), plus a random delay.
    kill_after = rng.randint(2, STEPS - 1)
    proc = subprocess.Popen(train_cmd(out, rubric), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 0.8))  # somewhere inside the next step: generation, update or saving
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert complete_checkpoints(out / "runs" / "r")  # at least step 1 was saved before the kill
    assert not list((out / "runs" / "r" / "checkpoints").glob("step_*.tmp"))  # never a half-written one

    done = subprocess.run(train_cmd(out, rubric, "--resume", str(out / "runs" / "r")), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Resuming" in done.stdout
    got = outputs(out)

    assert got["steps"] == list(range(1, STEPS + 1))  # no step missing or repeated
    assert got["breakdown_steps"] == [s for s in range(1, STEPS + 1) for _ in range(3)]
    assert got["log_lines"] == STEPS
    assert [s for s, _ in got["tb_loss"]] == list(range(1, STEPS + 1))
    # Exactly the uninterrupted run: same losses and rewards, bit-identical weights.
    assert got["loss"] == expected["loss"] and got["reward"] == expected["reward"]
    assert got["tb_loss"] == expected["tb_loss"]
    assert got["adapters"].keys() == expected["adapters"].keys()
    for name, value in expected["adapters"].items():
        assert mx.array_equal(got["adapters"][name], value), name
    assert len(complete_checkpoints(out / "runs" / "r")) == 2  # keep_checkpoints


def ctrl_c_after(cmd: list[str], metrics: Path, logged: int) -> tuple[str, str]:
    """Start a training run, press Ctrl-C once `logged` steps are in metrics.jsonl, and return its
    (stdout, stderr) after it has exited cleanly."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= logged):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr
    return stdout, stderr


def test_ctrl_c_finishes_the_step_saves_and_resumes_exactly(reference, tmp_path):
    expected, rubric = reference
    out = tmp_path / "logs"
    metrics = out / "runs" / "r" / "metrics.jsonl"
    stdout, _ = ctrl_c_after(train_cmd(out, rubric), metrics, 1)
    assert "Stopped early: interrupted" in stdout and f"uv run train --resume {out / 'runs' / 'r'}" in stdout
    logged = len(metrics.read_text().splitlines())
    assert 1 <= logged < STEPS
    assert latest_checkpoint(out / "runs" / "r").name == f"step_{logged:06d}"  # the finished step was saved

    done = subprocess.run(train_cmd(out, rubric, "--resume", "latest"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    got = outputs(out)
    assert got["steps"] == list(range(1, STEPS + 1)) and got["loss"] == expected["loss"]
    for name, value in expected["adapters"].items():
        assert mx.array_equal(got["adapters"][name], value), name


def test_pipelined_run_trains_off_policy_and_resumes_exactly(reference, tmp_path):
    """rollout.pipeline: batch k+1 is sampled before update k, so from step 2 on its ratio is taken
    against the policy that sampled it (not 1); a Ctrl-C and resume still ends bit-identical."""
    _, rubric = reference
    pipelined = ("--rollout.pipeline", "true")
    whole = tmp_path / "whole"
    subprocess.run(train_cmd(whole, rubric, *pipelined), check=True, capture_output=True, timeout=300)
    expected = outputs(whole)
    metrics = [json.loads(line) for line in (whole / "runs" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["actor/is_ratio/mean"] == 1.0  # step 1 was sampled by the current policy
    # Later batches were sampled before the previous update moved the weights: their ratios
    # spread well beyond the ~1e-6 that sampling and training numerics alone would give.
    assert max(m["actor/is_log_ratio/std"] for m in metrics[1:]) > 1e-3

    out = tmp_path / "logs"
    log = out / "runs" / "r" / "metrics.jsonl"
    ctrl_c_after(train_cmd(out, rubric, *pipelined), log, 2)
    assert len(log.read_text().splitlines()) < STEPS
    done = subprocess.run(train_cmd(out, rubric, *pipelined, "--resume", "latest"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    got = outputs(out)
    assert got["steps"] == list(range(1, STEPS + 1)) and got["loss"] == expected["loss"]
    assert got["reward"] == expected["reward"]
    for name, value in expected["adapters"].items():
        assert mx.array_equal(got["adapters"][name], value), name


def test_resume_latest_and_missing_checkpoint_errors(tmp_path, capsys):
    from mlx_grpo.cli import train_main

    (tmp_path / "logs" / "runs" / "empty").mkdir(parents=True)
    assert train_main(["--resume", "latest", "--train.output_dir", str(tmp_path / "logs")]) == 2
    assert "no run with a checkpoint" in capsys.readouterr().err
    assert train_main(["--resume", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_checkpoint_write_is_atomic_and_pruned(tmp_path, tiny_model):
    import mlx.optimizers as optim

    optimizer = optim.AdamW(learning_rate=1e-3)
    optimizer.init(tiny_model.trainable_parameters())
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, tiny_model, optimizer, {"x": step}, keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    # A half-written checkpoint (a crash mid-save) is a hidden temp dir, never taken for a checkpoint.
    (tmp_path / "checkpoints" / ".step_000004.tmp").mkdir()
    (tmp_path / "checkpoints" / "step_000005").mkdir()  # no state.json: incomplete
    assert latest_checkpoint(tmp_path).name == "step_000003"


def test_nonfinite_update_is_skipped(tiny_model):
    """A NaN in the loss leaves the weights and the optimizer untouched."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_grpo.config import load_config
    from mlx_grpo.rollout import TrainBatch
    from mlx_grpo.policy import build_optimizer, make_loss_fn, prepare_trainable, update_policy

    cfg = load_config(None, {"train.steps": 3})
    prepare_trainable(tiny_model, cfg)
    optimizer = build_optimizer(cfg)
    loss_and_grad = nn.value_and_grad(tiny_model, make_loss_fn(cfg))
    tokens = mx.array(np.random.default_rng(0).integers(1, 200, (2, 10)), dtype=mx.int32)
    batch = TrainBatch(tokens, mx.array([4, 4]), mx.ones((2, 6)), 20)
    before = {k: mx.array(v) for k, v in tree_flatten(tiny_model.trainable_parameters())}
    stats = update_policy(tiny_model, optimizer, loss_and_grad, cfg, batch, mx.array([float("nan"), 1.0]),
                          [None], [None])
    assert stats.get("nonfinite") is True
    after = dict(tree_flatten(tiny_model.trainable_parameters()))
    assert all(mx.array_equal(before[k], after[k]) for k in before)
    assert not optimizer.state or int(optimizer.state.get("step", 0)) == 0
    assert stats["skipped"] is True
    stats = update_policy(tiny_model, optimizer, loss_and_grad, cfg, batch, mx.array([-1.0, 1.0]), [None], [None])
    assert "nonfinite" not in stats and int(optimizer.state["step"]) == 1
    assert stats["skipped"] is False


def test_a_skipped_update_is_logged_as_skipped(tmp_path, monkeypatch):
    """A step whose update was skipped for a NaN loss says so in its record (actor/update_skipped 1,
    no entropy), rather than being logged as a real update."""
    from dp_worker import ByteTokenizer
    from conftest import make_tiny_model

    from mlx_grpo import policy, trainer
    from mlx_grpo.config import load_config
    from mlx_grpo.metrics import MetricsHub
    from mlx_grpo.rewards import Scorer, load_rubric

    real = policy.make_loss_fn

    def nan_loss_fn(*args, **kwargs):
        loss_fn = real(*args, **kwargs)

        def poisoned(*args):
            loss, stats = loss_fn(*args)
            return loss * float("nan"), stats

        return poisoned

    monkeypatch.setattr(policy, "make_loss_fn", nan_loss_fn)
    rubric = tmp_path / "rubric.yaml"
    rubric.write_text(RUBRIC)
    cfg = load_config(None, {"train.steps": 2, "rollout.batch_size": 1, "rollout.group_size": 3,
                             "rollout.max_new_tokens": 6, "train.save_every": 2, "lora.rank": 4,
                             "grpo.beta": 0.04})  # a KL penalty: every step updates, spread or not
    items = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(4)]
    records = []
    scorer = Scorer(load_rubric(rubric))
    try:
        trainer.train(cfg, make_tiny_model(), ByteTokenizer(), trainer.Prompts(items), scorer,
                      trainer.RunIO(tmp_path, MetricsHub([]), progress=lambda step, record: records.append(record),
                                    notify=lambda text: None))
    finally:
        scorer.close()
    assert len(records) == 2
    assert all(r["actor/update_skipped"] == 1.0 and "actor/entropy_loss" not in r for r in records)


def plain_data(value) -> bool:
    """True for JSON's own types all the way down: what no renamed class can break."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain_data(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain_data(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def test_checkpoint_state_is_plain_json_from_every_owner(tmp_path):
    from dp_worker import ByteTokenizer
    from conftest import make_tiny_model

    from mlx_grpo import trainer
    from mlx_grpo.config import load_config
    from mlx_grpo.metrics import MetricsHub
    from mlx_grpo.rewards import Scorer, load_rubric

    rubric = tmp_path / "rubric.yaml"
    rubric.write_text(RUBRIC)
    cfg = load_config(None, {"train.steps": 2, "rollout.batch_size": 1, "rollout.group_size": 3,
                             "rollout.max_new_tokens": 6, "train.save_every": 1, "lora.rank": 4})
    items = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(4)]
    scorer = Scorer(load_rubric(rubric))
    try:
        trainer.train(cfg, make_tiny_model(), ByteTokenizer(), trainer.Prompts(items), scorer,
                      trainer.RunIO(tmp_path, MetricsHub([]), notify=lambda text: None))
    finally:
        scorer.close()
    saved = json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())
    assert set(saved) == {"step", "loop", "rollouts", "logger", "scorer", "random", "log_sizes"}
    assert saved["step"] == 2 and saved["loop"]["step"] == 2
    assert plain_data(saved)
    assert not any(p.suffix == ".pkl" for p in (tmp_path / "checkpoints").rglob("*"))


def test_a_checkpoint_of_an_earlier_version_is_refused_in_one_line(tmp_path, capsys):
    import pickle

    import yaml

    from mlx_grpo.cli import train_main
    from mlx_grpo.config import Config, to_dict

    run = tmp_path / "runs" / "old"
    (run / "checkpoints" / "step_000003").mkdir(parents=True)
    (run / "checkpoints" / "step_000003" / "state.pkl").write_bytes(pickle.dumps({"step": 3}))
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(Config())))
    assert train_main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "earlier version" in err and "step_000003" in err


def test_the_checkpoint_time_is_logged_on_the_step_that_saves(tmp_path, monkeypatch):
    from test_seed_capabilities import make_items, tiny_run

    records = tiny_run(tmp_path / "run", {"train.steps": 3, "train.save_every": 2}, make_items(12),
                       monkeypatch=monkeypatch)
    saved = {r["step"]: r.get("timing_s/save_checkpoint") for r in records}
    assert saved[1] is None and saved[2] > 0 and saved[3] > 0  # step 3 is the last: it saves too
    for record in records[1:]:  # the step's own time includes its save
        assert record["timing_s/step"] >= record["timing_s/save_checkpoint"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
