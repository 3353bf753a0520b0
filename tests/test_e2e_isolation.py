"""One client's mistakes or slowness never hurt another client or the process."""

from __future__ import annotations

import asyncio
import base64
import os
import socket

import httpx
import orjson
import pytest
import websockets
from servers import make_token, recv_json, send_json
from websockets.exceptions import ConnectionClosed


async def _joined(server, user: str):
    ws = await websockets.connect(server.ws_url(make_token(user)), max_size=None)
    await send_json(ws, ["1", "1", f"user:{user}", "phx_join", {}])
    assert (await recv_json(ws))[4]["status"] == "ok"
    return ws


@pytest.mark.parametrize(
    ("bad_frame", "code", "reason"),
    [
        ("this is not json", 1007, "not valid JSON"),
        ('{"topic": "user:x"}', 1007, "JSON array"),
        ('["1", "1", "user:x"]', 1007, "5 elements"),
        (b"\x00\x01binary", 1003, "binary frames are not supported"),
        (
            orjson.dumps([None, "1", "phoenix", "heartbeat", {"pad": "x" * 100_000}]).decode(),
            1009,
            "exceeds the limit",
        ),
    ],
)
async def test_bad_frame_closes_only_the_sender(server, bad_frame, code, reason):
    healthy = await _joined(server, "good")
    try:
        async with websockets.connect(server.ws_url(make_token("bad"))) as attacker:
            await attacker.send(bad_frame)
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(attacker.recv(), 5)
            assert info.value.rcvd.code == code
            assert reason in info.value.rcvd.reason
        for n in range(3):
            assert (await asyncio.to_thread(server.publish, "user:good", "tick", {"n": n})).status_code == 202
        assert [(await recv_json(healthy))[4]["n"] for _ in range(3)] == [0, 1, 2]
        assert (await asyncio.to_thread(httpx.get, f"{server.http}/healthz")).status_code == 200
    finally:
        await healthy.close()


def _raw_stalled_client(port: int, token: str) -> socket.socket:
    """A real WebSocket client that joins, then never reads again (its receive buffer kept tiny)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /socket/websocket?vsn=2.0.0&token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert b" 101 " in response.split(b"\r\n", 1)[0]
    payload = orjson.dumps(["1", "1", "user:u1", "phx_join", {}])
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
    return sock


def _slow_dropped(server) -> float:
    for line in httpx.get(f"{server.http}/metrics").text.splitlines():
        if line.startswith("viral_realtime_slow_consumers_dropped_total "):
            return float(line.split()[1])
    raise AssertionError("metric missing")


async def test_slow_consumer_is_dropped_while_a_healthy_one_gets_everything_in_order(server_factory, ws_impl):
    limits = {"WS_OUTBOUND_MAX_BYTES": str(256 * 1024), "WS_OUTBOUND_MAX_MESSAGES": "64"}
    server = server_factory(limits, args=("--ws", ws_impl))
    stalled = await asyncio.to_thread(_raw_stalled_client, server.port, make_token("u1"))
    healthy = await _joined(server, "u1")  # the same user in a second tab: same topic
    received: list[int] = []

    async def read_all() -> None:
        while True:
            frame = await recv_json(healthy, timeout=30)
            if frame[3] == "tick":
                received.append(frame[4]["n"])
                if frame[4].get("last"):
                    return

    reader = asyncio.create_task(read_all())
    pad = "x" * 16_000
    sent = 0
    async with httpx.AsyncClient(base_url=server.http) as http:
        headers = {"authorization": f"Bearer {make_token('admin-1', 'admin')}"}
        while await asyncio.to_thread(_slow_dropped, server) < 1:
            assert sent < 4000, "the stalled client was never dropped"
            for _ in range(50):
                body = {"topic": "user:u1", "event": "tick", "payload": {"n": sent, "pad": pad}}
                assert (await http.post("/api/publish", json=body, headers=headers)).status_code == 202
                sent += 1
        body = {"topic": "user:u1", "event": "tick", "payload": {"n": sent, "last": True}}
        assert (await http.post("/api/publish", json=body, headers=headers)).status_code == 202
        sent += 1
    await asyncio.wait_for(reader, 60)
    assert received == list(range(sent))
    assert await asyncio.to_thread(_slow_dropped, server) == 1
    # The stalled client finds its connection closed once it reads again: a close frame or a reset.
    stalled.settimeout(15)
    ended = False
    try:
        while stalled.recv(1 << 20):
            pass
        ended = True
    except ConnectionResetError:
        ended = True
    except TimeoutError:
        pass
    finally:
        stalled.close()
    assert ended, "the slow consumer's connection was left open"
    await healthy.close()


async def test_one_large_message_does_not_make_a_reading_client_slow(server_factory, ws_impl):
    # A real client on a real network takes a big frame in segments; loopback takes it at once.
    # A small limit makes the single frame far larger than it, as a 10,000-user presence_state is.
    server = server_factory({"WS_OUTBOUND_MAX_BYTES": "65536"}, args=("--ws", ws_impl))
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1448)  # an Ethernet-sized segment, not loopback's
    sock.connect(("127.0.0.1", server.port))
    client = await websockets.connect(server.ws_url(make_token("u1")), sock=sock, max_size=None)
    await send_json(client, ["1", "1", "user:u1", "phx_join", {}])
    assert (await recv_json(client))[4]["status"] == "ok"
    try:
        big = {"blob": "x" * 400_000}
        async with httpx.AsyncClient(base_url=server.http) as http:
            headers = {"authorization": f"Bearer {make_token('admin-1', 'admin')}"}
            body = {"topic": "user:u1", "event": "big", "payload": big}
            assert (await http.post("/api/publish", json=body, headers=headers)).status_code == 202
        frame = await recv_json(client, timeout=10)
        assert frame[3] == "big" and len(frame[4]["blob"]) == 400_000
        assert await asyncio.to_thread(_slow_dropped, server) == 0
    finally:
        await client.close()
