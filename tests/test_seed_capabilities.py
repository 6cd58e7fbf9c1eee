"""The seed references' capabilities: difficulty levels and the curriculum, the adaptive generation
window, S-GRPO's serial group, per-token entropy dumps, and the plain critic/ and alias names.

Unit tests check the math against hand-computed cases; short seeded runs on the tiny model
(through trainer.train, as the golden run) check the wiring, resume and the files."""

import functools
import json
import random
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest import make_tiny_model  # noqa: E402
from dp_worker import ByteTokenizer, byte_score  # noqa: E402
from mlx_grpo import grpo, rollout_source, sgrpo, trainer  # noqa: E402
from mlx_grpo.adaptive_window import AdaptiveWindow, window_from_lengths  # noqa: E402
from mlx_grpo.config import load_config  # noqa: E402
from mlx_grpo.curriculum import Curriculum, difficulty_levels, difficulty_metrics, level_indices  # noqa: E402
from mlx_grpo.data import load_dataset, load_jsonl  # noqa: E402
from mlx_grpo.errors import UserInputError  # noqa: E402
from mlx_grpo.metrics import MetricsHub  # noqa: E402
from mlx_grpo.metrics.entropy_dump import entropy_arrays  # noqa: E402
from mlx_grpo.metrics.files import JsonlSink  # noqa: E402
from mlx_grpo.metrics.record import alias_metrics, critic_metrics  # noqa: E402
from mlx_grpo.metrics.run_log import prompt_id  # noqa: E402
from mlx_grpo.rewards import Scorer, load_rubric  # noqa: E402
from mlx_grpo.rewards.checks import CHECKS  # noqa: E402

RUBRIC = """name: bytes
criteria:
  - {name: Bytes, weight: 1, check: byte_score}
"""
# "Correct" = a byte score of at least 0.5: about half the tiny model's completions.
COMMON = {"rollout.batch_size": 2, "rollout.group_size": 4, "rollout.max_new_tokens": 12, "optim.learning_rate": 1e-2,
          "optim.warmup_steps": 0, "lora.rank": 4, "train.save_every": 0, "logging.sample_every": 0,
          "reward.correct_criterion": "Bytes", "reward.correct_threshold": 0.5}


def make_items(n: int, levels=(1, 2)) -> list[dict]:
    return [{"prompt": f"Question {i}: what is {i} plus {i % 5}?", "answer": str(i + i % 5),
             "difficulty": levels[i % len(levels)]} for i in range(n)]


def tiny_run(run_dir: Path, overrides: dict, items: list[dict], held_out=None, resume=None, stop_after=None,
             monkeypatch=None) -> list[dict]:
    """A seeded run of the tiny model; returns its metrics.jsonl records."""
    monkeypatch.setitem(CHECKS, "byte_score", byte_score)
    run_dir.mkdir(parents=True, exist_ok=True)
    rubric = run_dir / "rubric.yaml"
    rubric.write_text(RUBRIC)
    cfg = load_config(None, {**COMMON, **overrides})
    hub = MetricsHub([JsonlSink(run_dir / "metrics.jsonl")])
    scorer = Scorer(load_rubric(rubric))
    steps = []
    # Asked before a step is logged: stop_after=N stops after step N + 1.
    should_stop = (lambda: len(steps) >= stop_after) if stop_after else (lambda: False)
    try:
        trainer.train(cfg, make_tiny_model(seed=0), ByteTokenizer(), trainer.Prompts(items, held_out), scorer,
                      trainer.RunIO(run_dir, hub, progress=lambda step, record: steps.append(step),
                                    should_stop=should_stop, resume=resume))
    finally:
        scorer.close()
        hub.close()
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Plain names


def test_critic_metrics_by_hand():
    rewards = np.array([1.0, 0.0, 0.5, 0.9], dtype=np.float32)
    valid = np.array([True, True, True, False])
    advantages = np.array([1.0, -1.0, 0.0, 5.0], dtype=np.float32)
    lengths = np.array([3, 1, 2, 4])
    record = critic_metrics(rewards, rewards, valid, advantages, lengths, beta=0.04, kl=0.25)
    assert record["critic/score/mean"] == pytest.approx(0.5) and record["critic/score/max"] == 1.0
    assert record["critic/rewards/min"] == 0.0  # no shaping: rewards == score
    shaped = critic_metrics(rewards, rewards - np.array([0.0, 0.0, 0.25, 0.0]), valid, advantages, lengths, 0.0, 0.0)
    assert shaped["critic/rewards/mean"] == pytest.approx(1.25 / 3) and shaped["critic/score/mean"] == pytest.approx(0.5)
    # Token-weighted: three tokens of +1, one of -1, two of 0 (the masked row is left out).
    assert record["critic/returns/mean"] == pytest.approx(2 / 6)
    assert record["critic/returns/max"] == 1.0 and record["critic/returns/min"] == -1.0
    assert record["ppo/returns/var"] == pytest.approx(np.var([1, 1, 1, -1, 0, 0]))
    assert record["critic/kl"] == 0.25 and record["critic/kl_coeff"] == 0.04


