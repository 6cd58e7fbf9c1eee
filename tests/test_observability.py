"""One short real training run (SmolLM2, the code_quality rubric, a scripted teacher, W&B offline),
then every output read back: TensorBoard with its own EventAccumulator, the offline W&B run,
learning.log against the seed's line format, batch_metrics.jsonl and reward_breakdown.jsonl."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mlx_grpo.cli import train_main

from teacher_server import ScriptedTeacher
from wandb_reader import read_offline_run

REPO = Path(__file__).resolve().parent.parent
STEPS, EVERY = 4, 2  # epoch_size (in prompts, B = 1): Epoch/* events at steps 2 and 4
SECRETS = {"WANDB_API_KEY": "wandb-secret-0123456789abcdef0123456789abcdef", "MLX_GRPO_OBS_KEY": "sk-obs-secret-42"}

# Every tag of the TensorBoard metrics reference, in its order.
SEED_TAGS = """Train/Loss Train/PolicyLoss Train/KLPenalty Train/AvgReward Train/RewardStd Train/RewardMin
Train/RewardMax Train/RewardVariance Epoch/AvgReward Epoch/AvgLoss Epoch/RewardVariance Epoch/RewardTrend
Epoch/LossTrend Epoch/APITokens Epoch/NumSamples Performance/Generation_TokensPerSec Performance/Generation_Time
Performance/Generation_AvgTokensPerSec Performance/Generation_P99TokensPerSec Performance/Backprop_TokensPerSec
Performance/Backprop_AvgTokensPerSec Performance/Backprop_P99TokensPerSec Scoring/Correctness Scoring/CodeQuality
Scoring/Efficiency Scoring/Documentation System/CPU_Percent System/Memory_Percent System/Memory_Used_GB
System/Memory_Available_GB System/Process_Memory_GB System/GPU_Memory_Used_GB System/GPU_Memory_Total_GB
System/GPU_Memory_Percent System/GPU_Utilization""".split()
# The learning.log line format of the GRPO learning-log reference.
SEED_LOG_FORMAT = ("[Epoch X.XX]  loss=X.XXXX  grad=X.XXXX  lr=X.XXe-XX  reward=X.XXX±X.XXX  syntax_rew=X.XXX±X.XXX  "
                   "entropy=X.XXX  frac_zero_std=X.XX")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Train 4 steps once; every test below reads its outputs."""
    server = ScriptedTeacher()
    server.grade = lambda text: float(len(text) % 11)  # scores that differ, so updates happen
    tmp = tmp_path_factory.mktemp("obs")
    env = {"OPENAI_BASE_URL": server.url, "TEACHER_MODEL": "scripted-teacher", "TEACHER_KEY_ENV": "MLX_GRPO_OBS_KEY",
           "WANDB_MODE": "offline", "WANDB_SILENT": "true", **SECRETS}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.chdir(REPO)
        console = io.StringIO()
        with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
            code = train_main(["--config", "configs/code_teacher.yaml", "--train.steps", str(STEPS), "--run-name", "obs",
                               "--train.output_dir", str(tmp / "logs"), "--rollout.batch_size", "1",
                               "--rollout.group_size", "4", "--rollout.max_new_tokens", "16",
                               "--optim.warmup_steps", "0",
                               "--logging.histogram_every", "2", "--data.epoch_size", str(EVERY),
                               "--logging.sample_every", "2",
                               "--reward.correct_criterion", "CodeQuality", "--reward.correct_threshold", "0.5"])
    server.close()
    assert code == 0, console.getvalue()[-2000:]
    (tmp / "logs" / "console.txt").write_text(console.getvalue())
    return tmp / "logs"


