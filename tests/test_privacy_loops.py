"""The loops never show a minor to another user, and what comes from outside passes the compliance gate.

One real in-process server per test (tests/loop_kit.py) on SQLite and on PostgreSQL, real sockets and
HTTP. Personas: an ordinary student, a minor without parental consent, a minor whose consent an admin
recorded (`POST /api/users/{id}/consent`). Another member's frames must never carry a minor's id or
name; a minor appears by a handle of the room's own; taking a challenge or a rally through a link
needs the whole signed token and, for a minor, a parent's consent; so does making a share link.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from datetime import timedelta
from typing import Any

import orjson
from loop_kit import loop_world
from servers import Roster, is_event
from sqlalchemy import select

from loops import BuddyChallenge, Effects
from store import Event, PromptDecision
from store.privacy import PrivacyRules

H = timedelta(hours=1)
ANA, ANA_NAME = "ana-o5v", "Ana Ordinaria"
BEN, BEN_NAME = "ben-o8w", "Ben Ordinario"
MINOR, MINOR_NAME = "mina-k7x", "Mina Minorova"
CONSENTED, CONSENTED_NAME = "milo-c3q", "Milo Consentido"
PARENT = "parent-p2z"
MINORS = (MINOR, MINOR_NAME, CONSENTED, CONSENTED_NAME)


def leaked(*seen: Any) -> list[str]:
    """Which of the minors' ids and names appear anywhere in what was seen."""
    text = orjson.dumps(seen).decode()
    return [s for s in MINORS if s in text]


async def personas(world) -> None:
    await world.profile(ANA, display_name=ANA_NAME)
    await world.profile(BEN, display_name=BEN_NAME)
    await world.profile(PARENT, role="parent", display_name="Pat Parent")
    for uid, name in ((MINOR, MINOR_NAME), (CONSENTED, CONSENTED_NAME)):
        await world.profile(uid, display_name=name, minor=True, parent_id=PARENT)
    consent = await world.http.post(
        f"/api/users/{CONSENTED}/consent",
        json={"method": "signed_form", "parent_id": PARENT},
        headers=world.headers("ops", "admin"),
    )
    assert consent.status_code == 200, consent.text


def tampered(token: str) -> str:
    """The same link with a later expiry: the nonce still matches, the signature does not."""
    nonce, kid, expires, signature = token.split(".")
    return f"{nonce}.{kid}.{int(expires) + 86400}.{signature}"


def row_of(rows: list[dict], key: str, value: str) -> dict:
    return next(r for r in rows if r.get(key) == value)


async def joined(client, topic: str, key: str) -> None:
    """Until `key` is in the room's presence as `client` sees it."""
    await client.wait_for(
        lambda f: (
            f[2] == topic
            and f[3] in ("presence_state", "presence_diff")
            and key in Roster(client, topic).current()
        )
    )


async def test_rally_members_see_a_minor_only_by_a_handle_of_that_rally(database_url):
    async with loop_world(database_url) as world:
        await personas(world)
        ben, minor = await world.socket(BEN), await world.socket(MINOR)
        await world.event("quiz_result", ANA, subject="physics", score=70)
        handles = []
        for n in range(2):  # two rallies, hours apart (the orchestrator's cooldown on invites)
            await world.advance(7 * H * n)
            rally = (await world.act(ANA, "start_rally", subject="physics")).json()["rally_id"]
            topic = f"rally:{rally}"
            for user, score in ((BEN, 80), (MINOR, 60)):
                await world.event("diagnostic_completed", user, subject="physics", score=score)
            invited = await world.act(ANA, "invite_to_rally", rally_id=rally, user_ids=[BEN, MINOR])
            assert invited.json()["invited"] == [BEN, MINOR], invited.text
            assert (await world.act(BEN, "join_rally", rally_id=rally)).status_code == 200
            assert (await ben.join(topic))["status"] == "ok"
            own = await world.act(MINOR, "join_rally", rally_id=rally)
            assert own.status_code == 200, own.text
            # The minor sees themself as themself.
            assert {"user_id": MINOR, "name": MINOR_NAME}.items() <= own.json()["standings"][2].items()
            assert (await minor.join(topic))["status"] == "ok"

            update = await ben.wait_for(
                lambda f, t=topic: f[2] == t and f[3] == "rally_update" and len(f[4]["standings"]) == 3
            )
            again = (await world.act(BEN, "join_rally", rally_id=rally)).json()["standings"]
            late = await world.socket(BEN)
            room = (await late.join(topic))["response"]["standings"]
            for standings in (update[4]["standings"], again, room):
                assert [s["name"] for s in standings] == [BEN_NAME, ANA_NAME, "A student"]
                assert row_of(standings, "name", ANA_NAME)["user_id"] == ANA  # members told apart
                assert "user_id" not in standings[2] and standings[2]["handle"].startswith("anon-")
            handle = update[4]["standings"][2]["handle"]
            assert {again[2]["handle"], room[2]["handle"]} == {handle}
            await joined(ben, topic, handle)  # the room's presence lists the minor under the same handle
            handles.append(handle)
            assert leaked(ben.frames, late.frames, again) == []

        assert handles[0] != handles[1]  # two rooms cannot be linked