def test_alias_metrics_copy_values_under_trl_names():
    record = {"Train/Loss": 0.5, "actor/lr": 1e-4, "Train/AvgReward": 0.3, "Train/KLPenalty": 0.02,
              "Scoring/Answer_score": 0.7, "Scoring/Answer_std": 0.1, "actor/pg_clipfrac": 0.05}
    out = alias_metrics(record)
    assert out["loss"] == 0.5 and out["ppo/loss/total"] == 0.5 and out["learning_rate"] == 1e-4
    assert out["env/reward_mean"] == 0.3 and out["ppo/policy/clipfrac"] == 0.05
    assert out["ppo/mean_non_score_reward"] == -0.02
    assert out["rewards/Answer/mean"] == 0.7 and out["rewards/Answer/std"] == 0.1
    assert "entropy" not in out  # no update, no entropy: nothing is made up


# ---------------------------------------------------------------------------------------------
# Difficulty levels and the curriculum


def test_difficulty_labels_of_the_builtin_tasks_and_jsonl(tmp_path):
    largest = load_dataset("largest", "train", size=60, list_size=5, min_list_size=3)
    assert difficulty_levels(largest) == [3, 4, 5]
    assert all(len(item["numbers"]) == item["difficulty"] for item in largest)
    assert difficulty_levels(load_dataset("largest", "train", size=20)) == [3]
    assert set(difficulty_levels(load_dataset("arithmetic", "train", size=60, max_ops=3))) == {1, 2, 3}
    assert difficulty_levels(load_dataset("coding", "train")) == [1, 2, 3]

    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a", "difficulty": 2.0}\n{"prompt": "b", "difficulty": "hard"}\n')
    rows, _ = load_jsonl(good)
    assert [r["difficulty"] for r in rows] == [2, "hard"]
    for bad in ('true', '[1]', '""', '1.5'):
        path = tmp_path / "bad.jsonl"
        path.write_text('{"prompt": "a", "difficulty": %s}\n' % bad)
        with pytest.raises(UserInputError, match=r"bad.jsonl:1: 'difficulty' must be"):
            load_jsonl(path)


def test_difficulty_metrics_by_hand():
    levels = [1, 2, "hard"]
    indices = level_indices([{"difficulty": d} for d in (1, 1, 2, 2, 2, None)], levels)
    assert indices.tolist() == [0, 0, 1, 1, 1, -1]
    correct = np.array([True, False, True, True, False, True])
    valid = np.array([True, True, True, False, True, True])
    record = difficulty_metrics(levels, indices, correct, valid)
    assert record == {"difficulty/1_count": 2.0, "difficulty/1_acc": 0.5,
                      "difficulty/2_count": 3.0, "difficulty/2_acc": 0.5}  # the masked row is not judged


def test_curriculum_unlocks_the_next_level_when_mastered():
    items = make_items(30, levels=(1, 2, 3))
    curriculum = Curriculum(items, seed=0, threshold=0.75, window=4)
    assert {s["difficulty"] for s in curriculum.next_batch(20)} == {1}
    ones = np.ones(4, dtype=bool)
    # Level 2 results do not count towards level 1; three of four correct reaches the threshold.
    record = curriculum.observe(np.array([1, 1, 1, 1]), ones, ones)
    assert record["curriculum/level"] == 1.0 and curriculum.current == 1
    record = curriculum.observe(np.zeros(4, dtype=int), np.array([True, True, True, False]), ones)
    assert record["curriculum/recent_acc"] == 0.75 and curriculum.current == 2
    assert {s["difficulty"] for s in curriculum.next_batch(40)} == {1, 2}
    state = json.loads(json.dumps(curriculum.state_dict()))
    again = Curriculum(items, seed=0, threshold=0.75, window=4)
    again.load_state_dict(state)
    assert again.current == 2 and again.next_batch(5) == curriculum.next_batch(5)
    with pytest.raises(UserInputError, match="at least two difficulty levels"):
        Curriculum(make_items(10, levels=(1,)), seed=0, threshold=0.5, window=4)


