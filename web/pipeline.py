"""The event pipeline's parts, assembled once for `serve` (memory://) and `worker` (redis://)."""

from __future__ import annotations

import hashlib
from datetime import timedelta

from channels import FeedConsumer, LeaderboardConsumer, Leaderboards
from loops import Clock, LoopConfig, LoopEngine, LoopServices, SystemClock, build_engine
from loops.copy import CopyRouter, parse_providers
from loops.scheduler import Scheduler
from metrics import ConsumerRunner, EventIn, EventIngest, EventStream
from metrics.attribution import AttributionConsumer
from metrics.experiments import ExperimentConsumer
from metrics.guardrails import GuardrailConfig, thresholds_from_json
from metrics.live import ExperimentsDashboard, GuardrailsDashboard, KFactorDashboard
from metrics.rewards import Paid
from realtime import Hub
from store import Database
from store.privacy import PrivacyRules

from .config import Settings
from .guardrails_api import GuardrailJobs
from .keys import link_signer


async def push_reward(hub: Hub, paid: Paid) -> None:
    await hub.broadcast(f"user:{paid.user_id}", "reward", paid.push_payload())


def build_loops(
    settings: Settings,
    database: Database,
    hub: Hub,
    ingest: EventIngest,
    privacy: PrivacyRules,
    clock: Clock | None = None,
) -> LoopEngine:
    """The six loops with their services; the events they emit go through the one ingest path."""

    async def emit(events: list[EventIn]) -> None:
        await ingest.ingest(events, actor_id="system")

    services = LoopServices(
        database=database,
        hub=hub,
        signer=link_signer(settings),
        emit=emit,
        privacy=privacy,
        copy=CopyRouter(
            parse_providers(settings.ai_providers),
            database,
            daily_budget_usd=settings.ai_daily_budget_usd,
            clock=clock,
        ),
        config=LoopConfig.from_json(settings.loops_config),
        clock=clock or SystemClock(),
    )
    return build_engine(services)


def build_guardrails(
    settings: Settings, database: Database, hub: Hub, engine: LoopEngine
) -> tuple[GuardrailsDashboard, GuardrailJobs]:
    """The guardrails' dashboard feed and timed jobs; their setup runs with the loops' setup."""
    secret = (
        settings.guardrail_webhook_secret
        or hashlib.sha256(b"guardrail-webhook\x00" + settings.secret_key.encode()).hexdigest()
    )
    config = GuardrailConfig(
        thresholds=thresholds_from_json(settings.guardrail_thresholds),
        webhook_url=settings.guardrail_webhook_url,
        webhook_secret=secret,
        delivery=engine.delivery,
    )
    dashboard = GuardrailsDashboard(hub, database, config)
    dashboard.clock = engine.services.clock
    jobs = GuardrailJobs(database, dashboard, config, engine.services.clock, every=settings.guardrails_every)
    engine.setups.append(jobs.setup)
    return dashboard, jobs


def build_scheduler(settings: Settings, database: Database, engine: LoopEngine) -> Scheduler:
    scheduler = Scheduler(
        database,
        engine.services.clock,
        poll=settings.scheduler_poll,
        lease=timedelta(seconds=settings.scheduler_lease),
    )
    engine.register_jobs(scheduler)
    return scheduler


def build_runner(
    settings: Settings,
    database: Database,
    stream: EventStream,
    ingest: EventIngest,
    hub: Hub,
    leaderboards: Leaderboards,
    engine: LoopEngine,
) -> ConsumerRunner:
    """Every consumer of the event stream; `hub` is how their results reach sockets on every node."""
    return ConsumerRunner(
        database,
        stream,
        [
            FeedConsumer(hub, leaderboards.privacy),
            LeaderboardConsumer(leaderboards, hub),
            AttributionConsumer(
                link_signer(settings),
                settings.attribution_model,
                notify=KFactorDashboard(hub, database).changed,
                reward=lambda paid: push_reward(hub, paid),
            ),
            ExperimentConsumer(notify=ExperimentsDashboard(hub, database).changed),
            engine,
        ],
        relay=ingest.relay_unpublished,
        reconcile_every=settings.events_maintenance_every,
        reconcile_after=timedelta(seconds=settings.events_reconcile_after),
    )
