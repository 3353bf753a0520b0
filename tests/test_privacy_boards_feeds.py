"""Leaderboards and public feeds follow a user's privacy state at once, with no new score from them:
opted out, marked a minor, opted back in, deleted. Real servers (in-process on SQLite and PostgreSQL,
and two `serve` processes on Redis with a worker), real sockets watching the boards and feeds live."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from loop_kit import loop_world
from servers import PhxClient, RedisServer, WorkerProcess, make_token
from sqlalchemy import func, select

from metrics.events import client_event_id
from store import Consumption, Database

BOARD = "leaderboard:algebra:daily"
FEEDS = ("feed:global", "feed:subject:algebra")
SCORES = {"ann": 90, "bob": 80, "cat": 70}
WAIT = 10.0  # for a push: boards refresh once a second, and the machine may be busy


def quiz(eid: str, user: str, score: int) -> dict[str, Any]:
    # Stamped now, not with the world's clock: the daily and weekly boards are today's.
    ts = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    return {
        "id": eid,
        "type": "quiz_result",
        "user_id": user,
        "ts": ts,
        "props": {"subject": "algebra", "score": score},
    }


def top(view: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [(e["rank"], e["name"], e.get("user_id"), e["score"]) for e in view["top"]]


def texts(history: dict[str, Any]) -> list[str]:
    return [i["text"] for i in history["items"]]


async def board_push(client: PhxClient, topic: str, expected: list[tuple[Any, ...]]) -> list[Any]:
    try:
        return await client.wait_for(
            lambda f: f[2] == topic and f[3] == "leaderboard_update" and top(f[4]) == expected, WAIT
        )
    except TimeoutError:
        raise AssertionError(
            f"pushed: {[top(v) for v in client.events(topic, 'leaderboard_update')]}"
        ) from None


async def joined(client: PhxClient, topic: str) -> dict[str, Any]:
    reply = await client.join(topic)
    assert reply["status"] == "ok", reply
    return dict(reply["response"])


async def test_boards_and_public_feeds_follow_every_privacy_change_live(database_url):
    async with loop_world(database_url) as world:
        admin = world.headers("ops", "admin")
        for user in SCORES:
            await world.profile(user, display_name=user.title())
        for user, score in SCORES.items():
            response = await world.http.post(
                "/api/events", json=[quiz(f"q-{user}", user, score)], headers=admin
            )
            assert response.status_code == 202, response.text
            await world.consumed(client_event_id("ops", f"q-{user}"))
        viewer = await world.socket("vic")
        async with asyncio.timeout(10):  # the cache is written just after the consumer's commit
            while len((await joined(viewer, BOARD))["top"]) < len(SCORES):
                await asyncio.sleep(0.05)
        assert top(await joined(viewer, BOARD)) == [
            (1, "Ann", "ann", 90),
            (2, "Bob", "bob", 80),
            (3, "Cat", "cat", 70),
        ]
        offsets = {}
        for feed in FEEDS:
            history = await joined(viewer, feed)
            assert texts(history) == [f"{u.title()} scored {s}% on a Algebra quiz" for u, s in SCORES.items()]
            offsets[feed] = {i["text"].split()[0].lower(): i["offset"] for i in history["items"]}

        async def everywhere(expected: list[tuple[Any, ...]], feed_texts: list[str]) -> None:
            """What anyone joining now gets: every window of the board, every public feed's history."""
            fresh = await world.socket("newcomer")
            try:
                for window in ("daily", "weekly", "all_time"):
                    assert top(await joined(fresh, f"leaderboard:algebra:{window}")) == expected
                for feed in FEEDS:
                    assert texts(await joined(fresh, feed)) == feed_texts
                    page = (
                        await world.http.get(f"/api/feeds/{feed.removeprefix('feed:')}", headers=admin)
                    ).json()
                    assert [i["text"] for i in page["items"]] == feed_texts
            finally:
                await fresh.close()

        # Bob opts out: off every board and out of every public feed, and the viewer is told.
        response = await world.http.post("/api/users/bob/opt-out", headers=world.headers("bob"))
        assert response.status_code == 200, response.text
        gone = [(1, "Ann", "ann", 90), (2, "Cat", "cat", 70)]
        await board_push(viewer, BOARD, gone)
        for feed in FEEDS:
            await viewer.wait_for(
                lambda f, feed=feed: (
                    f[2] == feed and f[3] == "activity_removed" and f[4]["offsets"] == [offsets[feed]["bob"]]
                ),
                WAIT,
            )
        await everywhere(gone, ["Ann scored 90% on a Algebra quiz", "Cat scored 70% on a Algebra quiz"])

        # Cat is marked a minor: "A student", without id, on the board and in the feeds at once.
        response = await world.http.put("/api/users/cat", json={"minor": True}, headers=admin)
        assert response.status_code == 200, response.text
        anonymous = [(1, "Ann", "ann", 90), (2, "A student", None, 70)]
        push = await board_push(viewer, BOARD, anonymous)
        assert push[4]["top"][1]["handle"].startswith("anon-") and "cat" not in str(push[4]["top"][1])
        for feed in FEEDS:
            update = await viewer.wait_for(
                lambda f, feed=feed: f[2] == feed and f[3] == "activity_updated", WAIT
            )
            assert [(i["offset"], i["text"]) for i in update[4]["items"]] == [
                (offsets[feed]["cat"], "A student scored 70% on a Algebra quiz")
            ]
        await everywhere(
            anonymous, ["Ann scored 90% on a Algebra quiz", "A student scored 70% on a Algebra quiz"]
        )

        # Bob opts back in: his points are back on every board without scoring again.
        response = await world.http.post("/api/users/bob/opt-in", headers=world.headers("bob"))
        assert response.status_code == 200, response.text
        back = [(1, "Ann", "ann", 90), (2, "Bob", "bob", 80), (3, "A student", None, 70)]
        await board_push(viewer, BOARD, back)
        await everywhere(back, ["Ann scored 90% on a Algebra quiz", "A student scored 70% on a Algebra quiz"])

        # Ann is deleted: gone from the boards and the public feeds, live too.
        response = await world.http.delete("/api/users/ann", headers=admin)
        assert response.status_code == 200, response.text
        left = [(1, "Bob", "bob", 80), (2, "A student", None, 70)]
        await board_push(viewer, BOARD, left)
        for feed in FEEDS:
            await viewer.wait_for(
                lambda f, feed=feed: (
                    f[2] == feed and f[3] == "activity_removed" and f[4]["offsets"] == [offsets[feed]["ann"]]
                ),
                WAIT,
            )
        await everywhere(left, ["A student scored 70% on a Algebra quiz"])
        cached = world.app.state.endpoint.context.leaderboards
        for window in ("daily", "weekly", "all_time"):
            key, _ = await cached.top("algebra", window, datetime.now(UTC))
            assert await cached.you(key, "ann") is None


