"""Reward checks of the user's own, in Python: a rubric criterion with `check: file.py:function`.

    - name: Cites
      weight: 0.2
      check: my_checks.py:has_citation   # a file next to the rubric, or any importable module:function
      params: {min_sources: 2}

The function is `fn(completion, sample, **params)` and returns a number in [0, 1], or None to mask
the completion (it then gets no advantage, as when the teacher fails). An `async def` is awaited
on the scorer's event loop, concurrently with the teacher's requests.

It runs in the trainer's own process, with the trainer's rights: unlike `python_tests`, which runs
the *generated* code in a sandbox, this is the user's code and it is trusted.

Everything is checked when the rubric loads (the file, the function, the params against its
signature) and, given a dataset sample, by one dry call, so a mistake fails in one line before a
model is loaded, and a broken edit of the file during training is refused like a broken rubric edit.
"""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import math
from pathlib import Path
from typing import Callable

from mlx_grpo.errors import UserInputError


def is_user_check(spec) -> bool:
    """`file.py:function` or `module:function`, as opposed to a built-in check's name."""
    return isinstance(spec, str) and ":" in spec


def load_user_check(spec: str, rubric_dir: Path, params: dict, at: str) -> tuple[Callable, Path | None]:
    """(the function, the file it came from or None for an imported module), validated against params."""
    target, _, name = spec.strip().rpartition(":")
    if not target or not name.isidentifier():
        raise UserInputError(f"{at}: check: {spec!r} must be file.py:function or module:function")
    source = None
    if target.endswith(".py"):
        source = Path(target) if Path(target).is_absolute() else rubric_dir / target
        module = _import_file(source, at)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as err:  # noqa: BLE001 - whatever the user's module raises, say it in one line
            raise UserInputError(f"{at}: check: cannot import module {target!r}: {_said(err)}") from None
    fn = getattr(module, name, None)
    if fn is None:
        functions = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        close = difflib.get_close_matches(name, functions, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserInputError(f"{at}: check: {target} has no function {name!r}{hint}")
    if not callable(fn):
        raise UserInputError(f"{at}: check: {spec} is not a function")
    try:
        inspect.signature(fn).bind("", {}, **params)
    except TypeError as err:
        shown = ", ".join(["completion", "sample", *params])
        raise UserInputError(f"{at}: check: {spec} cannot be called as {name}({shown}): {err}") from None
    except ValueError:  # a builtin without a signature: the dry call will tell
        pass
    return fn, source


def _import_file(path: Path, at: str):
    if not path.is_file():
        raise UserInputError(f"{at}: check: {path} not found")
    source = path.read_bytes()
    # A fresh module per content, so a hot reload runs the edited code and not a cached import.
    module_name = "mlx_grpo_user_check_" + hashlib.sha256(str(path).encode() + source).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - a syntax error or a failing import in the user's file
        raise UserInputError(f"{at}: check: importing {path} failed: {_said(err)}") from None
    return module


def checked_value(value, where: str) -> float | None:
    """The check's value as a float in [0, 1], or None (masked); anything else is a one-line error:
    a user's score outside the range is a bug to fix, not something to clip silently."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= 1.0:
        raise UserInputError(f"{where} returned {value!r}; a check returns a number in [0, 1], or None to mask")
    return float(value)


def call_user_check(fn: Callable, completion: str, sample: dict, params: dict, where: str) -> float | None:
    """One synchronous call (an async function runs to completion on its own loop)."""
    try:
        value = fn(completion, sample, **params)
        if inspect.isawaitable(value):
            value = asyncio.run(_awaited(value))
    except UserInputError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's code: report it in one line
        raise UserInputError(f"{where} raised {_said(err)}") from None
    return checked_value(value, where)


async def call_user_check_async(fn: Callable, completion: str, sample: dict, params: dict,
                                where: str) -> float | None:
    """One call of an async check on the running loop."""
    try:
        value = await fn(completion, sample, **params)
    except Exception as err:  # noqa: BLE001
        raise UserInputError(f"{where} raised {_said(err)}") from None
    return checked_value(value, where)


async def _awaited(value):
    return await value


def dry_completion(sample: dict) -> str:
    """A well-formed completion for the dry call, holding the sample's answer when it has one."""
    return f"<reasoning>\n</reasoning>\n<answer>\n{sample.get('answer', '')}\n</answer>"


def _said(err: Exception) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
