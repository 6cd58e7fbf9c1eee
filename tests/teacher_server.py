"""A scripted OpenAI-compatible chat server on 127.0.0.1 for teacher tests.

By default it grades like a well-behaved teacher: it reads the answers and criteria out of the
request and replies with valid JSON, giving each criterion 9 when the answer contains "GOOD" and
2 otherwise. Tests push actions onto `script` to misbehave for the next requests:

    "ok"            a valid reply (the default)
    "garbage"       prose with no JSON object
    "fenced"        valid JSON wrapped in prose and ``` fences
    "drop_one"      valid JSON missing the last answer
    "out_of_range"  valid JSON with a score of 42
    "no_usage"      a valid reply without the `usage` field
    "truncated"     finish_reason "length"
    ("status", code, headers)  an HTTP error, e.g. ("status", 429, {"Retry-After": "1"})
    ("sleep", seconds)          a valid reply after a delay (for timeouts)

`script_when[text]` holds actions for only the requests whose messages contain `text`; they
are used before `script`, so a test can make one group fail however requests interleave.

A request with `logprobs: true` (log-prob scoring) gets one score token, with the first token's
top log-probs from `token_probs(answer, criterion line)`: by default the digit 8 for an answer
containing "GOOD" and 2 otherwise, its mass split between the variants "8" and "Ġ8", with 0.1 on
a non-score token. `logprobs` says how the server treats such requests: "yes", "absent" (no
log-probs in the reply, as LM Studio) or "reject" (HTTP 400). `ignores_response_format` makes it
drop `response_format` silently and wrap its JSON in prose, as mlx_lm.server does with a small model.

Every request is recorded (time, path, headers, JSON body) in `requests`.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ANSWER_RE = re.compile(r"<<<answer (\w+) [0-9a-f]+>>>\n(.*?)\n<<<end answer \1 [0-9a-f]+>>>", re.DOTALL)
SINGLE_RE = re.compile(r"<<<answer [0-9a-f]+>>>\n(.*?)\n<<<end answer [0-9a-f]+>>>", re.DOTALL)
CRITERION_RE = re.compile(r"^- (\S+) \(score (\S+) to (\S+)\):", re.MULTILINE)
ONE_CRITERION_RE = re.compile(r"## Criterion\n(- .*)")


def token_probs(answer: str, criterion: str) -> list[tuple[str, float]]:
    """The first reply token's distribution for a log-prob request: (token, probability)."""
    if "(yes or no)" in criterion:
        word = "yes" if "GOOD" in answer else "no"
        return [(word, 0.6), (word.capitalize(), 0.3), ("The", 0.1)]
    digit = "8" if "GOOD" in answer else "2"
    return [(digit, 0.6), ("Ġ" + digit, 0.3), ("The", 0.1)]


def grade(text: str) -> float:
    return 9.0 if "GOOD" in text else 2.0


