"""The broker seam: how a broadcast reaches every node that has subscribers for its topic.

`memory://` delivers inside one process. `redis://` uses Redis pub/sub with a single
subscription connection per process, over which all of this node's topics are multiplexed;
publishing nodes receive their own messages back through it, so every node — the publisher
included — delivers in the one order Redis gives.

Messages are already-encoded Phoenix frames (bytes): a broadcast is serialised once in the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

Deliver = Callable[[str, bytes], None]


class BrokerUnavailable(Exception):
    """The broker cannot be reached; the publish did not happen and may be retried."""


class Broker(Protocol):
    """What the hub needs from a backend."""

    url: str

    async def start(self, deliver: Deliver) -> None: ...
    async def stop(self) -> None: ...
    async def subscribe(self, topic: str) -> None: ...
    async def unsubscribe(self, topic: str) -> None: ...
    async def publish(self, topic: str, message: bytes) -> None: ...
    async def ping(self) -> bool: ...
    def lag_seconds(self) -> float: ...


class MemoryBroker:
    """Single process: publish is a direct call to the local hub."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._deliver: Deliver | None = None

    async def start(self, deliver: Deliver) -> None:
        self._deliver = deliver

    async def stop(self) -> None:
        self._deliver = None

    async def subscribe(self, topic: str) -> None:
        return None

    async def unsubscribe(self, topic: str) -> None:
        return None

    async def publish(self, topic: str, message: bytes) -> None:
        if self._deliver is None:
            raise RuntimeError("broker is not started")
        self._deliver(topic, message)

    async def ping(self) -> bool:
        return self._deliver is not None

    def lag_seconds(self) -> float:
        return 0.0


