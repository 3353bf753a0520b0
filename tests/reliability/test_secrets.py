"""Secrets: production refuses unsafe keys (and `viral-engine serve` says why and exits non-zero), and key
rotation has a grace period: tokens and invite links signed with a key in `SECRET_KEY_OLD` verify until
`SECRET_KEY_OLD_UNTIL`, then stop, in a running server without a restart.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from servers import ROOT, SECRET, ServerProcess, free_port, make_token
from websockets.exceptions import InvalidStatus

from metrics.links import LinkError, LinkSigner
from store import Database, Link
from web.config import ConfigError, Settings
from web.keys import RotatingTokenVerifier

OLD = "old-key-retired-in-this-rotation-0123456789abcdef"
STRONG = "a-production-key-of-forty-eight-random-chars-xyz0"
CLI = Path(sys.executable).parent / "viral-engine"


def _serve(tmp: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`viral-engine serve` with exactly `env` on top of a clean environment (no inherited SECRET_KEY)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SECRET_KEY", "ENV"))}
    port = free_port()
    run = subprocess.run(
        [str(CLI), "serve", "--port", str(port)],
        cwd=tmp,
        env={**base, "PYTHONPATH": str(ROOT), "DATABASE_URL": f"sqlite+aiosqlite:///{tmp}/x.db", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "a refused server must not be listening"
    return run


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({}, "SECRET_KEY is required when ENV=production"),
        ({"SECRET_KEY": "short-but-not-empty"}, "at least 32 characters"),
        ({"SECRET_KEY": STRONG, "SECRET_KEY_OLD": "old-and-short"}, "every SECRET_KEY_OLD key"),
        ({"SECRET_KEY": STRONG, "SECRET_KEY_OLD": OLD}, "SECRET_KEY_OLD needs SECRET_KEY_OLD_UNTIL"),
        (
            {"SECRET_KEY": STRONG, "SECRET_KEY_OLD": OLD, "SECRET_KEY_OLD_UNTIL": "next tuesday"},
            "SECRET_KEY_OLD_UNTIL must be an ISO 8601 timestamp",
        ),
        (
            {"SECRET_KEY": STRONG, "SECRET_KEY_OLD": OLD, "SECRET_KEY_OLD_UNTIL": "2027-01-31T00:00:00"},
            "must carry a time zone",
        ),
    ],
    ids=["missing", "short", "short old key", "rotation without an end", "unreadable end", "naive end"],
)
def test_production_refuses_unsafe_keys_and_serve_exits_non_zero(
    tmp_path: Path, env: dict[str, str], says: str
) -> None:
    run = _serve(tmp_path, {"ENV": "production", **env})
    assert run.returncode == 2, run.stderr
    assert "configuration error" in run.stderr and says in run.stderr, run.stderr
    assert "make one with" in run.stderr or "SECRET_KEY_OLD" in run.stderr


def test_production_refuses_the_generated_development_key(tmp_path: Path) -> None:
    """The key `serve` generates for development (`.viral-engine-secret`) is no production key, even when
    copied into SECRET_KEY."""
    first = subprocess.run(
        [str(CLI), "token", "--sub", "u", "--role", "student"],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith(("SECRET_KEY", "ENV"))},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert first.returncode == 0, first.stderr
    generated = (tmp_path / ".viral-engine-secret").read_text().strip()
    assert len(generated) >= 32  # long enough: only its origin gives it away
    run = _serve(tmp_path, {"ENV": "production", "SECRET_KEY": generated})
    assert run.returncode == 2
    assert "SECRET_KEY is the development key generated into" in run.stderr, run.stderr


def test_a_strong_key_starts_in_production(tmp_path: Path) -> None:
    """The refusals above are about the keys: the same command starts with good ones."""
    until = "2999-01-01T00:00:00Z"
    env = {"ENV": "production", "SECRET_KEY": STRONG, "SECRET_KEY_OLD": OLD, "SECRET_KEY_OLD_UNTIL": until}
    server = ServerProcess(tmp_path, env).start()
    try:
        assert httpx.get(f"{server.http}/healthz").status_code == 200
    finally:
        server.kill()


@pytest.mark.parametrize(
    ("raw", "epoch"),
    [
        ("2027-01-31T00:00:00Z", datetime(2027, 1, 31, tzinfo=UTC).timestamp()),
        ("2027-01-31T02:00:00+02:00", datetime(2027, 1, 31, tzinfo=UTC).timestamp()),
        ("1800000000", 1800000000.0),
        ("", None),
    ],
)
def test_the_end_of_a_rotation_reads_as_iso_8601_or_epoch_seconds(raw: str, epoch: float | None) -> None:
    settings = Settings.from_env({"SECRET_KEY": STRONG, "SECRET_KEY_OLD": OLD, "SECRET_KEY_OLD_UNTIL": raw})
    assert settings.old_secret_keys == (OLD,)
    assert settings.old_secret_keys_until == epoch


def test_without_an_end_development_keeps_old_keys_and_production_does_not_start() -> None:
    assert Settings.from_env({"SECRET_KEY": STRONG, "SECRET_KEY_OLD": OLD}).old_secret_keys_until is None
    with pytest.raises(ConfigError, match="SECRET_KEY_OLD_UNTIL"):
        Settings.from_env({"ENV": "production", "SECRET_KEY": STRONG, "SECRET_KEY_OLD": OLD})


def test_old_keys_verify_until_the_end_of_the_grace_period_pure() -> None:
    now = [1000.0]
    verifier = RotatingTokenVerifier(STRONG, old_secrets=[OLD], old_until=2000.0, clock=lambda: now[0])
    old_token = make_token("u1", secret=OLD, ttl=10**9)
    assert verifier.verify(old_token)["sub"] == "u1"
    now[0] = 2000.0
    with pytest.raises(Exception, match="invalid token signature"):
        verifier.verify(old_token)
    assert verifier.verify(make_token("u1", secret=STRONG))["sub"] == "u1"  # the current key: always

    signer = LinkSigner(STRONG, [OLD], old_until=2000)
    old_link = LinkSigner(OLD).issue("maya", now=1000, ttl=10**6)
    signer.verify(old_link, "maya", now=1999)
    with pytest.raises(LinkError) as info:
        signer.verify(old_link, "maya", now=2000)
    assert info.value.reason == "unknown_key"
    signer.verify(LinkSigner(STRONG).issue("maya", now=1000, ttl=10**6), "maya", now=10**5)


async def _socket_status(server: ServerProcess, token: str) -> int:
    try:
        async with websockets.connect(server.ws_url(token)) as ws:
            await ws.send('[null,"1","phoenix","heartbeat",{}]')
            await asyncio.wait_for(ws.recv(), 10)
            return 101
    except InvalidStatus as exc:
        return int(exc.response.status_code)


async def test_a_running_server_honours_old_keys_until_the_deadline_then_refuses_them(
    server_factory: Any, server_database: str
) -> None:
    grace = 12.0  # seconds from now: start-up fits well inside it, even on a loaded machine
    deadline = time.time() + grace
    server: ServerProcess = server_factory(
        env={"SECRET_KEY": SECRET, "SECRET_KEY_OLD": OLD, "SECRET_KEY_OLD_UNTIL": f"{deadline:.3f}"}
    )
    assert time.time() < deadline - 3, "the server took most of the grace period to start"
    old_admin = make_token("ops", "admin", secret=OLD, ttl=3600)
    new_admin = make_token("ops", "admin", ttl=3600)
    old_link = LinkSigner(OLD).issue("maya", now=int(time.time()), ttl=3600)
    database = Database(server_database)
    try:
        async with database.session() as session, session.begin():
            session.add(
                Link(
                    nonce=old_link.nonce,
                    token=old_link.token,
                    referrer_id="maya",
                    source="direct",
                    target="/join",
                    expires_at=datetime.fromtimestamp(old_link.expires, UTC),
                )
            )
    finally:
        await database.dispose()

    async with httpx.AsyncClient(base_url=server.http, timeout=30) as http:

        async def state(token: str) -> tuple[int, int, int]:
            api = await http.get("/api/audit", headers={"authorization": f"Bearer {token}"})
            link = await http.get(f"/r/{old_link.token}")
            return api.status_code, await _socket_status(server, token), link.status_code

        before = await state(old_admin)
        assert time.time() < deadline, "the checks before the deadline ran past it"
        assert before == (200, 101, 302)

        await asyncio.sleep(max(0.0, deadline - time.time()) + 1.5)  # links count whole seconds
        after = await state(old_admin)
        assert after == (401, 403, 400)
        refused = await http.get("/api/audit", headers={"authorization": f"Bearer {old_admin}"})
        assert refused.json() == {"error": "invalid token signature"}
        # The current key is unaffected.
        current = await http.get("/api/audit", headers={"authorization": f"Bearer {new_admin}"})
        assert current.status_code == 200
        assert await _socket_status(server, new_admin) == 101
