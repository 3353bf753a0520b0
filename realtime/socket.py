"""One client connection: decodes frames, routes them to channels, enforces per-socket limits.

Free of I/O of its own: bytes come in through `handle_text`, go out through an `Outbound`.
`realtime.testing` drives it with no network at all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import serializer
from .channel import NO_REPLY, Channel, JoinError, ReplyError
from .serializer import Message, ProtocolError

if TYPE_CHECKING:
    from .hub import Hub
    from .outbound import Outbound
    from .router import Router
    from .stats import RealtimeStats

log = logging.getLogger(__name__)

CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY = 1008
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_TOO_BIG = 1009
CLOSE_GOING_AWAY = 1001


@dataclass(frozen=True, slots=True)
class SocketLimits:
    """Per-socket limits; every one is configurable and enforced with a clear error."""

    max_frame_bytes: int = 64 * 1024
    max_topics: int = 100
    # Inbound messages: a token bucket refilled at `rate_per_second` up to `rate_burst`.
    rate_per_second: float = 50.0
    rate_burst: float = 100.0
    # Refusals by the rate limit count up as strikes and each accepted message takes one back, so a
    # client that keeps sending faster than twice the rate reaches this many and is closed (1008),
    # while one that strays over the limit now and then only gets "rate limited" replies.
    rate_strikes_before_close: int = 500
    # Outbound bound: bytes buffered in the transport (fast path) or messages queued (ASGI path).
    outbound_max_bytes: int = 1 << 20
    outbound_max_messages: int = 1024
    idle_timeout: float = 60.0
    # Sockets one process accepts (a node-wide cap, not per socket). 0: the open-files limit minus
    # FD_RESERVE, so a full node refuses upgrades with 503 instead of running out of descriptors
    # for its database, Redis and /metrics connections.
    max_sockets: int = 0


class Socket:
    __slots__ = (
        "_strikes",
        "_tokens",
        "_tokens_at",
        "channels",
        "claims",
        "closed",
        "context",
        "hub",
        "last_seen",
        "limits",
        "outbound",
        "router",
        "stats",
    )

    def __init__(
        self,
        claims: dict[str, Any],
        outbound: Outbound,
        *,
        hub: Hub,
        router: Router,
        limits: SocketLimits,
        stats: RealtimeStats,
        context: Any = None,
    ) -> None:
        self.claims = claims
        self.context = context
        self.outbound = outbound
        self.hub = hub
        self.router = router
        self.limits = limits
        self.stats = stats
        self.channels: dict[str, Channel] = {}
        self.closed = False
        now = time.monotonic()
        self.last_seen = now
        self._tokens = limits.rate_burst
        self._tokens_at = now
        self._strikes = 0

    @property
    def user_id(self) -> str:
        return str(self.claims["sub"])

    # Inbound.

    async def handle_text(self, data: str | bytes) -> None:
        pending = self.receive(data)
        if pending is not None:
            await pending

    def receive(self, data: str | bytes) -> Coroutine[Any, Any, None] | None:
        """Handle one inbound message as far as it can be without waiting: checks, decoding, rate
        limit, heartbeats and error replies. Returns what is left to await (a join, a leave, a
        client event for a channel), or None. The caller awaits it before the next message, so
        messages are handled in order without a task per heartbeat."""
        if self.closed:
            return None
        self.last_seen = now = time.monotonic()
        self.stats.frames_in += 1
        size = len(data)
        if isinstance(data, str) and size > self.limits.max_frame_bytes // 4:
            size = len(data.encode())  # characters undercount bytes only for non-ASCII text
        if size > self.limits.max_frame_bytes:
            self.stats.oversized_frames += 1
            self.close(
                CLOSE_TOO_BIG, f"frame of {size} bytes exceeds the limit of {self.limits.max_frame_bytes}"
            )
            return None
        try:
            msg = serializer.decode(data)
        except ProtocolError as exc:
            self.stats.malformed_frames += 1
            self.close(CLOSE_INVALID_PAYLOAD, f"malformed frame: {exc}")
            return None
        if not self._take_token(now):
            self.stats.rate_limited += 1
            self._strikes += 1
            if self._strikes >= self.limits.rate_strikes_before_close:
                self.close(CLOSE_POLICY, "rate limit exceeded repeatedly")
                return None
            self._reply(msg, "error", {"reason": "rate limited", "retry_after_ms": self._retry_after_ms()})
            return None
        if self._strikes:
            self._strikes -= 1
        event = msg.event
        if event == serializer.HEARTBEAT and msg.topic == serializer.PHOENIX_TOPIC:
            self._reply(msg, "ok", {})
            return None
        if event == serializer.PHX_JOIN:
            return self._join(msg)
        if event == serializer.PHX_LEAVE:
            return self._leave(msg)
        channel = self.channels.get(msg.topic)
        if channel is None:
            self._reply(msg, "error", {"reason": "unmatched topic"})
            return None
        return self._dispatch(channel, msg)

    def handle_binary(self) -> None:
        self.stats.malformed_frames += 1
        self.close(
            CLOSE_UNSUPPORTED_DATA, "binary frames are not supported: send Phoenix V2 JSON text frames"
        )

    def _take_token(self, now: float) -> bool:
        limits = self.limits
        tokens = min(limits.rate_burst, self._tokens + (now - self._tokens_at) * limits.rate_per_second)
        self._tokens_at = now
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True

    def _retry_after_ms(self) -> int:
        return int((1.0 - self._tokens) / self.limits.rate_per_second * 1000) + 1

    async def _join(self, msg: Message) -> None:
        topic = msg.topic
        if not isinstance(msg.payload, dict):
            self._reply(msg, "error", {"reason": "join params must be a JSON object"})
            return
        channel_class = self.router.match(topic)
        if channel_class is None:
            self._reply(msg, "error", {"reason": "unmatched topic"})
            return
        existing = self.channels.get(topic)
        if existing is not None:
            # As Phoenix does: a second join of the same topic replaces the first.
            await self._end_channel(existing, "duplicate join")
            self._send(
                serializer.encode(existing.join_ref, existing.join_ref, topic, serializer.PHX_CLOSE, {})
            )
        elif len(self.channels) >= self.limits.max_topics:
            self.stats.joins_refused += 1
            self._reply(msg, "error", {"reason": f"too many topics (limit {self.limits.max_topics})"})
            return
        channel = channel_class(self, topic, msg.join_ref)
        try:
            response = await channel.join(msg.payload)
        except JoinError as exc:
            self.stats.joins_refused += 1
            self._reply(msg, "error", exc.response)
            return
        except Exception:
            self.stats.channel_crashes += 1
            log.exception("join crashed: %s topic=%r user=%r", channel_class.__name__, topic, self.user_id)
            self._reply(msg, "error", {"reason": "join crashed"})
            return
        if self.closed:
            await self._terminate_channel(channel, "closed")
            return
        self.channels[topic] = channel
        await self.hub.subscribe(channel)
        self.stats.joins += 1
        self._reply(msg, "ok", response if response is not None else {})
        try:
            await channel.after_join()
        except Exception:
            log.exception("after_join crashed: %s topic=%r", channel_class.__name__, topic)
            self.crash_channel(channel)

    async def _leave(self, msg: Message) -> None:
        channel = self.channels.get(msg.topic)
        if channel is None:
            self._reply(msg, "error", {"reason": "unmatched topic"})
            return
        self._reply(msg, "ok", {})
        await self._end_channel(channel, "leave")
        self._send(
            serializer.encode(channel.join_ref, channel.join_ref, channel.topic, serializer.PHX_CLOSE, {})
        )

    async def _dispatch(self, channel: Channel, msg: Message) -> None:
        try:
            result = await channel.handle_in(msg.event, msg.payload, msg.ref)
        except ReplyError as exc:
            self._reply(msg, "error", exc.response)
            return
        except Exception:
            log.exception(
                "handle_in crashed: %s topic=%r event=%r user=%r",
                type(channel).__name__,
                channel.topic,
                msg.event,
                self.user_id,
            )
            self.crash_channel(channel)
            await self._terminate_channel(channel, "crash")
            return
        if result is not NO_REPLY and msg.ref is not None:
            self._reply(msg, "ok", result if result is not None else {})

    # Channel lifecycle.

    def crash_channel(self, channel: Channel) -> None:
        """The channel failed: tell its client with `phx_error` (as Phoenix does) and forget it.

        Only that channel ends; the socket and its other channels go on.
        """
        if self.channels.get(channel.topic) is not channel:
            return
        self.stats.channel_crashes += 1
        del self.channels[channel.topic]
        self.hub.unsubscribe(channel)
        self._send(
            serializer.encode(channel.join_ref, channel.join_ref, channel.topic, serializer.PHX_ERROR, {})
        )

    async def _end_channel(self, channel: Channel, reason: str) -> None:
        if self.channels.get(channel.topic) is channel:
            del self.channels[channel.topic]
        self.hub.unsubscribe(channel)
        await self._terminate_channel(channel, reason)

    async def _terminate_channel(self, channel: Channel, reason: str) -> None:
        try:
            await channel.terminate(reason)
        except Exception:
            log.exception("terminate crashed: %s topic=%r", type(channel).__name__, channel.topic)

    async def terminate(self, reason: str) -> None:
        """The connection is gone: end every channel. Safe to call more than once."""
        self.closed = True
        channels = list(self.channels.values())
        self.channels.clear()
        for channel in channels:
            self.hub.unsubscribe(channel)
        for channel in channels:
            await self._terminate_channel(channel, reason)

    # Outbound.

    def push(self, channel: Channel, event: str, payload: Any) -> None:
        self._send(serializer.encode(channel.join_ref, None, channel.topic, event, payload))

    def _reply(self, msg: Message, status: str, response: Any) -> None:
        if msg.ref is None:
            return
        self._send(serializer.encode_reply(msg.join_ref, msg.ref, msg.topic, status, response))

    def _send(self, data: bytes) -> None:
        self.stats.frames_out += 1
        self.outbound.enqueue(data)

    def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.outbound.start_close(code, reason)
