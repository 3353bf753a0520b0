"""Event ingest into PostgreSQL, and event → feed push latency (issue 5's benchmark).

`python -m bench.ingest [--events 20000] [--rate 1000] [--seconds 10] [--json] [--out FILE]`

Runs `viral-engine serve` on a fresh PostgreSQL database (memory broker: the consumers run in
the same process, as they do in the embedded setup) and measures over real HTTP and a real socket:
1. batched ingest: `POST /api/events` with 500 events a request, 2 requests in flight;
2. single ingest: one event a request, 8 requests in flight;
3. latency: a socket joined to `feed:global` while events are sent at `--rate` per second (50
   requests a second, e.g. 20 events every 20 ms at 1,000/s); each event's latency is the time
   from just before its request was written to the arrival of its `new_activity` push. Events are
   sent by one client in order and the feed consumer numbers the global feed in order, so event i
   is offset i.
Server CPU comes from /proc. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import websockets

from .common import (
    background_load,
    bench_token,
    engine_server,
    fresh_pg_database,
    proc_cpu_split,
    shown,
    write_result,
)

DATABASE = "viral_bench_ingest"


token = bench_token


def event(i: int, run: str) -> dict[str, Any]:
    return {
        "id": f"{run}-{i}",
        "type": "session_completed",
        "user_id": f"student{i % 500}",
        "props": {"subject": ("algebra", "geometry", "physics")[i % 3], "minutes": 15 + i % 30},
    }


def cpu(pid: int) -> float:
    user, system = proc_cpu_split(pid)
    return user + system


async def ingest_phase(
    port: int, pid: int, events: list[dict], per_request: int, in_flight: int
) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {token('bench-admin', 'admin')}"}
    requests = [events[i : i + per_request] for i in range(0, len(events), per_request)]
    queue: asyncio.Queue[list[dict]] = asyncio.Queue()
    for chunk in requests:
        queue.put_nowait(chunk)
    failures = 0

    async def sender(http: httpx.AsyncClient) -> None:
        nonlocal failures
        while not queue.empty():
            chunk = queue.get_nowait()
            response = await http.post("/api/events", content=orjson.dumps(chunk), headers=headers)
            if response.status_code != 202:
                failures += 1

    limits = httpx.Limits(max_connections=in_flight)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=60) as http:
        cpu0, t0 = cpu(pid), time.perf_counter()
        await asyncio.gather(*(sender(http) for _ in range(in_flight)))
        elapsed = time.perf_counter() - t0
        server_cpu = cpu(pid) - cpu0
    return {
        "events": len(events),
        "per_request": per_request,
        "in_flight": in_flight,
        "seconds": round(elapsed, 3),
        "events_per_s": round(len(events) / elapsed),
        "server_cpu_s": round(server_cpu, 2),
        "failed_requests": failures,
    }


async def latency_phase(port: int, pid: int, rate: int, seconds: float, run: str) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {token('bench-admin', 'admin')}"}
    url = f"ws://127.0.0.1:{port}/socket/websocket?vsn=2.0.0&token={token('bench-reader', 'student')}"
    total = int(rate * seconds)
    sent_at: list[float] = []
    received: dict[int, float] = {}
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps(["1", "1", "feed:global", "phx_join", {"limit": 1}]))
        reply = json.loads(await ws.recv())
        base = reply[4]["response"]["offset"]
        done = asyncio.Event()

        async def reader() -> None:
            async for raw in ws:
                now = time.perf_counter()
                frame = orjson.loads(raw)
                if frame[3] == "new_activity":
                    received[frame[4]["offset"] - base] = now
                    if len(received) >= total:
                        done.set()

        read_task = asyncio.create_task(reader())
        per_request = max(10, rate // 50)  # 50 requests a second, in order, from one client
        interval = per_request / rate
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            cpu0 = cpu(pid)
            start = time.perf_counter()
            for n in range(0, total, per_request):
                target = start + (n / per_request) * interval
                delay = target - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                chunk = [event(i, run) for i in range(n, min(n + per_request, total))]
                now = time.perf_counter()
                sent_at.extend([now] * len(chunk))
                response = await http.post("/api/events", content=orjson.dumps(chunk), headers=headers)
                response.raise_for_status()
            send_seconds = time.perf_counter() - start
            try:
                await asyncio.wait_for(done.wait(), 30)
            except TimeoutError:
                pass
            server_cpu = cpu(pid) - cpu0
        read_task.cancel()
    latencies = sorted((received[i + 1] - sent_at[i]) * 1000 for i in range(total) if (i + 1) in received)

    def pct(q: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else None

    return {
        "rate_target": rate,
        "rate_achieved": round(total / send_seconds),
        "events": total,
        "pushes_received": len(received),
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "max_ms": round(latencies[-1], 1) if latencies else None,
        "server_cpu_s": round(server_cpu, 2),
    }


async def feed_offset(port: int) -> int:
    headers = {"authorization": f"Bearer {token('bench-admin', 'admin')}"}
    async with httpx.AsyncClient() as http:
        page = (await http.get(f"http://127.0.0.1:{port}/api/feeds/global?limit=1", headers=headers)).json()
    return int(page["items"][-1]["offset"]) if page["items"] else 0


async def caught_up(port: int, offset: int, timeout: float = 120.0) -> float:
    """Seconds until the global feed holds `offset` items: the consumers have processed everything."""
    start = time.perf_counter()
    while await feed_offset(port) < offset:
        if time.perf_counter() - start > timeout:
            raise RuntimeError(f"consumers did not catch up to offset {offset} in {timeout}s")
        await asyncio.sleep(0.05)
    return time.perf_counter() - start


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    idle = await background_load(1.0)
    _, database_url = await fresh_pg_database(DATABASE)
    async with engine_server(database_url, "ingest") as (port, pid):
        run = uuid.uuid4().hex[:6]
        batched = await ingest_phase(
            port, pid, [event(i, f"b{run}") for i in range(args.events)], per_request=500, in_flight=2
        )
        # The consumers run behind ingest; how long until they have it all says what they sustain.
        lag = await caught_up(port, args.events)
        batched["consumers_done_after_s"] = round(batched["seconds"] + lag, 3)
        batched["end_to_end_events_per_s"] = round(args.events / (batched["seconds"] + lag))
        single = await ingest_phase(
            port, pid, [event(i, f"s{run}") for i in range(args.single)], per_request=1, in_flight=8
        )
        await caught_up(port, args.events + args.single)
        latency = await latency_phase(port, pid, args.rate, args.seconds, f"l{run}")
    return {
        "benchmark": "ingest",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "background_load_cores": round(idle, 3),
        "database": "postgresql (fresh database, migrated)",
        "batched": batched,
        "single": single,
        "latency": latency,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20000, help="events in the batched phase")
    parser.add_argument("--single", type=int, default=2000, help="events in the one-per-request phase")
    parser.add_argument("--rate", type=int, default=1000, help="events per second in the latency phase")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the latency phase")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument(
        "--out", type=Path, default=None, help="write the JSON here (default: bench/results/)"
    )
    args = parser.parse_args(argv)
    result = asyncio.run(main_async(args))
    out = write_result(result, "ingest", args.out)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
        print(f"written to {shown(out)}")
    ok = result["batched"]["failed_requests"] == 0 and lat_ok(result["latency"])
    return 0 if ok else 1


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    b, s, lat = result["batched"], result["single"], result["latency"]
    table = Table(
        title="Event ingest into PostgreSQL (viral-engine serve, memory broker, consumers in process)"
    )
    for column in ("phase", "events", "stored events/s", "all consumed, events/s", "server CPU s", "notes"):
        table.add_column(column)
    table.add_row(
        "batched",
        str(b["events"]),
        str(b["events_per_s"]),
        str(b["end_to_end_events_per_s"]),
        f"{b['server_cpu_s']} over {b['seconds']} s",
        f"{b['per_request']} per request, {b['in_flight']} in flight, {b['failed_requests']} failed",
    )
    table.add_row(
        "single",
        str(s["events"]),
        str(s["events_per_s"]),
        "",
        f"{s['server_cpu_s']} over {s['seconds']} s",
        f"1 per request, {s['in_flight']} in flight",
    )
    table.add_row(
        f"latency at {lat['rate_achieved']}/s",
        str(lat["events"]),
        "",
        "",
        str(lat["server_cpu_s"]),
        f"event → push p50 {lat['p50_ms']} / p95 {lat['p95_ms']} / p99 {lat['p99_ms']}"
        f" / max {lat['max_ms']} ms; {lat['pushes_received']}/{lat['events']} pushes",
    )
    Console(width=200).print(table)


def lat_ok(latency: dict[str, Any]) -> bool:
    return latency["pushes_received"] == latency["events"]


if __name__ == "__main__":
    sys.exit(main())
