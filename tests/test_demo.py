"""The demo cohort (web/demo.py): run against a real server it makes every part of the system move, it
stops on time, and `serve --demo` starts it only where it is safe and takes it down with the server."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import ROOT, free_port, make_token
from sqlalchemy import func, select

from store import Database, LoopItem
from web.demo import BACKFILL_GAP, Demo, DemoOptions, Person, advance_streak
from web.demo import main as demo_main

ADMIN = {"authorization": f"Bearer {make_token('ops', 'admin')}"}


def get(server: Any, path: str) -> Any:
    response = httpx.get(f"{server.http}{path}", headers=ADMIN, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def until(check: Any, timeout: float = 15.0) -> Any:
    """Poll `check()` until it returns something truthy (the consumers run behind the API)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.25)


def demo_processes(url: str) -> list[int]:
    """Pids of demo drivers aimed at `url` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"web.demo" in argv and url.encode() in argv:
            found.append(int(entry.name))
    return found


def test_the_demo_cohort_moves_feeds_loops_links_experiments_and_the_k_factor(
    server_factory: Any, server_database: str, tmp_path: Path
) -> None:
    server = server_factory()
    started = time.monotonic()
    args = ["--url", server.http, "--students", "16", "--speed", "8", "--seed", "3", "--duration", "15"]
    run = subprocess.run(
        [sys.executable, "-m", "web.demo", *args, "--summary-every", "5"],
        cwd=tmp_path,
        env={**server.env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - started
    assert run.returncode == 0, run.stderr[-3000:]
    assert elapsed < 15 + 8, f"the driver overran its duration: {elapsed:.1f} s"
    summaries = [line for line in run.stdout.splitlines() if line.startswith("demo ")]
    assert len(summaries) >= 3, run.stdout
    assert summaries[-1].endswith("errors 0"), (summaries[-1], run.stderr[-3000:])

    # Links were shared and clicked, and at least one converted (attribution runs behind the API).
    report = until(lambda: (r := get(server, "/api/metrics/k-factor?days=7"))["signups"] >= 1 and r)
    assert report, get(server, "/api/metrics/k-factor?days=7")
    assert report["invites_sent"] > 0 and report["clicks"] > 0
    assert report["active_users"] > 0 and report["k_factor"] > 0
    assert {s["source"] for s in report["by_source"]} & {"session_share", "direct", "buddy_challenge"}

    # Studying shows up in the feeds.
    feed = until(lambda: get(server, "/api/feeds/global?limit=20")["items"])
    assert feed, "no feed items"

    # Both experiments run; the share card's exposures are sent by the "app" after each visit.
    listed = {e["key"]: e["status"] for e in get(server, "/api/experiments")["experiments"]}
    assert listed == {"demo-challenge-deadline": "running", "demo-share-card": "running"}
    exposures = {
        key: sum(v["exposures"] for v in get(server, f"/api/experiments/{key}/results")["variants"])
        for key in listed
    }
    assert exposures["demo-share-card"] > 0, exposures

    # The loops ran: items exist (challenges, rallies, rescues, nudges, parent cards) and the
    # orchestrator recorded its decisions, which the guardrails read.
    async def loop_items() -> dict[str, int]:
        database = Database(server_database)
        try:
            async with database.session() as session:
                rows = await session.execute(select(LoopItem.loop, func.count()).group_by(LoopItem.loop))
                return {loop: int(n) for loop, n in rows.all()}
        finally:
            await database.dispose()

    items = asyncio.run(loop_items())
    assert set(items) & {"buddy_challenge", "results_rally", "streak_rescue"}, items
    guardrails = get(server, "/api/guardrails")
    assert sum(loop["prompts"] for loop in guardrails["loops"].values()) > 0


def test_serve_demo_starts_the_cohort_and_takes_it_down_with_the_server(server_factory: Any) -> None:
    server = server_factory(args=("--demo",))
    assert until(lambda: demo_processes(server.http), 10), "no demo driver started"
    # It drives the server through the public API: users become active within seconds.
    assert until(lambda: get(server, "/api/metrics/k-factor?days=7")["active_users"] > 0, 25)
    assert server.proc is not None
    server.proc.send_signal(signal.SIGKILL)  # not even a clean shutdown: the kernel ends the driver
    server.proc.wait()
    assert until(lambda: not demo_processes(server.http), 5), "the demo outlived its server"


@pytest.mark.parametrize(
    ("host", "env", "reason"),
    [("0.0.0.0", {}, "loopback"), ("127.0.0.1", {"ENV": "production"}, "ENV=production")],
)
def test_serve_demo_refuses_other_hosts_and_production(
    tmp_path: Path, host: str, env: dict[str, str], reason: str
) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "web.cli", "serve", "--host", host, "--port", str(free_port()), "--demo"],
        cwd=tmp_path,
        env={**os.environ, "SECRET_KEY": "x" * 48, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2 and reason in run.stderr, run.stderr


def test_the_driver_itself_targets_loopback_only() -> None:
    assert demo_main(["--url", "http://10.1.2.3:8000", "--duration", "1"]) == 2


def test_the_same_seed_makes_the_same_cohort() -> None:
    def cohort(seed: int) -> list[dict[str, Any]]:
        return [p.profile() | {"id": p.id} for p in Demo(DemoOptions(students=20, seed=seed), "k")._cohort()]

    assert cohort(5) == cohort(5)
    assert cohort(5) != cohort(6)


@pytest.mark.parametrize("state", ["seven", "risk", "alive"])
def test_backfilled_streaks_land_where_the_scenarios_need_them(state: str) -> None:
    """The plan follows the server's streak rule: 6 days ending on an earlier date (today makes 7),
    at risk (deadline within 6 h, so a rescue may be asked), or safely alive."""
    # A fixed time of day: late in a UTC day (after about 21:45) no 6-day streak that ended on an earlier
    # date is still alive for 2 more hours, so the demo then skips "seven" (the plan is None) by design.
    now = datetime(2026, 12, 6, 12, 30, tzinfo=UTC)
    student = Person("s", "student", "S", "UTC")
    plan = Demo._streak_plan(student, now, random.Random(1), seven=state == "seven", risk=state == "risk")
    assert plan is not None
    days, last = plan
    probe = Person("s", "student", "S", "UTC")
    for k in range(days):
        advance_streak(probe, last - (days - 1 - k) * BACKFILL_GAP)
    assert probe.streak_deadline is not None and probe.streak_deadline > now
    hours_left = (probe.streak_deadline - now).total_seconds() / 3600
    if state == "seven":
        assert probe.streak_days == 6 and last.date() < now.date()
    elif state == "risk":
        assert probe.streak_days >= 2 and hours_left < 6
    else:
        assert hours_left > 6