async def test_a_challenge_room_shows_a_minor_player_by_a_handle_and_the_result_to_each_player(database_url):
    async with loop_world(database_url) as world:
        await personas(world)
        ana, minor = await world.socket(ANA), await world.socket(MINOR)
        made = await world.act(ANA, "challenge", subject="algebra", friend_id=MINOR)
        assert made.status_code == 200, made.text
        cid = made.json()["challenge_id"]
        room = f"challenge:{cid}"
        invite = await minor.wait_for(is_event(f"user:{MINOR}", "challenge_invite"))
        assert invite[4]["from"] == ANA_NAME
        assert (await world.act(MINOR, "accept_challenge", challenge_id=cid)).status_code == 200
        accepted = await ana.wait_for(is_event(f"user:{ANA}", "challenge_update"))
        assert accepted[4]["by"] == "A student"
        assert (await ana.join(room))["status"] == "ok"
        assert (await minor.join(room))["status"] == "ok"

        assert (await world.act(MINOR, "submit_challenge", challenge_id=cid, score=3)).status_code == 200
        submitted = await ana.wait_for(lambda f: f[2] == room and "submitted" in f[4])
        handle = submitted[4]["submitted"]["handle"]
        assert submitted[4]["submitted"] == {"handle": handle, "name": "A student"}
        await joined(ana, room, handle)  # the room's presence: the same handle

        assert (await world.act(ANA, "submit_challenge", challenge_id=cid, score=4)).status_code == 200
        result = (await ana.wait_for(is_event(room, "challenge_result")))[4]
        assert result["scores"] == [
            {"user_id": ANA, "name": ANA_NAME, "score": 4.0},
            {"handle": handle, "name": "A student", "score": 3.0},
        ]
        mine = (await minor.wait_for(is_event(f"user:{MINOR}", "challenge_result")))[4]
        assert mine["outcome"] == "lost"
        assert {"user_id": MINOR, "name": MINOR_NAME, "score": 3.0} in mine["scores"]
        assert leaked(ana.frames) == []

        # In another room the same minor has another handle.
        await world.advance(5 * H)
        other = (await world.act(ANA, "challenge", subject="algebra", friend_id=MINOR)).json()["challenge_id"]
        assert (await world.act(MINOR, "accept_challenge", challenge_id=other)).status_code == 200
        assert (await world.act(MINOR, "submit_challenge", challenge_id=other, score=1)).status_code == 200
        assert (await ana.join(f"challenge:{other}"))["status"] == "ok"
        assert (await world.act(ANA, "submit_challenge", challenge_id=other, score=2)).status_code == 200
        final = (await ana.wait_for(is_event(f"challenge:{other}", "challenge_result")))[4]
        assert final["scores"][1]["handle"] not in (handle, None)
        assert leaked(ana.frames) == []


