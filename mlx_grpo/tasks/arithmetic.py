"""Built-in task "arithmetic": word problems of one to three operations, answered in tags.

A problem is a start value and a list of (op, operand) steps applied left to right, so the
story order is the evaluation order and there is no precedence to get wrong. The prompt is
rendered from that structure; the item also carries it as "expression" for checking.
"""

from __future__ import annotations

import random

from mlx_grpo.errors import UserInputError
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


def arithmetic_dataset(split: str, size: int, seed: int, max_ops: int = 1, max_operand: int = 20,
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