def test_every_seed_tensorboard_tag_is_logged_with_finite_values(run):
    events = EventAccumulator(str(run / "tensorboard" / "obs"), size_guidance={"scalars": 0, "histograms": 0,
                                                                              "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected_steps = {"Performance/Generation_TokensPerSec": [1, 2, 3, 4], "Performance/Generation_Time": [1, 2, 3, 4]}
    for tag in SEED_TAGS:
        assert tag in scalars, tag
        values = events.Scalars(tag)
        assert all(math.isfinite(v.value) for v in values), tag
        steps = [v.step for v in values]
        if tag.startswith("Epoch/"):
            assert steps == [2, 4], tag
        elif tag.startswith("Performance/Backprop_"):
            assert steps and set(steps) <= set(range(1, STEPS + 1)), tag  # from the first step with an update
        else:
            assert steps == expected_steps.get(tag, list(range(1, STEPS + 1))), tag
    # The seed's weights, and the actual scores it says future versions should track.
    assert events.Scalars("Scoring/Correctness")[0].value == pytest.approx(0.3)
    assert "Scoring/CodeQuality_score" in scalars
    assert events.Scalars("Epoch/APITokens")[0].value == 2 * 120  # 2 steps x 1 teacher request x 120 tokens
    assert events.Scalars("Epoch/NumSamples")[0].value == 2 * 4
    # The extra groups from the TinyZero reference, the teacher and health.
    for tag in ["actor/pg_clipfrac", "actor/ppo_kl", "actor/entropy_loss", "actor/grad_norm", "actor/lr",
                "actor/is_ratio/mean", "actor/is_ratio/std", "actor/is_ratio/p95", "actor/is_clip/outside_frac",
                "response_length/mean", "response_length/clip_ratio", "prompt_length/mean", "tokens/overall_total",
                "completion/truncated_frac", "completion/finished_frac", "timing_s/step", "timing_s/gen",
                "timing_s/ref", "timing_s/adv", "timing_s/reward", "timing_s/update_actor",
                "timing_s/save_checkpoint", "timing_per_token_ms/gen", "time/elapsed_s",
                "Performance/Generation_P50TokensPerSec", "Performance/Generation_MinTokensPerSec",
                "Teacher/APITokens", "health/mode_collapse", "health/warnings_total"]:
        assert tag in scalars, tag
    assert "rewards/rubric_hist" in events.Tags()["histograms"]
    texts = events.Tags()["tensors"]
    assert "Rubric/changes" in texts and "Samples/completions" in texts and "rubric_criteria_summary" in texts


def test_wandb_offline_mirrors_metrics_tables_and_no_secret(run):
    wb = read_offline_run(run / "runs" / "obs")
    config = {k: (v.get("value") if isinstance(v, dict) and "value" in v else v) for k, v in wb["config"].items()}
    for key in ("model_id", "num_steps", "learning_rate", "batch_size", "use_lora", "lora_rank", "lora_alpha",
                "num_generations", "beta", "epsilon", "temperature", "max_generation_steps", "weight_decay",
                "max_grad_norm", "warmup_fraction", "rubric_file"):
        assert key in config, key
    assert config["num_generations"] == 4 and config["rubric_file"] == "rubrics/code_quality.yaml"
    logged = set().union(*wb["history"])
    events = EventAccumulator(str(run / "tensorboard" / "obs"), size_guidance={"scalars": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) <= logged  # every TensorBoard scalar is mirrored
    for key in ["rewards/CodeQuality_mean", "rewards/CodeQuality_max", "rewards/CodeQuality_min",
                "rewards/CodeQuality_recent_mean", "rewards/total_mean", "train/step", "rewards/rubric_mean",
                "rewards/rubric_max", "rewards/rubric_min", "criteria/code_quality/Correctness_mean"]:
        assert key in logged, key
    assert any(k.startswith("rewards/CodeQuality_hist") for k in logged)
    assert "rubric_criteria_summary/_type" in wb["summary"]
    table = next(wb["dir"].rglob("rubric_criteria_summary_*.table.json"))
    data = json.loads(table.read_text())
    assert data["columns"] == ["criterion", "mean", "std", "min", "max", "samples"]
    assert {row[0] for row in data["data"]} >= {"code_quality/Correctness", "code_quality/Documentation", "rubric"}
    assert all(row[5] == STEPS * 4 for row in data["data"])
    for name in ("Correctness", "rubric"):
        for stat in ("mean", "std", "max", "min", "total_samples"):
            assert f"final/{name}_{stat}" in wb["summary"]
    # Every file under logs/ (run directory, TensorBoard events, W&B's offline files) and the console.
    assert "W&B initialized" in (run / "console.txt").read_text()
    for path in run.rglob("*"):
        if path.is_file():
            for secret in SECRETS.values():
                assert secret.encode() not in path.read_bytes(), path


def test_learning_log_matches_the_seed_format(run):
    # The regex is built from the seed's format string: each X-run becomes a number with that many
    # decimals, and its one reward function ("syntax_rew") becomes one group per criterion.
    def number(match):
        decimals = len(match.group(0).split(".")[1]) if "." in match.group(0) else 0
        return rf"(?:-?\d+\.\d{{{decimals}}}|nan)" if decimals else r"-?\d+"

    pattern = re.escape(SEED_LOG_FORMAT).replace(re.escape("e-XX"), "e[-+]\\d\\d")
    pattern = re.sub(r"X+(?:\\\.X+)?", number, pattern)
    pattern = pattern.replace("syntax_rew", r"(?:\w+_rew").replace(r"±(?:-?\d+\.\d{3}|nan)\ \ entropy",
                                                                   r"±(?:-?\d+\.\d{3}|nan)\ \ )+entropy", 1)
    line_re = re.compile(pattern)
    lines = [line for line in (run / "runs" / "obs" / "learning.log").read_text().splitlines()
             if line.startswith("[Epoch")]
    assert len(lines) == STEPS
    for line in lines:
        assert line_re.fullmatch(line), line
        assert all(f"{name}_rew=" in line for name in ("Correctness", "CodeQuality", "Efficiency", "Documentation"))


def test_batch_metrics_and_reward_breakdown(run):
    run_dir = run / "runs" / "obs"
    batch = [json.loads(line) for line in (run_dir / "batch_metrics.jsonl").read_text().splitlines()]
    assert [b["step"] for b in batch] == list(range(1, STEPS + 1))
    breakdown = [json.loads(line) for line in (run_dir / "reward_breakdown.jsonl").read_text().splitlines()]
    assert len(breakdown) == STEPS * 4
    for step_metrics in batch:
        rows = [r for r in breakdown if r["step"] == step_metrics["step"]]
        correct = [r["scores"]["CodeQuality"] >= 0.5 for r in rows]  # the configured criterion and threshold
        assert step_metrics["pass_at_1"] == pytest.approx(sum(correct) / 4)
        assert step_metrics["pass_at_all"] == float(any(correct))
        assert set(step_metrics) == {"step", "time", "pass_at_1", "pass_at_all"}
    for row in breakdown:
        assert set(row) == {"step", "prompt_id", "completion", "reward", "valid", "scores"}
        assert set(row["scores"]) == {"Correctness", "CodeQuality", "Efficiency", "Documentation"}
    completions = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]
    assert {c["step"] for c in completions} == {1, 2, 4} and all("prompt_id" in c for c in completions)
