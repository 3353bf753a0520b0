"""Shared fixtures: real services (Redis, PostgreSQL) and real server processes.

Under REQUIRE_SERVICES=1 (CI) a missing service fails the run instead of skipping its tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from servers import PhxClient, ServerProcess, fresh_postgres, make_token, pg_admin, with_database

from store.migrate import upgrade

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
def postgres_url() -> str:
    """The PostgreSQL server's scratch database; tests make databases of their own from a template."""
    if not _tcp_open("127.0.0.1", 5432):
        _service_missing("PostgreSQL", DATABASE_URL)
    return DATABASE_URL


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("db") / "template.db"
    upgrade(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def postgres_template(postgres_url: str) -> Iterator[str]:
    name = f"viral_tpl_{os.getpid()}"
    asyncio.run(pg_admin(postgres_url, f'DROP DATABASE IF EXISTS "{name}"', f'CREATE DATABASE "{name}"'))
    upgrade(with_database(postgres_url, name))
    yield name
    asyncio.run(pg_admin(postgres_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database of each kind for this test."""
    if request.param == "sqlite":
        path = tmp_path / "fresh.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    yield from fresh_postgres(request, "viral_t")


@pytest.fixture
def server_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The fresh database the servers of one test share: SQLite, or PostgreSQL when
    TEST_DATABASE=postgresql (as CI runs the suite)."""
    if os.environ.get("TEST_DATABASE", "sqlite") == "postgresql":
        yield from fresh_postgres(request, "viral_t")
    else:
        path = tmp_path / "shared.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite+aiosqlite:///{path}"


@pytest.fixture
def server_factory(tmp_path: Path, server_database: str) -> Iterator[Any]:
    """Starts real server processes; unless told otherwise they share one fresh database."""
    started: list[ServerProcess] = []

    def start(
        env: dict[str, str] | None = None, port: int | None = None, args: tuple[str, ...] = ()
    ) -> ServerProcess:
        env = {"DATABASE_URL": server_database, **(env or {})}
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


@pytest.fixture
async def clients() -> Any:
    """`await clients(server, sub, **claims)`: a Phoenix socket client for that user, closed at the end."""
    opened: list[PhxClient] = []

    async def connect(server: ServerProcess, sub: str, **claims: Any) -> PhxClient:
        client = await PhxClient.connect(server.ws_url(make_token(sub, **claims)))
        opened.append(client)
        return client

    yield connect
    for client in opened:
        with contextlib.suppress(Exception):
            await client.close()
