"""The built-in "coding" task: packaged Python-function tasks, their tests and the train/test split."""

import ast
import json
from importlib import resources

import pytest

from mlx_grpo.data import load_dataset
from mlx_grpo.tasks.coding import CODE_INSTRUCTION, coding_dataset
from mlx_grpo.errors import UserInputError


def _rows() -> list[dict]:
    text = resources.files("mlx_grpo.tasks").joinpath("python_functions.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


ROWS = _rows()


def _passes(source: str, test: str) -> bool:
    """Whether `test` passes against `source`, both run in a fresh namespace (trusted code only)."""
    namespace: dict = {}
    try:
        exec(source, namespace)
        exec(test, namespace)
    except Exception:  # AssertionError, or a wrong stub crashing on its result
        return False
    return True


# ---------------------------------------------------------------------------------------------
# The packaged file


def test_forty_tasks_with_unique_ids():
    assert len(ROWS) == 40
    ids = [r["id"] for r in ROWS]
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r["id"])
def test_fields_are_well_formed(row):
    assert set(row) == {"id", "entry_point", "task", "tests", "solution"}
    assert all(isinstance(row[k], str) and row[k].strip() for k in ("id", "entry_point", "task", "solution"))
    assert row["entry_point"].isidentifier()
    assert f"`{row['entry_point']}(" in row["task"]  # the task names the signature
    assert 4 <= len(row["tests"]) <= 6
    assert len(set(row["tests"])) == len(row["tests"])
    for test in row["tests"]:
        assert "\n" not in test and test.startswith("assert ")
        compile(test, "<test>", "exec")
        assert row["entry_point"] in test
    # The solution defines the entry point, with a docstring, and imports nothing outside stdlib.
    tree = ast.parse(row["solution"])
    funcs = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert row["entry_point"] in funcs
    assert ast.get_docstring(funcs[row["entry_point"]])
    assert not any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree))


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r["id"])
def test_reference_solution_passes_every_test(row):
    for test in row["tests"]:
        assert _passes(row["solution"], test), f"{row['id']}: reference fails {test}"


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r["id"])
def test_wrong_solutions_fail_some_test(row):
    name = row["entry_point"]
    stubs = [
        f"def {name}(*a, **k):\n    return None\n",
        f"def {name}(x=None, *a, **k):\n    return x\n",  # echoes its first argument
    ]
    for stub in stubs:
        assert not all(_passes(stub, test) for test in row["tests"]), f"{row['id']}: stub passes\n{stub}"


# ---------------------------------------------------------------------------------------------
# load_dataset("coding", ...)


def test_splits_are_disjoint_and_cover_every_task():
    train = load_dataset("coding", split="train")  # default size 2000: the whole split
    test = load_dataset("coding", split="test")
    train_ids = [x["id"] for x in train]
    test_ids = [x["id"] for x in test]
    assert len(set(train_ids)) == len(train_ids) and len(set(test_ids)) == len(test_ids)
    assert not set(train_ids) & set(test_ids)
    assert set(train_ids) | set(test_ids) == {r["id"] for r in ROWS}
    assert 25 <= len(train) <= 35 and 5 <= len(test) <= 15


def test_split_does_not_depend_on_seed_and_order_does():
    for split in ("train", "test"):
        a = load_dataset("coding", split=split, seed=1)
        assert a == load_dataset("coding", split=split, seed=1)
        assert {x["id"] for x in a} == {x["id"] for x in load_dataset("coding", split=split, seed=2)}
    assert [x["id"] for x in load_dataset("coding", seed=1)] != [x["id"] for x in load_dataset("coding", seed=2)]


def test_size_takes_a_prefix_and_never_repeats():
    full = coding_dataset("train", None, seed=3)
    assert coding_dataset("train", 5, seed=3) == full[:5]
    assert load_dataset("coding", split="train", seed=3, size=5) == full[:5]
    assert coding_dataset("train", 10_000, seed=3) == full
    assert coding_dataset("train", 0, seed=3) == []


def test_items_carry_prompt_tests_and_solution():
    by_id = {r["id"]: r for r in ROWS}
    for split in ("train", "test"):
        for x in load_dataset("coding", split=split):
            row = by_id[x["id"]]
            assert x["prompt"] == f"{row['task']}\n\n{CODE_INSTRUCTION}"
            assert CODE_INSTRUCTION in x["prompt"] and x["entry_point"] in x["prompt"]
            assert x["tests"] == row["tests"] and x["entry_point"] == row["entry_point"]
            assert x["task"] == row["task"] and x["solution"] == row["solution"]


def test_code_instruction_asks_for_one_fenced_function():
    assert "```python" in CODE_INSTRUCTION
    assert "docstring" in CODE_INSTRUCTION and "standard library" in CODE_INSTRUCTION


def test_bad_split_and_size():
    with pytest.raises(UserInputError):
        load_dataset("coding", split="validation")
    with pytest.raises(UserInputError):
        coding_dataset("train", -1, seed=0)
