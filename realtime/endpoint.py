"""The socket endpoint: an ASGI app that upgrades `/socket/websocket`, authenticates, and runs sockets.

It also owns the engine's background work (broker, idle-socket sweep) through `start`/`stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

from . import serializer
from .broker import Broker
from .hub import Hub
from .outbound import AsgiOutbound, Outbound
from .router import Router
from .socket import (
    CLOSE_GOING_AWAY,
    CLOSE_INVALID_PAYLOAD,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    Socket,
    SocketLimits,
)
from .stats import RealtimeStats
from .tokens import InvalidToken, TokenVerifier, token_from_subprotocols

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ConnectHook = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

# A server that can write pre-built frames to the transport puts an object under this key in
# scope["extensions"] (see realtime.uvicorn_protocol); without it the portable ASGI path is used.
FAST_TRANSPORT_EXTENSION = "realtime.transport"
# Put there by ExposeTransportAbort: a callable that drops the connection at once.
TRANSPORT_ABORT_EXTENSION = "realtime.abort"


class ConnectRefused(Exception):
    """Raised by a connect hook to refuse a socket with HTTP 403 and this message."""


class PhoenixEndpoint:
    def __init__(
        self,
        *,
        router: Router,
        verifier: TokenVerifier,
        broker: Broker,
        limits: SocketLimits | None = None,
        stats: RealtimeStats | None = None,
        on_connect: ConnectHook | None = None,
        sweep_interval: float | None = None,
        context: Any = None,
        token_cookie: str | None = None,
    ) -> None:
        self.router = router
        # Off by default. When set, a client offering no token in `?token=` or the sub-protocol may
        # carry it in this cookie instead (a browser page with an HttpOnly session cookie). Browsers send
        # cookies on cross-site WebSocket upgrades too, so such an upgrade is only accepted when its
        # `Origin` (if any: browsers always send one) names the host it was sent to.
        self.token_cookie = token_cookie
        self.verifier = verifier
        self.limits = limits or SocketLimits()
        self.stats = stats or RealtimeStats()
        self.hub = Hub(broker, self.stats)
        self.on_connect = on_connect
        # Whatever the application's channels need (services, settings); handed to every socket.
        self.context = context
        self.sockets: set[Socket] = set()
        self.max_sockets = self.limits.max_sockets or _default_max_sockets()
        self._sweep_interval = sweep_interval or max(0.5, min(5.0, self.limits.idle_timeout / 4))
        self._sweeper: asyncio.Task[None] | None = None

    # Lifecycle.

    async def start(self) -> None:
        await self.hub.start()
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="realtime-sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for sock in list(self.sockets):
            sock.close(CLOSE_GOING_AWAY, "server shutting down")
        await self.hub.stop()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval)
            try:
                self.close_idle_sockets()
                await self.hub.sweep()
            except Exception:
                log.exception("realtime sweep failed")

    def close_idle_sockets(self) -> int:
        deadline = time.monotonic() - self.limits.idle_timeout
        idle = [sock for sock in self.sockets if sock.last_seen < deadline]
        for sock in idle:
            self.stats.idle_timeouts += 1
            sock.close(1000, f"idle timeout: no message for {self.limits.idle_timeout:g}s")
        return len(idle)

    # ASGI.

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            body = b"this endpoint only speaks WebSocket (Phoenix Channels V2)"
            await send(
                {"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"text/plain")]}
            )
            await send({"type": "http.response.body", "body": body})
            return
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        try:
            serializer.negotiate_vsn(_first(query, "vsn"))
        except serializer.ProtocolError as exc:
            await self._deny(scope, send, 400, str(exc))
            return
        if len(self.sockets) >= self.max_sockets:
            await self._deny(
                scope,
                send,
                503,
                f"this server holds its maximum of {self.max_sockets} sockets; retry or use another node",
            )
            return
        offered: list[str] = list(scope.get("subprotocols") or [])
        token = _first(query, "token") or token_from_subprotocols(offered)
        if not token and self.token_cookie:
            token = _cookie(scope, self.token_cookie)
            if token and not _same_host_origin(scope):
                await self._deny(scope, send, 403, "cross-origin upgrade refused: Origin does not match Host")
                return
        try:
            claims = self.verifier.verify(token)
            if self.on_connect is not None:
                claims = await self.on_connect(claims)
        except (InvalidToken, ConnectRefused) as exc:
            await self._deny(scope, send, 403, str(exc))
            return

        accept: dict[str, Any] = {"type": "websocket.accept"}
        chosen = _choose_subprotocol(offered)
        if chosen is not None:
            accept["subprotocol"] = chosen
        await send(accept)

        fast = scope.get("extensions", {}).get(FAST_TRANSPORT_EXTENSION)
        if fast is not None:
            # The server reads frames itself and hands them to the socket: no task stays behind
            # for this connection once this call returns (realtime.uvicorn_protocol).
            outbound = fast.attach(
                max_buffer_bytes=self.limits.outbound_max_bytes,
                stats=self.stats,
                max_message_bytes=self.limits.max_frame_bytes,
            )
            fast.bind(self.open_socket(claims, outbound), self._socket_closed)
            return
        asgi_outbound = AsgiOutbound(
            send,
            max_messages=self.limits.outbound_max_messages,
            stats=self.stats,
            abort=scope.get("extensions", {}).get(TRANSPORT_ABORT_EXTENSION) or _transport_abort(send),
        )
        sock = self.open_socket(claims, asgi_outbound)
        try:
            await self._receive_loop(sock, receive)
        finally:
            await self._socket_closed(sock)
            await asgi_outbound.aclose()

    async def _socket_closed(self, sock: Socket) -> None:
        self.sockets.discard(sock)
        self.stats.sockets_closed += 1
        await sock.terminate("closed")

    def open_socket(self, claims: dict[str, Any], outbound: Outbound) -> Socket:
        """A socket for an authenticated client, writing to `outbound`, registered with this endpoint."""
        sock = Socket(
            claims,
            outbound,
            hub=self.hub,
            router=self.router,
            limits=self.limits,
            stats=self.stats,
            context=self.context,
        )
        self.sockets.add(sock)
        self.stats.sockets_opened += 1
        return sock

    async def _receive_loop(self, sock: Socket, receive: Receive) -> None:
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "websocket.receive":
                text = message.get("text")
                if text is not None:
                    await sock.handle_text(text)
                else:
                    sock.handle_binary()
            elif kind == "websocket.disconnect":
                if not sock.closed:
                    # The server's WebSocket layer refused a frame before the socket saw it (on
                    # uvicorn's websockets-sansio: frames over 4x the limit, protocol errors, bad
                    # UTF-8) and reports the code it closed with. A client that itself closes with
                    # one of these codes is counted the same way.
                    code = message.get("code")
                    if code == CLOSE_TOO_BIG:
                        self.stats.oversized_frames += 1
                    elif code in (CLOSE_PROTOCOL_ERROR, CLOSE_INVALID_PAYLOAD):
                        self.stats.malformed_frames += 1
                return

    async def _deny(self, scope: Scope, send: Send, status: int, reason: str) -> None:
        self.stats.sockets_rejected += 1
        if "websocket.http.response" in scope.get("extensions", {}):
            body = orjson.dumps({"error": reason})
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            # Closing before accepting makes the server answer 403 without a body.
            await send({"type": "websocket.close", "code": 1008, "reason": reason})

    # Server-side publishing (SPEC §9a): one path for every push to a topic.

    async def broadcast(self, topic: str, event: str, payload: Any) -> int:
        return await self.hub.broadcast(topic, event, payload)


# File descriptors kept free when the socket cap is derived from the open-files limit: database and
# Redis pools, HTTP requests (/metrics, the API), log files and handshakes in flight.
FD_RESERVE = 512


def _default_max_sockets() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(1, soft - FD_RESERVE)


class ExposeTransportAbort:
    """ASGI middleware for the portable path, to be outermost (before anything wraps `send`): puts
    the server's way to drop a WebSocket connection at once into the scope's extensions, so the
    endpoint can end a connection whose client stopped reading (see AsgiOutbound)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            abort = _transport_abort(send)
            if abort is not None:
                scope["extensions"] = {**(scope.get("extensions") or {}), TRANSPORT_ABORT_EXTENSION: abort}
        await self.app(scope, receive, send)


