"""The built-in tasks and their options (the config's `task:` section).

Each task is a builder `f(split, size, seed, **options)`; its keyword arguments, with their
defaults, are the options it takes. The package also holds their data files (python_functions.jsonl
for "coding").
"""

from __future__ import annotations

import inspect

from mlx_grpo.errors import UserInputError
from mlx_grpo.tasks.arithmetic import arithmetic_dataset
from mlx_grpo.tasks.coding import coding_dataset
from mlx_grpo.tasks.largest import largest_dataset

BUILTIN_TASKS = {"largest": largest_dataset, "arithmetic": arithmetic_dataset, "coding": coding_dataset}


def task_option_defaults(task: str) -> dict:
    """The options a built-in task takes, with their defaults ({} for a dataset file)."""
    if task not in BUILTIN_TASKS:
        return {}
    params = list(inspect.signature(BUILTIN_TASKS[task]).parameters.values())[3:]  # after split, size, seed
    return {p.name: p.default for p in params}


def check_task_options(task: str, options: dict) -> None:
    """Each option must be one the task takes, of its default's type; the builder checks the ranges."""
    defaults = task_option_defaults(task)
    for name, value in options.items():
        if task not in BUILTIN_TASKS:
            raise UserInputError(f"config: task.{name}: task options apply to the built-in tasks "
                                 f"({', '.join(BUILTIN_TASKS)}); data.dataset is {task!r}")
        if name not in defaults:
            raise UserInputError(f"config: task.{name} is not an option of the {task} task "
                                 f"(its options: {', '.join(defaults)})")
        kind = type(defaults[name])
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserInputError(f"config: task.{name} must be {'a whole number' if kind is int else 'text'}, "
                                 f"got {value!r}")