async def test_study_buddy_nudges_list_a_minor_by_a_handle_the_student_invites_by(database_url):
    async with loop_world(database_url) as world:
        await personas(world)
        ana, minor = await world.socket(ANA), await world.socket(MINOR)
        await world.event("quiz_result", MINOR, subject="algebra", topic="fractions", score=95)
        await world.event("quiz_result", BEN, subject="algebra", topic="fractions", score=85)
        for score in (60, 55, 65):
            await world.event(
                "session_completed", ANA, subject="algebra", topic="fractions", minutes=20, score=score
            )
        nudge = (await ana.wait_for(is_event(f"user:{ANA}", "nudge")))[4]
        first, second = nudge["buddies"]
        assert first["name"] == "A student" and first["handle"].startswith("anon-") and "user_id" not in first
        assert second == {"user_id": BEN, "name": BEN_NAME}
        assert leaked(ana.frames) == []

        # The minor's id is no way in: only the handle the nudge showed picks them.
        by_id = await world.act(ANA, "invite_buddy", nudge_id=nudge["nudge_id"], buddy_id=MINOR)
        assert by_id.status_code == 422
        by_handle = await world.act(ANA, "invite_buddy", nudge_id=nudge["nudge_id"], buddy_id=first["handle"])
        assert by_handle.status_code == 200, by_handle.text
        invite = (await minor.wait_for(lambda f: f[3] == "nudge" and f[4]["kind"] == "buddy_invite"))[4]
        assert invite["from"] == ANA_NAME
        assert (await world.act(MINOR, "accept_nudge", nudge_id=nudge["nudge_id"])).status_code == 200
        room = f"challenge:{nudge['nudge_id']}"
        assert (await ana.join(room))["status"] == "ok"
        assert (await minor.join(room))["status"] == "ok"
        await joined(ana, room, first["handle"])  # the room knows the buddy by the same handle
        assert leaked(ana.frames) == []


async def opted_out(world, uid: str) -> None:
    await world.profile(uid, display_name="Oscar Out")
    response = await world.http.post(f"/api/users/{uid}/opt-out", headers=world.headers(uid))
    assert response.status_code == 200, response.text


async def test_an_outside_challenge_needs_its_whole_signed_link_and_a_minor_a_parents_consent(database_url):
    async with loop_world(database_url) as world:
        await personas(world)
        await opted_out(world, "oscar-q1")
        made = (await world.act(ANA, "challenge", subject="algebra", outside=True)).json()
        cid, token = made["challenge_id"], made["token"]
        other = (await world.act(ANA, "challenge", subject="algebra", outside=True)).json()
        shared = await world.http.post("/api/links", json={"source": "direct"}, headers=world.headers(ANA))
        assert shared.status_code == 201

        def accept(user: str, with_token: str):
            return world.act(user, "accept_challenge", challenge_id=cid, token=with_token)

        for wrong in (tampered(token), other["token"], shared.json()["token"], token.split(".")[0]):
            refused = await accept(BEN, wrong)
            assert refused.status_code == 403 and refused.json()["code"] == "invalid_link", refused.text

        kid = await accept(MINOR, token)
        assert kid.status_code == 403
        assert kid.json()["code"] == "refused" and kid.json()["refused"] == "minor_without_consent"
        assert "consent" in kid.json()["error"]
        socket = await world.socket(MINOR)
        over_socket = await socket.request(
            f"user:{MINOR}", "accept_challenge", {"challenge_id": cid, "token": token}
        )
        assert over_socket["status"] == "error"
        assert over_socket["response"]["code"] == "refused"
        assert over_socket["response"]["refused"] == "minor_without_consent"
        out = await accept("oscar-q1", token)
        assert out.status_code == 403 and out.json()["refused"] == "sender_opted_out"
        async with world.app.state.database.session() as session:
            refusals = (
                await session.execute(
                    select(PromptDecision.user_id, PromptDecision.reason).where(
                        PromptDecision.shown.is_(False)
                    )
                )
            ).all()
        assert sorted(refusals) == sorted(
            [(MINOR, "minor_without_consent")] * 2 + [("oscar-q1", "sender_opted_out")]
        )

        # With a parent's consent the minor takes it; it is then theirs alone.
        taken = await accept(CONSENTED, token)
        assert taken.status_code == 200 and taken.json()["state"] == "accepted", taken.text
        assert (await accept(BEN, token)).status_code == 403