class RedisBroker:
    """Redis pub/sub. One connection subscribes for the whole process; another pool publishes.

    When the subscription connection drops, the reader reconnects with backoff and subscribes
    again to every topic that still has local subscribers. Messages published while it was down
    are lost (pub/sub is at-most-once); paths that must not lose anything use the event stream.
    """

    CHANNEL_PREFIX = "rt:"

    def __init__(self, url: str, *, reconnect_max_delay: float = 2.0) -> None:
        self.url = url
        # Retried on a connection error: after a Redis restart every connection the pool held is dead,
        # and without a retry the first command on each would fail (a publish refused with 503 although
        # Redis is back). The retry reconnects and sends the command again.
        self._redis = aioredis.Redis.from_url(
            url,
            health_check_interval=10,
            socket_connect_timeout=2,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), 3),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        self._topics: set[str] = set()
        self._deliver: Deliver | None = None
        self._reader: asyncio.Task[None] | None = None
        self._reconnect_max_delay = reconnect_max_delay
        self._connected = asyncio.Event()
        self._lag = 0.0
        self._sub_lock = asyncio.Lock()
        self._sub_queue: list[tuple[str, asyncio.Future[None]]] = []
        self._sub_flusher: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None
        # A channel of this process alone: it keeps the subscription connection readable and
        # carries the lag probe (publish a timestamp, measure when it comes back).
        self._node_channel = f"{self.CHANNEL_PREFIX}__node__:{uuid.uuid4().hex}"

    async def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        # Fail fast on a wrong URL or a Redis that is not there at start-up.
        try:
            await self._redis.ping()
            # A pubsub connection needs one subscription before it can be read; this one is ours alone.
            await self._pubsub.subscribe(self._node_channel)
        except RedisError as exc:
            raise BrokerUnavailable(f"cannot reach Redis at {self.url}: {exc}") from exc
        self._connected.set()
        self._reader = asyncio.create_task(self._read_forever(), name="redis-broker-reader")
        self._probe = asyncio.create_task(self._probe_lag_forever(), name="redis-broker-lag-probe")

    async def stop(self) -> None:
        for task in (self._probe, self._reader, self._sub_flusher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._probe = self._reader = self._sub_flusher = None
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]
        with contextlib.suppress(Exception):
            await self._redis.aclose()

    def _channel(self, topic: str) -> str:
        return self.CHANNEL_PREFIX + topic

    async def subscribe(self, topic: str) -> None:
        """Returns once Redis confirmed the subscription. Topics asked for while one SUBSCRIBE is in
        flight go together in the next, so a burst of joins costs a few round trips, not one each."""
        self._topics.add(topic)
        if not self._connected.is_set():
            return  # the reader subscribes to everything in _topics when it reconnects
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sub_queue.append((topic, done))
        if self._sub_flusher is None or self._sub_flusher.done():
            self._sub_flusher = asyncio.create_task(self._flush_subscribes(), name="redis-broker-subscribe")
        await asyncio.shield(done)

    async def _flush_subscribes(self) -> None:
        async with self._sub_lock:
            while self._sub_queue:
                batch, self._sub_queue = self._sub_queue, []
                topics = [t for t, _ in batch if t in self._topics]
                try:
                    if topics:
                        await self._pubsub.subscribe(*(self._channel(t) for t in topics))
                except Exception:
                    # The reader will resubscribe everything in _topics once it reconnects.
                    log.warning(
                        "redis subscribe to %d topics failed; will retry on reconnect",
                        len(topics),
                        exc_info=True,
                    )
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)

    async def unsubscribe(self, topic: str) -> None:
        async with self._sub_lock:
            self._topics.discard(topic)
            if self._connected.is_set():
                with contextlib.suppress(Exception):
                    await self._pubsub.unsubscribe(self._channel(topic))

    async def publish(self, topic: str, message: bytes) -> None:
        try:
            await self._redis.publish(self._channel(topic), message)
        except RedisError as exc:
            raise BrokerUnavailable(f"publish to Redis failed: {exc}") from exc

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self._redis.ping(), timeout=2.0)) and self._connected.is_set()
        except Exception:
            return False

    def lag_seconds(self) -> float:
        return self._lag

    async def _probe_lag_forever(self, interval: float = 5.0) -> None:
        while True:
            try:
                await self._redis.publish(self._node_channel, repr(time.time()))
            except Exception as exc:
                log.debug("lag probe publish failed: %s", exc)
            await asyncio.sleep(interval)

    async def _read_forever(self) -> None:
        delay = 0.05
        prefix_len = len(self.CHANNEL_PREFIX)
        while True:
            try:
                async for item in self._pubsub.listen():
                    if item.get("type") != "message" or self._deliver is None:
                        continue
                    channel = item["channel"]
                    channel = channel.decode() if isinstance(channel, bytes) else channel
                    delay = 0.05
                    if channel == self._node_channel:
                        with contextlib.suppress(ValueError):
                            self._lag = max(0.0, time.time() - float(item["data"]))
                        continue
                    topic = channel[prefix_len:]
                    try:
                        self._deliver(topic, item["data"])
                    except Exception:
                        log.exception("delivering a broadcast on %r failed", topic)
                # listen() ends when nothing is subscribed; we hold the node channel, so this is a drop.
                raise ConnectionError("redis pubsub stream ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._connected.clear()
                log.warning("redis broker connection lost (%s); reconnecting", exc)
            # Until Redis answers again: retry with backoff, without reading a dead connection.
            while not await self._resubscribe():
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._reconnect_max_delay)
            delay = 0.05

    async def _resubscribe(self) -> bool:
        async with self._sub_lock:
            try:
                with contextlib.suppress(Exception):
                    await self._pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]
                channels = [self._node_channel, *(self._channel(t) for t in self._topics)]
                await self._pubsub.subscribe(*channels)
            except Exception as exc:
                log.debug("redis broker resubscribe failed: %s", exc)
                return False
            self._connected.set()
            log.info("redis broker reconnected; %d topics resubscribed", len(self._topics))
            return True


def broker_from_url(url: str) -> Broker:
    if url.startswith("memory://"):
        return MemoryBroker(url)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisBroker(url)
    raise ValueError(f"unsupported BROKER_URL {url!r}: use memory:// or redis://host:6379/0")
