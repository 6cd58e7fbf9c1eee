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

`--gullible` makes it a bad judge on purpose, to show what `rubric audit` catches: it obeys an
answer that addresses the grader (full score on every criterion), and in group mode it favours
the answers shown first (half the score comes from the position, falling from the first to the last).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
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
}


def apply_rule(rule: str, completion: str, task: str, **options) -> Score:
    spec = RULES[rule]
    return spec.fn(completion, task, **{k: v for k, v in options.items() if k in spec.options})


# -- reading the trainer's request ------------------------------------------------------------------

_TASK_HEADER = "## Task given to the student\n"
_GROUP_HEADER_RE = re.compile(r"\n\n## Student answers \((\d+): ([^)\n]*)\)\n")
_SINGLE_HEADER = "\n\n## Student answer\n"
_CRITERION_RE = re.compile(r"^- (.+?) \(score (\S+) to (\S+)\):", re.MULTILINE)
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
    criteria_at = user.rfind("\n## Criteria\n", 0, head_end)
    if criteria_at < 0:
        raise RequestError(400, "the request shows answers but has no '## Criteria' section")
    criteria = []
    for name, low, high in _CRITERION_RE.findall(user[criteria_at:head_end]):
        try:
            bounds = float(low), float(high)
        except ValueError:
            raise RequestError(400, f"criterion {name!r}: cannot read its scale '{low} to {high}'") from None
        if not (math.isfinite(bounds[0]) and math.isfinite(bounds[1]) and bounds[0] < bounds[1]):
            raise RequestError(400, f"criterion {name!r}: scale '{low} to {high}' is not LOW < HIGH")
        criteria.append((name, *bounds))
    if not criteria:
        raise RequestError(400, "no criteria found; expected lines '- Name (score LOW to HIGH): text'")
    task = user[user.find(_TASK_HEADER) + len(_TASK_HEADER) if _TASK_HEADER in user else 0:criteria_at]
    reference_at = task.rfind("\n## Reference answer\n")
    if reference_at >= 0:
        task = task[:reference_at]
    found = [(cid or None, text) for cid, _, text in _ANSWER_RE.findall(user[head_end:])]
    if not found:
        raise RequestError(400, "cannot find the answers between '<<<answer [ID] TAG>>>' and "
                                "'<<<end answer [ID] TAG>>>' markers")
    if group is not None:
        ids = [cid.strip() for cid in group.group(2).split(",") if cid.strip()]
        if [cid for cid, _ in found] != ids:
            raise RequestError(400, f"the answers shown ({', '.join(str(c) for c, _ in found)}) are not the ids "
                                    f"the header lists ({', '.join(ids)})")
    else:
        found = found[:1]
    return JudgeRequest(task=task.strip(), criteria=criteria, answers=found)


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


def grade(request: JudgeRequest, rules: dict[str, str], default_rule: str | None = None,
          concise_words: int = DEFAULT_CONCISE_WORDS, is_gullible: bool = False) -> dict:
    """The reply object the trainer asks for: {"scores": [...]} in group mode, {"criteria": ...} in single."""
    chosen = {}
    for name, _, _ in request.criteria:
        rule = rules.get(name, default_rule)
        if rule is None:
            mapped = ", ".join(f"{k}={v}" for k, v in rules.items()) or "none"
            raise RequestError(400, f"no rule for criterion {name!r}: start rule_teacher with --rule {name}=RULE "
                                    f"or --default-rule RULE (rules: {', '.join(RULES)}; mapped now: {mapped})")
        chosen[name] = rule

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


def _tokens(chars: int) -> int:
    return max(1, math.ceil(chars / 4))


def chat_completion(body: dict, content: str, model: str) -> dict:
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
        "choices": [{"index": i, "message": {"role": "assistant", "content": content}, "logprobs": None,
                     "finish_reason": "stop"} for i in range(n)],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }


# -- the HTTP server ---------------------------------------------------------------------------------


class RuleTeacherServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, rules: dict[str, str], default_rule: str | None, model_name: str,
                 concise_words: int, verbose: bool, is_gullible: bool = False):
        self.rules = dict(rules)
        self.is_gullible = is_gullible
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
                verbose: bool = False, is_gullible: bool = False) -> RuleTeacherServer:
    """A bound (not yet serving) server; run `serve_forever()`, in a thread if need be, and read `.url`.
    `rules` maps criterion names to rule names (keys of RULES)."""
    named = [(f"criterion {name!r}", rule) for name, rule in rules.items()]
    for what, rule in named + ([("default_rule", default_rule)] if default_rule is not None else []):
        if rule not in RULES:
            raise ValueError(f"{what}: unknown rule {rule!r}; rules: {', '.join(RULES)}")
    if concise_words < 1:
        raise ValueError(f"concise_words must be at least 1, got {concise_words!r}")
    return RuleTeacherServer((host, port), rules, default_rule, model_name, concise_words, verbose, is_gullible)


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
            request = parse_request(body.get("messages"))
            if request is None:  # e.g. the trainer's preflight: "Reply with the single word: ok"
                content, what = "ok", "plain"
            else:
                reply = grade(request, self.server.rules, self.server.default_rule, self.server.concise_words,
                              self.server.is_gullible)
                content = json.dumps(reply)
                what = (f"{'group' if request.grouped else 'single'}, {len(request.answers)} answers, "
                        f"criteria {', '.join(name for name, _, _ in request.criteria)}")
            response = chat_completion(body, content, self.server.model_name)
        except RequestError as err:
            return self._error(err.status, str(err), started)
        except Exception as err:  # noqa: BLE001 - a bug here must still answer, not hang the client
            return self._error(500, f"rule_teacher failed: {type(err).__name__}: {err}", started)
        self.server.log(f"POST {self.path} 200 {what}, n={len(response['choices'])} "
                        f"({(time.perf_counter() - started) * 1e3:.0f} ms)")
        self._send(200, response)


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


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
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
    parser.add_argument("--concise-words", type=_positive, default=DEFAULT_CONCISE_WORDS, metavar="N",
                        help=f"word count the concise rule allows at full score (default {DEFAULT_CONCISE_WORDS})")
    parser.add_argument("--model-name", default=DEFAULT_MODEL_NAME,
                        help=f"model id listed by GET /v1/models (default {DEFAULT_MODEL_NAME})")
    parser.add_argument("--gullible", action="store_true",
                        help="be a bad judge on purpose: obey answers that ask the grader for full marks, and "
                             "favour the answers shown first in a group (to try rubric audit on)")
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
                             is_gullible=args.gullible)
    except OSError as err:
        parser.exit(1, f"rule_teacher: cannot listen on 127.0.0.1:{args.port}: {err.strerror or err}\n")
    print(f"rule_teacher{' (gullible)' if args.gullible else ''} listening on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
