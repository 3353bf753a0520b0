"""Presence on two server processes sharing a real Redis: convergence, node death, no ghosts, bursts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time

import pytest
from servers import FAST_PRESENCE, ROOT, TOPIC, PhxClient, Roster, ServerProcess, is_event, make_token


@pytest.fixture
async def cluster(server_factory, redis_url):
    env = {"BROKER_URL": redis_url, **FAST_PRESENCE}
    return server_factory(env), server_factory(env), env


async def connect(server: ServerProcess, sub: str, **claims) -> PhxClient:
    return await PhxClient.connect(server.ws_url(make_token(sub, **claims)))


async def close_all(clients) -> None:
    for client in clients:
        with contextlib.suppress(Exception):
            await client.close()


async def test_each_node_lists_the_users_of_both(cluster):
    a, b, _ = cluster
    on_a, on_b = await connect(a, "alice"), await connect(b, "bob")
    try:
        await on_a.join(TOPIC)
        await on_b.join(TOPIC)
        await Roster(on_a, TOPIC).until({"alice": 1, "bob": 1})
        await Roster(on_b, TOPIC).until({"alice": 1, "bob": 1})
    finally:
        await close_all([on_a, on_b])


async def test_kill_9_one_node_the_other_pushes_its_leaves_and_no_ghosts_return(cluster, server_factory):
    a, b, env = cluster
    watcher = await connect(b, "watcher", opted_out=True)
    on_a = [await connect(a, f"a{i}") for i in range(5)]
    try:
        await watcher.join(TOPIC)
        await watcher.join("presence:global")
        for client in on_a:
            await client.join(TOPIC)
        roster = Roster(watcher, TOPIC)
        await roster.until({f"a{i}": 1 for i in range(5)})
        await watcher.wait_for(lambda f: f[3] == "presence_counts" and f[4]["total"] == 6)

        port = a.port
        a.kill()  # SIGKILL: no goodbye
        killed_at = time.monotonic()
        bound = float(env["PRESENCE_NODE_TIMEOUT"]) + 2.0
        await roster.until({}, timeout=bound + 2)
        assert time.monotonic() - killed_at <= bound
        await watcher.wait_for(
            lambda f: f[3] == "presence_counts" and f[4] == {"total": 1, "by_subject": {"algebra": 1}}
        )

        restarted = server_factory(env, port=port)
        fresh = await connect(restarted, "fresh", opted_out=True)
        try:
            await fresh.join(TOPIC)
            state = (await fresh.wait_for(is_event(TOPIC, "presence_state")))[4]
            assert state == {}
            await asyncio.sleep(1.5)  # heartbeats and syncs flow between the two nodes meanwhile
            assert Roster(fresh, TOPIC).current() == {}
            assert Roster(watcher, TOPIC).current() == {}
        finally:
            await fresh.close()
    finally:
        await close_all([watcher, *on_a])


async def test_two_thousand_sockets_in_bursts_end_in_the_exact_state_on_both_nodes(server_factory, redis_url):
    # The default diff batching (0.25 s): with 2,000 sockets on one topic, every batch goes to all of them.
    env = {**FAST_PRESENCE, "BROKER_URL": redis_url, "PRESENCE_DIFF_INTERVAL": "0.25"}
    a, b = server_factory(env), server_factory(env)
    nodes = (a, b)
    observers = [await connect(node, f"observer-{i}", opted_out=True) for i, node in enumerate(nodes)]
    for observer in observers:
        await observer.join(TOPIC)
    clients: dict[str, PhxClient] = {}

    async def arrive(names: list[str]) -> None:
        async def one(i: int, name: str) -> None:
            client = await connect(nodes[i % 2], name)
            clients[name] = client
            assert (await client.join(TOPIC))["status"] == "ok"

        for start in range(0, len(names), 250):
            await asyncio.gather(*(one(start + i, n) for i, n in enumerate(names[start : start + 250])))

    try:
        await arrive([f"u{i}" for i in range(2000)])
        leaving = [f"u{i}" for i in range(0, 2000, 3)]
        await asyncio.gather(*(clients.pop(name).close() for name in leaving))
        await arrive([f"late{i}" for i in range(300)])
        expected = {name: 1 for name in clients}
        assert len(expected) == 2000 - len(leaving) + 300
        for observer in observers:  # what each node's diffs built up, from the first state on
            await Roster(observer, TOPIC).until(expected, timeout=20)
        for i, node in enumerate(nodes):  # and a fresh state from each node
            late = await connect(node, f"late-observer-{i}", opted_out=True)
            await late.join(TOPIC)
            state = (await late.wait_for(is_event(TOPIC, "presence_state")))[4]
            assert {k: len(v["metas"]) for k, v in state.items()} == expected
            await late.close()
    finally:
        await close_all([*observers, *clients.values()])


async def test_the_phoenix_js_presence_helper_ends_with_the_exact_list(cluster):
    node_bin = shutil.which("node")
    assert node_bin, "node is required"
    a, b, _ = cluster
    proc = await asyncio.create_subprocess_exec(
        node_bin,
        str(ROOT / "tests" / "js" / "presence_observer.mjs"),
        f"ws://127.0.0.1:{a.port}/socket",
        make_token("observer", opted_out=True),
        TOPIC,
        cwd=ROOT / "tests" / "js",
        stdout=asyncio.subprocess.PIPE,
    )
    actors: list[PhxClient] = []
    try:
        alice = await connect(a, "alice", name="Alice")
        bob1, bob2 = await connect(b, "bob", name="Bob"), await connect(b, "bob", name="Bob")
        carol = await connect(b, "carol", minor=True, name="Carol")
        dave = await connect(a, "dave")
        actors += [alice, bob1, bob2, carol, dave]
        for client in actors:
            await client.join(TOPIC)
        await alice.request(TOPIC, "presence_update", {"status": "in_session"})
        await bob1.close()
        await dave.request(TOPIC, "phx_leave", {})
        await carol.request(TOPIC, "presence_update", {"status": "idle"})

        anon = None
        async with asyncio.timeout(15):
            while True:
                line = await proc.stdout.readline()
                assert line, "the node observer exited"
                message = json.loads(line)
                if message["event"] != "sync":
                    continue
                listing = {item["key"]: item["metas"] for item in message["list"]}
                anon = next((k for k in listing if k.startswith("anon-")), None)
                expected = {
                    "alice": [{"status": "in_session", "name": "Alice"}],
                    "bob": [{"status": "online", "name": "Bob"}],
                    anon: [{"status": "idle", "name": "A student"}],
                }
                if anon and listing == expected:
                    break
    finally:
        proc.kill()
        await proc.wait()
        await close_all(actors)
