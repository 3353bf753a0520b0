"""COPPA/FERPA export and deletion (issue 9): a real in-process server on SQLite and PostgreSQL builds a
rich history for a student and a bystander through the pipeline, the loops and the HTTP API; the
deletion is then checked by reading every string and JSON column of every table."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from loop_kit import loop_world
from servers import SECRET
from sqlalchemy import JSON, String, Text, cast, func, select

from channels.leaderboard import MemoryBoards, RedisBoards
from metrics import privacy
from metrics.compliance import has_consent
from metrics.growth import k_factor_report
from store import (
    AuditLog,
    Base,
    Consent,
    Conversion,
    Database,
    Event,
    ExperimentAudit,
    ExperimentConversion,
    ExperimentExposure,
    FeedItem,
    LoopControl,
    LoopItem,
    Reaction,
    Reward,
    User,
)
from web import privacy_api

TARGET, PAL, NEWBIE, MOM = "kid-zed-7f3a", "pal-q9", "newbie-r2", "mom-w4"
TARGET_NAME = "Kiddo Zed"


def mount(app: Any) -> None:
    """The privacy routes on the app, unless web/app.py already serves them."""
    if not any(getattr(r, "endpoint", None) is privacy_api.delete_user for r in app.router.routes):
        app.router.routes.extend(privacy_api.routes)


async def naming(session: Any, needle: str) -> dict[str, int]:
    """Rows per `table.column` whose string or JSON value (as text) contains `needle`, in every table."""
    found = {}
    for table in Base.metadata.sorted_tables:
        for column in table.columns:
            if isinstance(column.type, String | JSON):
                n = await session.scalar(
                    select(func.count())
                    .select_from(table)
                    .where(cast(column, Text).contains(needle, autoescape=True))
                )
                if n:
                    found[f"{table.name}.{column.name}"] = n
    return found


async def build_history(world: Any) -> None:
    """The target: referred by PAL, referrer of NEWBIE, scored, in feeds, in loops on both sides, with a
    consent, experiment rows and audit rows. PAL: a history of their own that mentions the target."""
    await world.profile(TARGET, display_name=TARGET_NAME, parent_id=MOM)
    await world.profile(PAL, display_name="Pal")
    pal_link = await world.http.post("/api/links", json={"source": "direct"}, headers=world.headers(PAL))
    assert pal_link.status_code == 201, pal_link.text
    assert (await world.http.get(f"/r/{pal_link.json()['token']}")).status_code == 302
    await world.event("signup", TARGET, referral_token=pal_link.json()["token"])
    await world.event("first_value", TARGET)
    link = await world.http.post("/api/links", json={"source": "direct"}, headers=world.headers(TARGET))
    assert link.status_code == 201, link.text
    token = link.json()["token"]
    await world.event("invite_sent", TARGET, source="direct", link_token=token)
    assert (await world.http.get(f"/r/{token}")).status_code == 302
    assert (await world.http.get(f"/r/{token[:-3]}xyz")).status_code == 400  # a tampered click
    await world.event("signup", NEWBIE, referral_token=token)
    for user in (TARGET, PAL):
        await world.event("practice_completed", user, subject="algebra")
        await world.event("quiz_result", user, subject="algebra", score=90 if user == TARGET else 70)
    await world.event("streak_updated", TARGET, days=3)
    await world.event("reaction", PAL, to=TARGET, note=f"cheered user:{TARGET}")
    await world.advance(timedelta(hours=5))  # past the orchestrator's cooldown after the practice prompts
    for me, friend in ((TARGET, PAL), (PAL, TARGET)):
        reply = await world.act(me, "challenge", subject="algebra", friend_id=friend)
        assert reply.status_code == 200 and "challenge_id" in reply.json(), reply.text
    now = world.clock.now()
    async with world.app.state.database.session() as session, session.begin():
        feed = {
            e.user_id: i
            for i, e in (
                await session.execute(
                    select(FeedItem, Event)
                    .join(Event, Event.id == FeedItem.event_id)
                    .where(FeedItem.feed == "global", Event.type == "practice_completed")
                )
            ).all()
        }
        session.add_all(
            [
                Reaction(
                    feed="global", offset=feed[TARGET].offset, user_id=PAL, kind="cheer", created_at=now
                ),
                Reaction(
                    feed="global", offset=feed[PAL].offset, user_id=TARGET, kind="cheer", created_at=now
                ),
                Reaction(feed="global", offset=feed[PAL].offset, user_id=PAL, kind="star", created_at=now),
                Consent(user_id=TARGET, parent_id=MOM, method="card", granted_at=now),
                LoopItem(
                    id="nd_pal_1",
                    loop="study_buddy",
                    owner_id=PAL,
                    subject="algebra",
                    state="suggested",
                    data={"reason": "exam", "buddies": [TARGET, "someone-else"]},
                ),
                AuditLog(actor=MOM, action="consent_granted", subject=TARGET, details={"child": TARGET}),
                AuditLog(
                    actor="ops", action="conversion_rejected", subject=f"conversion:{TARGET}", details={}
                ),
                ExperimentAudit(experiment_key="copy", actor=TARGET, action="update", changes={"by": TARGET}),
                LoopControl(loop="study_buddy", paused=True, reason="manual", paused_by=TARGET),
            ]
        )
        for user in (TARGET, PAL):
            session.add(
                ExperimentExposure(
                    experiment_key="copy", user_id=user, variant="b", exposed_at=now, event_id=f"x-{user}"
                )
            )
            session.add(
                ExperimentConversion(
                    experiment_key="copy",
                    user_id=user,
                    metric="quiz_result",
                    events=1,
                    value=1.0,
                    first_at=now,
                )
            )


async def test_export_then_delete_removes_the_user_everywhere_and_keeps_the_bystander(database_url):
    async with loop_world(database_url) as world:
        mount(world.app)
        database = world.app.state.database
        boards = world.app.state.endpoint.context.leaderboards
        await build_history(world)
        await world.settle()
        now = datetime.now(UTC)
        async with database.session() as session:
            before = await naming(session, TARGET)
            assert "feed_items.text" in await naming(session, TARGET_NAME)  # public feeds carry their name
            pal_before = (await privacy.export_user(session, PAL))["tables"]
            signups_before = (await k_factor_report(session, 30, now))["signups"]
        # The sweep sees the target in ids, JSON and free text of many tables before the deletion.
        for where in (
            "users.id", "events.user_id", "events.props", "loop_items.data", "loop_jobs.payload",
            "rewards.ref", "audit_log.details", "experiment_audit.changes", "conversions.referrer_id",
        ):  # fmt: skip
            assert where in before, before
        _, top = await boards.top("algebra", "all_time", now)
        assert [e.get("user_id") for e in top] == [TARGET, PAL]

        # Export: the user themselves (or their parent, or an admin), as a download, audited.
        url = f"/api/users/{TARGET}/export"
        assert (await world.http.get(url)).status_code == 401
        assert (await world.http.get(url, headers=world.headers(PAL))).status_code == 403
        assert (
            await world.http.get("/api/users/nobody-here/export", headers=world.headers("ops", "admin"))
        ).status_code == 404
        response = await world.http.get(url, headers=world.headers(TARGET))
        assert response.status_code == 200, response.text
        assert response.headers["content-disposition"].startswith("attachment")
        export = response.json()
        tables = export["tables"]
        assert export["user_id"] == TARGET and tables["profile"][0]["display_name"] == TARGET_NAME
        for section in (
            "events", "user_activity", "feed_items", "feed_reactions", "score_entries", "links",
            "link_clicks", "rewards", "streaks", "loop_items", "loop_members", "prompt_decisions",
            "consents", "experiment_exposures", "experiment_conversions", "audit_log",
        ):  # fmt: skip
            assert tables[section], section
        assert {c["user_id"] for c in tables["conversions"]} == {TARGET, NEWBIE}
        assert {e["type"] for e in tables["events"]} >= {"signup", "practice_completed", "quiz_result"}
        assert all("visitor" not in c and "ip_hash" not in c for c in tables["link_clicks"])
        assert {i["feed"] for i in tables["feed_items"]} == {"global", "subject:algebra", f"user:{TARGET}"}
        async with database.session() as session:
            exported = await session.scalar(select(AuditLog).where(AuditLog.action == "user_exported"))
        assert exported.subject == TARGET and exported.details["events"] == len(tables["events"])

        # Delete: not the user (their parent or an admin); then nothing names the target, anywhere.
        assert (await world.http.delete(f"/api/users/{TARGET}")).status_code == 401
        assert (
            await world.http.delete(f"/api/users/{TARGET}", headers=world.headers(TARGET))
        ).status_code == 403
        admin = world.headers("ops", "admin")
        assert (await world.http.delete("/api/users/nobody-here", headers=admin)).status_code == 404
        response = await world.http.delete(f"/api/users/{TARGET}", headers=admin)
        assert response.status_code == 200, response.text
        report = response.json()
        stand_in = privacy.pseudonym(SECRET, TARGET)
        assert report["pseudonym"] == stand_in and report["leaderboard_subjects"] == ["algebra"]
        assert "deleted_at" in report and "cached_boards_cleared" not in report
        for table in ("users", "events", "feed_items", "score_entries", "links", "link_clicks", "streaks"):
            assert report["deleted"][table] > 0, table
        assert report["deleted"]["link_rejections"] == 1 and report["deleted"]["conversions"] == 1
        assert report["anonymised"]["conversions"] == 1 and report["anonymised"]["rewards"] >= 1

        async with database.session() as session:
            assert await naming(session, TARGET) == {}
            assert await naming(session, TARGET_NAME) == {}
            assert "audit_log.subject" in await naming(session, stand_in)
            pal_after = (await privacy.export_user(session, PAL))["tables"]
            signups_after = (await k_factor_report(session, 30, now))["signups"]
            newbie = await session.get(Conversion, NEWBIE)
            pal_rewards = (await session.scalars(select(Reward).where(Reward.user_id == PAL))).all()
            audit = (await session.scalars(select(AuditLog).order_by(AuditLog.id))).all()
            consents_left = await session.scalar(select(func.count()).select_from(Consent))
        # The bystander's own history is intact; what named the target now names the pseudonym.
        for section in (
            "profile", "events", "user_activity", "feed_items", "score_entries", "links", "link_clicks",
            "streaks", "experiment_exposures", "experiment_conversions",
        ):  # fmt: skip
            assert len(pal_after[section]) == len(pal_before[section]), section
        reaction_event = next(e for e in pal_after["events"] if e["type"] == "reaction")
        assert reaction_event["props"] == {"to": stand_in, "note": f"cheered user:{stand_in}"}
        assert [r["kind"] for r in pal_after["feed_reactions"]] == [
            "star"
        ]  # the cheer on the target's item went
        by_id = {i["id"]: i for i in pal_after["loop_items"]}
        assert by_id["nd_pal_1"]["data"]["buddies"] == [stand_in, "someone-else"]
        assert any(
            i["other_id"] == stand_in for i in pal_after["loop_items"] if i["loop"] == "buddy_challenge"
        )
        assert (
            len(pal_after["loop_items"]) == len(pal_before["loop_items"]) - 1
        )  # the target's challenge went
        # Documented counts: PAL's referral of the target is gone with the target (the reward stays, its
        # ref pseudonymous); the target's referral of NEWBIE still counts, under the pseudonym.
        assert pal_after["conversions"] == [] and len(pal_before["conversions"]) == 1
        assert signups_before == 2 and signups_after == 1
        assert newbie is not None and newbie.referrer_id == stand_in
        assert {r.ref for r in pal_rewards} == {stand_in} and len(pal_rewards) == len(pal_before["rewards"])
        assert consents_left == 0
        assert [(a.action, a.subject) for a in audit][-1] == ("user_deleted", stand_in)
        assert audit[-1].details["deleted"]["events"] == report["deleted"]["events"]
        assert all(a.subject == stand_in for a in audit if a.action in ("consent_granted", "user_exported"))
        assert [a.subject for a in audit if a.action == "conversion_rejected"] == [f"conversion:{stand_in}"]

        # Leaderboards: the cache no longer lists them, on any window; the bystander stays.
        for window in ("daily", "weekly", "all_time"):
            _, top = await boards.top("algebra", window, now)
            assert all(e.get("user_id") != TARGET for e in top)
        _, top = await boards.top("algebra", "all_time", now)
        assert [e.get("user_id") for e in top] == [PAL]

        # Idempotent: nothing is held any more.
        assert (await world.http.delete(f"/api/users/{TARGET}", headers=admin)).status_code == 404
        assert (await world.http.get(url, headers=admin)).status_code == 404


async def test_deleting_a_parent_keeps_the_childs_consent_valid_under_the_pseudonym(database_url):
    database = Database(database_url)
    now = datetime.now(UTC)
    try:
        async with database.session() as session, session.begin():
            session.add_all(
                [
                    User(id=MOM, role="parent", display_name="Mom", subjects=[]),
                    User(id=TARGET, role="student", minor=True, parent_id=MOM, subjects=[]),
                    Consent(user_id=TARGET, parent_id=MOM, method="card", granted_at=now),
                ]
            )
        async with database.session() as session, session.begin():
            assert await privacy.holds_data(session, MOM)
            report = await privacy.delete_user(session, MOM, actor="ops", now=now, key=SECRET)
        stand_in = privacy.pseudonym(SECRET, MOM)
        assert report.deleted["users"] == 1
        assert {t: n for t, n in report.anonymised.items() if n} == {"consents": 1, "users": 1}
        async with database.session() as session:
            child = await session.get(User, TARGET)
            assert child is not None and child.parent_id == stand_in
            assert await has_consent(session, TARGET)  # the child's record stays valid
            assert not await privacy.holds_data(session, MOM)
            assert await naming(session, MOM) == {}
            exported = await privacy.export_user(session, TARGET)
        assert exported["tables"]["consents"][0]["parent_id"] == stand_in
    finally:
        await database.dispose()


def test_the_pseudonym_is_stable_keyed_and_not_the_id():
    first = privacy.pseudonym(SECRET, TARGET)
    assert first == privacy.pseudonym(SECRET.encode(), TARGET) and first.startswith("deleted:")
    assert TARGET not in first and len(first) <= 64
    assert first != privacy.pseudonym("another-key", TARGET) != privacy.pseudonym(SECRET, PAL)


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_forget_takes_a_member_off_every_board(request, kind):
    store = RedisBoards(request.getfixturevalue("redis_url")) if kind == "redis" else MemoryBoards()
    subject = f"privacy{uuid.uuid4().hex[:8]}"  # keys of our own: the Redis may be shared
    keys = [f"lb:{subject}:daily:2026-01-0{d}" for d in (1, 2)] + [f"lb:{subject}:all_time:all"]
    member, other = f"gone-{subject}", f"stays-{subject}"
    try:
        for key in keys:
            await store.replace(key, {member: 5, other: 3}, ttl=60)
        assert await store.forget(member) == sorted(keys)
        for key in keys:
            assert await store.top(key, 10) == [(other, 3)]
        assert await store.forget(member) == []
    finally:
        if isinstance(store, RedisBoards):
            for key in keys:
                await store._redis.delete(key)
        await store.close()
