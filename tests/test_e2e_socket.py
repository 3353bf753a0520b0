"""The socket protocol over a real WebSocket against a real `viral-engine serve` process."""

from __future__ import annotations

import asyncio
import base64

import httpx
import pytest
import websockets
from servers import make_token, recv_json, send_json
from websockets.exceptions import ConnectionClosed, InvalidStatus


async def test_join_own_user_topic_and_receive_a_publish(server):
    async with websockets.connect(server.ws_url(make_token("u1"))) as ws:
        await send_json(ws, ["1", "1", "user:u1", "phx_join", {}])
        assert await recv_json(ws) == ["1", "1", "user:u1", "phx_reply", {"status": "ok", "response": {}}]
        response = await asyncio.to_thread(server.publish, "user:u1", "nudge", {"text": "study?"})
        assert response.status_code == 202
        assert response.json()["local_subscribers"] == 1
        assert await recv_json(ws) == [None, None, "user:u1", "nudge", {"text": "study?"}]


async def test_heartbeat_is_answered(server):
    async with websockets.connect(server.ws_url(make_token("u1"))) as ws:
        await send_json(ws, [None, "7", "phoenix", "heartbeat", {}])
        assert await recv_json(ws) == [None, "7", "phoenix", "phx_reply", {"status": "ok", "response": {}}]


async def test_leave_replies_then_closes_and_stops_pushes(server):
    async with websockets.connect(server.ws_url(make_token("u1"))) as ws:
        await send_json(ws, ["1", "1", "user:u1", "phx_join", {}])
        await recv_json(ws)
        await send_json(ws, ["1", "2", "user:u1", "phx_leave", {}])
        assert await recv_json(ws) == ["1", "2", "user:u1", "phx_reply", {"status": "ok", "response": {}}]
        assert await recv_json(ws) == ["1", "1", "user:u1", "phx_close", {}]
        await asyncio.to_thread(server.publish, "user:u1", "nudge", {})
        await send_json(ws, [None, "3", "phoenix", "heartbeat", {}])
        assert (await recv_json(ws))[1] == "3"  # the heartbeat reply, not the nudge


async def test_unknown_topic_is_unmatched(server):
    async with websockets.connect(server.ws_url(make_token("u1"))) as ws:
        await send_json(ws, ["1", "1", "classroom:9", "phx_join", {}])
        assert await recv_json(ws) == [
            "1",
            "1",
            "classroom:9",
            "phx_reply",
            {"status": "error", "response": {"reason": "unmatched topic"}},
        ]


async def test_joining_another_users_topic_is_unauthorized(server):
    async with websockets.connect(server.ws_url(make_token("u1"))) as ws:
        await send_json(ws, ["1", "1", "user:u2", "phx_join", {}])
        reply = await recv_json(ws)
        assert reply[4] == {"status": "error", "response": {"reason": "unauthorized"}}


async def test_admin_may_join_any_user_topic(server):
    async with websockets.connect(server.ws_url(make_token("root", "admin"))) as ws:
        await send_json(ws, ["1", "1", "user:u2", "phx_join", {}])
        assert (await recv_json(ws))[4]["status"] == "ok"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, "missing token"),
        (make_token("u1", ttl=-10), "token expired"),
        (make_token("u1", secret="forged-" * 8), "invalid token signature"),
        ("garbage", "invalid token"),
    ],
)
async def test_bad_tokens_get_403_and_no_socket(server, token, reason):
    with pytest.raises(InvalidStatus) as info:
        async with websockets.connect(server.ws_url(token)):
            pass
    assert info.value.response.status_code == 403
    assert reason in info.value.response.body.decode()


async def test_unsupported_vsn_is_refused_with_a_clear_error(server):
    with pytest.raises(InvalidStatus) as info:
        async with websockets.connect(server.ws_url(make_token("u1"), vsn="1.0.0")):
            pass
    assert info.value.response.status_code == 400
    assert "vsn=2.0.0" in info.value.response.body.decode()


async def test_token_in_the_phoenix_js_subprotocol_is_accepted(server):
    encoded = base64.b64encode(make_token("u1").encode()).decode().rstrip("=")
    url = server.ws_url(None)
    async with websockets.connect(url, subprotocols=["phoenix", f"base64url.bearer.phx.{encoded}"]) as ws:
        assert ws.subprotocol == "phoenix"
        await send_json(ws, ["1", "1", "user:u1", "phx_join", {}])
        assert (await recv_json(ws))[4]["status"] == "ok"


async def test_idle_socket_is_closed_after_the_timeout(server_factory, ws_impl):
    server = server_factory({"WS_IDLE_TIMEOUT": "1"}, args=("--ws", ws_impl))
    async with (
        websockets.connect(server.ws_url(make_token("u1"))) as idle,
        websockets.connect(server.ws_url(make_token("u2"))) as alive,
    ):
        for _ in range(8):  # the live client heartbeats every 0.25 s for 2 s
            await send_json(alive, [None, "h", "phoenix", "heartbeat", {}])
            await recv_json(alive)
            await asyncio.sleep(0.25)
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(idle.recv(), 5)
        assert info.value.rcvd.code == 1000
        assert "idle timeout" in info.value.rcvd.reason
        await send_json(alive, [None, "h", "phoenix", "heartbeat", {}])
        assert (await recv_json(alive))[4]["status"] == "ok"
    metrics = (await asyncio.to_thread(httpx.get, f"{server.http}/metrics")).text
    assert "viral_realtime_idle_timeouts_total 1.0" in metrics


async def test_sigterm_closes_sockets_with_1001(server, ws_impl):
    async with websockets.connect(server.ws_url(make_token("u1"))) as ws:
        await send_json(ws, ["1", "1", "user:u1", "phx_join", {}])
        await recv_json(ws)
        server.proc.send_signal(15)
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 10)
        if ws_impl == "fast":
            assert info.value.rcvd.code == 1001
            assert "shutting down" in info.value.rcvd.reason
        else:  # uvicorn's own protocol closes with 1012 (service restart) before the app hears of it
            assert info.value.rcvd.code == 1012
    # uvicorn re-raises the signal once it has drained, so the exit status is "killed by SIGTERM".
    assert await asyncio.to_thread(server.proc.wait, 10) in (0, -15)
    assert "Application shutdown complete" in server.log()
