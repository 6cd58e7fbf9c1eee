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
                    instruction: str = "", min_list_size: int = 0) -> list[dict]:
    """`size` distinct questions of the given split ("train" or "test"), each followed by
    `instruction` ("" = INSTRUCTION) in the prompt. With 2 <= min_list_size < list_size, each
    question's list size is drawn uniformly from [min_list_size, list_size] (several levels).

    Deterministic in (split, size, seed, list_size, max_value); train and test never share a
    question, whatever the seeds, because the split is a hash of the question text.
    """
    if split not in ("train", "test"):
        raise UserInputError(f"largest: unknown split {split!r}; expected 'train' or 'test'")
    if size < 0 or not 2 <= list_size <= max_value:
        raise UserInputError("largest: size must be >= 0 and 2 <= list_size <= max_value")
    if min_list_size and not 2 <= min_list_size <= list_size:
        raise UserInputError("largest: min_list_size must be 0 or between 2 and list_size")
    mixed = bool(min_list_size) and min_list_size < list_size
    rng = random.Random(f"largest:{seed}:{min_list_size}-{list_size}:{max_value}" if mixed
                        else f"largest:{seed}:{list_size}:{max_value}")
    items: list[dict] = []
    seen: set[str] = set()
    for _ in range(200 * size + 1000):
        if len(items) == size:
            return items
        n = rng.randint(min_list_size, list_size) if mixed else list_size
        item = make_item(rng, n, max_value, instruction or INSTRUCTION)
        if item["question"] in seen or split_of(item["question"]) != split:
            continue
        seen.add(item["question"])
        items.append(item)
    if len(items) < size:
        raise UserInputError(f"largest: could not make {size} distinct {split} questions; raise data.max_value")
    return items
