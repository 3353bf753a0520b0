"""Local subscriptions and fan-out.

`broadcast` serialises a push once and hands the bytes to the broker; the broker calls
`deliver` on every node with subscribers, which wraps the bytes in one WebSocket frame and
writes that same frame to each local subscriber. Nothing on this path awaits a client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from . import frames, serializer
from .broker import Broker
from .stats import RealtimeStats

if TYPE_CHECKING:
    from .channel import Channel

log = logging.getLogger(__name__)

Listener = Callable[[bytes], None]


class Hub:
    def __init__(self, broker: Broker, stats: RealtimeStats) -> None:
        self.broker = broker
        self.stats = stats
        # topic -> channels joined to it on this node (a dict keeps join order and O(1) removal).
        self._subscribers: dict[str, dict[Channel, None]] = {}
        # topic -> how many of its channels intercept some events (0 means pure fast lane).
        self._intercepting: dict[str, int] = {}
        # In-process listeners (server-side subscribers, e.g. presence replication): topic -> callbacks.
        self._listeners: dict[str, list[Listener]] = {}
        # Topics this node is subscribed to at the broker (a superset of the keys of both maps above),
        # and those whose subscription is still on its way.
        self._broker_topics: set[str] = set()
        self._subscribing: dict[str, asyncio.Future[None]] = {}

    async def start(self) -> None:
        await self.broker.start(self.deliver)

    async def stop(self) -> None:
        await self.broker.stop()

    def local_count(self, topic: str) -> int:
        subs = self._subscribers.get(topic)
        return len(subs) if subs else 0

    def topics(self) -> int:
        return len(self._subscribers)

    async def subscribe(self, channel: Channel) -> None:
        topic = channel.topic
        subs = self._subscribers.get(topic)
        if subs is None:
            subs = self._subscribers[topic] = {}
        subs[channel] = None
        if channel.intercept:
            self._intercepting[topic] = self._intercepting.get(topic, 0) + 1
        await self._ensure_broker_subscription(topic)

    async def _ensure_broker_subscription(self, topic: str) -> None:
        """Return once the broker delivers `topic` here. Everyone joining while the subscription is
        in flight waits for that same subscription: a join is never acknowledged before it is live."""
        pending = self._subscribing.get(topic)
        if pending is not None:
            await asyncio.shield(pending)
            return
        if topic in self._broker_topics:
            return
        self._broker_topics.add(topic)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._subscribing[topic] = future
        try:
            await self.broker.subscribe(topic)
            future.set_result(None)
        except BaseException as exc:
            self._broker_topics.discard(topic)
            future.set_exception(exc)
            future.exception()  # retrieved here, so an unawaited failure is not reported twice
            raise
        finally:
            del self._subscribing[topic]

    async def listen(self, topic: str, listener: Listener) -> None:
        """Call `listener(message_bytes)` for every broadcast on `topic` reaching this node."""
        self._listeners.setdefault(topic, []).append(listener)
        await self._ensure_broker_subscription(topic)

    def unlisten(self, topic: str, listener: Listener) -> None:
        listeners = self._listeners.get(topic)
        if listeners and listener in listeners:
            listeners.remove(listener)
            if not listeners:
                del self._listeners[topic]

    def unsubscribe(self, channel: Channel) -> None:
        """Forget a channel now; the broker subscription of an emptied topic goes at the next sweep,
        so churn on a topic (leave, rejoin) costs no broker round-trips."""
        topic = channel.topic
        subs = self._subscribers.get(topic)
        if subs is None or channel not in subs:
            return
        del subs[channel]
        if channel.intercept:
            left = self._intercepting[topic] - 1
            if left:
                self._intercepting[topic] = left
            else:
                del self._intercepting[topic]
        if not subs:
            del self._subscribers[topic]

    async def sweep(self) -> int:
        """Drop broker subscriptions of topics nobody here listens to any more; returns how many."""
        idle = [t for t in self._broker_topics if t not in self._subscribers and t not in self._listeners]
        dropped = 0
        for topic in idle:
            # Checked again here: a join during an earlier await of this loop keeps its topic.
            if topic in self._subscribers or topic in self._listeners or topic in self._subscribing:
                continue
            # Removed before the await, so a concurrent subscribe() re-subscribes after us, in order.
            self._broker_topics.discard(topic)
            await self.broker.unsubscribe(topic)
            dropped += 1
        return dropped

    async def broadcast(self, topic: str, event: str, payload: Any) -> int:
        """Publish to every subscriber of `topic` on every node; returns local subscribers reached."""
        message = serializer.encode_broadcast(topic, event, payload)
        local = self.local_count(topic)
        self.stats.broadcasts += 1
        await self.broker.publish(topic, message)
        return local

    async def publish_raw(self, topic: str, message: bytes) -> None:
        """Publish bytes that only listeners read (node-to-node traffic, not a Phoenix frame)."""
        await self.broker.publish(topic, message)

    def push_local(self, topic: str, event: str, payload: Any) -> int:
        """Push to this node's subscribers of `topic` only (each node computes its own: presence diffs)."""
        self._fan_out(topic, serializer.encode_broadcast(topic, event, payload))
        return self.local_count(topic)

    def deliver(self, topic: str, message: bytes) -> None:
        """Called by the broker with an encoded broadcast: one frame built, written to every subscriber."""
        listeners = self._listeners.get(topic)
        if listeners:
            for listener in list(listeners):
                try:
                    listener(message)
                except Exception:
                    log.exception("listener on %r failed", topic)
        self._fan_out(topic, message)

    def _fan_out(self, topic: str, message: bytes) -> None:
        subs = self._subscribers.get(topic)
        if not subs:
            return
        frame = frames.text_frame(message)
        if topic in self._intercepting:
            self._deliver_intercepted(subs, frame, message)
            return
        # send_frame never awaits and never unsubscribes synchronously, so iterating the live dict is safe.
        for channel in subs:
            channel.socket.outbound.enqueue_frame(frame, message)
        self.stats.frames_out += len(subs)

    def _deliver_intercepted(self, subs: dict[Channel, None], frame: bytes, message: bytes) -> None:
        _, _, topic, event, payload = orjson.loads(message)
        sent = 0
        for channel in list(subs):
            if event not in channel.intercept:
                channel.socket.outbound.enqueue_frame(frame, message)
                sent += 1
                continue
            try:
                rewritten = channel.handle_out(event, payload)
            except Exception:
                log.exception("handle_out failed on %s for %r", type(channel).__name__, topic)
                channel.socket.crash_channel(channel)
                continue
            if rewritten is not None:
                channel.socket.outbound.enqueue(serializer.encode(None, None, topic, event, rewritten))
                sent += 1
        self.stats.frames_out += sent
