"""`viral-engine loadtest` (SPEC §10): real Phoenix V2 WebSocket clients against a server on this machine.

    viral-engine loadtest --url ws://127.0.0.1:8000 --sockets N --scenario idle|broadcast|rooms|churn|mixed
                          --duration S [--topics T,…] [--rate R] [--procs P] [--json] [--secret KEY]

(also `python -m bench.loadtest …`). The driver (this module) checks the target and the machine's
limits, starts `--procs` client processes (bench/loadtest_worker.py: uvloop, one small
asyncio.Protocol per socket), tells them what to do over pipes, publishes broadcasts itself, reads
the server's /metrics, and prints a progress bar while running and a summary table at the end
(`--json`: one JSON object on stdout instead). Results go to bench/results/loadtest-<scenario>-<time>.json
unless `--no-save`.

Every socket is a distinct user `loadtest-u{i}` (role student) with a token signed with the server's
key: `--secret`, else $SECRET_KEY, else the development key file `.viral-engine-secret` that
`viral-engine serve` writes in its working directory. `{user}` and `{room}` in `--topics` become the
socket's user id and room number.

Scenarios (every socket joins every topic of `--topics`; defaults below):

- `idle`: join `user:{user}`, heartbeat (`--heartbeat`, 30 s), hold for `--duration`. Server memory:
  `process_resident_memory_bytes` and `viral_realtime_sockets` from /metrics before the first
  connection and after every socket joined and `--settle` (2 s) of quiet → RSS per socket.
- `broadcast`: every socket joins `feed:subject:loadtest`; the driver publishes `loadtest_tick`
  `{"seq", "sent_at"}` there with `POST /api/publish` (admin token) at `--rate` per second (default
  10; 0 = the next publish as soon as the previous one answered). Why that topic: any user may join
  a subject feed (SPEC §7) and an admin may publish to any topic (§9a); unlike `presence:*` it tracks
  no presence (no O(room) work per join, no diffs), unlike `leaderboard:*` it keeps no per-viewer
  state, and the made-up subject `loadtest` keeps real users' feeds and their history out of it.
  `sent_at` is `time.monotonic_ns()` (CLOCK_MONOTONIC, one clock for every process on the machine),
  so latency = receive - sent_at needs no clock sync. Reported: delivered frames/s, latency
  p50/p95/p99/max (histograms merged from the workers), per-socket gaps and reordering, frames
  missing at the end (after waiting up to `--drain-timeout` s without progress).
- `rooms`: rooms of `--room-size` (10-50) users, each socket in one: `presence:subject:loadtest-{room}`
  (presence_state to the joiner, presence_diff to the room); during the run sockets send
  `presence_update` (status idle/online) at `--rate` per second in all (default sockets/20), so diffs
  keep flowing. Reported: joins/s, frames/s by event, update → reply latency.
- `churn`: `--sockets` held sockets in presence rooms as above, plus `--churn-rate` new sockets per
  second (default 50), each a fresh user: connect, upgrade, join its room, hold `--churn-hold` s,
  `phx_leave`, close. Reported: connects/joins/leaves/disconnects per second achieved, failures, latencies.
- `mixed`: what a student's app does: `user:{user}`, `presence:subject:loadtest-{room}`,
  `feed:subject:loadtest-{room}`, `leaderboard:loadtest-{room}:daily`; heartbeats; and events at
  `--rate` per second in all (default sockets/60: one a minute per student), sent as the socket event
  `track` on `user:{id}` (SPEC §8 allows it; the same ingest path as POST /api/events):
  `practice_completed` in the room's subject, so feed items and leaderboard updates flow back.

The target must be loopback: the URL's host is resolved and every address must be in 127.0.0.0/8 or
::1, otherwise it exits with status 2 before opening any connection. Exit status: 0 when every
socket joined and nothing went wrong, 1 otherwise (errors, refused joins, missing broadcasts,
sockets closed by the server), 2 for a refused target or an unusable setup.

Limits. Each socket is a file descriptor (two on this machine: the server's end too) and a local
port: sockets are bound to source addresses 127.0.1.1, 127.0.1.2, … (at most 20,000 sockets per
address, fewer if `ip_local_port_range` is narrow; `--source-addrs` sets the minimum count, 8), so
one destination can take far more than the ~28,000 ports one address has. Each worker raises its
RLIMIT_NOFILE (soft up to what it needs, the hard limit too when it may); when the hard limit is
too low for a worker's share the driver starts more workers, and says so. It reports the limits it
hit: nofile, fs.nr_open, fs.file-max, ip_local_port_range, somaxconn, and the server's own
process_max_fds (from /metrics).

The client is not the bottleneck: every worker reports its CPU time (getrusage) and event-loop lag
per phase; the summary shows the run phase's utilisation per worker and warns above 80 % of a
core. See bench/loadtest_worker.py for how that was checked, and bench/README.md ("Load tester")
for numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import ipaddress
import math
import os
import resource
import secrets
import socket
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .common import ROOT, JsonLinesProcess, PublishConnection, machine_cpu, proc_cpu_split, proc_rss_kb
from .loadtest_worker import TICK_EVENT, hist_summary, merge_hist_exports, room_starts

SCENARIOS = ("idle", "broadcast", "rooms", "churn", "mixed")
BROADCAST_TOPIC = "feed:subject:loadtest"
DEFAULT_TOPICS = {
    "idle": ["user:{user}"],
    "broadcast": [BROADCAST_TOPIC],
    "rooms": ["presence:subject:loadtest-{room}"],
    "churn": ["presence:subject:loadtest-{room}"],
    "mixed": [
        "user:{user}",
        "presence:subject:loadtest-{room}",
        "feed:subject:loadtest-{room}",
        "leaderboard:loadtest-{room}:daily",
    ],
}
DEV_SECRET_FILE = ".viral-engine-secret"  # web/config.py writes it in the server's working directory
MAX_PER_SOURCE_ADDR = 20_000
CPU_WARN = 0.8


class Refused(Exception):
    """The load test cannot or must not run; the message says why. Exit status 2."""


# The target.


@dataclass
class Target:
    url: str
    host: str
    port: int
    path: str
    addresses: list[str]
    connect_host: str  # the resolved loopback address the sockets connect to

    @property
    def ipv6(self) -> bool:
        return ":" in self.connect_host

    @property
    def host_header(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _as_v4(address: str) -> str | None:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else None
    return str(ip)


def check_target(url: str) -> Target:
    """Parse the URL and resolve its host: every address must be loopback, or Refused."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme in ("wss", "https"):
        raise Refused(
            f"{url}: wss:// is not supported; the load tester speaks ws:// to a server on this machine"
        )
    if parsed.scheme not in ("ws", "http"):
        raise Refused(f"{url}: the URL must start with ws:// (e.g. ws://127.0.0.1:8000)")
    host = parsed.hostname
    if not host:
        raise Refused(f"{url}: no host in the URL")
    try:
        port = parsed.port or 80
    except ValueError as exc:
        raise Refused(f"{url}: {exc}") from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise Refused(f"{url}: cannot resolve {host!r} ({exc})") from None
    addresses = sorted({str(info[4][0]) for info in infos})
    outside = [a for a in addresses if not _is_loopback(a)]
    if not addresses or outside:
        raise Refused(
            f"refusing to load-test {url}: {host} resolves to {', '.join(outside or ['nothing'])}, "
            "not a loopback address. The load tester only ever targets this machine "
            "(127.0.0.0/8 or ::1): point --url at a server running here."
        )
    # Prefer IPv4 (an IPv4-mapped IPv6 address counts as its IPv4 one): the sockets can then spread
    # their source addresses over 127.0.0.0/8; ::1 is one address.
    v4 = sorted({_as_v4(a) for a in addresses} - {None})
    connect_host = str(v4[0]) if v4 else addresses[0]
    path = parsed.path if parsed.path not in ("", "/") else "/socket/websocket"
    return Target(url, host, port, path, addresses, connect_host)


