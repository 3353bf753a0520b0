"""Personalised copy for the loops' messages: templates by default, OpenAI-compatible providers if set.

`CopyRouter.render` turns a `CopyRequest` (a kind of message and its variables) into text. With no
providers (`AI_PROVIDERS` empty, the default) it formats `TEMPLATES` and works offline. With providers
it asks them in order: each HTTP request has the provider's timeout and goes through the provider's
circuit breaker; timeouts, connection errors, 429 and 5xx are retried with exponential backoff; then
the next provider is tried, and finally the template, so provider trouble never reaches a loop.
Answers are cached (LRU with a TTL), and every paid call is written to the `ai_costs` ledger; once
today's (UTC) spend reaches the daily budget, copy comes from the templates until the next day.

Children's data: the prompt holds the template's text and the request's variables and nothing else
(the loops pass only first names or pseudonyms, subjects and numbers), and nothing of either is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import re
import string
import unicodedata
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import orjson
from sqlalchemy import func, select

from store import AiCost, Database

from .clock import Clock, SystemClock

log = logging.getLogger(__name__)

# Per kind, `str.format` templates over the variables the loops pass (no format specs or attribute
# access). For an integer variable `n`, `{n_s}` is "s" unless it is 1.
TEMPLATES: dict[str, str] = {
    "nudge": "Your study buddies are working on {subject}. Jump in and learn together!",
    "buddy_invite": "{name} wants to study {subject} with you. Jump in and learn together!",
    "challenge_prompt": "Nice work in {subject}! Challenge a friend and see who scores higher.",
    "challenge_invite": "You've been challenged to a {subject} quiz. Think you can win?",
    "rally_invite": "{name} started a results rally in {subject}. Join in and climb the board together!",
    "rescue_request": "Your {days}-day streak ends in {hours_left}h. A quick practice keeps it going!",
    "rescue_invite": "{name}'s {days}-day streak is about to end. Practise together to save it!",
    "parent_card": "{name} finished {sessions} study session{sessions_s} this week. Share the progress!",
    "insight": "Your {subject} practice is paying off. Keep going!",
}
# What a kind says when a variable its template needs is missing.
PLAIN: dict[str, str] = {
    "nudge": "Your study buddies are online. Jump in and learn together!",
    "buddy_invite": "A friend wants to study with you. Jump in and learn together!",
    "challenge_prompt": "Nice work! Challenge a friend and see who scores higher.",
    "challenge_invite": "You've been challenged to a quiz. Think you can win?",
    "rally_invite": "You're invited to a results rally. Join in and climb the board together!",
    "rescue_request": "Your streak is about to end. A quick practice keeps it going!",
    "rescue_invite": "A friend's streak is about to end. Practise together to save it!",
    "parent_card": "Your child has been studying this week. Share the progress!",
    "insight": "Every session moves you forward. Keep going!",
}
GENERIC = "Something new is waiting for you. Come and take a look!"

MAX_COPY_CHARS = 300  # longest provider answer accepted
MAX_VALUE_CHARS = 64  # a variable's text is cut to this
MAX_VARIABLES = 16
MAX_RESPONSE_BYTES = 256 * 1024
MAX_BACKOFF = 5.0

_KEY = re.compile(r"^[a-z_][a-z0-9_]{0,31}$")
_KIND = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_LOCALE = re.compile(r"^[a-z]{2,3}(?:[-_][A-Za-z0-9]{2,8}){0,3}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_URLISH = re.compile(r"(?i)(?:[a-z][a-z0-9+.\-]*://|\bwww\.)")

SYSTEM_PROMPT = (
    "You write one short notification for a learner or a parent on an online tutoring platform. "
    "Rewrite the draft so it sounds warm, encouraging and personal, in the language of the given locale. "
    "Use only the facts in the draft and the variables: add no other names, numbers, promises, links "
    f"or contact details. Answer with the message text only, in at most {MAX_COPY_CHARS // 2} characters."
)

Value = str | int | float


@dataclass(frozen=True, slots=True)
class CopyRequest:
    kind: str  # a key of TEMPLATES ("nudge", "rally_invite", "rescue_request", "parent_card", …)
    locale: str = "en"
    variables: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CopyResult:
    text: str
    provider: str  # "template" or the provider's name
    cached: bool


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """One OpenAI-compatible endpoint (`POST {base_url}/chat/completions`); validated on construction."""

    name: str
    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 5.0  # seconds, per request, connect to last byte
    retries: int = 2  # further attempts after the first, on timeouts, connection errors, 429 and 5xx
    backoff: float = 0.25  # delay before the first retry, doubled for each further one
    price_per_1k_prompt: float = 0.0  # USD
    price_per_1k_completion: float = 0.0  # USD
    max_tokens: int = 120
    temperature: float = 0.7
    breaker_failures: int = 3  # consecutive failed requests that open the breaker
    breaker_cooldown: float = 30.0  # seconds open before one trial request

    def __post_init__(self) -> None:
        if not _NAME.match(self.name) or self.name == "template":
            raise ValueError("name must be 1-64 letters, digits, '_', '-' or '.', and not 'template'")
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be an http:// or https:// URL, not {self.base_url!r}")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError("base_url must not carry credentials, a query or a fragment")
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        if not self.model.strip() or len(self.model) > 64:
            raise ValueError("model must be a non-empty name of at most 64 characters")
        _check_range("timeout", self.timeout, 0.0, 300.0, open_low=True)
        _check_range("retries", self.retries, 0, 10, integer=True)
        _check_range("backoff", self.backoff, 0.0, MAX_BACKOFF)
        _check_range("price_per_1k_prompt", self.price_per_1k_prompt, 0.0, 1000.0)
        _check_range("price_per_1k_completion", self.price_per_1k_completion, 0.0, 1000.0)
        _check_range("max_tokens", self.max_tokens, 1, 4096, integer=True)
        _check_range("temperature", self.temperature, 0.0, 2.0)
        _check_range("breaker_failures", self.breaker_failures, 1, 1000, integer=True)
        _check_range("breaker_cooldown", self.breaker_cooldown, 0.0, 86400.0)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for one call: tokens / 1000 * the price per 1k, prompt and completion."""
        return (
            prompt_tokens / 1000 * self.price_per_1k_prompt
            + completion_tokens / 1000 * self.price_per_1k_completion
        )


