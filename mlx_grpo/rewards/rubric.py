"""The rubric YAML: a named list of weighted criteria, each a programmatic check or a teacher judge.

    name: math
    correct: Answer            # optional; the criterion that decides "correct" (pass@k, accuracy)
    teacher: {...}             # optional; the LLM that scores `judge` criteria
    criteria:
      - name: Answer
        weight: 0.8
        check: number_check    # a name in CHECKS, or file.py:function / module:function (user_checks.py) ...
        params: {abs_tol: 0}   # ... with optional keyword arguments for it
      - name: Style
        weight: 0.2
        judge: "Clear, short reasoning. 10 = excellent, 0 = unreadable."   # ... or teacher text
        scale: [0, 10]         # the judge's score range, mapped to [0, 1]
    examples:                  # optional; completions with the scores YOU would give them, on each
      - prompt: "What is 2+3?" #   judge's scale: `rubric audit` measures how well the teacher agrees
        answer: 5
        completion: "<answer>5</answer> Two plus three is five."
        scores: {Style: 9}

`load_rubric` validates everything up front so a typo fails before training starts, with a
one-line `UserInputError` naming the file, the criterion and the field.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from mlx_grpo.errors import UserInputError
from mlx_grpo.rewards.checks import CHECKS
from mlx_grpo.rewards.interpolate import interpolate
from mlx_grpo.rewards.teacher_config import TeacherConfig, parse_teacher
from mlx_grpo.rewards.user_checks import call_user_check, dry_completion, is_user_check, load_user_check

TOP_KEYS = ("name", "criteria", "teacher", "correct", "examples")
EXAMPLE_KEYS = ("prompt", "answer", "completion", "scores")
CRITERION_KEYS = ("name", "weight", "check", "params", "judge", "scale")


@dataclass
class Criterion:
    name: str
    weight: float
    check: str | None = None  # a key of CHECKS, file.py:function or module:function; None for a judge criterion
    params: dict = field(default_factory=dict)  # keyword arguments for the check
    judge: str | None = None  # the teacher's instructions for this criterion
    scale: tuple[float, float] = (0.0, 10.0)  # the judge's score range, mapped to [0, 1]
    function: Callable | None = None  # a Python check of the user's own (check: file.py:function)
    source: str | None = None  # the file that function came from, watched for hot reload


@dataclass
class Rubric:
    name: str
    criteria: list[Criterion]
    path: str
    version: str  # short sha256 of the file's bytes, so logs say exactly which rubric scored
    teacher_config: TeacherConfig | None = None  # who scores the judge criteria
    correct: str = ""  # the criterion whose full score means a correct answer; "" = the total reward
    sources: tuple[str, ...] = ()  # the Python check files it uses, watched with it
    examples: tuple[dict, ...] = ()  # {prompt, answer?, completion, scores: {judge criterion: value}}

    @property
    def total_weight(self) -> float:
        return sum(c.weight for c in self.criteria)


def load_rubric(path: str | os.PathLike, sample: dict | None = None) -> Rubric:
    """Read, interpolate `${VAR}` / `${VAR:-default}` in string values, and validate a rubric.
    sample: a dataset sample for one dry call of each Python check, so a broken one fails here."""
    where = str(path)
    raw = _read(Path(path), where)
    data = _parse(raw, where)

    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise UserInputError(f"{where}: unknown top-level key {_names(unknown)}{_hint(unknown[0], TOP_KEYS)} "
                             f"(valid keys: {', '.join(TOP_KEYS)})")
    name = _expand(data.get("name", Path(path).stem), where, "name")
    if not isinstance(name, str) or not name.strip():
        raise UserInputError(f"{where}: name must be a non-empty string, got {name!r}")
    teacher = _expand(data.get("teacher"), where, "teacher")
    if teacher is not None and not isinstance(teacher, dict):
        raise UserInputError(f"{where}: teacher must be a mapping (model, base_url, ...), got {_kind(teacher)}")

    criteria = _criteria(data, where)
    judged = [(i, c) for i, c in enumerate(criteria) if c.judge is not None]
    if judged and teacher is None:
        i, c = judged[0]
        raise UserInputError(f"{where}: criteria[{i}] ({c.name}): judge needs a teacher: block "
                             "naming the LLM that scores it (model, base_url, api_key_env)")
    teacher_config = parse_teacher(teacher, f"{where}: teacher") if teacher is not None else None
    total = sum(c.weight for c in criteria)
    if not (total > 0 and math.isfinite(total)):
        raise UserInputError(f"{where}: criteria: the total weight must be a positive finite number, got {total}")

    correct = _expand(data.get("correct", ""), where, "correct")
    names = [c.name for c in criteria]
    if correct and correct not in names:
        raise UserInputError(f"{where}: correct: {correct!r} is not a criterion{_hint(str(correct), names)} "
                             f"(criteria: {', '.join(names)})")

    examples = _examples(_expand(data.get("examples"), where, "examples"), criteria, where)
    sources = tuple(dict.fromkeys(c.source for c in criteria if c.source))
    # The version covers the check files too: editing one is a new rubric.
    digest = hashlib.sha256(raw)
    for source in sources:
        digest.update(Path(source).read_bytes())
    rubric = Rubric(name=name.strip(), criteria=criteria, path=where, version=digest.hexdigest()[:12],
                    teacher_config=teacher_config, correct=correct or "", sources=sources, examples=examples)
    if sample is not None:
        dry_call_checks(rubric, sample)
    return rubric


def dry_call_checks(rubric: Rubric, sample: dict) -> None:
    """Call each Python check once on a dataset sample; a raise or a bad value is a one-line error."""
    for i, c in enumerate(rubric.criteria):
        if c.function is not None:
            call_user_check(c.function, dry_completion(sample), sample, c.params,
                            f"{rubric.path}: criteria[{i}] ({c.name}): check {c.check}: a dry call on a dataset sample")


def check_params(check: str) -> dict:
    """The params a check accepts, with their defaults (its keyword arguments after the first two)."""
    signature = inspect.signature(CHECKS[check])
    return {p.name: p.default for p in list(signature.parameters.values())[2:]}


def _read(path: Path, where: str) -> bytes:
    if not path.exists():
        raise UserInputError(f"{where}: rubric file not found")
    if not path.is_file():
        raise UserInputError(f"{where}: not a file")
    try:
        return path.read_bytes()
    except OSError as err:
        raise UserInputError(f"{where}: cannot read rubric: {err.strerror or err}") from None


def _parse(raw: bytes, where: str) -> dict:
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserInputError(f"{where}: not valid UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise UserInputError(f"{where}: invalid YAML{line}: {problem}") from None
    if data is None:
        raise UserInputError(f"{where}: the file is empty; a rubric needs name and criteria")
    if not isinstance(data, dict):
        raise UserInputError(f"{where}: the top level must be a mapping with name and criteria, got {_kind(data)}")
    return data


def _criteria(data: dict, where: str) -> list[Criterion]:
    if "criteria" not in data:
        raise UserInputError(f"{where}: criteria is missing; a rubric needs at least one criterion")
    items = data["criteria"]
    if not isinstance(items, list):
        raise UserInputError(f"{where}: criteria must be a list of criteria, got {_kind(items)}")
    if not items:
        raise UserInputError(f"{where}: criteria is empty; a rubric needs at least one criterion")
    criteria: list[Criterion] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        criterion = _criterion(item, f"{where}: criteria[{i}]", Path(where).parent)
        if criterion.name in seen:
            raise UserInputError(f"{where}: criteria[{i}] ({criterion.name}): name is already used by "
                                 f"criteria[{seen[criterion.name]}]; names must be unique")
        seen[criterion.name] = i
        criteria.append(criterion)
    return criteria


def _examples(items, criteria: list[Criterion], where: str) -> tuple[dict, ...]:
    """Hand-scored completions; each score is on its judge criterion's scale."""
    if items is None:
        return ()
    if not isinstance(items, list):
        raise UserInputError(f"{where}: examples must be a list of {{prompt, completion, scores}}, got {_kind(items)}")
    judges = {c.name: c for c in criteria if c.judge is not None}
    examples = []
    for i, item in enumerate(items):
        at = f"{where}: examples[{i}]"
        if not isinstance(item, dict):
            raise UserInputError(f"{at}: must be a mapping with prompt, completion and scores, got {_kind(item)}")
        unknown = [k for k in item if k not in EXAMPLE_KEYS]
        if unknown:
            raise UserInputError(f"{at}: unknown key {_names(unknown)}{_hint(unknown[0], EXAMPLE_KEYS)} "
                                 f"(valid keys: {', '.join(EXAMPLE_KEYS)})")
        for key in ("prompt", "completion"):
            if not isinstance(item.get(key), str):
                raise UserInputError(f"{at}.{key}: must be text, got {_kind(item.get(key))}")
        scores = item.get("scores") or {}
        if not isinstance(scores, dict):
            raise UserInputError(f"{at}.scores: must map judge criteria to your score, got {_kind(scores)}")
        for name, value in scores.items():
            if name not in judges:
                raise UserInputError(f"{at}.scores: {name!r} is not a judge criterion{_hint(str(name), judges)} "
                                     f"(judge criteria: {', '.join(judges) or 'none'})")
            low, high = judges[name].scale
            number = _number(value)
            if number is None or not low <= number <= high:
                raise UserInputError(f"{at}.scores.{name}: must be a number from {low:g} to {high:g} (the "
                                     f"criterion's scale), got {value!r}")
        example = {"prompt": item["prompt"], "completion": item["completion"],
                   "scores": {name: float(_number(v)) for name, v in scores.items()}}
        if item.get("answer") is not None:
            example["answer"] = item["answer"]
        examples.append(example)
    return tuple(examples)


