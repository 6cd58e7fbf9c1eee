"""Built-in task: which number of a short list is the largest.

It is the demo task because a 135M model can *almost* do it: the base SmolLM2-135M-Instruct picks
the right number greedily about a third of the time but finds it within 8 samples most of the
time (docs/results.md), which is the gap GRPO closes. The answers are spread out and the largest
number is equally likely in every position, so neither a constant answer nor always copying one
position scores well: `task_baselines.py` and `uv run eval` report both hacks.

Difficulty is the length of the list (3, 4 or 5 numbers): each item carries it as "difficulty".
"""

from __future__ import annotations

import random

from mlx_grpo.errors import UserInputError
from mlx_grpo.tasks.split import split_of

INSTRUCTION = "Answer with just the number."
LEVELS = (3, 4, 5)


def make_item(rng: random.Random, list_size: int, max_value: int, instruction: str = INSTRUCTION) -> dict:
    """One question: `list_size` distinct numbers in 1..max_value, the largest at a uniform position."""
    numbers = rng.sample(range(1, max_value + 1), list_size)
    numbers.sort()
    largest = numbers.pop()
    rng.shuffle(numbers)
    numbers.insert(rng.randrange(list_size), largest)
    question = f"Which number is the largest: {', '.join(map(str, numbers))}?"
    return {
        "prompt": f"{question}\n{instruction}",
        "question": question,
        "answer": str(largest),
        "numbers": numbers,
        "task": "largest",
        "difficulty": list_size,
    }


def largest_dataset(split: str, size: int, seed: int, list_size: int = 3, max_value: int = 99,
                    instruction: str = "") -> list[dict]:
    """`size` distinct questions of the given split ("train" or "test"), each followed by
    `instruction` ("" = INSTRUCTION) in the prompt.

    Deterministic in (split, size, seed, list_size, max_value); train and test never share a
    question, whatever the seeds, because the split is a hash of the question text.
    """
    if split not in ("train", "test"):
        raise UserInputError(f"largest: unknown split {split!r}; expected 'train' or 'test'")
    if size < 0 or not 2 <= list_size <= max_value:
        raise UserInputError("largest: size must be >= 0 and 2 <= list_size <= max_value")
    rng = random.Random(f"largest:{seed}:{list_size}:{max_value}")
    items: list[dict] = []
    seen: set[str] = set()
    for _ in range(200 * size + 1000):
        if len(items) == size:
            return items
        item = make_item(rng, list_size, max_value, instruction or INSTRUCTION)
        if item["question"] in seen or split_of(item["question"]) != split:
            continue
        seen.add(item["question"])
        items.append(item)
    if len(items) < size:
        raise UserInputError(f"largest: could not make {size} distinct {split} questions; raise data.max_value")
    return items
