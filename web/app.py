"""The Starlette application, assembled from the parts: socket endpoint, HTTP API, health, metrics."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute

from channels import BoardWatcher, ChannelContext, Leaderboards, boards_from_url, build_router
from channels.feed import feeds_follow_changes
from channels.leaderboard import boards_follow_changes
from channels.privacy import PrivacyNotices, sockets_follow_changes
from loops import Clock, SystemClock
from metrics import EventIngest, stream_from_url
from metrics.live import ExperimentsDashboard, KFactorDashboard
from presence import PresenceTracker
from realtime import BrokerUnavailable, PhoenixEndpoint, RealtimeStats, Revocations, Router, broker_from_url
from realtime.endpoint import ExposeTransportAbort
from store import Database

from . import (
    dashboards,
    events_api,
    experiments_api,
    guardrails_api,
    links_api,
    loops_api,
    metrics_api,
    privacy_api,
)
from .auth import require_role
from .config import Settings
from .keys import link_signer, privacy_rules, token_verifier
from .logs import install_token_redaction
from .openapi import openapi_json
from .pipeline import build_guardrails, build_loops, build_runner, build_scheduler
from .prometheus import build_registry
from .readiness import Dependency, ReadinessMonitor
from .responses import ORJSONResponse, RefuseNulInUrl, read_json

log = logging.getLogger(__name__)

RESERVED_EVENTS = frozenset({"phx_join", "phx_leave", "phx_reply", "phx_close", "phx_error", "heartbeat"})


async def publish(request: Request) -> Response:
    """SPEC §9a: deliver a push to every socket joined to `topic` on every node."""
    require_role(request, "admin")
    body = await read_json(request, request.app.state.settings.max_body_bytes)
    if not isinstance(body, dict):
        raise HTTPException(422, "body must be a JSON object {topic, event, payload}")
    topic, event, payload = body.get("topic"), body.get("event"), body.get("payload", {})
    errors = {}
    if not isinstance(topic, str) or not topic:
        errors["topic"] = "must be a non-empty string"
    elif topic.startswith("__"):
        errors["topic"] = "topics starting with '__' are internal to the server"
    if not isinstance(event, str) or not event:
        errors["event"] = "must be a non-empty string"
    elif event in RESERVED_EVENTS:
        errors["event"] = f"{event!r} is reserved by the Phoenix protocol"
    if not isinstance(payload, dict):
        errors["payload"] = "must be a JSON object"
    if errors:
        return ORJSONResponse({"error": "invalid publish request", "fields": errors}, status_code=422)
    try:
        reached = await request.app.state.endpoint.broadcast(topic, event, payload)
    except BrokerUnavailable as exc:
        log.warning("publish to %r failed: %s", topic, exc)
        return ORJSONResponse(
            {"error": "broker unavailable, nothing was published; retry"},
            status_code=503,
            headers={"retry-after": "1"},
        )
    return ORJSONResponse({"topic": topic, "event": event, "local_subscribers": reached}, status_code=202)


async def healthz(request: Request) -> Response:
    return ORJSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    state = request.app.state
    checks = {
        "broker": await state.endpoint.hub.broker.ping(),
        "database": await state.database.ping(),
    }
    ready = all(checks.values())
    return ORJSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


async def prometheus_metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return ORJSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def socket_over_http(request: Request) -> Response:
    return PlainTextResponse(
        "connect with a WebSocket: ws://HOST/socket/websocket?vsn=2.0.0&token=JWT", status_code=400
    )


def create_app(
    settings: Settings | None = None, *, router: Router | None = None, clock: Clock | None = None
) -> Starlette:
    """Build the app. `router` replaces the product's channels (the benchmarks use this); `clock`
    replaces the loops' and the scheduler's time (the loop scenario tests move it by hand)."""
    settings = settings or Settings.from_env()
    install_token_redaction()
    settings.warn_if_unsafe()
    privacy = privacy_rules(settings)
    revocations = Revocations(privacy.tombstone_key)
    verifier = token_verifier(settings, revocations)
    endpoint = PhoenixEndpoint(
        router=router or build_router(),
        verifier=verifier,
        broker=broker_from_url(settings.broker_url),
        limits=settings.limits,
        stats=RealtimeStats(),
        token_cookie="ve_admin",
    )
    database = Database(settings.database_url)
    stream = stream_from_url(settings.broker_url, claim_idle=settings.events_claim_idle)
    ingest = EventIngest(database, stream)
    leaderboards = Leaderboards(database, boards_from_url(settings.broker_url), privacy)
    board_watcher = BoardWatcher(endpoint.hub, leaderboards)
    k_factor = KFactorDashboard(endpoint.hub, database)
    experiments_dashboard = ExperimentsDashboard(endpoint.hub, database)
    # On memory:// this process is the whole deployment, so it runs the consumers too;
    # on redis:// they run in `viral-engine worker` processes.
    clock = clock or SystemClock()
    engine = build_loops(settings, database, endpoint.hub, ingest, privacy, clock)
    embedded = settings.broker_url.startswith("memory://")
    runner = (
        build_runner(settings, database, stream, ingest, endpoint.hub, leaderboards, engine)
        if embedded
        else None
    )
    scheduler = build_scheduler(settings, database, engine) if embedded else None
    guardrails_dashboard, guardrail_jobs = build_guardrails(settings, database, endpoint.hub, engine)
    if scheduler is not None:
        guardrail_jobs.register(scheduler)
    tracker = PresenceTracker(endpoint.hub, settings.presence)
    notices = PrivacyNotices(endpoint.hub, database, privacy, revocations)
    notices.on_change(sockets_follow_changes(endpoint))
    notices.on_change(boards_follow_changes(leaderboards, endpoint.hub), shared=True)
    notices.on_change(feeds_follow_changes(database, endpoint.hub, privacy), shared=True)
    ingest.privacy_changed = notices.changed
    readiness = ReadinessMonitor(
        [Dependency("broker", endpoint.hub.broker.ping), Dependency("database", database.ping)]
    )
    endpoint.context = ChannelContext(
        presence=tracker,
        database=database,
        ingest=ingest,
        leaderboards=leaderboards,
        board_watcher=board_watcher,
        k_factor=k_factor,
        experiments=experiments_dashboard,
        guardrails=guardrails_dashboard,
        loops=engine,
        privacy=privacy,
        notices=notices,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Most objects made from here on are short-lived (frames, payloads, presence listings): with
        # the default young-generation threshold the collector took over half the CPU while a large
        # presence room filled (bench/README.md). Start-up objects are frozen out of its scans.
        gc.collect()
        gc.freeze()
        gc.set_threshold(100_000, *gc.get_threshold()[1:])
        await endpoint.start()
        await readiness.start()
        await ingest.start()
        await tracker.start()
        await notices.start()
        await board_watcher.start()
        await k_factor.start()
        await experiments_dashboard.start()
        await guardrails_dashboard.start()
        if runner is not None:
            await runner.start()
        if scheduler is not None:
            await engine.start()
            await scheduler.start()
        log.info("viral-engine ready: broker=%s node=%s", settings.broker_url, tracker.node)
        try:
            yield
        finally:
            if scheduler is not None:
                await scheduler.stop()
                await engine.stop()
            if runner is not None:
                await runner.stop()
            await engine.services.copy.close()
            await k_factor.stop()
            await experiments_dashboard.stop()
            await guardrails_dashboard.stop()
            await board_watcher.stop()
            await notices.stop()
            await tracker.stop()
            await readiness.stop()
            await endpoint.stop()
            await ingest.stop()
            await stream.close()
            await leaderboards.store.close()
            await database.dispose()

    routes = [
        WebSocketRoute("/socket/websocket", endpoint),
        Route("/socket/websocket", socket_over_http),
        Route("/api/publish", publish, methods=["POST"]),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", prometheus_metrics),
        Route("/openapi.json", openapi_json),
        *events_api.routes,
        *links_api.routes,
        *metrics_api.routes,
        *loops_api.routes,
        *experiments_api.routes,
        *guardrails_api.routes,
        *privacy_api.routes,
        *dashboards.routes,
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error},
        middleware=[Middleware(ExposeTransportAbort), Middleware(RefuseNulInUrl)],
    )
    app.state.settings = settings
    app.state.verifier = verifier
    app.state.endpoint = endpoint
    app.state.database = database
    app.state.presence = tracker
    app.state.privacy = privacy
    app.state.notices = notices
    app.state.ingest = ingest
    app.state.k_factor = k_factor
    app.state.experiments_dashboard = experiments_dashboard
    app.state.guardrails_dashboard = guardrails_dashboard
    app.state.guardrail_jobs = guardrail_jobs
    app.state.link_signer = link_signer(settings)
    app.state.runner = runner
    app.state.loops = engine
    app.state.clock = clock  # links and loops share it
    app.state.scheduler = scheduler
    app.state.readiness = readiness
    app.state.registry = build_registry(endpoint, readiness)
    return app
