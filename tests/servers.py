"""Real server processes and socket helpers shared by the end-to-end tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson

from realtime import TokenVerifier

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-key-that-is-long-enough-for-hs256-0123456789"


def make_token(
    sub: str, role: str = "student", *, ttl: float = 3600, secret: str = SECRET, **claims: Any
) -> str:
    return TokenVerifier(secret).issue({"sub": sub, "role": role, **claims}, ttl=ttl)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A real `viral-engine serve` process on a free loopback port."""

    def __init__(
        self,
        tmp: Path,
        env: dict[str, str] | None = None,
        port: int | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.port = port or free_port()
        self.args = args
        self.tmp = tmp
        self.env = {
            **os.environ,
            "SECRET_KEY": SECRET,
            "BROKER_URL": "memory://",
            "DATABASE_URL": f"sqlite+aiosqlite:///{tmp}/viral.db",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = tmp / f"server-{self.port}.log"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, token: str | None = None, vsn: str | None = "2.0.0") -> str:
        query = []
        if vsn is not None:
            query.append(f"vsn={vsn}")
        if token is not None:
            query.append(f"token={token}")
        return f"ws://127.0.0.1:{self.port}/socket/websocket?" + "&".join(query)

    def start(self, timeout: float = 20.0) -> ServerProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "web.cli",
                "serve",
                "--port",
                str(self.port),
                "--graceful-timeout",
                "5",
                *self.args,
            ],
            cwd=self.tmp,
            env={**self.env, "PYTHONPATH": str(ROOT)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.http}/healthz", timeout=0.5).status_code == 200:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"server did not become healthy:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout: float = 10.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def publish(self, topic: str, event: str, payload: dict[str, Any]) -> httpx.Response:
        return httpx.post(
            f"{self.http}/api/publish",
            json={"topic": topic, "event": event, "payload": payload},
            headers={"authorization": f"Bearer {make_token('admin-1', 'admin')}"},
            timeout=5,
        )


async def recv_json(ws: Any, timeout: float = 5.0) -> Any:
    return orjson.loads(await asyncio.wait_for(ws.recv(), timeout))


async def send_json(ws: Any, frame: list[Any]) -> None:
    await ws.send(orjson.dumps(frame).decode())


class PhxClient:
    """A minimal Phoenix V2 client over `websockets`, keeping every frame it receives."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.frames: list[list[Any]] = []
        self._ref = 0
        self.join_refs: dict[str, str] = {}
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> PhxClient:
        import websockets

        return cls(await websockets.connect(url, **kwargs))

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            async for raw in self.ws:
                self.frames.append(orjson.loads(raw))
                self._changed.set()
        self._changed.set()

    async def wait_for(self, predicate: Any, timeout: float = 5.0) -> list[Any]:
        """The first received frame (old or new) for which predicate(frame) is true."""
        seen = 0
        async with asyncio.timeout(timeout):
            while True:
                for frame in self.frames[seen:]:
                    if predicate(frame):
                        return frame
                seen = len(self.frames)
                if self._reader.done():
                    raise AssertionError(f"socket closed; frames: {self.frames[-5:]!r}")
                self._changed.clear()
                await self._changed.wait()

    async def request(self, topic: str, event: str, payload: Any) -> dict[str, Any]:
        self._ref += 1
        ref = str(self._ref)
        if event == "phx_join":
            self.join_refs[topic] = ref
        join_ref = self.join_refs.get(topic)
        await self.ws.send(orjson.dumps([join_ref, ref, topic, event, payload]).decode())
        frame = await self.wait_for(lambda f: f[1] == ref and f[3] == "phx_reply")
        return dict(frame[4])

    async def join(self, topic: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.request(topic, "phx_join", params or {})

    def events(self, topic: str, event: str) -> list[Any]:
        return [f[4] for f in self.frames if f[2] == topic and f[3] == event]

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


# Presence, tuned for tests: quick batches, heartbeats and node expiry.
TOPIC = "presence:subject:algebra"
FAST_PRESENCE = {
    "PRESENCE_DIFF_INTERVAL": "0.05",
    "PRESENCE_HEARTBEAT_INTERVAL": "0.5",
    "PRESENCE_NODE_TIMEOUT": "3",
}


def is_event(topic: str, event: str):
    return lambda f: f[2] == topic and f[3] == event


def keys(state: dict) -> dict[str, int]:
    return {key: len(value["metas"]) for key, value in state.items()}


class Roster:
    """What a Phoenix Presence client keeps: state, then diffs applied in order (joins, then leaves)."""

    def __init__(self, client: PhxClient, topic: str) -> None:
        self.client, self.topic = client, topic

    def current(self) -> dict[str, list[dict]]:
        roster: dict[str, dict[str, dict]] = {}
        for frame in self.client.frames:
            if frame[2] != self.topic:
                continue
            if frame[3] == "presence_state":
                roster = {k: {m["phx_ref"]: m for m in v["metas"]} for k, v in frame[4].items()}
            elif frame[3] == "presence_diff":
                for key, value in frame[4]["joins"].items():
                    roster.setdefault(key, {}).update({m["phx_ref"]: m for m in value["metas"]})
                for key, value in frame[4]["leaves"].items():
                    for meta in value["metas"]:
                        roster.get(key, {}).pop(meta["phx_ref"], None)
                    if not roster.get(key):
                        roster.pop(key, None)
        return {k: list(v.values()) for k, v in roster.items()}

    async def until(self, expected: dict[str, int], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while {k: len(v) for k, v in self.current().items()} != expected:
                await asyncio.sleep(0.02)


class WorkerProcess:
    """A real `viral-engine worker` process (the event consumers), killable and restartable."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.env = {
            **os.environ,
            "SECRET_KEY": SECRET,
            "PYTHONUNBUFFERED": "1",
            **env,
            "PYTHONPATH": str(ROOT),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = tmp / f"worker-{id(self)}.log"

    def start(self) -> WorkerProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "web.cli", "worker"],
            cwd=self.tmp,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while "worker up" not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start:\n{self.log_path.read_text(errors='replace')}")
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class RedisServer:
    """A private, throwaway redis-server on a free port, for tests that stop and restart Redis."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.tmp),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return self
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# PostgreSQL databases for tests (conftest.py's fixtures and tests/reliability's module servers).


def with_database(url: str, name: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + name


async def pg_admin(url: str, *statements: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def fresh_postgres(request: Any, prefix: str) -> Iterator[str]:
    """For a fixture of any scope (`request` is its pytest request): a new PostgreSQL database copied
    from the session's migrated template, dropped afterwards."""
    base = request.getfixturevalue("postgres_url")
    template = request.getfixturevalue("postgres_template")
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    asyncio.run(pg_admin(base, f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    yield with_database(base, name)
    asyncio.run(pg_admin(base, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
