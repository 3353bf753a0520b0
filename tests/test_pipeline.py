"""The event pipeline against real databases (SQLite and PostgreSQL) and a real Redis stream."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from sqlalchemy import func, select

from channels import FeedConsumer
from channels.feed import feed_history, feed_page, feeds_follow_changes, withdraw_public_items
from channels.privacy import PrivacyChange
from metrics import ConsumerRunner, EventIn, EventIngest, MemoryEventStream, RedisEventStream
from metrics import privacy as data_rights
from realtime import Hub, MemoryBroker, RealtimeStats
from store import Consumption, Database, Event, FeedItem, Reaction, User, utcnow
from store.privacy import PrivacyRules, opt_out_user


def session_event(eid: str, user: str = "maya", subject: str = "algebra", minutes: int = 20) -> EventIn:
    return EventIn(eid, "session_completed", user, utcnow(), {"subject": subject, "minutes": minutes})


def stream_message(eid: str, etype: str, user: str, props: dict) -> dict:
    """An event as consumers receive it from the stream."""
    return {
        "id": eid,
        "type": etype,
        "user_id": user,
        "ts": utcnow().isoformat(),
        "props": props,
        "actor_id": user,
    }


@pytest.fixture
async def db(database_url):
    database = Database(database_url)
    yield database
    await database.dispose()


@pytest.fixture
async def hub():
    hub = Hub(MemoryBroker(), RealtimeStats())
    await hub.start()
    yield hub
    await hub.stop()


async def count(db: Database, model, *where) -> int:
    async with db.session() as session:
        return int(await session.scalar(select(func.count()).select_from(model).where(*where)))


async def test_the_same_id_twice_is_one_event(db):
    ingest = EventIngest(db, MemoryEventStream())
    first = await ingest.ingest([session_event("e1"), session_event("e1")], actor_id="maya")
    again = await ingest.ingest([session_event("e1"), session_event("e2")], actor_id="maya")
    assert [(a.id, a.duplicate) for a in first] == [("e1", False), ("e1", False)]
    assert [(a.id, a.duplicate) for a in again] == [("e1", True), ("e2", False)]
    assert await count(db, Event) == 2


async def test_timestamps_come_back_timezone_aware_utc(db):
    ingest = EventIngest(db, MemoryEventStream())
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    await ingest.ingest([EventIn("t1", "signup", "u", when, {})], actor_id="admin")
    async with db.session() as session:
        stored = await session.get(Event, "t1")
    assert stored.ts == when and stored.ts.tzinfo is not None


async def test_events_stored_while_the_stream_is_down_are_relayed_later(db, redis_url):
    down = EventIngest(db, RedisEventStream("redis://127.0.0.1:1/0"))
    await down.ingest([session_event("late-1"), session_event("late-2")], actor_id="maya")
    assert await count(db, Event, Event.published.is_(False)) == 2  # accepted and kept, not lost

    stream = MemoryEventStream()
    stream.register("probe")
    up = EventIngest(db, stream)
    assert await up.relay_unpublished(older_than=timedelta(0)) == 2
    batch = await stream.read("probe", count=10, block_ms=100)
    assert sorted(d.event["id"] for d in batch) == ["late-1", "late-2"]
    assert await count(db, Event, Event.published.is_(False)) == 0


async def test_redis_stream_redelivers_what_a_crashed_consumer_did_not_ack(redis_url):
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    await client.delete(RedisEventStream.KEY)
    await client.aclose()
    first = RedisEventStream(redis_url, claim_idle=0.2)
    await first.read("g", count=10, block_ms=10)  # creates the group at the end of the stream
    await first.append([{"id": "a"}, {"id": "b"}])
    taken = await first.read("g", count=10, block_ms=100)
    assert [d.event["id"] for d in taken] == ["a", "b"]
    await first.close()  # crashed before acknowledging

    second = RedisEventStream(redis_url, claim_idle=0.2)
    second._consumer = "another-worker"
    await asyncio.sleep(0.3)
    stolen = await second.read("g", count=10, block_ms=100)
    assert [d.event["id"] for d in stolen] == ["a", "b"]
    await second.ack("g", [d.ack_id for d in stolen])
    assert await second.read("g", count=10, block_ms=100) == []
    await second.close()


async def test_a_consumer_applies_each_event_once_however_often_it_arrives(db, hub):
    consumer = FeedConsumer(hub, PrivacyRules("test"))
    runner = ConsumerRunner(db, MemoryEventStream(), [consumer])
    message = stream_message("e1", "session_completed", "maya", {"subject": "algebra", "minutes": 20})
    results = [await runner.process(consumer, message) for _ in range(3)]
    assert results == ["done", "duplicate", "duplicate"]
    assert await count(db, FeedItem) == 3  # own feed, global, subject: once each


class Flaky:
    name = "flaky"

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def handle(self, events, session):
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(f"boom {self.calls}")
        return None


async def test_a_failing_event_is_retried_then_parked_with_its_error(db):
    runner = ConsumerRunner(db, MemoryEventStream(), [], max_attempts=3, retry_base_delay=0.01)
    recovers = Flaky(2)
    assert await runner.process(recovers, {"id": "x1"}) == "done"
    assert recovers.calls == 3
    hopeless = Flaky(99)
    hopeless.name = "hopeless"
    assert await runner.process(hopeless, {"id": "x2"}) == "parked"
    async with db.session() as session:
        row = await session.get(Consumption, ("hopeless", "x2"))
    assert row.status == "parked" and row.attempts == 3 and "boom 3" in row.error
    assert (
        await runner.process(hopeless, {"id": "x2"}) == "duplicate"
    )  # parked stays parked until an operator acts
    assert hopeless.calls == 3


async def test_the_reconciler_processes_events_the_stream_lost(db, hub):
    ingest = EventIngest(db, MemoryEventStream())  # nobody registered: the stream drops them
    await ingest.ingest([session_event("lost-1"), session_event("lost-2")], actor_id="maya")
    consumer = FeedConsumer(hub, PrivacyRules("test"))
    runner = ConsumerRunner(db, MemoryEventStream(), [consumer], reconcile_after=timedelta(0))
    assert await runner.reconcile() == 2
    assert await runner.reconcile() == 0
    assert await count(db, FeedItem, FeedItem.feed == "global") == 2


async def test_feed_items_follow_the_privacy_rules(db, hub):
    async with db.session() as session, session.begin():
        session.add_all(
            [
                User(id="maya", display_name="Maya", subjects=[]),
                User(id="kid", display_name="Timmy", minor=True, subjects=[]),
                User(id="shy", display_name="Shy", opted_out=True, subjects=[]),
            ]
        )
    consumer = FeedConsumer(hub, PrivacyRules("test"))
    runner = ConsumerRunner(db, MemoryEventStream(), [consumer])
    for user in ("maya", "kid", "shy", "nobody"):
        message = stream_message(f"ev-{user}", "quiz_result", user, {"subject": "geometry", "score": 92})
        await runner.process(consumer, message)
    async with db.session() as session:
        public = (await feed_history(session, "global"))["items"]
        subject = (await feed_history(session, "subject:geometry"))["items"]
        kid_own = (await feed_history(session, "user:kid"))["items"]
        shy_own = (await feed_history(session, "user:shy"))["items"]
        texts = [i.text for i in (await session.execute(select(FeedItem))).scalars()]
    assert [i["text"] for i in public] == [
        "Maya scored 92% on a Geometry quiz",
        "A student scored 92% on a Geometry quiz",
        "A student scored 92% on a Geometry quiz",
    ]
    assert [i["text"] for i in subject] == [i["text"] for i in public]
    assert kid_own[0]["text"] == "Timmy scored 92% on a Geometry quiz"  # their own feed has their name
    assert shy_own[0]["text"] == "Shy scored 92% on a Geometry quiz"
    public_rows = [t for t in texts if "Timmy" in t or "Shy" in t]
    assert len(public_rows) == 2  # only in their own feeds


async def test_public_feed_items_follow_a_privacy_change_at_once(db, hub):
    rules = PrivacyRules("test")
    async with db.session() as session, session.begin():
        session.add_all(
            [
                User(id="maya", display_name="Maya", subjects=[]),
                User(id="kid", display_name="Kid", subjects=[]),
                User(id="shy", display_name="Shy", subjects=[]),
            ]
        )
    consumer = FeedConsumer(hub, rules)
    stream = MemoryEventStream()
    stream.register(consumer.name)
    runner = ConsumerRunner(db, stream, [consumer])
    # Stored, then streamed: re-rendering reads the stored events.
    events = [
        ("f1", "quiz_result", "maya", {"subject": "geometry", "score": 90}),
        ("f2", "quiz_result", "shy", {"subject": "geometry", "score": 80}),
        ("f3", "practice_completed", "kid", {"subject": "geometry"}),
        ("f4", "streak_updated", "shy", {"days": 7}),
        ("f5", "practice_completed", "maya", {"subject": "geometry"}),
    ]
    for eid, etype, user, props in events:
        await EventIngest(db, stream).ingest([EventIn(eid, etype, user, utcnow(), props)], actor_id="ops")
        [delivery] = await stream.read(consumer.name, count=10, block_ms=100)
        assert await runner.process(consumer, delivery.event) == "done"
    async with db.session() as session, session.begin():
        epochs = {f: (await feed_history(session, f))["epoch"] for f in ("global", "subject:geometry")}
        epoch = epochs["global"]
        session.add(Reaction(feed="global", offset=2, user_id="maya", kind="cheer", created_at=utcnow()))
    pushed: list[list] = []
    for topic in ("feed:global", "feed:subject:geometry", "feed:user:shy", "feed:user:kid"):
        await hub.listen(topic, lambda raw: pushed.append(orjson.loads(raw)))
    follow = feeds_follow_changes(db, hub, rules)

    async def public(feed: str) -> dict[int, str]:
        async with db.session() as session:
            history = await feed_history(session, feed)
            page = await feed_page(session, feed, before=None, limit=50)
            resumed = await feed_history(session, feed, since=0, epoch=epochs[feed])
        assert page["items"] == history["items"]
        assert resumed["items"] == history["items"]  # resumed, or a fresh page: only what may be shown
        return {i["offset"]: i["text"] for i in history["items"]}

    async with db.session() as session, session.begin():
        await opt_out_user(session, "shy", by="self", now=utcnow())
    await follow(PrivacyChange("shy"))
    assert await public("global") == {
        1: "Maya scored 90% on a Geometry quiz",
        3: "Kid completed Geometry practice",
        5: "Maya completed Geometry practice",
    }
    assert await public("subject:geometry") == {
        1: "Maya scored 90% on a Geometry quiz",
        3: "Kid completed Geometry practice",
        4: "Maya completed Geometry practice",
    }
    async with db.session() as session:
        own = (await feed_history(session, "user:shy"))["items"]
        assert [i["text"] for i in own] == ["Shy scored 80% on a Geometry quiz", "Shy hit a 7-day streak"]
        assert await session.scalar(select(func.count()).select_from(Reaction)) == 0
    await asyncio.sleep(0.05)
    async with db.session() as session:
        renewed = {f: (await feed_history(session, f))["epoch"] for f in ("global", "subject:geometry")}
        # A client that was away and kept the removed items resumes with a fresh page, not after them.
        stale = await feed_history(session, "global", since=1, epoch=epoch)
        assert stale["recovered"] is False and 2 not in [i["offset"] for i in stale["items"]]
    assert renewed["global"] != epoch and renewed["subject:geometry"] != epochs["subject:geometry"]
    assert sorted((f[2], f[3], f[4]["offsets"], f[4]["epoch"]) for f in pushed) == [
        ("feed:global", "activity_removed", [2, 4], renewed["global"]),
        ("feed:subject:geometry", "activity_removed", [2], renewed["subject:geometry"]),
    ]
    pushed.clear()
    epochs = renewed

    await follow(PrivacyChange("shy"))  # again: nothing left to change, nothing pushed
    await set_minor(db, "kid")
    await follow(PrivacyChange("kid"))
    assert (await public("global"))[3] == "A student completed Geometry practice"
    assert (await public("subject:geometry"))[3] == "A student completed Geometry practice"
    async with db.session() as session:
        own = (await feed_history(session, "user:kid"))["items"]
        assert [i["text"] for i in own] == ["Kid completed Geometry practice"]  # their own feed: their name
    await asyncio.sleep(0.05)
    updated = {f[2]: f[4] for f in pushed}
    assert [f[3] for f in pushed] == ["activity_updated", "activity_updated"]
    async with db.session() as session:
        assert updated["feed:global"]["epoch"] == (await feed_history(session, "global"))["epoch"] != epoch
    assert [(i["offset"], i["text"]) for i in updated["feed:global"]["items"]] == [
        (3, "A student completed Geometry practice")
    ]
    assert [i["offset"] for i in updated["feed:subject:geometry"]["items"]] == [3]
    pushed.clear()

    # Deleted: their public items are withdrawn (and pushed) with their data; the handler then finds
    # nothing left to do.
    async with db.session() as session, session.begin():
        withdrawn = await withdraw_public_items(session, rules, "maya")
        await data_rights.delete_user(session, "maya", actor="ops", now=utcnow(), key="k")
    await withdrawn.tell(hub)
    await follow(PrivacyChange("maya", deleted_at=utcnow()))
    assert await public("global") == {3: "A student completed Geometry practice"}
    await asyncio.sleep(0.05)
    assert sorted((f[2], f[3], f[4]["offsets"]) for f in pushed) == [
        ("feed:global", "activity_removed", [1, 5]),
        ("feed:subject:geometry", "activity_removed", [1, 4]),
    ]


async def set_minor(db: Database, user_id: str) -> None:
    async with db.session() as session, session.begin():
        user = await session.get(User, user_id)
        user.minor = True


async def test_feed_history_resumes_after_an_offset_or_says_it_cannot(db, hub):
    consumer = FeedConsumer(hub, PrivacyRules("test"))
    runner = ConsumerRunner(db, MemoryEventStream(), [consumer])
    for i in range(5):
        message = stream_message(f"h{i}", "practice_completed", "maya", {"subject": "art"})
        await runner.process(consumer, message)
    async with db.session() as session:
        page = await feed_history(session, "global", limit=2)
        assert [i["offset"] for i in page["items"]] == [4, 5] and page["offset"] == 5
        epoch = page["epoch"]
        resumed = await feed_history(session, "global", since=2, epoch=epoch)
        assert resumed["recovered"] is True
        assert [i["offset"] for i in resumed["items"]] == [3, 4, 5]
        other_epoch = await feed_history(session, "global", since=2, epoch="stale")
        assert other_epoch["recovered"] is False and [i["offset"] for i in other_epoch["items"]] == [
            1,
            2,
            3,
            4,
            5,
        ]
    async with db.session() as session, session.begin():
        await session.execute(
            FeedItem.__table__.delete().where(FeedItem.feed == "global", FeedItem.offset <= 3)
        )
    async with db.session() as session:
        expired = await feed_history(session, "global", since=1, epoch=epoch)
        assert expired["recovered"] is False
        assert (await feed_history(session, "global", since=3, epoch=epoch))["recovered"] is True


async def test_feeds_keep_only_their_newest_items(db, hub):
    consumer = FeedConsumer(hub, PrivacyRules("test"), retained=3)
    runner = ConsumerRunner(db, MemoryEventStream(), [consumer])
    for i in range(5):
        message = stream_message(f"k{i}", "practice_completed", "maya", {"subject": "art"})
        await runner.process(consumer, message)
    assert await consumer.maintain(db) == 2 * 3  # global, subject:art, user:maya lose two each
    async with db.session() as session:
        page = await feed_history(session, "global")
        assert [i["offset"] for i in page["items"]] == [3, 4, 5]
        assert (await feed_history(session, "global", since=1, epoch=page["epoch"]))["recovered"] is False
        assert (await feed_history(session, "global", since=2, epoch=page["epoch"]))["recovered"] is True


class Picky:
    """Fails on any batch holding a 'poison' event, like a consumer hitting one bad row."""

    name = "picky"

    def __init__(self) -> None:
        self.applied: list[str] = []

    async def handle(self, events, session):
        if any(e["id"] == "poison" for e in events):
            raise ValueError("cannot digest poison")
        self.applied += [e["id"] for e in events]
        return None


async def test_one_bad_event_in_a_batch_is_parked_and_the_rest_go_through(db):
    picky = Picky()
    runner = ConsumerRunner(db, MemoryEventStream(), [picky], max_attempts=2, retry_base_delay=0.01)
    await runner.process_batch(picky, [{"id": "ok1"}, {"id": "poison"}, {"id": "ok2"}, {"id": "ok1"}])
    assert sorted(picky.applied) == ["ok1", "ok2"]
    async with db.session() as session:
        rows = {r.event_id: r.status for r in (await session.execute(select(Consumption))).scalars()}
    assert rows == {"ok1": "done", "ok2": "done", "poison": "parked"}
    await runner.process_batch(picky, [{"id": "ok1"}, {"id": "ok3"}])
    assert sorted(picky.applied) == ["ok1", "ok2", "ok3"]
