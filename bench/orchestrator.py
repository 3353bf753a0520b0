"""Orchestrator decision latency on PostgreSQL (issue 7: decisions in < 150 ms p99).

`python -m bench.orchestrator [--users 20000] [--history 200000] [--decisions 3000] [--concurrency 8]`

A fresh database `viral_bench_orchestrator` with `--users` profiles (5 % minors, 2 % opted out, mixed
time zones) and `--history` past decisions over the last 48 h; then `--decisions` calls of
`Orchestrator.decide` — the compliance gate plus pacing, and the recorded decision, each in its own
transaction as the loops make them — `--concurrency` at a time, for random sender/recipient pairs
and loops. Reports p50/p95/p99/max in ms and decisions per second. Only 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from loops import Orchestrator
from metrics.compliance import SocialAction
from store import Database

from .common import background_load, fresh_pg_database, shown, write_result

DATABASE = "viral_bench_orchestrator"
LOOPS = ("buddy_challenge", "results_rally", "proud_parent", "streak_rescue", "study_buddy")
ZONES = ("UTC", "Europe/London", "America/New_York", "Asia/Tokyo", "Australia/Sydney")


async def fill(users: int, history: int) -> str:
    dsn, url = await fresh_pg_database(DATABASE)
    zones = "ARRAY[" + ",".join(f"'{z}'" for z in ZONES) + "]"
    loops = "ARRAY[" + ",".join(f"'{x}'" for x in LOOPS) + "]"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT setseed(0.7)")
        await conn.execute(
            f"""INSERT INTO users (id, role, minor, timezone, subjects, opted_out, created_at, updated_at)
                SELECT 'u' || i, 'student', i % 20 = 0, ({zones})[1 + i % 5], '[]'::jsonb, i % 50 = 0,
                       now(), now()
                FROM generate_series(1, {users}) AS i"""
        )
        await conn.execute(
            f"""INSERT INTO prompt_decisions (user_id, sender_id, loop, action, shown, reason, created_at)
                SELECT 'u' || (1 + (random() * ({users} - 1))::int),
                       CASE WHEN i % 2 = 0 THEN 'u' || (1 + (random() * ({users} - 1))::int) END,
                       ({loops})[1 + i % 5], 'prompt', i % 4 <> 0,
                       CASE WHEN i % 4 <> 0 THEN 'ok' ELSE 'cooldown' END,
                       now() - random() * interval '48 hours'
                FROM generate_series(1, {history}) AS i"""
        )
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    return url


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    background = await background_load()
    url = await fill(args.users, args.history)
    database = Database(url)
    orchestrator = Orchestrator()
    rng = random.Random(7)
    latencies: list[float] = []
    reasons: dict[str, int] = {}
    queue: asyncio.Queue[SocialAction] = asyncio.Queue()
    for _ in range(args.decisions):
        sender = f"u{rng.randint(1, args.users)}" if rng.random() < 0.5 else None
        queue.put_nowait(SocialAction(rng.choice(LOOPS), "prompt", sender, f"u{rng.randint(1, args.users)}"))

    async def worker() -> None:
        while not queue.empty():
            action = queue.get_nowait()
            t0 = time.perf_counter()
            async with database.session() as session, session.begin():
                verdict = await orchestrator.decide(session, action, datetime.now(UTC))
            latencies.append((time.perf_counter() - t0) * 1000)
            reasons[verdict.reason] = reasons.get(verdict.reason, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - t0
    await database.dispose()
    latencies.sort()

    def pct(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 2)

    return {
        "benchmark": "orchestrator",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "background_cores": round(background, 2),
        "users": args.users,
        "history_decisions": args.history,
        "decisions": args.decisions,
        "concurrency": args.concurrency,
        "decisions_per_s": round(args.decisions / elapsed),
        "p50_ms": pct(0.5),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "max_ms": round(latencies[-1], 2),
        "reasons": reasons,
        "target_p99_ms": 150,
        "ok": pct(0.99) < 150,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--history", type=int, default=200_000)
    parser.add_argument("--decisions", type=int, default=3_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--out", type=Path, help="write the JSON here (default: bench/results/)")
    args = parser.parse_args(argv)
    result = asyncio.run(main_async(args))
    out = write_result(result, "orchestrator", args.out)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        r = result
        print(
            f"{r['decisions']} decisions, {r['concurrency']} at a time, over {r['history_decisions']:,}"
            f" past ones: p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, p99 {r['p99_ms']} ms,"
            f" max {r['max_ms']} ms; {r['decisions_per_s']}/s; {r['reasons']}"
        )
        print(f"written to {shown(out)}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
