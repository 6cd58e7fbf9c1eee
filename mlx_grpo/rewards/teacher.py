"""The teacher client: scores completions on `judge` criteria through any OpenAI-compatible API.

Async throughout, so the scorer can keep many requests in flight (up to `max_concurrency`,
spaced by `requests_per_minute`) while the trainer does other work. Every request:
  - is retried on 408/409/429/5xx, timeouts and connection errors with exponential backoff and
    jitter, waiting at least as long as the server's Retry-After says;
  - is retried, with the problem explained to the teacher, when its reply is not exactly valid;
  - asks for scores the way the preflight found the server to honour (`scoring`): JSON constrained
    by a schema, one score token read from its log-probs, JSON mode, or JSON read out of prose.
    Servers differ, and some drop `response_format` silently (mlx_lm.server, Ollama's MLX engine),
    so each way is tried on a real request before it is trusted.
A completion whose score still fails after all retries gets None: the scorer masks it. Scores
are cached on disk, and token usage is counted from the API's `usage` (estimated when absent).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import socket
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Callable

import openai

from mlx_grpo.errors import UserInputError
from mlx_grpo.rewards import judge
from mlx_grpo.rewards.cache import ScoreCache, score_key
from mlx_grpo.rewards.teacher_config import SCORING, TeacherConfig

LATENCY_WINDOW = 1000  # answered requests whose latencies the percentiles cover

RETRYABLE_STATUS = {408, 409, 429}
FORMAT_FALLBACK = {"json_schema": "json_object", "json_object": "text"}
PREFLIGHT_MESSAGES = [{"role": "user", "content": "Reply with the single word: ok"}]
TOP_LOGPROBS = (20, 10, 5)  # asked for in turn: OpenAI and Ollama take 20, mlx_lm.server at most 11
# The small real judging request of the preflight's scoring checks; the scores it gets do not matter.
PROBE_TASK = "What is 2 + 3?"
PROBE_REFERENCE = "5"
PROBE_COMPLETIONS = ["5", "2 + 3 = 6, so the answer is 6."]


@dataclass
class TeacherUsage:
    requests: int = 0  # HTTP requests sent, retries included
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated_requests: int = 0  # replies without `usage`, whose tokens were estimated
    retries: int = 0
    invalid_replies: int = 0
    scored: int = 0  # completions scored by the teacher
    cache_hits: int = 0  # completions whose scores came from the cache
    failed: int = 0  # completions left unscored after every retry
    token_scores: int = 0  # scores read from log-probs (scoring: logprobs), one per completion and criterion
    low_mass: int = 0  # ... of them unanswered: too little probability on the score tokens
    cost_usd: float = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def snapshot(self) -> "TeacherUsage":
        return TeacherUsage(**asdict(self))

    def since(self, before: "TeacherUsage") -> "TeacherUsage":
        return TeacherUsage(**{k: v - getattr(before, k) for k, v in asdict(self).items()})


class RateLimiter:
    """Spaces request starts evenly at `per_minute` (0: no limit). Used from one event loop only."""

    def __init__(self, per_minute: float):
        self.interval = 60.0 / per_minute if per_minute > 0 else 0.0
        self.next_start = 0.0

    async def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        start = max(now, self.next_start)
        self.next_start = start + self.interval
        await asyncio.sleep(start - now)


class RequestFailed(Exception):
    """A request that cannot succeed by retrying (bad key, unknown model, ...)."""


def api_key(cfg: TeacherConfig) -> str:
    """The key from the environment variable the rubric names; local servers need none."""
    if not cfg.api_key_env:
        return "no-key-needed"
    key = os.environ.get(cfg.api_key_env, "").strip()
    if not key:
        raise UserInputError(f"{cfg.api_key_env} is not set; the rubric's teacher reads its API key from it "
                             f"(export {cfg.api_key_env}=..., or remove api_key_env for a local server)")
    return key


def retry_after_s(err: Exception) -> float:
    """Seconds the server asked us to wait (Retry-After / retry-after-ms), or 0."""
    response = getattr(err, "response", None)
    headers = getattr(response, "headers", None) or {}
    try:
        if headers.get("retry-after-ms"):
            return float(headers["retry-after-ms"]) / 1000
        value = headers.get("retry-after")
        if not value:
            return 0.0
        try:
            return max(0.0, float(value))
        except ValueError:  # an HTTP date
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return 0.0


def is_transient(err: Exception) -> bool:
    if isinstance(err, (openai.APITimeoutError, openai.APIConnectionError)):
        return True
    status = getattr(err, "status_code", None)
    return status is not None and (status in RETRYABLE_STATUS or status >= 500)


class Unanswered(Exception):
    """A reply that holds no usable score, where asking again the same way cannot help."""


class Teacher:
    def __init__(self, cfg: TeacherConfig, criteria, rubric_version: str, cache: ScoreCache | None = None,
                 warn: Callable[[str], None] = print):
        self.cfg = cfg
        self.criteria = [c for c in criteria if c.judge is not None]
        self.rubric_version = rubric_version
        self.cache = cache
        self.warn = warn
        self._key = api_key(cfg)
        self.usage = TeacherUsage()
        # Seconds per answered request, for Scoring/Teacher_Latency*: the latest LATENCY_WINDOW, so
        # neither memory nor a checkpoint grows with the length of the run.
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.last_error = ""
        # How scores are asked for. `auto` starts at json_schema and steps down on a 400 until the
        # preflight has checked what the server really honours (`choose_scoring`).
        self.scoring = "json_schema" if cfg.scoring == "auto" else cfg.scoring
        self.scoring_note = ""  # what the preflight found, for the start-up line
        self.top_logprobs = TOP_LOGPROBS[0]
        self._warned: set[str] = set()
        self._client: openai.AsyncOpenAI | None = None  # made lazily inside the event loop that uses it
        self._limiter = RateLimiter(cfg.requests_per_minute)
        self._slots: asyncio.Semaphore | None = None

    # -- public ------------------------------------------------------------------------------

    async def preflight(self) -> None:
        """Fail fast, in one line, if the teacher is unusable; then check which way of scoring the
        server really honours (`scoring`), rather than assume that it does."""
        if self.criteria:
            await self.choose_scoring()  # its first request also finds a bad URL, key or model
            return
        try:
            await self._send(PREFLIGHT_MESSAGES, scoring="text", max_tokens=16)
        except Exception as err:  # noqa: BLE001 - every failure becomes one line for the user
            raise UserInputError(f"teacher preflight failed: {self.describe(err)}") from None

    async def choose_scoring(self) -> None:
        """Try each way of scoring (only the configured one unless `auto`) on a small real judging
        request, and keep the first whose reply is usable. A configured one that fails stops the run
        in one line; plain text is the last resort and only warns."""
        wanted = SCORING[1:] if self.cfg.scoring == "auto" else (self.cfg.scoring,)
        found = []
        for scoring in wanted:
            self.scoring = scoring
            problem = await self._probe(scoring)
            if problem is None:
                self.scoring, self.scoring_note = scoring, "; ".join(found)
                return
            found.append(f"{scoring}: {problem}")
            if scoring != "text" and self.cfg.scoring != "auto":
                raise UserInputError(f"teacher preflight: the teacher at {self.cfg.shown_url} cannot score with "
                                     f"scoring: {scoring}: {problem} (scoring: auto picks what works)")
        self.scoring, self.scoring_note = "text", "; ".join(found)
        self.warn(f"no reply of the teacher at {self.cfg.shown_url} to a test request could be used "
                  f"({self.scoring_note}); scoring as plain text, expect masked completions")

    def describe_scoring(self) -> str:
        """One line: how scores are asked for, and why (for train, rubric check and audit)."""
        how = {"json_schema": "JSON, schema-constrained", "json_object": "JSON mode",
               "text": "JSON read from plain text",
               "logprobs": f"one score token, read from its top-{self.top_logprobs} log-probs"}[self.scoring]
        line = f"scoring {self.scoring} ({how})"
        if self.scoring == "logprobs" and self.cfg.mode == "group":
            line += ", each completion judged alone (group mode shows groups only to JSON scoring)"
        if self.cfg.scoring == "auto":
            line += ", chosen by auto" + (f" after {self.scoring_note}" if self.scoring_note else "")
        return line

    async def judge_group(self, prompt: str, reference: str | None, completions: list[str]) -> list[dict | None]:
        """Scores {criterion: [score in [0, 1], justification]} for each completion, or None if it failed.

        Completions already in the cache cost nothing; identical completions are asked once.
        """
        keys = [self._cache_key(prompt, reference, text) for text in completions]
        found = {key: self.cache.get(key) for key in set(keys)} if self.cache is not None else {}
        found = {key: value for key, value in found.items() if value is not None}
        self.usage.cache_hits += sum(key in found for key in keys)
        todo = {key: text for key, text in zip(keys, completions) if key not in found}
        if todo and self.cfg.mode == "group":
            found.update(await self._judge_together(prompt, reference, todo))
        elif todo:  # single mode: one request per completion
            replies = await self.judge_in_order(prompt, reference, list(todo.values()))
            found.update({key: reply for key, reply in zip(todo, replies) if reply is not None})
        for key in todo:
            if key in found:
                self.usage.scored += 1
                if self.cache is not None:
                    self.cache.put(key, found[key])
        results = [found.get(key) for key in keys]
        self.usage.failed += sum(r is None for r in results)
        return results

    @property
    def shows_groups(self) -> bool:
        """Whether a request shows a prompt's completions side by side (group mode, JSON scoring)."""
        return self.cfg.mode == "group" and self.scoring != "logprobs"

    def describe(self, err: Exception) -> str:
        """One line about a failed request, naming the endpoint and never the key."""
        url = self.cfg.shown_url
        if isinstance(err, openai.APITimeoutError):
            text = f"the teacher at {url} did not answer within {self.cfg.timeout_s:g}s (timeout_s)"
        elif isinstance(err, openai.APIConnectionError):
            text = f"cannot reach {url}: {_connection_reason(err)}"
        elif isinstance(err, openai.AuthenticationError):
            source = f"from {self.cfg.api_key_env}" if self.cfg.api_key_env else "(no api_key_env is set)"
            text = f"the teacher at {url} rejected the API key {source} (401)"
        elif isinstance(err, openai.NotFoundError):
            text = f"404 from {url}: no model {self.cfg.model!r} there, or the URL is missing its /v1"
        elif isinstance(err, openai.APIStatusError):
            text = f"the teacher at {url} answered {err.status_code}: {_message(err)}"
        else:
            text = f"teacher request to {url} failed: {type(err).__name__}: {err}"
        return " ".join(text.replace(self._key, "***").split())

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    # -- requests ----------------------------------------------------------------------------

    def _cache_key(self, prompt: str, reference: str | None, completion: str) -> str:
        return score_key(self.cfg.model, self.cfg.base_url, self.cfg.mode, self.scoring, self.rubric_version,
                         prompt, reference, completion)

    async def judge_in_order(self, prompt: str, reference: str | None, completions: list[str],
                             grouped: bool | None = None) -> list[dict | None]:
        """Scores for `completions` shown exactly in this order, bypassing the cache: the audit's probes
        need to choose the order and to ask again. `grouped` overrides the rubric's mode; log-prob
        scoring judges each completion alone either way."""
        if self.scoring == "logprobs":
            return list(await asyncio.gather(*(self._judge_by_tokens(prompt, reference, text)
                                               for text in completions)))
        if not (self.cfg.mode == "group" if grouped is None else grouped):
            replies = await asyncio.gather(*(self._judge_one(prompt, reference, text) for text in completions))
            return list(replies)
        messages, schema, parse = self._json_request(prompt, reference, completions, grouped=True)
        replies = await self._ask(messages, self._json_reader(parse), schema=schema)
        return [None] * len(completions) if replies is None else replies

    async def _judge_together(self, prompt: str, reference: str | None, todo: dict[str, str]) -> dict:
        keys = list(todo)
        # Shuffle against position bias, deterministically so a rerun shows the same order.
        random.Random(score_key(prompt, *todo.values())).shuffle(keys)
        replies = await self.judge_in_order(prompt, reference, [todo[k] for k in keys], grouped=True)
        return {key: reply for key, reply in zip(keys, replies) if reply is not None}

    async def _judge_one(self, prompt: str, reference: str | None, completion: str) -> dict | None:
        messages, schema, parse = self._json_request(prompt, reference, [completion], grouped=False)
        replies = await self._ask(messages, self._json_reader(parse), schema=schema)
        return None if replies is None else replies[0]

    def _json_request(self, prompt: str, reference: str | None, completions: list[str], grouped: bool):
        """(messages, schema, parse) of a JSON judging request showing `completions` in this order (one,
        unless grouped); `parse(text)` gives each completion's {criterion: [score, justification]}, or
        raises InvalidReply."""
        if grouped:
            ids = judge.completion_ids(len(completions))
            messages = judge.group_messages(prompt, reference, list(zip(ids, completions)), self.criteria)

            def parse(text: str) -> list[dict]:
                reply = judge.parse_group_reply(text, ids, self.criteria)
                return [{name: list(v) for name, v in reply[cid].items()} for cid in ids]
        else:
            messages = judge.single_messages(prompt, reference, completions[0], self.criteria)

            def parse(text: str) -> list[dict]:
                return [{name: list(v) for name, v in judge.parse_single_reply(text, self.criteria).items()}]
        return messages, judge.reply_schema(self.criteria, grouped=grouped), parse

    async def _judge_by_tokens(self, prompt: str, reference: str | None, completion: str) -> dict | None:
        """One request per criterion, each asking for one score token; None if any is unanswered."""
        async def one(criterion):
            messages = judge.logprob_messages(prompt, reference, completion, criterion)
            return await self._ask(messages, self._token_reader(criterion), scoring="logprobs")

        scores = await asyncio.gather(*(one(c) for c in self.criteria))
        if any(score is None for score in scores):
            return None
        return {c.name: [score.value, score.why()] for c, score in zip(self.criteria, scores)}

    def _json_reader(self, parse):
        """Reads a JSON reply with `parse`; InvalidReply (retried with the problem stated) otherwise."""
        def read(choice: dict):
            if choice.get("finish_reason") == "length":
                raise judge.InvalidReply(f"the reply was cut off at max_tokens ({self.cfg.max_tokens}); keep each "
                                         "justification to one short sentence" + _thinking_hint(choice))
            return parse(_content(choice))
        return read

    def _token_reader(self, criterion):
        """Reads the expected score from the first token's log-probs; Unanswered below min_logprob_mass."""
        def read(choice: dict) -> judge.TokenScore:
            candidates = judge.first_token_candidates(choice)
            if candidates is None:
                self.usage.invalid_replies += 1
                raise Unanswered(f"the teacher at {self.cfg.shown_url} returned no log-probs")
            score = judge.read_token_scores(candidates, criterion)
            self.usage.token_scores += 1
            problem = _low_mass(score, candidates, choice, self.cfg.min_logprob_mass)
            if problem:
                self.usage.low_mass += 1
                raise Unanswered(f"{criterion.name}: {problem}")
            return score
        return read

    async def _ask(self, messages: list[dict], read, schema: dict | None = None, scoring: str | None = None):
        """Send until `read` accepts the reply; None after max_retries retries, a hopeless error or an
        Unanswered reply."""
        attempt, request = 0, messages
        while True:
            delay = 0.0
            try:
                choice = await self._send(request, scoring=scoring, schema=schema)
                return read(choice)
            except Unanswered as err:
                self.last_error = str(err)
                return None
            except judge.InvalidReply as err:
                self.usage.invalid_replies += 1
                self.last_error = f"invalid reply: {err}"
                request = judge.retry_messages(messages, _content(choice), str(err))
            except openai.APIStatusError as err:
                if err.status_code in (400, 422) and (self._fall_back(err) or self._fewer_logprobs(err)):
                    continue  # same request, in a form the server takes; not a retry
                self.last_error = self.describe(err)
                if not is_transient(err):
                    return None
                delay = self._backoff(attempt, retry_after_s(err))
            except (openai.APITimeoutError, openai.APIConnectionError) as err:
                self.last_error = self.describe(err)
                delay = self._backoff(attempt, 0.0)
            attempt += 1
            if attempt > self.cfg.max_retries:
                return None
            self.usage.retries += 1
            await asyncio.sleep(delay)

    async def _send(self, messages: list[dict], scoring: str | None = None, schema: dict | None = None,
                    max_tokens: int | None = None) -> dict:
        """One HTTP request; returns the first choice as a dict (message, finish_reason, logprobs) and
        counts its tokens. `scoring` overrides the teacher's current way of scoring."""
        if self._client is None:
            self._client = openai.AsyncOpenAI(base_url=self.cfg.base_url, api_key=self._key,
                                              timeout=self.cfg.timeout_s, max_retries=0)
            self._slots = asyncio.Semaphore(self.cfg.max_concurrency)
        kwargs = {"model": self.cfg.model, "messages": messages, "temperature": self.cfg.temperature,
                  "max_tokens": max_tokens or self.cfg.max_tokens}
        passed = {"chat_template_kwargs": self.cfg.chat_template_kwargs, "reasoning_effort": self.cfg.reasoning_effort}
        if any(passed.values()):
            kwargs["extra_body"] = {key: value for key, value in passed.items() if value}
        await self._limiter.wait()
        async with self._slots:
            # Chosen inside the slot so a fallback found by another request applies at once.
            fmt = scoring or self.scoring
            if fmt == "json_schema" and schema is not None:
                kwargs["response_format"] = {"type": "json_schema",
                                             "json_schema": {"name": "scores", "strict": True, "schema": schema}}
            elif fmt == "json_object":
                kwargs["response_format"] = {"type": "json_object"}
            elif fmt == "logprobs":  # one token: the score
                kwargs.update(max_tokens=1, logprobs=True, top_logprobs=self.top_logprobs)
            self.usage.requests += 1
            sent_at = time.perf_counter()
            try:
                response = await self._client.chat.completions.create(**kwargs)
            except openai.APIStatusError as err:
                err.sent_format = fmt  # lets _fall_back tell a stale rejection from a new one
                err.sent_top_logprobs = kwargs.get("top_logprobs")
                raise
            self.latencies.append(time.perf_counter() - sent_at)
        choice = response.choices[0].model_dump() if response.choices else {}
        self._count(messages, _content(choice), getattr(response, "usage", None))
        return choice

    def _count(self, messages: list[dict], text: str, usage) -> None:
        prompt = getattr(usage, "prompt_tokens", None)
        completion = getattr(usage, "completion_tokens", None)
        if prompt is None or completion is None:
            # No usage from this server: estimate at ~4 characters per token, and say so once.
            prompt = sum(len(m["content"]) for m in messages) // 4
            completion = max(1, len(text) // 4)
            self.usage.estimated_requests += 1
            self._warn_once("usage", f"the teacher at {self.cfg.shown_url} returns no token usage; "
                                     "token counts are estimated (characters / 4)")
        self.usage.prompt_tokens += prompt
        self.usage.completion_tokens += completion
        self.usage.cost_usd += self.cfg.budget.cost(self.cfg.model, prompt, completion)

    # -- what the server honours --------------------------------------------------------------

    async def _probe(self, scoring: str) -> str | None:
        """None if a small real judging request scored this way gives a usable reply, else what went wrong."""
        completions = PROBE_COMPLETIONS if self.cfg.mode == "group" else PROBE_COMPLETIONS[:1]
        try:
            if scoring == "logprobs":
                criterion = self.criteria[0]
                messages = judge.logprob_messages(PROBE_TASK, PROBE_REFERENCE, completions[0], criterion)
                while True:
                    try:
                        choice = await self._send(messages, scoring="logprobs")
                        return self._logprob_problem(choice, criterion)
                    except openai.APIStatusError as err:
                        if not (err.status_code in (400, 422) and self._fewer_logprobs(err)):
                            raise
            if scoring == "text":  # the normal path, retries included: prose around the JSON is fine here
                replies = await self.judge_in_order(PROBE_TASK, PROBE_REFERENCE, completions)
                return None if all(r is not None for r in replies) else f"no usable reply ({self.last_error})"
            messages, schema, parse = self._json_request(PROBE_TASK, PROBE_REFERENCE, completions,
                                                         grouped=self.cfg.mode == "group")
            choice = await self._send(messages, scoring=scoring, schema=schema)
            return _strict_json_problem(choice, parse)
        except openai.APIStatusError as err:
            if err.status_code in (400, 422):
                return f"rejected ({_message(err)})"
            raise UserInputError(f"teacher preflight failed: {self.describe(err)}") from None
        except Exception as err:  # noqa: BLE001 - every failure becomes one line for the user
            raise UserInputError(f"teacher preflight failed: {self.describe(err)}") from None

    def _logprob_problem(self, choice: dict, criterion) -> str | None:
        candidates = judge.first_token_candidates(choice)
        if candidates is None:
            return "no log-probs in the reply"
        problem = _low_mass(judge.read_token_scores(candidates, criterion), candidates, choice,
                            self.cfg.min_logprob_mass)
        if problem:
            return problem
        if len(candidates) < 2:
            self._warn_once("top_logprobs", f"the teacher at {self.cfg.shown_url} returns only the chosen token's "
                                            "log-prob, not its alternatives: scores are whole steps")
        return None

    def _fall_back(self, err: Exception) -> bool:
        """On a 400/422 while asking for structured output, use the next simpler format instead."""
        if self.cfg.scoring != "auto":
            return False
        sent = getattr(err, "sent_format", self.scoring)
        if sent not in FORMAT_FALLBACK:
            return False
        if sent != self.scoring:
            return True  # a concurrent request already moved to a simpler format: just resend
        old, self.scoring = self.scoring, FORMAT_FALLBACK[self.scoring]
        self._warn_once(old, f"the teacher at {self.cfg.shown_url} rejected response_format {old} "
                             f"({_message(err)}); using {self.scoring} instead")
        return True

    def _fewer_logprobs(self, err: Exception) -> bool:
        """On a 400/422 naming top_logprobs, ask for fewer (mlx_lm.server takes at most 11)."""
        sent = getattr(err, "sent_top_logprobs", None)
        if sent is None or "top_logprobs" not in _message(err):
            return False
        if sent != self.top_logprobs:
            return True  # a concurrent request already lowered it
        fewer = [n for n in TOP_LOGPROBS if n < sent]
        if not fewer:
            return False
        self.top_logprobs = fewer[0]
        self._warn_once("top_logprobs", f"the teacher at {self.cfg.shown_url} takes fewer top_logprobs than {sent} "
                                        f"({_message(err)}); asking for {self.top_logprobs}")
        return True

    def _backoff(self, attempt: int, retry_after: float) -> float:
        base = min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2 ** attempt)
        return max(retry_after, base * random.uniform(0.5, 1.0))

    def _warn_once(self, topic: str, message: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            self.warn(message)


def _low_mass(score: judge.TokenScore, candidates: list[tuple[str, float]], choice: dict, min_mass: float) -> str:
    """Why a score read from log-probs cannot be used (its score tokens hold under `min_mass`), or ""."""
    if score.value is not None and score.mass >= min_mass:
        return ""
    top = ", ".join(repr(token) for token, _ in sorted(candidates, key=lambda c: -c[1])[:4])
    return (f"only {score.mass:.0%} of the first token's probability is on score tokens "
            f"({', '.join(score.probs)}; min_logprob_mass {min_mass:g}); its top tokens are {top}"
            + _thinking_hint(choice, candidates))


def _content(choice: dict) -> str:
    message = choice.get("message") or {}
    return message.get("content") or ""


def _thinking_hint(choice: dict, candidates: list[tuple[str, float]] = ()) -> str:
    """A hint when the judge thinks before it answers (a <think> block or a separate reasoning field)."""
    message = choice.get("message") or {}
    thinks = (bool(message.get("reasoning_content") or message.get("reasoning")) or "<think>" in _content(choice)
              or any("think" in token for token, _ in candidates))
    return ("; the judge thinks before it answers: set chat_template_kwargs: {enable_thinking: false} or "
            "reasoning_effort: low in the rubric's teacher block" if thinks else "")


def _strict_json_problem(choice: dict, parse) -> str | None:
    """None if the reply is exactly one JSON document (no prose around it) that `parse` accepts."""
    text = _content(choice).strip()
    if choice.get("finish_reason") == "length" and text.startswith("{"):
        return "the reply was cut off at max_tokens" + _thinking_hint(choice)
    try:
        json.loads(text)
    except ValueError:
        shown = " ".join(text.split())[:60]
        return f"the reply was not the JSON asked for (it began {shown!r}): the server ignores response_format"
    try:
        parse(text)
    except judge.InvalidReply as err:
        return f"the reply did not match the schema ({err})"
    return None


def _connection_reason(err: Exception) -> str:
    """The root cause of a connection error, e.g. 'connection refused', from its exception chain."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen and len(chain) < 16:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    for exc in reversed(chain):  # innermost first
        if isinstance(exc, ConnectionRefusedError):
            return "connection refused"
        if isinstance(exc, socket.gaierror):
            return "unknown host name"
    for exc in reversed(chain):
        if isinstance(exc, OSError) and exc.strerror:
            return exc.strerror.lower()
    return str(chain[-1]) if len(chain) > 1 else str(chain[0])


def _message(err: Exception) -> str:
    body = getattr(err, "body", None)  # the openai client keeps the "error" member of the reply, if any
    if isinstance(body, dict):
        body = body.get("error", body)
    if isinstance(body, str) and body.strip():  # mlx_lm.server: {"error": "top_logprobs must be at most 11"}
        return body.strip()[:200]
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])[:200]
    return str(getattr(err, "message", err))[:200]
