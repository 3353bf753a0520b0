"""Processes killed with SIGKILL at the worst moment: a worker in the middle of a batch, a web process
with sockets on it, and the worker running a scheduled loop job. Real `viral-engine serve`/`worker`
processes, a private Redis, PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta

import asyncpg
import httpx
import pytest
from servers import PhxClient, Roster, WorkerProcess, make_token
from sqlalchemy import func, select

from store import Consumption, Database, FeedItem, LoopItem, LoopJob, utcnow

from .fault_kit import (
    CONSUMERS,
    EventPump,
    Fleet,
    FleetSocket,
    PrivateRedis,
    admin_headers,
    assert_processed_exactly_once,
    consumed_everything,
    eventually,
    read_effects,
    session_event,
)


def asyncpg_url(database_url: str) -> str:
    return database_url.replace("postgresql+asyncpg://", "postgresql://")


async def waiting_on_a_lock(conn: asyncpg.Connection) -> int:
    """Backends of this database (other than ours) blocked on a row lock."""
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        )
    )


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_worker_killed_mid_batch_leaves_its_events_to_the_next_worker(
    server_factory, database_url, tmp_path
):
    """The feed consumer's batch is held inside its transaction (its feed row is locked by the test),
    the worker is SIGKILLed there, and a new worker claims the unacknowledged entries from the stream.
    The reconciler is off (EVENTS_RECONCILE_AFTER=3600), so the stream's claim is what recovers them."""
    redis = PrivateRedis(tmp_path).start()
    env = {
        "BROKER_URL": redis.url,
        "DATABASE_URL": database_url,
        "EVENTS_MAINTENANCE_EVERY": "1",
        "EVENTS_RECONCILE_AFTER": "3600",
        "EVENTS_CLAIM_IDLE": "3",
    }
    server = server_factory(env)
    first = WorkerProcess(tmp_path, env).start()
    await eventually(lambda: _groups_ready(redis.url), 30, "the worker's consumer groups in the stream")
    second: WorkerProcess | None = None
    lock = await asyncpg.connect(asyncpg_url(database_url))
    figures: dict[str, object] = {}
    try:
        async with httpx.AsyncClient(base_url=server.http, headers=admin_headers(), timeout=30) as http:
            warm = await http.post("/api/events", json=session_event("warm", "u0", "s0"))
            assert warm.status_code == 202
            await eventually(lambda: consumed_everything(database_url, 1), 30, "the first event consumed")

            await lock.execute("BEGIN")
            await lock.execute("SELECT * FROM feeds WHERE name = 'global' FOR UPDATE")
            accepted = {"warm"}
            for batch in range(3):
                events = [session_event(f"b{batch}-{i}", f"u{i % 17}", f"s{i % 4}") for i in range(100)]
                response = await http.post("/api/events", json=events)
                assert response.status_code == 202
                accepted.update(a["id"] for a in response.json()["accepted"])
            await eventually(lambda: waiting_on_a_lock(lock), 30, "the feed consumer blocked mid-batch")
            database = Database(database_url)
            async with database.session() as session:
                feed_done = await session.scalar(select(func.count()).where(Consumption.consumer == "feed"))
            await database.dispose()
            assert feed_done == 1, "the batch must still be open when the worker dies"

            first.kill()
            killed = time.monotonic()
            await lock.execute("ROLLBACK")
            second = WorkerProcess(tmp_path, env).start()
            await eventually(
                lambda: consumed_everything(database_url, len(accepted)), 60, "every event consumed"
            )
            figures["all_consumed_after_kill_s"] = round(time.monotonic() - killed, 2)
            await asyncio.sleep(1.5)  # let a duplicate delivery show itself
        assert "claimed" in second.log_path.read_text(), "the new worker did not claim the stream entries"
        assert_processed_exactly_once(await read_effects(database_url), accepted)
    finally:
        print("FAULT-FIGURES worker-killed-mid-batch", json.dumps(figures))
        await lock.close()
        first.kill()
        if second is not None:
            second.kill()
        server.kill()
        redis.stop()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_web_process_killed_with_sockets_on_it(server_factory, database_url, tmp_path):
    """Two serve processes behind one Redis; SIGKILL one while events flow. Its clients reconnect to the
    other and recover the feed items they missed with `since`; presence drops the dead node's entries
    after PRESENCE_NODE_TIMEOUT (the default, 10 s: this measures the real convergence time)."""
    redis = PrivateRedis(tmp_path).start()
    env = {
        "BROKER_URL": redis.url,
        "DATABASE_URL": database_url,
        "EVENTS_MAINTENANCE_EVERY": "1",
        "EVENTS_RECONCILE_AFTER": "5",
    }
    victim, survivor = server_factory(env), server_factory(env)
    worker = WorkerProcess(tmp_path, env).start()
    urls = [f"ws://127.0.0.1:{s.port}/socket/websocket?vsn=2.0.0" for s in (victim, survivor)]
    topics = ["feed:global", "presence:subject:algebra"]
    sockets = [
        FleetSocket(f"u{i}", [urls[i % 2], urls[(i + 1) % 2]], [f"user:u{i}", *topics]) for i in range(100)
    ]
    fleet = await Fleet.start(sockets, reconnect=True)
    observer = await PhxClient.connect(survivor.ws_url(make_token("observer")))
    await observer.join("presence:subject:algebra")
    roster = Roster(observer, "presence:subject:algebra")
    everyone = {f"u{i}": 1 for i in range(100)} | {"observer": 1}
    pump = EventPump(
        [survivor.http],
        lambda n: [session_event(f"ev{n}-{j}", f"u{(n + j) % 100}", "algebra") for j in range(4)],
    )
    figures: dict[str, object] = {}
    try:
        await roster.until(everyone, timeout=30)
        pump.start()
        await asyncio.sleep(2)
        on_victim = [s for s in sockets if s.urls[s.server] == urls[0]]
        victim.kill()
        killed = time.monotonic()
        figures["all_sockets_reconnected_s"] = round(
            await eventually(
                lambda: all(s.rejoined == 1 for s in on_victim),
                60,
                "every client of the dead process rejoined",
            ),
            2,
        )
        # The dead node's metas linger until its peers declare it dead; then each user has one again.
        await roster.until(everyone, timeout=60)
        figures["presence_converged_after_kill_s"] = round(time.monotonic() - killed, 2)
        await asyncio.sleep(2)
        log = await pump.stop()
        assert log.other == [] and log.failed == 0, log
        await eventually(
            lambda: consumed_everything(database_url, len(log.accepted)), 60, "every event consumed"
        )
        # Each client ends with every item since its first join: live, or recovered with `since`.
        database = Database(database_url)
        async with database.session() as session:
            stored = set(
                (await session.execute(select(FeedItem.offset).where(FeedItem.feed == "global"))).scalars()
            )
        await database.dispose()
        await asyncio.gather(*(s.join("feed:global") for s in sockets))
        for sock in sockets:
            assert sock.recovered["feed:global"] is True
            assert set(sock.items["feed:global"]) == {o for o in stored if o > sock.joined_at["feed:global"]}
        figures["clients_moved"] = len(on_victim)
        figures["events_accepted"] = len(log.accepted)
        assert {s.reconnects for s in on_victim} == {1}
        assert all(s.reconnects == 0 for s in sockets if s not in on_victim)
        assert_processed_exactly_once(await read_effects(database_url), log.accepted)
    finally:
        print("FAULT-FIGURES web-process-killed", json.dumps(figures))
        await observer.close()
        await fleet.stop()
        worker.kill()
        survivor.kill()
        redis.stop()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_the_worker_running_a_loop_job_killed_another_takes_over_and_no_job_runs_twice(
    server_factory, database_url, tmp_path
):
    """Two workers serve 30 due challenge expiries. The one that claims the victim's job blocks inside
    it (its loop item is locked by the test), keeps its lease while alive, and is SIGKILLed; the other
    takes the job over when the lease runs out. Every job commits once and pushes once."""
    redis = PrivateRedis(tmp_path).start()
    env = {
        "BROKER_URL": redis.url,
        "DATABASE_URL": database_url,
        "SCHEDULER_POLL": "0.2",
        "SCHEDULER_LEASE": "2",
        "EVENTS_MAINTENANCE_EVERY": "3600",
    }
    server = server_factory(env)
    admin = await PhxClient.connect(server.ws_url(make_token("ops", "admin")))
    database = Database(database_url)
    items = [f"ch{i:02}" for i in range(30)]
    now = utcnow()
    async with database.session() as session, session.begin():
        for item in items:
            session.add(
                LoopItem(
                    id=item,
                    loop="buddy_challenge",
                    owner_id=f"p-{item}",
                    other_id=f"q-{item}",
                    subject="algebra",
                    state="pending",
                    data={},
                    created_at=now - timedelta(hours=48),
                    updated_at=now - timedelta(hours=48),
                    expires_at=now,
                )
            )
            session.add(
                LoopJob(
                    kind="challenge_expire",
                    key=f"challenge_expire:{item}",
                    run_at=now,
                    payload={"id": item},
                    status="pending",
                    attempts=0,
                    created_at=now,
                )
            )
    for item in items:
        assert (await admin.join(f"user:p-{item}"))["status"] == "ok"
    lock = await asyncpg.connect(asyncpg_url(database_url))
    await lock.execute("BEGIN")
    await lock.execute("SELECT * FROM loop_items WHERE id = 'ch00' FOR UPDATE")
    workers = [WorkerProcess(tmp_path, env).start(), WorkerProcess(tmp_path, env).start()]
    figures: dict[str, object] = {}

    async def victim_job() -> LoopJob:
        async with database.session() as session:
            return (
                await session.execute(select(LoopJob).where(LoopJob.key == "challenge_expire:ch00"))
            ).scalar_one()

    async def done_jobs() -> int:
        async with database.session() as session:
            return int(
                await session.scalar(
                    select(func.count()).where(LoopJob.kind == "challenge_expire", LoopJob.status == "done")
                )
            )

    try:
        await eventually(lambda: _leased(victim_job), 30, "a worker claimed the victim's job")
        await eventually(lambda: _equals(done_jobs, 29), 30, "the other 29 jobs done by the other worker")
        holder = (await victim_job()).lease_owner
        await asyncio.sleep(4)  # twice the lease: the live holder keeps renewing it
        job = await victim_job()
        assert (job.status, job.lease_owner, job.attempts) == ("pending", holder, 1)
        pid = int(holder.split(":")[1])
        (dying,) = [w for w in workers if w.proc.pid == pid]
        dying.kill()
        killed = time.monotonic()
        await lock.execute("ROLLBACK")
        await eventually(lambda: _equals(done_jobs, 30), 30, "the victim's job taken over")
        figures["job_taken_over_after_kill_s"] = round(time.monotonic() - killed, 2)
        job = await victim_job()
        assert job.lease_owner != holder and job.attempts == 2
        async with database.session() as session:
            states = dict((await session.execute(select(LoopItem.id, LoopItem.state))).all())
        assert states == dict.fromkeys(items, "expired")
        await eventually(
            lambda: len(_pushed(admin, "challenge_update")) >= 30, 15, "a challenge_update per job"
        )
        await asyncio.sleep(1.5)  # a second run would push again
        pushed = sorted(p["challenge_id"] for p in _pushed(admin, "challenge_update"))
        assert pushed == items, "a job's push went out twice or not at all"
    finally:
        print("FAULT-FIGURES scheduler-worker-killed", json.dumps(figures))
        await lock.close()
        await admin.close()
        for worker in workers:
            worker.kill()
        await database.dispose()
        server.kill()
        redis.stop()


async def _leased(job) -> bool:
    return (await job()).lease_owner is not None


async def _equals(count, expected: int) -> bool:
    return await count() == expected


def _pushed(client: PhxClient, event: str) -> list[dict]:
    return [f[4] for f in client.frames if f[3] == event]


async def _groups_ready(url: str) -> bool:
    """The worker made its consumer groups (events appended before that are the reconciler's)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        groups = await client.xinfo_groups("events:stream")
    except Exception:
        return False
    finally:
        await client.aclose()
    return len(groups) == len(CONSUMERS)
