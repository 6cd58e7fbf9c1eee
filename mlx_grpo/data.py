"""Datasets (built-in tasks and JSONL files), the prompt sampler, and prompt formatting.

A dataset is a list of dicts with at least a string "prompt". Every other field ("answer",
"tests", "system", anything else) is kept and handed to the reward functions.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

from mlx_grpo.errors import UserInputError
from mlx_grpo.tasks import BUILTIN_TASKS, check_task_options

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
    if "difficulty" in row and row["difficulty"] is not None:
        d = row["difficulty"]
        if isinstance(d, float) and d.is_integer():
            d = int(d)
        if isinstance(d, bool) or not isinstance(d, (int, str)) or isinstance(d, str) and not d.strip():
            raise ValueError(f"'difficulty' must be an integer or a non-empty string, got {d!r}")
        row["difficulty"] = d
    if "system" in row and not isinstance(row["system"], str):
        raise ValueError(f"'system' must be a string, got {type(row['system']).__name__}")
    return row


def load_jsonl(path: str | Path, on_bad_line: str = "error") -> tuple[list[dict], int]:
    """Rows of a JSONL dataset and the number of bad lines skipped.

    Each non-blank line is a JSON object with a string "prompt"; optional "answer" (string or
    number, stored as a string), "tests" (string or list of strings, stored as a list), "system"
    (string), "difficulty" (an integer or a name: its level, for difficulty/* and data.curriculum).
    Extra fields are kept. on_bad_line="error" raises UserInputError("path:LINE: ...")
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

_DEFAULT_SIZES = {"train": 2000, "test": 200}


def load_dataset(
    spec: str,
    split: str = "train",
    seed: int = 0,
    size: int | None = None,
    **options,
) -> list[dict]:
    """A built-in task by name ("largest", "arithmetic", "coding") or the rows of a .jsonl file.

    Built-in tasks have "train" and "test" splits; size defaults to 2000 / 200 (coding has 40
    tasks in all and returns its whole split when size exceeds it). `options` are the task's own
    (the config's `task:` section; tasks/__init__.py).
    A JSONL file is a single split: `split` is ignored and every row is returned (the first
    `size` rows when size is given); name a second file for held-out evaluation.
    """
    check_task_options(spec, options)
    if spec in BUILTIN_TASKS:
        n = _DEFAULT_SIZES.get(split, 0) if size is None else size
        return BUILTIN_TASKS[spec](split, n, seed, **options)
    path = Path(spec).expanduser()
    if path.is_file():
        rows, _ = load_jsonl(path)  # a malformed line is an error naming it
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
    """
    return chat_prompt_tokens(tokenizer, sample.get("system") or default_system,
                              [{"role": "user", "content": sample["prompt"]}])


def chat_prompt_tokens(tokenizer: Any, system: str | None, messages: list[dict]) -> list[int]:
    """A conversation's token ids through the chat template, ending where the assistant's turn starts.
    Without a chat template the text "system\n\nturn\nturn\n" is encoded directly."""
    if getattr(tokenizer, "chat_template", None):
        full = ([{"role": "system", "content": system}] if system else []) + messages
        return _as_id_list(tokenizer.apply_chat_template(full, add_generation_prompt=True, tokenize=True))
    turns = "".join(f"{m['content']}\n" for m in messages)
    return _as_id_list(tokenizer.encode(f"{system}\n\n{turns}" if system else turns))
