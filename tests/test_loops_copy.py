"""Personalised copy: templates, provider fallback, retries, circuit breaker, cache, cost ledger, budget.

Providers are real HTTP servers on 127.0.0.1 (`fake_openai.FakeOpenAI`); nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fake_openai import FakeOpenAI
from sqlalchemy import select

from loops.clock import ManualClock
from loops.copy import (
    GENERIC,
    PLAIN,
    CopyRequest,
    CopyRouter,
    ProviderConfig,
    build_messages,
    parse_providers,
    template_text,
)
from store import AiCost, Database

MAYA = {"name": "Maya", "subject": "algebra", "hours_left": 3}
ANSWER = "Maya is working on algebra right now: come and join her!"
START = datetime(2026, 3, 1, 22, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeOpenAI, FakeOpenAI]]:
    a, b = FakeOpenAI().start(), FakeOpenAI().start()
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture
def fake_a(fakes: tuple[FakeOpenAI, FakeOpenAI]) -> FakeOpenAI:
    fakes[0].reset()
    return fakes[0]


@pytest.fixture
def fake_b(fakes: tuple[FakeOpenAI, FakeOpenAI]) -> FakeOpenAI:
    fakes[1].reset()
    fakes[1].content = "Algebra time with Maya!"
    return fakes[1]


def provider(fake: FakeOpenAI, name: str, **options: Any) -> ProviderConfig:
    settings: dict[str, Any] = {
        "timeout": 1.0,
        "retries": 0,
        "backoff": 0.01,
        "price_per_1k_prompt": 0.5,
        "price_per_1k_completion": 1.5,
        "breaker_failures": 10,
        **options,
    }
    return ProviderConfig(name=name, base_url=fake.base_url, model=f"model-{name}", **settings)


RouterFactory = Callable[..., CopyRouter]


@pytest.fixture
async def make_router() -> AsyncIterator[RouterFactory]:
    routers: list[CopyRouter] = []

    def make(providers: list[ProviderConfig], database: Database | None = None, **options: Any) -> CopyRouter:
        router = CopyRouter(providers, database, **options)
        routers.append(router)
        return router

    yield make
    for router in routers:
        await router.close()


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    db = Database(database_url)
    yield db
    await db.dispose()


async def cost_rows(database: Database) -> list[AiCost]:
    async with database.session() as session:
        return list((await session.scalars(select(AiCost).order_by(AiCost.id))).all())


def nudge(**variables: Any) -> CopyRequest:
    return CopyRequest("nudge", "en", {**MAYA, **variables})


# --- templates ---------------------------------------------------------------------------------


async def test_without_providers_the_template_answers(make_router: RouterFactory) -> None:
    router = make_router([])
    result = await router.render(CopyRequest("rally_invite", "en", MAYA))
    assert result.text == "Maya started a results rally in algebra. Join in and climb the board together!"
    assert (result.provider, result.cached) == ("template", False)
    rescue = await router.render(CopyRequest("rescue_request", "en", {"days": 12, "hours_left": 3.0}))
    assert rescue.text == "Your 12-day streak ends in 3h. A quick practice keeps it going!"
    card = await router.render(CopyRequest("parent_card", "en", {"name": "Maya", "sessions": 1}))
    assert card.text == "Maya finished 1 study session this week. Share the progress!"
    assert router.stats.templates == 3


def test_templates_never_raise() -> None:
    assert template_text("no_such_kind", MAYA) == GENERIC
    assert template_text("rally_invite", {"name": "Maya"}) == PLAIN["rally_invite"]  # subject missing
    odd = {"name": "{subject} {0} {x.y}", "subject": "al\x00ge\nbra\u202e  " * 20, 3: "x", "bad key": "y"}
    text = template_text("buddy_invite", odd)
    assert text.startswith("{subject} {0} {x.y} wants to study al ge bra al ge bra")
    assert "\x00" not in text and "\n" not in text and "\u202e" not in text
    assert len(text) < 140  # a variable is cut at 64 characters
    assert template_text("nudge", {"subject": {"nested": 1}}) == PLAIN["nudge"]
    assert template_text("parent_card", {"name": "", "sessions": 4}) == PLAIN["parent_card"]
    assert template_text("parent_card", {"name": "Sam", "sessions": 4}).startswith(
        "Sam finished 4 study sessions"
    )


# --- providers -----------------------------------------------------------------------------------


async def test_a_provider_answers_and_its_cost_is_recorded(
    make_router: RouterFactory, database: Database, fake_a: FakeOpenAI
) -> None:
    router = make_router([provider(fake_a, "a", api_key="sk-test")], database, clock=ManualClock(START))
    result = await router.render(CopyRequest("nudge", "fr", {**MAYA, "profile": {"email": "m@example.org"}}))
    assert (result.text, result.provider, result.cached) == (ANSWER, "a", False)

    [sent] = fake_a.requests
    assert sent["authorization"] == "Bearer sk-test"
    assert sent["model"] == "model-a" and sent["max_tokens"] == 120 and sent["temperature"] == 0.7
    # The prompt is the template's text and the given scalar variables, nothing else.
    draft = "Your study buddies are working on algebra. Jump in and learn together!"
    assert sent["messages"] == build_messages("nudge", "fr", MAYA, draft)
    assert [m["role"] for m in sent["messages"]] == ["system", "user"]
    assert "example.org" not in json.dumps(sent)

    [row] = await cost_rows(database)
    assert (row.day, row.provider, row.model) == ("2026-03-01", "a", "model-a")
    assert (row.prompt_tokens, row.completion_tokens) == (120, 30)
    assert row.cost_usd == pytest.approx(120 / 1000 * 0.5 + 30 / 1000 * 1.5)  # 0.105
    stats = router.stats
    assert stats.spend_today_usd == pytest.approx(0.105)
    assert (stats.requests, stats.successes, stats.breaker) == ({"a": 1}, {"a": 1}, {"a": "closed"})


async def test_server_errors_are_retried_then_the_next_provider_answers(
    make_router: RouterFactory, fake_a: FakeOpenAI, fake_b: FakeOpenAI
) -> None:
    fake_a.behave(then=500)
    router = make_router([provider(fake_a, "a", retries=2), provider(fake_b, "b")])
    result = await router.render(nudge())
    assert (result.text, result.provider) == ("Algebra time with Maya!", "b")
    assert len(fake_a.requests) == 3  # the first attempt and two retries
    assert len(fake_b.requests) == 1
    assert router.stats.failures == {"a": 3, "b": 0}
    assert router.stats.fallbacks_to_template == 0


async def test_429_is_retried_but_400_is_not(
    make_router: RouterFactory, fake_a: FakeOpenAI, fake_b: FakeOpenAI
) -> None:
    router = make_router([provider(fake_a, "a", retries=2), provider(fake_b, "b")])
    fake_a.behave(429, 503)
    assert (await router.render(nudge(hours_left=1))).provider == "a"
    assert len(fake_a.requests) == 3

    fake_a.reset()
    fake_a.behave(400)
    assert (await router.render(nudge(hours_left=2))).provider == "b"
    assert len(fake_a.requests) == 1


async def test_all_providers_failing_gives_the_template(
    make_router: RouterFactory, fake_a: FakeOpenAI, fake_b: FakeOpenAI
) -> None:
    fake_a.behave(then=500)
    fake_b.behave(then="garbage")
    router = make_router([provider(fake_a, "a", retries=1), provider(fake_b, "b")])
    result = await router.render(nudge())
    assert result == await make_router([]).render(nudge())
    assert result.provider == "template"
    assert (len(fake_a.requests), len(fake_b.requests)) == (2, 1)
    assert router.stats.fallbacks_to_template == 1


@pytest.mark.parametrize("answer", ["empty", "long", "link"])
async def test_an_invalid_answer_counts_as_a_failure(
    make_router: RouterFactory, fake_a: FakeOpenAI, fake_b: FakeOpenAI, answer: str
) -> None:
    if answer == "empty":
        fake_a.behave("empty")
    elif answer == "long":
        fake_a.content = "Go! " * 200
    else:
        fake_a.content = "Join Maya at https://evil.example/now"
    router = make_router([provider(fake_a, "a", retries=2), provider(fake_b, "b")])
    assert (await router.render(nudge())).provider == "b"
    assert len(fake_a.requests) == 1  # the same question would get the same answer: no retry
    assert router.stats.failures["a"] == 1


async def test_a_timeout_is_a_failure_and_falls_back(
    make_router: RouterFactory, fake_a: FakeOpenAI, fake_b: FakeOpenAI
) -> None:
    fake_a.behave("slow")
    router = make_router([provider(fake_a, "a", timeout=0.2), provider(fake_b, "b")])
    started = time.monotonic()
    result = await router.render(nudge())
    assert result.provider == "b"
    assert time.monotonic() - started < 0.9  # the slow answer (1 s) was not waited for
    assert router.stats.failures == {"a": 1, "b": 0}


async def test_an_unreachable_provider_falls_back(make_router: RouterFactory, fake_b: FakeOpenAI) -> None:
    dead = ProviderConfig("dead", "http://127.0.0.1:9/v1", "m", timeout=0.5, retries=1, backoff=0.01)
    router = make_router([dead, provider(fake_b, "b")])
    assert (await router.render(nudge())).provider == "b"
    assert router.stats.failures["dead"] == 2


# --- circuit breaker ---------------------------------------------------------------------------


async def test_breaker_opens_after_consecutive_failures_and_half_opens_after_the_cooldown(
    make_router: RouterFactory, fake_a: FakeOpenAI, fake_b: FakeOpenAI
) -> None:
    clock = ManualClock(START)
    fake_a.behave(then=500)
    a = provider(fake_a, "a", retries=1, breaker_failures=3, breaker_cooldown=30.0)
    router = make_router([a, provider(fake_b, "b")], clock=clock, cache_size=0)

    # Every request counts: two failed attempts, then the third failure opens the breaker and
    # the retry that would have followed is not sent.
    assert (await router.render(nudge(hours_left=1))).provider == "b"
    assert router.breaker("a").state == "closed"
    assert (await router.render(nudge(hours_left=2))).provider == "b"
    assert len(fake_a.requests) == 3
    assert router.stats.breaker["a"] == "open"

    # Open: skipped without a request.
    for hours in range(3, 6):
        assert (await router.render(nudge(hours_left=hours))).provider == "b"
    clock.advance(timedelta(seconds=29))
    assert (await router.render(nudge(hours_left=6))).provider == "b"
    assert len(fake_a.requests) == 3
    assert router.stats.breaker_skips["a"] == 4

    # Half-open: exactly one trial among concurrent renders; it fails, so the breaker re-opens.
    clock.advance(timedelta(seconds=2))
    results = await asyncio.gather(*(router.render(nudge(hours_left=h)) for h in range(10, 15)))
    assert {r.provider for r in results} == {"b"}
    assert len(fake_a.requests) == 4
    assert router.stats.breaker["a"] == "open"
    assert (await router.render(nudge(hours_left=20))).provider == "b"
    assert len(fake_a.requests) == 4

    # After another cool-down the trial succeeds and closes the breaker.
    clock.advance(timedelta(seconds=30))
    fake_a.behave(then="ok")
    assert (await router.render(nudge(hours_left=21))).provider == "a"
    assert router.stats.breaker["a"] == "closed"
    assert (await router.render(nudge(hours_left=22))).provider == "a"
    assert len(fake_a.requests) == 6

    # Closed again, a single failure does not open it.
    fake_a.behave(500)
    assert (await router.render(nudge(hours_left=23))).provider == "a"  # failed, then retried: ok
    assert router.stats.breaker["a"] == "closed"


# --- cache -----------------------------------------------------------------------------------------


async def test_a_cached_answer_makes_no_request(make_router: RouterFactory, fake_a: FakeOpenAI) -> None:
    clock = ManualClock(START)
    router = make_router([provider(fake_a, "a")], clock=clock, cache_ttl=60.0)
    first = await router.render(nudge())
    # Same kind, locale and variables (in any order): from the cache.
    again = await router.render(CopyRequest("nudge", "en", dict(reversed(MAYA.items()))))
    assert (again.text, again.provider, again.cached) == (first.text, "a", True)
    assert len(fake_a.requests) == 1
    # Another locale or other variables are other copy.
    await router.render(CopyRequest("nudge", "es", MAYA))
    await router.render(nudge(name="Sam"))
    assert len(fake_a.requests) == 3
    # The TTL runs on the clock.
    clock.advance(timedelta(seconds=61))
    assert (await router.render(nudge())).cached is False
    assert len(fake_a.requests) == 4
    assert router.stats.cache_hits == 1


async def test_identical_concurrent_renders_share_one_request(
    make_router: RouterFactory, fake_a: FakeOpenAI
) -> None:
    router = make_router([provider(fake_a, "a")])
    results = await asyncio.gather(*(router.render(nudge()) for _ in range(5)))
    assert {r.text for r in results} == {ANSWER}
    assert sorted(r.cached for r in results) == [False, True, True, True, True]
    assert len(fake_a.requests) == 1


# --- cost ledger and daily budget ------------------------------------------------------------------


async def test_the_daily_budget_degrades_to_templates_until_the_next_utc_day(
    make_router: RouterFactory, database: Database, fake_a: FakeOpenAI
) -> None:
    clock = ManualClock(START)  # 22:00 UTC
    router = make_router([provider(fake_a, "a")], database, clock=clock, daily_budget_usd=0.2)
    assert (await router.render(nudge(hours_left=1))).provider == "a"  # 0.105
    assert (await router.render(nudge(hours_left=2))).provider == "a"  # 0.21 >= 0.2
    assert (await router.render(nudge(hours_left=3))).provider == "template"
    assert len(fake_a.requests) == 2
    assert router.stats.budget_exhausted == 1
    assert router.stats.spend_today_usd == pytest.approx(0.21)

    clock.advance(timedelta(hours=2, minutes=1))  # 00:01 UTC the next day
    assert (await router.render(nudge(hours_left=3))).provider == "a"
    assert len(fake_a.requests) == 3
    assert router.stats.spend_today_usd == pytest.approx(0.105)
    assert [row.day for row in await cost_rows(database)] == ["2026-03-01", "2026-03-01", "2026-03-02"]


async def test_the_budget_is_seeded_from_the_ledger(
    make_router: RouterFactory, database: Database, fake_a: FakeOpenAI
) -> None:
    clock = ManualClock(START)
    first = make_router([provider(fake_a, "a")], database, clock=clock, daily_budget_usd=0.1)
    assert (await first.render(nudge())).provider == "a"

    # A restart (a new router on the same database) respects what was spent today.
    second = make_router([provider(fake_a, "a")], database, clock=clock, daily_budget_usd=0.1)
    assert (await second.render(nudge(hours_left=9))).provider == "template"
    assert second.stats.spend_today_usd == pytest.approx(0.105)
    assert len(fake_a.requests) == 1
    roomier = make_router([provider(fake_a, "a")], database, clock=clock, daily_budget_usd=1.0)
    assert (await roomier.render(nudge(hours_left=9))).provider == "a"


async def test_without_a_database_the_ledger_is_in_memory(
    make_router: RouterFactory, fake_a: FakeOpenAI
) -> None:
    fake_a.usage = {"prompt_tokens": 1000, "completion_tokens": 0}
    router = make_router([provider(fake_a, "a")], None, daily_budget_usd=1.0)
    assert (await router.render(nudge(hours_left=1))).provider == "a"  # 0.5
    assert (await router.render(nudge(hours_left=2))).provider == "a"  # 1.0
    assert (await router.render(nudge(hours_left=3))).provider == "template"
    assert router.stats.spend_today_usd == pytest.approx(1.0)


async def test_close_stops_renders_in_flight(make_router: RouterFactory, fake_a: FakeOpenAI) -> None:
    fake_a.behave("slow")
    router = make_router([provider(fake_a, "a", timeout=5.0)])
    render: Awaitable[Any] = asyncio.ensure_future(router.render(nudge()))
    while not fake_a.requests:
        await asyncio.sleep(0.01)
    await router.close()
    assert (await render).provider == "template"
    assert (await router.render(nudge())).provider == "template"


# --- configuration ---------------------------------------------------------------------------------


def test_parse_providers() -> None:
    assert parse_providers("") == [] and parse_providers("  ") == []
    value = json.dumps(
        [
            {
                "name": "local",
                "base_url": "http://127.0.0.1:9000/v1/",
                "model": "gpt-4o-mini",
                "api_key": "sk-1",
                "timeout": 2,
                "retries": 2,
                "price_per_1k_prompt": 0.00015,
                "price_per_1k_completion": 0.0006,
            },
            {"name": "cloud", "base_url": "https://api.example.com/v1", "model": "m", "api_key_env": "KEY"},
        ]
    )
    local, cloud = parse_providers(value, environ={"KEY": "sk-2"})
    assert (local.name, local.base_url, local.model, local.api_key) == (
        "local",
        "http://127.0.0.1:9000/v1",
        "gpt-4o-mini",
        "sk-1",
    )
    assert (local.timeout, local.retries, local.price_per_1k_completion) == (2, 2, 0.0006)
    assert cloud.api_key == "sk-2" and cloud.breaker_failures == 3 and cloud.breaker_cooldown == 30.0
    assert "sk-2" not in repr(cloud)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[{", "not valid JSON"),
        ('{"name": "a"}', "must be a JSON list"),
        ("[1]", r"AI_PROVIDERS\[0\] must be an object"),
        ('[{"name": "a", "model": "m"}]', "missing base_url"),
        ('[{"base_url": "http://h/v1"}]', "missing model, name"),
        ('[{"name": "template", "base_url": "http://h/v1", "model": "m"}]', "not 'template'"),
        ('[{"name": "a", "base_url": "ftp://h/v1", "model": "m"}]', "http:// or https://"),
        ('[{"name": "a", "base_url": "file:///etc/passwd", "model": "m"}]', "http:// or https://"),
        ('[{"name": "a", "base_url": "127.0.0.1:9000", "model": "m"}]', "http:// or https://"),
        ('[{"name": "a", "base_url": "http://u:p@h/v1", "model": "m"}]', "credentials"),
        ('[{"name": "a", "base_url": "http://h/v1", "model": "m", "timout": 1}]', "unknown key.*timout"),
        ('[{"name": "a", "base_url": "http://h/v1", "model": "m", "timeout": 0}]', "timeout must be >"),
        (
            '[{"name": "a", "base_url": "http://h/v1", "model": "m", "retries": true}]',
            "retries must be an int",
        ),
        (
            '[{"name": "a", "base_url": "http://h/v1", "model": "m", "timeout": "2"}]',
            "timeout must be a number",
        ),
        ('[{"name": "a", "base_url": 5, "model": "m"}]', "base_url must be a string"),
        (
            '[{"name": "a", "base_url": "http://h/v1", "model": "m", "api_key_env": "NOPE"}]',
            "'NOPE' is not set",
        ),
        (
            '[{"name": "a", "base_url": "http://h", "model": "m", "api_key": "k", "api_key_env": "K"}]',
            "not both",
        ),
        (
            '[{"name": "a", "base_url": "http://h", "model": "m"}, {"name": "a", "base_url": "http://g", '
            '"model": "m"}]',
            "used twice",
        ),
    ],
)
def test_parse_providers_rejects_bad_input(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_providers(value, environ={})
