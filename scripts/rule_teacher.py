"""A stand-in LLM judge: an OpenAI-compatible chat server that scores by fixed rules.

It answers the trainer's teacher requests (mlx_grpo/rewards/judge.py, group or single mode) with
scores from deterministic rules instead of a language model, so a teacher-scored run can be made,
and reproduced, on a machine where no LLM judge fits. Each `judge:` criterion of the rubric is
mapped by name to a rule:

    uv run python scripts/rule_teacher.py --port 8765 \\
        --rule Documentation=docstring_args --rule CodeQuality=no_print --rule Efficiency=concise

and the rubric's teacher block points at it (no key is needed):

    teacher: {model: rule-teacher, base_url: http://127.0.0.1:8765/v1}

A rule scores a completion s in [0, 1]; the reply gives LOW + s * (HIGH - LOW) on the criterion's
scale as the request states it, with a one-sentence justification. `--help` lists the rules.
It listens on 127.0.0.1 only, and can be imported: `make_server(...)` returns the server.

Log-prob scoring (`scoring: logprobs`, judge.logprob_messages: one answer, one '## Criterion' after
it, `logprobs: true`) is answered with one score token whose top log-probs are a distribution with
expectation x = LOW + s * (HIGH - LOW): mass ceil(x) - x on the digit floor(x), the rest on ceil(x)
(p(yes) = s for a yes/no criterion). Each token's probability is split 60/40 between "7" and "Ġ7",
the list is unsorted, and it holds at most `top_logprobs` entries (--max-top-logprobs caps what is
accepted, as mlx_lm.server does at 11). `--noise SIGMA` makes that distribution noisy, reproducibly,
as a real judge's is; `--ignore-response-format` wraps every JSON reply in prose, as mlx_lm.server
with a small model does, so the trainer's preflight has to find that out.

`--gullible` makes it a bad judge on purpose, to show what `rubric audit` catches: it obeys an
answer that addresses the grader (full score on every criterion), and in group mode it favours
the answers shown first (half the score comes from the position, falling from the first to the last).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import random
import re
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

DEFAULT_CONCISE_WORDS = 12
DEFAULT_MODEL_NAME = "rule-teacher"
DEFAULT_MAX_TOP_LOGPROBS = 20


# -- rules: pure functions of (completion, task) -> score in [0, 1] ---------------------------------


class Score(float):
    """A rule's score in [0, 1] (a plain float to compare and compute with) carrying `why`, the
    one-line justification sent back with it."""

    why: str

    def __new__(cls, value: float, why: str) -> "Score":
        score = super().__new__(cls, min(1.0, max(0.0, float(value))))
        score.why = why
        return score


def _code(completion: str) -> str | None:
    # Imported here, not at the top: `--help` and argument errors then answer without loading
    # the mlx_grpo package (which imports openai, ~2 s).
    from mlx_grpo.rewards.code_checks import extract_code

    return extract_code(completion)


def _parse(completion: str) -> tuple[ast.Module | None, str]:
    """The completion's code as an AST, or (None, why not)."""
    code = _code(completion)
    if code is None:
        return None, "no Python code found"
    try:
        return ast.parse(code), ""
    except Exception:  # SyntaxError, ValueError (null bytes), RecursionError...
        return None, "the code does not parse"


def _first_function(tree: ast.Module) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return min(functions, key=lambda f: (f.lineno, f.col_offset)) if functions else None


def _docstring(function) -> str | None:
    doc = ast.get_docstring(function)
    return doc if doc and doc.strip() else None


def _parameters(function) -> list[str]:
    args = function.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    return [name for name in names if name not in ("self", "cls")]


def _documented_function(completion: str):
    """(the first function, its docstring), or a zero Score saying which of them is missing."""
    tree, problem = _parse(completion)
    if tree is None:
        return Score(0, problem)
    function = _first_function(tree)
    if function is None:
        return Score(0, "no function defined")
    doc = _docstring(function)
    if doc is None:
        return Score(0, f"{function.name} has no docstring")
    return function, doc


def docstring_args(completion: str, task: str = "") -> Score:
    found = _documented_function(completion)
    if isinstance(found, Score):
        return found
    function, doc = found
    params = _parameters(function)
    if not params:
        return Score(1, f"{function.name} takes no parameters and has a docstring")
    words = {w.lower() for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", doc)}
    named = [p for p in params if p.lower() in words]
    missing = [p for p in params if p not in named]
    why = f"the docstring of {function.name} names {len(named)} of {len(params)} parameters"
    return Score(len(named) / len(params), why + (f" (not {', '.join(missing)})" if missing else ""))


def has_docstring(completion: str, task: str = "") -> Score:
    found = _documented_function(completion)
    if isinstance(found, Score):
        return found
    return Score(1, f"{found[0].name} has a docstring")


def _is_print(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    return ((isinstance(func, ast.Name) and func.id == "print")
            or (isinstance(func, ast.Attribute) and func.attr == "print"
                and isinstance(func.value, ast.Name) and func.value.id == "builtins"))


def no_print(completion: str, task: str = "") -> Score:
    tree, problem = _parse(completion)
    if tree is None:
        return Score(0, problem)
    calls = [node for node in ast.walk(tree) if _is_print(node)]
    if calls:
        return Score(0, f"calls print() on line {min(c.lineno for c in calls)}")
    return Score(1, "no print() call")


def concise(completion: str, task: str = "", words: int = DEFAULT_CONCISE_WORDS) -> Score:
    n = len(completion.split())
    value = 1.0 if n <= words else max(0.0, 1.0 - (n - words) / (2 * words))
    return Score(value, f"{n} words (full score up to {words}, none from {3 * words})")


_NUMBER_RE = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w]|\.\d)")
_LIST_RE = re.compile(r":\s*(-?\d+(?:\.\d+)?(?:\s*,\s*-?\d+(?:\.\d+)?)+)")
_COMPARISON_RE = re.compile(r"\b(?:greater|larger|bigger|more\s+than|largest|biggest|highest)\b|>", re.IGNORECASE)
_TAG_RE = re.compile(r"</?[A-Za-z][\w-]*\s*/?>")


