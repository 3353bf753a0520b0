"""The durable scheduler: replay with a hand-moved clock, idempotent scheduling, cancel, effects that
commit only with the job's lease, retries, and two workers (and a SIGKILLed process) on one database."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from loops.clock import ManualClock
from loops.scheduler import Scheduler, cancel, schedule
from store import Consumption, Database, LoopJob

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
WITNESS = "scheduler-test"
ROOT = Path(__file__).resolve().parents[1]

AfterCommit = Callable[[], Awaitable[None]]


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    yield database
    await database.dispose()


async def add(db: Database, key: str, run_at: datetime, kind: str = "work", **payload: Any) -> bool:
    async with db.session() as session, session.begin():
        return await schedule(session, kind, run_at, payload, key)


async def jobs(db: Database) -> dict[str, LoopJob]:
    async with db.session() as session:
        return {j.key: j for j in (await session.execute(select(LoopJob))).scalars()}


async def witness(session: AsyncSession, key: str) -> None:
    """The effect whose primary key proves exactly-once: a second commit for `key` would fail."""
    await session.execute(insert(Consumption).values(consumer=WITNESS, event_id=key, status="done"))


async def witnessed(db: Database) -> list[str]:
    async with db.session() as session:
        rows = await session.execute(select(Consumption.event_id).where(Consumption.consumer == WITNESS))
        return sorted(rows.scalars())


async def test_manual_clock_replays_jobs_in_time_order(db: Database) -> None:
    clock = ManualClock(T0)
    scheduler = Scheduler(db, clock)
    order: list[str] = []

    async def handler(session: AsyncSession, job: LoopJob) -> None:
        order.append(f"{job.key}@{clock.now() - T0}:{job.payload['n']}")

    scheduler.register("work", handler)
    assert await add(db, "later", T0 + timedelta(hours=2), n=2)
    assert await add(db, "sooner", T0 + timedelta(hours=1), n=1)
    assert await add(db, "later-too", T0 + timedelta(hours=2), n=3)

    assert await scheduler.run_due() == 0
    clock.advance(timedelta(minutes=59, seconds=59))
    assert await scheduler.run_due() == 0
    clock.advance(timedelta(seconds=1))
    assert await scheduler.run_due() == 1
    assert order == ["sooner@1:00:00:1"]
    clock.advance(timedelta(hours=1))
    assert await scheduler.run_due() == 2
    assert order[1:] == ["later@2:00:00:2", "later-too@2:00:00:3"]  # same run_at: scheduling order

    # Several overdue jobs at once still run in run_at order; done jobs never run again.
    await add(db, "d", T0 + timedelta(hours=4), n=4)
    await add(db, "c", T0 + timedelta(hours=3), n=5)
    clock.advance(timedelta(days=1))
    assert await scheduler.run_due() == 2
    assert [o.split("@")[0] for o in order[3:]] == ["c", "d"]
    assert await scheduler.run_due() == 0

    stored = await jobs(db)
    assert {j.status for j in stored.values()} == {"done"}
    assert stored["sooner"].finished_at == T0 + timedelta(hours=1)
    assert stored["sooner"].attempts == 1 and stored["sooner"].lease_owner == scheduler.owner
    assert scheduler.stats.ran == 5 and scheduler.stats.claimed == 5


async def test_schedule_is_idempotent_by_key_and_part_of_the_callers_transaction(db: Database) -> None:
    assert await add(db, "k1", T0, n=1)
    assert not await add(db, "k1", T0 + timedelta(days=1), kind="other", n=2)
    job = (await jobs(db))["k1"]
    assert (job.kind, job.run_at, job.payload, job.status) == ("work", T0, {"n": 1}, "pending")

    with pytest.raises(RuntimeError):
        async with db.session() as session, session.begin():
            assert await schedule(session, "work", T0, {}, "rolled-back")
            raise RuntimeError("the caller's transaction fails")
    assert set(await jobs(db)) == {"k1"}

    async with db.session() as session:
        with pytest.raises(ValueError, match="aware"):
            await schedule(session, "work", datetime(2026, 1, 1), {}, "naive")
        with pytest.raises(ValueError):
            await schedule(session, "work", T0, {}, "x" * 161)


async def test_cancel_stops_a_pending_job_and_a_cancelled_key_can_be_scheduled_again(db: Database) -> None:
    clock = ManualClock(T0)
    scheduler = Scheduler(db, clock)
    ran: list[str] = []

    async def handler(session: AsyncSession, job: LoopJob) -> None:
        ran.append(job.key)

    scheduler.register("work", handler)
    await add(db, "keep", T0 + timedelta(minutes=5))
    await add(db, "drop", T0 + timedelta(minutes=5))
    async with db.session() as session, session.begin():
        assert await cancel(session, "drop")
        assert not await cancel(session, "drop")
        assert not await cancel(session, "unknown")
    clock.advance(timedelta(minutes=5))
    assert await scheduler.run_due() == 1
    assert ran == ["keep"]
    stored = await jobs(db)
    assert stored["drop"].status == "cancelled" and stored["drop"].finished_at is not None
    async with db.session() as session, session.begin():
        assert not await cancel(session, "keep")  # done is final

    assert await add(db, "drop", T0 + timedelta(minutes=10), n=2)  # revived, with the new time and payload
    assert not await add(db, "drop", T0 + timedelta(minutes=20))
    clock.advance(timedelta(minutes=5))
    assert await scheduler.run_due() == 1
    revived = (await jobs(db))["drop"]
    assert ran == ["keep", "drop"]
    assert (revived.status, revived.payload, revived.attempts) == ("done", {"n": 2}, 1)


async def test_cancelling_a_job_while_it_runs_rolls_its_run_back(db: Database) -> None:
    clock = ManualClock(T0)
    scheduler = Scheduler(db, clock)
    entered, gate = asyncio.Event(), asyncio.Event()

    async def handler(session: AsyncSession, job: LoopJob) -> None:
        entered.set()
        await gate.wait()
        await witness(session, job.key)

    scheduler.register("work", handler)
    await add(db, "job", T0)
    running = asyncio.create_task(scheduler.run_due())
    await asyncio.wait_for(entered.wait(), 5)
    async with db.session() as session, session.begin():
        assert await cancel(session, "job")
    gate.set()
    assert await running == 0
    assert await witnessed(db) == []
    assert (await jobs(db))["job"].status == "cancelled"
    assert scheduler.stats.lost_lease == 1


@pytest.mark.parametrize("owner_b", ["worker-b", "worker-a"])  # the same name: a restarted worker
async def test_handler_effects_roll_back_when_the_lease_was_taken_over(db: Database, owner_b: str) -> None:
    """A's lease runs out while its handler is still busy; B claims and runs the job. A's handler then
    writes its effect, but A's done-mark matches no row (B's claim changed the attempt count, and the
    owner when B is named otherwise), so A's write and after-commit step vanish."""
    clock = ManualClock(T0)
    a = Scheduler(db, clock, owner="worker-a", lease=timedelta(seconds=60))
    b = Scheduler(db, clock, owner=owner_b, lease=timedelta(seconds=60))
    entered, gate = asyncio.Event(), asyncio.Event()
    after: list[str] = []

    def handler_for(name: str, wait: bool) -> Any:
        async def handler(session: AsyncSession, job: LoopJob) -> AfterCommit:
            if wait:
                entered.set()
                await gate.wait()  # no write yet: on SQLite a write would lock B out
            await witness(session, f"{job.key}:{name}")

            async def pushed() -> None:
                after.append(name)

            return pushed

        return handler

    a.register("work", handler_for("a", wait=True))
    b.register("work", handler_for("b", wait=False))
    await add(db, "job", T0)

    task_a = asyncio.create_task(a.run_due())
    await asyncio.wait_for(entered.wait(), 5)
    assert await b.run_due() == 0  # A's lease still holds
    clock.advance(timedelta(seconds=61))
    assert await b.run_due() == 1
    gate.set()
    assert await asyncio.wait_for(task_a, 5) == 0

    assert await witnessed(db) == ["job:b"]
    assert after == ["b"]
    assert (a.stats.lost_lease, a.stats.ran, b.stats.ran) == (1, 0, 1)
    job = (await jobs(db))["job"]
    assert (job.status, job.lease_owner, job.attempts) == ("done", owner_b, 2)


