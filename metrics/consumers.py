"""Running consumers at least once, with effects exactly once.

A consumer's database effects and its "done" marker (`event_consumptions`) commit in one
transaction, so an event delivered twice — redelivery after a crash, a replay, the reconciler —
changes nothing the second time. What it does outside the database (pushing to sockets,
refreshing a cache) runs after the commit and is best-effort by design.

A failing event is retried with backoff, then parked with its error for an operator
(`GET /api/admin/parked`). The reconciler finds events that no stream delivered (Redis lost them)
by looking for recent events without a consumption row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from sqlalchemy import and_, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from store import Consumption, Database, Event, utcnow

from .ingest import event_message
from .stream import EventStream, MemoryEventStream, StreamUnavailable

log = logging.getLogger(__name__)

AfterCommit = Callable[[], Awaitable[None]]


class Consumer(Protocol):
    """`name` keys its progress; an optional `async maintain(database)` runs with the upkeep."""

    name: str

    async def handle(self, events: list[dict[str, Any]], session: AsyncSession) -> AfterCommit | None:
        """Apply the events' effects in `session` (set-based where it can: a batch is up to 100);
        return what to do once they are committed."""


@dataclass
class RunnerStats:
    processed: int = 0
    duplicates: int = 0
    retries: int = 0
    parked: int = 0
    reconciled: int = 0
    waits_for_database: int = 0


class ConsumerRunner:
    def __init__(
        self,
        database: Database,
        stream: EventStream,
        consumers: Sequence[Consumer],
        *,
        max_attempts: int = 5,
        retry_base_delay: float = 0.1,
        reconcile_every: float = 10.0,
        reconcile_after: timedelta = timedelta(seconds=30),
        reconcile_window: timedelta = timedelta(days=1),
        relay: Callable[[], Awaitable[int]] | None = None,
    ) -> None:
        self.database = database
        self.stream = stream
        self.consumers = list(consumers)
        self.max_attempts = max_attempts
        self.retry_base_delay = retry_base_delay
        self.reconcile_every = reconcile_every
        self.reconcile_after = reconcile_after
        self.reconcile_window = reconcile_window
        self.relay = relay
        self.stats = RunnerStats()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        for consumer in self.consumers:
            if isinstance(self.stream, MemoryEventStream):
                self.stream.register(consumer.name)
            self._tasks.append(
                asyncio.create_task(self._consume_forever(consumer), name=f"consumer-{consumer.name}")
            )
        self._tasks.append(asyncio.create_task(self._maintain_forever(), name="consumer-maintenance"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _consume_forever(self, consumer: Consumer) -> None:
        delay = 0.1
        while True:
            try:
                batch = await self.stream.read(consumer.name, count=100, block_ms=1000)
                delay = 0.1
            except StreamUnavailable as exc:
                log.warning(
                    "consumer %s cannot read the stream (%s); retrying in %.1fs", consumer.name, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if batch:
                await self.process_batch(consumer, [d.event for d in batch])
                await self.stream.ack(consumer.name, [d.ack_id for d in batch])

    async def _apply(self, consumer: Consumer, events: list[dict[str, Any]], attempt: int) -> int:
        """One transaction: skip what this consumer already did, apply the rest, mark it done.
        Returns how many events were new; raises what the consumer raised."""
        ids = list(dict.fromkeys(e["id"] for e in events))
        async with self.database.session() as session:
            async with session.begin():
                seen = set(
                    (
                        await session.execute(
                            select(Consumption.event_id).where(
                                Consumption.consumer == consumer.name, Consumption.event_id.in_(ids)
                            )
                        )
                    ).scalars()
                )
                fresh = list({e["id"]: e for e in events if e["id"] not in seen}.values())
                self.stats.duplicates += len(events) - len(fresh)
                if not fresh:
                    return 0
                after = await consumer.handle(fresh, session)
                await session.execute(
                    insert(Consumption),
                    [
                        {
                            "consumer": consumer.name,
                            "event_id": e["id"],
                            "status": "done",
                            "attempts": attempt,
                        }
                        for e in fresh
                    ],
                )
        self.stats.processed += len(fresh)
        if after is not None:
            try:
                await after()
            except Exception:
                log.exception("after-commit step of %s failed for %d events", consumer.name, len(fresh))
        return len(fresh)

    async def process_batch(self, consumer: Consumer, events: list[dict[str, Any]]) -> None:
        """The fast path: a whole batch in one transaction. If it fails, every event goes through
        `process` on its own, so one bad event is retried and parked without holding up the rest."""
        try:
            await self._apply(consumer, events, 1)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("batch of %d failed for %s (%s); processing one by one", len(events), consumer.name, exc)
            for event in events:
                await self.process(consumer, event)

    async def process(self, consumer: Consumer, event: dict[str, Any]) -> str:
        """Process one event for one consumer: 'done', 'duplicate' or 'parked'. Never raises.

        A failure while the database does not answer is not the event's fault: it does not count as
        an attempt, and the event waits for the database instead of being parked."""
        last_error = ""
        attempt = 0
        while attempt < self.max_attempts:
            attempt += 1
            try:
                return "done" if await self._apply(consumer, [event], attempt) else "duplicate"
            except IntegrityError:
                # Another worker committed this event for this consumer at the same moment.
                self.stats.duplicates += 1
                return "duplicate"
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not await self.database.ping():
                    attempt -= 1
                    await self._wait_for_database(consumer, exc)
                    continue
                last_error = "".join(traceback.format_exception_only(exc)).strip()
                log.warning(
                    "consumer %s failed on event %s (attempt %d): %s",
                    consumer.name,
                    event["id"],
                    attempt,
                    last_error,
                )
                if attempt < self.max_attempts:
                    self.stats.retries += 1
                    await asyncio.sleep(self.retry_base_delay * 2 ** (attempt - 1))
        await self._park(consumer, event, last_error)
        return "parked"

    async def _wait_for_database(self, consumer: Consumer, error: Exception) -> None:
        log.warning("consumer %s: the database is unavailable (%s); waiting for it", consumer.name, error)
        self.stats.waits_for_database += 1
        delay = 0.2
        while not await self.database.ping():
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _park(self, consumer: Consumer, event: dict[str, Any], error: str) -> None:
        self.stats.parked += 1
        log.error(
            "consumer %s parked event %s after %d attempts: %s",
            consumer.name,
            event["id"],
            self.max_attempts,
            error,
        )
        try:
            async with self.database.session() as session, session.begin():
                session.add(
                    Consumption(
                        consumer=consumer.name,
                        event_id=event["id"],
                        status="parked",
                        attempts=self.max_attempts,
                        error=error[:2000],
                    )
                )
        except Exception:
            log.exception("could not record parked event %s for %s", event["id"], consumer.name)

    async def _maintain_forever(self) -> None:
        while True:
            await asyncio.sleep(self.reconcile_every)
            try:
                if self.relay is not None:
                    await self.relay()
                await self.reconcile()
                for consumer in self.consumers:
                    maintain = getattr(consumer, "maintain", None)
                    if maintain is not None:
                        await maintain(self.database)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event reconciliation failed")

    async def reconcile(self, limit: int = 500) -> int:
        """Process recent events some consumer never saw (lost by the stream); returns how many."""
        now = utcnow()
        total = 0
        for consumer in self.consumers:
            async with self.database.session() as session:
                missing = (
                    (
                        await session.execute(
                            select(Event)
                            .outerjoin(
                                Consumption,
                                and_(Consumption.event_id == Event.id, Consumption.consumer == consumer.name),
                            )
                            .where(
                                Consumption.event_id.is_(None),
                                Event.published.is_(True),
                                Event.received_at < now - self.reconcile_after,
                                Event.received_at > now - self.reconcile_window,
                            )
                            .order_by(Event.received_at)
                            .limit(limit)
                        )
                    )
                    .scalars()
                    .all()
                )
            if missing:
                await self.process_batch(consumer, [event_message(e) for e in missing])
            total += len(missing)
        if total:
            self.stats.reconciled += total
            log.warning("reconciled %d events the stream had not delivered", total)
        return total