def task_numbers(task: str) -> list[float]:
    """The task's list of numbers: the comma-separated list after a colon ("...largest: 12, 45, 7?"),
    else every number in the task."""
    found = _LIST_RE.findall(task)
    text = found[-1] if found else task
    return [float(x) for x in _NUMBER_RE.findall(text)]


def explains_comparison(completion: str, task: str = "") -> Score:
    numbers = task_numbers(task)
    if not numbers:
        return Score(0, "the task lists no numbers")
    mentioned = {float(x) for x in _NUMBER_RE.findall(completion)}
    missing = [x for x in dict.fromkeys(numbers) if x not in mentioned]
    if missing:
        return Score(0, f"does not mention {', '.join(f'{x:g}' for x in missing)}")
    # A ">" closing a tag such as <answer> is no comparison.
    if _COMPARISON_RE.search(_TAG_RE.sub(" ", completion)):
        return Score(1, "mentions every number and compares them")
    return Score(0.5, "mentions every number but uses no comparison word")


# -- true_comparison: the answer's claims about the task's numbers must be true ----------------------

_NUM = r"(?<![\w.])-?\d+(?:\.\d+)?(?!\w|\.\d)"
_SEP = r"\s*,\s*(?:and\s+|or\s+)?|\s+and\s+|\s+or\s+"
_VERB = r"(?:is|are|was|were|>|<)\b"
# A list of numbers, e.g. "50, 90 and 25"; as the object of a comparison it stops before a number
# that starts a claim of its own ("... than 50, and 25 is smaller ..."). At most 32 numbers: a bound
# keeps the search linear in the answer's length (a longer list is read as several).
_LIST = rf"{_NUM}(?:(?:{_SEP}){_NUM}){{0,31}}"
_OBJECT_LIST = rf"{_NUM}(?:(?:{_SEP}){_NUM}(?!\s*{_VERB})){{0,31}}"
_BIGGER = "larger|greater|bigger|more|higher"
_SMALLER = "smaller|less|lower"
_LARGEST = r"largest|biggest|greatest|highest|maximum|max"
_WORD_CLAIM_RE = re.compile(
    rf"(?:(?P<subject>{_LIST})\s*,?\s*(?:(?:which|that|it)\s+)?(?:(?:is|are|was|were)\s+)?)?"
    rf"(?:(?:much|far|strictly|a\s+lot|both|all)\s+)?(?P<op>{_BIGGER}|{_SMALLER})\s+than\s+"
    rf"(?:(?:both|either|all|each|any)\s+(?:of\s+)?)?(?P<object>{_OBJECT_LIST})", re.IGNORECASE)
_CHAIN_RE = re.compile(rf"{_NUM}(?:\s*[<>]\s*{_NUM})+")
_CHAIN_STEP_RE = re.compile(rf"({_NUM})\s*([<>])\s*(?=({_NUM}))")
_IS_LARGEST_RE = re.compile(rf"({_NUM})\s*,?\s*(?:(?:which|that|it)\s+)?(?:is|was)\s+(?:the\s+)?(?:{_LARGEST})\b",
                            re.IGNORECASE)
_LARGEST_IS_RE = re.compile(rf"\b(?:{_LARGEST})(?:\s+(?:number|value|one))?(?:\s+(?:among|of|in|from)\b.*?)?"
                            rf"\s*(?:\bis\b|\bwas\b|=|:)\s*({_NUM})", re.IGNORECASE)
_CLAUSE_RE = re.compile(r"[;!?\n]|\.(?!\d)")
_NEGATED_RE = re.compile(r"(?:\bnot|n't|\bno)\s*$", re.IGNORECASE)  # on the few characters before the comparison


def _numbers_in(text: str) -> list[float]:
    return [float(x) for x in re.findall(_NUM, text)]


def comparison_claims(answer: str) -> tuple[list[tuple[float, float]], list[float]]:
    """What an answer claims, clause by clause (split on . ; ! ? and newlines, not on decimal points):
    ([(bigger, smaller), ...] from "X is larger than Y[, Z and W]", "Y is smaller than X", "X > Y > Z",
    "X < Y"; [X, ...] from "X is the largest" and "the largest (number) is X"). A comparison without its
    own subject ("90 is the largest, greater than 50", "90, as it is larger than 50") is about the
    clause's previous subject, else its first number outside a restated list; a negated one ("is not
    larger than") claims nothing."""
    pairs: list[tuple[float, float]] = []
    largest: list[float] = []
    for clause in _CLAUSE_RE.split(_TAG_RE.sub(" ", answer)):
        subject: list[float] = []
        first = _first_unlisted(clause)
        for match in _WORD_CLAIM_RE.finditer(clause):
            start = match.start("op")
            if _NEGATED_RE.search(clause[max(0, start - 8):start]):
                continue
            if match.group("subject"):
                subject = _numbers_in(match.group("subject"))
            elif not subject and first is not None and first[0] <= start:
                subject = [first[1]]
            objects = _numbers_in(match.group("object"))
            bigger = match.group("op").lower() in _BIGGER.split("|")
            pairs += [(s, o) if bigger else (o, s) for s in subject for o in objects]
        for chain in _CHAIN_RE.finditer(clause):
            for left, op, right in _CHAIN_STEP_RE.findall(chain.group()):
                pairs.append((float(left), float(right)) if op == ">" else (float(right), float(left)))
        largest += [float(x) for x in _IS_LARGEST_RE.findall(clause) + _LARGEST_IS_RE.findall(clause)]
    return pairs, largest


