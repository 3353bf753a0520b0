"""Shared fixtures: real services (Redis, PostgreSQL) and real server processes.

Under REQUIRE_SERVICES=1 (CI) a missing service fails the run instead of skipping its tests.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from servers import ServerProcess

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
REQUIRE_SERVICES = os.environ.get("REQUIRE_SERVICES") == "1"


def _service_missing(name: str, detail: str) -> None:
    message = f"{name} is not reachable ({detail})"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message}; REQUIRE_SERVICES=1 makes this a failure")
    pytest.skip(message)


def _tcp_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
        return True
    return False


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except Exception as exc:
        _service_missing("Redis", f"{REDIS_URL}: {exc}")
    return REDIS_URL


@pytest.fixture(scope="session")
def database_url() -> str:
    if not _tcp_open("127.0.0.1", 5432):
        _service_missing("PostgreSQL", DATABASE_URL)
    return DATABASE_URL


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[ServerProcess] = []

    def start(
        env: dict[str, str] | None = None, port: int | None = None, args: tuple[str, ...] = ()
    ) -> ServerProcess:
        srv = ServerProcess(tmp_path, env, port, args).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.kill()


@pytest.fixture(params=["fast", "websockets-sansio"])
def ws_impl(request: pytest.FixtureRequest) -> str:
    """Both I/O layers: direct frame writes, and the portable ASGI path on uvicorn's own protocol."""
    return str(request.param)


@pytest.fixture
def server(server_factory: Any, ws_impl: str) -> ServerProcess:
    srv: ServerProcess = server_factory(args=("--ws", ws_impl))
    return srv