def resolve_secret(given: str | None) -> tuple[str, str]:
    """(key, where it came from): --secret, else $SECRET_KEY, else ./.viral-engine-secret."""
    if given:
        return given, "--secret"
    env = os.environ.get("SECRET_KEY")
    if env:
        return env, "$SECRET_KEY"
    path = Path(DEV_SECRET_FILE)
    with contextlib.suppress(OSError):
        key = path.read_text().strip()
        if key:
            return key, str(path.resolve())
    raise Refused(
        "no signing key for the sockets' tokens: pass --secret KEY or set SECRET_KEY to the server's "
        f"SECRET_KEY, or run from the directory the server was started in (it keeps {DEV_SECRET_FILE} there "
        "in development)"
    )


# The machine's limits.


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def system_limits() -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ports = (_read("/proc/sys/net/ipv4/ip_local_port_range") or "32768 60999").split()
    file_nr = (_read("/proc/sys/fs/file-nr") or "0 0 0").split()
    return {
        "nofile_soft": soft,
        "nofile_hard": hard,
        "nr_open": int(_read("/proc/sys/fs/nr_open") or 1 << 20),
        "file_max": int(_read("/proc/sys/fs/file-max") or 1 << 20),
        "files_allocated": int(file_nr[0]),
        "ip_local_port_range": [int(ports[0]), int(ports[1])],
        "somaxconn": int(_read("/proc/sys/net/core/somaxconn") or 4096),
        "tcp_max_syn_backlog": int(_read("/proc/sys/net/ipv4/tcp_max_syn_backlog") or 0),
    }


@dataclass
class Plan:
    procs: int
    per_proc_fds: int
    source_addrs: list[str | None]
    limits: dict[str, Any]
    hit: list[str] = field(default_factory=list)


def plan_resources(args: argparse.Namespace, target: Target, churn_in_flight: int) -> Plan:
    """How many worker processes and source addresses N sockets need on this machine, and which
    system limits that runs into (`hit`: what to tell the user)."""
    limits = system_limits()
    total = args.sockets + churn_in_flight
    hit: list[str] = []
    # File descriptors per process: try to lift this process's own limit to what one process would
    # need; what we get is what the workers (started by us, same privileges) can get.
    wanted = min(limits["nr_open"], total + 1024)
    soft, hard = limits["nofile_soft"], limits["nofile_hard"]
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    with contextlib.suppress(ValueError, OSError):
        if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limits["nofile_after_raise"] = [soft, hard]
    per_proc = max(256, hard - 512)
    procs = max(1, args.procs, math.ceil(total / per_proc))
    if procs > args.procs:
        hit.append(
            f"nofile: the hard limit is {hard} open files per process (raising it needs CAP_SYS_RESOURCE; "
            f"fs.nr_open is {limits['nr_open']}), so {total:,} sockets are split over {procs} worker "
            f"processes instead of {args.procs}"
        )
    # Ports: one bound source address offers the ephemeral range once.
    low, high = limits["ip_local_port_range"]
    ports = high - low + 1
    per_addr = max(1, min(MAX_PER_SOURCE_ADDR, int(ports * 0.9)))
    if target.ipv6:
        addrs: list[str | None] = [None]
        if total > per_addr:
            raise Refused(
                f"{total:,} sockets from one IPv6 loopback address (::1) would exhaust its "
                f"{ports:,} ephemeral ports (ip_local_port_range {low}-{high}); use "
                f"ws://127.0.0.1:{target.port}, which lets the sockets spread over 127.0.0.0/8"
            )
    else:
        count = max(args.source_addrs, math.ceil(total / per_addr))
        addrs = [f"127.0.{1 + i // 254}.{1 + i % 254}" for i in range(count)]
        if per_addr < MAX_PER_SOURCE_ADDR and total > per_addr:
            hit.append(
                f"ip_local_port_range {low}-{high}: {ports:,} ports per source address, so sockets are "
                f"spread over {count} addresses (127.0.1.1-{addrs[-1]})"
            )
    concurrency = procs * args.connect_concurrency
    if limits["somaxconn"] < concurrency:
        hit.append(
            f"net.core.somaxconn is {limits['somaxconn']}, below the {concurrency} connections in flight: "
            "the server's accept queue overflows, SYNs are dropped and retried after 1 s "
            "(sysctl -w net.core.somaxconn=4096, or lower --connect-concurrency)"
        )
    # Both ends of every connection are on this machine: two file descriptors each.
    free_files = limits["file_max"] - limits["files_allocated"]
    if 2 * total + 1024 > free_files:
        hit.append(
            f"fs.file-max: {free_files:,} more files can be opened system-wide, {2 * total:,} needed "
            "(client and server ends): sysctl -w fs.file-max=…"
        )
    return Plan(procs, min(hard, total // procs + 1024), addrs, limits, hit)


# HTTP to the server: /metrics, the upgrade pre-flight, publishing.


async def http_get(target: Target, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(target.connect_host, target.port), timeout
    )
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {target.host_header}\r\nConnection: close\r\n\r\n".encode()
        )
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        body = _unchunk(body)
    return int(head.split(b" ", 2)[1]), body


def _unchunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)