def _criterion(item, at: str, rubric_dir: Path) -> Criterion:
    if not isinstance(item, dict):
        raise UserInputError(f"{at}: must be a mapping with name, weight and check or judge, got {_kind(item)}")
    name = _expand(item.get("name"), at, "name")
    if name is None:
        raise UserInputError(f"{at}: name is missing")
    if not isinstance(name, str) or not name.strip():
        raise UserInputError(f"{at}: name must be a non-empty string, got {name!r}")
    name = name.strip()
    at = f"{at} ({name})"
    unknown = [k for k in item if k not in CRITERION_KEYS]
    if unknown:
        raise UserInputError(f"{at}: unknown key {_names(unknown)}{_hint(unknown[0], CRITERION_KEYS)} "
                             f"(valid keys: {', '.join(CRITERION_KEYS)})")
    item = {key: _expand(value, at, key) for key, value in item.items()}

    weight = _weight(item.get("weight"), at)
    check, judge = item.get("check"), item.get("judge")
    if check is None and judge is None:
        raise UserInputError(f"{at}: check/judge: needs either check (a programmatic check) or judge "
                             "(instructions for the teacher)")
    if check is not None and judge is not None:
        raise UserInputError(f"{at}: check/judge: has both check and judge; a criterion is one or the other")
    if judge is not None:
        if "params" in item:
            raise UserInputError(f"{at}: params: only check criteria take params")
        if not isinstance(judge, str) or not judge.strip():
            raise UserInputError(f"{at}: judge must be non-empty text for the teacher, got {judge!r}")
        return Criterion(name=name, weight=weight, judge=judge.strip(), scale=_scale(item.get("scale"), at))
    if "scale" in item:
        raise UserInputError(f"{at}: scale: only judge criteria have a scale")
    if is_user_check(check):
        params = item.get("params") or {}
        if not isinstance(params, dict):
            raise UserInputError(f"{at}: params must be a mapping (key: value), got {_kind(params)}")
        function, source = load_user_check(check, rubric_dir, params, at)
        return Criterion(name=name, weight=weight, check=check.strip(), params=params, function=function,
                         source=str(source) if source else None)
    if not isinstance(check, str) or check not in CHECKS:
        raise UserInputError(f"{at}: check: unknown check {check!r}{_hint(str(check), CHECKS)} "
                             f"(valid: {', '.join(sorted(CHECKS))}, or file.py:function for one of your own)")
    return Criterion(name=name, weight=weight, check=check, params=_params(item.get("params"), check, at))


