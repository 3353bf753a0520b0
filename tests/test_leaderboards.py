"""Leaderboards: scoring and caps, windows, ranking with ties, privacy, rebuild from the database."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import orjson
import pytest
from sqlalchemy import update

from channels import LeaderboardConsumer, Leaderboards
from channels.leaderboard import (
    CHANGES_TOPIC,
    TOP_N,
    WINDOWS,
    MemoryBoards,
    RedisBoards,
    board_key,
    boards_follow_changes,
    period,
    points_for,
)
from channels.privacy import PrivacyChange
from metrics import ConsumerRunner, MemoryEventStream
from metrics import privacy as data_rights
from realtime import Hub, MemoryBroker, RealtimeStats
from store import Database, User, utcnow
from store.privacy import PrivacyRules, opt_out_user


def quiz(eid: str, user: str, score: float, subject: str = "algebra", ts: datetime | None = None) -> dict:
    return {
        "id": eid,
        "type": "quiz_result",
        "user_id": user,
        "ts": (ts or utcnow()).isoformat(),
        "props": {"subject": subject, "score": score},
        "actor_id": user,
    }


@pytest.mark.parametrize(
    ("event", "points"),
    [
        ({"type": "practice_completed", "props": {"subject": "a"}}, 10),
        ({"type": "quiz_result", "props": {"subject": "a", "score": 92.4}}, 92),
        ({"type": "quiz_result", "props": {"subject": "a", "score": 250}}, 0),
        ({"type": "quiz_result", "props": {"subject": "a", "score": -5}}, 0),
        ({"type": "session_completed", "props": {"subject": "a", "minutes": 45}}, 45),
        ({"type": "session_completed", "props": {"subject": "a", "minutes": 900}}, 120),
        ({"type": "streak_updated", "props": {"days": 7}}, 0),
    ],
)
def test_scoring(event, points):
    assert points_for(event) == points


def test_windows_roll_over_at_utc_midnight_and_monday():
    sunday_late = datetime(2026, 11, 29, 23, 59, tzinfo=UTC)
    monday = datetime(2026, 11, 30, 0, 0, tzinfo=UTC)
    assert period("daily", sunday_late) == "2026-11-29" and period("daily", monday) == "2026-11-30"
    assert period("weekly", sunday_late) == "2026-W48" and period("weekly", monday) == "2026-W49"
    assert period("all_time", monday) == "all"
    assert board_key("algebra", "weekly", monday) == "lb:algebra:weekly:2026-W49"


@pytest.fixture(params=["memory", "redis"])
async def boards(request, database_url):
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        store = RedisBoards(url)
        async for key in store._redis.scan_iter("lb:*"):  # only our keys: the Redis may be shared
            await store._redis.delete(key)
    else:
        store = MemoryBoards()
    database = Database(database_url)
    hub = Hub(MemoryBroker(), RealtimeStats())
    await hub.start()
    leaderboards = Leaderboards(database, store, PrivacyRules("test"))
    consumer = LeaderboardConsumer(leaderboards, hub)
    runner = ConsumerRunner(database, MemoryEventStream(), [consumer])

    async def score(event: dict) -> None:
        assert await runner.process(consumer, event) == "done"

    yield leaderboards, score, hub
    await store.close()
    await hub.stop()
    await database.dispose()


async def add_users(leaderboards: Leaderboards, *users: User) -> None:
    async with leaderboards.database.session() as session, session.begin():
        session.add_all(users)


async def test_ranking_ties_share_a_rank_and_go_by_user_id(boards):
    leaderboards, score, _ = boards
    await add_users(
        leaderboards, *(User(id=u, display_name=u.title(), subjects=[]) for u in ("ann", "bob", "cat", "dan"))
    )
    for eid, user, points in [("1", "bob", 80), ("2", "ann", 80), ("3", "cat", 95), ("4", "dan", 50)]:
        await score(quiz(eid, user, points))
    view = await leaderboards.view("algebra", "daily", "dan", utcnow())
    assert view["top"] == [
        {"rank": 1, "name": "Cat", "score": 95, "user_id": "cat"},
        {"rank": 2, "name": "Ann", "score": 80, "user_id": "ann"},
        {"rank": 2, "name": "Bob", "score": 80, "user_id": "bob"},
        {"rank": 4, "name": "Dan", "score": 50, "user_id": "dan"},
    ]
    assert view["you"] == {"rank": 4, "score": 50}
    assert (await leaderboards.view("algebra", "all_time", "nobody", utcnow()))["you"] is None


async def test_minors_are_anonymous_and_opted_out_users_absent(boards):
    leaderboards, score, _ = boards
    await add_users(
        leaderboards,
        User(id="kid", display_name="Timmy", minor=True, subjects=[]),
        User(id="shy", display_name="Shy", opted_out=True, subjects=[]),
    )
    await score(quiz("k", "kid", 70))
    await score(quiz("s", "shy", 99))
    await score(quiz("u", "unknown-user", 60))
    view = await leaderboards.view("algebra", "weekly", "kid", utcnow())
    handles = [entry.pop("handle") for entry in view["top"]]
    assert view["top"] == [
        {"rank": 1, "name": "A student", "score": 70},
        {"rank": 2, "name": "A student", "score": 60},
    ]
    assert len(set(handles)) == 2 and all("kid" not in h and "unknown" not in h for h in handles)
    assert view["you"] == {"rank": 1, "score": 70}


async def test_a_user_cannot_score_more_than_the_daily_cap(boards):
    leaderboards, score, _ = boards
    for i in range(15):
        await score(quiz(f"cap{i}", "grinder", 100))
    view = await leaderboards.view("algebra", "daily", "grinder", utcnow())
    assert view["you"] == {"rank": 1, "score": 1000}


async def test_boards_are_rebuilt_from_the_database_when_the_cache_lost_them(boards):
    leaderboards, score, _ = boards
    await add_users(leaderboards, User(id="ann", display_name="Ann", subjects=[]))
    await score(quiz("r1", "ann", 40))
    await score(quiz("r2", "bob", 30))
    before = await leaderboards.view("algebra", "all_time", "bob", utcnow())
    store = leaderboards.store
    key = board_key("algebra", "all_time", utcnow())
    if isinstance(store, RedisBoards):
        await store._redis.delete(key)
    else:
        store._boards.pop(key)
    assert await leaderboards.view("algebra", "all_time", "bob", utcnow()) == before
    await score(quiz("r3", "bob", 20))  # after a rebuild, new points add on top exactly once
    assert (await leaderboards.view("algebra", "all_time", "bob", utcnow()))["you"] == {
        "rank": 1,
        "score": 50,
    }


async def test_backfilled_points_count_in_their_own_period_only(boards):
    leaderboards, score, _ = boards
    old = datetime(2025, 1, 6, 12, tzinfo=UTC)
    await score(quiz("old", "ann", 90, ts=old))
    assert (await leaderboards.view("algebra", "daily", "ann", utcnow()))["you"] is None
    assert (await leaderboards.view("algebra", "all_time", "ann", utcnow()))["you"] == {
        "rank": 1,
        "score": 90,
    }


async def set_user(leaderboards: Leaderboards, user_id: str, **values) -> None:
    async with leaderboards.database.session() as session, session.begin():
        await session.execute(update(User).where(User.id == user_id).values(**values))


def names(top: list[dict]) -> list[tuple]:
    return [(e["rank"], e["name"], e.get("user_id"), e["score"]) for e in top]


async def test_a_privacy_change_re_renders_every_board_without_scoring_again(boards):
    leaderboards, score, hub = boards
    await add_users(
        leaderboards, *(User(id=u, display_name=u.title(), subjects=[]) for u in ("ann", "bob", "cat"))
    )
    for eid, user, points, subject in [
        ("1", "ann", 90, "algebra"),
        ("2", "bob", 80, "algebra"),
        ("3", "cat", 70, "algebra"),
        ("4", "bob", 50, "geometry"),
    ]:
        await score(quiz(eid, user, points, subject))
    heard: list[str] = []
    await hub.listen(CHANGES_TOPIC, lambda raw: heard.append(orjson.loads(raw)["subject"]))
    follow = boards_follow_changes(leaderboards, hub)
    now = utcnow()

    async def told(*subjects: str) -> None:
        async with asyncio.timeout(5):
            while sorted(set(heard)) != sorted(subjects):
                await asyncio.sleep(0.01)
        heard.clear()

    # Opted out: off every board of every subject and window, nobody scored again.
    async with leaderboards.database.session() as session, session.begin():
        await opt_out_user(session, "bob", by="self", now=now)
    for _ in range(2):  # safe twice
        await follow(PrivacyChange("bob"))
        await told("algebra", "geometry")
        for window in WINDOWS:
            key, top = await leaderboards.top("algebra", window, now)
            assert names(top) == [(1, "Ann", "ann", 90), (2, "Cat", "cat", 70)]
            assert await leaderboards.you(key, "bob") is None  # purged, so nobody's rank counts them
            key, top = await leaderboards.top("geometry", window, now)
            assert top == [] and await leaderboards.you(key, "bob") is None

    # Marked a minor: the name goes at once, the points stay.
    await set_user(leaderboards, "cat", minor=True)
    await follow(PrivacyChange("cat"))
    await told("algebra")
    for window in WINDOWS:
        _, top = await leaderboards.top("algebra", window, now)
        assert names(top) == [(1, "Ann", "ann", 90), (2, "A student", None, 70)]
        assert top[1]["handle"].startswith("anon-") and "cat" not in top[1]["handle"]

    # Opted back in: their points are back on every board, without scoring again.
    await set_user(leaderboards, "bob", opted_out=False, opted_out_by=None)
    for _ in range(2):
        await follow(PrivacyChange("bob"))
        await told("algebra", "geometry")
        for window in WINDOWS:
            key, top = await leaderboards.top("algebra", window, now)
            assert names(top) == [(1, "Ann", "ann", 90), (2, "Bob", "bob", 80), (3, "A student", None, 70)]
            assert await leaderboards.you(key, "cat") == {"rank": 3, "score": 70}
            _, top = await leaderboards.top("geometry", window, now)
            assert names(top) == [(1, "Bob", "bob", 50)]

    # Deleted: the rows are gone, so the boards they were on name the subjects to re-render.
    async with leaderboards.database.session() as session, session.begin():
        await data_rights.delete_user(session, "ann", actor="ops", now=now, key="k")
    await follow(PrivacyChange("ann", deleted_at=now))
    await told("algebra")
    for window in WINDOWS:
        key, top = await leaderboards.top("algebra", window, now)
        assert names(top) == [(1, "Bob", "bob", 80), (2, "A student", None, 70)]
        assert await leaderboards.you(key, "ann") is None
    await follow(PrivacyChange("ann", deleted_at=now))  # again: nothing left, nothing breaks


async def test_a_member_hidden_since_it_was_cached_is_never_shown_and_the_top_stays_full(boards):
    leaderboards, score, _ = boards
    users = [f"u{n:02d}" for n in range(TOP_N + 4)]
    await add_users(leaderboards, *(User(id=u, display_name=u.upper(), subjects=[]) for u in users))
    for n, user in enumerate(users):
        await score(quiz(f"h{n}", user, 99 - n))
    now = utcnow()
    await leaderboards.top("algebra", "daily", now)  # cached
    for user in users[:3]:  # opted out in the store; the cache has not heard of it yet
        await set_user(leaderboards, user, opted_out=True)
    _, top = await leaderboards.top("algebra", "daily", now)
    assert [e["user_id"] for e in top] == users[3 : 3 + TOP_N]
    assert [e["rank"] for e in top] == list(range(1, TOP_N + 1))