async def test_a_rally_link_needs_its_whole_token_and_a_minor_a_parents_consent(database_url):
    async with loop_world(database_url) as world:
        await personas(world)
        for user in (ANA, MINOR, CONSENTED):
            await world.event("quiz_result", user, subject="physics", score=70)
        for user in (BEN, MINOR, CONSENTED):
            await world.event("diagnostic_completed", user, subject="physics", score=60)
        started = (await world.act(ANA, "start_rally", subject="physics")).json()
        rally, token = started["rally_id"], started["token"]

        def join(user: str, **params):
            return world.act(user, "join_rally", rally_id=rally, **params)

        assert (await join(BEN)).json()["code"] == "forbidden"
        for wrong in (tampered(token), token.split(".")[0]):
            refused = await join(BEN, token=wrong)
            assert refused.status_code == 403 and refused.json()["code"] == "invalid_link", refused.text
        kid = await join(MINOR, token=token)
        assert kid.status_code == 403 and kid.json()["refused"] == "minor_without_consent", kid.text
        assert (await join(CONSENTED, token=token)).status_code == 200
        assert (await join(BEN, token=token)).status_code == 200

        # A minor without consent starts a rally with no link to share outside; with consent, one.
        alone = await world.act(MINOR, "start_rally", subject="physics")
        assert alone.status_code == 200 and "token" not in alone.json()
        assert alone.json()["link_refused"] == "minor_without_consent"
        assert "token" in (await world.act(CONSENTED, "start_rally", subject="physics")).json()
        async with world.app.state.database.session() as session:
            senders = (await session.scalars(select(Event.user_id).where(Event.type == "invite_sent"))).all()
        assert MINOR not in senders


async def test_a_share_link_passes_the_compliance_gate_and_its_landing_page_names_nobody(database_url):
    async with loop_world(database_url) as world:
        await personas(world)
        await opted_out(world, "oscar-q1")

        async def share(user: str, **claims: Any):
            body = {"source": "session_share", "target": "/join"}
            return await world.http.post("/api/links", json=body, headers=world.headers(user, **claims))

        assert (await share(ANA)).status_code == 201
        kid = await share(MINOR)
        assert kid.status_code == 403, kid.text
        assert kid.json()["refused"] == "minor_without_consent" and "consent" in kid.json()["error"]
        # A token only adds protection: a minor the store does not know of yet is refused too.
        fresh = await share("newkid-z4", minor=True)
        assert fresh.status_code == 403 and fresh.json()["refused"] == "minor_without_consent"
        out = await share("oscar-q1")
        assert out.status_code == 403 and out.json()["refused"] == "sender_opted_out"
        made = await share(CONSENTED)
        assert made.status_code == 201, made.text

        landing = await world.http.get(f"/r/{made.json()['token']}", follow_redirects=False)
        assert landing.status_code == 302 and landing.headers["location"] == "/join"
        assert leaked(landing.text, dict(landing.headers)) == []
        broken = await world.http.get(f"/r/{tampered(made.json()['token'])}")
        assert broken.status_code == 400 and leaked(broken.text, dict(broken.headers)) == []


async def test_exposure_ids_are_keyed_with_the_apps_secret_and_stay_the_same_on_a_retry(database_url):
    async with loop_world(database_url) as world:
        admin = world.headers("ops", "admin")
        definition = {
            "key": "ttl",
            "name": "Shorter challenges",
            "hypothesis": "A 24 h challenge converts better",
            "loop": "buddy_challenge",
            "variants": [{"key": "a", "weight": 0.5}, {"key": "b", "weight": 0.5}],
            "target_metric": "first_value",
        }
        assert (await world.http.post("/api/experiments", json=definition, headers=admin)).status_code == 201
        assert (await world.http.post("/api/experiments/ttl/start", headers=admin)).status_code == 200
        loop = next(loop for loop in world.app.state.loops.loops if isinstance(loop, BuddyChallenge))
        elsewhere = BuddyChallenge(replace(loop.services, privacy=PrivacyRules("another app's secret")))

        async def exposure(of) -> str:
            fx = Effects()
            async with world.app.state.database.session() as session, session.begin():
                await of.variant(session, ANA, fx)
            (event,) = fx.events
            assert event.type == "experiment_exposure"
            return event.id

        first = await exposure(loop)
        assert await exposure(loop) == first  # announced again until recorded: the same event
        guessable = "exposure-" + hashlib.sha256(f"ttl\x00{ANA}".encode()).hexdigest()[:40]
        assert first != guessable and re.fullmatch(r"exposure-[0-9a-f]{20}", first)
        assert await exposure(elsewhere) != first
