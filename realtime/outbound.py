"""The outbound side of one socket: bounded, never awaited by the sender.

Two implementations share one interface. The fast one (`realtime.uvicorn_protocol`) writes
pre-built frames straight to the transport and bounds the transport's write buffer in bytes.
`AsgiOutbound` works on any ASGI server: a bounded queue drained by one writer task.
Either way a client that cannot keep up is disconnected with a clear reason, never waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from .stats import RealtimeStats

log = logging.getLogger(__name__)

CLOSE_SLOW_CONSUMER = 1008
CLOSE_GOING_AWAY = 1001


class Outbound(Protocol):
    @property
    def closed(self) -> bool: ...

    def enqueue(self, data: bytes) -> None:
        """Queue one message (UTF-8 JSON bytes) for this socket only."""

    def enqueue_frame(self, frame: bytes, data: bytes) -> None:
        """Queue a broadcast: `frame` is the complete WebSocket frame shared by all subscribers,
        `data` its payload (for transports that frame messages themselves)."""

    def start_close(self, code: int, reason: str) -> None:
        """Start a close handshake with this code and reason; later sends are dropped."""


# How long a closing socket may keep its connection before it is aborted, on either I/O path: long
# enough for a healthy client to echo the close, short enough that a stalled one frees its memory.
CLOSE_TIMEOUT = 5.0


class AsgiOutbound:
    """Portable outbound queue over the ASGI `send` callable, bounded in messages.

    A close goes out behind what was already queued (the client sees its replies, then the close),
    except for a slow consumer, whose queue is dropped. A connection still there CLOSE_TIMEOUT after
    its close began (a client that stopped reading: the server's `send` waits for ever on a full
    transport) is ended with `abort`, when the server gives us one."""

    __slots__ = (
        "_abort",
        "_closed",
        "_max_messages",
        "_queue",
        "_send",
        "_stats",
        "_task",
        "_timer",
        "_wakeup",
    )

    _CLOSE = object()

    def __init__(
        self,
        send: Callable[[dict[str, Any]], Awaitable[None]],
        *,
        max_messages: int,
        stats: RealtimeStats,
        abort: Callable[[], None] | None = None,
    ) -> None:
        self._send = send
        self._abort = abort
        self._timer: asyncio.TimerHandle | None = None
        self._max_messages = max_messages
        self._stats = stats
        self._queue: deque[Any] = deque()
        self._wakeup = asyncio.Event()
        self._closed = False
        self._task = asyncio.create_task(self._drain(), name="asgi-outbound")

    @property
    def closed(self) -> bool:
        return self._closed

    def enqueue(self, data: bytes) -> None:
        self._enqueue(data)

    def enqueue_frame(self, frame: bytes, data: bytes) -> None:
        self._enqueue(data)

    def _enqueue(self, data: bytes) -> None:
        if self._closed:
            return
        if len(self._queue) >= self._max_messages:
            self._stats.slow_consumers_dropped += 1
            self._queue.clear()  # a slow consumer's backlog is dropped; the close goes out next
            self.start_close(
                CLOSE_SLOW_CONSUMER, f"slow consumer: more than {self._max_messages} messages queued"
            )
            return
        self._queue.append(data)
        self._wakeup.set()

    def start_close(self, code: int, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.append((self._CLOSE, code, reason))
        self._wakeup.set()
        self._timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self._give_up)

    def _give_up(self) -> None:
        self._timer = None
        if self._abort is not None:
            self._stats.close_timeouts += 1
            self._abort()

    async def _drain(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                while self._queue:
                    item = self._queue.popleft()
                    if isinstance(item, tuple):
                        _, code, reason = item
                        await self._send({"type": "websocket.close", "code": code, "reason": reason})
                        return
                    await self._send({"type": "websocket.send", "text": item.decode()})
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The client went away under us; the receive loop sees the disconnect and cleans up.
            log.debug("asgi outbound stopped: %r", exc)
            self._closed = True

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