def _first_unlisted(text: str) -> tuple[int, float] | None:
    """(where it ends, value) of the first number of `text` that is not part of a restated list
    ("Among 50, 90 and 25, ..."), or None."""
    for match in re.finditer(_LIST, text):
        if re.fullmatch(_NUM, match.group()):
            return match.end(), float(match.group())
    return None


def true_comparison(completion: str, task: str = "") -> Score:
    numbers = task_numbers(task)
    if not numbers:
        return Score(0, "the task lists no numbers")
    top = max(numbers)
    others = sorted({x for x in numbers if x != top}, reverse=True)
    pairs, largest = comparison_claims(completion)
    false = [(a, b) for a, b in pairs if not a > b]
    if false:
        return Score(0, f"claims {false[0][0]:g} > {false[0][1]:g}, which is false")
    first = _first_unlisted(_TAG_RE.sub(" ", completion))  # the answer it gives
    for named in ([first[1]] if first is not None else []) + largest:
        if named != top:
            return Score(0, f"names {named:g} as the largest, but the largest is {top:g}")
    if not pairs:
        return Score(0, "makes no comparison such as 'X is larger than Y'")
    if not others:
        return Score(0, f"the list has no number below its largest, {top:g}, to compare with")
    below, todo = set(), [top]  # what the claims, chained, show to be below the largest
    while todo:
        bigger = todo.pop()
        for a, b in pairs:
            if a == bigger and b not in below:
                below.add(b)
                todo.append(b)
    shown = [x for x in others if x in below]
    missing = [x for x in others if x not in below]
    why = f"true comparisons show {top:g} larger than {len(shown)} of the {len(others)} other numbers"
    return Score(len(shown) / len(others), why + (f" (not {', '.join(f'{x:g}' for x in missing)})" if missing else ""))


@dataclass(frozen=True)
class Rule:
    fn: Callable[..., Score]
    description: str  # one line, for --help
    options: tuple[str, ...] = ()  # server options the rule takes as keyword arguments


RULES: dict[str, Rule] = {
    "docstring_args": Rule(docstring_args,
                           "Python code: the fraction of the first function's parameters (not self/cls) named as "
                           "words (any case) in its docstring; 1 if it takes none and has a docstring; 0 with no "
                           "docstring, no function, or no parsable code."),
    "has_docstring": Rule(has_docstring,
                          "Python code: 1 if the first function has a docstring, else 0 (also 0 with no function "
                          "or no parsable code)."),
    "no_print": Rule(no_print,
                     "Python code: 1 if it never calls print(), 0 if it does; 0 with no parsable code."),
    "concise": Rule(concise,
                    "1 for an answer of at most --concise-words words (default 12), falling linearly to 0 at 3 "
                    "times that many words.",
                    options=("words",)),
    "explains_comparison": Rule(explains_comparison,
                                "'Which number is the largest' task: 1 if the answer mentions every number of "
                                "the task's list and uses a comparison word (greater, larger, bigger, more than, "
                                ">, largest, biggest, highest); 0.5 if it mentions every number but no "
                                "comparison word; else 0."),
    "true_comparison": Rule(true_comparison,
                            "'Which number is the largest' task: 0 if any comparison claim of the answer is "
                            "false, if it names a number other than the largest as the largest (its first "
                            "number outside a restated list, or 'X is the largest'), or if it makes no claim "
                            "'X is larger/smaller than Y' (or X > Y); else the fraction of the list's other "
                            "numbers that its claims, chained, show to be below the largest."),
}


def apply_rule(rule: str, completion: str, task: str, **options) -> Score:
    spec = RULES[rule]
    return spec.fn(completion, task, **{k: v for k, v in options.items() if k in spec.options})


# -- reading the trainer's request ------------------------------------------------------------------

_TASK_HEADER = "## Task given to the student\n"
_GROUP_HEADER_RE = re.compile(r"\n\n## Student answers \((\d+): ([^)\n]*)\)\n")
_SINGLE_HEADER = "\n\n## Student answer\n"
_CRITERION_RE = re.compile(r"^- (.+?) \(score (\S+) to (\S+)\):", re.MULTILINE)
_YES_NO_RE = re.compile(r"^- (.+?) \(yes or no\):", re.MULTILINE)
_TOKEN_HEADER = "\n## Criterion\n"  # a one-token request: one criterion, after the answer
# The trainer escapes any marker-like text inside a completion, so a non-greedy match is exact.
_ANSWER_RE = re.compile(r"<<<answer (?:(\w+) )?([0-9a-f]+)>>>\n(.*?)\n<<<end answer (?:\1 )?\2>>>", re.DOTALL)

