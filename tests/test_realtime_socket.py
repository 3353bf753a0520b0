"""Socket semantics, driven through the channel test kit (no network): the Phoenix rules we keep."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from realtime import NO_REPLY, Channel, JoinError, MemoryBroker, ReplyError, Router, SocketLimits
from realtime.testing import ChannelTestKit


class Room(Channel):
    terminated: list[tuple[str, str]] = []

    async def join(self, params: dict[str, Any]) -> dict[str, Any]:
        if params.get("deny"):
            raise JoinError("denied", detail="asked to")
        return {"joined": self.topic}

    async def handle_in(self, event: str, payload: Any, ref: str | None) -> Any:
        if event == "echo":
            return payload
        if event == "boom":
            raise RuntimeError("handler bug")
        if event == "refuse":
            raise ReplyError("not now")
        if event == "silent":
            return NO_REPLY
        return await super().handle_in(event, payload, ref)

    async def terminate(self, reason: str) -> None:
        Room.terminated.append((self.topic, reason))


class Shouty(Channel):
    intercept = frozenset({"msg"})

    async def join(self, params: dict[str, Any]) -> dict[str, Any]:
        return {}

    def handle_out(self, event: str, payload: Any) -> Any:
        if payload.get("secret"):
            return None
        return {**payload, "text": payload["text"].upper()}


def _router() -> Router:
    router = Router()
    router.channel("room:*", Room)
    router.channel("shouty:*", Shouty)
    return router


@pytest.fixture
async def kit():
    kit = ChannelTestKit(_router(), limits=SocketLimits(max_topics=3, rate_per_second=10, rate_burst=20))
    await kit.start()
    Room.terminated = []
    yield kit
    await kit.stop()


async def test_join_replies_with_the_channel_response(kit):
    client = kit.connect({"sub": "u1"})
    assert await client.join("room:1") == {"status": "ok", "response": {"joined": "room:1"}}


async def test_refused_join_replies_error_and_subscribes_nothing(kit):
    client = kit.connect({"sub": "u1"})
    reply = await client.join("room:1", {"deny": True})
    assert reply == {"status": "error", "response": {"reason": "denied", "detail": "asked to"}}
    assert kit.endpoint.hub.local_count("room:1") == 0


async def test_unknown_topic_is_unmatched(kit):
    client = kit.connect({"sub": "u1"})
    assert await client.join("nowhere:1") == {"status": "error", "response": {"reason": "unmatched topic"}}
    ref = await client.send(None, "room:9", "echo", {})
    assert client.reply(ref) == {"status": "error", "response": {"reason": "unmatched topic"}}


async def test_join_params_must_be_an_object(kit):
    client = kit.connect({"sub": "u1"})
    ref = await client.send("1", "room:1", "phx_join", [1, 2])
    assert client.reply(ref)["response"] == {"reason": "join params must be a JSON object"}


async def test_events_get_ok_error_or_no_reply(kit):
    client = kit.connect({"sub": "u1"})
    await client.join("room:1")
    assert await client.push("room:1", "echo", {"a": 1}) == {"status": "ok", "response": {"a": 1}}
    assert await client.push("room:1", "refuse", {}) == {"status": "error", "response": {"reason": "not now"}}
    unknown = await client.push("room:1", "what", {})
    assert unknown["status"] == "error" and "unknown event 'what'" in unknown["response"]["reason"]
    ref = await client.send("1", "room:1", "silent", {})
    with pytest.raises(AssertionError, match="no reply"):
        client.reply(ref)


async def test_crashing_handler_errors_only_its_channel(kit):
    client = kit.connect({"sub": "u1"})
    await client.join("room:1")
    await client.join("room:2")
    join_ref = client.socket.channels["room:1"].join_ref
    await client.send(join_ref, "room:1", "boom", {})
    assert [join_ref, join_ref, "room:1", "phx_error", {}] in client.outbound.messages
    assert "room:1" not in client.socket.channels
    assert ("room:1", "crash") in Room.terminated
    assert await client.push("room:2", "echo", {"ok": True}) == {"status": "ok", "response": {"ok": True}}
    assert not client.socket.closed
    assert kit.endpoint.stats.channel_crashes == 1


async def test_leave_replies_then_closes(kit):
    client = kit.connect({"sub": "u1"})
    await client.join("room:1")
    join_ref = client.socket.channels["room:1"].join_ref
    ref = await client.send(join_ref, "room:1", "phx_leave", {})
    assert client.outbound.messages[-2] == [
        join_ref,
        ref,
        "room:1",
        "phx_reply",
        {"status": "ok", "response": {}},
    ]
    assert client.outbound.messages[-1] == [join_ref, join_ref, "room:1", "phx_close", {}]
    assert kit.endpoint.hub.local_count("room:1") == 0
    assert Room.terminated == [("room:1", "leave")]


async def test_joining_twice_replaces_the_first_join(kit):
    client = kit.connect({"sub": "u1"})
    await client.join("room:1")
    first = client.socket.channels["room:1"].join_ref
    await client.join("room:1")
    second = client.socket.channels["room:1"].join_ref
    assert first != second
    assert [first, first, "room:1", "phx_close", {}] in client.outbound.messages
    assert kit.endpoint.hub.local_count("room:1") == 1
    await kit.endpoint.broadcast("room:1", "news", {"n": 1})
    assert client.pushes("news") == [{"n": 1}]


async def test_topic_limit_per_socket(kit):
    client = kit.connect({"sub": "u1"})
    for i in range(3):
        assert (await client.join(f"room:{i}"))["status"] == "ok"
    reply = await client.join("room:3")
    assert reply == {"status": "error", "response": {"reason": "too many topics (limit 3)"}}


async def test_inbound_rate_limit_refuses_excess_messages(kit):
    client = kit.connect({"sub": "u1"})
    refs = [await client.send(None, "phoenix", "heartbeat", {}) for _ in range(40)]
    statuses = [client.reply(ref)["status"] for ref in refs]
    assert statuses.count("ok") <= 21
    assert statuses[-1] == "error"
    assert client.reply(refs[-1])["response"]["reason"] == "rate limited"
    assert kit.endpoint.stats.rate_limited >= 19


async def test_broadcast_reaches_every_subscriber_once_with_no_refs(kit):
    a, b = kit.connect({"sub": "a"}), kit.connect({"sub": "b"})
    await a.join("room:1")
    await b.join("room:1")
    assert await kit.endpoint.broadcast("room:1", "news", {"n": 1}) == 2
    for client in (a, b):
        assert [m for m in client.outbound.messages if m[3] == "news"] == [
            [None, None, "room:1", "news", {"n": 1}]
        ]


async def test_intercepted_events_are_rewritten_or_dropped_per_subscriber(kit):
    client = kit.connect({"sub": "u1"})
    await client.join("shouty:1")
    await kit.endpoint.broadcast("shouty:1", "msg", {"text": "hi"})
    await kit.endpoint.broadcast("shouty:1", "msg", {"text": "psst", "secret": True})
    await kit.endpoint.broadcast("shouty:1", "other", {"text": "as is"})
    assert client.pushes("msg") == [{"text": "HI"}]
    assert client.pushes("other") == [{"text": "as is"}]


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"nope", "not valid JSON"),
        (b"{}", "JSON array"),
        (b"[1,2,3]", "5 elements"),
        (b'[null,null,5,"e",{}]', "topic"),
    ],
)
async def test_malformed_frames_close_the_socket_with_the_reason(kit, frame, reason):
    client = kit.connect({"sub": "u1"})
    await client.socket.handle_text(frame)
    assert client.outbound.close_code == 1007
    assert reason in client.outbound.close_reason


async def test_oversized_frame_closes_with_1009(kit):
    client = kit.connect({"sub": "u1"})
    await client.socket.handle_text(orjson.dumps([None, "1", "phoenix", "heartbeat", {"x": "a" * 70_000}]))
    assert client.outbound.close_code == 1009
    assert "exceeds the limit of 65536" in client.outbound.close_reason


async def test_terminate_ends_every_channel_and_unsubscribes(kit):
    client = kit.connect({"sub": "u1"})
    await client.join("room:1")
    await client.join("room:2")
    await client.socket.terminate("closed")
    assert sorted(Room.terminated) == [("room:1", "closed"), ("room:2", "closed")]
    assert kit.endpoint.hub.topics() == 0
    assert await kit.endpoint.hub.sweep() == 2


async def test_frame_limit_counts_bytes_not_characters(kit):
    client = kit.connect({"sub": "u1"})
    text = orjson.dumps([None, "1", "phoenix", "heartbeat", {"x": "é" * 40_000}]).decode()
    assert len(text) < 65536 < len(text.encode())
    await client.socket.handle_text(text)
    assert client.outbound.close_code == 1009


async def test_binary_frames_close_with_1003(kit):
    client = kit.connect({"sub": "u1"})
    client.socket.handle_binary()
    assert client.outbound.close_code == 1003
    assert "binary frames are not supported" in client.outbound.close_reason


class SlowBroker(MemoryBroker):
    """A broker whose subscribe and unsubscribe take a while, like a round trip to Redis."""

    def __init__(self) -> None:
        super().__init__()
        self.subscribed: set[str] = set()
        self.calls: list[tuple[str, str]] = []

    async def subscribe(self, topic: str) -> None:
        self.calls.append(("subscribe", topic))
        await asyncio.sleep(0.05)
        self.subscribed.add(topic)

    async def unsubscribe(self, topic: str) -> None:
        self.calls.append(("unsubscribe", topic))
        await asyncio.sleep(0.05)
        self.subscribed.discard(topic)


async def test_no_join_is_acknowledged_before_its_broker_subscription_is_live():
    broker = SlowBroker()
    kit = ChannelTestKit(_router(), broker=broker)
    await kit.start()
    a, b = kit.connect({"sub": "a"}), kit.connect({"sub": "b"})

    async def join_and_check(client):
        reply = await client.join("room:1")
        assert reply["status"] == "ok"
        assert "room:1" in broker.subscribed  # live when the reply goes out, for every joiner

    await asyncio.gather(join_and_check(a), join_and_check(b))
    assert broker.calls == [("subscribe", "room:1")]  # one subscription shared by both
    await kit.stop()


async def test_a_sweep_keeps_a_topic_joined_while_it_runs():
    broker = SlowBroker()
    kit = ChannelTestKit(_router(), broker=broker)
    await kit.start()
    hub = kit.endpoint.hub
    first, second = kit.connect({"sub": "a"}), kit.connect({"sub": "b"})
    await first.join("room:1")
    await first.join("room:2")
    await first.socket.terminate("closed")  # both topics idle now
    sweep = asyncio.create_task(hub.sweep())
    await asyncio.sleep(0.01)  # the sweep is unsubscribing its first idle topic...
    idle_now = [t for t in ("room:1", "room:2") if ("unsubscribe", t) not in broker.calls]
    (later,) = idle_now
    await second.join(later)  # ...when someone joins the other one
    await sweep
    assert later in broker.subscribed
    await kit.endpoint.broadcast(later, "news", {"n": 1})
    assert second.pushes("news") == [{"n": 1}]
    await kit.stop()
