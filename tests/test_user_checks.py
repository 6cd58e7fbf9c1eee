"""Reward checks written in Python (`check: file.py:function`): loading, validation, scoring,
masking, async, hot reload and `rubric score`."""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from mlx_grpo.errors import UserInputError
from mlx_grpo.rewards import RubricWatcher, Scorer, contiguous_groups, load_rubric, score_completions
from mlx_grpo.rubric_cli import main

REPO = Path(__file__).resolve().parent.parent
SAMPLE = {"prompt": "What is 2 + 3?", "answer": "5"}

CHECKS_PY = """
def has_word(completion, sample, word="because"):
    return 1.0 if word in completion else 0.0

def answer_length(completion, sample, *, limit=10):
    return min(1.0, len(sample["answer"]) / limit)

def mask_empty(completion, sample):
    return None if not completion.strip() else 1.0

def broken(completion, sample):
    return 1 / 0

def too_big(completion, sample):
    return 3

def no_args():
    return 1.0

not_a_function = 7
"""


def write_rubric(tmp_path: Path, check: str, params: dict | None = None, checks: str = CHECKS_PY) -> Path:
    (tmp_path / "my_checks.py").write_text(textwrap.dedent(checks))
    criterion = {"name": "Mine", "weight": 1.0, "check": check}
    if params is not None:
        criterion["params"] = params
    rubric = {"name": "t", "criteria": [{"name": "Answer", "weight": 1.0, "check": "number_check"}, criterion]}
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(rubric))  # JSON is YAML
    return path


def test_a_python_check_scores_with_its_params(tmp_path):
    rubric = load_rubric(write_rubric(tmp_path, "my_checks.py:has_word", {"word": "since"}), sample=SAMPLE)
    result = score_completions(rubric, [SAMPLE] * 3, ["<answer>5</answer> since", "<answer>5</answer>", "since 4"])
    assert result.criterion_scores["Mine"].tolist() == [1.0, 0.0, 1.0]
    # The weighted sum by hand: (number_check + mine) / 2.
    assert result.rewards.tolist() == pytest.approx([1.0, 0.5, 0.5])  # "since 4": a wrong number
    assert rubric.sources == (str(tmp_path / "my_checks.py"),)


