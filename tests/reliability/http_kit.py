"""What the HTTP abuse tests share: one real server per test module (on a fresh database of the kind
the suite runs on), the app's routes read from the Starlette app itself, tokens forged every way a
client might try, and a fingerprint of every table to show that refused requests changed nothing.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from servers import SECRET, ServerProcess, fresh_postgres, make_token
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from store import Base

# Tables that change on their own while a server runs (scheduler jobs and their bookkeeping).
BACKGROUND_TABLES = frozenset({"loop_jobs"})
# A server whose timed jobs stay quiet during a test (no guardrail evaluation, no relay passes that
# would rewrite rows under a fingerprint).
QUIET = {"GUARDRAILS_EVERY": "3600", "EVENTS_MAINTENANCE_EVERY": "3600", "SCHEDULER_POLL": "3600"}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


ADMIN = make_token("ops", "admin")


# Routes, straight from the app.


@functools.cache
def app_routes() -> frozenset[tuple[str, str]]:
    """(METHOD, path) for every HTTP route of the app as `create_app` builds it (HEAD goes with GET)."""
    from web.app import create_app
    from web.config import Settings
    from web.openapi import served

    app = create_app(Settings(secret_key=SECRET, database_url="sqlite+aiosqlite:///:memory:"))
    return frozenset(served(app))


@functools.cache
def app_schema() -> dict[str, Any]:
    from web.app import create_app
    from web.config import Settings
    from web.openapi import build_schema

    app = create_app(Settings(secret_key=SECRET, database_url="sqlite+aiosqlite:///:memory:"))
    return build_schema(app.state.loops.action_names)


PARAM = re.compile(r"\{([a-z_]+)(?::[a-z]+)?\}")


def fill(template: str, values: dict[str, str]) -> str:
    """`template` with each `{name}` (or `{name:conv}`) replaced by values[name]."""
    return PARAM.sub(lambda m: values[m.group(1)], template)


# Tokens a client might forge.


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(claims: dict[str, Any], alg: str = "none") -> str:
    header = _b64(orjson.dumps({"alg": alg, "typ": "JWT"}))
    return f"{header}.{_b64(orjson.dumps(claims))}."


def _hs512(claims: dict[str, Any]) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyJWT finds our test key short for HS512; so does the server
        return jwt.encode(claims, SECRET, algorithm="HS512")


def _claims(sub: Any = "mallory", role: str = "admin", **extra: Any) -> dict[str, Any]:
    import time

    now = int(time.time())
    return {"sub": sub, "role": role, "iat": now, "exp": now + 3600, **extra}


def forged_tokens() -> dict[str, tuple[str, str]]:
    """name -> (token, what the refusal says). Each one claims the admin role: only the forgery stops it."""
    good = make_token("mallory", "admin")
    header, payload, signature = good.split(".")
    flipped = signature[:-4] + ("AAAA" if not signature.endswith("AAAA") else "BBBB")
    now = _claims()
    return {
        "tampered signature": (f"{header}.{payload}.{flipped}", "invalid token signature"),
        "tampered claims": (
            f"{header}.{_b64(orjson.dumps(_claims(sub='ops')))}.{signature}",
            "invalid token signature",
        ),
        "wrong key": (make_token("mallory", "admin", secret="not-our-key-" * 5), "invalid token signature"),
        "expired": (make_token("mallory", "admin", ttl=-30), "token expired"),
        "alg none": (unsigned(now), "invalid token"),
        "alg None with a signature": (unsigned(now, "None") + signature, "invalid token"),
        "alg HS512 with our key": (_hs512(now), "invalid token"),
        "missing sub": (jwt.encode({k: v for k, v in now.items() if k != "sub"}, SECRET), "'sub'"),
        "empty sub": (jwt.encode(_claims(sub=""), SECRET), "sub"),
        "numeric sub": (jwt.encode(_claims(sub=42), SECRET), "sub"),
        "missing exp": (jwt.encode({k: v for k, v in now.items() if k != "exp"}, SECRET), "'exp'"),
        "not yet valid": (jwt.encode(_claims(nbf=now["iat"] + 3600), SECRET), "invalid token"),
        "garbage": ("not.a.jwt", "invalid token"),
        "empty segments": ("..", "invalid token"),
    }


# Database fingerprints.


async def fingerprint(database_url: str) -> dict[str, str]:
    """A hash of every row of every table (but BACKGROUND_TABLES), per table."""
    engine = create_async_engine(database_url)
    out: dict[str, str] = {}
    try:
        async with engine.connect() as conn:
            for table in Base.metadata.sorted_tables:
                if table.name in BACKGROUND_TABLES:
                    continue
                rows = (await conn.execute(select(table))).all()
                digest = hashlib.sha256()
                for row in sorted(repr(tuple(r)) for r in rows):
                    digest.update(row.encode())
                out[table.name] = f"{len(rows)}:{digest.hexdigest()[:16]}"
    finally:
        await engine.dispose()
    return out


# One server per module.


def fresh_database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, kind: str | None = None
) -> Iterator[str]:
    """For a fixture of any scope: a fresh, migrated database of `kind`, by default PostgreSQL when
    TEST_DATABASE=postgresql (as CI runs), else SQLite; copied from the session's migrated template
    like `server_database`."""
    if (kind or os.environ.get("TEST_DATABASE", "sqlite")) == "postgresql":
        yield from fresh_postgres(request, "viral_m")
    else:
        path = tmp_path_factory.mktemp("module-db") / "module.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite+aiosqlite:///{path}"


def serve(database_url: str, tmp_path_factory: pytest.TempPathFactory, **env: str) -> Iterator[ServerProcess]:
    """For a module-scoped fixture: a real `viral-engine serve` on `database_url`, killed afterwards."""
    tmp: Path = tmp_path_factory.mktemp("module-server")
    server = ServerProcess(tmp, {"DATABASE_URL": database_url, **QUIET, **env}).start()
    yield server
    server.kill()
