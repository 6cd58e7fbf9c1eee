"""The rubric's `teacher:` block: which LLM scores `judge` criteria, and how it may be called.

    teacher:
      model: gpt-4o-mini
      base_url: ${OPENAI_BASE_URL:-https://api.openai.com/v1}
      api_key_env: OPENAI_API_KEY      # the NAME of the variable; the key never goes in YAML
      mode: group                      # one request per prompt group (default), or single
      scoring: auto                    # auto, json_schema, logprobs, json_object or text (checked at preflight)
      max_concurrency: 4
      requests_per_minute: 0           # 0 = no client-side limit (429 Retry-After is still honoured)
      budget: {usd: 2.0, prices: {gpt-4o-mini: {input: 0.15, output: 0.60}}}   # or {tokens: 500000}
      audit_every: 0                   # every N steps, probe the teacher with the step's completions
      on_gaming: warn                  # completions that address the grader: warn, mask or zero

Every key is validated here at load, with one-line errors naming the file and the field.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field, fields
from urllib.parse import urlsplit, urlunsplit

from mlx_grpo.errors import UserInputError

MODES = ("group", "single")
# How scores are asked for, best first: `auto` takes the first one the preflight finds working.
SCORING = ("auto", "json_schema", "logprobs", "json_object", "text")
RENAMED = {"response_format": "scoring"}
ON_GAMING = ("warn", "mask", "zero")


@dataclass(frozen=True)
class Budget:
    tokens: int | None = None  # stop after this many prompt + completion tokens
    usd: float | None = None  # ... or after this much spend, priced with `prices`
    prices: dict = field(default_factory=dict)  # model -> (USD per 1M input tokens, per 1M output tokens)

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        if model not in self.prices:
            return 0.0
        per_input, per_output = self.prices[model]
        return (prompt_tokens * per_input + completion_tokens * per_output) / 1e6


def redact_url(url: str) -> str:
    """The URL with any password and key-like query values replaced by ***, for logs and errors."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password:
        netloc = netloc.replace(f":{parts.password}@", ":***@")
    query = re.sub(r"(?i)\b((?:api[_-]?)?key|token|secret|password|sig)=[^&]*", r"\1=***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


@dataclass(frozen=True)
class TeacherConfig:
    model: str
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str = ""  # empty: no key (local servers such as LM Studio, Ollama, mlx_lm.server)
    mode: str = "group"
    temperature: float = 0.0
    max_tokens: int = 2048  # per reply; a group reply holds G completions x criteria justifications
    timeout_s: float = 60.0  # per request
    max_concurrency: int = 4
    requests_per_minute: float = 0.0
    max_retries: int = 3  # per request, for transient HTTP errors and invalid replies alike
    backoff_s: float = 1.0  # first retry delay; doubles each retry, with jitter
    max_backoff_s: float = 60.0
    scoring: str = "auto"  # json_schema, logprobs (one score token), json_object, text; auto: the best that works
    min_logprob_mass: float = 0.5  # logprobs: a score whose score tokens hold less probability is unanswered
    chat_template_kwargs: dict = field(default_factory=dict)  # passed to the server, e.g. {enable_thinking: false}
    reasoning_effort: str = ""  # passed to the server when set, e.g. low (reasoning models)
    max_failure_rate: float = 0.5  # stop the run when more than this fraction of recent scores fail
    failure_window: int = 64  # ... measured over this many recent judged completions (once a quarter are in)
    budget: Budget = field(default_factory=Budget)
    audit_every: int = 0  # every N steps rerun the injection and position probes on the step's completions (0: off)
    on_gaming: str = "warn"  # a completion that addresses the grader: warn (count it), mask (no advantage), zero

    @property
    def shown_url(self) -> str:
        """base_url safe to print: a password or key in it is replaced by ***."""
        return redact_url(self.base_url)


KEYS = tuple(f.name for f in fields(TeacherConfig))


def parse_teacher(raw: dict, where: str) -> TeacherConfig:
    """Validate an interpolated `teacher:` mapping; `where` prefixes every error ("file: teacher")."""
    for old, new in RENAMED.items():
        if old in raw:
            raise UserInputError(f"{where}.{old}: renamed to {new} (one of {', '.join(SCORING)})")
    if "api_key" in raw:  # never echo the value: it is a secret
        raise UserInputError(f"{where}.api_key: do not put the key in the rubric; export it and name the "
                             "variable in api_key_env (e.g. api_key_env: OPENAI_API_KEY)")
    unknown = [k for k in raw if k not in KEYS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserInputError(f"{where}: unknown key {unknown[0]!r}{hint} (valid keys: {', '.join(KEYS)})")
    if not raw.get("model") or not isinstance(raw["model"], str):
        raise UserInputError(f"{where}.model: name the teacher model, e.g. model: gpt-4o-mini")
    values: dict = {"model": raw["model"].strip()}
    for key in ("base_url", "api_key_env"):
        if key in raw:
            if not isinstance(raw[key], str):
                raise UserInputError(f"{where}.{key}: must be text, got {raw[key]!r}")
            values[key] = raw[key].strip()
    if not values.get("base_url", "http://").startswith(("http://", "https://")):
        raise UserInputError(f"{where}.base_url: must start with http:// or https://, got {values['base_url']!r}")
    for key, choices in (("mode", MODES), ("scoring", SCORING), ("on_gaming", ON_GAMING)):
        if key in raw:
            if raw[key] not in choices:
                raise UserInputError(f"{where}.{key}: must be one of {', '.join(choices)}, got {raw[key]!r}")
            values[key] = raw[key]
    for key, low, integer in (("temperature", 0.0, False), ("max_tokens", 1, True), ("timeout_s", 0.0, False),
                              ("max_concurrency", 1, True), ("requests_per_minute", 0.0, False),
                              ("max_retries", 0, True), ("backoff_s", 0.0, False), ("max_backoff_s", 0.0, False),
                              ("failure_window", 1, True), ("audit_every", 0, True)):
        if key in raw:
            values[key] = _number(raw[key], f"{where}.{key}", low=low, integer=integer)
    if "timeout_s" in values and values["timeout_s"] <= 0:
        raise UserInputError(f"{where}.timeout_s: must be greater than 0, got {raw['timeout_s']!r}")
    if "max_failure_rate" in raw:
        rate = _number(raw["max_failure_rate"], f"{where}.max_failure_rate", low=0.0)
        if rate > 1:
            raise UserInputError(f"{where}.max_failure_rate: must be between 0 and 1, got {raw['max_failure_rate']!r}")
        values["max_failure_rate"] = rate
    if "min_logprob_mass" in raw:
        mass = _number(raw["min_logprob_mass"], f"{where}.min_logprob_mass", low=0.0)
        if mass > 1:
            raise UserInputError(f"{where}.min_logprob_mass: must be between 0 and 1, got {raw['min_logprob_mass']!r}")
        values["min_logprob_mass"] = mass
    if raw.get("chat_template_kwargs") is not None:
        if not isinstance(raw["chat_template_kwargs"], dict):
            raise UserInputError(f"{where}.chat_template_kwargs: must be a mapping, e.g. {{enable_thinking: false}}, "
                                 f"got {raw['chat_template_kwargs']!r}")
        values["chat_template_kwargs"] = dict(raw["chat_template_kwargs"])
    if raw.get("reasoning_effort"):
        if not isinstance(raw["reasoning_effort"], str):
            raise UserInputError(f"{where}.reasoning_effort: must be text such as low, got {raw['reasoning_effort']!r}")
        values["reasoning_effort"] = raw["reasoning_effort"].strip()
    if raw.get("budget") is not None:
        values["budget"] = _budget(raw["budget"], f"{where}.budget", values["model"])
    return TeacherConfig(**values)


def _budget(raw, where: str, model: str) -> Budget:
    if not isinstance(raw, dict) or not raw:
        raise UserInputError(f"{where}: must be a mapping: {{tokens: N}} or {{usd: X, prices: {{...}}}}")
    unknown = [k for k in raw if k not in ("tokens", "usd", "prices")]
    if unknown:
        raise UserInputError(f"{where}: unknown key {unknown[0]!r} (valid keys: tokens, usd, prices)")
    tokens = _number(raw["tokens"], f"{where}.tokens", low=1, integer=True) if "tokens" in raw else None
    usd = _number(raw["usd"], f"{where}.usd", low=0.0) if "usd" in raw else None
    if tokens is None and usd is None:
        raise UserInputError(f"{where}: give tokens (a token budget) or usd (a spend budget with prices)")
    prices = {}
    for name, price in (raw.get("prices") or {}).items():
        at = f"{where}.prices.{name}"
        if not isinstance(price, dict) or set(price) != {"input", "output"}:
            raise UserInputError(f"{at}: must be {{input: USD per 1M tokens, output: USD per 1M tokens}}")
        prices[str(name)] = (_number(price["input"], f"{at}.input", low=0.0),
                             _number(price["output"], f"{at}.output", low=0.0))
    if usd is not None and model not in prices:
        raise UserInputError(f"{where}.prices: a usd budget needs the price of model {model!r}, e.g. "
                             f"prices: {{{model}: {{input: 0.15, output: 0.60}}}} (USD per 1M tokens)")
    return Budget(tokens=tokens, usd=usd, prices=prices)


def _number(value, at: str, low: float, integer: bool = False):
    """A finite number >= low (numeric text is accepted: `${VAR}` interpolation yields text)."""
    number = None
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    if number is None or not math.isfinite(number) or number < low or (integer and not number.is_integer()):
        kind = "a whole number" if integer else "a number"
        raise UserInputError(f"{at}: must be {kind} >= {low:g}, got {value!r}")
    return int(number) if integer else number
