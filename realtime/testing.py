"""Drive sockets and channels without a network, like Phoenix.ChannelTest.

    kit = ChannelTestKit(router)
    await kit.start()
    client = kit.connect({"sub": "u1"})
    reply = await client.join("user:u1")
    await kit.endpoint.broadcast("user:u1", "nudge", {...})
    assert client.pushes("nudge") == [...]

Frames go through the real serializer, router, hub and broker; only the transport is replaced by
a list. End-to-end paths are still tested over real sockets.
"""

from __future__ import annotations

import itertools
from typing import Any

import orjson

from .broker import Broker, MemoryBroker
from .endpoint import PhoenixEndpoint
from .router import Router
from .socket import Socket, SocketLimits
from .stats import RealtimeStats
from .tokens import TokenVerifier


class RecordingOutbound:
    """An Outbound that keeps every message it is given, decoded."""

    def __init__(self) -> None:
        self.messages: list[list[Any]] = []
        self.close_code: int | None = None
        self.close_reason: str | None = None

    @property
    def closed(self) -> bool:
        return self.close_code is not None

    def enqueue(self, data: bytes) -> None:
        if not self.closed:
            self.messages.append(orjson.loads(data))

    def enqueue_frame(self, frame: bytes, data: bytes) -> None:
        self.enqueue(data)

    def start_close(self, code: int, reason: str) -> None:
        if not self.closed:
            self.close_code, self.close_reason = code, reason


class TestClient:
    __test__ = False  # not a pytest class

    def __init__(self, socket: Socket, outbound: RecordingOutbound) -> None:
        self.socket = socket
        self.outbound = outbound
        self._refs = itertools.count(1)

    async def send(self, join_ref: str | None, topic: str, event: str, payload: Any) -> str:
        ref = str(next(self._refs))
        await self.socket.handle_text(orjson.dumps([join_ref, ref, topic, event, payload]))
        return ref

    def reply(self, ref: str) -> dict[str, Any]:
        for msg in self.outbound.messages:
            if msg[1] == ref and msg[3] == "phx_reply":
                return dict(msg[4])
        raise AssertionError(f"no reply to ref {ref}; got {self.outbound.messages!r}")

    async def join(self, topic: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        join_ref = str(next(self._refs))
        await self.socket.handle_text(orjson.dumps([join_ref, join_ref, topic, "phx_join", params or {}]))
        return self.reply(join_ref)

    async def push(self, topic: str, event: str, payload: Any) -> dict[str, Any]:
        channel = self.socket.channels.get(topic)
        ref = await self.send(channel.join_ref if channel else None, topic, event, payload)
        return self.reply(ref)

    def pushes(self, event: str, topic: str | None = None) -> list[Any]:
        return [m[4] for m in self.outbound.messages if m[3] == event and (topic is None or m[2] == topic)]


class ChannelTestKit:
    __test__ = False

    def __init__(
        self,
        router: Router,
        *,
        broker: Broker | None = None,
        limits: SocketLimits | None = None,
        secret: str = "test-secret",
        context: Any = None,
    ) -> None:
        self.endpoint = PhoenixEndpoint(
            router=router,
            verifier=TokenVerifier(secret),
            broker=broker or MemoryBroker(),
            limits=limits,
            stats=RealtimeStats(),
            context=context,
        )

    async def start(self) -> None:
        await self.endpoint.hub.start()

    async def stop(self) -> None:
        await self.endpoint.hub.stop()

    def connect(self, claims: dict[str, Any]) -> TestClient:
        outbound = RecordingOutbound()
        return TestClient(self.endpoint.open_socket(claims, outbound), outbound)