def _transport_abort(send: Send) -> Callable[[], None] | None:
    """The server's way to drop a connection at once, if it shows one: uvicorn's WebSocket protocols
    pass their bound `send`, whose object holds the asyncio transport. `transport.close()` waits for
    a full write buffer to drain, which a client that stopped reading never lets happen."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    abort = getattr(transport, "abort", None)
    return abort if callable(abort) else None


def _first(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[0] if values else None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _cookie(scope: Scope, name: str) -> str | None:
    """The value of cookie `name` in the upgrade request's `Cookie` header(s), if any."""
    for key, value in scope.get("headers") or ():
        if key.lower() != b"cookie":
            continue
        for part in bytes(value).decode("latin-1").split(";"):
            cname, sep, cvalue = part.partition("=")
            if sep and cname.strip() == name:
                cvalue = cvalue.strip()
                if len(cvalue) >= 2 and cvalue[0] == cvalue[-1] == '"':
                    cvalue = cvalue[1:-1]
                return cvalue or None
    return None


_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def _same_host_origin(scope: Scope) -> bool:
    """True unless the request has an `Origin` whose host[:port] differs from its `Host` (no Origin:
    not a browser, so not a cross-site request forged by one)."""
    origin = _header(scope, b"origin")
    if origin is None:
        return True
    parts = urlsplit(origin.strip())
    host = (_header(scope, b"host") or "").strip().lower()
    if not parts.scheme or not parts.netloc or not host:
        return False  # e.g. "Origin: null" from a sandboxed or file:// page
    netloc = parts.netloc.lower()
    default = _DEFAULT_PORTS.get(parts.scheme.lower())
    if default and netloc.endswith(f":{default}"):
        netloc = netloc[: -len(default) - 1]
    if default and host.endswith(f":{default}"):
        host = host[: -len(default) - 1]
    return netloc == host


def _choose_subprotocol(offered: list[str]) -> str | None:
    if not offered:
        return None
    if "phoenix" in offered:
        return "phoenix"
    for proto in offered:
        if not proto.startswith("base64url.bearer."):
            return proto
    return None