async def test_after_commit_step_runs_only_after_the_commit(db: Database) -> None:
    clock = ManualClock(T0)
    scheduler = Scheduler(db, clock)
    seen: list[tuple[str, list[str]]] = []

    async def handler(session: AsyncSession, job: LoopJob) -> AfterCommit:
        await witness(session, job.key)

        async def after() -> None:  # looks from another connection: the commit is visible
            seen.append(((await jobs(db))[job.key].status, await witnessed(db)))
            if job.key == "second":
                raise RuntimeError("a push failed")

        return after

    scheduler.register("work", handler)
    await add(db, "first", T0)
    await add(db, "second", T0)
    assert await scheduler.run_due() == 2  # a failing after-commit step does not undo the job
    assert seen == [("done", ["first"]), ("done", ["first", "second"])]
    assert {j.status for j in (await jobs(db)).values()} == {"done"}


async def test_failures_retry_with_backoff_then_the_job_is_failed(db: Database) -> None:
    clock = ManualClock(T0)
    scheduler = Scheduler(db, clock, max_attempts=3, retry_backoff=timedelta(seconds=10))
    calls: list[timedelta] = []

    async def handler(session: AsyncSession, job: LoopJob) -> None:
        calls.append(clock.now() - T0)
        await witness(session, f"{job.key}:{len(calls)}")  # rolled back with the failure
        raise ValueError(f"boom {len(calls)}")

    scheduler.register("work", handler)
    await add(db, "flaky", T0)
    await add(db, "orphan", T0, kind="nobody-handles-this")

    assert await scheduler.run_due() == 0
    job = (await jobs(db))["flaky"]
    assert (job.status, job.attempts, job.run_at, job.lease_until) == (
        "pending",
        1,
        T0 + timedelta(seconds=10),
        None,
    )
    assert job.last_error == "ValueError: boom 1"
    assert await scheduler.run_due() == 0 and len(calls) == 1  # not due before the backoff
    clock.advance(timedelta(seconds=10))
    assert await scheduler.run_due() == 0
    assert (await jobs(db))["flaky"].run_at == clock.now() + timedelta(seconds=20)  # doubled
    clock.advance(timedelta(seconds=19))
    await scheduler.run_due()
    assert len(calls) == 2
    clock.advance(timedelta(seconds=1))
    await scheduler.run_due()
    clock.advance(timedelta(days=1))
    assert await scheduler.run_due() == 0

    assert calls == [timedelta(0), timedelta(seconds=10), timedelta(seconds=30)]
    stored = await jobs(db)
    assert (stored["flaky"].status, stored["flaky"].attempts) == ("failed", 3)
    assert stored["flaky"].last_error == "ValueError: boom 3"
    assert stored["flaky"].finished_at == T0 + timedelta(seconds=30)
    assert stored["orphan"].status == "failed"
    assert "no handler registered for job kind 'nobody-handles-this'" in (stored["orphan"].last_error or "")
    assert await witnessed(db) == []
    assert (scheduler.stats.retried, scheduler.stats.failed, scheduler.stats.ran) == (4, 2, 0)


