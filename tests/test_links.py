"""Signed invite links: signing and verification (pure), and the HTTP routes over a real server."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import httpx
import pytest
import websockets
from servers import SECRET, PhxClient, make_token
from sqlalchemy import select

from metrics.links import LinkError, LinkSigner, check_target, key_id
from store import Click, Database, Link, LinkRejection

KEY, OLD = "k" * 40, "o" * 40


def test_a_link_verifies_for_its_referrer_until_it_expires():
    signer = LinkSigner(KEY)
    link = signer.issue("maya", now=1000, ttl=60)
    parsed = LinkSigner.parse(link.token)
    signer.verify(parsed, "maya", now=1059)
    assert len(parsed.nonce) >= 22  # 128 random bits, URL-safe
    with pytest.raises(LinkError) as expired:
        signer.verify(parsed, "maya", now=1060)
    assert expired.value.reason == "expired"


@pytest.mark.parametrize("part", [0, 2, 3])
def test_any_altered_part_breaks_the_signature(part):
    signer = LinkSigner(KEY)
    pieces = signer.issue("maya", now=1000).token.split(".")
    pieces[part] = (
        pieces[part][:-1] + ("A" if pieces[part][-1] != "A" else "B")
        if part != 2
        else str(int(pieces[2]) + 86400)
    )
    with pytest.raises(LinkError) as info:
        signer.verify(LinkSigner.parse(".".join(pieces)), "maya", now=1000)
    assert info.value.reason == "bad_signature"


def test_the_signature_binds_the_referrer():
    signer = LinkSigner(KEY)
    link = signer.issue("maya", now=1000)
    with pytest.raises(LinkError, match="altered"):
        signer.verify(link, "mallory", now=1000)


def test_keys_rotate_old_links_keep_working_and_retired_keys_do_not():
    old_link = LinkSigner(OLD).issue("maya", now=1000)
    assert old_link.kid == key_id(OLD)
    LinkSigner(KEY, old_secrets=[OLD]).verify(old_link, "maya", now=1000)
    with pytest.raises(LinkError) as info:
        LinkSigner(KEY).verify(old_link, "maya", now=1000)
    assert info.value.reason == "unknown_key"


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "a.b.notanumber.d", "a..1.d", "x" * 300])
def test_malformed_tokens_are_refused(token):
    with pytest.raises(LinkError) as info:
        LinkSigner.parse(token)
    assert info.value.reason == "malformed"


@pytest.mark.parametrize(
    "target",
    [
        "https://evil.example",
        "//evil.example",
        "/admin",
        "/join/../admin",
        "javascript:alert(1)",
        "/join?x=//a",
    ],
)
def test_targets_are_app_paths_from_the_allow_list_only(target):
    with pytest.raises(ValueError, match="app path"):
        check_target(target)


def test_allowed_targets():
    assert check_target(None) == "/"
    assert check_target("/challenge/abc-123") == "/challenge/abc-123"


def _auth(sub: str = "maya", role: str = "student") -> dict[str, str]:
    return {"authorization": f"Bearer {make_token(sub, role)}"}


async def test_make_and_follow_a_link_counting_unique_clicks(server_factory, server_database):
    server = server_factory()
    async with httpx.AsyncClient(base_url=server.http) as http:
        assert (await http.post("/api/links", json={"source": "study_buddy"})).status_code == 401
        bad = await http.post(
            "/api/links", json={"source": "spam", "target": "https://evil.example"}, headers=_auth()
        )
        assert bad.status_code == 422 and set(bad.json()["fields"]) == {"source", "target"}
        made = await http.post(
            "/api/links", json={"source": "study_buddy", "target": "/join"}, headers=_auth()
        )
        assert made.status_code == 201
        body = made.json()
        assert body["url"].endswith(f"/r/{body['token']}") and body["expires_at"]

        first = await http.get(f"/r/{body['token']}", headers={"user-agent": "phone"})
        assert first.status_code == 302 and first.headers["location"] == "/join"
        assert first.cookies["ve_ref"] == body["token"]
        visitor = first.cookies["ve_vid"]
        assert http.cookies["ve_vid"] == visitor  # the same browser keeps it and comes back
        again = await http.get(f"/r/{body['token']}")
        assert again.status_code == 302
        async with httpx.AsyncClient(base_url=server.http, cookies={"ve_vid": "b" * 32}) as laptop:
            other = await laptop.get(f"/r/{body['token']}", headers={"user-agent": "laptop"})
        assert other.status_code == 302

        tampered = body["token"][:-2] + ("xx" if not body["token"].endswith("xx") else "yy")
        refused = await http.get(f"/r/{tampered}")
        assert refused.status_code == 400 and "altered" in refused.text and "<h1>" in refused.text
        assert (await http.get("/r/not-a-link")).status_code == 400
    database = Database(server_database)
    try:
        async with database.session() as session:
            clicks = (await session.execute(select(Click.unique_click))).scalars().all()
            rejections = (await session.execute(select(LinkRejection.reason))).scalars().all()
        assert sorted(clicks) == [False, True, True]  # three clicks, two visitors
        assert sorted(rejections) == ["bad_signature", "malformed"]
    finally:
        await database.dispose()


async def test_an_expired_link_gets_a_friendly_410(server_factory, server_database):
    server = server_factory()
    expired = LinkSigner(SECRET).issue("maya", now=int(time.time()) - 7200, ttl=3600)
    database = Database(server_database)
    try:
        async with database.session() as session, session.begin():
            session.add(
                Link(
                    nonce=expired.nonce,
                    token=expired.token,
                    referrer_id="maya",
                    source="direct",
                    target="/",
                    expires_at=datetime.fromtimestamp(expired.expires, UTC),
                )
            )
        async with httpx.AsyncClient(base_url=server.http) as http:
            response = await http.get(f"/r/{expired.token}")
        assert response.status_code == 410 and "expired" in response.text
        async with database.session() as session:
            assert (await session.execute(select(LinkRejection.reason))).scalars().all() == ["expired"]
    finally:
        await database.dispose()


async def test_a_signup_through_a_link_shows_in_the_k_factor_endpoint(server_factory):
    server = server_factory()
    async with httpx.AsyncClient(base_url=server.http) as http:
        made = (await http.post("/api/links", json={"source": "study_buddy"}, headers=_auth("maya"))).json()
        await http.post(
            "/api/events",
            json={"type": "invite_sent", "user_id": "maya", "props": {"source": "study_buddy"}},
            headers=_auth("maya"),
        )
        assert (await http.get(f"/r/{made['token']}")).status_code == 302
        signup = {"type": "signup", "user_id": "newbie", "props": {"referral_token": made["token"]}}
        assert (await http.post("/api/events", json=signup, headers=_auth("newbie"))).status_code == 202
        assert (await http.get("/api/metrics/k-factor", headers=_auth("maya"))).status_code == 403
        assert (
            await http.get("/api/metrics/k-factor?days=5", headers=_auth("ops", "admin"))
        ).status_code == 422
        for _ in range(100):
            report = (await http.get("/api/metrics/k-factor?days=7", headers=_auth("ops", "admin"))).json()
            if report["signups"]:
                break
            await asyncio.sleep(0.1)
        assert (report["invites_sent"], report["clicks"], report["signups"], report["active_users"]) == (
            1,
            1,
            1,
            1,
        )
        assert report["k_factor"] == 1.0 and report["by_source"][0]["source"] == "study_buddy"
        exported = await http.get("/api/metrics/k-factor?days=7&format=csv", headers=_auth("ops", "admin"))
        assert exported.headers["content-type"].startswith("text/csv")
        assert "k_factor,1.0" in exported.text and "by_source" in exported.text


async def test_the_dashboard_gets_the_report_live_and_it_equals_the_endpoint(server_factory):
    server = server_factory()
    admin = PhxClient(await websockets.connect(server.ws_url(make_token("ops", "admin"))))
    student = await PhxClient.connect(server.ws_url(make_token("maya")))
    try:
        assert (await student.join("dashboard:k_factor"))["response"] == {"reason": "unauthorized"}
        assert (await admin.join("dashboard:k_factor", {"days": 5}))["status"] == "error"
        joined = await admin.join("dashboard:k_factor", {"days": 7})
        assert joined["status"] == "ok" and joined["response"]["signups"] == 0
        async with httpx.AsyncClient(base_url=server.http) as http:
            made = (
                await http.post("/api/links", json={"source": "proud_parent"}, headers=_auth("maya"))
            ).json()
            invite = {"type": "invite_sent", "user_id": "maya", "props": {"source": "proud_parent"}}
            await http.post("/api/events", json=invite, headers=_auth("maya"))
            await http.get(f"/r/{made['token']}")
            signup = {"type": "signup", "user_id": "newbie", "props": {"referral_token": made["token"]}}
            await http.post("/api/events", json=signup, headers=_auth("newbie"))
            update = await admin.wait_for(
                lambda f: f[3] == "metrics_update" and f[4]["signups"] == 1, timeout=10
            )
            assert update[4]["k_factor"] == 1.0 and update[4]["clicks"] == 1
            endpoint = (await http.get("/api/metrics/k-factor?days=7", headers=_auth("ops", "admin"))).json()
            loops = (await http.get("/api/metrics/loops?days=7", headers=_auth("ops", "admin"))).json()
        assert (
            loops["loops"][0]["source"] == "proud_parent"
            and loops["loops"][0]["recommendation"] == "continue"
        )
        assert update[4] == endpoint
        pushes = admin.events("dashboard:k_factor", "metrics_update")
        assert len(pushes) <= 4  # coalesced: at most one a second, only when the numbers moved
    finally:
        await admin.close()
        await student.close()


async def test_the_referrer_hears_of_their_reward_on_their_user_topic(server_factory):
    server = server_factory()
    maya = await PhxClient.connect(server.ws_url(make_token("maya")))
    try:
        assert (await maya.join("user:maya"))["status"] == "ok"
        async with httpx.AsyncClient(base_url=server.http) as http:
            made = (
                await http.post("/api/links", json={"source": "buddy_challenge"}, headers=_auth("maya"))
            ).json()
            signup = {"type": "signup", "user_id": "sam", "props": {"referral_token": made["token"]}}
            assert (await http.post("/api/events", json=signup, headers=_auth("sam"))).status_code == 202
        reward = await maya.wait_for(lambda f: f[3] == "reward", timeout=10)
        assert reward[4] == {
            "kind": "xp",
            "amount": 100,
            "reason": "referral_signup",
            "for": "a friend you invited",
        }
    finally:
        await maya.close()
