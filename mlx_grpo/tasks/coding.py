"""Built-in task "coding": Python functions checked by unit tests.

Hand-written tasks packaged in mlx_grpo/tasks/python_functions.jsonl: each row has "id",
"entry_point", "task", "tests" (assert lines) and a reference "solution".
"""

from __future__ import annotations

import json
import random
from importlib import resources

from mlx_grpo.errors import UserInputError
from mlx_grpo.tasks.split import split_of

# Appended to each coding task in the user turn, like FORMAT_INSTRUCTION for arithmetic.
CODE_INSTRUCTION = """\
Write the complete Python function in a single ```python fenced code block. \
Give the function a docstring and use only the Python standard library. \
Do not include example usage, print statements or tests."""

_CODING_FILE = "python_functions.jsonl"


def solution_level(solution: str) -> int:
    """A task's difficulty level from its reference solution's length: 1 (up to 4 lines), 2 (5-8), 3 (9+)."""
    lines = len(solution.strip().splitlines())
    return 1 if lines <= 4 else 2 if lines <= 8 else 3


def coding_dataset(split: str, size: int | None, seed: int, instruction: str = "") -> list[dict]:
    """The packaged Python-function tasks of the given split ("train" or "test"), shuffled by seed.

    The split is a hash of the task id (about 20% test), so train and test never share a task.
    The first `size` tasks of the shuffled split are returned; a size of None, or one larger than
    the split, returns the whole split (tasks are never repeated). Deterministic in (split, seed),
    and a longer dataset with the same seed starts with the same tasks.
    Items carry "prompt" (task + CODE_INSTRUCTION), "tests", "entry_point", "id", "task" and
    "solution" (the reference, for evaluation and debugging only; rewards do not need it) and
    "difficulty" (solution_level of the reference).
    """
    if split not in ("train", "test"):
        raise UserInputError(f"coding: unknown split {split!r}; expected 'train' or 'test'")
    if size is not None and size < 0:
        raise UserInputError("coding: size must be >= 0")
    text = resources.files("mlx_grpo.tasks").joinpath(_CODING_FILE).read_text(encoding="utf-8")
    items = []
    for line in text.splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if split_of(f"coding:{row['id']}", test_every=5) != split:
            continue
        items.append({
            "prompt": f"{row['task']}\n\n{instruction or CODE_INSTRUCTION}",
            "tests": list(row["tests"]),
            "entry_point": row["entry_point"],
            "id": row["id"],
            "task": row["task"],
            "solution": row["solution"],
            "difficulty": solution_level(row["solution"]),
        })
    random.Random(f"coding:{seed}").shuffle(items)
    return items if size is None else items[:size]
