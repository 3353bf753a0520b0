"""Events and feeds end to end: HTTP and socket ingest, live feeds, recovery, and at-least-once delivery
through a worker killed mid-stream and a Redis restarted mid-stream (real PostgreSQL, real Redis)."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest
from servers import PhxClient, RedisServer, WorkerProcess, make_token
from sqlalchemy import func, select

from store import Consumption, Database, Event, FeedItem, ScoreEntry

CONSUMERS = ("feed", "leaderboard", "attribution", "experiments", "loops")


def headers(sub: str, role: str = "student", **claims) -> dict[str, str]:
    return {"authorization": f"Bearer {make_token(sub, role, **claims)}"}


def session_event(eid: str, user: str, subject: str = "algebra") -> dict:
    return {
        "id": eid,
        "type": "session_completed",
        "user_id": user,
        "props": {"subject": subject, "minutes": 25},
    }


async def test_http_ingest_answers_per_event_and_refuses_bad_batches_whole(server_factory):
    server = server_factory()
    async with httpx.AsyncClient(base_url=server.http) as http:
        assert (await http.post("/api/events", json=session_event("a", "maya"))).status_code == 401
        ok = await http.post(
            "/api/events",
            json=[session_event("a", "maya"), session_event("a", "maya")],
            headers=headers("maya"),
        )
        assert ok.status_code == 202
        assert ok.json() == {"accepted": [{"id": "a", "duplicate": False}, {"id": "a", "duplicate": False}]}
        again = await http.post("/api/events", json=session_event("a", "maya"), headers=headers("maya"))
        assert again.json() == {"accepted": [{"id": "a", "duplicate": True}]}
        bad = await http.post(
            "/api/events",
            json=[session_event("b", "maya"), {"type": "nope", "user_id": "maya"}],
            headers=headers("maya"),
        )
        assert bad.status_code == 422
        assert bad.json()["events"] == [
            {"index": 1, "fields": {"type": bad.json()["events"][0]["fields"]["type"]}}
        ]
        other = await http.post("/api/events", json=session_event("c", "sam"), headers=headers("maya"))
        assert other.status_code == 422 and "own user id" in other.text
        backfill = {**session_event("d", "sam"), "ts": "2026-01-01T00:00:00Z"}
        assert (
            await http.post("/api/events", json=backfill, headers=headers("ops", "admin"))
        ).status_code == 202
        too_many = await http.post(
            "/api/events", json=[session_event(f"x{i}", "maya") for i in range(1001)], headers=headers("maya")
        )
        assert too_many.status_code == 413


async def test_track_on_the_socket_feeds_the_live_feeds(server_factory):
    server = server_factory()
    admin = headers("ops", "admin")
    async with httpx.AsyncClient() as http:
        put = await http.put(f"{server.http}/api/users/maya", json={"display_name": "Maya"}, headers=admin)
        put.raise_for_status()
    watcher = await PhxClient.connect(server.ws_url(make_token("watcher")))
    maya = await PhxClient.connect(server.ws_url(make_token("maya")))
    try:
        joined = await watcher.join("feed:subject:algebra")
        assert joined["status"] == "ok" and joined["response"]["items"] == []
        await maya.join("user:maya")
        reply = await maya.request("user:maya", "track", session_event("t1", "maya"))
        assert reply == {"status": "ok", "response": {"id": "t1", "duplicate": False}}
        push = await watcher.wait_for(lambda f: f[3] == "new_activity")
        assert push[4]["text"] == "Maya finished a 25-minute Algebra session" and push[4]["offset"] == 1
        bad = await maya.request(
            "user:maya", "track", {"type": "quiz_result", "user_id": "maya", "props": {}}
        )
        assert bad["status"] == "error" and "props.subject" in bad["response"]["fields"]
    finally:
        await watcher.close()
        await maya.close()


async def test_a_reconnecting_client_gets_exactly_what_it_missed(server_factory):
    server = server_factory()
    client = await PhxClient.connect(server.ws_url(make_token("reader")))
    admin = headers("ops", "admin")
    async with httpx.AsyncClient(base_url=server.http, headers=admin) as http:
        await http.post("/api/events", json=[session_event(f"p{i}", "maya") for i in range(3)])
        async with asyncio.timeout(10):
            while (await http.get("/api/feeds/global")).json()["items"].__len__() < 3:
                await asyncio.sleep(0.05)
        first = await client.join("feed:global")
        offset, epoch = first["response"]["offset"], first["response"]["epoch"]
        assert offset == 3
        await client.close()  # offline while three more happen
        await http.post("/api/events", json=[session_event(f"q{i}", "maya") for i in range(3)])
        async with asyncio.timeout(10):
            while (await http.get("/api/feeds/global")).json()["items"].__len__() < 6:
                await asyncio.sleep(0.05)
        back = await PhxClient.connect(server.ws_url(make_token("reader")))
        resumed = await back.join("feed:global", {"since": offset, "epoch": epoch})
        assert resumed["response"]["recovered"] is True
        assert [i["offset"] for i in resumed["response"]["items"]] == [4, 5, 6]
        stale = await back.join("feed:global", {"since": offset, "epoch": "another-epoch"})
        assert stale["response"]["recovered"] is False and len(stale["response"]["items"]) == 6
        page = (await http.get("/api/feeds/global", params={"limit": 4})).json()
        assert [i["offset"] for i in page["items"]] == [3, 4, 5, 6] and page["next_before"] == 3
        older = (await http.get("/api/feeds/global", params={"limit": 4, "before": 3})).json()
        assert [i["offset"] for i in older["items"]] == [1, 2] and older["next_before"] is None
        await back.close()


async def test_user_feeds_are_private_and_cheers_are_counted_once(server_factory):
    server = server_factory()
    async with httpx.AsyncClient(base_url=server.http) as http:
        assert (await http.get("/api/feeds/user:maya", headers=headers("sam"))).status_code == 403
        await http.post("/api/events", json=session_event("c1", "maya"), headers=headers("maya"))
    sam = await PhxClient.connect(server.ws_url(make_token("sam")))
    try:
        assert (await sam.join("feed:user:maya"))["response"] == {"reason": "unauthorized"}
        joined = await sam.join("feed:global")
        async with asyncio.timeout(10):
            while not joined["response"]["items"]:
                await asyncio.sleep(0.1)
                joined = await sam.join("feed:global")
        first = await sam.request("feed:global", "react", {"offset": 1, "kind": "cheer"})
        assert first["response"] == {"offset": 1, "kind": "cheer", "count": 1, "added": True}
        again = await sam.request("feed:global", "react", {"offset": 1, "kind": "cheer"})
        assert again["response"]["count"] == 1 and again["response"]["added"] is False
        await sam.wait_for(
            lambda f: f[3] == "reaction" and f[4] == {"offset": 1, "kind": "cheer", "count": 1}
        )
        missing = await sam.request("feed:global", "react", {"offset": 99})
        assert missing["status"] == "error"
    finally:
        await sam.close()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_every_event_is_processed_once_through_a_killed_worker_and_a_restarted_redis(
    server_factory, database_url, tmp_path
):
    redis = RedisServer(tmp_path).start()
    env = {
        "BROKER_URL": redis.url,
        "DATABASE_URL": database_url,
        "EVENTS_MAINTENANCE_EVERY": "0.5",
        "EVENTS_RECONCILE_AFTER": "2",
    }
    server = server_factory(env)
    workers = [WorkerProcess(tmp_path, env).start()]
    database = Database(database_url)
    total = 300
    try:
        async with httpx.AsyncClient(
            base_url=server.http, headers=headers("ops", "admin"), timeout=10
        ) as http:
            for batch in range(total // 20):
                events = [session_event(f"ev{batch * 20 + i}", f"u{i % 10}", f"s{i % 3}") for i in range(20)]
                response = await http.post("/api/events", json=events)
                assert response.status_code == 202, response.text
                if batch == 5:  # a third of the way: the worker dies without a word
                    workers[-1].kill()
                    workers.append(WorkerProcess(tmp_path, env).start())
                if batch == 10:  # two thirds: Redis restarts empty (no persistence)
                    redis.stop()
                    await asyncio.sleep(0.5)
                    redis.start()
                await asyncio.sleep(0.05)
        async with asyncio.timeout(60):
            while True:
                async with database.session() as session:
                    done = await session.scalar(select(func.count()).select_from(Consumption))
                if done >= len(CONSUMERS) * total:
                    break
                await asyncio.sleep(0.25)
        await asyncio.sleep(1.5)  # let any duplicate delivery show itself
        async with database.session() as session:
            assert await session.scalar(select(func.count()).select_from(Event)) == total
            statuses = dict(
                (
                    await session.execute(
                        select(Consumption.status, func.count()).group_by(Consumption.status)
                    )
                ).all()
            )
            assert statuses == {"done": len(CONSUMERS) * total}
            per_consumer = dict(
                (
                    await session.execute(
                        select(Consumption.consumer, func.count()).group_by(Consumption.consumer)
                    )
                ).all()
            )
            assert per_consumer == dict.fromkeys(CONSUMERS, total)
            assert await session.scalar(select(func.count()).select_from(ScoreEntry)) == total
            assert await session.scalar(select(func.count()).select_from(FeedItem)) == 3 * total
            per_event = (
                await session.execute(select(FeedItem.event_id, func.count()).group_by(FeedItem.event_id))
            ).all()
            assert all(n == 3 for _, n in per_event) and len(per_event) == total
    finally:
        for worker in workers:
            worker.kill()
        redis.stop()
        await database.dispose()
        with contextlib.suppress(Exception):
            server.kill()


async def test_leaderboard_join_then_throttled_updates_only_on_change(server_factory):
    server = server_factory()
    admin = headers("ops", "admin")
    async with httpx.AsyncClient(base_url=server.http, headers=admin) as http:
        for user in ("ann", "bob"):
            await http.put(f"/api/users/{user}", json={"display_name": user.title()})
        viewer = await PhxClient.connect(server.ws_url(make_token("bob")))
        try:
            joined = await viewer.join("leaderboard:algebra:daily")
            assert joined["status"] == "ok"
            assert joined["response"]["top"] == [] and joined["response"]["you"] is None
            bad = await viewer.join("leaderboard:algebra:hourly")
            assert bad["status"] == "error" and "window" in bad["response"]["reason"]
            quiz = lambda eid, user, score: {  # noqa: E731
                "id": eid,
                "type": "quiz_result",
                "user_id": user,
                "props": {"subject": "algebra", "score": score},
            }
            await http.post(
                "/api/events", json=[quiz(f"a{i}", "ann", 10) for i in range(5)] + [quiz("b0", "bob", 30)]
            )
            update = await viewer.wait_for(
                lambda f: (
                    f[3] == "leaderboard_update"
                    and f[4]["you"] == {"rank": 2, "score": 30}
                    and f[4]["top"][0]["score"] == 50
                ),
                timeout=10,
            )
            assert update[4]["top"] == [
                {"rank": 1, "name": "Ann", "score": 50, "user_id": "ann"},
                {"rank": 2, "name": "Bob", "score": 30, "user_id": "bob"},
            ]
            updates = len(viewer.events("leaderboard:algebra:daily", "leaderboard_update"))
            assert updates <= 3  # six events, pushed at most once a second
            # Fill the top 10: a change below it is no news to a viewer whose standing did not move.
            await http.post("/api/events", json=[quiz(f"t{i}", f"top{i}", 60 + i) for i in range(10)])
            await viewer.wait_for(
                lambda f: f[3] == "leaderboard_update" and len(f[4]["top"]) == 10, timeout=10
            )
            await asyncio.sleep(1.5)
            before = len(viewer.events("leaderboard:algebra:daily", "leaderboard_update"))
            await http.post("/api/events", json=quiz("low", "eleventh", 1))
            await asyncio.sleep(2.5)
            assert len(viewer.events("leaderboard:algebra:daily", "leaderboard_update")) == before
        finally:
            await viewer.close()
