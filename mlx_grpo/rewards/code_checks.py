"""Reward checks for code: pull the Python out of a completion and run it against the sample's tests.

The tests run in `mlx_grpo.rewards.sandbox` (a separate, locked-down process); see its docstring
for what is and is not isolated. A dataset row for `python_tests` looks like
    {"prompt": "...", "tests": ["assert f(2) == 4", "assert f(0) == 0"], "entry_point": "f"}
where "entry_point" (the function the tests call) is optional and only guides code extraction.
"""

from __future__ import annotations

import functools
import re
import textwrap

from mlx_grpo.errors import UserInputError
from mlx_grpo.rewards.sandbox import run_python_tests

_FENCE = "```"
_PYTHON_TAGS = frozenset({"", "python", "python3", "py", "py3"})
_MIN_MEMORY_MB = 32  # below this the interpreter itself cannot start


def _compiles(code: str) -> bool:
    try:
        compile(code, "<completion>", "exec")
    except Exception:  # SyntaxError, ValueError (null bytes), RecursionError, MemoryError...
        return False
    return True


def _fenced_blocks(text: str) -> list[str]:
    """Contents of ``` fenced blocks tagged python/py (or untagged), in order.

    A line-by-line scan rather than a regex: linear on any input. An unclosed final fence (a
    completion cut off at max tokens) still yields its block.
    """
    blocks, current, tag = [], None, ""
    for line in text.split("\n"):
        stripped = line.strip()
        if current is None:
            if stripped.startswith(_FENCE):
                info = stripped[len(_FENCE):].strip().lower()
                tag = info.split()[0] if info else ""
                current = []
        elif stripped.startswith(_FENCE):
            blocks.append((tag, current))
            current = None
        else:
            current.append(line)
    if current is not None:
        blocks.append((tag, current))
    return [textwrap.dedent("\n".join(lines)) for tag, lines in blocks
            if tag in _PYTHON_TAGS and any(line.strip() for line in lines)]


def _defines(code: str, name: str) -> bool:
    pattern = rf"^[ \t]*(?:async[ \t]+def|def|class)[ \t]+{re.escape(name)}\b"
    return re.search(pattern, code, re.MULTILINE) is not None


def extract_code(completion: str, entry_point: str | None = None) -> str | None:
    """The Python code in a completion, or None if there is none.

    Fenced blocks (```python, ```py or bare ```) win over bare text. Among several blocks:
    the last one that defines `entry_point` (models often show a draft, then the fix), else the
    longest one that compiles (a solution is usually longer than its usage example), else the
    longest. Blocks tagged with another language (```bash, ```text) are ignored. With no usable
    fence, the whole completion if it compiles as Python. Never raises.
    """
    if not isinstance(completion, str) or not completion.strip():
        return None
    blocks = _fenced_blocks(completion)
    if blocks:
        if entry_point:
            defining = [b for b in blocks if _defines(b, entry_point)]
            if defining:
                compiling = [b for b in defining if _compiles(b)]
                return (compiling or defining)[-1]
        compiling = [b for b in blocks if _compiles(b)]
        pool = compiling or blocks
        return max(reversed(pool), key=len)  # reversed: ties go to the later block
    text = textwrap.dedent(completion).strip("\n")
    return text if _compiles(text) else None


@functools.lru_cache(maxsize=1024)
def _checked_tests(tests: tuple[str, ...]) -> tuple[str, ...]:
    for i, test in enumerate(tests):
        if not _compiles(test):
            shown = test if len(test) <= 60 else test[:60] + "..."
            raise UserInputError(f"python_tests: test {i} of a dataset row is not valid Python: {shown!r}")
    return tests


def _sample_tests(sample) -> tuple[str, ...]:
    tests = sample.get("tests") if isinstance(sample, dict) else None
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise UserInputError("python_tests needs each dataset row to have 'tests': a list of assert statements")
    return _checked_tests(tuple(tests))


def python_tests(
    completion: str,
    sample: dict,
    *,
    timeout_s: float = 5.0,
    memory_mb: float = 512,
    partial_credit: bool = True,
) -> float:
    """Fraction of `sample["tests"]` that pass when run after the completion's code.

    Each test is one statement (usually an assert) run in the code's namespace in a sandboxed
    process; it passes if it does not raise. partial_credit=False scores 1.0 only if all pass.
    No code in the completion, a syntax error, code that raises, a timeout or a memory blow-up
    all score 0. timeout_s is wall-clock seconds for the whole run, memory_mb its memory cap.
    """
    tests = _sample_tests(sample)
    if timeout_s <= 0:
        raise UserInputError(f"python_tests: timeout_s must be positive, got {timeout_s!r}")
    if memory_mb < _MIN_MEMORY_MB:
        raise UserInputError(f"python_tests: memory_mb must be at least {_MIN_MEMORY_MB}, got {memory_mb!r}")
    entry_point = sample.get("entry_point")
    code = extract_code(completion, entry_point if isinstance(entry_point, str) else None)
    if code is None:
        return 0.0
    result = run_python_tests(code, list(tests), timeout_s=timeout_s, memory_mb=memory_mb)
    if partial_credit:
        return result.passed / result.total
    return 1.0 if result.passed == result.total else 0.0
