"""The privacy sweep: every persona on every surface, seen by another student, an outsider and an admin.

Personas are set up through the API (profiles, consent, opt-outs by the user and by a parent, a
deletion), then each one does what students do: is online in a subject, studies, scores, shares a
link, plays in a challenge and a rally with the viewer. The viewer — an ordinary student — records
every frame their sockets receive and every HTTP answer they read; an outsider opens the personas'
links; an admin reads the dashboards' data and CSV exports. The sweep fails if a name or an id
appears anywhere it must not, and (the control) if the ordinary persona does not appear where it
should: a sweep that saw nothing would pass for the wrong reason.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import orjson
import pytest
from loop_kit import loop_world
from servers import TOPIC, PhxClient, Roster

SUBJECT = "algebra"


@dataclass(frozen=True)
class Persona:
    key: str
    uid: str
    name: str
    hidden_from_others: bool  # neither id nor name reach another student or an outsider
    named_to_admin: bool  # the admin's data may carry their name


PERSONAS = [
    Persona("ordinary", "p-ord-5b1", "Olive Ordinary", False, True),
    Persona("minor_no_consent", "p-mnc-7c2", "Mona Minor", True, False),
    Persona("minor_consent", "p-mwc-9d3", "Milo Consented", True, False),
    Persona("opted_out_self", "p-oos-1e4", "Oscar Optedout", True, True),
    Persona("opted_out_parent", "p-oop-3f5", "Opal Parentout", True, True),
    Persona("deleted", "p-del-6a6", "Dora Deleted", True, True),
]
PARENT = "parent-of-all"
VIEWER = "vic-viewer"


def leaks(text: str, persona: Persona) -> list[str]:
    return [s for s in (persona.uid, persona.name) if s in text]


async def set_up_personas(world) -> None:
    for p in PERSONAS:
        fields: dict[str, Any] = {"display_name": p.name, "parent_id": PARENT, "subjects": [SUBJECT]}
        if p.key.startswith("minor"):
            fields["minor"] = True
        await world.profile(p.uid, **fields)
    consent = await world.http.post(
        f"/api/users/{uid('minor_consent')}/consent",
        json={"method": "signed_form"},
        headers=world.headers(PARENT, "parent"),
    )
    assert consent.status_code == 200, consent.text
    mine = await world.http.post(
        f"/api/users/{uid('opted_out_self')}/opt-out", headers=world.headers(uid("opted_out_self"))
    )
    assert mine.status_code == 200, mine.text
    theirs = await world.http.post(
        f"/api/users/{uid('opted_out_parent')}/opt-out", headers=world.headers(PARENT, "parent")
    )
    assert theirs.status_code == 200, theirs.text


def uid(key: str) -> str:
    return next(p.uid for p in PERSONAS if p.key == key)


async def study(world, persona: Persona) -> None:
    """What a student does: events from their own client, as their own token."""
    headers = world.headers(persona.uid)
    events = [
        {"type": "session_completed", "user_id": persona.uid, "props": {"subject": SUBJECT, "minutes": 25}},
        {"type": "quiz_result", "user_id": persona.uid, "props": {"subject": SUBJECT, "score": 90}},
        {"type": "practice_completed", "user_id": persona.uid, "props": {"subject": SUBJECT}},
    ]
    response = await world.http.post("/api/events", json=events, headers=headers)
    assert response.status_code == 202, response.text


async def wait_consumed(world) -> None:
    """Until every stored event went through every consumer (feeds, boards, loops, ...)."""
    from sqlalchemy import func, select

    from store import Consumption, Event

    names = [c.name for c in world.app.state.runner.consumers]
    async with asyncio.timeout(20):
        while True:
            async with world.app.state.database.session() as session:
                events = await session.scalar(select(func.count()).select_from(Event))
                done = await session.scalar(select(func.count()).where(Consumption.consumer.in_(names)))
            if done >= events * len(names):
                return
            await asyncio.sleep(0.05)


async def play_loops(world, viewer: PhxClient) -> None:
    """The viewer challenges every persona who may be challenged, and rallies all of them."""
    await world.event("quiz_result", VIEWER, subject=SUBJECT, score=70)
    rally = await world.act(VIEWER, "start_rally", subject=SUBJECT)
    assert rally.status_code == 200, rally.text
    rally_id = rally.json()["rally_id"]
    for n, p in enumerate(PERSONAS):
        await world.event("diagnostic_completed", p.uid, subject=SUBJECT, score=50 + n)
    invited = await world.act(
        VIEWER, "invite_to_rally", rally_id=rally_id, user_ids=[p.uid for p in PERSONAS]
    )
    assert invited.status_code == 200, invited.text
    assert (await viewer.join(f"rally:{rally_id}"))["status"] == "ok"
    for member in invited.json()["invited"]:
        joined = await world.act(member, "join_rally", rally_id=rally_id)
        assert joined.status_code == 200, joined.text
        await world.event("quiz_result", member, subject=SUBJECT, score=80)
    await world.advance(timedelta(hours=5))  # past the loops' cooldowns on the prompts studying made
    for p in PERSONAS:
        made = await world.act(VIEWER, "challenge", subject=SUBJECT, friend_id=p.uid)
        if p.key.startswith("opted"):
            # The gate: they take no part, and the viewer is not told why.
            assert made.status_code == 403 and made.json()["refused"] == "recipient_unavailable", made.text
            continue
        assert made.status_code == 200, made.text
        cid = made.json()["challenge_id"]
        assert (await world.act(p.uid, "accept_challenge", challenge_id=cid)).status_code == 200
        assert (await viewer.join(f"challenge:{cid}"))["status"] == "ok"
        assert (await world.act(p.uid, "submit_challenge", challenge_id=cid, score=3)).status_code == 200
        assert (await world.act(VIEWER, "submit_challenge", challenge_id=cid, score=4)).status_code == 200
        await viewer.wait_for(lambda f, t=f"challenge:{cid}": f[2] == t and f[3] == "challenge_result")


async def share_links(world) -> dict[str, str]:
    """Each persona asks for a share link; those the gate allows are returned, by persona."""
    made = {}
    for p in PERSONAS:
        response = await world.http.post(
            "/api/links", json={"source": "session_share"}, headers=world.headers(p.uid)
        )
        if response.status_code == 201:
            made[p.uid] = response.json()["token"]
        else:
            assert response.status_code == 403, response.text
    return made


@pytest.mark.timeout(180)
async def test_no_surface_shows_a_protected_persona_to_another_user(database_url):
    async with loop_world(database_url) as world:
        await set_up_personas(world)
        await world.profile(VIEWER, display_name="Vic Viewer", subjects=[SUBJECT])

        viewer = await world.socket(VIEWER)
        topics = [
            TOPIC,
            "presence:global",
            "feed:global",
            f"feed:subject:{SUBJECT}",
            f"leaderboard:{SUBJECT}:daily",
        ]
        for topic in topics:
            reply = await viewer.join(topic)
            assert reply["status"] == "ok", (topic, reply)

        # Everyone is online in the subject and studies.
        sockets: dict[str, PhxClient] = {}
        for p in PERSONAS:
            sockets[p.uid] = await world.socket(p.uid, name=p.name)
            assert (await sockets[p.uid].join(TOPIC))["status"] == "ok"
            await study(world, p)
        await wait_consumed(world)
        await play_loops(world, viewer)
        links = await share_links(world)

        # The deleted persona is deleted by their parent, after all of that.
        gone = await world.http.delete(
            f"/api/users/{uid('deleted')}", headers=world.headers(PARENT, "parent")
        )
        assert gone.status_code == 200, gone.text
        await asyncio.sleep(1.5)  # the live boards' next tick; presence diffs

        # What the viewer reads over HTTP, and rejoins (history, board, presence state) after the fact.
        reads: list[Any] = []
        for feed in ("global", f"subject:{SUBJECT}"):
            page = await world.http.get(f"/api/feeds/{feed}", headers=world.headers(VIEWER))
            assert page.status_code == 200
            reads.append(page.json())
        late = await world.socket("late-viewer")
        for topic in topics:
            reads.append(await late.join(topic))
        await asyncio.sleep(0.5)
        # An outsider opens the links the personas shared: the landing page names nobody.
        for token in links.values():
            landing = await world.http.get(f"/r/{token}", follow_redirects=False)
            assert landing.status_code < 500
            reads.append(
                {"status": landing.status_code, "headers": dict(landing.headers), "body": landing.text}
            )
        live = orjson.dumps(viewer.frames).decode()
        after = orjson.dumps([reads, late.frames]).decode()

        # The control: the ordinary persona is seen, by name and id, on presence, feeds, the board and
        # in the loops' rooms.
        ordinary = next(p for p in PERSONAS if p.key == "ordinary")
        assert ordinary.uid in live and ordinary.name in live
        assert ordinary.uid in Roster(viewer, TOPIC).current()
        assert ordinary.name in orjson.dumps(reads[0]).decode()  # the global feed's page
        rooms = orjson.dumps([f for f in viewer.frames if f[2].startswith(("challenge:", "rally:"))]).decode()
        assert ordinary.uid in rooms and ordinary.name in rooms
        assert set(links) == {
            p.uid for p in PERSONAS if p.key != "minor_no_consent" and not p.key.startswith("opted")
        }

        for p in PERSONAS:
            if not p.hidden_from_others:
                continue
            if p.key != "deleted":  # the deleted persona was an ordinary user until deleted
                assert leaks(live, p) == [], f"{p.key} leaked live: {leaks(live, p)}"
            assert leaks(after, p) == [], f"{p.key} leaked after the fact: {leaks(after, p)}"

        # The admin's dashboards and exports never carry a minor's name.
        admin = world.headers("ops", "admin")
        admin_reads = []
        for path in (
            "/api/metrics/k-factor",
            "/api/metrics/k-factor?format=csv",
            "/api/metrics/loops",
            "/api/guardrails",
        ):
            response = await world.http.get(path, headers=admin)
            assert response.status_code == 200, (path, response.text)
            admin_reads.append(response.text)
        for p in PERSONAS:
            if not p.named_to_admin:
                assert p.name not in "".join(admin_reads), p.key