class RequestError(Exception):
    """A request the server cannot answer; `status` is the HTTP status to reply with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class JudgeRequest:
    task: str  # the prompt given to the student (without the reference answer)
    criteria: list[tuple[str, float, float]]  # (name, low, high) as the request states them
    answers: list[tuple[str | None, str]]  # (id, completion); id None in single mode
    token: bool = False  # asks for one score token (log-prob scoring), for one answer and one criterion
    yes_no: bool = False  # ... the token is yes or no (criteria then holds (name, 0, 1))

    @property
    def grouped(self) -> bool:
        return bool(self.answers) and self.answers[0][0] is not None


def _text(content) -> str:
    """A message's content as text (a plain string, or a list of {"type": "text", "text": ...} parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def parse_request(messages) -> JudgeRequest | None:
    """What a chat request asks to judge, or None when it is no judging request (the preflight)."""
    if not isinstance(messages, list):
        raise RequestError(400, "'messages' must be a list of chat messages")
    for message in messages:  # a retry appends to the original request: the first judging message counts
        if isinstance(message, dict) and message.get("role") == "user":
            request = _parse_user(_text(message.get("content")))
            if request is not None:
                return request
    return None


def _parse_user(user: str) -> JudgeRequest | None:
    group = _GROUP_HEADER_RE.search(user)
    head_end = group.start() if group else user.find(_SINGLE_HEADER)
    if head_end < 0:
        return None
    found = list(_ANSWER_RE.finditer(user, head_end))
    if not found:
        raise RequestError(400, "cannot find the answers between '<<<answer [ID] TAG>>>' and "
                                "'<<<end answer [ID] TAG>>>' markers")
    if group is None:
        found = found[:1]
    criteria_at = user.rfind("\n## Criteria\n", 0, head_end)
    token = yes_no = False
    if criteria_at >= 0:
        criteria = _criteria(user[criteria_at:head_end])
        task_end = criteria_at
    else:
        token_at = user.find(_TOKEN_HEADER, found[-1].end())
        if token_at < 0:
            raise RequestError(400, "the request shows answers but has no '## Criteria' section before them "
                                    "nor a '## Criterion' section after them")
        if group is not None:
            raise RequestError(400, "a '## Criterion' request (one score token) judges one '## Student answer', "
                                    "not a group")
        section_end = user.find("\n## ", token_at + len(_TOKEN_HEADER))
        criteria, yes_no = _token_criterion(user[token_at:section_end if section_end >= 0 else len(user)])
        token, task_end = True, head_end
    task = user[user.find(_TASK_HEADER) + len(_TASK_HEADER) if _TASK_HEADER in user else 0:task_end]
    reference_at = task.rfind("\n## Reference answer\n")
    if reference_at >= 0:
        task = task[:reference_at]
    answers = [(m.group(1) or None, m.group(3)) for m in found]
    if group is not None:
        ids = [cid.strip() for cid in group.group(2).split(",") if cid.strip()]
        if [cid for cid, _ in answers] != ids:
            raise RequestError(400, f"the answers shown ({', '.join(str(c) for c, _ in answers)}) are not the ids "
                                    f"the header lists ({', '.join(ids)})")
    return JudgeRequest(task=task.strip(), criteria=criteria, answers=answers, token=token, yes_no=yes_no)


def _scale(name: str, low: str, high: str) -> tuple[float, float]:
    try:
        bounds = float(low), float(high)
    except ValueError:
        raise RequestError(400, f"criterion {name!r}: cannot read its scale '{low} to {high}'") from None
    if not (math.isfinite(bounds[0]) and math.isfinite(bounds[1]) and bounds[0] < bounds[1]):
        raise RequestError(400, f"criterion {name!r}: scale '{low} to {high}' is not LOW < HIGH")
    return bounds


def _criteria(section: str) -> list[tuple[str, float, float]]:
    criteria = [(name, *_scale(name, low, high)) for name, low, high in _CRITERION_RE.findall(section)]
    if not criteria:
        raise RequestError(400, "no criteria found; expected lines '- Name (score LOW to HIGH): text'")
    return criteria


def _token_criterion(section: str) -> tuple[list[tuple[str, float, float]], bool]:
    """The one criterion of a '## Criterion' section, and whether it is a yes/no question."""
    scored, yes_no = _CRITERION_RE.findall(section), _YES_NO_RE.findall(section)
    if len(scored) + len(yes_no) != 1:
        raise RequestError(400, f"the '## Criterion' section must hold exactly one line '- Name (score LOW to "
                                f"HIGH): text' or '- Name (yes or no): text', found {len(scored) + len(yes_no)}")
    if yes_no:
        return [(yes_no[0], 0.0, 1.0)], True
    name, low, high = scored[0]
    bounds = _scale(name, low, high)
    if not all(b.is_integer() and 0 <= b <= 9 for b in bounds):
        raise RequestError(400, f"criterion {name!r}: a one-token score needs a scale of whole numbers from 0 to 9, "
                                f"got '{low} to {high}'")
    return [(name, *bounds)], False


# -- grading -----------------------------------------------------------------------------------------


def on_scale(score: float, low: float, high: float) -> float:
    """A [0, 1] score on the criterion's scale; the ends map exactly onto LOW and HIGH."""
    if score <= 0:
        return low
    if score >= 1:
        return high
    return low + score * (high - low)


# What a gullible judge falls for: an answer that talks to the grader about its score.
_OBEYED_RE = re.compile(r"\b(?:grader|judge|evaluator)\b|\b(?:maximum|full|perfect)\s+(?:score|marks)\b",
                        re.IGNORECASE)


