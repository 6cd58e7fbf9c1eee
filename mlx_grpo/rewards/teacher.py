"""The teacher client: scores completions on `judge` criteria through any OpenAI-compatible API.

Async throughout, so the scorer can keep many requests in flight (up to `max_concurrency`,
spaced by `requests_per_minute`) while the trainer does other work. Every request:
  - is retried on 408/409/429/5xx, timeouts and connection errors with exponential backoff and
    jitter, waiting at least as long as the server's Retry-After says;
  - is retried, with the problem explained to the teacher, when its reply is not exactly valid;
  - falls back from JSON-schema output to JSON mode to plain text (parsed out of prose) when the
    server rejects `response_format` (LM Studio, Ollama and mlx_lm.server differ here).
A completion whose score still fails after all retries gets None: the scorer masks it. Scores
are cached on disk, and token usage is counted from the API's `usage` (estimated when absent).
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import socket
import time
from dataclasses import asdict, dataclass
from typing import Callable

import openai

from mlx_grpo.errors import UserInputError
from mlx_grpo.rewards import judge
from mlx_grpo.rewards.cache import ScoreCache, score_key
from mlx_grpo.rewards.teacher_config import TeacherConfig

RETRYABLE_STATUS = {408, 409, 429}
FORMAT_FALLBACK = {"json_schema": "json_object", "json_object": "text"}
PREFLIGHT_MESSAGES = [{"role": "user", "content": "Reply with the single word: ok"}]


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
        self.latencies: list[float] = []  # seconds per answered request, for Scoring/Teacher_Latency*
        self.last_error = ""
        self.response_format = "json_schema" if cfg.response_format == "auto" else cfg.response_format
        self._warned: set[str] = set()
        self._client: openai.AsyncOpenAI | None = None  # made lazily inside the event loop that uses it
        self._limiter = RateLimiter(cfg.requests_per_minute)
        self._slots: asyncio.Semaphore | None = None

    # -- public ------------------------------------------------------------------------------

    async def preflight(self) -> None:
        """One tiny request: fail fast, with an actionable message, if the teacher is unusable."""
        try:
            await self._send(PREFLIGHT_MESSAGES, None, max_tokens=16, response_format="text")
        except Exception as err:  # noqa: BLE001 - every failure becomes one line for the user
            raise UserInputError(f"teacher preflight failed: {self.describe(err)}") from None

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
        return score_key(self.cfg.model, self.cfg.base_url, self.cfg.mode, self.rubric_version,
                         prompt, reference, completion)

    async def judge_in_order(self, prompt: str, reference: str | None, completions: list[str],
                             grouped: bool | None = None) -> list[dict | None]:
        """Scores for `completions` shown exactly in this order, bypassing the cache: the audit's probes
        need to choose the order and to ask again. `grouped` overrides the rubric's mode."""
        if not (self.cfg.mode == "group" if grouped is None else grouped):
            replies = await asyncio.gather(*(self._judge_one(prompt, reference, text) for text in completions))
            return list(replies)
        ids = judge.completion_ids(len(completions))
        messages = judge.group_messages(prompt, reference, list(zip(ids, completions)), self.criteria)
        schema = judge.reply_schema(self.criteria, grouped=True)
        reply = await self._ask(messages, schema, lambda text: judge.parse_group_reply(text, ids, self.criteria))
        if reply is None:
            return [None] * len(completions)
        return [{name: list(v) for name, v in reply[cid].items()} for cid in ids]

    async def _judge_together(self, prompt: str, reference: str | None, todo: dict[str, str]) -> dict:
        keys = list(todo)
        # Shuffle against position bias, deterministically so a rerun shows the same order.
        random.Random(score_key(prompt, *todo.values())).shuffle(keys)
        replies = await self.judge_in_order(prompt, reference, [todo[k] for k in keys], grouped=True)
        return {key: reply for key, reply in zip(keys, replies) if reply is not None}

    async def _judge_one(self, prompt: str, reference: str | None, completion: str) -> dict | None:
        messages = judge.single_messages(prompt, reference, completion, self.criteria)
        schema = judge.reply_schema(self.criteria, grouped=False)
        reply = await self._ask(messages, schema, lambda text: judge.parse_single_reply(text, self.criteria))
        return None if reply is None else {name: list(v) for name, v in reply.items()}

    async def _ask(self, messages: list[dict], schema: dict, parse):
        """Send until `parse` accepts the reply; None after max_retries retries or a hopeless error."""
        attempt, request = 0, messages
        while True:
            delay = 0.0
            try:
                text, finish = await self._send(request, schema)
                if finish == "length":
                    raise judge.InvalidReply(f"the reply was cut off at max_tokens ({self.cfg.max_tokens}); "
                                             "keep each justification to one short sentence")
                return parse(text)
            except judge.InvalidReply as err:
                self.usage.invalid_replies += 1
                self.last_error = f"invalid reply: {err}"
                request = judge.retry_messages(messages, text, str(err))
            except openai.APIStatusError as err:
                if err.status_code in (400, 422) and self._fall_back(err):
                    continue  # same request, simpler output format; not a retry
                if not is_transient(err):
                    self.last_error = self.describe(err)
                    return None
                self.last_error = self.describe(err)
                delay = self._backoff(attempt, retry_after_s(err))
            except (openai.APITimeoutError, openai.APIConnectionError) as err:
                self.last_error = self.describe(err)
                delay = self._backoff(attempt, 0.0)
            attempt += 1
            if attempt > self.cfg.max_retries:
                return None
            self.usage.retries += 1
            await asyncio.sleep(delay)

    async def _send(self, messages: list[dict], schema: dict | None, max_tokens: int | None = None,
                    response_format: str | None = None) -> tuple[str, str | None]:
        """One HTTP request; returns (reply text, finish_reason) and counts its tokens."""
        if self._client is None:
            self._client = openai.AsyncOpenAI(base_url=self.cfg.base_url, api_key=self._key,
                                              timeout=self.cfg.timeout_s, max_retries=0)
            self._slots = asyncio.Semaphore(self.cfg.max_concurrency)
        kwargs = {"model": self.cfg.model, "messages": messages, "temperature": self.cfg.temperature,
                  "max_tokens": max_tokens or self.cfg.max_tokens}
        await self._limiter.wait()
        async with self._slots:
            # Chosen inside the slot so a fallback found by another request applies at once.
            fmt = response_format or self.response_format
            if fmt == "json_schema" and schema is not None:
                kwargs["response_format"] = {"type": "json_schema",
                                             "json_schema": {"name": "scores", "strict": True, "schema": schema}}
            elif fmt == "json_object":
                kwargs["response_format"] = {"type": "json_object"}
            self.usage.requests += 1
            sent_at = time.perf_counter()
            try:
                response = await self._client.chat.completions.create(**kwargs)
            except openai.APIStatusError as err:
                err.sent_format = fmt  # lets _fall_back tell a stale rejection from a new one
                raise
            self.latencies.append(time.perf_counter() - sent_at)
        choice = response.choices[0] if response.choices else None
        text = (choice.message.content if choice and choice.message else None) or ""
        self._count(messages, text, getattr(response, "usage", None))
        return text, getattr(choice, "finish_reason", None)

    def _count(self, messages: list[dict], text: str, usage) -> None:
        prompt = getattr(usage, "prompt_tokens", None)
        completion = getattr(usage, "completion_tokens", None)
        if prompt is None or completion is None:
            # No usage from this server: estimate at ~4 characters per token, and say so once.
            prompt = sum(len(m["content"]) for m in messages) // 4
            completion = len(text) // 4
            self.usage.estimated_requests += 1
            self._warn_once("usage", f"the teacher at {self.cfg.shown_url} returns no token usage; "
                                     "token counts are estimated (characters / 4)")
        self.usage.prompt_tokens += prompt
        self.usage.completion_tokens += completion
        self.usage.cost_usd += self.cfg.budget.cost(self.cfg.model, prompt, completion)

    def _fall_back(self, err: Exception) -> bool:
        """On a 400/422 while asking for structured output, use the next simpler format instead."""
        if self.cfg.response_format != "auto":
            return False
        sent = getattr(err, "sent_format", self.response_format)
        if sent != self.response_format:
            return True  # a concurrent request already moved to a simpler format: just resend
        if sent not in FORMAT_FALLBACK:
            return False
        old, self.response_format = self.response_format, FORMAT_FALLBACK[self.response_format]
        self._warn_once(old, f"the teacher at {self.cfg.shown_url} rejected response_format {old} "
                             f"({_message(err)}); using {self.response_format} instead")
        return True

    def _backoff(self, attempt: int, retry_after: float) -> float:
        base = min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2 ** attempt)
        return max(retry_after, base * random.uniform(0.5, 1.0))

    def _warn_once(self, topic: str, message: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            self.warn(message)


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
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])[:200]
    return str(getattr(err, "message", err))[:200]
