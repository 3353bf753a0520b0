"""uvicorn's sans-I/O WebSocket protocol, plus a direct path for pre-built frames.

Handshake, inbound frames, ping/pong and the closing handshake stay uvicorn's (so Starlette's
routing, middleware and denial responses work unchanged). Outbound data skips the ASGI `send`
round trip: a broadcast frame, built once, is `transport.write()`n to each subscriber, and the
transport's write buffer is the socket's bounded outbound queue.

Use it with `uvicorn.run(app, ws=PhoenixWebSocketProtocol, ws_per_message_deflate=False)`: the
shared frame is uncompressed, so permessage-deflate must be off (it is refused here if on).
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState

from .endpoint import FAST_TRANSPORT_EXTENSION
from .frames import text_frame
from .outbound import CLOSE_GOING_AWAY, CLOSE_SLOW_CONSUMER
from .stats import RealtimeStats

# How long a closing socket may keep its buffer before the transport is aborted: long enough
# for a healthy client to echo the close, short enough that a stalled one frees its memory.
CLOSE_TIMEOUT = 5.0


class PhoenixWebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.config.ws_per_message_deflate:
            raise RuntimeError("PhoenixWebSocketProtocol needs ws_per_message_deflate=False")
        self._max_buffer = 1 << 20
        self._stats: RealtimeStats | None = None

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            # The ASGI task was created but has not run yet, so it will see this.
            scope["extensions"][FAST_TRANSPORT_EXTENSION] = self

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            # uvicorn leaves this unset after a denial response and then logs a spurious error.
            self.handshake_complete = True

    def attach(self, *, max_buffer_bytes: int, stats: RealtimeStats) -> PhoenixWebSocketProtocol:
        """Called by the endpoint once the handshake is accepted: this object is the socket's Outbound."""
        self._max_buffer = max_buffer_bytes
        self._stats = stats
        return self

    @property
    def closed(self) -> bool:
        return self.close_sent or self.disconnected

    def enqueue(self, data: bytes) -> None:
        self.enqueue_frame(text_frame(data), data)

    def enqueue_frame(self, frame: bytes, data: bytes) -> None:
        if self.close_sent or self.disconnected:
            return
        transport = self.transport
        # Judged by what was already waiting, so one large message (a big presence_state) on its
        # own never makes a client "slow"; a client still that far behind at the next one is.
        backlog = transport.get_write_buffer_size()
        transport.write(frame)
        if backlog > self._max_buffer:
            if self._stats is not None:
                self._stats.slow_consumers_dropped += 1
            self.start_close(
                CLOSE_SLOW_CONSUMER, f"slow consumer: more than {self._max_buffer} bytes waiting to be sent"
            )

    def start_close(self, code: int, reason: str) -> None:
        if self.close_sent or self.disconnected:
            return
        self.close_sent = True
        self.stop_keepalive()
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        try:
            self.conn.send_close(code, reason)
            self.transport.write(b"".join(self.conn.data_to_send()))
        except InvalidState:
            # The client started closing first; its close frame is being answered already.
            pass
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        self.close_timer = self.loop.call_later(CLOSE_TIMEOUT, self._abort)

    def _abort(self) -> None:
        self.close_timer = None
        self.transport.abort()

    def shutdown(self) -> None:
        """Server is stopping (SIGTERM): close with 1001 so clients reconnect to another node."""
        if self.handshake_complete and self.initial_response is None and not self.closed:
            self.start_close(CLOSE_GOING_AWAY, "server shutting down")
            return
        super().shutdown()