async def fetch_metrics(target: Target) -> dict[str, float]:
    """The server's /metrics as {name (with labels): value}; empty if it cannot be read."""
    try:
        status, body = await http_get(target, "/metrics")
    except (OSError, TimeoutError, ValueError, IndexError):
        return {}
    if status != 200:
        return {}
    values: dict[str, float] = {}
    for line in body.decode(errors="replace").splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            values[name] = float(value)
    return values


async def preflight(target: Target, token: str) -> None:
    """One upgrade with a load-test token before starting anything: is a server there, does it take
    our tokens?"""
    query = urllib.parse.urlencode({"vsn": "2.0.0", "token": token})
    request = (
        f"GET {target.path}?{query} HTTP/1.1\r\nHost: {target.host_header}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    )
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(target.connect_host, target.port), 10)
    except (OSError, TimeoutError) as exc:
        raise Refused(
            f"nothing answers at {target.url} ({target.connect_host}:{target.port}): {exc}"
        ) from None
    try:
        writer.write(request.encode())
        line = await asyncio.wait_for(reader.readline(), 10)
    except (OSError, TimeoutError) as exc:
        raise Refused(f"{target.url} did not answer a WebSocket upgrade: {exc}") from None
    finally:
        writer.close()
    parts = line.split(b" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    if status == 403:
        raise Refused(
            "the server refused the load tester's token (HTTP 403 at the upgrade): the key from "
            "--secret / $SECRET_KEY / .viral-engine-secret is not the server's SECRET_KEY"
        )
    if status != 101:
        raise Refused(
            f"a WebSocket upgrade to {target.url}{target.path} answered "
            f"{line.decode(errors='replace').strip()!r}: is this a viral-engine server?"
        )


class Publisher(PublishConnection):
    """`POST /api/publish` over one keep-alive HTTP/1.1 connection, one request in flight."""

    def __init__(self, target: Target, token: str, topic: str) -> None:
        super().__init__(target.connect_host, target.port, token, host_header=target.host_header)
        self.target = target
        self.topic = topic

    async def publish(self, seq: int) -> float:
        """Publish tick `seq` stamped now; returns the round trip in ms (the server answers after the
        fan-out to its local subscribers)."""
        for attempt in (1, 2):
            sent_at = time.monotonic_ns()
            body = orjson.dumps(
                {"topic": self.topic, "event": TICK_EVENT, "payload": {"seq": seq, "sent_at": sent_at}}
            )
            try:
                status, response = await self.request(body)
            except (ConnectionError, OSError):
                await self.close()
                if attempt == 2:
                    raise
                continue  # the server closed an idle keep-alive connection: once more, stamped anew
            if status != 202:
                raise RuntimeError(f"publish answered {status}: {response[:200]!r}")
            return (time.monotonic_ns() - sent_at) / 1e6
        raise AssertionError("unreachable")


# Worker processes.


class WorkerProc(JsonLinesProcess):
    """One `python -m bench.loadtest_worker`, JSON lines both ways."""

    FAILED = ("exited", "crashed")
    STOP_TIMEOUT = 10.0

    def __init__(self, wid: int, config: dict[str, Any], log_dir: Path) -> None:
        super().__init__(f"load-test worker {wid}", log_dir / f"worker-{wid}.log")
        self.wid = wid
        self.config = config
        self.progress: dict[str, Any] = {}

    async def start(self) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        await self._spawn(sys.executable, "-m", "bench.loadtest_worker", env=env)
        await self.send(self.config)

    def _on_message(self, message: dict[str, Any]) -> bool:
        if message["type"] == "progress":
            self.progress = message
            return False
        if message["type"] == "connected":
            self.progress = message
        return True


async def all_of(
    workers: list[WorkerProc], command: dict[str, Any], reply: str, timeout: float
) -> list[dict[str, Any]]:
    for worker in workers:
        await worker.send(command)
    return list(await asyncio.gather(*(w.expect(reply, timeout) for w in workers)))


# Progress display.


class ProgressView:
    """A rich progress bar on stderr (only on a terminal): connected/joined, frames/s."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.enabled = enabled
        self.total = total
        self._progress: Any = None
        self._task: Any = None
        self._frames = 0
        self._t = time.monotonic()
        self.rate = 0.0

    def __enter__(self) -> ProgressView:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description:<10}"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                refresh_per_second=4,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("connecting", total=self.total, info="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def update(self, workers: list[WorkerProc], phase: str, completed: float, total: float) -> None:
        states = [w.progress for w in workers]
        frames = sum(s.get("frames", 0) for s in states)
        now = time.monotonic()
        if now - self._t >= 0.5:
            self.rate = (frames - self._frames) / (now - self._t)
            self._frames, self._t = frames, now
        if self._progress is None:
            return
        connected = sum(s.get("connected", 0) for s in states)
        joined = sum(s.get("joined", 0) for s in states)
        failed = sum(s.get("join_failures", 0) for s in states)
        errors = sum(s.get("errors", 0) for s in states)
        info = f"connected {connected:,} joined {joined:,} | {self.rate:,.0f} frames/s"
        if failed or errors:
            info += f" | [red]{failed} join failures, {errors} errors[/]"
        self._progress.update(self._task, description=phase, completed=completed, total=total, info=info)


async def watch(view: ProgressView, workers: list[WorkerProc], phase: str, total: float, done: Any) -> None:
    """Refresh the progress bar until cancelled; `done()` gives the completed amount."""
    while True:
        view.update(workers, phase, done(), total)
        await asyncio.sleep(0.25)


@contextlib.asynccontextmanager
async def showing(view: ProgressView, workers: list[WorkerProc], phase: str, total: float, done: Any) -> Any:
    task = asyncio.create_task(watch(view, workers, phase, total, done))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        view.update(workers, phase, done(), total)


# The run.


def scenario_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Topics, rates and the per-scenario extras, with defaults filled in; Refused if inconsistent."""
    topics = [t.strip() for chunk in (args.topics or []) for t in chunk.split(",") if t.strip()]
    topics = topics or list(DEFAULT_TOPICS[args.scenario])
    settings: dict[str, Any] = {"topics": topics, "op_topic_index": None, "ops_rate": 0.0}
    if args.scenario == "broadcast":
        topic = topics[0]
        if "{" in topic:
            raise Refused(f"broadcast: the topic {topic!r} must be one topic, without {{user}}/{{room}}")
        settings["topics"] = [topic]
        settings["broadcast_topic"] = topic
        settings["publish_rate"] = 10.0 if args.rate is None else args.rate
    elif args.scenario == "rooms":
        settings["ops_rate"] = args.sockets / 20 if args.rate is None else args.rate
        index = next((i for i, t in enumerate(topics) if t.startswith("presence:subject:")), None)
        if index is None and settings["ops_rate"] > 0:
            raise Refused("rooms: --topics needs a presence:subject:… topic for the presence updates")
        settings["op_topic_index"] = index
    elif args.scenario == "mixed":
        settings["ops_rate"] = args.sockets / 60 if args.rate is None else args.rate
        index = next((i for i, t in enumerate(topics) if t == "user:{user}"), None)
        if index is None and settings["ops_rate"] > 0:
            raise Refused("mixed: --topics needs user:{user}: events are sent as `track` on the user's topic")
        settings["op_topic_index"] = index
    elif args.scenario == "churn":
        settings["churn"] = {"rate": args.churn_rate, "hold": args.churn_hold, "topics": topics}
    return settings


def room_range(spec: str) -> tuple[int, int]:
    low, _, high = spec.partition("-")
    lo, hi = int(low), int(high or low)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError("--room-size: MIN-MAX with 1 <= MIN <= MAX, e.g. 10-50")
    return lo, hi


def _cpu(pids: list[int]) -> float:
    return sum(sum(proc_cpu_split(pid)) for pid in pids)


async def run_loadtest(
    args: argparse.Namespace, target: Target, secret: str, secret_source: str
) -> dict[str, Any]:
    from realtime import TokenVerifier

    settings = scenario_settings(args)
    churn_in_flight = (
        math.ceil(args.churn_rate * (args.churn_hold + 2)) + 64 if args.scenario == "churn" else 0
    )
    plan = plan_resources(args, target, churn_in_flight)
    verifier = TokenVerifier(secret)
    ttl = 3600 + args.duration * 2 + args.sockets / 100
    admin_token = verifier.issue({"sub": "loadtest-admin", "role": "admin"}, ttl=ttl)
    await preflight(target, verifier.issue({"sub": "loadtest-preflight", "role": "student"}, ttl=60))
    run_id = secrets.token_hex(4)
    started = dt.datetime.now(dt.UTC)
    n = args.sockets
    lo, hi = args.room_size
    result: dict[str, Any] = {
        "loadtest": args.scenario,
        "started_at": started.isoformat(timespec="seconds"),
        "url": target.url,
        "target": {
            "host": target.host,
            "port": target.port,
            "path": target.path,
            "addresses": target.addresses,
        },
        "sockets": n,
        "duration_s": args.duration,
        "procs": plan.procs,
        "topics": settings["topics"],
        "secret_from": secret_source,
        "system": plan.limits,
        "limits_hit": list(plan.hit),
        "warnings": [],
    }
    for message in plan.hit:
        note(args, f"[yellow]limit: {message}")

    metrics0 = await fetch_metrics(target)
    if metrics0:
        max_fds = metrics0.get("process_max_fds", 0)
        open_fds = metrics0.get("process_open_fds", 0)
        room = int(max_fds - open_fds)
        extra = churn_in_flight
        if max_fds and room < n + extra and not args.server_pid:
            message = (
                f"server: its open-files limit is {int(max_fds):,} (process_max_fds) with {int(open_fds)} in "
                f"use: it can take about {room:,} more sockets, not {n + extra:,}; the rest will wait "
                "unaccepted and time out. Start it with a higher limit (ulimit -n / prlimit --nofile), or "
                "with --workers K and BROKER_URL=redis://… (then pass --server-pid for memory figures)"
            )
            result["limits_hit"].append(message)
            note(args, f"[yellow]limit: {message}")
    else:
        result["warnings"].append("could not read the server's /metrics: no server memory or CPU figures")

    shares = [(w * n // plan.procs, (w + 1) * n // plan.procs) for w in range(plan.procs)]
    base_config = {
        "procs": plan.procs,
        "host": target.connect_host,
        "port": target.port,
        "host_header": target.host_header,
        "path": target.path,
        "src_addrs": plan.source_addrs,
        "topics": settings["topics"],
        "scenario": args.scenario,
        "heartbeat": args.heartbeat,
        "connect_concurrency": args.connect_concurrency,
        "connect_timeout": args.connect_timeout,
        "run_id": run_id,
        "secret": secret,
        "ttl": ttl,
        "n": n,
        "room_min": lo,
        "room_max": hi,
        "seed": args.seed,
        "extra_fds": churn_in_flight // plan.procs + 256,
        "give_up_after": args.give_up_after,
    }
    result["rooms"] = (
        len(room_starts(n, lo, hi, args.seed)) if any("{room}" in t for t in settings["topics"]) else None
    )
    tmp = tempfile.TemporaryDirectory(prefix="loadtest-")
    workers = [
        WorkerProc(w, {**base_config, "wid": w, "start": a, "end": b}, Path(tmp.name))
        for w, (a, b) in enumerate(shares)
    ]
    view = ProgressView(n, enabled=not args.json and sys.stderr.isatty() and not args.quiet)
    publisher: Publisher | None = None
    server_pids = list(args.server_pid or [])
    try:
        for worker in workers:
            await worker.start()
        readies = [await w.expect("ready", 60 + n / 2000) for w in workers]
        for ready in readies:
            soft = ready["nofile"][0]
            share = workers[ready["wid"]].config["end"] - workers[ready["wid"]].config["start"]
            if soft < share + 64:
                message = (
                    f"worker {ready['wid']}: open-files limit {soft} for {share} sockets: "
                    "some will fail (EMFILE)"
                )
                result["limits_hit"].append(message)
                note(args, f"[yellow]limit: {message}")
        rss0 = sum(proc_rss_kb(p) for p in server_pids)
        with view:
            # Connect and join.
            t0 = time.monotonic()
            async with showing(
                view,
                workers,
                "connecting",
                n,
                lambda: sum(
                    w.progress.get("joined", 0) + w.progress.get("join_failures", 0) for w in workers
                ),
            ):
                connected = await all_of(workers, {"cmd": "connect"}, "connected", 120 + n / 50)
            connect_s = time.monotonic() - t0
            # Settle, then the server's memory with every socket joined.
            await all_of(workers, {"cmd": "mark", "name": "settle"}, "marked", 30)
            async with showing(
                view,
                workers,
                "settling",
                args.settle,
                lambda: min(args.settle, time.monotonic() - t0 - connect_s),
            ):
                await asyncio.sleep(args.settle)
            metrics1 = await fetch_metrics(target)
            if metrics0 and not metrics1:
                result["warnings"].append(
                    "could not read the server's /metrics with the sockets joined (out of file "
                    "descriptors?): no server memory figures"
                )
            rss1 = sum(proc_rss_kb(p) for p in server_pids)
            # The scenario.
            run_cmd = {
                "cmd": "run",
                "duration": args.duration,
                "ops_rate": settings["ops_rate"] / plan.procs,
                "op_topic_index": settings["op_topic_index"],
            }
            if "churn" in settings:
                churn = dict(settings["churn"])
                churn["rate"] = churn["rate"] / plan.procs
                run_cmd["churn"] = churn
            busy0, total0 = machine_cpu()
            worker_cpu0 = _cpu([w.pid for w in workers])
            driver0 = resource.getrusage(resource.RUSAGE_SELF)
            server_cpu0 = _cpu(server_pids)
            t_run = time.monotonic()
            publish: dict[str, Any] = {}
            async with showing(
                view,
                workers,
                args.scenario,
                args.duration,
                lambda: min(args.duration, time.monotonic() - t_run),
            ):
                for worker in workers:
                    await worker.send(run_cmd)
                if args.scenario == "broadcast":
                    publisher = Publisher(target, admin_token, settings["broadcast_topic"])
                    publish = await publish_for(publisher, settings["publish_rate"], args.duration)
                ran = await asyncio.gather(
                    *(w.expect("ran", args.duration + args.churn_hold + 120) for w in workers)
                )
                drained: list[dict[str, Any]] = []
                if args.scenario == "broadcast":
                    drained = await all_of(
                        workers,
                        {"cmd": "drain", "last_seq": publish["last_seq"], "timeout": args.drain_timeout},
                        "drained",
                        args.drain_timeout + 600,
                    )
            t_end = time.monotonic()
            busy1, total1 = machine_cpu()
            worker_cpu1 = _cpu([w.pid for w in workers])
            driver1 = resource.getrusage(resource.RUSAGE_SELF)
            server_cpu1 = _cpu(server_pids)
            metrics2 = await fetch_metrics(target)
            rss2 = sum(proc_rss_kb(p) for p in server_pids)
            reports = await all_of(workers, {"cmd": "report"}, "report", 60)
            async with showing(
                view, workers, "closing", n, lambda: n - sum(w.progress.get("open", 0) for w in workers)
            ):
                closed = await all_of(workers, {"cmd": "close"}, "closed", 60)
        wall = t_end - t_run
        machine_busy = (busy1 - busy0) / max(total1 - total0, 1e-9) * (os.cpu_count() or 1)
        driver_cpu = (driver1.ru_utime + driver1.ru_stime) - (driver0.ru_utime + driver0.ru_stime)
        summarize(
            result,
            args=args,
            settings=settings,
            connected=connected,
            connect_s=connect_s,
            reports=reports,
            ran=ran,
            drained=drained,
            closed=closed,
            publish=publish,
            wall=wall,
            metrics=(metrics0, metrics1, metrics2),
            proc_rss=(rss0, rss1, rss2) if server_pids else None,
            server_cpu_pids=(server_cpu1 - server_cpu0) if server_pids else None,
            machine_busy=machine_busy,
            worker_cpu=worker_cpu1 - worker_cpu0,
            driver_cpu=driver_cpu,
        )
        result["source_addresses"] = {
            "planned": len(plan.source_addrs),
            "used": merge_counts([r["local_addrs"] for r in reports]),
        }
        return result
    finally:
        if publisher is not None:
            await publisher.close()
        for worker in workers:
            await worker.stop()
        tmp.cleanup()


async def publish_for(publisher: Publisher, rate: float, duration: float) -> dict[str, Any]:
    """Publish ticks 1, 2, … at `rate`/s (0: back to back) for `duration` s."""
    await publisher.connect()
    round_trips: list[float] = []
    late = 0
    seq = 0
    first_ns = time.monotonic_ns()
    t0 = time.monotonic()
    if rate <= 0:
        while time.monotonic() - t0 < duration:
            seq += 1
            round_trips.append(await publisher.publish(seq))
    else:
        interval = 1.0 / rate
        for i in range(max(1, round(duration * rate))):
            delay = t0 + i * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -interval / 2:
                late += 1
            seq += 1
            round_trips.append(await publisher.publish(seq))
    elapsed = time.monotonic() - t0
    round_trips.sort()
    return {
        "last_seq": seq,
        "publishes": seq,
        "first_publish_ns": first_ns,
        "publish_rate": seq / elapsed if elapsed > 0 else None,
        "target_rate": rate or "saturate",
        "late": late,
        "round_trip_ms_p50": round(round_trips[len(round_trips) // 2], 3) if round_trips else None,
        "round_trip_ms_max": round(round_trips[-1], 3) if round_trips else None,
    }


def merge_counts(tables: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for table in tables:
        for key, value in table.items():
            out[key] = out.get(key, 0) + value
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def _phase(report: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((p for p in report["phases"] if p["name"] == name), None)


def summarize(result: dict[str, Any], **k: Any) -> None:
    args: argparse.Namespace = k["args"]
    reports: list[dict[str, Any]] = k["reports"]
    n = args.sockets
    connect_s: float = k["connect_s"]
    connected = sum(c["connected"] for c in k["connected"])
    joined = sum(c["joined"] for c in k["connected"])
    hists = {name: merge_hist_exports([r["hists"][name] for r in reports]) for name in reports[0]["hists"]}
    result["connect"] = {
        "attempted": n,
        "connected": connected,
        "joined": joined,
        "join_failures": sum(c["join_failures"] for c in k["connected"]),
        "failed_sockets": sum(c["connect_failures"] for c in k["connected"]),
        "not_attempted": sum(c["not_attempted"] for c in k["connected"]),
        "seconds": round(connect_s, 3),
        "connects_per_s": round(connected / connect_s, 1) if connect_s > 0 else None,
        "joins_per_s": round(sum(c["joins_ok"] for c in k["connected"]) / connect_s, 1)
        if connect_s > 0
        else None,
        "frames_by_event": merge_counts([c["by_event"] for c in k["connected"]]),
        "upgrade_latency_ms": hist_summary(hists["connect"]),
        "join_latency_ms": hist_summary(hists["join"]),
    }
    wall: float = k["wall"]
    run = merge_deltas([r["delta"] for r in k["ran"]])
    run_frames = sum(r["delta"]["frames"] for r in k["ran"])
    result["run"] = {
        "seconds": round(wall, 3),
        "frames": run_frames,
        "frames_per_s": round(run_frames / wall, 1) if wall > 0 else None,
        "bytes_per_s": round(run["bytes_in"] / wall, 1) if wall > 0 else None,
        "frames_by_event": {e: v for e, v in run["by_event"].items() if v},
        "heartbeats_sent": run["heartbeats_sent"],
        "heartbeat_replies": run["heartbeat_replies"],
        "heartbeat_rtt_ms": hist_summary(hists["heartbeat"]),
    }
    if args.scenario in ("rooms", "mixed"):
        result["run"]["ops"] = {
            "kind": "presence_update" if args.scenario == "rooms" else "track (practice_completed)",
            "target_rate": k["settings"]["ops_rate"],
            "sent": run["ops_sent"],
            "ok": run["ops_ok"],
            "failed": run["ops_failed"],
            "skipped_busy": run["ops_skipped"],
            "per_s": round(run["ops_ok"] / wall, 1) if wall > 0 else None,
            "reply_latency_ms": hist_summary(hists["op"]),
        }
    if args.scenario == "churn":
        churn = run["churn"]
        span = max(args.duration, 1e-9)
        result["churn"] = {
            "target_rate": args.churn_rate,
            "hold_s": args.churn_hold,
            **churn,
            # Over --duration, the window in which churning sockets were started (the last ones
            # leave and disconnect up to --churn-hold s later).
            "connects_per_s": round(churn["connected"] / span, 1),
            "joins_per_s": round(churn["joined"] / span, 1),
            "leaves_per_s": round(churn["left"] / span, 1),
            "disconnects_per_s": round(churn["disconnected"] / span, 1),
            "leave_latency_ms": hist_summary(hists["leave"]),
        }
    if args.scenario == "broadcast":
        publish: dict[str, Any] = k["publish"]
        drained: list[dict[str, Any]] = k["drained"]
        subscribers = sum(d["subscribers"] for d in drained)
        delivered = sum(r["ticks"] for r in reports)
        last_ns = max((d["last_tick_ns"] for d in drained), default=0)
        window = (last_ns - publish["first_publish_ns"]) / 1e9 if delivered else 0
        result["broadcast"] = {
            "topic": k["settings"]["broadcast_topic"],
            **publish,
            "subscribers": subscribers,
            "expected_frames": subscribers * publish["publishes"],
            "delivered_frames": delivered,
            "missing_frames": sum(d["missing_frames"] for d in drained),
            "complete_sockets": sum(d["complete_sockets"] for d in drained),
            "gaps": sum(r["gaps"] for r in reports),
            "out_of_order": sum(r["out_of_order"] for r in reports),
            "delivered_frames_per_s": round(delivered / window, 1) if window > 0 else None,
            "latency_ms": hist_summary(hists["tick"]),
        }
        del result["broadcast"]["first_publish_ns"]
    result["frames_by_event_total"] = merge_counts([r["by_event"] for r in reports])
    # Errors and closes.
    result["errors"] = merge_counts([r["errors"] for r in reports])
    result["close_codes"] = merge_counts([r["close_codes"] for r in reports])
    result["close_codes_at_shutdown"] = merge_counts([c["close_codes_at_shutdown"] for c in k["closed"]])
    # The server.
    m0, m1, m2 = k["metrics"]
    server: dict[str, Any] = {}
    if m0 and m1:
        rss_before, rss_joined = (
            m0.get("process_resident_memory_bytes"),
            m1.get("process_resident_memory_bytes"),
        )
        sockets_before, sockets_joined = m0.get("viral_realtime_sockets"), m1.get("viral_realtime_sockets")
        server.update(
            {
                "rss_before_bytes": rss_before,
                "rss_joined_bytes": rss_joined,
                "rss_end_bytes": m2.get("process_resident_memory_bytes") if m2 else None,
                "sockets_before": sockets_before,
                "sockets_joined": sockets_joined,
                "max_fds": m0.get("process_max_fds"),
            }
        )
        added = (sockets_joined or 0) - (sockets_before or 0)
        if rss_before is not None and rss_joined is not None and added > 0 and not k["proc_rss"]:
            server["rss_per_socket_kb"] = round((rss_joined - rss_before) / 1024 / added, 2)
        if m2:
            cpu = m2.get("process_cpu_seconds_total", 0) - m1.get("process_cpu_seconds_total", 0)
            frames_out = m2.get("viral_realtime_frames_out_total", 0) - m1.get(
                "viral_realtime_frames_out_total", 0
            )
            server["run_cpu_s"] = round(cpu, 3)
            server["run_utilisation"] = round(cpu / wall, 3) if wall > 0 else None
            server["run_frames_out"] = frames_out
            server["run_frames_in"] = m2.get("viral_realtime_frames_in_total", 0) - m1.get(
                "viral_realtime_frames_in_total", 0
            )
            # Per frame only where frames are what the server spends its time on.
            server["cpu_us_per_frame_out"] = round(cpu * 1e6 / frames_out, 2) if frames_out >= 1000 else None
            for name in (
                "slow_consumers_dropped",
                "rate_limited",
                "idle_timeouts",
                "channel_crashes",
                "joins_refused",
            ):
                metric = f"viral_realtime_{name}_total"
                if metric in m2 and metric in m0:
                    server[name] = m2[metric] - m0[metric]
    if k["proc_rss"]:
        rss0, rss1, rss2 = k["proc_rss"]
        server.update(
            {
                "pids": list(args.server_pid),
                "proc_rss_before_kb": rss0,
                "proc_rss_joined_kb": rss1,
                "proc_rss_end_kb": rss2,
                "rss_per_socket_kb": round((rss1 - rss0) / joined, 2) if joined else None,
                "rss_per_socket_source": "VmRSS of --server-pid, summed, per joined socket",
                "run_cpu_s_pids": round(k["server_cpu_pids"], 3),
                "run_utilisation_pids": round(k["server_cpu_pids"] / wall, 3) if wall > 0 else None,
            }
        )
    result["server"] = server
    # The client: is it the bottleneck?
    workers = []
    for report in reports:
        run_phase, connect_phase = _phase(report, "run"), _phase(report, "connect")
        drain_phase = _phase(report, "drain")
        entry = {
            "wid": report["wid"],
            "pid": report["pid"],
            "sockets": report["sockets"],
            "connect": connect_phase,
            "run": run_phase,
            "drain": drain_phase,
            "rss_kb": report["rss_kb"],
            # The client's own memory per socket (its sockets, Conn objects, buffers).
            "rss_kb_per_socket": round(
                (report["rss_kb_joined"] - report["rss_kb_start"]) / report["joined"], 2
            )
            if report["joined"]
            else None,
            "nofile": report["nofile"],
        }
        run_frames_w = next(r["delta"]["frames"] for r in k["ran"] if r["wid"] == report["wid"])
        cpu_run = (run_phase or {}).get("cpu_s", 0) + (drain_phase or {}).get("cpu_s", 0)
        entry["run_frames"] = run_frames_w
        entry["cpu_us_per_frame"] = round(cpu_run * 1e6 / run_frames_w, 2) if run_frames_w >= 1000 else None
        workers.append(entry)
        for name, phase in (("connect", connect_phase), ("run", run_phase), ("drain", drain_phase)):
            if phase and phase["wall_s"] >= 0.5 and phase["utilisation"] > CPU_WARN:
                message = (
                    f"client worker {report['wid']} used {phase['utilisation']:.0%} of a core during {name}: "
                    "the client may be limiting the numbers; rerun with more --procs"
                )
                result["warnings"].append(message)
    result["client"] = {
        "workers": workers,
        "max_run_utilisation": max((w["run"] or {}).get("utilisation", 0) for w in workers),
        "worker_cpu_s_run": round(k["worker_cpu"], 3),
        "driver_cpu_s_run": round(k["driver_cpu"], 3),
    }
    result["machine"] = {"cpus": os.cpu_count(), "busy_cores_run": round(k["machine_busy"], 2)}
    ok = (
        joined == n
        and not result["errors"]
        and not result["close_codes"]
        and (
            args.scenario != "broadcast"
            or (
                result["broadcast"]["missing_frames"] == 0
                and result["broadcast"]["gaps"] == 0
                and result["broadcast"]["out_of_order"] == 0
                and result["broadcast"]["delivered_frames"] == result["broadcast"]["expected_frames"]
            )
        )
        and (args.scenario != "churn" or result["churn"]["failed"] == 0)
    )
    result["ok"] = ok


def merge_deltas(deltas: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for delta in deltas:
        for key, value in delta.items():
            if isinstance(value, dict):
                table = out.setdefault(key, {})
                for name, count in value.items():
                    table[name] = table.get(name, 0) + count
            else:
                out[key] = out.get(key, 0) + value
    return out


# Output.


def note(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        from rich.console import Console

        Console(stderr=True).print(message)


def _ms(summary: dict[str, Any] | None) -> str:
    if not summary or not summary.get("count"):
        return "-"
    return (
        f"p50 {summary['p50']:.2f} / p95 {summary['p95']:.2f} / p99 {summary['p99']:.2f} / "
        f"max {summary['max']:.2f} ms ({summary['count']:,})"
    )


def print_summary(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"loadtest {result['loadtest']}: {result['sockets']:,} sockets → {result['url']}")
    table.add_column("measure")
    table.add_column("value")
    c = result["connect"]
    table.add_row(
        "sockets joined", f"{c['joined']:,} of {c['attempted']:,} ({result['procs']} worker processes)"
    )
    used = result["source_addresses"]["used"]
    table.add_row(
        "source addresses", f"{len(used)} ({', '.join(list(used)[:4])}{', …' if len(used) > 4 else ''})"
    )
    table.add_row(
        "connect + join",
        f"{c['seconds']:.2f} s: {c['connects_per_s'] or 0:,.0f} connects/s, "
        f"{c['joins_per_s'] or 0:,.0f} joins/s",
    )
    table.add_row("upgrade latency", _ms(c["upgrade_latency_ms"]))
    table.add_row("join latency", _ms(c["join_latency_ms"]))
    table.add_row("join failures", str(c["join_failures"]))
    if c["failed_sockets"] or c["not_attempted"]:
        table.add_row(
            "sockets not joined",
            f"{c['failed_sockets']:,} failed (see errors), {c['not_attempted']:,} not attempted "
            "(each worker gives up after --give-up-after failures)",
        )
    if c["frames_by_event"]:
        table.add_row(
            "  pushes while joining", ", ".join(f"{e} {v:,}" for e, v in c["frames_by_event"].items())
        )
    r = result["run"]
    table.add_row(
        "frames received (run)",
        f"{r['frames_per_s'] or 0:,.0f} frames/s, {r['frames']:,} in {r['seconds']:.1f} s",
    )
    if r["frames_by_event"]:
        table.add_row("  pushes by event", ", ".join(f"{e} {v:,}" for e, v in r["frames_by_event"].items()))
    table.add_row("heartbeat round trip", _ms(r["heartbeat_rtt_ms"]))
    if "broadcast" in result:
        b = result["broadcast"]
        table.add_row(
            "broadcast",
            f"{b['publishes']:,} publishes to {b['topic']} at {b['publish_rate'] or 0:.1f}/s "
            f"(target {b['target_rate']}), {b['subscribers']:,} subscribers",
        )
        table.add_row(
            "  delivered",
            f"{b['delivered_frames']:,} of {b['expected_frames']:,} "
            f"({b['delivered_frames_per_s'] or 0:,.0f} frames/s); missing {b['missing_frames']}, "
            f"gaps {b['gaps']}, out of order {b['out_of_order']}",
        )
        table.add_row("  publish → receive", _ms(b["latency_ms"]))
    if "ops" in r:
        o = r["ops"]
        table.add_row(
            f"{o['kind']}",
            f"{o['ok']:,} ok, {o['failed']} failed "
            f"({o['per_s'] or 0:,.1f}/s, target {o['target_rate']:.1f}/s)",
        )
        table.add_row("  request → reply", _ms(o["reply_latency_ms"]))
    if "churn" in result:
        ch = result["churn"]
        table.add_row(
            "churn",
            f"{ch['connects_per_s']:.1f} connects/s, {ch['joins_per_s']:.1f} joins/s, "
            f"{ch['leaves_per_s']:.1f} leaves/s, {ch['disconnects_per_s']:.1f} disconnects/s "
            f"(target {ch['target_rate']}/s); {ch['failed']} failed",
        )
        table.add_row("  leave latency", _ms(ch["leave_latency_ms"]))
    errors = result["errors"]
    table.add_row("errors", ", ".join(f"{k} {v}" for k, v in errors.items()) or "none")
    table.add_row(
        "close codes (during the test)",
        ", ".join(f"{k}: {v}" for k, v in result["close_codes"].items()) or "none",
    )
    table.add_row(
        "close codes (at shutdown)",
        ", ".join(f"{k}: {v}" for k, v in result["close_codes_at_shutdown"].items()) or "none",
    )
    s = result["server"]
    if "pids" in s:
        table.add_row(
            f"server RSS (VmRSS of {len(s['pids'])} --server-pid)",
            f"{s['proc_rss_before_kb'] / 1024:.1f} → {s['proc_rss_joined_kb'] / 1024:.1f} MiB "
            f"({c['joined']:,} sockets joined)",
        )
    if s.get("rss_joined_bytes") is not None and s.get("rss_before_bytes") is not None:
        table.add_row(
            "server RSS (/metrics)" if "pids" not in s else "  of it the process /metrics came from",
            f"{s['rss_before_bytes'] / 2**20:.1f} → {s['rss_joined_bytes'] / 2**20:.1f} MiB "
            f"({(s['sockets_joined'] or 0) - (s['sockets_before'] or 0):,.0f} sockets added)",
        )
    if s.get("rss_per_socket_kb") is not None:
        table.add_row("server RSS per socket", f"{s['rss_per_socket_kb']:.2f} KB")
    if s.get("run_utilisation") is not None:
        per_frame = s.get("cpu_us_per_frame_out")
        table.add_row(
            "server CPU (run)",
            f"{s['run_utilisation']:.0%} of a core"
            + (f", {per_frame:.1f} µs per frame out" if per_frame else ""),
        )
    if s.get("run_utilisation_pids") is not None:
        table.add_row("server CPU (run, --server-pid)", f"{s['run_utilisation_pids']:.0%} of a core")
    cl = result["client"]
    for w in cl["workers"]:
        run_u = (w["run"] or {}).get("utilisation", 0)
        con_u = (w["connect"] or {}).get("utilisation", 0)
        lag = (w["run"] or {}).get("max_loop_lag_ms", 0)
        per_frame = w["cpu_us_per_frame"]
        table.add_row(
            f"client worker {w['wid']} CPU",
            f"run {run_u:.0%}, connect {con_u:.0%} of a core; {w['sockets']:,} sockets; "
            f"max loop lag {lag:.0f} ms" + (f"; {per_frame:.1f} µs per frame" if per_frame else ""),
        )
    table.add_row(
        "machine busy (run)",
        f"{result['machine']['busy_cores_run']:.2f} of {result['machine']['cpus']} cores",
    )
    table.add_row("result", "[green]ok" if result["ok"] else "[red]problems (see errors above)")
    console = Console(stderr=False, width=None if sys.stdout.isatty() else 160)
    console.print(table)
    for message in result["limits_hit"]:
        console.print(f"[yellow]limit hit: {message}")
    for message in result["warnings"]:
        console.print(f"[yellow]warning: {message}")


def build_parser(prog: str = "viral-engine loadtest") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Open N real Phoenix V2 WebSockets against a viral-engine server on this machine and "
        "drive a scenario (SPEC §10).",
    )
    parser.add_argument("--url", default="ws://127.0.0.1:8000", help="the server (loopback only)")
    parser.add_argument("--sockets", type=int, default=1000, help="sockets to hold (distinct users)")
    parser.add_argument("--scenario", choices=SCENARIOS, default="idle")
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds of the scenario after all joined"
    )
    parser.add_argument(
        "--topics",
        action="append",
        help="comma-separated topics every socket joins; {user} and {room} are replaced "
        "(default per scenario; broadcast: feed:subject:loadtest)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="broadcast: publishes/s (default 10, 0 = back to back); rooms: presence updates/s "
        "(default sockets/20); mixed: events/s (default sockets/60)",
    )
    parser.add_argument("--procs", type=int, default=2, help="client processes (more if nofile requires)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout, nothing else")
    parser.add_argument(
        "--secret",
        default=None,
        help="the server's SECRET_KEY (default: $SECRET_KEY, ./.viral-engine-secret)",
    )
    parser.add_argument("--churn-rate", type=float, default=50.0, help="churn: new sockets per second")
    parser.add_argument(
        "--churn-hold", type=float, default=1.0, help="churn: seconds each churning socket stays joined"
    )
    parser.add_argument(
        "--room-size", type=room_range, default=(10, 50), help="users per room, MIN-MAX (10-50)"
    )
    parser.add_argument("--heartbeat", type=float, default=30.0, help="seconds between a socket's heartbeats")
    parser.add_argument(
        "--settle", type=float, default=2.0, help="idle seconds after joining, before reading memory"
    )
    parser.add_argument(
        "--connect-concurrency", type=int, default=100, help="handshakes in flight per process"
    )
    parser.add_argument(
        "--connect-timeout", type=float, default=30.0, help="seconds for connect + upgrade + join"
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=10.0,
        help="broadcast: seconds without progress before giving up on missing frames",
    )
    parser.add_argument(
        "--source-addrs", type=int, default=8, help="at least this many source addresses in 127.0.0.0/8"
    )
    parser.add_argument(
        "--server-pid",
        type=int,
        action="append",
        help="read RSS/CPU of these server processes from /proc (e.g. serve --workers K)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the room layout")
    parser.add_argument(
        "--give-up-after",
        type=int,
        default=None,
        help="a worker stops opening sockets after this many failed (default: 2%% of its share, "
        "at least 100)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results file (default bench/results/loadtest-<scenario>-<time>.json)",
    )
    parser.add_argument("--no-save", action="store_true", help="do not write a results file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or notes on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.sockets < 1 or args.procs < 1 or args.duration < 0:
        print("error: --sockets and --procs must be at least 1, --duration not negative", file=sys.stderr)
        return 2
    try:
        target = check_target(args.url)
        secret, source = resolve_secret(args.secret)
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result = runner.run(run_loadtest(args, target, secret, source))
    except Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: the load test broke off: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    if not args.no_save:
        path = (
            args.out
            or ROOT / "bench" / "results" / f"loadtest-{args.scenario}-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
        result["results_file"] = str(path)
    if args.json:
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
    else:
        print_summary(result)
        if not args.no_save:
            note(args, f"results written to {result['results_file']}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