def test_an_importable_module_function(tmp_path, monkeypatch):
    (tmp_path / "pkg_checks_mod.py").write_text("def one(completion, sample):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({"criteria": [{"name": "One", "weight": 1, "check": "pkg_checks_mod:one"}]}))
    rubric = load_rubric(path, sample=SAMPLE)
    assert rubric.sources == ()  # not a file next to the rubric: nothing to watch
    assert score_completions(rubric, [SAMPLE], ["x"]).rewards.tolist() == [1.0]


@pytest.mark.parametrize("check, params, fragment", [
    ("missing.py:f", None, "missing.py not found"),
    ("my_checks.py:has_wrd", None, "has no function 'has_wrd' (did you mean 'has_word'?)"),
    ("my_checks.py:not_a_function", None, "is not a function"),
    ("my_checks.py:no_args", None, "cannot be called as no_args(completion, sample)"),
    ("my_checks.py:has_word", {"colour": "red"}, "cannot be called as has_word(completion, sample, colour)"),
    ("my_checks.py:broken", None, "a dry call on a dataset sample raised ZeroDivisionError: division by zero"),
    ("my_checks.py:too_big", None, "returned 3; a check returns a number in [0, 1], or None to mask"),
    ("no_such_module_xyz:f", None, "cannot import module 'no_such_module_xyz'"),
    ("my_checks.py:", None, "must be file.py:function or module:function"),
])
def test_load_errors_are_one_line_naming_file_criterion_and_function(tmp_path, check, params, fragment):
    path = write_rubric(tmp_path, check, params)
    with pytest.raises(UserInputError) as err:
        load_rubric(path, sample=SAMPLE)
    message = str(err.value)
    assert "\n" not in message and fragment in message
    assert message.startswith(f"{path}: criteria[1] (Mine):")


def test_a_file_that_fails_to_import_is_one_line(tmp_path):
    path = write_rubric(tmp_path, "my_checks.py:f", checks="def f(completion, sample):\n    return (\n")
    with pytest.raises(UserInputError, match=r"importing .*my_checks.py failed: SyntaxError"):
        load_rubric(path)


def test_none_masks_the_completion(tmp_path):
    rubric = load_rubric(write_rubric(tmp_path, "my_checks.py:mask_empty"), sample=SAMPLE)
    for result in (score_completions(rubric, [SAMPLE] * 2, ["<answer>5</answer>", "  "]),
                   _scorer_score(rubric, [SAMPLE] * 2, ["<answer>5</answer>", "  "])):
        assert result.valid.tolist() == [True, False]
        assert result.rewards[0] == 1.0 and np.isnan(result.rewards[1])
        assert np.isnan(result.criterion_scores["Mine"][1])


def test_out_of_range_at_scoring_time_is_an_error_not_a_clip(tmp_path):
    # Passes the dry call (the sample's answer is short) and fails on a longer completion's sample.
    checks = "def f(completion, sample):\n    return len(completion) / 10\n"
    rubric = load_rubric(write_rubric(tmp_path, "my_checks.py:f", checks=checks))
    with pytest.raises(UserInputError, match=r"check my_checks.py:f returned 1.2; a check returns a number"):
        score_completions(rubric, [SAMPLE], ["x" * 12])


def _scorer_score(rubric, samples, completions):
    scorer = Scorer(rubric, workers=1)
    try:
        return scorer.score(samples, completions, contiguous_groups(len(completions), 2))
    finally:
        scorer.close()


def test_async_checks_are_awaited_concurrently(tmp_path):
    # Every call waits until all four have started: run one after another, they would time out.
    checks = """
    import asyncio
    started = 0
    async def together(completion, sample, n=4):
        global started
        started += 1
        for _ in range(200):
            if started >= n:
                return 1.0
            await asyncio.sleep(0.01)
        return 0.0
    """
    rubric = load_rubric(write_rubric(tmp_path, "my_checks.py:together", {"n": 1}, checks=checks), sample=SAMPLE)
    rubric.criteria[1].params = {"n": 5}  # 1 dry-call start + 4 now
    result = _scorer_score(rubric, [SAMPLE] * 4, ["<answer>5</answer>"] * 4)
    assert result.criterion_scores["Mine"].tolist() == [1.0] * 4


def test_editing_the_check_file_hot_reloads(tmp_path):
    path = write_rubric(tmp_path, "my_checks.py:f", checks="def f(completion, sample):\n    return 0.25\n")
    watcher = RubricWatcher(load_rubric(path, sample=SAMPLE), SAMPLE)
    assert watcher.poll() == (None, None)
    source = tmp_path / "my_checks.py"
    source.write_text("def f(completion, sample):\n    return 0.75\n")
    os.utime(source, ns=(time.time_ns(), time.time_ns() + 10**9))  # a clearly newer stamp
    new, warning = watcher.poll()
    assert warning is None and new is not None
    assert score_completions(new, [SAMPLE], ["x"]).criterion_scores["Mine"].tolist() == [0.75]
    # A broken edit is refused in one line, and the last good rubric stays.
    source.write_text("def f(completion, sample):\n    return 2.0\n")
    os.utime(source, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    new, warning = watcher.poll()
    assert new is None and "returned 2.0" in warning and "still using version" in warning
    assert score_completions(watcher.rubric, [SAMPLE], ["x"]).criterion_scores["Mine"].tolist() == [0.75]


def test_rubric_score_runs_python_checks(capsys):
    example = str(REPO / "rubrics" / "examples" / "concise_math.yaml")
    completions = ["<reasoning>2 + 3 = 5</reasoning>\n<answer>5</answer>", "<reasoning>5</reasoning><answer>5</answer>"]
    argv = ["score", example, "--prompt", SAMPLE["prompt"], "--answer", "5", "--json"]
    for text in completions:
        argv += ["--completion", text]
    assert main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["scores"]["Shows working"] for r in rows] == [1.0, 0.0]


def test_rubric_score_reports_a_broken_check_in_one_line(capsys, tmp_path):
    path = write_rubric(tmp_path, "my_checks.py:broken")
    assert main(["score", str(path), "--prompt", "p", "--answer", "5", "--completion", "c"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "raised ZeroDivisionError" in err
