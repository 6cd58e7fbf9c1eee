"""Datasets (built-in tasks and JSONL files), the prompt sampler, and prompt formatting.

A dataset is a list of dicts with at least a string "prompt". Every other field ("answer",
"tests", "system", anything else) is kept and handed to the reward functions.
"""

from __future__ import annotations

import json
import math
import random
from importlib import resources
from pathlib import Path
from typing import Any

from mlx_grpo.errors import UserInputError
from mlx_grpo.tasks.largest import largest_dataset
from mlx_grpo.tasks.split import split_of

# Appended to each problem in the user turn: a 135M model follows an instruction there far more
# often than in the system prompt (measured: about 10x more completions with the tags).
FORMAT_INSTRUCTION = """\
Solve the problem. First think step by step inside <reasoning> </reasoning>. \
Then write only the final number inside <answer> </answer>.
Example:
<reasoning>
Tom has 3 apples and buys 4 more: 3 + 4 = 7.
</reasoning>
<answer>
7
</answer>"""

# Appended to each coding task in the user turn, like FORMAT_INSTRUCTION for arithmetic.
CODE_INSTRUCTION = """\
Write the complete Python function in a single ```python fenced code block. \
Give the function a docstring and use only the Python standard library. \
Do not include example usage, print statements or tests."""

# ---------------------------------------------------------------------------------------------
# Built-in task: arithmetic word problems
#
# A problem is a start value and a list of (op, operand) steps applied left to right, so the
# story order is the evaluation order and there is no precedence to get wrong. The prompt is
# rendered from that structure; the item also carries it as "expression" for checking.

_PEOPLE = [
    ("Tom", "he", "his"), ("Anna", "she", "her"), ("Ravi", "he", "his"), ("Mei", "she", "her"),
    ("Lucas", "he", "his"), ("Sofia", "she", "her"), ("Omar", "he", "his"), ("Grace", "she", "her"),
    ("Kenji", "he", "his"), ("Leila", "she", "her"), ("Sam", "he", "his"), ("Nina", "she", "her"),
]
_OBJECTS = [
    "apples", "marbles", "stickers", "pencils", "books", "cookies", "coins", "shells",
    "cards", "oranges", "stamps", "balloons",
]
_START = [
    "{Name} has {x} {objx}.",
    "{Name} starts the day with {x} {objx}.",
    "There are {x} {objx} in {Name}'s bag.",
]
_STEP = {
    "+": [
        "{Sub} buys {x} more {objx}.",
        "A friend gives {Name} {x} more {objx}.",
        "{Sub} finds {x} more {objx}.",
    ],
    "-": [
        "{Sub} gives {x} {objx} to a friend.",
        "{Sub} loses {x} {objx}.",
        "{Sub} sells {x} {objx}.",
    ],
    "*": [
        "Then the number of {obj} {Name} has becomes {x} times as large.",
        "{Sub} trades them all and ends up with {x} times as many {obj} as before.",
    ],
}
# Multipliers 2 and 3 can also be said in words; tests map these words back to numbers.
_MULT_WORDS = {2: "{Sub} doubles {pos} {obj}.", 3: "{Sub} triples {pos} {obj}."}
_QUESTION = [
    "How many {obj} does {Name} have now?",
    "How many {obj} does {Name} have at the end?",
]

_MAX_MULT = 5


def _evaluate(start: int, steps: list[tuple[str, int]]) -> list[int]:
    """Running values after the start and after each step."""
    values = [start]
    for op, x in steps:
        v = values[-1]
        values.append(v + x if op == "+" else v - x if op == "-" else v * x)
    return values


def _expression(start: int, steps: list[tuple[str, int]]) -> str:
    expr = str(start)
    for i, (op, x) in enumerate(steps):
        expr = f"({expr} {op} {x})" if i < len(steps) - 1 else f"{expr} {op} {x}"
    return expr


