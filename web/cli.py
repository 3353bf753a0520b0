"""The `viral-engine` command: serve, worker, migrate, token, loadtest."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ipaddress
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from realtime import TokenVerifier

from .config import ConfigError, Settings

ROLES = ("student", "parent", "tutor", "admin")
# "fast" is realtime.uvicorn_protocol: no task per socket, frames handed to the socket directly,
# pre-built frames batched per tick and written straight to the transport. The others are uvicorn's
# own implementations driven through plain ASGI (the portable path), kept for comparison and
# debugging ("wsproto" needs the wsproto package, in the `bench` extra).
WS_IMPLEMENTATIONS = {
    "fast": "realtime.uvicorn_protocol:PhoenixWebSocketProtocol",
    "websockets-sansio": "websockets-sansio",
    "websockets": "websockets",
    "wsproto": "wsproto",
}


def raise_open_files_limit() -> None:
    """Every socket is a file descriptor: lift the soft limit to the hard one, and say what it is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # A privileged process (root, or CAP_SYS_RESOURCE) may raise the hard limit too, up to fs.nr_open.
    want = 1 << 20
    with contextlib.suppress(OSError, ValueError):
        want = min(want, int(Path("/proc/sys/fs/nr_open").read_text()))
    for limit in ((want, want), (hard, hard)):
        if soft >= limit[0]:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limit)
            break
        except (ValueError, OSError):
            continue
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    logging.getLogger("viral.serve").info("open files limit %d (about that many sockets per process)", soft)


def uvicorn_options(settings: Settings, *, ws: str = "fast", loop: str = "uvloop") -> dict[str, Any]:
    """The uvicorn settings every web process runs with (the benchmarks reuse them, so they cannot drift)."""
    return {
        "loop": loop,
        "http": "httptools",
        "ws": WS_IMPLEMENTATIONS[ws],
        # Broadcast frames are built once and shared, so they cannot be compressed per socket.
        "ws_per_message_deflate": False,
        # The socket layer refuses frames over the limit with a clear reason; the WebSocket layer
        # stops reading anything absurdly larger before it is buffered.
        "ws_max_size": settings.limits.max_frame_bytes * 4,
        # Liveness is the Phoenix heartbeat (idle timeout); WebSocket pings would only cost timers.
        "ws_ping_interval": None,
        "ws_ping_timeout": None,
        "backlog": 4096,
    }


DEMO_ENV = "VIRAL_ENGINE_DEMO"  # set to "1" in a `serve --demo` process (so pages can say "demo data")
# prctl(PR_SET_PDEATHSIG, SIGTERM) in the demo child: it dies with the server even if the server is
# killed without clean-up. Looked up here, so the child only makes the call.
_PRCTL = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def demo_refusal(host: str, settings: Settings) -> str | None:
    """Why `serve --demo` may not run here, or None. Any broker will do (on redis:// the consumers
    need a `viral-engine worker`, as always); the demo only talks to the server's HTTP API and sockets."""
    if settings.env == "production":
        return "--demo fills the database with simulated users and events; it never runs with ENV=production"
    if not is_loopback_host(host):
        return (
            f"--demo runs only on a loopback host (127.0.0.1, ::1, localhost), not {host!r}: "
            "it fills the database with simulated users and events"
        )
    return None