def test_per_level_accuracy_is_recomputed_from_reward_breakdown(tmp_path, monkeypatch):
    items = make_items(24)
    records = tiny_run(tmp_path / "r", {"train.steps": 4}, items, monkeypatch=monkeypatch)
    level_of = {prompt_id(item): item["difficulty"] for item in items}
    rows = [json.loads(line) for line in (tmp_path / "r" / "reward_breakdown.jsonl").read_text().splitlines()]
    for record in records:
        step_rows = [r for r in rows if r["step"] == record["step"]]
        for level in (1, 2):
            at = [r for r in step_rows if level_of[r["prompt_id"]] == level]
            if not at:
                assert f"difficulty/{level}_count" not in record
                continue
            assert record[f"difficulty/{level}_count"] == len(at)
            correct = [r["scores"]["Bytes"] >= 0.5 for r in at if r["valid"]]
            assert record[f"difficulty/{level}_acc"] == pytest.approx(np.mean(correct), abs=1e-4)


def test_curriculum_run_draws_the_easy_level_until_it_moves_up(tmp_path, monkeypatch):
    items = make_items(40)
    class EightWide(Curriculum):  # a level's accuracy over its last 8 completions (64 in training)
        def __init__(self, *args):
            super().__init__(*args, window=8)

    monkeypatch.setattr(rollout_source, "Curriculum", EightWide)
    records = tiny_run(tmp_path / "c", {"train.steps": 5, "data.curriculum": True, "data.curriculum_threshold": 0.0},
                       items, monkeypatch=monkeypatch)
    level_index = [r["curriculum/level_index"] for r in records]
    assert level_index[0] == 0 and level_index[-1] == 1  # 8 level-1 completions fill the window at step 1
    assert records[0]["difficulty/1_count"] == 8 and "difficulty/2_count" not in records[0]


# ---------------------------------------------------------------------------------------------
# The adaptive generation window


def test_window_from_lengths_by_hand():
    assert window_from_lengths([6] * 10, 95, 4, 2, 64) == 10
    assert window_from_lengths(list(range(1, 21)), 95, 0, 2, 64) == 20  # p95 of 1..20 is 19.05: rounded up
    assert window_from_lengths([100], 95, 4, 2, 64) == 64 and window_from_lengths([1], 95, 0, 8, 64) == 8
    assert window_from_lengths([], 95, 4, 2, 64) == 64  # nothing learnt yet: the full budget


@pytest.mark.parametrize("epsilon", [0.0, 0.2, 1.0])
def test_exploration_rate_over_many_steps(epsilon):
    window = AdaptiveWindow(seed=3, max_tokens=64, min_tokens=4, margin=2, percentile=95, epsilon=epsilon, history=50)
    explored = [window.window_for(step)[1] for step in range(1, 2001)]
    assert np.mean(explored) == pytest.approx(epsilon, abs=0.03)


def test_window_follows_a_synthetic_stream_of_successes():
    window = AdaptiveWindow(seed=0, max_tokens=64, min_tokens=4, margin=2, percentile=95, epsilon=0.0, history=8)
    assert window.window_for(1) == (64, False)
    lengths = np.array([10, 12, 30, 8])
    success = np.array([True, True, False, True])
    valid = np.ones(4, dtype=bool)
    rewards = np.array([1.0, 1.0, 0.0, 0.5])
    record = window.observe(64, False, lengths, success, valid, rewards)
    good = np.array([10, 12, 8])
    assert record["adaptive_window/num_success_samples"] == 3
    assert record["adaptive_window/mean_success_length"] == pytest.approx(10.0)
    assert record["adaptive_window/median_success_length"] == 10.0
    assert record["adaptive_window/std_success_length"] == pytest.approx(good.std())
    assert record["adaptive_window/p95_success_length"] == pytest.approx(np.percentile(good, 95))
    assert record["adaptive_window/success_rate"] == 0.75 and record["adaptive_window/success_rate_ema"] == 0.75
    assert window.window_for(2) == (int(np.ceil(np.percentile(good, 95))) + 2, False)  # 12 + 2
    record = window.observe(14, True, np.array([20, 20]), np.array([False, True]), np.ones(2, bool), np.array([0.0, 1.0]))
    assert record["adaptive_window/success_rate_ema"] == pytest.approx(0.9 * 0.75 + 0.1 * 0.5)
    assert record["adaptive_window/exploration_rate"] == 0.5 and record["adaptive_window/explored_step"] == 1.0
    assert record["adaptive_window/cumulative_reward"] == pytest.approx(0.625 + 0.5)
    assert record["adaptive_window/cumulative_success_rate"] == pytest.approx(4 / 6)
    assert record["adaptive_window/current_window"] == 14
    # Only the last 8 successful lengths are remembered.
    window.observe(64, False, np.full(8, 40), np.ones(8, bool), np.ones(8, bool), np.ones(8))
    assert window.window_for(9)[0] == 42


