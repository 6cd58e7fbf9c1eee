"""The built-in "largest" task, its rubric, and the short_answer check."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from mlx_grpo.data import load_dataset
from mlx_grpo.errors import UserInputError
from mlx_grpo.rewards import Scorer, load_rubric
from mlx_grpo.rewards.checks import short_answer
from mlx_grpo.tasks.largest import INSTRUCTION, largest_dataset

REPO = Path(__file__).resolve().parents[1]


def test_items_are_well_formed_and_labelled():
    for size in (3, 5):
        items = largest_dataset("train", 300, seed=1, list_size=size, max_value=40)
        assert len({x["question"] for x in items}) == 300
        for x in items:
            numbers = x["numbers"]
            assert len(numbers) == len(set(numbers)) == size
            assert all(1 <= n <= 40 for n in numbers)
            assert x["answer"] == str(max(numbers))
            assert x["question"] == f"Which number is the largest: {', '.join(map(str, numbers))}?"
            assert x["prompt"] == f"{x['question']}\n{INSTRUCTION}"
            assert x["difficulty"] == size and x["task"] == "largest"


def test_the_largest_is_equally_likely_in_every_position():
    items = largest_dataset("train", 3000, seed=0, list_size=3)
    positions = Counter(x["numbers"].index(max(x["numbers"])) for x in items)
    # 1000 expected each; 3 standard deviations are about 78.
    assert all(abs(positions[p] - 1000) < 100 for p in range(3)), positions


def test_deterministic_and_disjoint_splits():
    assert largest_dataset("test", 50, seed=3) == largest_dataset("test", 50, seed=3)
    assert largest_dataset("test", 50, seed=3) != largest_dataset("test", 50, seed=4)
    train = {x["question"] for s in (0, 1) for x in largest_dataset("train", 1000, seed=s)}
    test = {x["question"] for s in (0, 1) for x in largest_dataset("test", 200, seed=s)}
    assert not train & test


def test_load_dataset_passes_the_level_and_rejects_bad_ones():
    items = load_dataset("largest", split="test", seed=0, size=20, list_size=4, max_value=50)
    assert items == largest_dataset("test", 20, seed=0, list_size=4, max_value=50)
    with pytest.raises(UserInputError, match="task.max_ops is not an option of the largest task"):
        load_dataset("largest", split="test", seed=0, size=20, max_ops=2)  # another task's option
    with pytest.raises(UserInputError, match="list_size"):
        largest_dataset("train", 5, seed=0, list_size=10, max_value=5)
    with pytest.raises(UserInputError, match="could not make"):
        largest_dataset("train", 100, seed=0, list_size=2, max_value=3)  # only 6 orderings exist


@pytest.mark.parametrize("text, expected", [
    ("", 1.0), ("62", 1.0), ("The largest is 62.", 1.0), ("The largest number is 62.", 0.875),
    ("one two three four five six seven eight", 0.5), (" ".join(["w"] * 12), 0.0), (" ".join(["w"] * 40), 0.0),
    ("78, 78, 78", 0.0), ("62 is larger than 43", 0.0),
])
def test_short_answer(text, expected):
    assert short_answer(text, {}) == pytest.approx(expected)
    assert short_answer("a b c", {}, max_words=2) == pytest.approx(0.75)
    assert short_answer("62 and 43", {}, max_numbers=2) == 1.0


def test_default_rubric_scores_right_and_wrong_answers():
    rubric = load_rubric(REPO / "rubrics" / "largest.yaml")
    assert rubric.correct == "Answer"
    sample = {"prompt": "Which number is the largest: 62, 43, 23?", "answer": "62"}
    texts = ["62", "The largest number is 62.", "43", "62 is larger than 23",
             "62 " + " ".join(["so"] * 12), "62, 62, 62"]
    scorer = Scorer(rubric)
    try:
        scored = scorer.score([sample] * len(texts), texts, [list(range(len(texts)))])
    finally:
        scorer.close()
    # Right and short 1.0; a 5-word sentence loses a little Short credit; a wrong short answer
    # earns only the 0.1 of Short; the last number (23) is what counts, and more than one number
    # is not short; filler costs all of Short, and so does repeating the answer.
    assert list(scored.rewards) == pytest.approx([1.0, 0.9 + 0.1 * 0.875, 0.1, 0.0, 0.9, 0.9])


def test_number_check_first_number():
    from mlx_grpo.rewards.checks import number_check

    sample = {"answer": "98"}
    explained = "98 is larger than 37 and 5."
    assert number_check(explained, sample) == 0.0            # the last number, 5, is wrong
    assert number_check(explained, sample, first_number=True) == 0.5  # right, with half credit for no tags
    assert number_check(explained, sample, untagged_credit=1.0, first_number=True) == 1.0
    assert number_check("<answer>98, not 37</answer>", sample, first_number=True) == 1.0
    assert number_check("<answer>37 < 98</answer>", sample, first_number=True) == 0.0
    assert number_check("no numbers", sample, first_number=True) == 0.0


def test_instruction_replaces_each_tasks_own():
    text = "Say it in one sentence."
    for task in ("largest", "arithmetic", "coding"):
        own = load_dataset(task, split="test", seed=0, size=3)
        changed = load_dataset(task, split="test", seed=0, size=3, instruction=text)
        assert all(a["prompt"] != b["prompt"] and b["prompt"].endswith(text) for a, b in zip(own, changed))
        question = "question" if task != "coding" else "task"
        assert all(b["prompt"].startswith(a[question]) for a, b in zip(own, changed))


def test_rubric_correct_names_a_criterion(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\ncorrect: Answr\ncriteria:\n  - {name: Answer, weight: 1, check: number_check}\n")
    with pytest.raises(UserInputError, match=r"correct: 'Answr' is not a criterion \(did you mean 'Answer'\?\)"):
        load_rubric(path)
    path.write_text("name: r\ncriteria:\n  - {name: Answer, weight: 1, check: number_check}\n")
    assert load_rubric(path).correct == ""


def test_bias_correction_reaches_the_optimizer():
    import math

    import mlx.core as mx

    from mlx_grpo.config import load_config
    from mlx_grpo.policy import build_optimizer

    first_step = {}
    for flag in (False, True):
        cfg = load_config(None, {"optim.bias_correction": flag, "optim.warmup_steps": 0, "optim.learning_rate": 1e-3})
        optimizer = build_optimizer(cfg)
        params = optimizer.apply_gradients({"w": mx.array([0.5])}, {"w": mx.array([1.0])})
        first_step[flag] = 1.0 - params["w"].item()
    # Corrected, AdamW's first step is the learning rate (m/sqrt(v) = g/|g|). MLX's uncorrected one is
    # (1 - 0.9) / sqrt(1 - 0.999) = 3.16 times larger: the gap the README warns about.
    assert first_step[True] == pytest.approx(1e-3, rel=1e-3)
    assert first_step[False] == pytest.approx(1e-3 * 0.1 / math.sqrt(0.001), rel=1e-3)