def _check_range(
    name: str, value: object, low: float, high: float, *, integer: bool = False, open_low: bool = False
) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (integer and not isinstance(value, int))
    ):
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, not {value!r}")
    if not math.isfinite(value) or value < low or value > high or (open_low and value == low):
        raise ValueError(f"{name} must be {'>' if open_low else '>='} {low:g} and <= {high:g}, not {value!r}")


_STRING_KEYS = {"name", "base_url", "model", "api_key", "api_key_env"}
_NUMBER_KEYS = {f.name for f in fields(ProviderConfig)} - _STRING_KEYS


def parse_providers(value: str, *, environ: Mapping[str, str] | None = None) -> list[ProviderConfig]:
    """The providers of an `AI_PROVIDERS` value: a JSON list of objects with `name`, `base_url`,
    `model`, optionally `api_key` or `api_key_env` (the name of an environment variable holding it)
    and any other `ProviderConfig` field. Empty means none (templates only); bad input raises
    ValueError saying what is wrong."""
    if not value.strip():
        return []
    try:
        data = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"AI_PROVIDERS is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise ValueError("AI_PROVIDERS must be a JSON list of provider objects")
    env = os.environ if environ is None else environ
    providers: list[ProviderConfig] = []
    for index, item in enumerate(data):
        where = f"AI_PROVIDERS[{index}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where} must be an object")
        unknown = set(item) - _STRING_KEYS - _NUMBER_KEYS
        if unknown:
            raise ValueError(f"{where} has unknown key(s): {', '.join(sorted(unknown))}")
        missing = {"name", "base_url", "model"} - set(item)
        if missing:
            raise ValueError(f"{where} is missing {', '.join(sorted(missing))}")
        for key in _STRING_KEYS & set(item):
            if not isinstance(item[key], str) and not (key == "api_key" and item[key] is None):
                raise ValueError(f"{where}: {key} must be a string")
        options = {k: v for k, v in item.items() if k != "api_key_env"}
        if "api_key_env" in item:
            if "api_key" in item:
                raise ValueError(f"{where}: give api_key or api_key_env, not both")
            options["api_key"] = env.get(item["api_key_env"]) or None
            if options["api_key"] is None:
                raise ValueError(f"{where}: environment variable {item['api_key_env']!r} is not set")
        try:
            provider = ProviderConfig(**options)
        except ValueError as exc:
            raise ValueError(f"{where} ({item['name']!r}): {exc}") from None
        if any(p.name == provider.name for p in providers):
            raise ValueError(f"{where}: the name {provider.name!r} is used twice")
        host = urlsplit(provider.base_url).hostname or ""
        if provider.api_key and provider.base_url.startswith("http://") and not _loopback(host):
            log.warning("AI provider %s gets its API key over plain http to %s", provider.name, host)
        providers.append(provider)
    return providers


