"""Clock skew and duplicate deliveries: every consumer is idempotent.

A stream of events that touches every consumer (feeds, leaderboards, attribution and rewards,
experiments, the six loops) is delivered once, with client timestamps skewed and out of order, and the
whole database is read back. Then the same stream is delivered twice more — re-sent to the API with
other timestamps, and appended again to the event stream as exact duplicates, in another order and
other batch shapes — and every table (enumerated from the SQLAlchemy metadata) must read back exactly
as after the single delivery. Schedulers whose clocks disagree by more than a lease take jobs from
each other, and still land each job's effects once.
"""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from loop_kit import loop_world
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from loops.scheduler import Scheduler, schedule
from metrics.ingest import event_message
from store import Consumption, Database, Event, LoopJob
from store.models import Base
from store.privacy import PrivacyRules

H = timedelta(hours=1)


async def snapshot(database: Database) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, every column, in a stable order."""
    tables: dict[str, list[tuple[Any, ...]]] = {}
    async with database.session() as session:
        for table in Base.metadata.sorted_tables:
            rows = (await session.execute(select(table))).all()
            tables[table.name] = sorted((tuple(row) for row in rows), key=repr)
    return tables


def diff(before: dict[str, list[tuple[Any, ...]]], after: dict[str, list[tuple[Any, ...]]]) -> dict[str, Any]:
    changed = {}
    for name in before:
        if before[name] != after[name]:
            gone = [r for r in before[name] if r not in after[name]]
            new = [r for r in after[name] if r not in before[name]]
            changed[name] = {"gone": gone[:3], "new": new[:3], "rows": (len(before[name]), len(after[name]))}
    return changed


def the_stream(start: datetime, links: dict[str, str]) -> list[dict[str, Any]]:
    """About 200 events from 40 users over two days, each with its client's clock off by up to ±4
    minutes (so they arrive out of timestamp order), touching every consumer."""
    rng = random.Random(12)
    events: list[dict[str, Any]] = []
    subjects = ["algebra", "geometry", "physics"]

    def add(etype: str, user: str, at: datetime, **props: Any) -> None:
        skew = timedelta(seconds=rng.randint(-240, 240))
        events.append(
            {
                "id": f"e{len(events):04}-{etype}",
                "type": etype,
                "user_id": user,
                "ts": (at + skew).isoformat(),
                "props": props,
            }
        )

    for day in range(2):
        for n in range(40):
            user, at = f"s{n:02}", start + timedelta(days=day, minutes=7 * n)
            subject = subjects[n % 3]
            add("session_completed", user, at, subject=subject, minutes=10 + n % 30, score=40 + n % 60)
            if n % 2 == 0:
                add("practice_completed", user, at + timedelta(minutes=2), subject=subject, deck_id=f"d{n}")
            if n % 3 == 0:
                add("quiz_result", user, at + timedelta(minutes=3), subject=subject, score=50 + (n * 7) % 50)
            if n % 5 == 0:
                add("streak_updated", user, at + timedelta(minutes=4), days=3 + 4 * day)
            if n % 4 == 1:
                add(
                    "experiment_exposure", user, at, experiment="exp-idem", variant="a" if n % 8 == 1 else "b"
                )
    add("exam_scheduled", "s01", start + 30 * H, subject="geometry", exam_at=(start + 80 * H).isoformat())
    for n, (referrer, token) in enumerate(sorted(links.items())):
        at = start + timedelta(hours=31, minutes=n)
        add("invite_sent", referrer, at, source="study_buddy", link_token=token)
        add("link_clicked", f"new{n}", at + timedelta(minutes=5))
        add("signup", f"new{n}", at + timedelta(minutes=10), referral_token=token, visitor_id=f"v{n}")
        if n % 2 == 0:
            add("first_value", f"new{n}", at + timedelta(minutes=30))
    add("reaction", "s03", start + 32 * H)
    add("opt_out", "s39", start + 33 * H)
    add("session_completed", "s39", start + 34 * H, subject="physics", minutes=20)
    return events


async def post(world: Any, events: list[dict[str, Any]], batch: int) -> list[bool]:
    duplicates = []
    admin = world.headers("ops", "admin")
    for i in range(0, len(events), batch):
        response = await world.http.post("/api/events", json=events[i : i + batch], headers=admin)
        assert response.status_code == 202, response.text
        duplicates += [a["duplicate"] for a in response.json()["accepted"]]
    return duplicates


async def drained(world: Any, total: int) -> None:
    """Every consumer has a mark for every event, and the scheduler ran what fell due."""
    runner = world.app.state.runner
    async with asyncio.timeout(60):
        while True:
            async with world.app.state.database.session() as session:
                marks = await session.scalar(select(func.count()).select_from(Consumption))
            if marks >= total * len(runner.consumers):
                break
            await asyncio.sleep(0.05)
    await world.settle()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_replaying_the_whole_stream_twice_changes_no_table(database_url):
    async with loop_world(database_url) as world:
        start = world.clock.now()
        for user, fields in {
            "s00": {"display_name": "Ada", "parent_id": "mum0", "subjects": ["algebra"]},
            "s03": {"display_name": "Ben", "minor": True, "parent_id": "mum3"},
            "s06": {"display_name": "Cy", "subjects": ["algebra", "geometry"]},
            "mum0": {"role": "parent", "display_name": "Mum"},
            "mum3": {"role": "parent", "display_name": "Mom"},
            "t1": {"role": "tutor", "display_name": "Tess"},
        }.items():
            await world.profile(user, **fields)
        admin = world.headers("ops", "admin")
        experiment = {
            "key": "exp-idem",
            "variants": [{"key": "a", "weight": 0.5}, {"key": "b", "weight": 0.5}],
            "target_metric": "session_completed",
            "guardrail_metrics": ["opt_out"],
        }
        assert (await world.http.post("/api/experiments", json=experiment, headers=admin)).status_code == 201
        assert (await world.http.post("/api/experiments/exp-idem/start", headers=admin)).status_code == 200
        links = {}
        for referrer in ("s02", "s05", "s08"):
            made = await world.http.post(
                "/api/links", json={"source": "study_buddy"}, headers=world.headers(referrer)
            )
            assert made.status_code == 201, made.text
            links[referrer] = made.json()["token"]
        # A rally with members, so the loops consumer has loop items to re-rank from the stream.
        prelude = [
            {
                "id": "p-quiz",
                "type": "quiz_result",
                "user_id": "s00",
                "ts": start.isoformat(),
                "props": {"subject": "algebra", "score": 70},
            },
            *[
                {
                    "id": f"p-diag-{u}",
                    "type": "diagnostic_completed",
                    "user_id": u,
                    "ts": start.isoformat(),
                    "props": {"subject": "algebra", "score": 60},
                }
                for u in ("s03", "s06", "s09")
            ],
        ]
        await post(world, prelude, 10)
        await drained(world, len(prelude))
        rally = await world.act("s00", "start_rally", subject="algebra")
        assert rally.status_code == 200, rally.text
        rally_id = rally.json()["rally_id"]
        invited = await world.act("s00", "invite_to_rally", rally_id=rally_id, user_ids=["s03", "s06", "s09"])
        assert invited.status_code == 200, invited.text
        for member in ("s03", "s06", "s09"):
            joined = await world.act(member, "join_rally", rally_id=rally_id)
            assert joined.status_code == 200, joined.text
        for n, token in enumerate(links.values()):  # clicks, so attribution has touches to weigh
            clicked = await world.http.get(
                f"/r/{token}", headers={"cookie": f"ve_vid=v{n}"}, follow_redirects=False
            )
            assert clicked.status_code in (302, 303, 307), clicked.text
        stream = prelude + the_stream(start, links)
        prelude_ids = {e["id"] for e in prelude}

        # Single delivery: in arrival order, ten at a time, the clock moving along.
        assert not any(await post(world, [e for e in stream if e["id"] not in prelude_ids], 10))
        world.clock.set(start + 40 * H)
        await drained(world, len(stream))
        single = await snapshot(world.app.state.database)
        assert sum(len(rows) for rows in single.values()) > 1000
        touched = {name for name, rows in single.items() if rows}
        # Tables only an API call (not an event) writes may be empty; every consumer's tables are not.
        assert set(single) - touched <= {
            "ai_costs",
            "audit_log",
            "consents",
            "feed_reactions",
            "link_rejections",
            "loop_controls",
            "user_tombstones",
        }, sorted(set(single) - touched)

        # Second delivery: the clients re-send everything with clocks skewed by hours, in another order
        # and other batch sizes. Same ids: all duplicates, nothing changes.
        rng = random.Random(5)
        resent = [
            {
                **e,
                "ts": (
                    datetime.fromisoformat(e["ts"]) + timedelta(minutes=rng.choice([-300, -3, 7, 180]))
                ).isoformat(),
            }
            for e in stream
        ]
        rng.shuffle(resent)
        assert all(await post(world, resent, 37))

        # Third delivery: the event stream hands every consumer every stored event again — twice, in
        # reverse order, in batches of every shape — as a worker that restarted or a Redis that
        # redelivered would.
        runner = world.app.state.runner
        async with world.app.state.database.session() as session:
            stored = [
                event_message(e) for e in (await session.execute(select(Event).order_by(Event.id))).scalars()
            ]
        assert len(stored) >= len(stream)
        before = runner.stats.duplicates
        await runner.stream.append(list(reversed(stored)))
        await runner.stream.append(stored)
        for consumer in runner.consumers:
            await runner.process_batch(consumer, stored[::-1])
            for event in stored[:25]:
                assert await runner.process(consumer, event) == "duplicate"
        expected = before + len(stored) * len(runner.consumers) * 3 + 25 * len(runner.consumers)
        async with asyncio.timeout(60):
            while runner.stats.duplicates < expected:
                await asyncio.sleep(0.05)
        assert runner.stats.duplicates == expected
        assert await runner.reconcile() == 0  # and the reconciler finds nothing undelivered
        await world.settle()

        replayed = await snapshot(world.app.state.database)
        assert diff(single, replayed) == {}


class SkewedClock:
    def __init__(self, offset: timedelta) -> None:
        self.offset = offset

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_schedulers_whose_clocks_disagree_by_more_than_a_lease_still_land_each_job_once(database_url):
    """One worker's clock is a minute ahead, the other's a minute behind, leases are 20 s: each sees
    the other's leases as long expired and claims its running jobs. The fence on every commit means
    only one run of each job commits."""
    databases = [Database(database_url), Database(database_url)]
    schedulers = [
        Scheduler(
            databases[0], SkewedClock(timedelta(seconds=60)), owner="ahead", lease=timedelta(seconds=20)
        ),
        Scheduler(
            databases[1], SkewedClock(timedelta(seconds=-60)), owner="behind", lease=timedelta(seconds=20)
        ),
    ]
    runs: dict[str, int] = {}

    async def handler(session: AsyncSession, job: LoopJob) -> None:
        runs[job.key] = runs.get(job.key, 0) + 1
        await asyncio.sleep(0.02)  # long enough for the other to claim it meanwhile
        await session.execute(
            insert(Consumption).values(consumer="skew-test", event_id=job.key, status="done")
        )

    for scheduler in schedulers:
        scheduler.register("skewed", handler)
    try:
        async with databases[0].session() as session, session.begin():
            for n in range(60):
                await schedule(session, "skewed", datetime.now(UTC) - timedelta(minutes=5), {}, f"job-{n:02}")
        await asyncio.gather(*(s.run_due() for s in schedulers))
        async with databases[0].session() as session:
            witnessed = sorted(
                (
                    await session.execute(
                        select(Consumption.event_id).where(Consumption.consumer == "skew-test")
                    )
                ).scalars()
            )
            statuses = set((await session.execute(select(LoopJob.status))).scalars())
        assert witnessed == [f"job-{n:02}" for n in range(60)]  # each job's effect exactly once
        assert statuses == {"done"}
        lost = sum(s.stats.lost_lease for s in schedulers)
        ran = sum(s.stats.ran for s in schedulers)
        assert ran == 60
        # The skew did cause takeovers (so this test exercises the fence), each rolled back.
        assert lost > 0 and sum(runs.values()) == 60 + lost
        figures = {"jobs": 60, "runs": sum(runs.values()), "rolled_back": lost}
        print("FAULT-FIGURES scheduler-skew", figures)
    finally:
        for database in databases:
            await database.dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_board_rebuilt_between_commit_and_cache_update_counts_each_event_once(
    database_url, redis_url
):
    """The leaderboard consumer updates the cached board after its commit. If the board is rebuilt from
    the rows in between (a viewer's read after Redis lost it, on any process), the rebuilt board already
    holds the batch; the update must not add it again — and running the update twice changes nothing."""
    import uuid

    from channels import LeaderboardConsumer, Leaderboards
    from channels.leaderboard import RedisBoards, board_key
    from realtime import Hub, MemoryBroker, RealtimeStats

    database = Database(database_url)
    boards = RedisBoards(redis_url)
    leaderboards = Leaderboards(database, boards, PrivacyRules("test"))
    hub = Hub(MemoryBroker(), RealtimeStats())
    await hub.start()
    consumer = LeaderboardConsumer(leaderboards, hub)
    subject = f"idem{uuid.uuid4().hex[:8]}"  # a board of this test alone on the shared Redis
    now = datetime.now(UTC)
    events = [
        {
            "id": f"lb-{n}",
            "type": "quiz_result",
            "user_id": f"{subject}-u{n % 3}",
            "ts": now.isoformat(),
            "props": {"subject": subject, "score": 10 + n},
            "actor_id": "ops",
        }
        for n in range(9)
    ]
    try:
        async with database.session() as session, session.begin():
            update_cache = await consumer.handle(events, session)
        key = board_key(subject, "daily", now)
        assert not await boards.exists(key)
        await leaderboards.ensure(subject, "daily", now)  # rebuilt from the committed rows
        await update_cache()
        await update_cache()
        expected = {f"{subject}-u{k}": sum(10 + n for n in range(9) if n % 3 == k) for k in range(3)}
        assert dict(await boards.top(key, 10)) == expected
    finally:
        await hub.stop()
        await boards.close()
        await database.dispose()
