"""Two server processes on one real Redis: fan-out crosses processes; one dying leaves the other whole."""

from __future__ import annotations

import asyncio

import httpx
import websockets
from servers import make_token, recv_json, send_json


async def _join(server, user: str):
    ws = await websockets.connect(server.ws_url(make_token(user)))
    await send_json(ws, ["1", "1", f"user:{user}", "phx_join", {}])
    assert (await recv_json(ws))[4]["status"] == "ok"
    return ws


async def test_a_socket_on_one_process_receives_what_is_published_on_the_other(server_factory, redis_url):
    a = server_factory({"BROKER_URL": redis_url})
    b = server_factory({"BROKER_URL": redis_url})
    on_a = await _join(a, "u1")
    on_b = await _join(b, "u1")
    try:
        response = await asyncio.to_thread(b.publish, "user:u1", "nudge", {"from": "b"})
        assert response.status_code == 202
        assert response.json()["local_subscribers"] == 1
        assert await recv_json(on_a) == [None, None, "user:u1", "nudge", {"from": "b"}]
        assert await recv_json(on_b) == [None, None, "user:u1", "nudge", {"from": "b"}]
        for n in range(20):
            await asyncio.to_thread(a.publish, "user:u1", "tick", {"n": n})
        for ws in (on_a, on_b):
            assert [(await recv_json(ws))[4]["n"] for _ in range(20)] == list(range(20))
    finally:
        await on_a.close()
        await on_b.close()


async def test_one_process_dying_does_not_affect_the_others_sockets(server_factory, redis_url):
    a = server_factory({"BROKER_URL": redis_url})
    b = server_factory({"BROKER_URL": redis_url})
    on_a = await _join(a, "u2")
    on_b = await _join(b, "u2")
    try:
        a.kill()  # SIGKILL: no goodbye to Redis or clients
        for n in range(5):
            assert (await asyncio.to_thread(b.publish, "user:u2", "tick", {"n": n})).status_code == 202
        assert [(await recv_json(on_b))[4]["n"] for _ in range(5)] == list(range(5))
        await send_json(on_b, [None, "9", "phoenix", "heartbeat", {}])
        assert (await recv_json(on_b))[1] == "9"
        assert (await asyncio.to_thread(httpx.get, f"{b.http}/readyz")).json()["checks"]["broker"] is True
    finally:
        await on_a.close()
        await on_b.close()


async def test_unsubscribed_topics_are_dropped_from_redis(server_factory, redis_url):
    import redis.asyncio as aioredis

    a = server_factory({"BROKER_URL": redis_url, "WS_IDLE_TIMEOUT": "2"})  # sweep every 0.5 s
    ws = await _join(a, "sweep-me")
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.pubsub_numsub("rt:user:sweep-me") == [(b"rt:user:sweep-me", 1)]
        await ws.close()
        for _ in range(40):
            if await client.pubsub_numsub("rt:user:sweep-me") == [(b"rt:user:sweep-me", 0)]:
                break
            await asyncio.sleep(0.1)
        assert await client.pubsub_numsub("rt:user:sweep-me") == [(b"rt:user:sweep-me", 0)]
    finally:
        await client.aclose()