def _render(rng: random.Random, start: int, steps: list[tuple[str, int]]) -> str:
    name, sub, pos = rng.choice(_PEOPLE)
    obj = rng.choice(_OBJECTS)
    fields = {"Name": name, "Sub": sub.capitalize(), "sub": sub, "pos": pos, "obj": obj}
    # Every object name is a regular plural: "1 apple", "2 apples".
    parts = [rng.choice(_START).format(x=start, objx=obj[:-1] if start == 1 else obj, **fields)]
    for op, x in steps:
        options = list(_STEP[op])
        if op == "*" and x in _MULT_WORDS:
            options.append(_MULT_WORDS[x])
        parts.append(rng.choice(options).format(x=x, objx=obj[:-1] if x == 1 else obj, **fields))
    parts.append(rng.choice(_QUESTION).format(**fields))
    return " ".join(parts).replace("There are 1 ", "There is 1 ")


def _make_problem(rng: random.Random, max_ops: int, max_operand: int, instruction: str = FORMAT_INSTRUCTION) -> dict:
    """One problem with non-negative intermediate values (resampled until it has them)."""
    k = rng.randint(1, max_ops)
    while True:
        start = rng.randint(1, max_operand)
        steps = []
        for _ in range(k):
            op = rng.choice("+-*")
            x = rng.randint(2, min(_MAX_MULT, max(2, max_operand))) if op == "*" else rng.randint(1, max_operand)
            steps.append((op, x))
        values = _evaluate(start, steps)
        # Giving away more than you have is not a sensible story: reject any negative step.
        if min(values) >= 0:
            break
    question = _render(rng, start, steps)
    return {
        "prompt": f"{question}\n\n{instruction}",
        "question": question,
        "answer": str(values[-1]),
        "task": "arithmetic",
        "num_ops": k,
        "difficulty": k,
        "expression": _expression(start, steps),
    }


def arithmetic_dataset(split: str, size: int, seed: int, max_ops: int = 3, max_operand: int = 20,
                       instruction: str = "") -> list[dict]:
    """`size` distinct arithmetic word problems of the given split ("train" or "test").

    Deterministic in (split, size, seed, max_ops, max_operand). Train and test never share a
    prompt text, whatever the seeds, because the split is a hash of the text (about 10% is test).
    """
    if split not in ("train", "test"):
        raise UserInputError(f"arithmetic: unknown split {split!r}; expected 'train' or 'test'")
    if max_ops < 1 or max_operand < 1 or size < 0:
        raise UserInputError("arithmetic: size must be >= 0, max_ops and max_operand >= 1")
    rng = random.Random(f"arithmetic:{seed}:{max_ops}:{max_operand}")
    items: list[dict] = []
    seen: set[str] = set()
    attempts = 0
    while len(items) < size:
        attempts += 1
        if attempts > 200 * size + 1000:
            raise UserInputError(
                f"arithmetic: could not make {size} distinct {split} problems; raise max_operand or max_ops"
            )
        item = _make_problem(rng, max_ops, max_operand, instruction or FORMAT_INSTRUCTION)
        if item["question"] in seen or split_of(item["question"]) != split:
            continue
        seen.add(item["question"])
        items.append(item)
    return items


# ---------------------------------------------------------------------------------------------
# Built-in task: Python functions with unit tests
#
# Hand-written tasks packaged in mlx_grpo/tasks/python_functions.jsonl: each row has "id",
# "entry_point", "task", "tests" (assert lines) and a reference "solution".

_CODING_FILE = "python_functions.jsonl"