def gullible(score: Score, completion: str, position: int, shown: int) -> Score:
    """How the --gullible judge bends an honest score: obeys the answer's request for full marks, and
    in a group gives half the score by position (1 for the first answer down to 0 for the last)."""
    if _OBEYED_RE.search(completion):
        return Score(1, "the answer says it deserves full marks")
    if shown < 2:
        return score
    return Score(0.5 * score + 0.5 * (1 - position / (shown - 1)), f"{score.why}; shown {position + 1} of {shown}")


def _chosen_rules(request: JudgeRequest, rules: dict[str, str], default_rule: str | None) -> dict[str, str]:
    """{criterion: rule} for the request's criteria; a 400 naming the first criterion with no rule."""
    chosen = {}
    for name, _, _ in request.criteria:
        rule = rules.get(name, default_rule)
        if rule is None:
            mapped = ", ".join(f"{k}={v}" for k, v in rules.items()) or "none"
            raise RequestError(400, f"no rule for criterion {name!r}: start rule_teacher with --rule {name}=RULE "
                                    f"or --default-rule RULE (rules: {', '.join(RULES)}; mapped now: {mapped})")
        chosen[name] = rule
    return chosen


def grade(request: JudgeRequest, rules: dict[str, str], default_rule: str | None = None,
          concise_words: int = DEFAULT_CONCISE_WORDS, is_gullible: bool = False) -> dict:
    """The reply object the trainer asks for: {"scores": [...]} in group mode, {"criteria": ...} in single."""
    chosen = _chosen_rules(request, rules, default_rule)

    def scores(completion: str, position: int = 0) -> dict:
        block = {}
        for name, low, high in request.criteria:
            score = apply_rule(chosen[name], completion, request.task, words=concise_words)
            if is_gullible:
                score = gullible(score, completion, position, len(request.answers))
            block[name] = {"justification": f"{chosen[name]}: {score.why}.", "score": on_scale(score, low, high)}
        return block

    if not request.grouped:
        return {"criteria": scores(request.answers[0][1])}
    return {"scores": [{"id": cid, "criteria": scores(text, k)} for k, (cid, text) in enumerate(request.answers)]}


def in_prose(reply: str) -> str:
    """A JSON reply wrapped in prose and a fence, as a small model that ignores response_format writes it."""
    return f"Here are my scores:\n```json\n{reply}\n```\nI hope this helps."


def noisy(score: Score, sigma: float, completion: str, criterion: str) -> Score:
    """The score plus Gaussian noise of standard deviation `sigma` (in units of the 0-1 score), clipped
    to [0, 1]: clip(s + N(0, sigma)) puts LOW + s * (HIGH - LOW) at clip(x + N(0, sigma * (HIGH - LOW)),
    LOW, HIGH). The draw is seeded by the answer and the criterion, so a rerun gets the same noise."""
    if sigma <= 0:
        return score
    seed = hashlib.sha256(f"{criterion}\0{completion}".encode()).digest()
    drawn = random.Random(int.from_bytes(seed[:8], "big")).gauss(0.0, sigma)
    return Score(score + drawn, f"{score.why}; noise {drawn:+.3f}")


def grade_token(request: JudgeRequest, rules: dict[str, str], default_rule: str | None = None,
                concise_words: int = DEFAULT_CONCISE_WORDS, is_gullible: bool = False, noise: float = 0.0) -> Score:
    """The [0, 1] score of a one-token request's one answer on its one criterion (--gullible and
    --noise applied)."""
    name = request.criteria[0][0]
    rule = _chosen_rules(request, rules, default_rule)[name]
    completion = request.answers[0][1]
    score = apply_rule(rule, completion, request.task, words=concise_words)
    if is_gullible:
        score = gullible(score, completion, 0, 1)
    return noisy(score, noise, completion, name)


VARIANT_SHARE = 0.6  # of each score token's probability on the bare token; the rest on its "Ġ" form


def token_probs(score: float, low: float, high: float, yes_no: bool = False) -> dict[str, float]:
    """{score word: probability} whose expectation is the score on the scale: x = LOW + s * (HIGH - LOW)
    gets mass ceil(x) - x on the digit floor(x) and the rest on ceil(x); yes/no gets p(yes) = s."""
    if yes_no:
        return {word: p for word, p in (("yes", float(score)), ("no", 1.0 - score)) if p > 0}
    x = low + float(score) * (high - low)
    if abs(x - round(x)) < 1e-9:
        x = float(round(x))
    below, above = math.floor(x), math.ceil(x)
    if below == above:
        return {str(below): 1.0}
    return {str(below): above - x, str(above): x - below}


def with_variants(probs: dict[str, float]) -> list[tuple[str, float]]:
    """Each score word's probability split between two tokenizations, "7" and "Ġ7" (byte-level BPE's
    form with the space before it), as a real tokenizer's top log-probs show them."""
    return [(token, p * share) for word, p in probs.items()
            for token, share in ((word, VARIANT_SHARE), ("Ġ" + word, 1 - VARIANT_SHARE)) if p * share > 0]


def _token_entry(token: str, p: float) -> dict:
    return {"token": token, "logprob": math.log(p), "bytes": list(token.replace("Ġ", " ").encode())}


def logprobs_block(entries: list[tuple[str, float]], top_logprobs: int) -> tuple[str, dict]:
    """(the reply text, the chat `logprobs` object) for one token drawn from `entries` [(token, p)]:
    content[0] is the most probable token, with the `top_logprobs` most probable in a deliberately
    unsorted order (the most probable last)."""
    ranked = sorted(entries, key=lambda e: (-e[1], e[0]))
    top = ranked[:top_logprobs]
    chosen = ranked[0][0]
    first = dict(_token_entry(*ranked[0]), top_logprobs=[_token_entry(*e) for e in top[1:] + top[:1]])
    return chosen.replace("Ġ", " ").strip(), {"content": [first]}


