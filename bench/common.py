"""What the bench servers, the drivers and the clients share: the secret, the topic, process limits,
and the drivers' helpers (/proc readings, server and Node client processes, histograms)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

# A fixed, benchmark-only signing key: both servers verify tokens with it, the driver issues them.
BENCH_SECRET = "bench-only-secret-0123456789abcdef-not-for-production"
TOPIC = "bench:t"
EVENT = "tick"


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (thousands of sockets); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# /proc readings.


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of one process, in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    # After "pid (comm)": state is fields[0], so utime (field 14) and stime (15) are at 11 and 12.
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def process_tree(pid: int) -> list[int]:
    """`pid` and every live descendant (a server started with --workers N runs its workers as children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def tree_cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) summed over `pid` and its live descendants."""
    user = system = 0.0
    for each in process_tree(pid):
        try:
            u, s = proc_cpu_split(each)
        except OSError:
            continue
        user += u
        system += s
    return user, system


def tree_rss_kb(pid: int) -> int:
    total = 0
    for each in process_tree(pid):
        try:
            total += proc_rss_kb(each)
        except (OSError, RuntimeError):
            continue
    return total


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds over all cores since boot, from /proc/stat."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return (total - idle) / CLK_TCK, total / CLK_TCK


async def background_load(seconds: float = 1.0) -> float:
    """Cores kept busy by whatever else runs on the machine right now."""
    busy0, total0 = machine_cpu()
    await asyncio.sleep(seconds)
    busy1, total1 = machine_cpu()
    return (busy1 - busy0) / max(total1 - total0, 1e-9) * (os.cpu_count() or 1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def monotonic_ms() -> float:
    return time.monotonic_ns() / 1e6


# Processes.

# prctl(PR_SET_PDEATHSIG, SIGTERM) in the child before exec: a server or client outlives no driver, even
# one killed without running its clean-up. Looked up here, so the child only makes the call.
_PRCTL = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None) if sys.platform == "linux" else None


def die_with_parent() -> None:
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)


class ServerProcess:
    """A bench server, `python -m MODULE --port P` on 127.0.0.1; memory broker unless `env` says otherwise."""

    def __init__(
        self,
        kind: str,
        port: int,
        workdir: Path,
        *,
        module: str,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
    ) -> None:
        self.kind = kind
        self.args = args or []
        self.port = port
        self.module = module
        self.extra_env = env or {}
        self.log_path = workdir / f"server-{kind}-{port}.log"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        env = {
            **os.environ,
            "SECRET_KEY": BENCH_SECRET,
            "BROKER_URL": "memory://",
            "ENV": "development",
            **self.extra_env,
        }
        if "DATABASE_URL" not in self.extra_env:
            from store.migrate import upgrade

            # A migrated database of its own: joins read users' privacy states from the store.
            env["DATABASE_URL"] = f"sqlite+aiosqlite:///{self.log_path.with_suffix('.db')}"
            await asyncio.to_thread(upgrade, env["DATABASE_URL"])
        with self.log_path.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                self.module,
                "--port",
                str(self.port),
                *self.args,
                cwd=ROOT,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise RuntimeError(f"{self.kind} server exited at start-up:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                status, _ = await http_request(self.port, "GET", "/healthz")
                if status == 200:
                    return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.kind} server not ready after 20s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 15)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


class JsonLinesProcess:
    """A helper process the driver talks to in JSON lines, both ways (Node bench clients, load-test
    workers). Subclasses say how to start it (`_spawn`), and may watch messages (`_on_message`) and
    name what counts as a failure (`FAILED`)."""

    FAILED: tuple[str, ...] = ("exited",)
    STOP_TIMEOUT = 5.0

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def _spawn(self, *argv: str, env: dict[str, str] | None = None) -> None:
        with self.log_path.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env=env,
                limit=64 << 20,
                preexec_fn=die_with_parent,
            )
        self._reader = asyncio.create_task(self._read())

    def _on_message(self, message: dict[str, Any]) -> bool:
        """Called for every message; False keeps it out of `messages`."""
        return True

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            message = orjson.loads(line)
            if self._on_message(message):
                await self.messages.put(message)
        await self.messages.put({"type": "exited"})

    async def send(self, command: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(orjson.dumps(command) + b"\n")
        await self.proc.stdin.drain()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    async def expect(self, kind: str, timeout: float) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                message = await self.messages.get()
                if message["type"] == kind:
                    return message
                if message["type"] in self.FAILED:
                    raise RuntimeError(
                        f"{self.name} failed ({message.get('error', message['type'])}):\n{self.log_tail()}"
                    )

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.send({"cmd": "quit"})
                await asyncio.wait_for(self.proc.wait(), self.STOP_TIMEOUT)
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


class ClientProcess(JsonLinesProcess):
    """One Node process of a bench client (`script`)."""

    def __init__(self, name: str, config_path: Path, log_path: Path, *, script: Path) -> None:
        super().__init__(name, log_path)
        self.script = script
        self.config_path = config_path

    async def start(self, node: str, node_args: list[str]) -> None:
        await self._spawn(node, *node_args, str(self.script), str(self.config_path))


# HTTP.


class PublishConnection:
    """`POST /api/publish` over one keep-alive HTTP/1.1 connection, one request in flight, raw HTTP:
    the request head is built once, so the publisher costs the benchmark next to nothing."""

    def __init__(self, connect_host: str, port: int, token: str, host_header: str | None = None) -> None:
        self._address = (connect_host, port)
        self._head = (
            f"POST /api/publish HTTP/1.1\r\nHost: {host_header or f'{connect_host}:{port}'}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: "
        ).encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        """(Re)connect: the server closes idle keep-alive connections (5 s)."""
        await self.close()
        self._reader, self._writer = await asyncio.open_connection(*self._address)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        self._reader = self._writer = None

    async def request(self, body: bytes) -> tuple[int, bytes]:
        """Send one publish; returns (status, response body). ConnectionResetError if the server had
        closed the connection."""
        if self._writer is None:
            await self.connect()
        reader, writer = self._reader, self._writer
        assert reader is not None and writer is not None
        writer.write(self._head + str(len(body)).encode() + b"\r\n\r\n" + body)
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionResetError("keep-alive connection closed")
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return int(status_line.split(b" ", 2)[1]), await reader.readexactly(length)


async def http_request(port: int, method: str, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# Histograms and reporting.


def percentile(bins: list[tuple[float, float, int]], q: float) -> float | None:
    """The value at quantile q of a histogram of (low, high, count) bins: the bin's midpoint."""
    total = sum(count for _, _, count in bins)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for low, high, count in bins:
        seen += count
        if seen >= rank:
            return low if high == float("inf") else round((low + high) / 2, 3)
    return bins[-1][0]


