"""rollout.dynamic_sampling: groups without a reward spread are dropped and more prompts drawn,
with a scripted reward that makes two prompts in three score alike."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import test_seed_capabilities as capabilities
from conftest import make_tiny_model
from dp_worker import ByteTokenizer, byte_score
from mlx_grpo.config import Config, load_config
from mlx_grpo.errors import UserInputError
from mlx_grpo.grpo import zero_std_groups
from mlx_grpo.rewards import Scorer, load_rubric
from mlx_grpo.rewards.checks import CHECKS
from mlx_grpo.rollout_source import RolloutSource

OPTIONS = {"rollout.dynamic_sampling": True, "rollout.max_resample_batches": 6, "train.steps": 4,
           "train.save_every": 1, "rollout.max_new_tokens": 12}


def prompt_number(sample: dict) -> int:
    return int(sample["prompt"].split()[1].rstrip(":"))


def scripted(completion: str, sample: dict) -> float:
    """Every completion of prompts not divisible by 3 scores 0.5: those groups carry no signal."""
    return byte_score(completion, sample) if prompt_number(sample) % 3 == 0 else 0.5


def test_the_batch_holds_exactly_b_groups_with_spread(tmp_path, monkeypatch):
    monkeypatch.setitem(CHECKS, "byte_score", scripted)
    rubric = tmp_path / "rubric.yaml"
    rubric.write_text(capabilities.RUBRIC)
    cfg = load_config(None, {**capabilities.COMMON, **OPTIONS})
    scorer = Scorer(load_rubric(rubric))
    try:
        source = RolloutSource(cfg, capabilities.make_items(30), make_tiny_model(seed=0), ByteTokenizer(), scorer)
        for step in (1, 2):
            batch = source.take(step)
            scores = batch.scoring.result()
            assert len(batch.samples) == 2 and len(batch.texts) == 8 == len(batch.rollout.completion_tokens)
            assert not np.array(zero_std_groups(mx.array(scores.rewards), 4)).any()
            assert all(prompt_number(s) % 3 == 0 for s in batch.samples)
            # Texts, samples and scores stay aligned row by row.
            assert [scripted(t, s) for t, s in zip(batch.texts, batch.group_samples)] == pytest.approx(
                scores.rewards.tolist())
            record = batch.sampling_record
            assert record["dynamic_sampling/groups_with_spread"] == 2
            assert record["dynamic_sampling/groups_drawn"] == 2 * record["dynamic_sampling/batches_drawn"] >= 4
            assert record["dynamic_sampling/groups_dropped"] >= 2
    finally:
        scorer.close()


def test_counts_are_logged_and_resume_is_exact(tmp_path, monkeypatch):
    monkeypatch.setattr(capabilities, "byte_score", scripted)
    items = capabilities.make_items(30)
    straight = capabilities.tiny_run(tmp_path / "a", OPTIONS, items, monkeypatch=monkeypatch)
    assert [r["step"] for r in straight] == [1, 2, 3, 4]
    for r in straight:
        assert r["dynamic_sampling/groups_with_spread"] == 2
        assert r["dynamic_sampling/groups_drawn"] == 2 * r["dynamic_sampling/batches_drawn"]
    assert sum(r["dynamic_sampling/groups_dropped"] for r in straight) > 0
    capabilities.tiny_run(tmp_path / "b", OPTIONS, items, stop_after=1, monkeypatch=monkeypatch)  # after step 2
    resumed = capabilities.tiny_run(tmp_path / "b", OPTIONS, items, monkeypatch=monkeypatch,
                                    resume=tmp_path / "b" / "checkpoints" / "step_000002")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for key in ("Train/Loss", "Train/AvgReward", "dynamic_sampling/batches_drawn", "dynamic_sampling/groups_dropped",
                "response_length/mean"):
        assert [r[key] for r in resumed] == [r[key] for r in straight], key


def test_short_of_b_the_dropped_groups_fill_the_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(capabilities, "byte_score", lambda completion, sample: 0.5)  # no group ever has a spread
    records = capabilities.tiny_run(tmp_path / "c", {**OPTIONS, "train.steps": 1, "rollout.max_resample_batches": 2},
                                    capabilities.make_items(12), monkeypatch=monkeypatch)
    assert records[0]["dynamic_sampling/batches_drawn"] == 2 and records[0]["dynamic_sampling/groups_with_spread"] == 0
    assert records[0]["dynamic_sampling/groups_dropped"] == 4
    assert not any(key.startswith("dynamic_sampling/") for key in
                   capabilities.tiny_run(tmp_path / "off", {"train.steps": 1}, capabilities.make_items(12),
                                         monkeypatch=monkeypatch)[0])


def test_refused_with_the_pipeline():
    cfg = Config()
    cfg.rollout.dynamic_sampling = cfg.rollout.pipeline = True
    with pytest.raises(UserInputError, match="rollout.dynamic_sampling does not go with rollout.pipeline"):
        cfg.validate()


def test_merging_groups_keeps_every_per_completion_field():
    """The groups kept from several drawn batches carry every field of each completion along, the
    teacher's gaming flags and justifications included (the flags were once dropped here)."""
    from mlx_grpo.rewards import RewardBatch
    from mlx_grpo.rollout import Rollout
    from mlx_grpo.rollout_source import ScoredRollout, _merge_groups

    G, n = 2, 4

    def batch(tag: int):  # two groups of two completions; every per-row value names its batch and row
        rollout = Rollout(prompt_tokens=[[tag, i // G] for i in range(n)], completion_tokens=[[tag, i] for i in range(n)],
                          finish_reasons=[f"{tag}:{i}" for i in range(n)], prefill_time_s=1.0, generation_time_s=2.0,
                          logprobs=[[tag + i / 10] for i in range(n)], max_new_tokens=8,
                          loss_mask=[[float(i)] for i in range(n)])
        scores = RewardBatch(rewards=np.arange(n, dtype=np.float32) + tag,
                             criterion_scores={"A": np.arange(n, dtype=np.float32) * tag},
                             valid=np.array([True, False, True, True]), justifications={"A": [f"why {tag}:{i}" for i in range(n)]},
                             weights={"A": 1.0}, gaming=[f"gaming {tag}:{i}" for i in range(n)])
        return ScoredRollout(samples=[{"id": f"{tag}:{g}"} for g in range(2)], prompts=[[tag, g] for g in range(2)],
                             rollout=rollout, texts=[f"text {tag}:{i}" for i in range(n)],
                             group_samples=[{"id": f"{tag}:{i // G}"} for i in range(n)], scoring=None,
                             score_start=0.0, scored_at=[1.0]), scores

    merged = _merge_groups([batch(10), batch(20)], [(1, 0), (0, 1)], G)  # batch 1's group 0, then batch 0's group 1
    rows = [(20, 0), (20, 1), (10, 2), (10, 3)]
    scores = merged.scoring.result()
    assert scores.gaming == [f"gaming {t}:{i}" for t, i in rows]
    assert scores.justifications == {"A": [f"why {t}:{i}" for t, i in rows]}
    assert scores.rewards.tolist() == [t + i for t, i in rows] and scores.rewards.dtype == np.float32
    assert scores.criterion_scores["A"].tolist() == [t * i for t, i in rows]
    assert scores.valid.tolist() == [True, False, True, True] and scores.weights == {"A": 1.0}
    r = merged.rollout
    assert r.completion_tokens == [[t, i] for t, i in rows] and r.finish_reasons == [f"{t}:{i}" for t, i in rows]
    assert r.logprobs == [[t + i / 10] for t, i in rows] and r.loss_mask == [[float(i)] for _, i in rows]
    assert (r.prefill_time_s, r.generation_time_s, r.max_new_tokens) == (2.0, 4.0, 8)
    assert merged.texts == [f"text {t}:{i}" for t, i in rows] and [s["id"] for s in merged.samples] == ["20:0", "10:1"]
