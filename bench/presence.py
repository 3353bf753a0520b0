"""Presence benchmark: `presence_state` with thousands of users present; the join/leave churn a node sustains.

Four parts, in this order (`--parts` picks some):

1. `state-inproc`: a PresenceTracker on a Hub with the memory broker, `--state-users` users tracked on one
   topic with the metas the subject channel makes; times `listing()` + the `presence_state` frame's
   JSON encoding + WebSocket framing, with the garbage collector on (as in the server), off, and on
   with a ballast of long-lived objects (a server's heap holds its sockets' objects).
2. `state-e2e`: the engine server (`bench.engine_app`, memory broker) and Node "hold" clients
   (`bench/presence_client.mjs`) that join `presence:subject:big` one distinct user per socket and
   then only count the bytes they get; the room grows through `--e2e-sizes` and at each size fresh
   clients (this driver, Python `websockets`) time `phx_join` → join reply → complete
   `presence_state`, then watch 0.25 s for a close. At the largest size `--mss-joins` more fresh clients
   advertise an Ethernet-sized TCP MSS (1448 bytes), as a client across a real network does.
3. `tracker`: in process, track/untrack ops/s of a PresenceTracker with its replication loop running on
   a memory-broker hub, alone and with a peer tracker applying its deltas.
4. `churn` (one node, memory broker) and `churn-cluster` (two nodes on Redis, every room's users split
   between them): `--rooms` x `--users-per-room` sockets in Node processes, each joining and leaving
   its room `presence:subject:room{k}` over and over. Every socket first joins once, all at once, and
   stays (`--no-prime`: the first joins happen amid the churn instead). Then closed loop (each socket
   sends its next op when the previous one is answered: the rate the server sustains), then open loop at
   `--paced-fraction` of that rate (latency at a load the node can carry). At the end every socket
   rejoins and stays; fresh observers on every node then check each room's `presence_state`: all of
   the room's users, one meta each, identical on both nodes.

CPU comes from /proc (server, Node clients, Redis, machine), as in `bench.broadcast`; the server's own
counters (`/metrics`) are read at the end of each run to confirm no slow-consumer drops, rate
limiting or channel crashes happened. Run from the repo root:
`.venv/bin/python -m bench.presence [--json] [--out FILE]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import uvloop
from rich.console import Console
from rich.table import Table
from websockets.asyncio.client import connect as ws_connect

from presence import PresenceConfig, PresenceTracker
from realtime import Hub, MemoryBroker, RealtimeStats, TokenVerifier, frames, serializer

from .common import (
    BENCH_SECRET,
    ROOT,
    ClientProcess,
    ServerProcess,
    background_load,
    environment,
    fmt,
    free_port,
    http_request,
    machine_cpu,
    merge_hists,
    percentile,
    proc_cpu_split,
    proc_rss_kb,
    raise_nofile_limit,
)

CLIENT_JS = ROOT / "bench" / "presence_client.mjs"
SERVER_MODULE = "bench.engine_app"
STATE_TOPIC = "presence:subject:big"
ROOM_PREFIX = "presence:subject:room"
# The payload of `presence_state` is built from these claims by channels.presence (role, name, status).
ROLE = "student"
# An Ethernet path's MSS (1500-byte MTU minus IP and TCP headers with timestamps).
ETHERNET_MSS = 1448
# After the churn stops: a few presence batches (diff_interval) for the last changes to replicate.
SETTLE_WAIT = 4 * PresenceConfig().diff_interval

console = Console(stderr=True)


# Measuring.


def redis_pid() -> int | None:
    """The local redis-server, if any: its CPU is part of what a Redis cluster costs."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/comm") as fh:
                    if fh.read().strip() == "redis-server":
                        return int(entry)
    return None


class CpuMeter:
    """CPU of named processes, of this driver and of the whole machine between `start()` and `stop()`."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def start(self) -> CpuMeter:
        self.t0 = time.monotonic()
        self.cpu0 = {name: proc_cpu_split(pid) for name, pid in self.pids.items()}
        self.machine0 = machine_cpu()
        self.self0 = os.times()
        return self

    def stop(self) -> dict[str, Any]:
        wall = time.monotonic() - self.t0
        procs = {}
        for name, pid in self.pids.items():
            try:
                user, system = proc_cpu_split(pid)
            except OSError:
                continue
            u0, s0 = self.cpu0[name]
            procs[name] = {"user_s": user - u0, "system_s": system - s0, "cpu_s": user - u0 + system - s0}
            procs[name]["utilisation"] = procs[name]["cpu_s"] / wall
        busy1, total1 = machine_cpu()
        busy0, total0 = self.machine0
        machine_busy = (busy1 - busy0) / max(total1 - total0, 1e-9) * (os.cpu_count() or 1)
        self1 = os.times()
        driver = (self1.user - self.self0.user) + (self1.system - self.self0.system)
        measured = sum(p["cpu_s"] for p in procs.values()) + driver
        return {
            "wall_s": wall,
            "processes": procs,
            "driver_cpu_s": driver,
            "machine_busy_cores": machine_busy,
            # CPU used by processes outside this benchmark (should be ~0 on an idle machine).
            "other_busy_cores": max(0.0, machine_busy - measured / wall),
        }


def summary_ms(samples: list[float]) -> dict[str, Any]:
    """Median, p99 and extremes of samples in ms (p99 by nearest rank)."""
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(0.99 * len(ordered) + 0.5) - 1))
    return {
        "n": len(ordered),
        "median": statistics.median(ordered),
        "p99": ordered[rank],
        "min": ordered[0],
        "max": ordered[-1],
        "mean": statistics.fmean(ordered),
    }


async def server_counters(port: int) -> dict[str, float]:
    """The engine's own counters from /metrics (`viral_realtime_*`)."""
    status, body = await http_request(port, "GET", "/metrics")
    counters: dict[str, float] = {}
    if status != 200:
        return counters
    for line in body.decode().splitlines():
        if line.startswith("viral_realtime_") and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            counters[name.removeprefix("viral_realtime_").removesuffix("_total")] = float(value)
    return counters