def coding_dataset(split: str, size: int | None, seed: int, instruction: str = "") -> list[dict]:
    """The packaged Python-function tasks of the given split ("train" or "test"), shuffled by seed.

    The split is a hash of the task id (about 20% test), so train and test never share a task.
    The first `size` tasks of the shuffled split are returned; a size of None, or one larger than
    the split, returns the whole split (tasks are never repeated). Deterministic in (split, seed),
    and a longer dataset with the same seed starts with the same tasks.
    Items carry "prompt" (task + CODE_INSTRUCTION), "tests", "entry_point", "id", "task" and
    "solution" (the reference, for evaluation and debugging only; rewards do not need it).
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
        })
    random.Random(f"coding:{seed}").shuffle(items)
    return items if size is None else items[:size]


# ---------------------------------------------------------------------------------------------
# JSONL


def _check_row(row: Any) -> dict:
    """Validate and normalise one JSONL row; raises ValueError with what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    prompt = row.get("prompt")
    if prompt is None:
        raise ValueError("missing required field 'prompt'")
    if not isinstance(prompt, str):
        raise ValueError(f"'prompt' must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("'prompt' is empty")
    row = dict(row)
    for key in ("answer", "tests", "system"):
        if key in row and row[key] is None:
            del row[key]  # null means "not given"
    if "answer" in row:
        a = row["answer"]
        if isinstance(a, bool) or not isinstance(a, (str, int, float)):
            raise ValueError(f"'answer' must be a string or a number, got {type(a).__name__}")
        if isinstance(a, float):
            if not math.isfinite(a):
                raise ValueError("'answer' must be a finite number")
            # 12.0 -> "12", so exact-match rewards see the number the user meant.
            a = str(int(a)) if a.is_integer() else repr(a)
        row["answer"] = str(a)
    if "tests" in row:
        t = row["tests"]
        if isinstance(t, str):
            t = [t]
        if not isinstance(t, list) or not all(isinstance(x, str) for x in t):
            raise ValueError("'tests' must be a string or a list of strings")
        row["tests"] = t
    if "system" in row and not isinstance(row["system"], str):
        raise ValueError(f"'system' must be a string, got {type(row['system']).__name__}")
    return row


def load_jsonl(path: str | Path, on_bad_line: str = "error") -> tuple[list[dict], int]:
    """Rows of a JSONL dataset and the number of bad lines skipped.

    Each non-blank line is a JSON object with a string "prompt"; optional "answer" (string or
    number, stored as a string), "tests" (string or list of strings, stored as a list), "system"
    (string). Extra fields are kept. on_bad_line="error" raises UserInputError("path:LINE: ...")
    at the first bad line; "skip" drops bad lines and counts them.
    """
    if on_bad_line not in ("error", "skip"):
        raise UserInputError(f"on_bad_line must be 'error' or 'skip', got {on_bad_line!r}")
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: dataset file not found")
    rows: list[dict] = []
    skipped = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"not valid UTF-8 text (byte {e.start + 1} of the line)") from None
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"not valid JSON ({e.msg}, column {e.colno})") from None
                rows.append(_check_row(obj))
            except ValueError as e:
                if on_bad_line == "error":
                    raise UserInputError(f"{path}:{lineno}: {e}") from None
                skipped += 1
    if not rows:
        detail = f"{skipped} bad lines skipped" if skipped else "the file has no data lines"
        raise UserInputError(f"{path}: no usable rows ({detail})")
    return rows, skipped


# ---------------------------------------------------------------------------------------------
# Dataset entry point

# Built-in task name -> builder(split, size, seed, **task options). Every task takes `instruction`
# (the text after the question; "" = the task's own) and its own difficulty options (largest:
# list_size, max_value; arithmetic: max_ops, max_operand), and ignores the others' options.
BUILTIN_TASKS = {
    "largest": lambda split, size, seed, list_size=3, max_value=99, instruction="", **_: largest_dataset(
        split, size, seed, list_size=list_size, max_value=max_value, instruction=instruction),
    "arithmetic": lambda split, size, seed, max_ops=3, max_operand=20, instruction="", **_: arithmetic_dataset(
        split, size, seed, max_ops=max_ops, max_operand=max_operand, instruction=instruction),
    "coding": lambda split, size, seed, instruction="", **_: coding_dataset(split, size, seed, instruction),
}
_DEFAULT_SIZES = {"train": 2000, "test": 200}