def test_adaptive_window_resume_across_a_window_change_is_exact(tmp_path, monkeypatch):
    options = {"train.steps": 6, "rollout.max_new_tokens": 16, "rollout.adaptive_window": True, "train.save_every": 1}
    # A window that moves more than the one in training, so that it changes after the resume point.
    monkeypatch.setattr(rollout_source, "AdaptiveWindow", functools.partial(
        AdaptiveWindow, min_tokens=2, margin=0, epsilon=0.3, percentile=10.0))
    items = make_items(24)
    straight = tiny_run(tmp_path / "a", options, items, monkeypatch=monkeypatch)
    windows = [r["adaptive_window/current_window"] for r in straight]
    assert len(set(windows[2:])) > 1, windows  # the window changes after the resume point
    tiny_run(tmp_path / "b", options, items, stop_after=2, monkeypatch=monkeypatch)  # stops after step 3
    resumed = tiny_run(tmp_path / "b", options, items, resume=tmp_path / "b" / "checkpoints" / "step_000003",
                       monkeypatch=monkeypatch)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for key in ("adaptive_window/current_window", "adaptive_window/success_rate_ema", "adaptive_window/explored_step",
                "adaptive_window/cumulative_success_rate", "Train/Loss", "Train/AvgReward", "response_length/mean"):
        assert [r[key] for r in resumed] == [r[key] for r in straight], key


# ---------------------------------------------------------------------------------------------
# S-GRPO


