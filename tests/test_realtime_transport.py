"""The lean WebSocket protocol (realtime.uvicorn_protocol) at the byte level, over real TCP.

A raw asyncio client does the upgrade and writes frames by hand, so every RFC 6455 rule the
server enforces is exercised exactly: masking, reserved bits, opcodes, control-frame limits,
fragmentation, size limits read from the header, invalid UTF-8, both closing handshakes, ping/pong.
The in-process tests also check the design property the protocol exists for: no task per socket.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvicorn
from servers import SECRET, ServerProcess, free_port, make_token
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.speedups import apply_mask

from realtime import uvicorn_protocol
from web.app import create_app
from web.cli import uvicorn_options
from web.config import Settings

pytestmark = pytest.mark.asyncio


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def upgrade(
        cls, port: int, path: str, *, headers: dict[str, str] | None = None
    ) -> tuple[RawClient, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        fields = {
            "Host": f"127.0.0.1:{port}",
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": key,
            "Sec-WebSocket-Version": "13",
            **(headers or {}),
        }
        request = (
            f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items() if v) + "\r\n"
        )
        writer.write(request.encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        return cls(reader, writer), head

    def send_frame(
        self, opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0
    ) -> None:
        b0 = (0x80 if fin else 0) | rsv | opcode
        length = len(payload)
        if length < 126:
            head = bytes((b0, (0x80 if mask else 0) | length))
        elif length < 1 << 16:
            head = struct.pack("!BBH", b0, (0x80 if mask else 0) | 126, length)
        else:
            head = struct.pack("!BBQ", b0, (0x80 if mask else 0) | 127, length)
        if mask:
            key = os.urandom(4)
            self.writer.write(head + key + apply_mask(payload, key))
        else:
            self.writer.write(head + payload)

    def send_json(self, message: list[Any]) -> None:
        self.send_frame(0x1, orjson.dumps(message))

    async def read_frame(self, timeout: float = 10.0) -> tuple[int, bytes]:
        async def read() -> tuple[int, bytes]:
            b0, b1 = await self.reader.readexactly(2)
            length = b1 & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
            assert not b1 & 0x80, "server frames are never masked"
            return b0 & 0x0F, await self.reader.readexactly(length)

        return await asyncio.wait_for(read(), timeout)

    async def read_json(self, timeout: float = 10.0) -> Any:
        while True:
            opcode, payload = await self.read_frame(timeout)
            if opcode == 0x1:
                return orjson.loads(payload)
            assert opcode != 0x8, f"closed: {close_code(payload)}"

    async def read_close(self, timeout: float = 10.0) -> tuple[int, str]:
        while True:
            opcode, payload = await self.read_frame(timeout)
            if opcode == 0x8:
                return close_code(payload)

    async def eof(self, timeout: float = 10.0) -> bool:
        """True once the server has hung up (whatever it sent before that is read and dropped)."""
        try:
            await asyncio.wait_for(self.reader.read(), timeout)
        except ConnectionError:
            pass
        return self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


def close_code(payload: bytes) -> tuple[int, str]:
    if len(payload) < 2:
        return 1005, ""
    return struct.unpack("!H", payload[:2])[0], payload[2:].decode()


@pytest.fixture(scope="module")
def fast_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("transport")
    server = ServerProcess(Path(tmp), env={"WS_MAX_FRAME_BYTES": "4096"}, args=("--ws", "fast")).start()
    yield server
    server.terminate()


def socket_path(user: str = "u1") -> str:
    return f"/socket/websocket?vsn=2.0.0&token={make_token(user)}"


async def joined(port: int, user: str = "u1") -> RawClient:
    client, head = await RawClient.upgrade(port, socket_path(user))
    assert head.startswith(b"HTTP/1.1 101"), head
    client.send_json(["1", "1", f"user:{user}", "phx_join", {}])
    reply = await client.read_json()
    assert reply[3] == "phx_reply" and reply[4]["status"] == "ok", reply
    return client


# The opening handshake.


async def test_upgrade_answers_101_with_the_rfc_accept_key(fast_server: ServerProcess) -> None:
    import hashlib

    reader, writer = await asyncio.open_connection("127.0.0.1", fast_server.port)
    key = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3's example
    writer.write(
        (
            f"GET {socket_path()} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: phoenix\r\n\r\n"
        ).encode()
    )
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode().lower()
    writer.close()
    assert head.startswith("http/1.1 101")
    expected = base64.b64encode(hashlib.sha1(key.encode() + uvicorn_protocol.WS_GUID).digest()).decode()
    assert expected == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert f"sec-websocket-accept: {expected.lower()}" in head
    assert "sec-websocket-protocol: phoenix" in head


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Sec-WebSocket-Version": "8"}, b"426"),
        ({"Sec-WebSocket-Key": "not base64!"}, b"400"),
        ({"Sec-WebSocket-Key": base64.b64encode(b"short").decode()}, b"400"),
    ],
)
async def test_bad_handshakes_are_refused_with_a_status(
    fast_server: ServerProcess, headers: dict[str, str], status: bytes
) -> None:
    client, head = await RawClient.upgrade(fast_server.port, socket_path(), headers=headers)
    assert head.split(b" ")[1] == status, head
    if status == b"426":
        assert b"sec-websocket-version: 13" in head.lower()
    assert await client.eof()


async def test_a_refused_token_gets_the_endpoint_json_denial(fast_server: ServerProcess) -> None:
    client, head = await RawClient.upgrade(fast_server.port, "/socket/websocket?vsn=2.0.0&token=forged")
    assert head.startswith(b"HTTP/1.1 403"), head
    body = await client.reader.read()
    assert orjson.loads(body)["error"]


# Frames in.


async def test_fragmented_text_message_is_reassembled(fast_server: ServerProcess) -> None:
    client = await joined(fast_server.port)
    data = orjson.dumps([None, "7", "phoenix", "heartbeat", {}])
    client.send_frame(0x1, data[:5], fin=False)
    client.send_frame(0x9, b"mid")  # a control frame may come between fragments
    client.send_frame(0x0, data[5:12], fin=False)
    client.send_frame(0x0, data[12:], fin=True)
    opcode, payload = await client.read_frame()
    assert (opcode, payload) == (0xA, b"mid")
    reply = await client.read_json()
    assert reply[1] == "7" and reply[4]["status"] == "ok"
    client.close()


async def test_frames_split_across_reads_and_many_in_one_read(fast_server: ServerProcess) -> None:
    client = await joined(fast_server.port)
    many = b""
    for ref in range(20):
        key = os.urandom(4)
        body = orjson.dumps([None, str(ref), "phoenix", "heartbeat", {}])
        many += bytes((0x81, 0x80 | len(body))) + key + apply_mask(body, key)
    for i in range(0, len(many), 7):  # 7-byte dribbles: headers and masks cut everywhere
        client.writer.write(many[i : i + 7])
        await client.writer.drain()
    refs = [(await client.read_json())[1] for _ in range(20)]
    assert refs == [str(r) for r in range(20)]
    client.close()


async def test_ping_with_payload_is_answered_with_the_same_payload(fast_server: ServerProcess) -> None:
    client = await joined(fast_server.port)
    client.send_frame(0x9, b"are you there")
    assert await client.read_frame() == (0xA, b"are you there")
    client.send_frame(0xA, b"unsolicited pong is ignored")
    client.send_json([None, "2", "phoenix", "heartbeat", {}])
    assert (await client.read_json())[1] == "2"
    client.close()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"opcode": 0x1, "payload": b"[]", "mask": False}, 1002),
        ({"opcode": 0x1, "payload": b"[]", "rsv": 0x40}, 1002),
        ({"opcode": 0x3, "payload": b"x"}, 1002),
        ({"opcode": 0x9, "payload": b"x" * 126}, 1002),
        ({"opcode": 0x9, "payload": b"x", "fin": False}, 1002),
        ({"opcode": 0x0, "payload": b"x"}, 1002),
        ({"opcode": 0x1, "payload": b'[null,"1","phoenix","heartbeat",{"x":"\xff\xfe"}]'}, 1007),
        ({"opcode": 0x2, "payload": b"\x00\x01"}, 1003),
    ],
    ids=["unmasked", "rsv", "opcode", "long-ping", "fragmented-ping", "stray-continuation", "utf8", "binary"],
)
async def test_protocol_errors_close_only_that_socket(
    fast_server: ServerProcess, frame: dict[str, Any], code: int
) -> None:
    witness = await joined(fast_server.port, "witness")
    client = await joined(fast_server.port, "offender")
    client.send_frame(**frame)
    assert (await client.read_close())[0] == code
    client.send_frame(0x8, struct.pack("!H", code))
    assert await client.eof()
    witness.send_json([None, "9", "phoenix", "heartbeat", {}])
    assert (await witness.read_json())[1] == "9"
    witness.close()


async def test_an_oversized_message_is_refused_from_its_header(fast_server: ServerProcess) -> None:
    client = await joined(fast_server.port)
    # Announce 10 MB but send only the header and mask: the server must not wait for the payload.
    client.writer.write(struct.pack("!BBQ", 0x81, 0x80 | 127, 10_000_000) + os.urandom(4))
    code, reason = await client.read_close()
    assert code == 1009 and "exceeds the limit of 4096" in reason
    client.close()


async def test_an_oversized_fragmented_message_is_refused(fast_server: ServerProcess) -> None:
    client = await joined(fast_server.port)
    client.send_frame(0x1, b"[" + b" " * 3000, fin=False)
    client.send_frame(0x0, b" " * 3000, fin=False)
    assert (await client.read_close())[0] == 1009
    client.close()


async def test_a_flood_of_continuation_frames_is_closed_without_delaying_anyone(
    fast_server: ServerProcess,
) -> None:
    # 40,000 empty continuation frames: each one used to make the parser re-add every fragment so far.
    witness = await joined(fast_server.port, "witness")
    client = await joined(fast_server.port, "flooder")
    key = os.urandom(4)
    empty = bytes((0x00, 0x80)) + key
    client.writer.write(bytes((0x01, 0x81)) + key + apply_mask(b"[", key) + empty * 40_000)
    started = time.monotonic()
    witness.send_json([None, "9", "phoenix", "heartbeat", {}])
    assert (await witness.read_json())[1] == "9"
    code, reason = await client.read_close()
    assert code == 1008 and "at most 64 frames" in reason
    assert time.monotonic() - started < 5  # the flood is refused at its 65th frame, not parsed to the end
    witness.close()
    client.close()


async def test_a_message_in_64_fragments_is_still_a_message(fast_server: ServerProcess) -> None:
    client = await joined(fast_server.port)
    data = orjson.dumps([None, "8", "phoenix", "heartbeat", {}])
    client.send_frame(0x1, data[:1], fin=False)
    for _ in range(62):
        client.send_frame(0x0, b"", fin=False)
    client.send_frame(0x0, data[1:], fin=True)
    assert (await client.read_json())[1] == "8"
    client.close()


# Closing.


async def test_client_close_is_echoed_then_the_server_hangs_up(fast_server: ServerProcess) -> None:
    client = await joined(fast_server.port)
    client.send_frame(0x8, struct.pack("!H", 1000) + b"bye")
    assert (await client.read_close())[0] == 1000
    assert await client.eof()


async def test_server_close_waits_for_the_echo(fast_server: ServerProcess) -> None:
    client = await joined(fast_server.port)
    client.send_frame(0x1, b"not json")
    code, reason = await client.read_close()
    assert code == 1007 and reason.startswith("malformed frame")
    client.send_frame(0x8, struct.pack("!H", code))
    assert await client.eof()


# Out: order and batching.


async def test_replies_and_broadcasts_keep_their_order(fast_server: ServerProcess) -> None:
    client = await joined(fast_server.port)

    async def publish(n: int) -> None:
        await asyncio.to_thread(fast_server.publish, "user:u1", "tick", {"n": n})

    for n in range(30):
        await publish(n)
        client.send_json([None, f"h{n}", "phoenix", "heartbeat", {}])
    seen: list[Any] = []
    while len(seen) < 60:
        message = await client.read_json()
        seen.append(message[4]["n"] if message[3] == "tick" else message[1])
    ticks = [x for x in seen if isinstance(x, int)]
    replies = [x for x in seen if isinstance(x, str)]
    assert ticks == list(range(30))
    assert replies == [f"h{n}" for n in range(30)]
    client.close()


# In-process: the design property, and the plain-ASGI fallback for other WebSocket routes.


async def _serve(app: Any, port: int) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    settings = Settings.from_env({"SECRET_KEY": SECRET, "DATABASE_URL": "sqlite+aiosqlite:///:memory:"})
    options = {k: v for k, v in uvicorn_options(settings).items() if k not in ("loop",)}
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", **options)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    return server, task


async def test_no_task_stays_behind_per_socket(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "SECRET_KEY": SECRET,
            "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/v.db",
            "BROKER_URL": "memory://",
        }
    )
    from store import migrate

    await asyncio.to_thread(migrate.upgrade, settings.database_url)
    port = free_port()
    server, task = await _serve(create_app(settings), port)
    try:
        await asyncio.sleep(0.5)
        before = len(asyncio.all_tasks())
        clients = [await joined(port, f"t{i}") for i in range(40)]
        for client in clients:
            client.send_json([None, "hb", "phoenix", "heartbeat", {}])
            assert (await client.read_json())[1] == "hb"
        await asyncio.sleep(0.2)
        after = len(asyncio.all_tasks())
        assert after - before < 5, f"{after - before} tasks for 40 sockets"
        for client in clients:
            client.close()
    finally:
        server.should_exit = True
        await task


async def test_broadcasts_in_one_tick_leave_in_one_write(tmp_path: Path) -> None:
    """Per-tick batching, seen in the counters /metrics exports: five broadcasts published in the same
    event-loop tick reach a socket as five frames in one write (viral_realtime_writes_total)."""
    settings = Settings.from_env(
        {
            "SECRET_KEY": SECRET,
            "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/v.db",
            "BROKER_URL": "memory://",
        }
    )
    from store import migrate

    await asyncio.to_thread(migrate.upgrade, settings.database_url)
    port = free_port()
    app = create_app(settings)
    server, task = await _serve(app, port)
    try:
        client = await joined(port, "batch")
        stats = app.state.endpoint.stats
        writes, frames = stats.writes, stats.frames_out
        for n in range(5):  # no await in between: one tick
            app.state.endpoint.hub.push_local("user:batch", "tick", {"n": n})
        assert [(await client.read_json())[4]["n"] for _ in range(5)] == list(range(5))
        assert (stats.frames_out - frames, stats.writes - writes) == (5, 1)
        for n in range(3):  # one per tick: one write each
            app.state.endpoint.hub.push_local("user:batch", "tick", {"n": n})
            assert (await client.read_json())[4]["n"] == n
        assert (stats.frames_out - frames, stats.writes - writes) == (8, 4)
        client.close()
    finally:
        server.should_exit = True
        await task


async def test_a_plain_asgi_websocket_route_still_works() -> None:
    async def echo(ws: WebSocket) -> None:
        await ws.accept()
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") == "close":
                await ws.close(4000, "asked to")
                return
            await ws.send_text("echo:" + message["text"])

    port = free_port()
    server, task = await _serve(Starlette(routes=[WebSocketRoute("/echo", echo)]), port)
    try:
        client, head = await RawClient.upgrade(port, "/echo")
        assert head.startswith(b"HTTP/1.1 101")
        client.send_frame(0x1, b"hello")
        assert await client.read_frame() == (0x1, b"echo:hello")
        client.send_frame(0x1, b"close")
        assert await client.read_close() == (4000, "asked to")
        client.close()
        missing, head = await RawClient.upgrade(port, "/nowhere")
        assert head.startswith(b"HTTP/1.1 403"), head
        missing.close()
    finally:
        server.should_exit = True
        await task


async def test_a_full_node_refuses_upgrades_with_503_and_keeps_serving(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, env={"WS_MAX_SOCKETS": "3"}, args=("--ws", "fast")).start()
    try:
        clients = [await joined(server.port, f"full{i}") for i in range(3)]
        refused, head = await RawClient.upgrade(server.port, socket_path("full3"))
        assert head.startswith(b"HTTP/1.1 503"), head
        assert "maximum of 3 sockets" in orjson.loads(await refused.reader.read())["error"]
        # The sockets already there, and plain HTTP, are unaffected.
        clients[0].send_json([None, "hb", "phoenix", "heartbeat", {}])
        assert (await clients[0].read_json())[1] == "hb"
        assert (await asyncio.to_thread(server.publish, "user:full1", "tick", {"n": 1})).status_code == 202
        assert (await clients[1].read_json())[4] == {"n": 1}
        # One leaves: there is room again.
        clients[2].send_frame(0x8, struct.pack("!H", 1000))
        assert await clients[2].eof()
        await asyncio.sleep(0.3)
        again = await joined(server.port, "full3")
        again.close()
        for client in clients[:2]:
            client.close()
    finally:
        server.terminate()
