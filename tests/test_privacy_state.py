"""One privacy state per user, in the store: the rule that shows a user to a viewer, tokens that can only
add protection, and presence that follows the store on every node."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import httpx
import jwt
import pytest
from servers import FAST_PRESENCE, TOPIC, PhxClient, Roster, make_token

from metrics import EventIngest, MemoryEventStream, validate_event
from realtime import InvalidToken, Revocations, TokenVerifier
from store import Database, User
from store.privacy import ADMIN, ANONYMOUS_NAME, OUTSIDER, PrivacyRules, PrivacyState, Viewer

RULES = PrivacyRules("test-key")
ROOM = "challenge:c1"


# --- The rule ---------------------------------------------------------------------------------------

PERSONAS = {
    "ordinary": PrivacyState("ann", known=True, display_name="Ann Lee"),
    "minor": PrivacyState("kid", known=True, minor=True, display_name="Timmy Tyler", parent_id="mum"),
    "minor_with_consent": PrivacyState("kid2", known=True, minor=True, consent=True, display_name="Tia"),
    "opted_out": PrivacyState("shy", known=True, opted_out=True, opted_out_by="self", display_name="Shy"),
    "unknown": PrivacyState("ghost"),
}


@pytest.mark.parametrize("persona", sorted(PERSONAS))
def test_other_students_never_see_a_minors_or_unknown_users_id_or_name(persona):
    state = PERSONAS[persona]
    shown = RULES.show(state, Viewer("stranger", "student"), ROOM)
    if persona == "opted_out":
        assert shown is None
    elif persona == "ordinary":
        assert shown is not None and shown.as_dict() == {"user_id": "ann", "name": "Ann Lee"}
    else:
        assert shown is not None and shown.user_id is None and shown.name == ANONYMOUS_NAME
        assert shown.handle is not None and state.uid not in shown.handle
        assert (state.display_name or "@") not in str(shown.as_dict())


def test_a_minors_handle_is_stable_in_one_room_and_differs_between_rooms():
    kid = PERSONAS["minor"]
    first = RULES.show(kid, OUTSIDER, "challenge:c1")
    again = RULES.show(kid, Viewer("someone-else"), "challenge:c1")
    elsewhere = RULES.show(kid, OUTSIDER, "challenge:c2")
    assert first is not None and again is not None and elsewhere is not None
    assert first.handle == again.handle != elsewhere.handle
    assert PrivacyRules("another-key").handle("challenge:c1", "kid") != first.handle


def test_the_user_and_their_parent_see_them_in_full_and_admins_see_the_id_not_a_minors_name():
    kid = PERSONAS["minor"]
    for viewer in (Viewer("kid", "student"), Viewer("mum", "parent")):
        shown = RULES.show(kid, viewer, ROOM)
        assert shown is not None and shown.as_dict() == {"user_id": "kid", "name": "Timmy Tyler"}
    shown = RULES.show(kid, ADMIN, ROOM)
    assert shown is not None and shown.as_dict() == {"user_id": "kid", "name": ANONYMOUS_NAME}
    shy = RULES.show(PERSONAS["opted_out"], ADMIN, ROOM)
    assert shy is not None and shy.user_id == "shy"


def test_a_token_only_adds_protection():
    adult = PERSONAS["ordinary"]
    assert adult.with_claims({"minor": True}).minor
    assert adult.with_claims({"opted_out": True}).opted_out
    kid = PERSONAS["minor"]
    assert kid.with_claims({"minor": False}).minor
    assert PERSONAS["opted_out"].with_claims({"opted_out": False}).opted_out
    assert kid.with_claims({"name": "Real Name"}).display_name == "Timmy Tyler"
    assert PERSONAS["unknown"].with_claims({"name": "Gus"}).display_name == "Gus"


# --- Revoked tokens ---------------------------------------------------------------------------------


def test_a_revoked_users_tokens_issued_before_the_revocation_are_refused_and_later_ones_accepted():
    revocations = Revocations(RULES.tombstone_key)
    verifier = TokenVerifier("s" * 32, revocations=revocations)
    now = int(time.time())
    old = verifier.issue({"sub": "gone", "iat": now - 10})
    other = verifier.issue({"sub": "stays", "iat": now - 10})
    revocations.revoke(RULES.tombstone_key("gone"), now - 5)
    with pytest.raises(InvalidToken, match="revoked"):
        verifier.verify(old)
    assert verifier.verify(other)["sub"] == "stays"
    assert verifier.verify(verifier.issue({"sub": "gone"}))["sub"] == "gone"  # issued after: a new account
    body = jwt.decode(old, options={"verify_signature": False})
    del body["iat"]
    with pytest.raises(InvalidToken, match="revoked"):  # nothing shows a token without iat is newer
        verifier.verify(jwt.encode(body, "s" * 32, algorithm="HS256"))


# --- Ingest: a token never lowers what the store says -------------------------------------------------


async def _ingest_as(ingest: EventIngest, claims: dict, event_id: str) -> None:
    now = datetime.now(UTC)
    raw = {"id": event_id, "type": "practice_completed", "user_id": claims["sub"], "props": {"subject": "x"}}
    event = validate_event(raw, caller=claims["sub"], is_admin=False, now=now)
    await ingest.ingest([event], actor_id=claims["sub"], actor_claims=claims)


async def test_a_minor_flag_set_by_an_admin_survives_the_childs_own_token(database_url):
    database = Database(database_url)
    ingest = EventIngest(database, MemoryEventStream())
    changed: list[str] = []

    async def note(user_id: str) -> None:
        changed.append(user_id)

    ingest.privacy_changed = note
    try:
        async with database.session() as session, session.begin():
            session.add(User(id="kid", minor=True, display_name="Timmy", subjects=[]))
        await _ingest_as(ingest, {"sub": "kid", "role": "student"}, "e1")  # a token without the claim
        await _ingest_as(ingest, {"sub": "kid", "role": "student", "minor": False}, "e2")
        async with database.session() as session:
            assert (await session.get(User, "kid")).minor is True
        assert changed == []  # nothing changed: nothing announced

        await _ingest_as(ingest, {"sub": "new", "role": "student", "minor": True}, "e3")
        await _ingest_as(ingest, {"sub": "new", "role": "student"}, "e4")
        async with database.session() as session:
            assert (await session.get(User, "new")).minor is True
        assert changed == ["new"]  # the claim made them a minor, once
    finally:
        await database.dispose()


async def test_another_users_event_ids_cannot_suppress_an_opt_out_event(database_url):
    database = Database(database_url)
    ingest = EventIngest(database, MemoryEventStream())
    try:
        now = datetime.now(UTC)
        for second in range(3):
            guess = f"opt-out-maya-{int(now.timestamp()) + second}"
            event = validate_event(
                {"id": guess, "type": "opt_out", "user_id": "mallory"},
                caller="mallory",
                is_admin=False,
                now=now,
            )
            await ingest.ingest([event], actor_id="mallory")
        maya = validate_event(
            {"id": f"opt-out-maya-{int(now.timestamp())}", "type": "opt_out", "user_id": "maya"},
            caller="maya",
            is_admin=False,
            now=now,
        )
        (accepted,) = await ingest.ingest([maya], actor_id="maya")
        assert accepted.id == f"opt-out-maya-{int(now.timestamp())}" and not accepted.duplicate
        async with database.session() as session:
            stored = await session.get(User, "maya")
            assert stored.opted_out is True and stored.opted_out_by == "self"
            assert (await session.get(User, "mallory")).opted_out is True  # their own, not maya's
    finally:
        await database.dispose()


# --- Presence follows the store ------------------------------------------------------------------------


async def put_profile(server, user_id: str, **fields) -> None:
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
        response = await http.put(
            f"/api/users/{user_id}",
            json=fields,
            headers={"authorization": f"Bearer {make_token('ops', 'admin')}"},
        )
    assert response.status_code in (200, 201), response.text


async def opt_out(server, user_id: str) -> None:
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
        response = await http.post(
            f"/api/users/{user_id}/opt-out", headers={"authorization": f"Bearer {make_token(user_id)}"}
        )
    assert response.status_code == 200, response.text


async def test_presence_reads_minor_and_opt_out_from_the_store_not_the_token(server_factory, clients):
    server = server_factory(FAST_PRESENCE)
    await put_profile(server, "kid-7", minor=True, display_name="Timmy Tyler")
    await put_profile(server, "shy-7", display_name="Shy Sue")
    await opt_out(server, "shy-7")
    watcher = await clients(server, "watcher")
    await watcher.join(TOPIC)
    kid = await clients(server, "kid-7", name="Timmy Tyler")  # a plain token: no minor claim
    shy = await clients(server, "shy-7", name="Shy Sue")  # a plain token: no opted_out claim
    await kid.join(TOPIC)
    await shy.join(TOPIC)
    roster = Roster(watcher, TOPIC)
    async with asyncio.timeout(5):
        while len(roster.current()) != 2:
            await asyncio.sleep(0.02)
    (key,) = [k for k in roster.current() if k != "watcher"]
    assert key.startswith("anon-")
    await asyncio.sleep(0.3)  # a few presence ticks: the opted-out user never shows up
    seen = str([f for f in watcher.frames if f[2] == TOPIC])
    for leaked in ("kid-7", "Timmy", "shy-7", "Shy Sue"):
        assert leaked not in seen


async def _until_roster(client: PhxClient, check, timeout: float = 5.0) -> float:
    started = time.monotonic()
    roster = Roster(client, TOPIC)
    async with asyncio.timeout(timeout):
        while not check(roster.current()):
            await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_a_privacy_change_reaches_a_viewer_on_another_process_within_a_second(
    server_factory, redis_url, clients
):
    env = {"BROKER_URL": redis_url, **FAST_PRESENCE}
    a, b = server_factory(env), server_factory(env)
    await put_profile(a, "leo", display_name="Leo Lin")
    await put_profile(a, "ivy", display_name="Ivy Ives")
    watcher = await clients(b, "watcher")
    await watcher.join(TOPIC)
    leo, ivy = await clients(a, "leo", name="Leo Lin"), await clients(a, "ivy", name="Ivy Ives")
    await leo.join(TOPIC)
    await ivy.join(TOPIC)
    await _until_roster(watcher, lambda r: {"watcher", "leo", "ivy"} <= set(r))

    # Marked a minor on process A: on B, the id and the name leave the list; an anonymous key joins.
    await put_profile(a, "leo", minor=True)
    took = await _until_roster(watcher, lambda r: "leo" not in r and any(k.startswith("anon-") for k in r))
    assert took < 1.0, f"took {took:.2f}s"
    assert "Leo Lin" not in str(Roster(watcher, TOPIC).current())

    # Opted out on process A: gone from B's list within a second, and not listed again.
    await opt_out(a, "ivy")
    took = await _until_roster(watcher, lambda r: "ivy" not in r)
    assert took < 1.0, f"took {took:.2f}s"
    await asyncio.sleep(0.3)
    assert "ivy" not in Roster(watcher, TOPIC).current()


# --- A node's cache of states ---------------------------------------------------------------------------


async def test_the_directory_serves_from_cache_until_a_notice_drops_the_user(database_url):
    from channels.privacy import PrivacyDirectory

    database = Database(database_url)
    try:
        async with database.session() as session, session.begin():
            session.add(User(id="cached", display_name="Cass", subjects=[]))
        directory = PrivacyDirectory(database, RULES)
        assert (await directory.get("cached")).minor is False
        async with database.session() as session, session.begin():
            (await session.get(User, "cached")).minor = True
        assert (await directory.get("cached")).minor is False  # cached: no notice yet
        directory.forget("cached")
        assert (await directory.get("cached")).minor is True
        # Many misses at once are one read, and each caller gets their own state.
        many = await asyncio.gather(*(directory.get(u) for u in ("cached", "nobody-1", "nobody-2")))
        assert [(s.uid, s.known) for s in many] == [
            ("cached", True),
            ("nobody-1", False),
            ("nobody-2", False),
        ]
    finally:
        await database.dispose()


async def test_a_load_that_raced_an_invalidation_is_not_cached(database_url):
    from channels.privacy import PrivacyDirectory

    class SlowRules(PrivacyRules):
        gate = asyncio.Event()

        async def load(self, session, uids):
            states = await super().load(session, uids)
            await self.gate.wait()
            return states

    database = Database(database_url)
    try:
        async with database.session() as session, session.begin():
            session.add(User(id="racer", subjects=[]))
        directory = PrivacyDirectory(database, SlowRules("test-key"))
        load = asyncio.create_task(directory.get("racer"))
        await asyncio.sleep(0.05)
        async with database.session() as session, session.begin():
            (await session.get(User, "racer")).opted_out = True
        directory.forget("racer")  # the notice arrives while the first load is in flight
        SlowRules.gate.set()
        assert (await load).opted_out is False  # that caller got what it read…
        assert (await directory.get("racer")).opted_out is True  # …but it was not kept
    finally:
        await database.dispose()


async def test_when_the_store_cannot_be_read_a_user_is_shown_protected_and_nothing_is_cached():
    from channels.privacy import PrivacyDirectory

    database = Database("postgresql+asyncpg://postgres@127.0.0.1:1/none")
    try:
        directory = PrivacyDirectory(database, RULES)
        state = await directory.get("anyone")
        assert state.minor is True and state.anonymous  # no id, no name, until the store answers
        assert RULES.show(state.with_claims({"name": "Real Name"}), OUTSIDER, TOPIC).user_id is None
        assert directory._states == {}
    finally:
        await database.dispose()


async def test_the_gate_reads_the_same_state_and_a_token_only_adds_to_it(database_url):
    from metrics.compliance import SocialAction, check
    from store import Consent

    database = Database(database_url)
    now = datetime.now(UTC)
    try:
        async with database.session() as session, session.begin():
            session.add(User(id="kid", minor=True, subjects=[]))
            session.add(Consent(user_id="tokenkid", parent_id="mum", method="signed_form", granted_at=now))
        share = SocialAction("direct", "share_link", None, None, outside=True)
        async with database.session() as session:
            # A minor in the store, with a token that does not say so: still a minor.
            verdict = await check(session, share.by({"sub": "kid"}), now)
            assert verdict.reason == "minor_without_consent"
            # A minor only by their token, without a profile, whose parent consented: allowed.
            assert (await check(session, share.by({"sub": "tokenkid", "minor": True}), now)).allowed
            assert (await check(session, share.by({"sub": "stranger", "opted_out": True}), now)).reason == (
                "sender_opted_out"
            )
    finally:
        await database.dispose()
