"""The Redis broker against a real Redis: one multiplexed subscription, recovery from a dropped connection."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from realtime import RedisBroker
from realtime.broker import BrokerUnavailable


class Inbox:
    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self.arrived = asyncio.Event()

    def __call__(self, topic: str, message: bytes) -> None:
        self.items.append((topic, message))
        self.arrived.set()

    async def wait_for(self, count: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.items) < count:
                self.arrived.clear()
                await self.arrived.wait()


@pytest.fixture
async def broker(redis_url):
    inbox = Inbox()
    broker = RedisBroker(redis_url, reconnect_max_delay=0.2)
    await broker.start(inbox)
    yield broker, inbox
    await broker.stop()


async def test_all_topics_share_one_subscription_connection(broker, redis_url):
    broker, inbox = broker
    for i in range(50):
        await broker.subscribe(f"room:{i}")
    for i in range(50):
        await broker.publish(f"room:{i}", f"m{i}".encode())
    await inbox.wait_for(50)
    assert sorted(inbox.items) == sorted((f"room:{i}", f"m{i}".encode()) for i in range(50))
    client = aioredis.Redis.from_url(redis_url)
    try:
        clients = await client.client_list(_type="pubsub")
        ours = [c for c in clients if int(c.get("psub", 0)) + int(c.get("sub", 0)) >= 50]
        assert len(ours) == 1
    finally:
        await client.aclose()


async def test_unsubscribed_topics_are_not_delivered(broker):
    broker, inbox = broker
    await broker.subscribe("a")
    await broker.subscribe("b")
    await broker.unsubscribe("a")
    await broker.publish("a", b"gone")
    await broker.publish("b", b"here")
    await inbox.wait_for(1)
    await asyncio.sleep(0.1)
    assert inbox.items == [("b", b"here")]


async def test_subscriptions_come_back_after_the_connection_is_killed(broker, redis_url):
    broker, inbox = broker
    await broker.subscribe("survivor")
    admin = aioredis.Redis.from_url(redis_url)
    try:
        killed = await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        assert killed >= 1
        async with asyncio.timeout(10):
            while True:
                await broker.publish("survivor", b"after")
                try:
                    await inbox.wait_for(1, timeout=0.3)
                    break
                except TimeoutError:
                    continue
        assert inbox.items[0] == ("survivor", b"after")
        assert await broker.ping()
    finally:
        await admin.aclose()


async def test_publish_to_an_unreachable_redis_raises_broker_unavailable():
    broker = RedisBroker("redis://127.0.0.1:1/0")
    with pytest.raises(BrokerUnavailable):
        await broker.publish("t", b"x")
    with pytest.raises(BrokerUnavailable):
        await broker.start(lambda topic, message: None)