async def test_a_privacy_change_made_on_one_node_reaches_viewers_on_another(
    server_factory, database_url, tmp_path
):
    redis = RedisServer(tmp_path).start()
    env = {
        "BROKER_URL": redis.url,
        "DATABASE_URL": database_url,
        # Events sent before the worker has joined the stream are caught by the reconciler.
        "EVENTS_MAINTENANCE_EVERY": "0.5",
        "EVENTS_RECONCILE_AFTER": "2",
    }
    here, there = server_factory(env), server_factory(env)
    worker = WorkerProcess(tmp_path, env).start()
    database = Database(database_url)
    viewer = None
    admin = {"authorization": f"Bearer {make_token('ops', 'admin')}"}
    try:
        async with httpx.AsyncClient(base_url=here.http, headers=admin, timeout=10) as http:
            for user in SCORES:
                response = await http.put(f"/api/users/{user}", json={"display_name": user.title()})
                assert response.status_code in (200, 201), response.text
            response = await http.post("/api/events", json=[quiz(f"n-{u}", u, s) for u, s in SCORES.items()])
            assert response.status_code == 202, response.text
            async with asyncio.timeout(30):
                while await _consumed(database) < 2 * len(SCORES):  # the feed and the leaderboard
                    await asyncio.sleep(0.1)
            viewer = await PhxClient.connect(there.ws_url(make_token("vic")))
            async with asyncio.timeout(10):
                while len((await joined(viewer, BOARD))["top"]) < len(SCORES):
                    await asyncio.sleep(0.1)
            history = await joined(viewer, "feed:global")
            bob_at = next(i["offset"] for i in history["items"] if i["text"].startswith("Bob"))

            response = await http.post("/api/users/bob/opt-out")
            assert response.status_code == 200, response.text
            await board_push(viewer, BOARD, [(1, "Ann", "ann", 90), (2, "Cat", "cat", 70)])
            await viewer.wait_for(
                lambda f: (
                    f[2] == "feed:global" and f[3] == "activity_removed" and f[4]["offsets"] == [bob_at]
                ),
                WAIT,
            )
            response = await http.put("/api/users/cat", json={"minor": True})
            assert response.status_code == 200, response.text
            await board_push(viewer, BOARD, [(1, "Ann", "ann", 90), (2, "A student", None, 70)])
            update = await viewer.wait_for(
                lambda f: f[2] == "feed:global" and f[3] == "activity_updated", WAIT
            )
            assert [i["text"] for i in update[4]["items"]] == ["A student scored 70% on a Algebra quiz"]
    finally:
        if viewer is not None:
            with contextlib.suppress(Exception):
                await viewer.close()
        worker.kill()
        await database.dispose()
        redis.stop()


async def _consumed(database: Database) -> int:
    async with database.session() as session:
        return int(
            await session.scalar(
                select(func.count()).where(Consumption.consumer.in_(("feed", "leaderboard")))
            )
            or 0
        )