async def test_a_handler_over_its_timeout_fails_and_a_job_that_keeps_losing_workers_is_failed(
    db: Database,
) -> None:
    clock = ManualClock(T0)
    scheduler = Scheduler(db, clock, max_attempts=2, timeout=timedelta(seconds=0.2))
    calls: list[str] = []

    async def handler(session: AsyncSession, job: LoopJob) -> None:
        calls.append(job.key)
        await asyncio.sleep(30)

    scheduler.register("work", handler)
    await add(db, "slow", T0)
    await add(db, "poison", T0)
    async with db.session() as session, session.begin():  # as if two workers died running it
        await session.execute(update(LoopJob).where(LoopJob.key == "poison").values(attempts=2))

    assert await scheduler.run_due() == 0
    stored = await jobs(db)
    assert calls == ["slow"]
    assert "handler ran longer than 0:00:00.200000" in (stored["slow"].last_error or "")
    assert stored["slow"].status == "pending" and stored["slow"].attempts == 1
    assert (stored["poison"].status, stored["poison"].attempts) == ("failed", 3)
    assert "claimed 3 times without a result" in (stored["poison"].last_error or "")


async def test_two_workers_run_every_job_exactly_once(database_url: str) -> None:
    """Two schedulers with their own connection pools race over 200 due jobs."""
    databases = [Database(database_url), Database(database_url)]
    clock = ManualClock(T0)
    workers = [Scheduler(d, clock, owner=f"worker-{i}") for i, d in enumerate(databases)]
    invoked = [0, 0]
    committed = [0, 0]
    try:
        for i, worker in enumerate(workers):

            def handler_for(i: int) -> Any:
                async def handler(session: AsyncSession, job: LoopJob) -> AfterCommit:
                    invoked[i] += 1
                    await asyncio.sleep(0.001 * (job.payload["n"] % 3))
                    await witness(session, job.key)

                    async def after() -> None:
                        committed[i] += 1

                    return after

                return handler

            worker.register("work", handler_for(i))
        async with databases[0].session() as session, session.begin():
            for n in range(200):
                await schedule(session, "work", T0 - timedelta(seconds=n % 7), {"n": n}, f"job-{n:03}")

        ran = await asyncio.gather(*(w.run_due() for w in workers))

        assert sum(ran) == 200 and all(ran), ran
        assert invoked == committed and sum(committed) == 200
        assert await witnessed(databases[0]) == [f"job-{n:03}" for n in range(200)]
        stored = await jobs(databases[0])
        assert {(j.status, j.attempts) for j in stored.values()} == {("done", 1)}
        for w in workers:
            assert (w.stats.lost_lease, w.stats.retried, w.stats.failed) == (0, 0, 0)
    finally:
        for d in databases:
            await d.dispose()


