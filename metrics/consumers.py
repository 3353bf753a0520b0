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

from sqlalchemy import and_, select
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

    async def handle(self, event: dict[str, Any], session: AsyncSession) -> AfterCommit | None:
        """Apply the event's effects in `session`; return what to do once they are committed."""


@dataclass
class RunnerStats:
    processed: int = 0
    duplicates: int = 0
    retries: int = 0
    parked: int = 0
    reconciled: int = 0


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
            for delivery in batch:
                await self.process(consumer, delivery.event)
            await self.stream.ack(consumer.name, [d.ack_id for d in batch])

    async def process(self, consumer: Consumer, event: dict[str, Any]) -> str:
        """Process one event for one consumer: 'done', 'duplicate' or 'parked'. Never raises."""
        last_error = ""
        for attempt in range(1, self.max_attempts + 1):
            try:
                async with self.database.session() as session:
                    async with session.begin():
                        seen = await session.get(Consumption, (consumer.name, event["id"]))
                        if seen is not None:
                            self.stats.duplicates += 1
                            return "duplicate"
                        after = await consumer.handle(event, session)
                        session.add(
                            Consumption(
                                consumer=consumer.name, event_id=event["id"], status="done", attempts=attempt
                            )
                        )
                self.stats.processed += 1
                if after is not None:
                    try:
                        await after()
                    except Exception:
                        log.exception(
                            "after-commit step of %s failed for event %s", consumer.name, event["id"]
                        )
                return "done"
            except IntegrityError:
                # Another worker committed this event for this consumer at the same moment.
                self.stats.duplicates += 1
                return "duplicate"
            except asyncio.CancelledError:
                raise
            except Exception as exc:
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
            for event in missing:
                await self.process(consumer, event_message(event))
            total += len(missing)
        if total:
            self.stats.reconciled += total
            log.warning("reconciled %d events the stream had not delivered", total)
        return total