def _loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host == "::1"


# ---------------------------------------------------------------------------------------------------
# Templates


def clean_variables(variables: Mapping[str, Any]) -> dict[str, Value]:
    """The variables fit for a template and a prompt: identifier keys, scalar values only; text
    without control characters, whitespace collapsed, cut to MAX_VALUE_CHARS; empty values dropped."""
    cleaned: dict[str, Value] = {}
    for key, value in variables.items():
        if len(cleaned) >= MAX_VARIABLES or not isinstance(key, str) or not _KEY.match(key):
            continue
        out: Value | None = None
        if isinstance(value, bool):
            out = "yes" if value else "no"
        elif isinstance(value, int):
            out = value
        elif isinstance(value, float) and math.isfinite(value):
            out = int(value) if value.is_integer() else round(value, 2)
        elif isinstance(value, str):
            text = "".join(_clean_char(c) for c in value)
            out = " ".join(text.split())[:MAX_VALUE_CHARS].strip() or None
        if out is not None:
            cleaned[key] = out
    return cleaned


_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _clean_char(c: str) -> str:
    """Controls and line or paragraph breaks become spaces; bidi overrides and unassigned code points go."""
    category = unicodedata.category(c)
    if category in ("Cc", "Zl", "Zp", "Zs"):
        return " "
    if c in _BIDI or category in ("Cs", "Co", "Cn"):
        return ""
    return c


def template_text(kind: str, variables: Mapping[str, Any]) -> str:
    """The kind's template with the variables filled in; its plain text when one is missing."""
    values = clean_variables(variables)
    template = TEMPLATES.get(kind)
    if template is None:
        return GENERIC
    needed = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    plurals = {f"{k}_s": "" if v == 1 else "s" for k, v in values.items() if isinstance(v, int)}
    fill = {**plurals, **{k: str(v) for k, v in values.items()}}
    if not needed <= fill.keys():
        return PLAIN.get(kind, GENERIC)
    return template.format_map(fill)


def build_messages(
    kind: str, locale: str, variables: Mapping[str, Value], draft: str
) -> list[dict[str, str]]:
    """The chat prompt: fixed instructions, then the draft and the variables (nothing else)."""
    facts = orjson.dumps(dict(sorted(variables.items()))).decode()
    user = f"Kind: {kind}\nLocale: {locale}\nVariables: {facts}\nDraft: {draft}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def clean_answer(content: object) -> str | None:
    """A provider's text made fit to send, or None when it is not: non-empty after stripping
    whitespace and wrapping quotes, at most MAX_COPY_CHARS, and free of links."""
    if not isinstance(content, str):
        return None
    text = " ".join(content.split())
    while len(text) >= 2 and text[0] + text[-1] in ('""', "''", "\u201c\u201d", "\u2018\u2019", "``"):
        text = text[1:-1].strip()
    if not text or len(text) > MAX_COPY_CHARS or _URLISH.search(text):
        return None
    return text


# ---------------------------------------------------------------------------------------------------
# Breaker, cache, ledger

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Closed until `failures` consecutive failed requests, then open: requests are refused. After
    `cooldown` seconds (on the clock) it half-opens and lets exactly one trial request through; the
    trial's success closes it, its failure re-opens it for another cool-down."""

    def __init__(self, failures: int, cooldown: float, clock: Clock) -> None:
        self.threshold = failures
        self.cooldown = cooldown
        self._clock = clock
        self.state: BreakerState = "closed"
        self.consecutive_failures = 0
        self._opened_at = 0.0

    def _now(self) -> float:
        return self._clock.now().timestamp()

    def allow(self) -> bool:
        """May a request go out now? Taking the half-open trial slot counts as sending it."""
        if self.state == "closed":
            return True
        if self.state == "open" and self._now() - self._opened_at >= self.cooldown:
            self.state = "half_open"
            return True
        return False

    def success(self) -> None:
        self.state = "closed"
        self.consecutive_failures = 0

    def failure(self) -> None:
        self.consecutive_failures += 1
        if self.state == "half_open" or (
            self.state == "closed" and self.consecutive_failures >= self.threshold
        ):
            self.state = "open"
            self._opened_at = self._now()

    def abandon(self) -> None:
        """A trial request ended without an outcome (cancelled): the next caller may try again."""
        if self.state == "half_open":
            self.state = "open"