def issue_tokens(users: list[tuple[str, str]]) -> list[str]:
    verifier = TokenVerifier(BENCH_SECRET)
    return [verifier.issue({"sub": uid, "role": ROLE, "name": name}, ttl=3600) for uid, name in users]


def ws_url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/socket/websocket?vsn=2.0.0"


# 1. presence_state in process.


def student_meta(i: int) -> dict[str, Any]:
    return {"status": "online", "role": ROLE, "name": f"Student {i}"}


def time_state(tracker: PresenceTracker, topic: str, runs: int) -> dict[str, Any]:
    """Time listing + encode + frame, as `SubjectPresenceChannel.after_join` → `Socket.push` do."""
    totals, listing_ms, encode_ms, frame_ms = [], [], [], []
    size = 0
    stats0 = gc.get_stats()
    for run in range(runs + 3):
        t0 = time.perf_counter_ns()
        listing = tracker.listing(topic)
        t1 = time.perf_counter_ns()
        data = serializer.encode("1", None, topic, "presence_state", listing)
        t2 = time.perf_counter_ns()
        frame = frames.text_frame(data)
        t3 = time.perf_counter_ns()
        del listing, data
        if run < 3:  # warm-up
            stats0 = gc.get_stats()
            continue
        size = len(frame)
        totals.append((t3 - t0) / 1e6)
        listing_ms.append((t1 - t0) / 1e6)
        encode_ms.append((t2 - t1) / 1e6)
        frame_ms.append((t3 - t2) / 1e6)
    stats1 = gc.get_stats()
    return {
        "total_ms": summary_ms(totals),
        "listing_ms": summary_ms(listing_ms),
        "encode_ms": summary_ms(encode_ms),
        "frame_ms": summary_ms(frame_ms),
        "frame_bytes": size,
        "gc_collections": [
            s1["collections"] - s0["collections"] for s0, s1 in zip(stats0, stats1, strict=True)
        ],
    }


async def run_state_inproc(args: argparse.Namespace) -> dict[str, Any]:
    hub = Hub(MemoryBroker(), RealtimeStats())
    await hub.start()
    tracker = PresenceTracker(hub, PresenceConfig())
    await tracker.start()
    try:
        owners = [object() for _ in range(args.state_users)]
        for i, owner in enumerate(owners):
            tracker.track(owner, STATE_TOPIC, f"u{i}", student_meta(i), uid=f"u{i}", listed=True)
        result: dict[str, Any] = {"users": args.state_users, "runs": args.state_runs}
        result["gc_on"] = time_state(tracker, STATE_TOPIC, args.state_runs)
        gc.disable()
        try:
            result["gc_off"] = time_state(tracker, STATE_TOPIC, args.state_runs)
        finally:
            gc.enable()
        if args.ballast:
            # Long-lived container objects, as a server holding thousands of sockets has: every full
            # collection the listing's allocations trigger has to walk them.
            ballast = [[i] for i in range(args.ballast)]
            gc.collect()
            result["gc_on_ballast"] = time_state(tracker, STATE_TOPIC, args.state_runs)
            result["ballast_objects"] = len(ballast)
            del ballast
            gc.collect()
        return result
    finally:
        await tracker.stop()
        await hub.stop()


# 3. Tracker track/untrack ops/s in process.


