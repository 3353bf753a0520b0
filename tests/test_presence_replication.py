"""Presence replication between nodes over a real Redis, in one process: convergence and repair."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from presence import SYNC_TOPIC, PresenceConfig, PresenceTracker
from realtime import Hub, RealtimeStats, RedisBroker

FAST = PresenceConfig(diff_interval=0.05, heartbeat_interval=0.2, node_timeout=1.0)
TOPIC = "presence:subject:physics"


class Node:
    def __init__(self, redis_url: str, name: str) -> None:
        self.hub = Hub(RedisBroker(redis_url, reconnect_max_delay=0.2), RealtimeStats())
        self.tracker = PresenceTracker(self.hub, FAST, node_id=name)

    async def start(self) -> Node:
        await self.hub.start()
        await self.tracker.start()
        return self

    async def stop(self, *, clean: bool = True) -> None:
        if clean:
            await self.tracker.stop()
        elif self.tracker._task is not None:  # a crash: no goodbye to the others
            self.tracker._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.tracker._task
        await self.hub.stop()

    def keys(self, topic: str = TOPIC) -> dict[str, int]:
        return {key: len(v["metas"]) for key, v in self.tracker.listing(topic).items()}


async def eventually(check, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


@pytest.fixture
async def nodes(redis_url):
    started: list[Node] = []

    async def make(name: str) -> Node:
        node = await Node(redis_url, name).start()
        started.append(node)
        return node

    yield make
    for node in started:
        with contextlib.suppress(Exception):
            await node.stop()


async def test_every_node_sees_every_nodes_users(nodes):
    a, b = await nodes("a"), await nodes("b")
    a.tracker.track("tab1", TOPIC, "u1", {}, uid="u1", listed=True)
    b.tracker.track("tab2", TOPIC, "u2", {}, uid="u2", listed=True)
    b.tracker.track("tab3", TOPIC, "u2", {}, uid="u2", listed=True)
    await eventually(lambda: a.keys() == {"u1": 1, "u2": 2} and b.keys() == {"u1": 1, "u2": 2})
    b.tracker.untrack("tab2")
    await eventually(lambda: a.keys() == {"u1": 1, "u2": 1})
    assert a.tracker.counts() == {"total": 2, "by_subject": {"physics": 2}}


async def test_a_newcomer_gets_the_full_state(nodes):
    a = await nodes("a")
    for i in range(300):
        a.tracker.track(f"tab{i}", TOPIC, f"u{i}", {"i": i}, uid=f"u{i}", listed=True)
    await asyncio.sleep(0.1)
    c = await nodes("c")
    await eventually(lambda: len(c.keys()) == 300)
    assert c.tracker.listing(TOPIC) == a.tracker.listing(TOPIC)


async def test_a_crashed_node_is_removed_after_the_timeout(nodes):
    a, b = await nodes("a"), await nodes("b")
    b.tracker.track("tab", TOPIC, "u9", {}, uid="u9", listed=True)
    await eventually(lambda: a.keys() == {"u9": 1})
    await b.stop(clean=False)
    loop = asyncio.get_running_loop()
    crashed_at = loop.time()
    await eventually(lambda: a.keys() == {}, timeout=5)
    assert loop.time() - crashed_at < FAST.node_timeout + 1.0
    assert "b" not in a.tracker.peers()


async def test_a_clean_stop_removes_entries_at_once(nodes):
    a, b = await nodes("a"), await nodes("b")
    b.tracker.track("tab", TOPIC, "u9", {}, uid="u9", listed=True)
    await eventually(lambda: a.keys() == {"u9": 1})
    await b.stop()
    await eventually(lambda: a.keys() == {}, timeout=FAST.node_timeout / 2)


async def test_a_lost_delta_is_repaired_from_the_heartbeat_sequence(nodes):
    a, b = await nodes("a"), await nodes("b")
    a.tracker.track("tab1", TOPIC, "u1", {}, uid="u1", listed=True)
    await eventually(lambda: b.keys() == {"u1": 1})
    # b stops hearing the replication topic while a changes: those deltas are lost to b.
    b.hub.unlisten(SYNC_TOPIC, b.tracker._on_message)
    a.tracker.untrack("tab1")
    a.tracker.track("tab2", TOPIC, "u2", {}, uid="u2", listed=True)
    await asyncio.sleep(0.3)
    assert b.keys() == {"u1": 1}
    await b.hub.listen(SYNC_TOPIC, b.tracker._on_message)
    await eventually(lambda: b.keys() == {"u2": 1})


async def test_meta_update_is_a_new_ref_replacing_the_old(nodes):
    a, b = await nodes("a"), await nodes("b")
    ref = a.tracker.track("tab", TOPIC, "u1", {"status": "online"}, uid="u1", listed=True)
    await eventually(lambda: b.keys() == {"u1": 1})
    new_ref = a.tracker.update("tab", ref, {"status": "idle"}, listed=True)
    await eventually(lambda: b.tracker.listing(TOPIC)["u1"]["metas"][0]["status"] == "idle")
    meta = b.tracker.listing(TOPIC)["u1"]["metas"][0]
    assert meta["phx_ref"] == new_ref and meta["phx_ref_prev"] == ref
    a.tracker.update("tab", new_ref, {"status": "idle"}, listed=False)  # hidden
    await eventually(lambda: b.keys() == {})
    assert b.tracker.counts()["total"] == 1
