"""The K-factor report over a large history on PostgreSQL (issue 6's benchmark).

`python -m bench.kfactor [--events 1000000] [--links 100000] [--repeat 7] [--json] [--out FILE]`

Builds a fresh database `viral_bench_kfactor`, migrated, and fills it in SQL (generate_series, a
fixed seed) with a history spread over the last 120 days:
- `--links` invite links, each with its `invite_sent` event (props `source`, `link_token`) from one
  of 20,000 referrers across the six loop sources;
- about 2.5 clicks per link on 60 % of the links (distinct visitors, some repeats);
- one signup in five links (20 % conversion), each a `signup` event of a new user with its
  `referral_token` and a `conversions` row, half of them activated by a `first_value` event;
- the rest of `--events` as ordinary activity (`session_completed`, `quiz_completed`, …) by 50,000
  existing users.
Then it times `metrics.k_factor_report` (what `GET /api/metrics/k-factor` and the live dashboard
push compute) for each window, `--repeat` times after one warm-up, and reports median and max in
milliseconds. Target: < 200 ms for 30 days. Then it serves the filled database and measures event →
`dashboard:k_factor` push latency, with events 1.5 s apart (each the first after a quiet spell) and
50 ms apart (a steady flow, where pushes are coalesced to one a second). Only 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import websockets

from metrics.growth import PERIODS, k_factor_report, loop_efficiency
from store import Database
from store.migrate import upgrade

from .common import (
    background_load,
    bench_token,
    engine_server,
    fresh_pg_database,
    pg_urls,
    shown,
    write_result,
)

DATABASE = "viral_bench_kfactor"
SOURCES = ("buddy_challenge", "results_rally", "proud_parent", "streak_rescue", "study_buddy", "direct")
ACTIVITY = ("session_completed", "quiz_completed", "diagnostic_completed", "practice_completed")
SPAN_DAYS = 120


def fill_sql(events: int, links: int) -> list[str]:
    """The statements that fill the database; every row is derived from generate_series and a seed."""
    signups = links // 5
    activated = signups // 2
    activity = events - links - signups - activated
    if activity < 0:
        raise SystemExit("--events must be at least 1.7 x --links")
    sources = "ARRAY[" + ",".join(f"'{s}'" for s in SOURCES) + "]"
    kinds = "ARRAY[" + ",".join(f"'{k}'" for k in ACTIVITY) + "]"
    span = f"interval '{SPAN_DAYS} days'"
    return [
        "SELECT setseed(0.42)",
        # Links and their invite_sent events: created uniformly over the span, 20k referrers.
        f"""CREATE TEMP TABLE gen_links AS
            SELECT i, 'n' || i AS nonce, 'u' || (i::bigint * 7919 % 20000) AS referrer,
                   ({sources})[1 + i % 6] AS source,
                   now() - random() * {span} AS created_at
            FROM generate_series(1, {links}) AS i""",
        """INSERT INTO links (nonce, token, referrer_id, source, target, created_at, expires_at)
           SELECT nonce, 'v1.' || nonce || '.sig', referrer, source, '/', created_at,
                  created_at + interval '30 days' FROM gen_links""",
        """INSERT INTO events (id, type, user_id, ts, received_at, props, actor_id, published)
           SELECT 'inv' || i, 'invite_sent', referrer, created_at, created_at,
                  jsonb_build_object('source', source, 'link_token', 'v1.' || nonce || '.sig'),
                  referrer, true FROM gen_links""",
        # Clicks: 60 % of links, 1-4 visitors each, a repeat visit now and then.
        """INSERT INTO link_clicks (nonce, visitor, unique_click, clicked_at)
           SELECT l.nonce, 'v' || (l.i * 31 + k) % 500000, k <> 4,
                  LEAST(now() - interval '1 second', l.created_at + random() * interval '48 hours')
           FROM gen_links l, generate_series(1, 4) AS k
           WHERE l.i % 5 <> 0 AND l.i % 5 <> 1 AND k <= 1 + (l.i % 4)""",
        # One signup in five links (i % 5 = 2), within 6 days of the invite, half activated.
        f"""CREATE TEMP TABLE gen_signups AS
            SELECT l.i, 'new' || l.i AS user_id, l.nonce, l.referrer, l.source, l.created_at,
                   LEAST(now() - interval '1 second',
                         l.created_at + random() * interval '6 days') AS signup_at
            FROM gen_links l WHERE l.i % 5 = 2 LIMIT {signups}""",
        """INSERT INTO events (id, type, user_id, ts, received_at, props, actor_id, published)
           SELECT 'su' || i, 'signup', user_id, signup_at, signup_at,
                  jsonb_build_object('referral_token', 'v1.' || nonce || '.sig'), user_id, true
           FROM gen_signups""",
        """INSERT INTO conversions (user_id, referrer_id, nonce, source, model, touched_at, signup_at,
                                    signup_event_id, activated_at)
            SELECT user_id, referrer, nonce, source, 'last_touch', created_at, signup_at, 'su' || i,
                   CASE WHEN i % 10 = 2 AND signup_at + interval '1 day' < now()
                        THEN signup_at + interval '1 day' END
            FROM gen_signups""",
        f"""INSERT INTO events (id, type, user_id, ts, received_at, props, actor_id, published)
            SELECT 'fv' || i, 'first_value', user_id, signup_at + interval '1 day',
                   signup_at + interval '1 day', '{{}}'::jsonb, user_id, true
            FROM gen_signups WHERE i % 10 = 2 AND signup_at + interval '1 day' < now()
            LIMIT {activated}""",
        # Everything else: ordinary activity of 50k existing users.
        f"""INSERT INTO events (id, type, user_id, ts, received_at, props, actor_id, published)
            SELECT 'a' || i, ({kinds})[1 + i % 4], 'u' || (i::bigint * 104729 % 50000), ts, ts,
                   jsonb_build_object('subject', 'algebra', 'score', i % 100), 'system', true
            FROM (SELECT i, now() - random() * {span} AS ts FROM generate_series(1, {activity}) AS i) g""",
        # The ingest keeps this rollup per batch; a bulk load rebuilds it once.
        """INSERT INTO user_activity (user_id, last_ts, last_signup_ts)
           SELECT user_id, max(ts), max(CASE WHEN type = 'signup' THEN ts END)
           FROM events GROUP BY user_id""",
        "VACUUM ANALYZE",
    ]


async def fill(events: int, links: int) -> tuple[str, dict[str, Any]]:
    dsn, url = await fresh_pg_database(DATABASE)
    conn = await asyncpg.connect(dsn)
    t0 = time.perf_counter()
    try:
        for statement in fill_sql(events, links):
            await conn.execute(statement)
        counts = {
            table: await conn.fetchval(f"SELECT count(*) FROM {table}")
            for table in ("events", "links", "link_clicks", "conversions")
        }
    finally:
        await conn.close()
    counts["fill_seconds"] = round(time.perf_counter() - t0, 1)
    return url, counts


async def time_report(database: Database, days: int, repeat: int, fn: Any) -> dict[str, Any]:
    samples = []
    for n in range(repeat + 1):
        async with database.session() as session:
            t0 = time.perf_counter()
            result = await fn(session, days, datetime.now(UTC))
            elapsed = (time.perf_counter() - t0) * 1000
        if n:  # the first run warms the caches and is not counted
            samples.append(elapsed)
    return {
        "days": days,
        "median_ms": round(statistics.median(samples), 1),
        "max_ms": round(max(samples), 1),
        "k_factor": round(result["k_factor"], 4) if isinstance(result, dict) else None,
    }


token = bench_token


async def push_latency(url: str, days: int, spacing: float, count: int) -> dict[str, Any]:
    """Event → dashboard push latency: `viral-engine serve` on the filled database (memory broker,
    consumers in process), one admin socket on `dashboard:k_factor` for `days`, and `count`
    `invite_sent` events posted one at a time, `spacing` seconds apart. An event's latency runs from
    just before its POST to the first `metrics_update` whose `invites_sent` includes it."""
    headers = {"authorization": f"Bearer {token('bench-admin', 'admin')}"}
    sent_at: list[float] = []
    pushes: list[tuple[float, int]] = []
    # The bulk-loaded history never went through the stream; keep the reconciler from replaying it.
    async with (
        engine_server(url, "kfactor", EVENTS_RECONCILE_AFTER=str(400 * 86400)) as (port, _),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http,
    ):
        ws_url = f"ws://127.0.0.1:{port}/socket/websocket?vsn=2.0.0&token={token('bench-admin', 'admin')}"
        async with websockets.connect(ws_url, max_size=None) as ws:
            await ws.send(orjson.dumps(["1", "1", "dashboard:k_factor", "phx_join", {"days": days}]).decode())
            reply = orjson.loads(await ws.recv())
            base = reply[4]["response"]["invites_sent"]
            complete = asyncio.Event()

            async def reader() -> None:
                async for raw in ws:
                    frame = orjson.loads(raw)
                    if frame[3] == "metrics_update":
                        pushes.append((time.perf_counter(), frame[4]["invites_sent"]))
                        if frame[4]["invites_sent"] >= base + count:
                            complete.set()

            read_task = asyncio.create_task(reader())
            run = uuid.uuid4().hex[:6]
            for i in range(count):
                event = {
                    "id": f"lat-{run}-{i}",
                    "type": "invite_sent",
                    "user_id": f"u{i % 20000}",
                    "props": {"source": "direct"},
                }
                sent_at.append(time.perf_counter())
                response = await http.post("/api/events", content=orjson.dumps([event]), headers=headers)
                response.raise_for_status()
                await asyncio.sleep(spacing)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(complete.wait(), 10)
            read_task.cancel()
    latencies = []
    for i, t in enumerate(sent_at):
        seen = next((at for at, n in pushes if n >= base + i + 1 and at >= t), None)
        if seen is not None:
            latencies.append((seen - t) * 1000)
    latencies.sort()

    def pct(q: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else None

    gaps = [b[0] - a[0] for a, b in itertools.pairwise(pushes)]
    return {
        "days": days,
        "events": count,
        "spacing_s": spacing,
        "seen": len(latencies),
        "pushes": len(pushes),
        "min_gap_between_pushes_s": round(min(gaps), 3) if gaps else None,
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "max_ms": round(latencies[-1], 1) if latencies else None,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    background = await background_load()
    if args.reuse:
        _, url = pg_urls(DATABASE)
        await asyncio.to_thread(upgrade, url)
        counts: dict[str, Any] = {}
    else:
        url, counts = await fill(args.events, args.links)
    database = Database(url)
    try:
        report = [await time_report(database, days, args.repeat, k_factor_report) for days in PERIODS]
        loops = [await time_report(database, days, args.repeat, loop_efficiency) for days in (30,)]
    finally:
        await database.dispose()
    latency = [
        await push_latency(url, 30, spacing, count)
        for spacing, count in ((1.5, args.sparse_events), (0.05, args.steady_events))
        if count
    ]
    return {
        "benchmark": "kfactor",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "background_cores": round(background, 2),
        "rows": counts,
        "k_factor_report": report,
        "loop_efficiency": loops,
        "push_latency": latency,
        "target_ms_30_days": 200,
        "ok": all(r["median_ms"] < 200 for r in report if r["days"] <= 30),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--links", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per window (after a warm-up)")
    parser.add_argument("--sparse-events", type=int, default=10, help="latency: events 1.5 s apart")
    parser.add_argument("--steady-events", type=int, default=200, help="latency: events 50 ms apart")
    parser.add_argument("--reuse", action="store_true", help="time the database the last run filled")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--out", type=Path, help="write the JSON here (default: bench/results/)")
    args = parser.parse_args(argv)
    result = asyncio.run(main_async(args))
    out = write_result(result, "kfactor", args.out)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"rows: {result['rows']}")
        for r in result["k_factor_report"]:
            print(f"k_factor_report days={r['days']:>2}: median {r['median_ms']} ms, max {r['max_ms']} ms")
        for r in result["loop_efficiency"]:
            print(f"loop_efficiency days={r['days']:>2}: median {r['median_ms']} ms, max {r['max_ms']} ms")
        for r in result["push_latency"]:
            print(
                f"event -> dashboard push, events {r['spacing_s']} s apart: p50 {r['p50_ms']} ms, "
                f"p99 {r['p99_ms']} ms, max {r['max_ms']} ms ({r['seen']}/{r['events']} seen, "
                f"{r['pushes']} pushes, closest two {r['min_gap_between_pushes_s']} s apart)"
            )
        print(f"written to {shown(out)}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