class DemoCohort:
    """The demo driver (`python -m web.demo`) as a child of the server: started from a thread once the
    server accepts connections on its port, terminated by `stop()`, and killed by the kernel should
    the server die first (PR_SET_PDEATHSIG; the thread that spawned it lives until `stop()`, since
    Linux sends that signal when the spawning thread ends)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-cohort", daemon=True)

    @property
    def url(self) -> str:
        host = self.host.strip("[]")
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def start(self) -> DemoCohort:
        self._thread.start()
        return self

    def _listening(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection((self.host.strip("[]"), self.port), 0.5):
            return True
        return False

    def _run(self) -> None:
        deadline = time.monotonic() + 120
        while not self._listening():
            if self._stopping.wait(0.2) or time.monotonic() > deadline:
                return
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "web.demo", "--url", self.url],
            preexec_fn=_die_with_parent,
        )
        logging.getLogger("viral.serve").info(
            "demo cohort started (pid %d) against %s", self.proc.pid, self.url
        )
        self._stopping.wait()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class _QuietSocketLines(logging.Filter):
    """With `--demo` a socket opens and closes every second or so: keep uvicorn's per-connection
    lines ("[accepted]", "connection open", "connection closed") out of the console."""

    LINES = frozenset({'%s - "WebSocket %s" [accepted]', "connection open", "connection closed"})

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in self.LINES


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    if args.workers > 1 and settings.broker_url.startswith("memory://"):
        print(
            "error: --workers > 1 needs a shared broker: the memory:// broker cannot fan out between "
            "processes. Set BROKER_URL=redis://127.0.0.1:6379/0.",
            file=sys.stderr,
        )
        return 2
    demo = None
    if args.demo:
        refusal = demo_refusal(args.host, settings)
        if refusal is not None:
            print(f"error: {refusal}", file=sys.stderr)
            return 2
        os.environ[DEMO_ENV] = "1"
        logging.getLogger("uvicorn.error").addFilter(_QuietSocketLines())
        demo = DemoCohort(args.host, args.port).start()
    settings.warn_if_unsafe()
    raise_open_files_limit()
    try:
        uvicorn.run(
            "web.app:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            timeout_graceful_shutdown=args.graceful_timeout,
            log_level=args.log_level,
            access_log=args.access_log,
            **uvicorn_options(settings, ws=args.ws),
        )
    finally:
        if demo is not None:
            demo.stop()
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    """The event consumers for multi-process deployments (Procfile `worker`); run as many as you like."""
    from channels import Leaderboards, boards_from_url
    from metrics import EventIngest, stream_from_url
    from realtime import Hub, RealtimeStats, broker_from_url
    from store import Database

    from .keys import privacy_rules
    from .pipeline import build_guardrails, build_loops, build_runner, build_scheduler

    if settings.broker_url.startswith("memory://"):
        print(
            "error: with BROKER_URL=memory:// the consumers run inside `serve`; a worker needs redis://",
            file=sys.stderr,
        )
        return 2

    async def run() -> int:
        database = Database(settings.database_url)
        stream = stream_from_url(settings.broker_url, claim_idle=settings.events_claim_idle)
        hub = Hub(broker_from_url(settings.broker_url), RealtimeStats())
        await hub.start()
        privacy = privacy_rules(settings)
        leaderboards = Leaderboards(database, boards_from_url(settings.broker_url), privacy)
        ingest = EventIngest(database, stream)
        engine = build_loops(settings, database, hub, ingest, privacy)
        runner = build_runner(settings, database, stream, ingest, hub, leaderboards, engine)
        scheduler = build_scheduler(settings, database, engine)
        _, guardrail_jobs = build_guardrails(settings, database, hub, engine)
        guardrail_jobs.register(scheduler)
        await runner.start()
        await engine.start()
        await scheduler.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        logging.getLogger("viral.worker").info("worker up: consumers %s", [c.name for c in runner.consumers])
        await stop.wait()
        await scheduler.stop()
        await engine.stop()
        await runner.stop()
        await engine.services.copy.close()
        await hub.stop()
        await stream.close()
        await leaderboards.store.close()
        await database.dispose()
        return 0

    return asyncio.run(run())


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from store.migrate import upgrade

    upgrade(settings.database_url)
    print(f"migrate: {settings.database_url.split('@')[-1]} is at the latest schema")
    return 0


def _token(args: argparse.Namespace, settings: Settings) -> int:
    claims: dict[str, object] = {"sub": args.sub, "role": args.role}
    if args.minor:
        claims["minor"] = True
    if args.name:
        claims["name"] = args.name
    if args.opted_out:
        claims["opted_out"] = True
    if args.subjects:
        claims["subjects"] = [s for s in args.subjects.split(",") if s]
    print(TokenVerifier(settings.secret_key).issue(claims, ttl=args.ttl))
    return 0


def _loadtest(argv: list[str]) -> int:
    """`viral-engine loadtest …` (SPEC §10): bench/loadtest.py, imported only when asked for. It
    takes no server settings (its key comes from --secret, SECRET_KEY or .viral-engine-secret)."""
    from bench.loadtest import main as loadtest_main

    return loadtest_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="viral-engine", description="Real-time growth backend.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the web process (sockets + HTTP API)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--graceful-timeout", type=float, default=10.0, help="seconds to drain on SIGTERM")
    serve.add_argument(
        "--ws",
        choices=sorted(WS_IMPLEMENTATIONS),
        default="fast",
        help="WebSocket implementation (default: fast, direct frame writes)",
    )
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False)
    serve.add_argument(
        "--demo",
        action="store_true",
        help="also run a simulated cohort of students, parents and tutors (web/demo.py) against this "
        "server, so the dashboards move; loopback hosts only, never with ENV=production",
    )
    serve.set_defaults(func=_serve)

    worker = sub.add_parser("worker", help="run background consumers (multi-process deployments)")
    worker.set_defaults(func=_worker)

    migrate = sub.add_parser("migrate", help="upgrade the database schema to the latest version")
    migrate.set_defaults(func=_migrate)

    token = sub.add_parser("token", help="print a signed token for tests and tools")
    token.add_argument("--sub", required=True, help="user id")
    token.add_argument("--role", required=True, choices=ROLES)
    token.add_argument("--minor", action="store_true", help="the user is under 13 (COPPA rules apply)")
    token.add_argument("--subjects", default="", help="comma-separated subjects claim")
    token.add_argument("--name", default="", help="display name shown to other users (never for minors)")
    token.add_argument("--opted-out", action="store_true", help="the user turned social features off")
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds until it expires")
    token.set_defaults(func=_token)

    # Parsed by bench/loadtest.py (see main()); listed here for `viral-engine --help`.
    sub.add_parser(
        "loadtest",
        add_help=False,
        help="open N real sockets against a server on this machine and drive a scenario "
        "(viral-engine loadtest --help)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loadtest"]:
        # Before the server's settings: they would make a development key file if there is none.
        return _loadtest(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    result: int = args.func(args, settings)
    return result


if __name__ == "__main__":
    sys.exit(main())