async def run_tracker_inproc(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    n = args.rooms * args.users_per_room
    for variant in ("alone", "with_peer"):
        hub = Hub(MemoryBroker(), RealtimeStats())
        await hub.start()
        node = PresenceTracker(hub, PresenceConfig(), node_id="node-a")
        peer = PresenceTracker(hub, PresenceConfig(), node_id="node-b") if variant == "with_peer" else None
        await node.start()
        if peer is not None:
            await peer.start()
        try:
            owners = [object() for _ in range(n)]
            topics = [f"{ROOM_PREFIX}{i // args.users_per_room}" for i in range(n)]
            for i, owner in enumerate(owners):
                node.track(owner, topics[i], f"u{i}", student_meta(i), uid=f"u{i}", listed=True)
            await asyncio.sleep(3 * node.config.diff_interval)
            ops = 0
            i = 0
            cpu0, t0 = time.process_time(), time.perf_counter()
            deadline = t0 + args.tracker_seconds
            while time.perf_counter() < deadline:
                # 500 ops, then let the loop run (the replication task sends every diff_interval).
                for _ in range(250):
                    owner = owners[i]
                    node.untrack(owner)
                    node.track(owner, topics[i], f"u{i}", student_meta(i), uid=f"u{i}", listed=True)
                    i = (i + 1) % n
                ops += 500
                await asyncio.sleep(0)
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            await asyncio.sleep(3 * node.config.diff_interval)
            entry: dict[str, Any] = {
                "ops": ops,
                "wall_s": wall,
                "ops_per_s": ops / wall,
                "cpu_us_per_op": cpu * 1e6 / ops,
                "present": sum(len(node.listing(t)) for t in set(topics)),
            }
            if peer is not None:
                entry["peer_converged"] = all(peer.listing(t) == node.listing(t) for t in set(topics))
            results[variant] = entry
        finally:
            if peer is not None:
                await peer.stop()
            await node.stop()
            await hub.stop()
    results["users"] = n
    results["rooms"] = args.rooms
    return results


# Node clients.


async def start_clients(
    mode: str,
    specs: list[list[Any]],
    urls: list[str],
    args: argparse.Namespace,
    workdir: Path,
    node: str,
    tag: str,
) -> list[ClientProcess]:
    """Split `specs` ([token, url_index, topic] per socket) round-robin over `--client-procs` processes."""
    clients = []
    procs = args.client_procs
    addresses = [f"127.0.{1 + k // 250}.{1 + k % 250}" for k in range(args.source_addresses)]
    for p in range(procs):
        config = {
            "name": f"{tag}{p}",
            "mode": mode,
            "urls": urls,
            "sockets": specs[p::procs],
            "connect_concurrency": args.hold_concurrency if mode == "hold" else args.connect_concurrency,
            "heartbeat_ms": 30000,
            "local_addresses": addresses,
        }
        path = workdir / f"client-{tag}{p}.json"
        path.write_bytes(orjson.dumps(config))
        clients.append(ClientProcess(f"{tag}{p}", path, workdir / f"client-{tag}{p}.log", script=CLIENT_JS))
    for client in clients:
        await client.start(node, args.node_arg)
    return clients


async def next_message(client: ClientProcess, kinds: set[str], timeout: float) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            message = await client.messages.get()
            if message["type"] in kinds:
                return message
            if message["type"] == "exited":
                raise RuntimeError(f"client {client.name} exited: {client.log_path.read_text()[-2000:]}")


async def stats(clients: list[ClientProcess]) -> list[dict[str, Any]]:
    for client in clients:
        await client.send({"cmd": "stats"})
    return [await next_message(client, {"stats"}, 60) for client in clients]


async def stop_all(clients: list[ClientProcess], servers: list[ServerProcess]) -> None:
    for client in clients:
        with contextlib.suppress(Exception):
            await client.stop()
    for server in servers:
        with contextlib.suppress(Exception):
            await server.stop()


# 2. presence_state end to end.


async def fresh_join(
    port: int, token: str, topic: str, *, mss: int | None = None, linger: float = 0.25
) -> dict[str, Any]:
    """Connect (untimed), then time phx_join → join reply → complete presence_state; then stay `linger`
    seconds to see whether the server closes the socket after sending the state (slow consumer)."""
    sock = None
    if mss is not None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    result: dict[str, Any] = {"mss": mss}
    async with ws_connect(
        f"{ws_url(port)}&token={token}",
        proxy=None,
        compression=None,
        ping_interval=None,
        max_size=None,
        open_timeout=60,
        close_timeout=5,
        sock=sock,
    ) as ws:
        t0 = time.perf_counter()
        await ws.send(f'["1","1","{topic}","phx_join",{{}}]')
        try:
            while True:
                raw = await asyncio.wait_for(ws.recv(decode=False), 60)
                t = time.perf_counter()
                head = raw[:120]
                if b'"phx_reply"' in head and "reply_ms" not in result:
                    result["reply_ms"] = (t - t0) * 1e3
                    result["reply_ok"] = orjson.loads(raw)[4]["status"] == "ok"
                elif b'"presence_state"' in head:
                    result["state_ms"] = (t - t0) * 1e3
                    result["state_bytes"] = len(raw)
                    p0 = time.perf_counter()
                    state = orjson.loads(raw)[4]
                    result["client_parse_ms"] = (time.perf_counter() - p0) * 1e3
                    result["state_keys"] = len(state)
                    result["single_meta_each"] = all(len(v["metas"]) == 1 for v in state.values())
                    break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(linger):
                    while True:
                        await ws.recv(decode=False)  # presence_diffs; a close raises
        except Exception as exc:  # the server closed the socket
            result["error"] = f"{type(exc).__name__}: {exc}"
        if ws.close_code is not None:
            result["close_code"] = ws.close_code
            result["close_reason"] = ws.close_reason
        return result


async def wait_ready(clients: list[ClientProcess], what: str, stall_timeout: float) -> list[dict[str, Any]]:
    """Wait for every client's `ready`, printing progress; give up after `stall_timeout` s without any."""
    ready: dict[str, dict[str, Any]] = {}
    last_count, last_progress, last_print = -1, time.monotonic(), time.monotonic()
    while True:
        for client in clients:
            await client.send({"cmd": "stats"})
        count = 0
        for client in clients:
            while (message := await next_message(client, {"stats", "ready"}, 60))["type"] == "ready":
                ready[client.name] = message
            count += message["ready"] + message["failed"]
        if len(ready) == len(clients):
            return [ready[c.name] for c in clients]
        now = time.monotonic()
        if count != last_count:
            last_count, last_progress = count, now
        elif now - last_progress > stall_timeout:
            raise RuntimeError(f"{what}: no progress for {stall_timeout:.0f}s at {count} sockets")
        if now - last_print > 10:
            console.print(f"    {what}: {count} sockets ready")
            last_print = now
        await asyncio.sleep(1.0)


async def run_state_e2e(args: argparse.Namespace, workdir: Path, node: str) -> dict[str, Any]:
    sizes = sorted(args.e2e_sizes)
    n_max = sizes[-1]
    procs = args.client_procs
    tokens = issue_tokens([(f"u{i}", f"Student {i}") for i in range(n_max)])
    fresh_tokens = issue_tokens(
        [(f"fresh{k}", f"Fresh {k}") for k in range(len(sizes) * args.fresh_joins + args.mss_joins)]
    )
    server = ServerProcess("engine", free_port(), workdir, module=SERVER_MODULE)
    clients: list[ClientProcess] = []
    result: dict[str, Any] = {"topic": STATE_TOPIC, "sizes": sizes, "stages": []}
    try:
        await server.start()
        result["rss_before_kb"] = proc_rss_kb(server.pid)
        specs = [[token, 0, STATE_TOPIC] for token in tokens]
        clients = await start_clients("hold", specs, [ws_url(server.port)], args, workdir, node, "hold")
        pids = {"server": server.pid, **{c.name: c.pid for c in clients}}
        fresh = iter(fresh_tokens)
        previous = 0
        for size in sizes:
            console.print(f"  presence_state end to end: growing the room to {size} users")
            meter = CpuMeter(pids).start()
            for p, client in enumerate(clients):
                await client.send({"cmd": "grow", "to": len(range(p, size, procs))})
            ready = await wait_ready(clients, f"room of {size}", args.stall_timeout)
            ramp = meter.stop()
            await asyncio.sleep(args.settle)
            holders = await stats(clients)
            present = sum(r["ready"] for r in ready)
            joins = []
            for _ in range(args.fresh_joins):
                # Apart by more than diff_interval: the previous fresh client's leave is fanned out.
                await asyncio.sleep(args.fresh_gap)
                joins.append(await fresh_join(server.port, next(fresh), STATE_TOPIC))
            server_cpu = ramp["processes"]["server"]["cpu_s"]
            stage = {
                "present": present,
                "failed": sum(r["failed"] for r in ready),
                "ramp": ramp,
                "ramp_joins_per_s": (present - previous) / ramp["wall_s"],
                "ramp_server_cpu_ms_per_join": server_cpu * 1e3 / max(present - previous, 1),
                "holders_closed": sum(h["closed_after_ready"] for h in holders),
                "holders_close_reasons": [h["close_reasons"] for h in holders],
                "holders_bytes_in": sum(h["bytes_in"] for h in holders),
                "rss_kb": proc_rss_kb(server.pid),
                "fresh_joins": joins,
                "join_to_state_ms": summary_ms([j["state_ms"] for j in joins if "state_ms" in j]),
                "join_to_reply_ms": summary_ms([j["reply_ms"] for j in joins if "reply_ms" in j]),
                "state_bytes": max((j.get("state_bytes", 0) for j in joins), default=0),
                "state_complete": all(j.get("state_keys") == present + 1 for j in joins),
                "fresh_closed": sum("close_code" in j for j in joins),
            }
            previous = present
            result["stages"].append(stage)
            console.print(
                f"    {present} present: join → presence_state median "
                f"{fmt(stage['join_to_state_ms'].get('median'), '.1f')} ms "
                f"(max {fmt(stage['join_to_state_ms'].get('max'), '.1f')}), {stage['state_bytes']:,} B; "
                f"ramp {stage['ramp_joins_per_s']:.0f} joins/s, "
                f"server {stage['ramp_server_cpu_ms_per_join']:.1f} ms CPU/join "
                f"({ramp['processes']['server']['utilisation']:.0%} of a core); "
                f"holders closed {stage['holders_closed']}"
            )
        # A fresh client whose TCP segments are Ethernet-sized, as across a real network: the kernel
        # then takes far less of a large write at once than on loopback (64 KiB segments).
        mss_joins = []
        for _ in range(args.mss_joins):
            await asyncio.sleep(args.fresh_gap)
            mss_joins.append(await fresh_join(server.port, next(fresh), STATE_TOPIC, mss=ETHERNET_MSS))
        result["ethernet_mss_joins"] = mss_joins
        result["ethernet_mss_join_to_state_ms"] = summary_ms(
            [j["state_ms"] for j in mss_joins if "state_ms" in j]
        )
        result["ethernet_mss_closed"] = [
            f"{j['close_code']} {j.get('close_reason', '')}" for j in mss_joins if "close_code" in j
        ]
        result["server_counters"] = await server_counters(server.port)
        result["holders_closed_total"] = sum(h["closed_after_ready"] for h in await stats(clients))
        console.print(
            f"    {len(mss_joins)} fresh joins with a {ETHERNET_MSS}-byte MSS: join → presence_state "
            f"median {fmt(result['ethernet_mss_join_to_state_ms'].get('median'), '.1f')} ms, "
            f"max {fmt(result['ethernet_mss_join_to_state_ms'].get('max'), '.1f')} ms; "
            f"closed by the server afterwards: {result['ethernet_mss_closed'] or 'none'}; "
            f"server slow-consumer drops: {result['server_counters'].get('slow_consumers_dropped')}"
        )
        return result
    finally:
        await stop_all(clients, [server])


# 4. Join/leave churn.


async def observe_rooms(port: int, rooms: list[str], tag: str) -> dict[str, Any]:
    """Join every room with fresh observer sockets (≤ 90 joins each: the per-socket topic and rate
    limits) and return each room's presence_state."""
    states: dict[str, Any] = {}
    chunks = [rooms[k : k + 90] for k in range(0, len(rooms), 90)]
    tokens = issue_tokens([(f"observer-{tag}-{k}", f"Observer {k}") for k in range(len(chunks))])
    for token, chunk in zip(tokens, chunks, strict=True):
        async with ws_connect(
            f"{ws_url(port)}&token={token}", proxy=None, compression=None, ping_interval=None, max_size=None
        ) as ws:
            for k, topic in enumerate(chunk):
                await ws.send(orjson.dumps([str(k), str(k), topic, "phx_join", {}]).decode())
            while len([t for t in chunk if t in states]) < len(chunk):
                message = orjson.loads(await asyncio.wait_for(ws.recv(decode=False), 30))
                if message[3] == "presence_state":
                    states[message[2]] = message[4]
                elif message[3] == "phx_reply" and message[4]["status"] != "ok":
                    raise RuntimeError(f"observer join of {message[2]} refused: {message[4]}")
    return states


def without_observers(state: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in state.items() if not key.startswith("observer-")}


async def check_rooms(
    servers: list[ServerProcess], expected: dict[str, set[str]], timeout: float
) -> dict[str, Any]:
    """Every room on every node lists exactly its users, one meta each, and the nodes agree."""
    t0 = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        states = [
            await observe_rooms(s.port, sorted(expected), f"{k}-{attempt}") for k, s in enumerate(servers)
        ]
        problems = []
        for topic, users in sorted(expected.items()):
            listings = [without_observers(states_of_node[topic]) for states_of_node in states]
            for k, listing in enumerate(listings):
                if set(listing) != users:
                    problems.append(f"node {k} {topic}: {len(listing)} users listed, {len(users)} present")
                elif any(len(v["metas"]) != 1 for v in listing.values()):
                    problems.append(f"node {k} {topic}: a user with more than one meta")
            if any(listing != listings[0] for listing in listings[1:]):
                problems.append(f"{topic}: the nodes' presence_state differ")
        if not problems or time.monotonic() - t0 > timeout:
            return {
                "rooms": len(expected),
                "users": sum(len(u) for u in expected.values()),
                "nodes": len(servers),
                "ok": not problems,
                "problems": problems[:10],
                "attempts": attempt,
                "check_s": time.monotonic() - t0,
            }
        await asyncio.sleep(0.5)


async def churn_phase(
    clients: list[ClientProcess], pids: dict[str, int], name: str, seconds: float, rate: float | None
) -> dict[str, Any]:
    per_process = None if rate is None else rate / len(clients)
    for client in clients:
        await client.send({"cmd": "phase", "name": name, "rate": per_process})
    for client in clients:
        await next_message(client, {"phase_started"}, 10)
    meter = CpuMeter(pids).start()
    await asyncio.sleep(seconds)
    for client in clients:
        await client.send({"cmd": "end"})
    reports = [await next_message(client, {"phase"}, 30) for client in clients]
    cpu = meter.stop()
    ops = sum(r["ops"] for r in reports)
    bins = merge_hists(reports)
    lat_sum = sum(r["lat_sum_ms"] for r in reports)
    server_names = [n for n in pids if n.startswith("server")]
    client_names = [c.name for c in clients]
    server_cpu = sum(cpu["processes"][n]["cpu_s"] for n in server_names if n in cpu["processes"])
    server_user = sum(cpu["processes"][n]["user_s"] for n in server_names if n in cpu["processes"])
    client_cpu = sum(cpu["processes"][n]["cpu_s"] for n in client_names if n in cpu["processes"])
    return {
        "mode": "closed loop" if rate is None else "open loop",
        "target_ops_per_s": rate,
        "ops": ops,
        "joins": sum(r["joins"] for r in reports),
        "leaves": sum(r["leaves"] for r in reports),
        "ops_per_s": ops / cpu["wall_s"],
        "server_cpu_us_per_op": server_cpu * 1e6 / ops if ops else None,
        "server_user_us_per_op": server_user * 1e6 / ops if ops else None,
        "client_cpu_us_per_op": client_cpu * 1e6 / ops if ops else None,
        "server_utilisation": {n: cpu["processes"][n]["utilisation"] for n in server_names},
        "client_utilisation": {n: cpu["processes"][n]["utilisation"] for n in client_names},
        "redis_utilisation": cpu["processes"].get("redis", {}).get("utilisation"),
        "machine_busy_cores": cpu["machine_busy_cores"],
        "other_busy_cores": cpu["other_busy_cores"],
        "latency_ms": {
            "p50": percentile(bins, 0.50),
            "p99": percentile(bins, 0.99),
            "p999": percentile(bins, 0.999),
            "max": max(r["lat_max_ms"] for r in reports),
            "mean": lat_sum / ops if ops else None,
        },
        "reply_errors": sum(r["reply_errors"] for r in reports),
        "reply_error_reasons": [r["reply_error_reasons"] for r in reports if r["reply_errors"]],
        "late_ops": sum(r["late_ops"] for r in reports),
        "stuck_ops": sum(r["stuck_ops"] for r in reports),
        "closed_sockets": sum(r["closed_after_ready"] for r in reports),
        "close_reasons": [r["close_reasons"] for r in reports if r["closed_after_ready"]],
        "pushes": {k: sum(r["pushes"][k] for r in reports) for k in reports[0]["pushes"]},
        "slow_ops": [s for r in reports for s in r["slow_ops"]][:10],
        "ops_over_1s": sum(r["over_1s"] for r in reports),
        "wall_s": cpu["wall_s"],
        "cpu": cpu,
    }


async def run_churn(args: argparse.Namespace, workdir: Path, node: str, *, cluster: bool) -> dict[str, Any]:
    n_servers = 2 if cluster else 1
    env = {"BROKER_URL": args.redis_url} if cluster else {}
    servers = [
        ServerProcess(f"engine{k}", free_port(), workdir, module=SERVER_MODULE, env=env)
        for k in range(n_servers)
    ]
    clients: list[ClientProcess] = []
    label = "two nodes, Redis" if cluster else "one node, memory broker"
    result: dict[str, Any] = {
        "nodes": n_servers,
        "broker": args.redis_url if cluster else "memory://",
        "rooms": args.rooms,
        "users_per_room": args.users_per_room,
    }
    try:
        for server in servers:
            await server.start()
        if cluster:
            await asyncio.sleep(1.0)  # the trackers exchange sync_req/state
        n = args.rooms * args.users_per_room
        users = [
            (f"r{i // args.users_per_room}-u{i % args.users_per_room}", f"Student {i}") for i in range(n)
        ]
        tokens = issue_tokens(users)
        # Socket i is in room i // users_per_room; consecutive pairs alternate between the nodes, so
        # every room has users on each node and every Node process talks to each node.
        specs = [
            [tokens[i], (i // args.client_procs) % n_servers, f"{ROOM_PREFIX}{i // args.users_per_room}"]
            for i in range(n)
        ]
        urls = [ws_url(s.port) for s in servers]
        console.print(f"  churn, {label}: {n} sockets in {args.rooms} rooms")
        t0 = time.monotonic()
        clients = await start_clients("churn", specs, urls, args, workdir, node, "churn")
        ready = [await next_message(c, {"ready"}, 120) for c in clients]
        result["connect_s"] = time.monotonic() - t0
        result["sockets"] = sum(r["ready"] for r in ready)
        result["connect_failures"] = sum(r["failed"] for r in ready)
        pids = {f"server{k}": s.pid for k, s in enumerate(servers)}
        pids.update({c.name: c.pid for c in clients})
        rpid = redis_pid() if cluster else None
        if rpid is not None:
            pids["redis"] = rpid
        # Every socket joins once, all at once (as at a node's start), and stays: the first join of
        # each room on each node subscribes its topic at the broker. Churn then starts in the rooms.
        t0 = time.monotonic()
        for client in clients:
            await client.send({"cmd": "prime" if args.prime else "stats"})
        primed = [await next_message(c, {"primed" if args.prime else "stats"}, 120) for c in clients]
        if not args.prime:  # the first joins happen in the warm-up, among other sockets' churn
            primed = [
                {"joins": 0, "p50_ms": 0, "p99_ms": 0, "max_ms": 0, "over_1s": 0, "slow": [], "errors": 0}
            ]
        result["first_joins"] = {
            "joins": sum(p["joins"] for p in primed),
            "wall_s": time.monotonic() - t0,
            "p50_ms": max(p["p50_ms"] or 0 for p in primed),
            "p99_ms": max(p["p99_ms"] or 0 for p in primed),
            "max_ms": max(p["max_ms"] or 0 for p in primed),
            "over_1s": sum(p["over_1s"] for p in primed),
            "slow_examples": [s for p in primed for s in p["slow"]][:10],
            "errors": sum(p["errors"] for p in primed),
        }
        first = result["first_joins"]
        console.print(
            f"    first join of every socket: {first['wall_s']:.1f}s for {first['joins']}, "
            f"p50 {first['p50_ms']:.0f} ms (worst process), max {first['max_ms']:.0f} ms, "
            f"{first['over_1s']} over 1 s"
        )
        phases: dict[str, Any] = {}
        await churn_phase(clients, pids, "warmup", args.churn_warmup, None)
        phases["saturated"] = sat = await churn_phase(clients, pids, "saturated", args.churn_duration, None)
        rate = args.paced_fraction * sat["ops_per_s"]
        await churn_phase(clients, pids, "paced-warmup", args.paced_warmup, rate)
        phases["paced"] = await churn_phase(clients, pids, "paced", args.paced_duration, rate)
        result["phases"] = phases
        for name, phase in phases.items():
            lat = phase["latency_ms"]
            servers_util = "+".join(f"{u:.0%}" for u in phase["server_utilisation"].values())
            clients_util = "+".join(f"{u:.0%}" for u in phase["client_utilisation"].values())
            target = phase["target_ops_per_s"]
            mode = phase["mode"] if target is None else f"{phase['mode']} at {target:,.0f}/s"
            console.print(
                f"    {name:<9} {phase['ops_per_s']:>8,.0f} ops/s ({mode}), "
                f"{fmt(phase['server_cpu_us_per_op'], '.0f')} µs server CPU/op, server {servers_util}, "
                f"clients {clients_util}, p50 {fmt(lat['p50'], '.2f')} p99 {fmt(lat['p99'], '.2f')} ms, "
                f"errors {phase['reply_errors']}, closed {phase['closed_sockets']}, "
                f"late {phase['late_ops']}, over 1 s {phase['ops_over_1s']}, "
                f"other load {phase['other_busy_cores']:.2f} cores"
            )
        # Everyone back in their room, then the state every node shows.
        for client in clients:
            await client.send({"cmd": "stop"})
        settled = [await next_message(c, {"settled"}, 30) for c in clients]
        result["settled"] = {
            "in_room": sum(s["in_room"] for s in settled),
            "open": sum(s["open"] for s in settled),
            "timed_out": any(s["timed_out"] for s in settled),
        }
        open_sockets = result["settled"]["open"]
        expected: dict[str, set[str]] = {}
        for i, (uid, _) in enumerate(users):
            expected.setdefault(f"{ROOM_PREFIX}{i // args.users_per_room}", set()).add(uid)
        if open_sockets != n:
            console.print(f"[red]    {n - open_sockets} churn sockets closed; the room check will fail")
        await asyncio.sleep(SETTLE_WAIT)
        result["rooms_check"] = check = await check_rooms(servers, expected, args.converge_timeout)
        verdict = "[green]complete and identical" if check["ok"] else "[red]" + "; ".join(check["problems"])
        console.print(
            f"    final state: {check['users']} users in {check['rooms']} rooms on {check['nodes']} node(s): "
            f"{verdict}[/] "
            f"({check['attempts']} attempt(s), the first {SETTLE_WAIT:.1f}s after the last join answered)"
        )
        result["server_counters"] = [await server_counters(s.port) for s in servers]
        return result
    finally:
        await stop_all(clients, servers)


# Reporting.


def churn_clean(run: dict[str, Any]) -> bool:
    counters_ok = all(
        c.get("slow_consumers_dropped", 0) == 0
        and c.get("rate_limited", 0) == 0
        and c.get("channel_crashes", 0) == 0
        and c.get("joins_refused", 0) == 0
        for c in run.get("server_counters", [])
    )
    return (
        counters_ok
        and run.get("connect_failures", 1) == 0
        and run["rooms_check"]["ok"]
        and all(
            p["reply_errors"] == 0 and p["stuck_ops"] == 0 and p["closed_sockets"] == 0
            for p in run["phases"].values()
        )
    )


def print_tables(results: dict[str, Any]) -> None:
    out = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title="presence_state: phx_join → complete presence_state")
    for column in ("where", "present users", "median ms", "p99 / max ms", "frame bytes", "notes"):
        table.add_column(column, justify="right")
    inproc = results.get("state_inproc")
    if inproc:
        for key, label in (
            ("gc_on", "in process, GC on"),
            ("gc_off", "in process, GC off"),
            ("gc_on_ballast", "in process, GC on, ballast"),
        ):
            if key in inproc:
                r = inproc[key]
                table.add_row(
                    label,
                    f"{inproc['users']:,}",
                    fmt(r["total_ms"]["median"], ".2f"),
                    f"{fmt(r['total_ms']['p99'], '.2f')} / {fmt(r['total_ms']['max'], '.2f')}",
                    f"{r['frame_bytes']:,}",
                    f"listing {r['listing_ms']['median']:.2f} + encode {r['encode_ms']['median']:.2f} ms; "
                    f"GC runs {r['gc_collections']}",
                )
    e2e = results.get("state_e2e")
    if e2e:
        for stage in e2e["stages"]:
            s = stage["join_to_state_ms"]
            table.add_row(
                "engine, end to end",
                f"{stage['present']:,}",
                fmt(s.get("median"), ".1f"),
                f"- / {fmt(s.get('max'), '.1f')}",
                f"{stage['state_bytes']:,}",
                f"reply {fmt(stage['join_to_reply_ms'].get('median'), '.1f')} ms; "
                f"complete: {stage['state_complete']}; ramp {stage['ramp_joins_per_s']:.0f} joins/s, "
                f"{stage['ramp_server_cpu_ms_per_join']:.1f} ms server CPU/join",
            )
        mss = e2e.get("ethernet_mss_join_to_state_ms", {})
        closed = e2e.get("ethernet_mss_closed", [])
        table.add_row(
            f"engine, client MSS {ETHERNET_MSS}",
            f"{e2e['stages'][-1]['present']:,}",
            fmt(mss.get("median"), ".1f"),
            f"- / {fmt(mss.get('max'), '.1f')}",
            f"{e2e['stages'][-1]['state_bytes']:,}",
            f"closed after the state: {len(closed)} of {mss.get('n', 0)}"
            + (f" ({closed[0]})" if closed else ""),
        )
    out.print(table)

    table = Table(title="Join/leave churn (an op = a completed phx_join or phx_leave reply)")
    for column in (
        "what",
        "mode",
        "ops/s",
        "server CPU µs/op",
        "server CPU",
        "clients CPU",
        "p50 / p99 ms",
        "ops > 1 s",
        "errors",
        "final state",
    ):
        table.add_column(column, justify="right")
    tracker = results.get("tracker_inproc")
    if tracker:
        for variant in ("alone", "with_peer"):
            r = tracker[variant]
            table.add_row(
                f"tracker in process, {variant.replace('_', ' ')}",
                "track+untrack",
                f"{r['ops_per_s']:,.0f}",
                f"{r['cpu_us_per_op']:.2f}",
                "-",
                "-",
                "-",
                "-",
                "-",
                "peer converged"
                if r.get("peer_converged")
                else ("-" if variant == "alone" else "[red]differs"),
            )
    for key, label in (("churn", "engine, 1 node"), ("churn_cluster", "engine, 2 nodes + Redis")):
        run = results.get(key)
        if not run:
            continue
        for name, phase in run["phases"].items():
            lat = phase["latency_ms"]
            errors = phase["reply_errors"] + phase["stuck_ops"] + phase["closed_sockets"]
            table.add_row(
                label,
                f"{name}: {phase['mode']}",
                f"{phase['ops_per_s']:,.0f}",
                fmt(phase["server_cpu_us_per_op"], ".0f"),
                "+".join(f"{u:.0%}" for u in phase["server_utilisation"].values()),
                "+".join(f"{u:.0%}" for u in phase["client_utilisation"].values()),
                f"{fmt(lat['p50'], '.1f')} / {fmt(lat['p99'], '.1f')}",
                str(phase["ops_over_1s"]),
                str(errors) + (f" (late {phase['late_ops']})" if phase["late_ops"] else ""),
                "complete, identical" if run["rooms_check"]["ok"] else "[red]mismatch",
            )
    out.print(table)
    out.print(
        f"background load before the run: {results['background_load_cores']:.2f} cores; "
        f"all clean: {results['ok']}"
    )


def parse_sizes(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.presence", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--parts",
        default="state-inproc,tracker,state-e2e,churn,churn-cluster",
        help="comma-separated: state-inproc, tracker, state-e2e, churn, churn-cluster",
    )
    parser.add_argument("--state-users", type=int, default=10000, help="users present, in-process timing")
    parser.add_argument("--state-runs", type=int, default=50, help="timed runs of the in-process listing")
    parser.add_argument(
        "--ballast",
        type=int,
        default=1_000_000,
        help="long-lived objects for the in-process GC variant (0: skip)",
    )
    parser.add_argument(
        "--e2e-sizes",
        type=parse_sizes,
        default=[1000, 2500, 5000],
        help="room sizes for the end-to-end presence_state (10,000 takes about 5 more minutes)",
    )
    parser.add_argument("--fresh-joins", type=int, default=9, help="timed fresh joins per room size")
    parser.add_argument(
        "--mss-joins",
        type=int,
        default=3,
        help=f"fresh joins with a {ETHERNET_MSS}-byte MSS at the largest size",
    )
    parser.add_argument("--fresh-gap", type=float, default=0.6, help="seconds between fresh joins")
    parser.add_argument("--hold-concurrency", type=int, default=50, help="joins in flight per hold process")
    parser.add_argument(
        "--stall-timeout", type=float, default=60.0, help="give up a ramp after this long idle"
    )
    parser.add_argument("--rooms", type=int, default=250, help="churn rooms")
    parser.add_argument(
        "--users-per-room", type=int, default=20, help="churn sockets (distinct users) per room"
    )
    parser.add_argument(
        "--prime",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="every socket joins once before the churn starts (--no-prime: first joins amid the churn)",
    )
    parser.add_argument("--churn-warmup", type=float, default=3.0, help="seconds of unreported closed loop")
    parser.add_argument("--churn-duration", type=float, default=10.0, help="seconds of the closed-loop phase")
    parser.add_argument(
        "--paced-fraction",
        type=float,
        default=0.6,
        help="open-loop rate as a fraction of the closed-loop rate",
    )
    parser.add_argument("--paced-warmup", type=float, default=2.0, help="seconds of unreported open loop")
    parser.add_argument("--paced-duration", type=float, default=8.0, help="seconds of the open-loop phase")
    parser.add_argument(
        "--tracker-seconds", type=float, default=3.0, help="seconds per in-process tracker run"
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="broker of the two-node run")
    parser.add_argument("--converge-timeout", type=float, default=10.0, help="seconds to wait for the nodes")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds idle after a ramp")
    parser.add_argument(
        "--client-procs", type=int, default=2, help="Node processes the sockets are split over"
    )
    parser.add_argument(
        "--connect-concurrency", type=int, default=100, help="handshakes in flight per process"
    )
    parser.add_argument(
        "--source-addresses", type=int, default=0, help="spread client sockets over this many 127.x addresses"
    )
    parser.add_argument(
        "--node-arg", action="append", default=[], help="extra node flag for the client (e.g. --cpu-prof)"
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep server and client logs and configs here"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    parser.add_argument(
        "--out", type=Path, default=None, help="results file (default bench/results/presence-…)"
    )
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    known = {"state-inproc", "tracker", "state-e2e", "churn", "churn-cluster"}
    if unknown := set(args.parts) - known:
        parser.error(f"unknown parts {sorted(unknown)}: choose from {sorted(known)}")
    return args


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    node = shutil.which("node")
    if node is None:
        raise SystemExit("node is not on PATH: the bench client is a Node program (make node)")
    if not (ROOT / "tests" / "js" / "node_modules" / "ws").is_dir():
        raise SystemExit("tests/js/node_modules/ws is missing: run `make node`")
    # Ctrl-C and SIGTERM cancel this task, so every `finally` below stops what it started.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    started = dt.datetime.now(dt.UTC)
    idle_load = await background_load()
    if idle_load > 0.2:
        console.print(
            f"[yellow]warning: the machine is not idle ({idle_load:.2f} cores busy before the benchmark); "
            "rates and latency will suffer, CPU per op much less so"
        )
    results: dict[str, Any] = {
        "benchmark": "presence",
        "started_at": started.isoformat(timespec="seconds"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": environment(node),
        "background_load_cores": idle_load,
        "presence_config": {
            "diff_interval": PresenceConfig().diff_interval,
            "heartbeat_interval": PresenceConfig().heartbeat_interval,
        },
    }
    with contextlib.ExitStack() as stack:
        if args.workdir is not None:
            workdir = args.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-presence-")))
        if "state-inproc" in args.parts:
            console.print(f"[bold]presence_state in process[/], {args.state_users} users")
            results["state_inproc"] = await run_state_inproc(args)
            r = results["state_inproc"]["gc_on"]
            console.print(
                f"  median {r['total_ms']['median']:.2f} ms, p99 {r['total_ms']['p99']:.2f} ms, "
                f"{r['frame_bytes']:,} bytes"
            )
        if "tracker" in args.parts:
            console.print("[bold]tracker track/untrack in process[/]")
            results["tracker_inproc"] = await run_tracker_inproc(args)
            for variant in ("alone", "with_peer"):
                r = results["tracker_inproc"][variant]
                console.print(f"  {variant}: {r['ops_per_s']:,.0f} ops/s, {r['cpu_us_per_op']:.2f} µs CPU/op")
        if "state-e2e" in args.parts:
            console.print("[bold]presence_state end to end[/]")
            results["state_e2e"] = await run_state_e2e(args, workdir, node)
        if "churn" in args.parts:
            console.print("[bold]join/leave churn, one node[/]")
            results["churn"] = await run_churn(args, workdir, node, cluster=False)
        if "churn-cluster" in args.parts:
            console.print("[bold]join/leave churn, two nodes on Redis[/]")
            results["churn_cluster"] = await run_churn(args, workdir, node, cluster=True)
    checks = []
    if "state_e2e" in results:
        e2e = results["state_e2e"]
        checks.append(all(s["state_complete"] and s["failed"] == 0 for s in e2e["stages"]))
        checks.append(e2e["holders_closed_total"] == 0)
        checks.append(all(s["fresh_closed"] == 0 for s in e2e["stages"]) and not e2e["ethernet_mss_closed"])
        checks.append(e2e["server_counters"].get("slow_consumers_dropped", 0) == 0)
    for key in ("churn", "churn_cluster"):
        if key in results:
            checks.append(churn_clean(results[key]))
    results["ok"] = all(checks)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile_limit()  # inherited by the server and Node processes
    os.chdir(ROOT)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            results = runner.run(main_async(args))
    except (asyncio.CancelledError, KeyboardInterrupt):
        console.print("[yellow]interrupted: every server and client this run started has been stopped")
        return 130
    out = args.out or ROOT / "bench" / "results" / f"presence-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    if args.json:
        sys.stdout.write(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print_tables(results)
    console.print(f"results written to {out}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