def test_decaying_rewards_and_serial_advantages_by_hand():
    correct = np.array([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=bool).reshape(-1)
    rewards = sgrpo.decaying_rewards(correct, 4)
    assert rewards.reshape(3, 4).tolist() == [[0, 1, 0.5, 0], [1, 0.5, 0.25, 0.125], [0, 0, 0, 0]]
    advantages = np.array(grpo.group_advantages(mx.array(rewards), 4, scale="none"))
    assert advantages[:4] == pytest.approx([-0.375, 0.625, 0.125, -0.375])
    assert advantages[4:8] == pytest.approx([1 - 0.46875, 0.5 - 0.46875, 0.25 - 0.46875, 0.125 - 0.46875])


def test_exit_positions_lie_inside_the_reasoning():
    tok = ByteTokenizer()
    text = "<reasoning>ab</reasoning><answer>3</answer>"
    ends = sgrpo.token_text_ends(tok, tok.encode(text))
    assert ends == list(range(1, len(text) + 1))
    # Cut after "<reasoning>" (no thought yet), after "a", or after "ab": never into the closing tag.
    assert list(sgrpo.exit_candidates(ends, text)) == [11, 12, 13]
    unclosed = "<reasoning>abc"
    assert list(sgrpo.exit_candidates(sgrpo.token_text_ends(tok, tok.encode(unclosed)), unclosed)) == [11, 12, 13, 14]
    assert list(sgrpo.exit_candidates([1, 2, 3], "xyz")) == [0, 1, 2, 3]  # no tag: all of it is reasoning
    rng = random.Random(0)
    exits = sgrpo.draw_exits(range(11, 14), 3, rng)
    assert exits == [11, 12, 13]
    many = sgrpo.draw_exits(range(11, 13), 5, rng)
    assert many == sorted(many) and set(many) <= {11, 12}


def test_serial_group_rollout_construction(tiny_model):
    tok = ByteTokenizer()
    prompts = [tok.encode("Question one?\n"), tok.encode("Question two?\n")]
    mx.random.seed(0)
    rollout = sgrpo.serial_group_rollout(tiny_model, tok, prompts, group_size=4, max_new_tokens=10, answer_tokens=5,
                                         eos_token_ids=set(tok.eos_token_ids), temperature=1.0, top_p=1.0,
                                         rng=random.Random(0))
    inducing = tok.encode(sgrpo.ANSWER_INDUCING)
    assert len(rollout.completion_tokens) == 8
    for g, prompt in enumerate(prompts):
        rows = range(4 * g, 4 * g + 4)
        full = rollout.completion_tokens[4 * g + 3]
        assert all(rollout.prompt_tokens[r] == prompt for r in rows)
        assert rollout.loss_mask[4 * g + 3] == [1.0] * len(full)
        cuts = []
        for r in list(rows)[:3]:
            ids, mask = rollout.completion_tokens[r], rollout.loss_mask[r]
            cut = mask.index(0.0)
            cuts.append(cut)
            assert ids[:cut] == full[:cut]  # the exit continues the full path's own tokens
            assert ids[cut:cut + len(inducing)] == inducing
            assert mask == [1.0] * cut + [0.0] * len(inducing) + [1.0] * (len(ids) - cut - len(inducing))
            assert len(ids) - cut - len(inducing) <= 5 and len(rollout.logprobs[r]) == len(ids)
        assert cuts == sorted(cuts)  # exits in order, earliest first
    # The inserted tokens carry no loss in the train batch.
    from mlx_grpo.rollout import to_train_batch

    batch = to_train_batch(rollout)
    assert batch.mask.sum().item() == sum(sum(m) for m in rollout.loss_mask)


def test_sgrpo_metrics_by_hand():
    correct = np.array([[0, 1, 1, 1], [0, 0, 1, 0]], dtype=bool).reshape(-1)
    valid = np.array([[1, 1, 1, 1], [1, 1, 0, 1]], dtype=bool).reshape(-1)
    record = sgrpo.sgrpo_metrics(correct, valid, 4)
    assert record["sgrpo/exit_1_accuracy"] == 0.0 and record["sgrpo/exit_2_accuracy"] == 0.5
    assert record["sgrpo/exit_3_accuracy"] == 1.0 and record["sgrpo/exit_4_accuracy"] == 0.5
    assert record["sgrpo/avg_correct_exit_position"] == pytest.approx((2 + 3 + 4) / 3)
    assert record["sgrpo/overall_accuracy"] == pytest.approx(3 / 7)


def test_sgrpo_training_run(tmp_path, monkeypatch):
    records = tiny_run(tmp_path / "s", {"train.steps": 3, "rollout.sgrpo": True, "rollout.sgrpo_answer_tokens": 4},
                       make_items(12), monkeypatch=monkeypatch)
    for record in records:
        assert {f"sgrpo/exit_{k}_accuracy" for k in range(1, 5)} <= set(record)
        # Advantages are the decayed rewards less the group mean: they sum to zero in every group.
        assert record["critic/advantages/mean"] == pytest.approx(0.0, abs=1e-6)
        assert 0.0 <= record["sgrpo/overall_accuracy"] <= 1.0


# ---------------------------------------------------------------------------------------------
# Entropy dumps


def test_entropy_arrays_masks():
    tokens = np.array([[5, 6, 7, 8, 9, 0], [5, 6, 1, 0, 0, 0]])
    arrays = entropy_arrays(np.ones((2, 3)), np.full((2, 3), 2.0), tokens, np.array([2, 2]), np.array([3, 1]))
    assert arrays["responses"].tolist() == [[7, 8, 9], [1, 0, 0]]
    assert arrays["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]]
    assert arrays["old_entropy"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert arrays["old_varentropy"].tolist() == [[2, 2, 2], [2, 0, 0]]


def test_entropy_dumps_match_the_update_entropy(tmp_path, monkeypatch):
    from safetensors.numpy import load_file

    records = tiny_run(tmp_path / "e", {"train.steps": 4, "logging.entropy_dump_every": 2}, make_items(12),
                       monkeypatch=monkeypatch)
    folder = tmp_path / "e" / "entropy_data"
    assert sorted(p.name for p in folder.iterdir()) == ["entropy_step_000002.safetensors",
                                                        "entropy_step_000004.safetensors"]
    rows = [json.loads(line) for line in (tmp_path / "e" / "reward_breakdown.jsonl").read_text().splitlines()]
    tok = ByteTokenizer()
    for record in records[1::2]:
        arrays = load_file(str(folder / f"entropy_step_{record['step']:06d}.safetensors"))
        n, width = arrays["old_entropy"].shape
        assert n == 8 and arrays["responses"].shape == (n, width) and arrays["old_varentropy"].shape == (n, width)
        mask = arrays["response_mask"].astype(bool)
        assert mask.sum(axis=1).max() == width
        assert (arrays["old_varentropy"][mask] >= -1e-4).all() and (arrays["old_entropy"][mask] > 0).all()
        # The sampled ids, read back: the completions the rubric scored.
        texts = [r["completion"] for r in rows if r["step"] == record["step"]]
        decoded = [tok.decode([t for t in ids[m] if t not in tok.eos_token_ids]) for ids, m in zip(arrays["responses"], mask)]
        assert decoded == texts
        # The same tokens' entropy as the update's (one pass: the sampling policy is the current one).
        assert arrays["old_entropy"][mask].mean() == pytest.approx(record["actor/entropy_loss"], rel=1e-4)
