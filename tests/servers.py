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