class _Cache:
    """LRU of provider answers with a TTL (seconds on the clock)."""

    def __init__(self, size: int, ttl: float) -> None:
        self.size = size
        self.ttl = ttl
        self._items: OrderedDict[tuple[Any, ...], tuple[float, str, str]] = OrderedDict()

    def get(self, key: tuple[Any, ...], now: float) -> tuple[str, str] | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= now:
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return item[1], item[2]

    def put(self, key: tuple[Any, ...], text: str, provider: str, now: float) -> None:
        if self.size <= 0 or self.ttl <= 0:
            return
        self._items[key] = (now + self.ttl, text, provider)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)


class _Ledger:
    """Today's spend: the `ai_costs` sum for the UTC day, read on the day's first use and again every
    `refresh` seconds (other processes spend too), plus what this process added since."""

    def __init__(self, database: Database | None, clock: Clock, refresh: float = 60.0) -> None:
        self.database = database
        self._clock = clock
        self._refresh = refresh
        self._lock = asyncio.Lock()
        self._day: str | None = None
        self._read_at = 0.0
        self._stored = 0.0  # the table's sum for the day at the last read
        self._added = 0.0  # written by this process since that read
        self._unsaved = 0.0  # this process's costs for the day that could not be written

    def today(self) -> str:
        return self._clock.now().date().isoformat()

    def peek(self) -> float:
        """Today's spend as last known, without I/O."""
        return self._stored + self._added + self._unsaved if self._day == self.today() else 0.0

    async def spent(self) -> float | None:
        """Today's spend in USD; None when it cannot be known (the table is unreadable)."""
        async with self._lock:
            return await self._spent()

    async def _spent(self) -> float | None:
        day, now = self.today(), self._clock.now().timestamp()
        if day != self._day:
            self._day, self._stored, self._added, self._unsaved, self._read_at = None, 0.0, 0.0, 0.0, 0.0
        if self.database is None:
            self._day = day
        elif self._day is None or now - self._read_at >= self._refresh:
            try:
                async with self.database.session() as session:
                    total = await session.scalar(select(func.sum(AiCost.cost_usd)).where(AiCost.day == day))
            except Exception as exc:
                log.warning("could not read the AI cost ledger: %s", exc)
                return None if self._day is None else self.peek()
            self._day, self._stored, self._added, self._read_at = day, float(total or 0.0), 0.0, now
        return self.peek()

    async def record(self, provider: ProviderConfig, prompt_tokens: int, completion_tokens: int) -> None:
        cost = provider.cost(prompt_tokens, completion_tokens)
        async with self._lock:
            await self._spent()  # makes sure the day is today's
            day = self.today()
            if self.database is None:
                self._added += cost
                return
            row = AiCost(
                day=day,
                provider=provider.name,
                model=provider.model[:64],
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                cost_usd=cost,
                created_at=self._clock.now(),
            )
            try:
                async with self.database.session() as session, session.begin():
                    session.add(row)
            except Exception as exc:
                log.warning("could not write the AI cost ledger (kept in memory): %s", exc)
                self._unsaved += cost
            else:
                self._added += cost


# ---------------------------------------------------------------------------------------------------
# The router


class ProviderError(Exception):
    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(slots=True)
class CopyStats:
    """Counters for observability; `CopyRouter.stats` returns a snapshot."""

    renders: int = 0
    cache_hits: int = 0  # answered from the cache, or by joining an identical request in flight
    templates: int = 0  # answered by a template (no providers, or all of them skipped or failed)
    fallbacks_to_template: int = 0  # providers configured, template used anyway
    budget_exhausted: int = 0  # renders that skipped providers: daily budget reached (or ledger unreadable)
    requests: dict[str, int] = field(default_factory=dict)  # HTTP requests sent, per provider
    successes: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)  # failed requests (each attempt)
    breaker_skips: dict[str, int] = field(default_factory=dict)  # provider skipped: breaker open
    breaker: dict[str, str] = field(default_factory=dict)  # state per provider
    spend_today_usd: float = 0.0


