"""PostgreSQL unavailable for 10 s behind a proxy (the server's DATABASE_URL points at it; the shared
PostgreSQL keeps running for everyone else): ingest answers 503 with Retry-After and never 2xx for what
it cannot store, sockets stay up, and everything recovers by itself once the database is back."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from .fault_kit import (
    EventPump,
    Fleet,
    FleetSocket,
    TcpProxy,
    assert_processed_exactly_once,
    consumed_everything,
    eventually,
    read_effects,
    session_event,
)

OUTAGE = 10.0
SOCKETS = 50


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("mode", ["refuse", "blackhole"])
async def test_postgres_unavailable_for_ten_seconds(server_factory, database_url, mode):
    proxy = TcpProxy(5432).start()
    via_proxy = proxy.database_url(database_url)
    server = server_factory(
        {"DATABASE_URL": via_proxy, "EVENTS_MAINTENANCE_EVERY": "1", "EVENTS_RECONCILE_AFTER": "3"}
    )
    url = f"ws://127.0.0.1:{server.port}/socket/websocket?vsn=2.0.0"
    sockets = [FleetSocket(f"u{i}", [url], [f"user:u{i}", f"feed:subject:s{i % 5}"]) for i in range(SOCKETS)]
    fleet = await Fleet.start(sockets)
    pump = EventPump(
        [server.http],
        lambda n: [
            session_event(f"ev{n}-{j}", f"u{(n * 5 + j) % SOCKETS}", f"s{(n + j) % 5}") for j in range(5)
        ],
    )
    figures: dict[str, object] = {"mode": mode, "outage_s": OUTAGE}
    try:
        async with httpx.AsyncClient(base_url=server.http, timeout=30) as http:
            pump.start()
            await asyncio.sleep(2)
            accepted_before = len(pump.log.accepted)
            assert accepted_before > 0

            proxy.cut(mode)
            cut_at = time.monotonic()

            async def readyz_is(status: int) -> bool:
                return (await http.get("/readyz")).status_code == status

            figures["readyz_503_after_cut_s"] = round(
                await eventually(lambda: readyz_is(503), 15, "/readyz 503"), 2
            )
            assert (await http.get("/readyz")).json()["checks"] == {"broker": True, "database": False}
            await eventually(
                lambda: _metric_is(http, "viral_database_up", 0), 15, "viral_database_up 0 in /metrics"
            )
            # A socket stays up and answers; a `track` on it is refused with a retry hint, not dropped.
            for sock in sockets[:10]:
                assert (await sock.request("phoenix", "heartbeat", {}))["status"] == "ok"
            started = time.monotonic()
            reply = await sockets[0].request(
                "user:u0", "track", session_event("track-during-outage", "u0", "s0"), timeout=60
            )
            figures["track_refused_after_s"] = round(time.monotonic() - started, 2)
            assert reply["status"] == "error", reply
            assert reply["response"]["reason"] == "event store unavailable; retry", reply
            assert reply["response"]["retry_after_ms"] > 0
            await eventually(lambda: pump.log.refused >= 3, 30, "ingest answering 503 during the outage")
            figures["ingest_503_latency_s"] = round(await _time_post(http), 2)
            await asyncio.sleep(max(0.0, OUTAGE - (time.monotonic() - cut_at)))
            accepted_during = len(pump.log.accepted) - accepted_before

            proxy.restore()
            restored = time.monotonic()
            figures["down_s"] = round(restored - cut_at, 2)
            refused_at_restore = pump.log.refused
            await eventually(
                lambda: len(pump.log.accepted) > accepted_before + accepted_during,
                60,
                "ingest accepting again",
            )
            figures["ingest_2xx_after_restore_s"] = round(time.monotonic() - restored, 2)
            figures["readyz_200_after_restore_s"] = round(
                await eventually(lambda: readyz_is(200), 60, "/readyz 200 again")
                + figures["ingest_2xx_after_restore_s"],
                2,
            )
            await asyncio.sleep(2)
            log = await pump.stop()
            figures["requests_refused_503"] = log.refused
            figures["retry_after"] = sorted(log.retry_after)
            figures["events_accepted"] = len(log.accepted)
            assert log.other == [], log.other
            assert log.failed == 0, "a request got no answer"
            assert refused_at_restore > 0 and log.retry_after and "" not in log.retry_after
            await eventually(
                lambda: consumed_everything(via_proxy, len(log.accepted)), 90, "every event consumed"
            )
            figures["all_consumed_after_restore_s"] = round(time.monotonic() - restored, 2)
            assert await _metric_is(http, "viral_database_up", 1)
            assert await _metric_is(http, "viral_database_outages_total", 1)

        assert fleet.closes() == 0, "sockets were dropped during the database outage"
        effects = await read_effects(database_url)
        # Nothing answered 2xx is missing; nothing is stored that no client was told was accepted
        # (every refused batch was retried with the same ids until accepted).
        assert_processed_exactly_once(effects, log.accepted)
    finally:
        print("FAULT-FIGURES postgres-outage", json.dumps(figures))
        await fleet.stop()
        server.kill()
        proxy.stop()


async def _metric_is(http: httpx.AsyncClient, name: str, value: float) -> bool:
    return metric((await http.get("/metrics")).text, name) == value


async def _time_post(http: httpx.AsyncClient) -> float:
    """How long one ingest request takes to be refused while the database is away."""
    from .fault_kit import admin_headers

    started = time.monotonic()
    response = await http.post(
        "/api/events", json=session_event("probe-during-outage", "u1", "s1"), headers=admin_headers()
    )
    assert response.status_code == 503, response.text
    assert response.json() == {"error": "event store unavailable; nothing was accepted, retry"}
    assert int(response.headers["retry-after"]) > 0
    return time.monotonic() - started


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("mode", ["refuse", "blackhole"])
async def test_a_consumer_waits_for_the_database_instead_of_parking_the_event(database_url, mode):
    """Five quick failed attempts used to park an event while the database was away (its effects then
    never happened when the park itself got through). Now the runner waits for the database."""
    from channels import FeedConsumer
    from metrics import ConsumerRunner, MemoryEventStream
    from realtime import Hub, MemoryBroker, RealtimeStats
    from store import Consumption, Database, FeedItem
    from store.privacy import PrivacyRules

    proxy = TcpProxy(5432).start()
    database = Database(proxy.database_url(database_url))
    hub = Hub(MemoryBroker(), RealtimeStats())
    await hub.start()
    runner = ConsumerRunner(database, MemoryEventStream(), [FeedConsumer(hub, PrivacyRules("test"))])
    message = {
        "id": "waits-1",
        "type": "session_completed",
        "user_id": "maya",
        "ts": "2026-01-05T10:00:00+00:00",
        "props": {"subject": "algebra", "minutes": 20},
        "actor_id": "maya",
    }
    try:
        assert await database.ping()
        proxy.cut(mode)
        processing = asyncio.create_task(runner.process(runner.consumers[0], message))
        await asyncio.sleep(4)  # well past the five retries (0.1 + 0.2 + 0.4 + 0.8 s of backoff)
        assert not processing.done(), f"gave up while the database was away: {processing.result()}"
        proxy.restore()
        assert await asyncio.wait_for(processing, 60) == "done"
        assert runner.stats.parked == 0
        # Refused: each attempt fails at once, so the runner notices and waits. Partitioned: the attempt
        # itself hangs (the statement timeout is 60 s) until the network is back.
        assert runner.stats.waits_for_database == (1 if mode == "refuse" else 0)
        async with database.session() as session:
            from sqlalchemy import select

            marks = (await session.execute(select(Consumption.status))).scalars().all()
            feeds = sorted((await session.execute(select(FeedItem.feed))).scalars())
        assert marks == ["done"]
        assert feeds == ["global", "subject:algebra", "user:maya"]
    finally:
        await hub.stop()
        await database.dispose()
        proxy.stop()
