"""What the socket fuzz tests drive a real server with: a raw WebSocket client that writes any bytes
(masked or not, any opcode, split anywhere), a well-behaved witness client, and /metrics reading.

The raw client does the HTTP upgrade itself and speaks RFC 6455 framing directly, so a test can
send what no WebSocket library would (invalid UTF-8, reserved opcodes, unmasked or truncated frames).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from servers import PhxClient, ServerProcess, make_token

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

# Close codes the server documents (README "Backpressure and isolation", "The protocol") and the
# one RFC 6455 §7.4.1 gives a peer that breaks the framing rules.
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009


# Frames.


def mask_payload(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return payload
    n = len(payload)
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    mask: bool = True,
    rsv: int = 0,
    length: int | None = None,
) -> bytes:
    """One client frame. `length` overrides the announced payload length (for truncated frames)."""
    announced = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (rsv & 0x7) << 4 | (opcode & 0xF)
    mask_bit = 0x80 if mask else 0
    if announced < 126:
        header = bytes((first, mask_bit | announced))
    elif announced < 1 << 16:
        header = struct.pack("!BBH", first, mask_bit | 126, announced)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, announced)
    if not mask:
        return header + payload
    key = os.urandom(4)
    return header + key + mask_payload(payload, key)


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def fragments(opcode: int, payload: bytes, cuts: list[int]) -> list[bytes]:
    """`payload` as one message split at the byte offsets in `cuts` (anywhere, even inside a character)."""
    points = sorted({c for c in cuts if 0 < c < len(payload)})
    pieces = [payload[a:b] for a, b in zip([0, *points], [*points, len(payload)], strict=True)]
    out = []
    for i, piece in enumerate(pieces):
        out.append(frame(opcode if i == 0 else OP_CONT, piece, fin=i == len(pieces) - 1))
    return out


# The raw client.


class Closed(Exception):
    """The server ended the connection: with a close frame (`code`, `reason`) or without (code None)."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"closed by the server: code={code} reason={reason!r}")
        self.code = code
        self.reason = reason


@dataclass
class Received:
    opcode: int
    payload: bytes