async def test_a_worker_that_dies_mid_job_is_taken_over_after_its_lease(db: Database) -> None:
    clock = ManualClock(T0)
    a = Scheduler(db, clock, owner="dies", lease=timedelta(seconds=30))
    b = Scheduler(db, clock, owner="survives", lease=timedelta(seconds=30))
    entered = asyncio.Event()

    async def hang(session: AsyncSession, job: LoopJob) -> None:
        entered.set()
        await asyncio.Event().wait()

    async def finish(session: AsyncSession, job: LoopJob) -> None:
        await witness(session, job.key)

    a.register("work", hang)
    b.register("work", finish)
    await add(db, "job", T0)

    dying = asyncio.create_task(a.run_due())
    await asyncio.wait_for(entered.wait(), 5)
    dying.cancel()  # the worker dies holding the lease
    with pytest.raises(asyncio.CancelledError):
        await dying
    clock.advance(timedelta(seconds=29))
    assert await b.run_due() == 0
    clock.advance(timedelta(seconds=2))
    assert await b.run_due() == 1
    assert await b.run_due() == 0
    assert await witnessed(db) == ["job"]
    job = (await jobs(db))["job"]
    assert (job.status, job.lease_owner, job.attempts) == ("done", "survives", 2)


async def test_a_running_job_keeps_its_lease_by_renewing_it(db: Database) -> None:
    """Real time: a 0.3 s lease, a 1 s handler; the other worker never gets the job."""
    a = Scheduler(db, owner="long", lease=timedelta(seconds=0.3))
    b = Scheduler(db, owner="other", lease=timedelta(seconds=0.3))
    started = asyncio.Event()

    async def long(session: AsyncSession, job: LoopJob) -> None:
        started.set()
        await asyncio.sleep(1.0)
        await witness(session, job.key)

    a.register("work", long)
    b.register("work", long)
    await add(db, "job", datetime.now(UTC))
    running = asyncio.create_task(a.run_due())
    await asyncio.wait_for(started.wait(), 5)
    while not running.done():
        assert await b.run_due() == 0
        await asyncio.sleep(0.05)
    assert await running == 1
    assert a.stats.renewed >= 2 and b.stats.claimed == 0
    job = (await jobs(db))["job"]
    assert (job.status, job.attempts) == ("done", 1)


