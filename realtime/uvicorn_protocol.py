"""A lean WebSocket protocol for uvicorn: one small object per connection, no task per socket.

uvicorn hands a connection to this class when an HTTP request asks to upgrade. The handshake goes
through the ASGI app as usual (so Starlette's routing, middleware, authentication and denial
responses work unchanged); the app runs as a task only for that. When the Phoenix endpoint accepts
the socket it *binds* it here (`bind`) and returns: from then on there is no ASGI task, no receive
queue and no per-socket coroutine. Frames are parsed in `data_received` and handed to the `Socket`
synchronously; only a join, a leave or a channel event that must await something runs as a task,
and only until it is done (later messages wait behind it, in order).

Outbound, every write goes through `enqueue`/`enqueue_frame`. A broadcast frame, built once, is
appended to each subscriber's pending list; one callback per event-loop tick writes what each socket
has pending in one `transport.write` (so several broadcasts in the same tick cost one system call per
socket, not one per frame). The transport's write buffer is the socket's bounded outbound queue: a
client already more than `max_buffer_bytes` behind is closed (1008), never waited for.

What is implemented of RFC 6455 (server side): the opening handshake (version 13; 400 for a bad
request, 426 for another version), masked client frames only, text, binary (refused by the
socket, 1003), continuation frames up to the size limit, ping → pong, pong ignored, the closing
handshake both ways with a timeout, close 1002 for protocol errors (reserved bits or opcodes,
unmasked frames, a close frame with one byte or a code that may not be sent), 1009 for a message over
the size limit (refused from its header; its payload is skipped unread), 1007 for invalid UTF-8 in a
message or a close reason. No extensions
(permessage-deflate is never negotiated: the shared frame is uncompressed). An app that accepts a
WebSocket without binding it gets plain ASGI receive/send, so any ASGI WebSocket route still works.

Use it with `uvicorn.run(app, ws=PhoenixWebSocketProtocol)` (what `viral-engine serve` does).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import struct
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from websockets.speedups import apply_mask

from .endpoint import FAST_TRANSPORT_EXTENSION
from .frames import close_frame, text_frame
from .outbound import CLOSE_GOING_AWAY, CLOSE_SLOW_CONSUMER, CLOSE_TIMEOUT
from .socket import CLOSE_POLICY
from .stats import RealtimeStats

if TYPE_CHECKING:
    from .socket import Socket

log = logging.getLogger("uvicorn.error")

# Messages a busy socket (one whose join or event is still awaiting) may queue before reading pauses.
INBOX_PAUSE = 64
MAX_REQUEST_BYTES = 16 * 1024
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005
CLOSE_ABNORMAL = 1006
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011

# Clients (browsers, phoenix.js) send a message in one frame; a few fragments are allowed, a flood of
# them is refused: every frame costs work, whatever its size.
MAX_FRAGMENTS = 64

_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_PONG_EMPTY = b"\x8a\x00"

# Connection states.
_HANDSHAKE, _ASGI, _OPEN, _CLOSING, _CLOSED = range(5)


SocketClosed = Callable[["Socket"], Coroutine[Any, Any, None]]


class _Shared:
    """What every connection of one server shares (kept once, not per connection)."""

    __slots__ = (
        "app",
        "app_state",
        "asgi_version",
        "connections",
        "flusher",
        "loop",
        "root_path",
        "server_state",
        "tasks",
    )

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any]) -> None:
        self.app = config.loaded_app
        self.app_state = app_state
        self.asgi_version = config.asgi_version
        self.root_path = config.root_path
        self.connections = server_state.connections
        self.tasks = server_state.tasks
        # Its `default_headers` are read at each use: uvicorn refreshes the Date header every second.
        self.server_state = server_state
        self.loop = asyncio.get_running_loop()
        self.flusher = _Flusher(self.loop)


class _Flusher:
    """One per event loop: writes every socket's pending frames once per tick."""

    __slots__ = ("dirty", "loop", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.dirty: list[PhoenixWebSocketProtocol] = []
        self.scheduled = False

    def add(self, protocol: PhoenixWebSocketProtocol) -> None:
        self.dirty.append(protocol)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        dirty, self.dirty = self.dirty, []
        for protocol in dirty:
            protocol._flush()


class PhoenixWebSocketProtocol(asyncio.Protocol):
    __slots__ = (
        "_buf",
        "_close_timer",
        "_frag",
        "_frag_op",
        "_frag_size",
        "_inbox",
        "_max_buffer",
        "_max_message",
        "_on_closed",
        "_pending",
        "_queue",
        "_request",
        "_shared",
        "_skip",
        "_sock",
        "_state",
        "_stats",
        "_task",
        "transport",
    )

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()
        if config.ws_per_message_deflate:
            raise RuntimeError("PhoenixWebSocketProtocol needs ws_per_message_deflate=False")
        shared: _Shared | None = getattr(server_state, "_realtime_shared", None)
        if shared is None or shared.app_state is not app_state:
            shared = _Shared(config, server_state, app_state)
            server_state._realtime_shared = shared
        self._shared = shared
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self._state = _HANDSHAKE
        self._buf: bytearray | None = None
        self._request: bytes | None = b""
        self._sock: Socket | None = None
        self._on_closed: SocketClosed | None = None
        self._stats: RealtimeStats | None = None
        self._max_buffer = 1 << 20
        self._max_message = int(config.ws_max_size)
        self._pending: bytes | list[bytes] | None = None
        self._inbox: deque[bytes | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._frag: list[bytes] | None = None
        self._frag_op = 0
        self._frag_size = 0  # the bytes of the message so far: each frame adds its own, nothing more
        self._skip = 0
        self._queue: asyncio.Queue[dict[str, Any]] | None = None

    # asyncio.Protocol.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._shared.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        previous = self._state
        self._state = _CLOSED
        self._pending = None
        self._buf = None
        self._shared.connections.discard(self)
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if self._queue is not None:
            self._queue.put_nowait({"type": "websocket.disconnect", "code": CLOSE_ABNORMAL})
        if previous == _HANDSHAKE:
            return
        self._release_socket()

    def eof_received(self) -> bool | None:
        return None

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state == _HANDSHAKE:
            self._receive_request(data)
            return
        if state == _CLOSED:
            return
        if state == _ASGI or (self._sock is None and self._queue is None):
            # Accepted but not yet bound (or not accepted yet): keep the bytes until someone reads them.
            if data:
                if self._buf is None:
                    self._buf = bytearray()
                self._buf += data
                if len(self._buf) > self._max_message + MAX_REQUEST_BYTES:
                    self._fail(CLOSE_TOO_BIG, "too much data before the socket was ready")
            return
        if self._skip:
            # The rest of a refused frame's payload: dropped unread.
            if len(data) <= self._skip:
                self._skip -= len(data)
                return
            data = data[self._skip :]
            self._skip = 0
        buf = self._buf
        if buf is not None:
            buf += data
            view: bytes | bytearray = buf
        else:
            view = data
        pos = self._parse(view)
        if self._state == _CLOSED or pos >= len(view):
            self._buf = None
        elif buf is not None:
            del buf[:pos]
        else:
            self._buf = bytearray(view[pos:])

    # The opening handshake.

    def _receive_request(self, data: bytes) -> None:
        request = (self._request or b"") + data
        end = request.find(b"\r\n\r\n")
        if end < 0:
            if len(request) > MAX_REQUEST_BYTES:
                self._reject(431, "request headers too large")
            else:
                self._request = request
            return
        self._request = None
        head, rest = request[:end], request[end + 4 :]
        try:
            scope, key = self._parse_request(head)
        except _BadRequest as exc:
            self._reject(exc.status, exc.reason, exc.headers)
            return
        self._state = _ASGI
        if rest:
            # A client may send frames right behind its request; they wait until the socket is bound.
            self._buf = bytearray(rest)
        self._queue = None
        task = self._shared.loop.create_task(self._run_asgi(scope, key))
        self._shared.tasks.add(task)
        task.add_done_callback(self._shared.tasks.discard)

    def _parse_request(self, head: bytes) -> tuple[dict[str, Any], bytes]:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[0] != b"GET" or not parts[2].startswith(b"HTTP/1."):
            raise _BadRequest(400, "a WebSocket upgrade must be GET … HTTP/1.1")
        headers: list[tuple[bytes, bytes]] = []
        fields: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise _BadRequest(400, "malformed header line")
            name = name.lower()
            value = value.strip()
            headers.append((name, value))
            fields[name] = fields[name] + b", " + value if name in fields else value
        if b"websocket" not in fields.get(b"upgrade", b"").lower():
            raise _BadRequest(400, "missing Upgrade: websocket")
        if b"upgrade" not in fields.get(b"connection", b"").lower():
            raise _BadRequest(400, "missing Connection: Upgrade")
        if fields.get(b"sec-websocket-version") != b"13":
            raise _BadRequest(426, "unsupported WebSocket version", [(b"Sec-WebSocket-Version", b"13")])
        key = fields.get(b"sec-websocket-key", b"")
        try:
            if len(base64.b64decode(key, validate=True)) != 16:
                raise ValueError
        except ValueError:
            raise _BadRequest(400, "invalid Sec-WebSocket-Key") from None
        target = parts[1].decode("latin-1")
        raw_path, _, query = target.partition("?")
        subprotocols: list[str] = []
        for name, value in headers:
            if name == b"sec-websocket-protocol":
                subprotocols.extend(p.strip() for p in value.decode("latin-1").split(",") if p.strip())
        shared = self._shared
        transport = self.transport
        scope: dict[str, Any] = {
            "type": "websocket",
            "asgi": {"version": shared.asgi_version, "spec_version": "2.4"},
            "http_version": "1.1",
            "scheme": "ws",
            "server": _addr(transport.get_extra_info("sockname")),
            "client": _addr(transport.get_extra_info("peername")),
            "root_path": shared.root_path,
            "path": shared.root_path + unquote(raw_path),
            "raw_path": shared.root_path.encode() + raw_path.encode("latin-1"),
            "query_string": query.encode("latin-1"),
            "headers": headers,
            "subprotocols": subprotocols,
            "state": shared.app_state.copy(),
            "extensions": {"websocket.http.response": {}, FAST_TRANSPORT_EXTENSION: self},
        }
        return scope, key

    def _reject(self, status: int, reason: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        body = reason.encode()
        extra = [*(headers or []), (b"content-type", b"text/plain; charset=utf-8")]
        self._write_response(status, extra, body)
        self._state = _CLOSED
        self.transport.close()

    def _write_response(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        from http import HTTPStatus

        try:
            phrase = HTTPStatus(status).phrase.encode()
        except ValueError:
            phrase = b""
        out = [b"HTTP/1.1 %d %s\r\n" % (status, phrase)]
        names = set()
        for name, value in [*self._shared.server_state.default_headers, *headers]:
            names.add(name.lower())
            out.append(name + b": " + value + b"\r\n")
        if b"content-length" not in names:
            out.append(b"content-length: %d\r\n" % len(body))
        out.append(b"connection: close\r\n\r\n")
        out.append(body)
        self.transport.write(b"".join(out))

    async def _run_asgi(self, scope: dict[str, Any], key: bytes) -> None:
        responded = False
        connected = False
        denial: list[bytes] = []
        denial_headers: list[tuple[bytes, bytes]] = []

        async def receive() -> dict[str, Any]:
            nonlocal connected
            if not connected:
                connected = True
                return {"type": "websocket.connect"}
            if self._queue is None:
                self._queue = asyncio.Queue()
                if self._state >= _CLOSING:
                    self._queue.put_nowait({"type": "websocket.disconnect", "code": CLOSE_ABNORMAL})
                elif self._buf:
                    self.data_received(b"")
            return await self._queue.get()

        async def send(message: dict[str, Any]) -> None:
            nonlocal responded
            kind = message["type"]
            if self._state == _ASGI and not responded:
                if kind == "websocket.accept":
                    responded = True
                    self._accept(key, message)
                    return
                if kind == "websocket.close":
                    responded = True
                    self._reject(403, "")
                    return
                if kind == "websocket.http.response.start":
                    responded = True
                    denial.append(b"%d" % message["status"])
                    denial_headers.extend((bytes(n), bytes(v)) for n, v in message.get("headers", []))
                    return
                raise RuntimeError(f"unexpected ASGI message before accept: {kind!r}")
            if denial and kind == "websocket.http.response.body":
                denial.append(message.get("body", b""))
                if not message.get("more_body", False):
                    status = int(denial[0])
                    self._write_response(status, denial_headers, b"".join(denial[1:]))
                    self._state = _CLOSED
                    self.transport.close()
                return
            if self._state != _OPEN:
                from uvicorn.protocols.utils import ClientDisconnected

                raise ClientDisconnected()
            if kind == "websocket.send":
                text = message.get("text")
                if text is not None:
                    self.enqueue(text.encode())
                else:
                    self._write_now(_frame(_OP_BINARY, message.get("bytes") or b""))
            elif kind == "websocket.close":
                self.start_close(message.get("code", CLOSE_NORMAL), message.get("reason") or "")

        try:
            await self._shared.app(scope, receive, send)
        except Exception:
            log.exception("Exception in ASGI application")
            if not responded:
                self._reject(500, "Internal Server Error")
            elif self._sock is None and self._state == _OPEN:
                self.start_close(CLOSE_INTERNAL, "internal error")
            return
        if not responded and self._state == _ASGI:
            log.error("ASGI callable returned without completing the WebSocket handshake")
            self._reject(500, "Internal Server Error")
        elif self._sock is None and self._state == _OPEN:
            self.start_close(CLOSE_NORMAL, "")

    def _accept(self, key: bytes, message: dict[str, Any]) -> None:
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        out = [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"]
        out.append(b"Sec-WebSocket-Accept: " + accept + b"\r\n")
        subprotocol = message.get("subprotocol")
        if subprotocol:
            out.append(b"Sec-WebSocket-Protocol: " + subprotocol.encode() + b"\r\n")
        for name, value in [*self._shared.server_state.default_headers, *message.get("headers", [])]:
            out.append(bytes(name) + b": " + bytes(value) + b"\r\n")
        out.append(b"\r\n")
        self.transport.write(b"".join(out))
        self._state = _OPEN

    # The Phoenix endpoint's side.

    def attach(
        self, *, max_buffer_bytes: int, stats: RealtimeStats, max_message_bytes: int | None = None
    ) -> PhoenixWebSocketProtocol:
        """Called by the endpoint once the handshake is accepted: this object is the socket's Outbound."""
        self._max_buffer = max_buffer_bytes
        self._stats = stats
        if max_message_bytes is not None:
            self._max_message = max_message_bytes
        return self

    def bind(self, sock: Socket, on_closed: SocketClosed) -> None:
        """From now on frames go straight to `sock`; `on_closed(sock)` runs once the connection ends.
        The endpoint's ASGI call returns right after this."""
        self._sock = sock
        self._on_closed = on_closed
        if self._state == _CLOSED:
            self._release_socket()
        elif self._buf:
            buf, self._buf = self._buf, None
            self.data_received(bytes(buf))

    def _release_socket(self) -> None:
        sock, on_closed = self._sock, self._on_closed
        self._sock = self._on_closed = None
        self._inbox = None
        if sock is None or on_closed is None:
            return
        sock.closed = True
        task = self._shared.loop.create_task(on_closed(sock))
        self._shared.tasks.add(task)
        task.add_done_callback(self._shared.tasks.discard)

    # Inbound frames.

    def _parse(self, data: bytes | bytearray) -> int:
        """Handle every complete frame in `data`; returns how many bytes were used. A frame that is
        refused is refused from its header, and its payload skipped, not read: the frame boundary is
        still known, so the client's close echo after it is found and nothing after the refusal is
        taken for another error."""
        pos = 0
        end = len(data)
        while end - pos >= 2 and self._state != _CLOSED:
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            head = pos + 2
            if length == 126:
                if end - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                head = pos + 4
            elif length == 127:
                if end - pos < 10:
                    break
                (length,) = struct.unpack_from("!Q", data, pos + 2)
                head = pos + 10
            opcode = b0 & 0x0F
            masked = b1 & 0x80
            stop = head + (4 if masked else 0) + length
            error: tuple[int, str] | None = None
            if b0 & 0x70:
                error = (CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension was negotiated)")
            elif not masked:
                error = (CLOSE_PROTOCOL_ERROR, "client frames must be masked")
            elif opcode >= 0x8:
                if opcode > _OP_PONG:
                    error = (CLOSE_PROTOCOL_ERROR, f"reserved control opcode {opcode:#x}")
                elif length > 125 or not b0 & 0x80:
                    error = (CLOSE_PROTOCOL_ERROR, "control frames must be unfragmented, at most 125 bytes")
            elif opcode > _OP_BINARY:
                error = (CLOSE_PROTOCOL_ERROR, f"reserved data opcode {opcode:#x}")
            elif self._state != _OPEN:
                error = (0, "")  # a data frame while closing: skipped unread
            else:
                size = length + (self._frag_size if self._frag else 0)
                if self._frag is not None and opcode == _OP_CONT and len(self._frag) >= MAX_FRAGMENTS:
                    if self._stats is not None:
                        self._stats.malformed_frames += 1
                    error = (CLOSE_POLICY, f"a message may come in at most {MAX_FRAGMENTS} frames")
                elif size > self._max_message:
                    if self._stats is not None:
                        self._stats.oversized_frames += 1
                    error = (CLOSE_TOO_BIG, f"frame of {size} bytes exceeds the limit of {self._max_message}")
            if error is not None:
                if error[0]:
                    self._fail(*error)
                if stop > end:
                    self._skip = stop - end
                    return end
                pos = stop
                continue
            if stop > end:
                break
            payload = apply_mask(data[head + 4 : stop], data[head : head + 4])
            pos = stop
            if opcode >= 0x8:
                self._control(opcode, payload)
            else:
                self._data_frame(opcode, b0 & 0x80, payload)
        return pos

    def _data_frame(self, opcode: int, fin: int, payload: bytes) -> None:
        if opcode == _OP_CONT:
            if self._frag is None:
                self._fail(CLOSE_PROTOCOL_ERROR, "continuation frame without a message to continue")
                return
            self._frag.append(payload)
            self._frag_size += len(payload)
            if not fin:
                return
            opcode, payload = self._frag_op, b"".join(self._frag)
            self._frag = None
            self._frag_size = 0
        elif self._frag is not None:
            self._fail(CLOSE_PROTOCOL_ERROR, "new message before the previous one was finished")
            return
        elif not fin:
            self._frag = [payload]
            self._frag_op = opcode
            self._frag_size = len(payload)
            return
        if opcode == _OP_TEXT:
            self._message(payload)
        else:
            self._message(None)  # binary: the socket refuses it (1003)
            if self._queue is not None and self._sock is None:
                self._queue.put_nowait({"type": "websocket.receive", "bytes": payload})

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == _OP_PING:
            if self._state == _OPEN:
                self._write_now(_frame(_OP_PONG, payload) if payload else _PONG_EMPTY)
        elif opcode == _OP_CLOSE:
            self._close_received(payload)

    def _close_received(self, payload: bytes) -> None:
        if self._state == _CLOSING:
            # The client answered our close: the closing handshake is complete.
            self._state = _CLOSED
            self.transport.close()
            return
        code = CLOSE_NO_STATUS
        reply = CLOSE_NORMAL
        reason = ""
        if len(payload) == 1:
            reply, reason = CLOSE_PROTOCOL_ERROR, "a close body is empty or a code and a reason"
        elif len(payload) >= 2:
            (code,) = struct.unpack_from("!H", payload)
            if not _valid_close_code(code):
                reply, reason = CLOSE_PROTOCOL_ERROR, f"close code {code} may not be sent"
            else:
                try:
                    payload[2:].decode()
                except UnicodeDecodeError:
                    reply, reason = CLOSE_INVALID_DATA, "invalid UTF-8 in the close reason"
                else:
                    reply = code
        if reason and self._stats is not None:  # a refusal (1002/1007), not an echo
            self._stats.malformed_frames += 1
        # Echo the close (RFC 6455 §5.5.1), or answer a broken one with 1002/1007, then hang up.
        self._flush()
        self.transport.write(close_frame(reply, reason))
        self._state = _CLOSED
        if self._sock is not None:
            self._sock.closed = True
        if self._queue is not None:
            self._queue.put_nowait({"type": "websocket.disconnect", "code": code})
        self.transport.close()

    def _message(self, payload: bytes | None) -> None:
        sock = self._sock
        if sock is None:
            if self._queue is not None and payload is not None:
                try:
                    self._queue.put_nowait({"type": "websocket.receive", "text": payload.decode()})
                except UnicodeDecodeError:
                    self._fail(CLOSE_INVALID_DATA, "invalid UTF-8 in a text frame")
            return
        inbox = self._inbox
        if inbox is not None:
            inbox.append(payload)
            if len(inbox) == INBOX_PAUSE:
                self.transport.pause_reading()
            return
        pending = self._receive(sock, payload)
        if pending is not None:
            self._inbox = deque()
            self._task = self._shared.loop.create_task(self._work(sock, pending))

    @staticmethod
    def _receive(sock: Socket, payload: bytes | None) -> Coroutine[Any, Any, None] | None:
        if payload is None:
            sock.handle_binary()
            return None
        return sock.receive(payload)

    async def _work(self, sock: Socket, pending: Coroutine[Any, Any, None]) -> None:
        """Awaits what one message left to do, then handles the messages that came in meanwhile."""
        try:
            while True:
                try:
                    await pending
                except Exception:
                    log.exception("socket message handling failed")
                inbox = self._inbox
                if inbox is None:
                    return
                next_pending = None
                while inbox and next_pending is None:
                    if len(inbox) == INBOX_PAUSE and self._state == _OPEN:
                        self.transport.resume_reading()
                    payload = inbox.popleft()
                    next_pending = self._receive(sock, payload)
                if next_pending is None:
                    self._inbox = None
                    return
                pending = next_pending
        finally:
            self._task = None

    def _fail(self, code: int, reason: str) -> None:
        if self._state != _OPEN:
            # Already closing (or not open yet): one refusal per connection is counted and answered.
            self.start_close(code, reason)
            return
        if self._stats is not None and code != CLOSE_TOO_BIG:
            self._stats.malformed_frames += 1
        if self._sock is not None:
            self._sock.closed = True
        self.start_close(code, reason)

    # Outbound: the Outbound interface of realtime.outbound.

    @property
    def closed(self) -> bool:
        return self._state >= _CLOSING

    def enqueue(self, data: bytes) -> None:
        """One message for this socket only (a reply, a push): written now unless frames are pending,
        in which case it goes behind them, so the client sees everything in order."""
        if self._state != _OPEN:
            return
        if self._pending is None:
            self._write_now(text_frame(data))
        else:
            self.enqueue_frame(text_frame(data), data)

    def enqueue_frame(self, frame: bytes, data: bytes) -> None:
        if self._state != _OPEN:
            return
        pending = self._pending
        if pending is None:
            self._pending = frame
            self._shared.flusher.add(self)
        elif type(pending) is bytes:
            self._pending = [pending, frame]
        else:
            pending.append(frame)  # type: ignore[union-attr]

    def _flush(self) -> None:
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        if self._state != _OPEN:
            return
        self._write_now(pending if type(pending) is bytes else b"".join(pending))  # type: ignore[arg-type]

    def _write_now(self, data: bytes) -> None:
        transport = self.transport
        # Judged by what was already waiting, so one large message (a big presence_state) on its
        # own never makes a client "slow"; a client still that far behind at the next one is.
        backlog = transport.get_write_buffer_size()
        transport.write(data)
        if self._stats is not None:
            self._stats.writes += 1
        if backlog > self._max_buffer:
            if self._stats is not None:
                self._stats.slow_consumers_dropped += 1
            self.start_close(
                CLOSE_SLOW_CONSUMER, f"slow consumer: more than {self._max_buffer} bytes waiting to be sent"
            )

    def start_close(self, code: int, reason: str) -> None:
        """Send a close frame (after whatever is pending) and wait up to CLOSE_TIMEOUT for the echo."""
        if self._state != _OPEN:
            if self._state == _ASGI:
                self._state = _CLOSED
                self.transport.close()
            return
        self._flush()
        self._state = _CLOSING
        self._frag = None
        if self._sock is not None:
            self._sock.closed = True
        self.transport.write(close_frame(code, reason))
        if self._queue is not None:
            self._queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.transport.resume_reading()
        self._close_timer = self._shared.loop.call_later(CLOSE_TIMEOUT, self._abort)

    def _abort(self) -> None:
        self._close_timer = None
        if self._stats is not None:
            self._stats.close_timeouts += 1
        self.transport.abort()

    def shutdown(self) -> None:
        """Server is stopping (SIGTERM): close with 1001 so clients reconnect to another node."""
        if self._state == _OPEN:
            self.start_close(CLOSE_GOING_AWAY, "server shutting down")
        elif self._state in (_HANDSHAKE, _ASGI):
            self._state = _CLOSED
            self.transport.close()


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers


def _frame(opcode: int, payload: bytes) -> bytes:
    length = len(payload)
    if length < 126:
        return bytes((0x80 | opcode, length)) + payload
    if length < 1 << 16:
        return struct.pack("!BBH", 0x80 | opcode, 126, length) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, length) + payload


def _valid_close_code(code: int) -> bool:
    """Codes an endpoint may send (RFC 6455 §7.4, IANA registry): 1005, 1006 and 1015 only describe
    a close, they are never sent; 1016-2999 are reserved; 3000-4999 are for libraries and apps."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def _addr(info: Any) -> tuple[str, int] | None:
    if isinstance(info, tuple | list) and len(info) >= 2:
        return str(info[0]), int(info[1])
    return None