class CopyRouter:
    """Renders copy through the providers in order, falling back to the templates (see the module)."""

    def __init__(
        self,
        providers: list[ProviderConfig],
        database: Database | None,
        *,
        daily_budget_usd: float = 5.0,
        clock: Clock | None = None,
        cache_size: int = 1024,
        cache_ttl: float = 3600.0,
    ) -> None:
        names = [p.name for p in providers]
        if len(set(names)) != len(names):
            raise ValueError("provider names must be unique")
        self.providers = list(providers)
        self.daily_budget_usd = daily_budget_usd
        self._clock: Clock = clock or SystemClock()
        self._cache = _Cache(cache_size, cache_ttl)
        self._ledger = _Ledger(database, self._clock)
        self._breakers = {
            p.name: CircuitBreaker(p.breaker_failures, p.breaker_cooldown, self._clock) for p in providers
        }
        self._stats = CopyStats(
            requests=dict.fromkeys(names, 0),
            successes=dict.fromkeys(names, 0),
            failures=dict.fromkeys(names, 0),
            breaker_skips=dict.fromkeys(names, 0),
        )
        self._inflight: dict[tuple[Any, ...], asyncio.Task[CopyResult]] = {}
        self._client: httpx.AsyncClient | None = None
        self._closed = False

    @property
    def stats(self) -> CopyStats:
        s = self._stats
        return replace(
            s,
            requests=dict(s.requests),
            successes=dict(s.successes),
            failures=dict(s.failures),
            breaker_skips=dict(s.breaker_skips),
            breaker={name: b.state for name, b in self._breakers.items()},
            spend_today_usd=self._ledger.peek(),
        )

    def breaker(self, provider: str) -> CircuitBreaker:
        return self._breakers[provider]

    async def render(self, request: CopyRequest) -> CopyResult:
        """The copy for `request`. Never raises for provider trouble: the template answers instead."""
        self._stats.renders += 1
        kind = request.kind if _KIND.match(request.kind) else "unknown"
        locale = request.locale if _LOCALE.match(request.locale) else "en"
        variables = clean_variables(request.variables)
        draft = template_text(kind, variables)
        if not self.providers or self._closed:
            self._stats.templates += 1
            return CopyResult(draft, "template", False)
        key = (kind, locale, tuple(sorted(variables.items())))
        hit = self._cache.get(key, self._clock.now().timestamp())
        if hit is not None:
            self._stats.cache_hits += 1
            return CopyResult(hit[0], hit[1], True)
        task = self._inflight.get(key)
        if task is not None:  # the same copy is being asked for: share its answer
            result = await self._wait(task, draft)
            if result.provider != "template":
                self._stats.cache_hits += 1
                return replace(result, cached=True)
            return result
        task = asyncio.create_task(self._produce(key, kind, locale, variables, draft))
        self._inflight[key] = task
        task.add_done_callback(lambda t: self._inflight.pop(key) if self._inflight.get(key) is t else None)
        return await self._wait(task, draft)

    async def _wait(self, task: asyncio.Task[CopyResult], draft: str) -> CopyResult:
        """The task's result; the template when `close()` cancelled it (the caller's own
        cancellation propagates, and leaves the task running for others asking the same)."""
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                return CopyResult(draft, "template", False)
            raise

    async def _produce(
        self, key: tuple[Any, ...], kind: str, locale: str, variables: dict[str, Value], draft: str
    ) -> CopyResult:
        try:
            messages = build_messages(kind, locale, variables, draft)
            for provider in self.providers:
                spent = await self._ledger.spent()
                if spent is None or spent >= self.daily_budget_usd:
                    self._stats.budget_exhausted += 1
                    break
                text = await self._ask(provider, messages)
                if text is not None:
                    self._cache.put(key, text, provider.name, self._clock.now().timestamp())
                    return CopyResult(text, provider.name, False)
        except Exception:
            log.exception("copy for %s failed; using the template", kind)
        self._stats.templates += 1
        self._stats.fallbacks_to_template += 1
        return CopyResult(draft, "template", False)

    async def _ask(self, provider: ProviderConfig, messages: list[dict[str, str]]) -> str | None:
        """The provider's answer, or None once its retries are spent or its breaker refuses."""
        breaker = self._breakers[provider.name]
        for attempt in range(provider.retries + 1):
            if not breaker.allow():
                if attempt == 0:
                    self._stats.breaker_skips[provider.name] += 1
                return None
            self._stats.requests[provider.name] += 1
            settled = False
            try:
                text, prompt_tokens, completion_tokens = await self._request(provider, messages)
                settled = True
            except Exception as exc:  # ProviderError, or a surprise: either way, the next provider
                settled = True
                breaker.failure()
                self._stats.failures[provider.name] += 1
                log.warning(
                    "AI provider %s failed (attempt %d of %d): %s",
                    provider.name,
                    attempt + 1,
                    provider.retries + 1,
                    exc if isinstance(exc, ProviderError) else repr(exc),
                )
                retryable = isinstance(exc, ProviderError) and exc.retryable
                if not retryable or attempt == provider.retries or breaker.state != "closed":
                    return None
                delay = min(provider.backoff * 2**attempt, MAX_BACKOFF)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                continue
            finally:
                if not settled:
                    breaker.abandon()
            breaker.success()
            self._stats.successes[provider.name] += 1
            await self._ledger.record(provider, prompt_tokens, completion_tokens)
            return text
        return None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                follow_redirects=False,
                limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
                headers={"User-Agent": "viral-engine-copy"},
            )
        return self._client

    async def _request(
        self, provider: ProviderConfig, messages: list[dict[str, str]]
    ) -> tuple[str, int, int]:
        """One chat completion: (text, prompt tokens, completion tokens), or ProviderError."""
        body = {
            "model": provider.model,
            "messages": messages,
            "max_tokens": provider.max_tokens,
            "temperature": provider.temperature,
        }
        headers = {"Authorization": f"Bearer {provider.api_key}"} if provider.api_key else {}
        url = f"{provider.base_url}/chat/completions"
        try:
            async with (
                asyncio.timeout(provider.timeout),
                self._http().stream(
                    "POST", url, json=body, headers=headers, timeout=provider.timeout
                ) as response,
            ):
                status = response.status_code
                if status == 429 or status >= 500:
                    raise ProviderError(f"HTTP {status}", retryable=True)
                if not 200 <= status < 300:
                    raise ProviderError(f"HTTP {status}", retryable=False)
                raw = bytearray()
                async for chunk in response.aiter_bytes():
                    raw += chunk
                    if len(raw) > MAX_RESPONSE_BYTES:
                        raise ProviderError("answer too large", retryable=False)
        except TimeoutError:
            raise ProviderError(f"no answer within {provider.timeout}s", retryable=True) from None
        except httpx.TransportError as exc:
            raise ProviderError(f"{type(exc).__name__}: {exc}", retryable=True) from None
        except httpx.HTTPError as exc:
            raise ProviderError(f"{type(exc).__name__}: {exc}", retryable=False) from None
        return _parse_answer(bytes(raw), messages)

    async def close(self) -> None:
        """Stop: cancel renders in flight (their callers get the template) and close connections."""
        self._closed = True
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _parse_answer(raw: bytes, messages: list[dict[str, str]]) -> tuple[str, int, int]:
    try:
        data = orjson.loads(raw)
        content = data["choices"][0]["message"]["content"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        raise ProviderError("answer is not a chat completion", retryable=False) from None
    text = clean_answer(content)
    if text is None:
        raise ProviderError("answer is empty, too long or carries a link", retryable=False)
    usage = data.get("usage") if isinstance(data, dict) else None
    usage = usage if isinstance(usage, dict) else {}
    # Without usage figures, estimate (about four characters a token) so the budget still holds.
    prompt_tokens = _tokens(usage.get("prompt_tokens"), sum(len(m["content"]) for m in messages))
    completion_tokens = _tokens(usage.get("completion_tokens"), len(text))
    return text, prompt_tokens, completion_tokens


def _tokens(value: object, chars: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10_000_000:
        return value
    return math.ceil(chars / 4)
