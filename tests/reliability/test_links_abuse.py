"""Signed invite links under abuse, over a real server: tampered tokens and signatures, replayed clicks
and signups, expired links, and open-redirect attempts through the target.

A refused click never redirects, sets no cookie, records no click (only a rejection with its reason)
and moves no number; a replayed click or signup counts once; a link only ever leads to an app path on
the allow-list (metrics.links.check_target), checked when it is made and again when it is followed.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from servers import SECRET, ServerProcess, make_token
from sqlalchemy import func, select, update

from metrics.events import client_event_id
from metrics.links import LinkSigner
from store import Click, Conversion, Database, Link, LinkRejection, Reward

from .http_kit import ADMIN, QUIET, bearer, fresh_database


@pytest.fixture
async def db(module_db: str) -> Any:
    database = Database(module_db)
    yield database
    await database.dispose()


async def make_link(http: httpx.AsyncClient, referrer: str, **body: Any) -> dict[str, Any]:
    response = await http.post(
        "/api/links", json={"source": "study_buddy", **body}, headers=bearer(make_token(referrer))
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


async def clicks_of(db: Database, token: str) -> list[Click]:
    nonce = token.split(".")[0]
    async with db.session() as session:
        return list((await session.scalars(select(Click).where(Click.nonce == nonce))).all())


async def rejections_of(db: Database, tokens: list[str]) -> dict[str, str]:
    async with db.session() as session:
        rows = (await session.execute(select(LinkRejection.token, LinkRejection.reason))).all()
    return {t: r for t, r in rows if t in tokens}


async def k_factor(http: httpx.AsyncClient) -> dict[str, Any]:
    response = await http.get("/api/metrics/k-factor?days=7", headers=bearer(ADMIN))
    assert response.status_code == 200
    return dict(response.json())


def assert_refused_page(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    assert "location" not in response.headers
    assert "set-cookie" not in response.headers
    assert response.headers["content-type"].startswith("text/html")
    assert "This invite link does not work" in response.text


def _altered(part: str) -> str:
    return part[:-1] + ("A" if part[-1] != "A" else "B")


async def test_tampered_links_are_refused_recorded_and_count_nothing(
    api: ServerProcess, db: Database
) -> None:
    async with httpx.AsyncClient(base_url=api.http) as http:
        link = await make_link(http, "tamper-ref")
        nonce, kid, expires, signature = link["token"].split(".")
        cases = {
            # token -> (status, recorded reason)
            f"{_altered(nonce)}.{kid}.{expires}.{signature}": (404, "unknown"),
            f"{nonce}.{_altered(kid)}.{expires}.{signature}": (400, "unknown_key"),
            f"{nonce}.{kid}.{int(expires) + 86400 * 365}.{signature}": (400, "bad_signature"),
            f"{nonce}.{kid}.{expires}.{_altered(signature)}": (400, "bad_signature"),
            f"{nonce}.{kid}.{expires}.": (400, "malformed"),
            f"{nonce}.{kid}.{expires}.{signature}.extra": (400, "malformed"),
            f"{nonce}.{kid}.-{expires}.{signature}": (400, "malformed"),
            f"{nonce}.{kid}.{expires}.{signature}" + "A" * 200: (400, "malformed"),
        }
        for token, (status, _) in cases.items():
            assert_refused_page(await http.get(f"/r/{token}"), status)
        # A row whose referrer was changed behind the signature's back is "altered" too.
        async with db.session() as session, session.begin():
            await session.execute(update(Link).where(Link.nonce == nonce).values(referrer_id="mallory"))
        assert_refused_page(await http.get(f"/r/{link['token']}"), 400)
        async with db.session() as session, session.begin():
            await session.execute(update(Link).where(Link.nonce == nonce).values(referrer_id="tamper-ref"))
        # Strange bytes in the path: refused before any lookup, nothing stored.
        for raw in ("%00", "..%2F..%2Fadmin", "%E2%80%AE", "a%0d%0aLocation:%20https://evil.example"):
            response = await http.get(f"/r/{raw}")
            assert response.status_code in (400, 404), (raw, response.status_code)
            assert "location" not in response.headers and "set-cookie" not in response.headers

        assert await clicks_of(db, link["token"]) == []
        recorded = await rejections_of(db, [t[:200] for t in cases] + [link["token"]])
        assert {t: r for t, r in recorded.items() if t != link["token"]} == {
            t[:200]: reason for t, (_, reason) in cases.items()
        }
        assert recorded[link["token"]] == "bad_signature"
        # The untampered link still works, and only its one click counts.
        followed = await http.get(f"/r/{link['token']}")
        assert followed.status_code == 302 and followed.headers["location"] == "/"
        assert len(await clicks_of(db, link["token"])) == 1


async def test_replayed_clicks_are_kept_but_counted_once(api: ServerProcess, db: Database) -> None:
    async with httpx.AsyncClient(base_url=api.http) as http:
        link = await make_link(http, "replay-ref")
        before = await k_factor(http)
        visitor = {"ve_vid": "v" * 32}
        async with httpx.AsyncClient(base_url=api.http, cookies=visitor) as browser:
            # The first click replayed 20 times at once, then 5 more one after another.
            replies = await asyncio.gather(*(browser.get(f"/r/{link['token']}") for _ in range(20)))
            assert {r.status_code for r in replies} == {302}
            for _ in range(5):
                assert (await browser.get(f"/r/{link['token']}")).status_code == 302
        clicks = await clicks_of(db, link["token"])
        assert len(clicks) == 25  # every click is kept (the fraud signals read floods)
        assert sum(c.unique_click for c in clicks) == 1
        after = await k_factor(http)
        assert after["clicks"] - before["clicks"] == 1
        today = datetime.now(UTC).date().isoformat()
        timeline = {d["date"]: d["clicks"] for d in after["timeline"]}
        old = {d["date"]: d["clicks"] for d in before["timeline"]}
        assert timeline[today] - old.get(today, 0) == 1


@pytest.fixture
def pg_db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from fresh_database(request, tmp_path_factory, "postgresql")


async def test_replayed_clicks_count_once_across_processes(
    pg_db: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Two web processes on one PostgreSQL: the link's row lock, not a process's own lock, decides."""
    env = {"DATABASE_URL": pg_db, "BROKER_URL": redis_url, **QUIET}
    servers = [ServerProcess(tmp_path_factory.mktemp("web"), env).start() for _ in range(2)]
    database = Database(pg_db)
    clients = [httpx.AsyncClient(base_url=s.http, cookies={"ve_vid": "w" * 32}) for s in servers]
    try:
        # Connections open and both servers warm, so the bursts really overlap.
        await asyncio.gather(*(c.get("/readyz") for c in clients for _ in range(10)))
        uniques = []
        for _ in range(10):  # ten links, each clicked by the same visitor 20 times at once on both
            link = await make_link(clients[0], "cluster-ref")
            replies = await asyncio.gather(*(clients[i % 2].get(f"/r/{link['token']}") for i in range(20)))
            assert {r.status_code for r in replies} == {302}
            clicks = await clicks_of(database, link["token"])
            assert len(clicks) == 20
            uniques.append(sum(c.unique_click for c in clicks))
        assert uniques == [1] * 10
    finally:
        for client in clients:
            await client.aclose()
        await database.dispose()
        for server in servers:
            server.kill()