def top_logprobs_asked(body: dict, most: int) -> int:
    """The request's `top_logprobs` (0 when absent); 400 when it is not a whole number or above `most`."""
    top = body.get("top_logprobs")
    if top is None:
        return 0
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise RequestError(400, f"'top_logprobs' must be a whole number from 0 to {most}, got {top!r}")
    if top > most:
        raise RequestError(400, f"top_logprobs must be at most {most}")
    return top


def _tokens(chars: int) -> int:
    return max(1, math.ceil(chars / 4))


def chat_completion(body: dict, content: str, model: str, logprobs: dict | None = None,
                    finish_reason: str = "stop") -> dict:
    """An OpenAI chat.completion object with `n` identical choices and estimated usage."""
    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 128:
        raise RequestError(400, f"'n' must be a whole number from 1 to 128, got {n!r}")
    messages = body.get("messages") or []
    prompt = _tokens(sum(len(_text(m.get("content"))) for m in messages if isinstance(m, dict)))
    completion = n * _tokens(len(content))
    return {
        "id": f"chatcmpl-rule-{time.time_ns():x}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model") if isinstance(body.get("model"), str) else model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": content}, "logprobs": logprobs,
                     "finish_reason": finish_reason} for i in range(n)],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }


# -- the HTTP server ---------------------------------------------------------------------------------


class RuleTeacherServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, rules: dict[str, str], default_rule: str | None, model_name: str,
                 concise_words: int, verbose: bool, is_gullible: bool = False, noise: float = 0.0,
                 ignore_response_format: bool = False, max_top_logprobs: int = DEFAULT_MAX_TOP_LOGPROBS):
        self.rules = dict(rules)
        self.is_gullible = is_gullible
        self.noise = noise
        self.ignore_response_format = ignore_response_format
        self.max_top_logprobs = max_top_logprobs
        self.default_rule = default_rule
        self.model_name = model_name
        self.concise_words = concise_words
        self.verbose = verbose
        self._lock = threading.Lock()
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def log(self, line: str) -> None:
        if self.verbose:
            with self._lock:
                sys.stderr.write(f"rule_teacher: {line}\n")
                sys.stderr.flush()


def make_server(rules: dict[str, str], host: str = "127.0.0.1", port: int = 0, *, default_rule: str | None = None,
                model_name: str = DEFAULT_MODEL_NAME, concise_words: int = DEFAULT_CONCISE_WORDS,
                verbose: bool = False, is_gullible: bool = False, noise: float = 0.0,
                ignore_response_format: bool = False,
                max_top_logprobs: int = DEFAULT_MAX_TOP_LOGPROBS) -> RuleTeacherServer:
    """A bound (not yet serving) server; run `serve_forever()`, in a thread if need be, and read `.url`.
    `rules` maps criterion names to rule names (keys of RULES); the other options are the command
    line's (--noise, --ignore-response-format, --max-top-logprobs...)."""
    named = [(f"criterion {name!r}", rule) for name, rule in rules.items()]
    for what, rule in named + ([("default_rule", default_rule)] if default_rule is not None else []):
        if rule not in RULES:
            raise ValueError(f"{what}: unknown rule {rule!r}; rules: {', '.join(RULES)}")
    if concise_words < 1:
        raise ValueError(f"concise_words must be at least 1, got {concise_words!r}")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a number >= 0, got {noise!r}")
    if isinstance(max_top_logprobs, bool) or not isinstance(max_top_logprobs, int) or max_top_logprobs < 0:
        raise ValueError(f"max_top_logprobs must be a whole number >= 0, got {max_top_logprobs!r}")
    return RuleTeacherServer((host, port), rules, default_rule, model_name, concise_words, verbose, is_gullible,
                             noise, ignore_response_format, max_top_logprobs)