class ScriptedTeacher:
    def __init__(self, model: str = "scripted-teacher"):
        self.model = model
        self.script: deque = deque()
        self.script_when: dict[str, deque] = {}
        self.grade = grade  # text -> score on the 0-10 scale; a test may swap in its own
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.reject_response_formats: set[str] = set()  # e.g. {"json_schema"}: answer those with 400
        self.ignores_response_format = False
        self.logprobs = "yes"  # yes | absent | reject
        self.max_top_logprobs = 20  # more is answered with 400, as mlx_lm.server does above 11
        self.token_probs = token_probs  # (answer, criterion line) -> [(token, probability)]
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def chat_requests(self) -> list[dict]:
        return [r for r in self.requests if r["path"].endswith("/chat/completions")]

    def next_action(self, body: dict):
        text = json.dumps(body.get("messages"))
        for marker, actions in self.script_when.items():
            if actions and marker in text:
                return actions.popleft()
        return self.script.popleft() if self.script else "ok"

    # -- replies -------------------------------------------------------------------------------

    def reply_for(self, body: dict, action) -> tuple[int, dict, dict | str]:
        if isinstance(action, tuple) and action[0] == "status":
            _, code, headers = (*action, {})[:3]
            return code, headers, {"error": {"message": f"scripted {code}", "type": "scripted"}}
        if isinstance(action, tuple) and action[0] == "sleep":
            time.sleep(action[1])
            action = "ok"
        if body.get("logprobs"):
            return self.logprob_reply(body)
        fmt = (body.get("response_format") or {}).get("type")
        if self.ignores_response_format:
            fmt, action = None, "fenced" if action == "ok" else action
        if fmt in self.reject_response_formats:
            return 400, {}, {"error": {"message": f"response_format {fmt} is not supported", "type": "invalid"}}
        content = self.grade_request(body, action)
        if action == "garbage":
            content = "I think these answers are all pretty reasonable overall."
        elif action == "fenced":
            content = f"Here are the scores:\n```json\n{content}\n```\nHope this helps!"
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": self.model,
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                              "finish_reason": "length" if action == "truncated" else "stop"}]}
        if action != "no_usage":
            reply["usage"] = {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
        return 200, {}, reply

    def logprob_reply(self, body: dict) -> tuple[int, dict, dict]:
        if self.logprobs == "reject":
            return 400, {}, {"error": {"message": "logprobs are not supported", "type": "invalid"}}
        top = body.get("top_logprobs") or 0
        if top > self.max_top_logprobs:
            return 400, {}, {"error": {"message": f"top_logprobs must be at most {self.max_top_logprobs}",
                                       "type": "invalid"}}
        user = body["messages"][-1]["content"]
        answer = SINGLE_RE.search(user)
        criterion = ONE_CRITERION_RE.search(user)
        probs = self.token_probs(answer.group(1) if answer else "", criterion.group(1) if criterion else "")
        entries = [{"token": token, "logprob": math.log(p), "bytes": None} for token, p in probs][:max(top, 1)]
        first = max(entries, key=lambda e: e["logprob"])
        choice = {"index": 0, "message": {"role": "assistant", "content": first["token"]}, "finish_reason": "length"}
        if self.logprobs == "yes":
            choice["logprobs"] = {"content": [dict(first, top_logprobs=entries)]}
        return 200, {}, {"id": "x", "object": "chat.completion", "created": 0, "model": self.model,
                         "choices": [choice], "usage": {"prompt_tokens": 100, "completion_tokens": 1,
                                                         "total_tokens": 101}}

    def grade_request(self, body: dict, action) -> str:
        user = body["messages"][1]["content"] if len(body["messages"]) > 1 else body["messages"][0]["content"]
        if "## Criteria" not in user:  # the preflight ping
            return "ok"
        criteria = CRITERION_RE.findall(user)

        def scores(text):
            value = 42 if action == "out_of_range" else self.grade(text)
            return {name: {"justification": "scripted", "score": value} for name, _, _ in criteria}

        answers = ANSWER_RE.findall(user)
        if not answers:
            return json.dumps({"criteria": scores(SINGLE_RE.search(user).group(1))})
        items = [{"id": cid, "criteria": scores(text)} for cid, text in answers]
        if action == "drop_one":
            items = items[:-1]
        return json.dumps({"scores": items})

    def _handler(self):
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, code: int, headers: dict, payload) -> None:
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                teacher.requests.append({"time": time.monotonic(), "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                         "body": None})
                self._send(200, {}, {"object": "list", "data": [{"id": teacher.model, "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with teacher._lock:
                    teacher.requests.append({"time": time.monotonic(), "path": self.path,
                                             "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                    action = teacher.next_action(body)
                    teacher.in_flight += 1
                    teacher.max_in_flight = max(teacher.max_in_flight, teacher.in_flight)
                try:
                    code, headers, payload = teacher.reply_for(body, action)
                    self._send(code, headers, payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass
                finally:
                    with teacher._lock:
                        teacher.in_flight -= 1

        return Handler