def _weight(weight, at: str) -> float:
    if weight is None:
        raise UserInputError(f"{at}: weight is missing; give a positive number")
    number = _number(weight)
    if number is None or not number > 0:
        raise UserInputError(f"{at}: weight must be a positive number, got {weight!r}")
    return float(number)


def _params(params, check: str, at: str) -> dict:
    if params is None:  # `params:` with nothing after it
        return {}
    if not isinstance(params, dict):
        raise UserInputError(f"{at}: params must be a mapping (key: value), got {_kind(params)}")
    accepted = check_params(check)
    checked = {}
    for key, value in params.items():
        if key not in accepted:
            valid = ", ".join(accepted) or "none"
            raise UserInputError(f"{at}: params.{key}: {check} does not accept {key!r}"
                                 f"{_hint(str(key), accepted)} (accepted: {valid})")
        default = accepted[key]
        # The default's type is the param's type; numeric params are non-negative amounts.
        if isinstance(default, bool) and not isinstance(value, bool):
            raise UserInputError(f"{at}: params.{key}: must be true or false, got {value!r}")
        if _is_number(default):
            number = _number(value)
            if number is None or number < 0:
                raise UserInputError(f"{at}: params.{key}: must be a non-negative number, got {value!r}")
            value = number
        checked[key] = value
    return checked