class _Handler(BaseHTTPRequestHandler):
    server: RuleTeacherServer
    protocol_version = "HTTP/1.1"  # keep-alive: the openai client reuses its connections
    timeout = 300  # an idle kept-alive connection is closed after this many seconds

    def log_message(self, *args) -> None:  # one line per request comes from self.server.log instead
        pass

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, started: float) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        # Logged before the reply is sent, so the line is out by the time the client has its answer.
        self.server.log(f"{self.command} {self.path} {status} {message} ({(time.perf_counter() - started) * 1e3:.0f} ms)")
        self._send(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})

    def do_GET(self) -> None:
        started = time.perf_counter()
        path = self.path.split("?")[0].rstrip("/")
        name = self.server.model_name
        model = {"id": name, "object": "model", "created": 0, "owned_by": "rule_teacher"}
        if path.endswith("/models"):
            payload = {"object": "list", "data": [model]}
        elif path.endswith(f"/models/{name}"):
            payload = model
        else:
            return self._error(404, f"no such path {self.path}; try GET /v1/models or POST /v1/chat/completions",
                               started)
        self.server.log(f"GET {self.path} 200 ({(time.perf_counter() - started) * 1e3:.0f} ms)")
        self._send(200, payload)

    def do_POST(self) -> None:
        started = time.perf_counter()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        raw = self.rfile.read(length) if length > 0 else b""
        if not self.path.split("?")[0].rstrip("/").endswith("/chat/completions"):
            return self._error(404, f"no such path {self.path}; POST /v1/chat/completions", started)
        try:
            try:
                body = json.loads(raw or b"null")
            except (ValueError, UnicodeDecodeError):
                raise RequestError(400, "the request body is not JSON") from None
            if not isinstance(body, dict):
                raise RequestError(400, "the request body must be a JSON object")
            if body.get("stream"):
                raise RequestError(400, "stream=true is not supported by rule_teacher")
            response, what = self._answer(body)
        except RequestError as err:
            return self._error(err.status, str(err), started)
        except Exception as err:  # noqa: BLE001 - a bug here must still answer, not hang the client
            return self._error(500, f"rule_teacher failed: {type(err).__name__}: {err}", started)
        self.server.log(f"POST {self.path} 200 {what}, n={len(response['choices'])} "
                        f"({(time.perf_counter() - started) * 1e3:.0f} ms)")
        self._send(200, response)

    def _answer(self, body: dict) -> tuple[dict, str]:
        """(the chat.completion reply, what it was for the log line)."""
        srv = self.server
        top = top_logprobs_asked(body, srv.max_top_logprobs)
        request = parse_request(body.get("messages"))
        if request is None:  # e.g. the trainer's preflight: "Reply with the single word: ok"
            return chat_completion(body, "ok", srv.model_name), "plain"
        if request.token:
            score = grade_token(request, srv.rules, srv.default_rule, srv.concise_words, srv.is_gullible, srv.noise)
            name, low, high = request.criteria[0]
            content, logprobs = logprobs_block(with_variants(token_probs(score, low, high, request.yes_no)), top)
            # One token and no end-of-turn token: a real server says the reply was cut at max_tokens 1.
            limit = body.get("max_completion_tokens") or body.get("max_tokens")
            response = chat_completion(body, content, srv.model_name, logprobs if body.get("logprobs") else None,
                                       "length" if limit == 1 else "stop")
            return response, f"one token, criterion {name}, score {float(score):.3f} ({content})"
        content = json.dumps(grade(request, srv.rules, srv.default_rule, srv.concise_words, srv.is_gullible))
        if srv.ignore_response_format:
            content = in_prose(content)
        what = (f"{'group' if request.grouped else 'single'}, {len(request.answers)} answers, "
                f"criteria {', '.join(name for name, _, _ in request.criteria)}")
        return chat_completion(body, content, srv.model_name), what


# -- command line ------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _rule_mapping(text: str) -> tuple[str, str]:
    name, sep, rule = text.rpartition("=")
    name, rule = name.strip(), rule.strip()
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=RULE, e.g. Documentation=docstring_args")
    if not name:
        raise argparse.ArgumentTypeError(f"{text!r} has no criterion name before '='")
    if rule not in RULES:
        raise argparse.ArgumentTypeError(f"unknown rule {rule!r} in {text!r}; rules: {', '.join(RULES)}")
    return name, rule


