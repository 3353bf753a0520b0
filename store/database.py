"""The async SQLAlchemy engine for DATABASE_URL (SQLite by default, PostgreSQL via asyncpg)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from sqlalchemy import text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

# Integers a JSON column hands back must fit in 64 bits, as every one we accept does (web.responses
# refuses bigger ones in bodies); orjson, which encodes every response and frame, cannot write more.
# PostgreSQL's jsonb can still make one: it stores numbers as `numeric` and writes 1e30 back as
# 1000000000000000000000000000000. Such a number is read as the float it was sent as.
_INT64 = (-(1 << 63), (1 << 63) - 1)


def _json_int(digits: str) -> int | float:
    if len(digits) <= 20:  # a sign and 19 digits at most: it may fit
        value = int(digits)
        if _INT64[0] <= value <= _INT64[1]:
            return value
    return float(digits)


def json_loads(text: str | bytes) -> Any:
    """The JSON columns' decoder: the standard one, but for integers beyond 64 bits (see _json_int)."""
    return json.loads(text, parse_int=_json_int)


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict[str, object] = {"pool_pre_ping": True, "json_deserializer": json_loads}
        if url.startswith("postgresql"):
            # Dates are UTC days whatever the server's timezone setting.
            # Timeouts, so a database that stops answering (a partition, not a refused connection)
            # fails requests instead of hanging them: 5 s to connect, 60 s for any one statement.
            kwargs.update(
                pool_size=10,
                max_overflow=10,
                connect_args={"server_settings": {"timezone": "UTC"}, "timeout": 5, "command_timeout": 60},
            )
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def session(self) -> AsyncSession:
        return self.sessions()

    async def ping(self, timeout: float = 2.0) -> bool:
        """True when a trivial query answers within `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout), self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    async def dispose(self) -> None:
        await self.engine.dispose()


def dialect_insert(dialect: str) -> Any:
    """`insert` with `ON CONFLICT` support for a dialect name ("postgresql" or "sqlite")."""
    return pg_insert if dialect == "postgresql" else sqlite_insert