def _scale(scale, at: str) -> tuple[float, float]:
    if scale is None:
        return (0.0, 10.0)
    bounds = [_number(v) for v in scale] if isinstance(scale, list) and len(scale) == 2 else [None, None]
    if None in bounds or not bounds[0] < bounds[1]:
        raise UserInputError(f"{at}: scale must be [low, high] with low < high, got {scale!r}")
    return (float(bounds[0]), float(bounds[1]))


def _expand(value, at: str, key: str):
    try:
        return interpolate(value)
    except ValueError as err:
        raise UserInputError(f"{at}: {key}: {err}") from None


def _number(value) -> int | float | None:
    """A finite number, or None. Numeric text counts: PyYAML reads `1e-3` (no exponent sign) as
    text, and `${VAR}` interpolation always yields text."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not _is_number(value) or not math.isfinite(value):
        return None
    return value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value) -> str:
    names = {dict: "a mapping", list: "a list", str: "text", type(None): "nothing"}
    return names.get(type(value), type(value).__name__)


def _names(keys: list) -> str:
    return ", ".join(repr(k) for k in keys)


def _hint(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def describe_rubric(rubric: Rubric) -> str:
    """A short markdown summary: version, each criterion's share of the reward and how it is scored."""
    lines = [f"rubric {rubric.name} version {rubric.version}"]
    for c in rubric.criteria:
        how = f"check {c.check}" if c.check else f"judge ({c.scale[0]:g}-{c.scale[1]:g}): {c.judge}"
        lines.append(f"- {c.name}: weight {c.weight:g} ({c.weight / rubric.total_weight:.0%}), {how}")
    if rubric.teacher_config is not None:
        t = rubric.teacher_config
        guards = f", on_gaming {t.on_gaming}" + (f", audit every {t.audit_every} steps" if t.audit_every else "")
        lines.append(f"- teacher: {t.model} at {t.shown_url}, mode {t.mode}{guards}")
    if rubric.examples:
        lines.append(f"- examples: {len(rubric.examples)} hand-scored completions (for rubric audit)")
    return "\n".join(lines)


class RubricWatcher:
    """Notices edits to the rubric file between steps (hot reload).

    `poll()` returns (new rubric, None) after a valid edit, (None, warning) after an invalid one,
    which leaves the current rubric in force, and (None, None) when nothing changed.
    """

    def __init__(self, rubric: Rubric, sample: dict | None = None):
        self.rubric = rubric
        self.sample = sample  # a dataset sample for the dry call of Python checks
        self._stamp = self._file_stamp()

    def _file_stamp(self):
        stamps = []
        for path in (self.rubric.path, *self.rubric.sources):
            try:
                stat = os.stat(path)
            except OSError:
                stamps.append(None)
                continue
            stamps.append((stat.st_mtime_ns, stat.st_size))
        return stamps

    def poll(self) -> tuple[Rubric | None, str | None]:
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return None, None
        self._stamp = stamp
        try:
            new = load_rubric(self.rubric.path, self.sample)
        except UserInputError as err:
            return None, f"rubric edit ignored, still using version {self.rubric.version}: {err}"
        if new.version == self.rubric.version:
            return None, None
        self.rubric = new
        self._stamp = self._file_stamp()  # the new rubric may use other check files
        return new, None