async def _conversions(db: Database, user_id: str) -> list[Conversion]:
    async with db.session() as session:
        return list((await session.scalars(select(Conversion).where(Conversion.user_id == user_id))).all())


async def _rewards(db: Database, user_id: str) -> list[tuple[str, str, int]]:
    async with db.session() as session:
        rows = await session.execute(
            select(Reward.reason, Reward.ref, Reward.amount).where(Reward.user_id == user_id)
        )
        return sorted((r, ref, a) for r, ref, a in rows.all())


async def _until(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def test_replayed_signups_convert_and_pay_once(api: ServerProcess, db: Database) -> None:
    async with httpx.AsyncClient(base_url=api.http) as http:
        link = await make_link(http, "signup-ref")
        assert (await http.get(f"/r/{link['token']}")).status_code == 302
        newbie = bearer(make_token("newbie-1"))
        signup = {
            "id": "signup-newbie-1",
            "type": "signup",
            "user_id": "newbie-1",
            "props": {"referral_token": link["token"]},
        }
        first = await http.post("/api/events", json=signup, headers=newbie)
        assert first.json()["accepted"][0]["duplicate"] is False
        await _until(lambda: _has_conversion(db, "newbie-1"))
        # Replays: the same event (same id), then new ids for the same signup, one batch of several.
        again = await http.post("/api/events", json=signup, headers=newbie)
        assert again.json()["accepted"][0]["duplicate"] is True
        batch = [{**signup, "id": f"signup-newbie-1-replay-{i}"} for i in range(5)]
        assert (await http.post("/api/events", json=batch, headers=newbie)).status_code == 202
        marker = {
            "id": "after-replays",
            "type": "signup",
            "user_id": "newbie-2",
            "props": {"referral_token": link["token"]},
        }
        await http.post("/api/events", json=marker, headers=bearer(make_token("newbie-2")))
        await _until(lambda: _has_conversion(db, "newbie-2"))  # the replays were processed before it
    conversions = await _conversions(db, "newbie-1")
    assert len(conversions) == 1 and conversions[0].signup_event_id == client_event_id(
        "newbie-1", "signup-newbie-1"
    )
    rewards = await _rewards(db, "signup-ref")
    assert [(reason, ref) for reason, ref, _ in rewards] == [
        ("referral_signup", "newbie-1"),
        ("referral_signup", "newbie-2"),
    ]


async def _has_conversion(db: Database, user_id: str) -> bool:
    return bool(await _conversions(db, user_id))


async def _insert_link(db: Database, token: str, referrer: str, target: str, expires: int) -> None:
    async with db.session() as session, session.begin():
        session.add(
            Link(
                nonce=token.split(".")[0],
                token=token,
                referrer_id=referrer,
                source="direct",
                target=target,
                expires_at=datetime.fromtimestamp(expires, UTC),
            )
        )


async def test_an_expired_link_is_refused_and_converts_nobody(api: ServerProcess, db: Database) -> None:
    expired = LinkSigner(SECRET).issue("expired-ref", now=int(time.time()) - 7200, ttl=3600)
    await _insert_link(db, expired.token, "expired-ref", "/join", expired.expires)
    async with httpx.AsyncClient(base_url=api.http) as http:
        assert_refused_page(await http.get(f"/r/{expired.token}"), 410)
        signup = {"type": "signup", "user_id": "late-1", "props": {"referral_token": expired.token}}
        assert (
            await http.post("/api/events", json=signup, headers=bearer(make_token("late-1")))
        ).status_code == 202
        # Processed in order: once the marker converts, the expired one has been looked at.
        link = await make_link(http, "marker-ref")
        marker = {"type": "signup", "user_id": "late-2", "props": {"referral_token": link["token"]}}
        await http.post("/api/events", json=marker, headers=bearer(make_token("late-2")))
        await _until(lambda: _has_conversion(db, "late-2"))
    assert await clicks_of(db, expired.token) == []
    assert await _conversions(db, "late-1") == []
    assert (await rejections_of(db, [expired.token]))[expired.token] == "expired"


OFF_SITE = [
    "https://evil.example",
    "http://evil.example/join",
    "//evil.example",
    "///evil.example",
    "/\\evil.example",
    "\\\\evil.example",
    "/join//evil.example",
    "/%2F%2Fevil.example",
    "/join/%2e%2e/%2e%2e//evil.example",
    "/join/../..//evil.example",
    "javascript:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    " /join",
    "/join\r\nLocation: https://evil.example",
    "/join?next=https://evil.example",
    "/join#@evil.example",
    "/join@evil.example",
    "\uff0f\uff0fevil.example",  # fullwidth solidus
    "/admin",
    "/JOIN",
    "",
]


async def test_a_link_cannot_be_made_to_lead_off_site(api: ServerProcess, db: Database) -> None:
    async with httpx.AsyncClient(base_url=api.http) as http:
        for target in [*OFF_SITE, 42, ["/join"], {"url": "/join"}, True]:
            response = await http.post(
                "/api/links",
                json={"source": "direct", "target": target},
                headers=bearer(make_token("redirector")),
            )
            assert response.status_code == 422, (target, response.text)
            assert "target" in response.json()["fields"], target
        # The allowed ones lead where they say, as a path on this site.
        for target in ("/", "/join", "/signup/teachers", "/challenge/abc", "/invite/parent"):
            link = await make_link(http, "redirector", target=target)
            followed = await http.get(f"/r/{link['token']}")
            assert followed.status_code == 302 and followed.headers["location"] == target
    async with db.session() as session:
        made = await session.scalar(
            select(func.count()).select_from(Link).where(Link.referrer_id == "redirector")
        )
    assert made == 5


@pytest.mark.parametrize("target", ["https://evil.example", "//evil.example", "/admin"])
async def test_a_stored_off_site_target_is_never_followed(
    api: ServerProcess, db: Database, target: str
) -> None:
    """Defence in depth: a correctly signed link whose stored target is off the allow-list (a bad
    import, an old row) gets the refusal page, not a redirect."""
    link = LinkSigner(SECRET).issue("stored-ref", now=int(time.time()), ttl=3600)
    await _insert_link(db, link.token, "stored-ref", target, link.expires)
    async with httpx.AsyncClient(base_url=api.http) as http:
        assert_refused_page(await http.get(f"/r/{link.token}"), 400)
    assert await clicks_of(db, link.token) == []
    assert (await rejections_of(db, [link.token]))[link.token] == "target_not_allowed"