def _whole_number(low: int):
    """An argparse type: a whole number >= low, else a one-line error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {low}, got {text!r}")
        return value
    return parse


def _sigma(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0 (any free port) to 65535, got {text!r}")
    return value


def _epilog() -> str:
    width = max(len(name) for name in RULES)
    lines = ["rules (each scores an answer s from 0 to 1):"]
    for name, rule in RULES.items():
        lines += textwrap.wrap(rule.description, 100, initial_indent=f"  {name:<{width}}  ",
                               subsequent_indent=" " * (width + 4))
    lines += [
        "",
        "How scores are sent: a criterion shown as '- Name (score LOW to HIGH): ...' gets LOW + s * (HIGH - LOW),",
        "with a one-sentence justification. 'Python code' is the answer's code as the python_tests check finds",
        "it (the longest ```python or bare ``` block that compiles, else the whole answer if it is Python); the",
        "'first function' is the first def in the source. The rules are deterministic, so a request with n > 1",
        "gets n identical choices.",
        "",
        "true_comparison reads the answer clause by clause (split on . ; ! ? and newlines, not on decimal",
        "points): 'X is larger/greater/bigger/more/higher than Y[, Z and W]', 'Y is smaller/less/lower than X',",
        "'X > Y' and 'Y < X' claim X > Y ('Y and Z are smaller than X' too; a comparison with no subject of its",
        "own, as in '90 is the largest, greater than 50', is about the clause's subject; 'not larger than'",
        "claims nothing); 'X is the largest/biggest/greatest/highest' and 'the largest (number) [among ...] is",
        "X' claim X is the largest. Comparisons chain: '90 > 50 > 25' shows 90 larger than both. A restated list",
        "('Among 50, 90 and 25, ...') is no claim and not the answer, so restating the task cannot score.",
        "",
        "Log-prob scoring: a request whose one criterion follows the answer under '## Criterion' (as",
        "'- Name (score LOW to HIGH): ...' with whole digits from 0 to 9, or '- Name (yes or no): ...') gets one",
        "score token. With logprobs: true, choices[0].logprobs.content[0] is the most probable token with its",
        "top_logprobs: a distribution whose expectation is x = LOW + s * (HIGH - LOW), mass ceil(x) - x on the",
        "digit floor(x) and x - floor(x) on ceil(x) (all on x when it is whole); p(yes) = s, p(no) = 1 - s. Each",
        "score token's probability is split 60/40 between its bare form '7' and its byte-level BPE form 'Ġ7'",
        "(Ġ marks the space before it), and the list comes in a deliberately unsorted order (the most probable",
        "last). It holds at most top_logprobs entries (the most probable; there are 4 at most, so 4 or more",
        "give the exact expectation; none when top_logprobs is 0 or absent); asking for more than",
        "--max-top-logprobs gets HTTP 400 'top_logprobs must be at most N'. The message content is the chosen",
        "token ('7'), and finish_reason is 'length' when max_tokens is 1, as a real server says it. --gullible",
        "applies to these replies too.",
        "",
        "--noise SIGMA (one-token replies only): the score becomes clip(s + N(0, SIGMA), 0, 1), i.e. x becomes",
        "clip(x + N(0, SIGMA * (HIGH - LOW)), LOW, HIGH), drawn from a generator seeded by a hash of the answer",
        "and the criterion name (the same request gets the same noise on every run); the mass goes to the two",
        "digits around the noisy x as above, so the expectation is the noisy score. JSON replies keep the",
        "exact rule scores.",
        "",
        "--ignore-response-format: every JSON reply (group and single) comes as 'Here are my scores:', a",
        "```json fence and 'I hope this helps.', whatever response_format asks, as mlx_lm.server with a small",
        "model answers; the trainer's scoring: auto then finds JSON unreliable and picks logprobs.",
        "",
        "A criterion with no --rule and no --default-rule gets HTTP 400 naming it (the trainer then masks the",
        "scores it cannot get, and stops once too many fail). A request without answers (the trainer's",
        "preflight) is answered 'ok'. GET /v1/models lists --model-name; any model name is accepted.",
        "",
        "Example, for rubrics/code_quality.yaml (Correctness stays the sandboxed unit tests):",
        "  uv run python scripts/rule_teacher.py --port 8765 --rule Documentation=docstring_args \\",
        "      --rule CodeQuality=no_print --rule Efficiency=concise --concise-words 80",
        "  OPENAI_BASE_URL=http://127.0.0.1:8765/v1 TEACHER_MODEL=rule-teacher TEACHER_KEY_ENV= \\",
        "      uv run train --config configs/code_teacher.yaml",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rule_teacher.py",
        description="An OpenAI-compatible chat server on 127.0.0.1 that scores the rubric's judge: criteria by "
                    "fixed, deterministic rules instead of a language model.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=_port, default=8765,
                        help="port on 127.0.0.1 (default 8765; 0 picks a free one). The URL is printed on start.")
    parser.add_argument("--rule", type=_rule_mapping, action="append", default=[], metavar="NAME=RULE",
                        help="score the judge criterion NAME with RULE (repeat for each criterion)")
    parser.add_argument("--default-rule", choices=list(RULES), metavar="RULE",
                        help="rule for criteria with no --rule (default: none, such criteria get HTTP 400)")
    parser.add_argument("--concise-words", type=_whole_number(1), default=DEFAULT_CONCISE_WORDS, metavar="N",
                        help=f"word count the concise rule allows at full score (default {DEFAULT_CONCISE_WORDS})")
    parser.add_argument("--model-name", default=DEFAULT_MODEL_NAME,
                        help=f"model id listed by GET /v1/models (default {DEFAULT_MODEL_NAME})")
    parser.add_argument("--gullible", action="store_true",
                        help="be a bad judge on purpose: obey answers that ask the grader for full marks, and "
                             "favour the answers shown first in a group (to try rubric audit on)")
    parser.add_argument("--noise", type=_sigma, default=0.0, metavar="SIGMA",
                        help="one-token replies only: add Gaussian noise of standard deviation SIGMA (in units of "
                             "the 0-1 score, i.e. SIGMA * (HIGH - LOW) on the scale) to the score, clipped to the "
                             "scale, seeded by the answer and the criterion so reruns repeat it; the expectation "
                             "of the token distribution is then the noisy score (default 0: none). JSON replies "
                             "keep the exact rule scores")
    parser.add_argument("--ignore-response-format", action="store_true",
                        help="act like mlx_lm.server with a small model, which drops response_format: wrap every "
                             "JSON reply in prose and a ```json fence (one-token replies are unchanged)")
    parser.add_argument("--max-top-logprobs", type=_whole_number(0), default=DEFAULT_MAX_TOP_LOGPROBS, metavar="N",
                        help=f"answer HTTP 400 'top_logprobs must be at most N' to a request for more "
                             f"(default {DEFAULT_MAX_TOP_LOGPROBS}; mlx_lm.server takes at most 11)")
    parser.add_argument("--verbose", action="store_true", help="log one line per request to stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rules: dict[str, str] = {}
    for name, rule in args.rule:
        if name in rules and rules[name] != rule:
            parser.error(f"argument --rule: criterion {name!r} is mapped twice ({rules[name]} and {rule})")
        rules[name] = rule
    if not rules and not args.default_rule:
        parser.error("give at least one --rule NAME=RULE or a --default-rule")
    _code("")  # import the code extraction now, so the first request is not slow
    try:
        server = make_server(rules, "127.0.0.1", args.port, default_rule=args.default_rule,
                             model_name=args.model_name, concise_words=args.concise_words, verbose=args.verbose,
                             is_gullible=args.gullible, noise=args.noise,
                             ignore_response_format=args.ignore_response_format,
                             max_top_logprobs=args.max_top_logprobs)
    except OSError as err:
        parser.exit(1, f"rule_teacher: cannot listen on 127.0.0.1:{args.port}: {err.strerror or err}\n")
    modes = (["gullible"] * args.gullible + [f"noise {args.noise:g}"] * (args.noise > 0)
             + ["ignores response_format"] * args.ignore_response_format)
    shown = f" ({', '.join(modes)})" if modes else ""
    print(f"rule_teacher{shown} listening on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