async def test_background_loop_runs_due_jobs_and_stop_waits_for_the_current_one(db: Database) -> None:
    scheduler = Scheduler(db, poll=0.05)
    started = asyncio.Event()

    async def slow(session: AsyncSession, job: LoopJob) -> None:
        started.set()
        await asyncio.sleep(0.3)
        await witness(session, job.key)

    scheduler.register("work", slow)
    await add(db, "first", datetime.now(UTC))
    await scheduler.start()
    await asyncio.wait_for(started.wait(), 5)
    await scheduler.stop()
    assert (await jobs(db))["first"].status == "done"

    await add(db, "second", datetime.now(UTC))
    await asyncio.sleep(0.15)
    assert (await jobs(db))["second"].status == "pending"  # stopped
    assert await scheduler.run_due() == 1  # and still usable directly
    assert await witnessed(db) == ["first", "second"]


CHILD = """
import asyncio, sys
from datetime import timedelta
from sqlalchemy import insert
from loops.scheduler import Scheduler
from store import Consumption, Database

async def main(url):
    db = Database(url)
    scheduler = Scheduler(db, owner="child", lease=timedelta(seconds=0.5))

    async def handler(session, job):
        if db.dialect == "postgresql":  # an uncommitted effect (on SQLite it would lock the parent out)
            row = {"consumer": sys.argv[2], "event_id": "child", "status": "done"}
            await session.execute(insert(Consumption).values(**row))
        print("started", flush=True)
        await asyncio.sleep(60)

    scheduler.register("work", handler)
    await scheduler.run_due()

asyncio.run(main(sys.argv[1]))
"""


async def test_a_sigkilled_worker_process_loses_its_job_to_another_worker(
    db: Database, database_url: str
) -> None:
    survivor = Scheduler(db, owner="parent", lease=timedelta(seconds=0.5))

    async def finish(session: AsyncSession, job: LoopJob) -> None:
        await witness(session, "parent")

    survivor.register("work", finish)
    await add(db, "job", datetime.now(UTC))
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, database_url, WITNESS, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        assert await asyncio.wait_for(child.stdout.readline(), 30) == b"started\n"
        await asyncio.sleep(1.0)  # twice the lease: the live child keeps renewing it
        assert await survivor.run_due() == 0
    finally:
        child.kill()
        await child.wait()
    deadline = asyncio.get_running_loop().time() + 5
    while await survivor.run_due() == 0:
        assert asyncio.get_running_loop().time() < deadline, "the dead child's lease never expired"
        await asyncio.sleep(0.1)
    assert await witnessed(db) == ["parent"]
    job = (await jobs(db))["job"]
    assert (job.status, job.lease_owner, job.attempts) == ("done", "parent", 2)
    async with db.session() as session:
        assert await session.scalar(select(func.count()).select_from(LoopJob)) == 1