def merge_hists(reports: list[dict[str, Any]]) -> list[tuple[float, float, int]]:
    merged: dict[tuple[float, float], int] = {}
    for report in reports:
        for low, high, count in report["hist"]:
            key = (float(low), float("inf") if high is None else float(high))
            merged[key] = merged.get(key, 0) + int(count)
    return sorted((low, high, count) for (low, high), count in merged.items())


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def environment(node: str) -> dict[str, Any]:
    versions = {}
    for package in ("uvicorn", "starlette", "websockets", "uvloop", "httptools", "orjson"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    ws_pkg = ROOT / "tests" / "js" / "node_modules" / "ws" / "package.json"
    with contextlib.suppress(OSError, ValueError):
        versions["node ws"] = json.loads(ws_pkg.read_text())["version"]
    node_version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "node": node_version,
        "versions": versions,
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
    }


# PostgreSQL databases of the benchmarks, and their results.

PG_ADMIN = os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")


def pg_urls(name: str) -> tuple[str, str]:
    """(asyncpg DSN, SQLAlchemy URL) of the benchmark database `name` on the PG_ADMIN server."""
    dsn = PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    return dsn, dsn.replace("postgresql://", "postgresql+asyncpg://")


async def fresh_pg_database(name: str) -> tuple[str, str]:
    """Drop and re-create `name`, migrated to head; returns (asyncpg DSN, SQLAlchemy URL)."""
    import asyncpg

    from store.migrate import upgrade

    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn, url = pg_urls(name)
    await asyncio.to_thread(upgrade, url)
    return dsn, url


def write_result(result: dict[str, Any], name: str, out: Path | None) -> Path:
    """Write a run's JSON to `out`, or to bench/results/{name}-{timestamp}.json; returns the path."""
    path = out or ROOT / "bench" / "results" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def shown(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


@contextlib.asynccontextmanager
async def engine_server(database_url: str, name: str, **env: str) -> Any:
    """`viral-engine serve` on `database_url` (memory broker: the consumers run in it) with the bench
    secret, on a free port, ready (`/readyz` 200) when entered; yields (port, pid); stopped on exit."""
    import httpx

    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    full_env = {
        **os.environ,
        "SECRET_KEY": BENCH_SECRET,
        "BROKER_URL": "memory://",
        "DATABASE_URL": database_url,
        "PYTHONPATH": str(ROOT),
        **env,
    }
    with (workdir / "server.log").open("wb") as log:
        server = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "web.cli", "serve", "--port", str(port), "--log-level", "warning"),
            cwd=workdir,
            env=full_env,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(300):
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
        yield port, server.pid
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), 15)


def bench_token(sub: str, role: str) -> str:
    from realtime import TokenVerifier

    return TokenVerifier(BENCH_SECRET).issue({"sub": sub, "role": role}, ttl=3600)
