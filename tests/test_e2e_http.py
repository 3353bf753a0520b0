"""HTTP surface: /api/publish authorisation and validation, health, readiness, Prometheus metrics."""

from __future__ import annotations

import httpx
import pytest
from servers import make_token


def _post(server, body, token=None, **kwargs):
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{server.http}/api/publish", json=body, headers=headers, **kwargs)


def test_publish_needs_a_bearer_token(server):
    response = _post(server, {"topic": "user:1", "event": "x", "payload": {}})
    assert response.status_code == 401
    assert "bearer" in response.json()["error"]


def test_publish_needs_the_admin_role(server):
    response = _post(server, {"topic": "user:1", "event": "x", "payload": {}}, make_token("u1", "student"))
    assert response.status_code == 403


def test_publish_with_an_expired_token_is_refused(server):
    response = _post(server, {"topic": "user:1", "event": "x"}, make_token("a", "admin", ttl=-5))
    assert response.status_code == 401
    assert response.json()["error"] == "token expired"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"event": "x", "payload": {}}, "topic"),
        ({"topic": "user:1", "payload": {}}, "event"),
        ({"topic": "user:1", "event": "phx_reply", "payload": {}}, "event"),
        ({"topic": "user:1", "event": "x", "payload": [1]}, "payload"),
    ],
)
def test_publish_validates_each_field(server, body, field):
    response = _post(server, body, make_token("a", "admin"))
    assert response.status_code == 422
    assert field in response.json()["fields"]


def test_publish_refuses_non_json_and_oversized_bodies(server):
    headers = {"authorization": f"Bearer {make_token('a', 'admin')}"}
    bad = httpx.post(f"{server.http}/api/publish", content=b"{nope", headers=headers)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]
    big = httpx.post(f"{server.http}/api/publish", content=b"x" * (2 << 20), headers=headers)
    assert big.status_code == 413


def test_publish_to_a_topic_nobody_joined_reaches_zero(server):
    response = _post(server, {"topic": "user:nobody", "event": "x", "payload": {}}, make_token("a", "admin"))
    assert response.status_code == 202
    assert response.json()["local_subscribers"] == 0


def test_healthz_and_metrics(server):
    assert httpx.get(f"{server.http}/healthz").json() == {"status": "ok"}
    text = httpx.get(f"{server.http}/metrics").text
    for name in (
        "viral_realtime_sockets ",
        "viral_realtime_frames_in_total",
        "viral_realtime_frames_out_total",
        "viral_realtime_slow_consumers_dropped_total",
        "viral_broker_lag_seconds",
        "process_resident_memory_bytes",
    ):
        assert name in text


def test_readyz_with_real_redis_and_postgresql(server_factory, redis_url, postgres_url):
    server = server_factory({"BROKER_URL": redis_url, "DATABASE_URL": postgres_url})
    response = httpx.get(f"{server.http}/readyz")
    assert response.status_code == 200
    assert response.json() == {"ready": True, "checks": {"broker": True, "database": True}}


def test_readyz_is_503_when_the_database_is_unreachable(server_factory):
    server = server_factory({"DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:1/none"})
    response = httpx.get(f"{server.http}/readyz", timeout=10)
    assert response.status_code == 503
    assert response.json()["checks"] == {"broker": True, "database": False}


def test_the_socket_path_over_plain_http_explains_itself(server):
    response = httpx.get(f"{server.http}/socket/websocket")
    assert response.status_code == 400
    assert "WebSocket" in response.text
