"""The durable event stream between ingest and consumers.

`redis://`: a Redis Stream with one consumer group per consumer (each consumer sees every event;
the processes running it share the work). Unacknowledged entries of a crashed worker are claimed
by another after `claim_idle` seconds. `memory://`: one in-process queue per consumer.

Neither is the source of truth: the database is. Events that never reached the stream (Redis
down, crash between commit and append) are found by the outbox relay; events the stream lost
(Redis restarted empty) by the reconciler in `metrics.consumers`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)


class StreamUnavailable(Exception):
    pass


def redis_from_url(url: str) -> aioredis.Redis:
    """A Redis client that survives a Redis restart: a pooled connection that died with the old server
    is reconnected and the command retried (without this, the first use of each such connection fails,
    so every connection the pool held is one error after a restart)."""
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=2,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), 3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event as a consumer receives it; `ack_id` is what to acknowledge."""

    ack_id: str
    event: dict[str, Any]


class EventStream(Protocol):
    async def append(self, events: Sequence[dict[str, Any]]) -> None: ...
    async def read(self, group: str, count: int, block_ms: int) -> list[Delivery]: ...
    async def ack(self, group: str, ack_ids: Sequence[str]) -> None: ...
    async def close(self) -> None: ...


class MemoryEventStream:
    def __init__(self) -> None:
        self._queues: dict[str, asyncio.Queue[Delivery]] = {}
        self._counter = 0

    def _queue(self, group: str) -> asyncio.Queue[Delivery]:
        queue = self._queues.get(group)
        if queue is None:
            queue = self._queues[group] = asyncio.Queue()
        return queue

    def register(self, group: str) -> None:
        """Consumers register before events flow; events appended earlier are the reconciler's."""
        self._queue(group)

    async def append(self, events: Sequence[dict[str, Any]]) -> None:
        for event in events:
            self._counter += 1
            for queue in self._queues.values():
                queue.put_nowait(Delivery(str(self._counter), event))

    async def read(self, group: str, count: int, block_ms: int) -> list[Delivery]:
        queue = self._queue(group)
        try:
            first = await asyncio.wait_for(queue.get(), block_ms / 1000)
        except TimeoutError:
            return []
        batch = [first]
        while len(batch) < count and not queue.empty():
            batch.append(queue.get_nowait())
        return batch

    async def ack(self, group: str, ack_ids: Sequence[str]) -> None:
        return None

    async def close(self) -> None:
        return None


class RedisEventStream:
    KEY = "events:stream"

    def __init__(self, url: str, *, maxlen: int = 1_000_000, claim_idle: float = 30.0) -> None:
        self._redis = redis_from_url(url)
        self._maxlen = maxlen
        self._claim_idle_ms = int(claim_idle * 1000)
        self._consumer = f"{socket.gethostname()}-{os.getpid()}"
        self._groups_ready: set[str] = set()
        self._pending_first: set[str] = set()
        self._next_claim: dict[str, float] = {}

    async def append(self, events: Sequence[dict[str, Any]]) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for event in events:
                    pipe.xadd(self.KEY, {"e": orjson.dumps(event)}, maxlen=self._maxlen, approximate=True)
                await pipe.execute()
        except RedisError as exc:
            raise StreamUnavailable(f"event stream append failed: {exc}") from exc

    async def _ensure_group(self, group: str) -> None:
        if group in self._groups_ready:
            return
        try:
            await self._redis.xgroup_create(self.KEY, group, id="$", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups_ready.add(group)
        self._pending_first.add(group)

    async def read(self, group: str, count: int, block_ms: int) -> list[Delivery]:
        try:
            await self._ensure_group(group)
            if group in self._pending_first:
                # After a restart, first finish what this consumer had taken but not acknowledged.
                self._pending_first.discard(group)
                entries = await self._redis.xreadgroup(group, self._consumer, {self.KEY: "0"}, count=count)
                batch = self._deliveries(entries)
                if batch:
                    self._pending_first.add(group)
                    return batch
            now = time.monotonic()
            if now >= self._next_claim.get(group, 0.0):
                self._next_claim[group] = now + self._claim_idle_ms / 2000
                claimed = await self._redis.xautoclaim(
                    self.KEY,
                    group,
                    self._consumer,
                    min_idle_time=self._claim_idle_ms,
                    start_id="0-0",
                    count=count,
                )
                stolen = [Delivery(_s(i), orjson.loads(f[b"e"])) for i, f in claimed[1] if f]
                if stolen:
                    log.info("claimed %d events another %s worker left unacknowledged", len(stolen), group)
                    return stolen
            entries = await self._redis.xreadgroup(
                group, self._consumer, {self.KEY: ">"}, count=count, block=block_ms
            )
            return self._deliveries(entries)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # Redis lost the stream (restarted empty): make the group again
                self._groups_ready.discard(group)
                return []
            raise StreamUnavailable(str(exc)) from exc
        except RedisError as exc:
            raise StreamUnavailable(f"event stream read failed: {exc}") from exc

    @staticmethod
    def _deliveries(entries: Any) -> list[Delivery]:
        batch: list[Delivery] = []
        for _key, items in entries or ():
            for entry_id, fields in items:
                if fields:
                    batch.append(Delivery(_s(entry_id), orjson.loads(fields[b"e"])))
        return batch

    async def ack(self, group: str, ack_ids: Sequence[str]) -> None:
        if ack_ids:
            try:
                await self._redis.xack(self.KEY, group, *ack_ids)
            except RedisError as exc:
                # Not acknowledged means delivered again later; consumers are idempotent.
                log.warning("ack of %d events failed: %s", len(ack_ids), exc)

    async def close(self) -> None:
        await self._redis.aclose()


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def stream_from_url(url: str, *, claim_idle: float = 30.0) -> EventStream:
    if url.startswith("memory://"):
        return MemoryEventStream()
    return RedisEventStream(url, claim_idle=claim_idle)