def task_options(data_cfg) -> dict:
    """The built-in tasks' options (instruction and difficulty) from a config's data section."""
    return {"max_ops": data_cfg.max_ops, "max_operand": data_cfg.max_operand, "list_size": data_cfg.list_size,
            "max_value": data_cfg.max_value, "instruction": data_cfg.instruction}


def load_dataset(
    spec: str,
    split: str = "train",
    seed: int = 0,
    size: int | None = None,
    on_bad_line: str = "error",
    **options,
) -> list[dict]:
    """A built-in task by name ("largest", "arithmetic", "coding") or the rows of a .jsonl file.

    Built-in tasks have "train" and "test" splits; size defaults to 2000 / 200 (coding has 40
    tasks in all and returns its whole split when size exceeds it). `options` are the tasks'
    options: instruction, list_size and max_value for largest, max_ops and max_operand for arithmetic.
    A JSONL file is a single split: `split` is ignored and every row is returned (the first
    `size` rows when size is given); name a second file for held-out evaluation.
    """
    if spec in BUILTIN_TASKS:
        n = _DEFAULT_SIZES.get(split, 0) if size is None else size
        return BUILTIN_TASKS[spec](split, n, seed, **options)
    path = Path(spec).expanduser()
    if path.is_file():
        rows, _ = load_jsonl(path, on_bad_line=on_bad_line)
        return rows if size is None else rows[:size]
    raise UserInputError(
        f"dataset {spec!r}: not a built-in task ({', '.join(BUILTIN_TASKS)}) and no such file"
    )


# ---------------------------------------------------------------------------------------------
# Sampling prompts


class PromptSampler:
    """Batches of dataset items without replacement; reshuffled each epoch from (seed, epoch).

    The order is a pure function of (seed, epoch, len(items)), so state_dict() only needs the
    epoch and cursor for a resumed run to continue exactly where it stopped.
    """

    def __init__(self, items: list[dict], seed: int = 0):
        if not items:
            raise UserInputError("the dataset is empty")
        self.items = items
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(f"prompts:{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self, n: int) -> list[dict]:
        """The next n items; a batch that runs past the end continues in the next epoch."""
        batch = []
        while len(batch) < n:
            if self.cursor >= len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self._permutation(self.epoch)
            take = min(n - len(batch), len(self._order) - self.cursor)
            batch.extend(self.items[i] for i in self._order[self.cursor : self.cursor + take])
            self.cursor += take
        return batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "cursor": self.cursor, "num_items": len(self.items)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_items"] != len(self.items):
            raise UserInputError(
                f"resume: sampler state is for {state['num_items']} prompts, the dataset has {len(self.items)}"
            )
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.cursor = state["cursor"]
        self._order = self._permutation(self.epoch)


# ---------------------------------------------------------------------------------------------
# Prompt formatting


def _as_id_list(out: Any) -> list[int]:
    """Token ids from whatever apply_chat_template / encode returned (list, dict, BatchEncoding, array)."""
    if hasattr(out, "keys") and "input_ids" in out.keys():
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    out = list(out)
    if out and isinstance(out[0], (list, tuple)):  # a batch of one
        out = list(out[0])
    return [int(t) for t in out]


def build_prompt_tokens(tokenizer: Any, sample: dict, default_system: str | None) -> list[int]:
    """Prompt token ids: [system] + [user prompt] through the chat template, ready for generation.

    The sample's own "system" wins over default_system; no system message when both are empty.
    Without a chat template the text "system\\n\\nprompt\\n" is encoded directly.
    """
    system = sample.get("system") or default_system
    prompt = sample["prompt"]
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return _as_id_list(out)
    text = f"{system}\n\n{prompt}\n" if system else f"{prompt}\n"
    return _as_id_list(tokenizer.encode(text))