@dataclass
class RawWebSocket:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pushes: list[list[Any]] = field(default_factory=list)
    pongs: list[bytes] = field(default_factory=list)
    close_sent: bool = False
    ended: bool = False  # the server closed (a close frame, EOF or a reset)

    @classmethod
    async def open_tcp(cls, port: int) -> RawWebSocket:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 24)
        return cls(reader, writer)

    @classmethod
    async def connect(cls, port: int, token: str) -> RawWebSocket:
        ws = await cls.open_tcp(port)
        try:
            await ws.handshake(token)
        except BaseException:
            ws.abort()
            raise
        return ws

    @staticmethod
    def upgrade_request(port: int, token: str, key: str) -> bytes:
        return (
            f"GET /socket/websocket?vsn=2.0.0&token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()

    async def handshake(self, token: str, timeout: float = 20.0) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        port = self.writer.get_extra_info("peername")[1]
        self.writer.write(self.upgrade_request(port, token, key))
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        status, *headers = head.decode("latin-1").split("\r\n")
        assert " 101 " in status, f"upgrade refused: {head!r}"
        accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()
        fields = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in headers if h)}
        assert fields.get("sec-websocket-accept") == accept, f"bad Sec-WebSocket-Accept in {head!r}"

    # Sending.

    async def send_raw(self, data: bytes) -> None:
        """Write bytes; a connection the server already closed raises Closed(None)."""
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            raise Closed(None, f"write failed: {exc!r}") from None

    async def send_frame(self, opcode: int, payload: bytes = b"", **kwargs: Any) -> None:
        if opcode == OP_CLOSE:
            self.close_sent = True
        await self.send_raw(frame(opcode, payload, **kwargs))

    async def send_text(self, data: str | bytes) -> None:
        await self.send_frame(OP_TEXT, data.encode() if isinstance(data, str) else data)

    async def send_json(self, message: Any) -> None:
        await self.send_text(orjson.dumps(message))

    # Receiving.

    async def read_frame(self, timeout: float) -> Received:
        """The next frame from the server; EOF or a reset raises Closed(None)."""
        try:
            async with asyncio.timeout(timeout):
                head = await self.reader.readexactly(2)
                length = head[1] & 0x7F
                if length == 126:
                    (length,) = struct.unpack("!H", await self.reader.readexactly(2))
                elif length == 127:
                    (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
                assert not head[1] & 0x80, "the server sent a masked frame (RFC 6455 §5.1 forbids it)"
                assert not head[0] & 0x70, f"the server set RSV bits: {head!r}"
                payload = await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self.ended = True
            raise Closed(None, f"connection ended: {exc!r}") from None
        return Received(head[0] & 0x0F, payload)

    async def receive(self, timeout: float) -> list[Any] | None:
        """The next Phoenix message; None for a pong (kept in `pongs`). A close frame raises Closed."""
        received = await self.read_frame(timeout)
        opcode, payload = received.opcode, received.payload
        if opcode == OP_TEXT:
            message: list[Any] = orjson.loads(payload)  # the server's own text must be valid JSON
            assert message[3] != "phx_error", f"a channel crashed: {message!r}"
            return message
        if opcode == OP_PONG:
            self.pongs.append(payload)
            return None
        if opcode == OP_CLOSE:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
            reason = payload[2:].decode()
            self.ended = True
            if not self.close_sent:
                with contextlib.suppress(Closed):  # complete the closing handshake, as a client must
                    await self.send_frame(OP_CLOSE, payload[:2])
            raise Closed(code, reason)
        raise AssertionError(f"unexpected frame from the server: opcode {opcode} {payload[:80]!r}")

    async def reply(self, ref: str, timeout: float = 20.0) -> dict[str, Any]:
        """The `phx_reply` to `ref` (pushes that come first are kept in `pushes`)."""
        deadline = time.monotonic() + timeout
        while True:
            message = await self.receive(max(0.01, deadline - time.monotonic()))
            if message is None:
                continue
            if message[3] == "phx_reply" and message[1] == ref:
                return dict(message[4])
            self.pushes.append(message)

    async def closed(self, timeout: float = 20.0) -> Closed:
        """Read until the server ends the connection; what it said (code None: no close frame)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                message = await self.receive(max(0.01, deadline - time.monotonic()))
            except Closed as closed:
                return closed
            except TimeoutError:
                raise AssertionError(f"the server left the connection open for {timeout}s") from None
            if message is not None:
                self.pushes.append(message)

    async def eof(self, timeout: float = 20.0) -> None:
        """Wait until the server has closed the TCP connection."""
        async with asyncio.timeout(timeout):
            with contextlib.suppress(ConnectionError):
                while await self.reader.read(65536):
                    pass

    def abort(self) -> None:
        """Drop the connection with a TCP reset (SO_LINGER 0), as a crashed client or a NAT would."""
        sock = self.writer.get_extra_info("socket")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    def close(self) -> None:
        self.writer.transport.abort()


# Metrics.


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {'name{labels}': value}."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def metrics(server: ServerProcess) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=20) as http:
        response = await http.get(f"{server.http}/metrics")
    assert response.status_code == 200, response.text
    return parse_metrics(response.text)


async def until_metric(
    server: ServerProcess, name: str, predicate: Callable[[float], bool], timeout: float = 30.0
) -> float:
    """Poll /metrics until `predicate(value of name)` holds; the last value otherwise fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = (await metrics(server)).get(name)
        if value is not None and predicate(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} = {value} did not reach the expected value in {timeout}s")
        await asyncio.sleep(0.2)


# Log lines that mean the server mishandled input (a handler raised, an ASGI task died).
CRASH_MARKERS = (
    "Exception in ASGI application",
    "crashed:",
    "Task exception was never retrieved",
    "socket message handling failed",
    "realtime sweep failed",
)


def crash_lines(server: ServerProcess) -> list[str]:
    return [line for line in server.log().splitlines() if any(m in line for m in CRASH_MARKERS)]


# The witness.


class Witness:
    """A well-behaved client joined to its own `user:` topic while others misbehave.

    Every broadcast published to it carries a sequence number; `check` proves that each one arrived,
    once and in order, and that its heartbeats are answered.
    """

    def __init__(self, server: ServerProcess, user: str = "witness", heartbeat_every: float = 0.0) -> None:
        self.server = server
        self.user = user
        self.topic = f"user:{user}"
        self.heartbeat_every = heartbeat_every
        self.published = 0
        self.heartbeats = 0
        self._last_heartbeat = 0.0
        self.client: PhxClient | None = None
        self.http: httpx.AsyncClient | None = None

    async def start(self) -> Witness:
        self.client = await PhxClient.connect(self.server.ws_url(make_token(self.user)), max_size=None)
        assert (await self.client.join(self.topic))["status"] == "ok"
        admin = make_token("admin-fuzz", "admin")
        self.http = httpx.AsyncClient(
            base_url=self.server.http, headers={"authorization": f"Bearer {admin}"}, timeout=20
        )
        return self

    async def publish(self, count: int = 1, pad: int = 0) -> None:
        assert self.http is not None
        for _ in range(count):
            payload: dict[str, Any] = {"seq": self.published}
            if pad:
                payload["pad"] = "w" * pad
            body = {"topic": self.topic, "event": "tick", "payload": payload}
            response = await self.http.post("/api/publish", json=body)
            assert response.status_code == 202, response.text
            self.published += 1

    def received(self) -> list[int]:
        assert self.client is not None
        return [frame[4]["seq"] for frame in self.client.frames if frame[3] == "tick"]

    async def heartbeat(self, force: bool = False) -> None:
        """Send a heartbeat (at most one per `heartbeat_every` seconds unless forced) and check the reply."""
        assert self.client is not None
        now = time.monotonic()
        if not force and now - self._last_heartbeat < self.heartbeat_every:
            return
        self._last_heartbeat = now
        reply = await self.client.request("phoenix", "heartbeat", {})
        assert reply == {"status": "ok", "response": {}}, f"witness heartbeat answered {reply!r}"
        self.heartbeats += 1

    async def check(self, timeout: float = 30.0) -> None:
        """Everything published so far arrived, in order, exactly once."""
        assert self.client is not None
        if self.published:
            last = self.published - 1
            try:
                await self.client.wait_for(lambda f: f[3] == "tick" and f[4]["seq"] == last, timeout)
            except TimeoutError:
                pass  # reported below with what did arrive
        got = self.received()
        assert got == list(range(self.published)), (
            f"witness lost or reordered broadcasts: {self.published} published, {len(got)} received, "
            f"missing {sorted(set(range(self.published)) - set(got))[:20]}"
        )

    @property
    def lost(self) -> int:
        return self.published - len(set(self.received()))

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.http is not None:
            await self.http.aclose()


# The rig: one server, one witness and one event loop across every hypothesis example.


class FuzzRig:
    """Runs attacks against a server one example at a time, checking after each that the server
    is up and the witness has lost nothing.

    Hypothesis calls examples synchronously, so the rig keeps one asyncio loop (an `asyncio.Runner`)
    for the whole test: the witness connection stays open from the first example to the last.
    """

    # The witness lives under the same per-socket rate limit as everybody (50/s by default): one
    # heartbeat per 50 ms at most keeps it well inside, however fast the examples run.
    def __init__(self, server: ServerProcess, impl: str, heartbeat_every: float = 0.05) -> None:
        self.server = server
        self.impl = impl
        self.runner = asyncio.Runner()
        self.witness = Witness(server, heartbeat_every=heartbeat_every)
        self.inputs: Counter[str] = Counter()
        self.baseline: dict[str, float] = {}

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 90.0) -> Any:
        return self.runner.run(asyncio.wait_for(coro, timeout))

    def start(self) -> FuzzRig:
        self.run(self.witness.start())
        self.baseline = self.run(metrics(self.server))
        return self

    def example(self, category: str, attack: Callable[[], Awaitable[None]], what: str = "") -> None:
        """One input: run `attack` while a broadcast goes to the witness, then check the witness.
        `what` describes the input in a failure report."""
        self.inputs[category] += 1
        try:
            self.run(self._example(attack))
        except BaseException as exc:
            exc.add_note(f"input ({category}): {what[:2000]}")
            raise
        assert self.server.proc is not None and self.server.proc.poll() is None, (
            f"the server died:\n{self.server.log()[-4000:]}"
        )

    async def _example(self, attack: Callable[[], Awaitable[None]]) -> None:
        during = asyncio.create_task(self.witness.publish())
        try:
            await attack()
        finally:
            await during
        await self.witness.publish()
        await self.witness.heartbeat()
        await self.witness.check()

    def finish(self) -> dict[str, float]:
        """End of the test: the server is healthy, nothing crashed, every attacker's socket is gone."""
        return dict(self.run(self._finish()))

    async def _finish(self) -> dict[str, float]:
        await self.witness.heartbeat(force=True)
        await self.witness.check()
        async with httpx.AsyncClient(timeout=20) as http:
            assert (await http.get(f"{self.server.http}/healthz")).status_code == 200
        # Only the witness is left once the closing handshakes (or their 5-10 s aborts) are over.
        await until_metric(self.server, "viral_realtime_sockets", lambda v: v == 1, timeout=45)
        after = await metrics(self.server)
        assert after["viral_realtime_channel_crashes_total"] == 0, "a channel handler raised"
        assert crash_lines(self.server) == [], "\n".join(crash_lines(self.server)[:10])
        return after

    def report(self, after: dict[str, float], outcomes: Counter[str] | None = None) -> str:
        counters = [
            "malformed_frames",
            "oversized_frames",
            "rate_limited",
            "joins_refused",
            "slow_consumers_dropped",
        ]
        grew = {
            name: after[f"viral_realtime_{name}_total"] - self.baseline[f"viral_realtime_{name}_total"]
            for name in counters
        }
        deltas = ", ".join(f"{name} +{value:g}" for name, value in grew.items())
        inputs = ", ".join(f"{category}: {n}" for category, n in sorted(self.inputs.items()))
        assert self.server.proc is not None
        exits = int(self.server.proc.poll() is not None)
        line = (
            f"[socket fuzz {self.impl}] inputs {inputs}; server exits {exits}, "
            f"crashes logged {len(crash_lines(self.server))}; witness: "
            f"{self.witness.published} broadcasts, {self.witness.lost} lost, "
            f"{self.witness.heartbeats} heartbeats answered; {deltas}"
        )
        if outcomes:
            line += "; outcomes " + ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items()))
        print(line)
        return line

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self.witness.close(), timeout=10)
        self.runner.close()
