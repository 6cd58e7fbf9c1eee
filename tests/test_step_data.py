"""One step's data: who decides what is correct, how a step record is built, and the
configuration's names (today's, and those of earlier versions)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from mlx_grpo.config import (REMOVED, RENAMED, Config, dropped_settings, iter_fields, load_config,
                             load_run_config)
from mlx_grpo.data import load_dataset
from mlx_grpo.errors import UserInputError
from mlx_grpo.tasks import BUILTIN_TASKS, task_option_defaults
from mlx_grpo.metrics.run_log import StepOutcome
from mlx_grpo.metrics.tracker import FirstAndLast
from mlx_grpo.rewards import Scorer, load_rubric
from mlx_grpo.rewards.correct import CorrectRule
from mlx_grpo.rewards.scoring import RewardBatch
from mlx_grpo.rewards.teacher import LATENCY_WINDOW, TeacherUsage

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Correctness: one rule


def scored_batch(columns: dict[str, list[float]], rewards: list[float]) -> RewardBatch:
    return RewardBatch(rewards=np.array(rewards, dtype=np.float32),
                       criterion_scores={k: np.array(v, dtype=np.float32) for k, v in columns.items()},
                       valid=~np.isnan(np.array(rewards)))


def test_the_correct_rule_reads_the_named_criterion_then_the_rubrics_then_the_reward(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\ncorrect: Exact\ncriteria:\n"
                    "  - {name: Exact, weight: 0.5, check: number_check}\n"
                    "  - {name: Short, weight: 0.5, check: short_answer}\n")
    rubric = load_rubric(path)
    scored = scored_batch({"Exact": [1.0, 0.0, float("nan")], "Short": [0.2, 1.0, 1.0]}, [0.6, 0.5, float("nan")])
    assert CorrectRule().mask(scored, rubric).tolist() == [True, False, False]  # the rubric's `correct:`; NaN never
    assert CorrectRule("Short", 0.5).mask(scored, rubric).tolist() == [False, True, True]
    rubric_without = dataclasses.replace(rubric, correct="")
    assert CorrectRule(threshold=0.55).mask(scored, rubric_without).tolist() == [True, False, False]  # the reward
    edited = scored_batch({"Short": [0.2, 1.0, 1.0]}, [0.9, 0.1, 0.9])  # an edit removed Exact: the reward decides
    assert CorrectRule("Exact", 0.5).mask(edited, rubric).tolist() == [True, False, True]
    with pytest.raises(UserInputError, match="reward.correct_criterion 'Bogus' is not a criterion"):
        CorrectRule("Bogus").check(rubric)


def test_a_step_outcome_is_built_with_keywords_only():
    with pytest.raises(TypeError):
        StepOutcome(*range(len(dataclasses.fields(StepOutcome))))


# ---------------------------------------------------------------------------------------------
# Configuration


def test_the_config_holds_at_most_70_settings():
    assert len(list(iter_fields())) <= 70


@pytest.mark.parametrize("old", sorted({**RENAMED, **REMOVED}))
def test_an_old_name_in_a_config_file_gets_one_line_naming_what_to_write(tmp_path, old):
    section, key = old.split(".")
    path = tmp_path / "old.yaml"
    path.write_text(f"{section}:\n  {key}: 1\n")
    with pytest.raises(UserInputError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message and f"'{old}'" in message
    assert (f"is now '{RENAMED[old]}'" if old in RENAMED else "was removed") in message


def test_a_run_recorded_by_an_earlier_version_loads_under_todays_names(tmp_path):
    # tests/data/earlier_run_config.yaml is the config.yaml that the previous version wrote for a
    # run with data.list_size 4, logging.wandb_mode offline, logging.correct_threshold 0.5 and
    # rollout.window_margin 2 (a setting removed since).
    (tmp_path / "config.yaml").write_text((DATA / "earlier_run_config.yaml").read_text())
    cfg = load_run_config(tmp_path)
    assert cfg.task == {"list_size": 4, "max_value": 99, "instruction": "", "min_list_size": 0}  # largest's own
    assert cfg.logging.wandb == "offline" and cfg.reward.correct_threshold == 0.5 and cfg.train.steps == 50
    assert not cfg.rollout.sgrpo
    assert dropped_settings(tmp_path) == ["rollout.window_margin was 2; now the adaptive window adds 4 tokens of margin"]


def test_task_options_belong_to_the_task():
    cfg = load_config(None, {"task.list_size": 4})
    items = load_dataset(cfg.data.dataset, "train", size=5, **cfg.task)
    assert all(item["difficulty"] == 4 for item in items)
    with pytest.raises(UserInputError, match="task.max_ops is not an option of the largest task"):
        load_config(None, {"task.max_ops": 2})
    assert load_config(None, {"data.dataset": "arithmetic", "task.max_ops": 2}).task == {"max_ops": 2}
    with pytest.raises(UserInputError, match="task options apply to the built-in tasks"):
        load_config(None, {"data.dataset": "prompts.jsonl", "task.list_size": 4})
    # The earlier default difficulty of arithmetic (data.max_ops 1) is the task's own default.
    assert {item["num_ops"] for item in load_dataset("arithmetic", "train", size=30)} == {1}


def test_dapo_is_another_name_for_bnpo():
    assert load_config(None, {"grpo.loss_type": "dapo"}).grpo.loss_type == "bnpo"


def test_each_section_validates_itself():
    cfg = Config()
    cfg.rollout.top_p = 0.0
    with pytest.raises(UserInputError, match="rollout.top_p must be in"):
        cfg.rollout.validate()
    cfg = Config()
    cfg.eval.samples = 0
    with pytest.raises(UserInputError, match="eval.samples must be at least 1"):
        cfg.validate()


# ---------------------------------------------------------------------------------------------
# A checkpoint that does not grow with the run


def test_the_final_reports_rewards_and_the_teacher_latencies_are_bounded():
    ends = FirstAndLast()
    sizes = {}
    for step in range(1, 10_001):
        ends.add(0.001 * step)
        if step in (100, 10_000):
            sizes[step] = len(json.dumps(ends.state_dict()))
    assert ends.first == pytest.approx([0.001, 0.002, 0.003, 0.004, 0.005])
    assert ends.last == pytest.approx([9.996, 9.997, 9.998, 9.999, 10.0])
    assert sizes[10_000] <= 1.2 * sizes[100]
    scorer = Scorer(load_rubric(REPO / "rubrics" / "largest.yaml"))
    try:
        scorer.restore_usage(TeacherUsage(), [float(i) for i in range(5_000)])  # a long run's checkpoint
        assert scorer.state_dict()["latencies"] == [float(i) for i in range(5_000 - LATENCY_WINDOW, 5_000)]
    finally:
        scorer.close()


def test_the_help_names_every_option_of_every_task():
    help_text = {name: f for name, f, _ in iter_fields()}["task"].metadata["help"]
    for task in BUILTIN_TASKS:
        assert f"{task}:" in help_text or task == "coding"  # coding takes only the instruction
        for option in task_option_defaults(task):
            assert option in help_text, (task, option)
