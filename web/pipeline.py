"""The event pipeline's parts, assembled once for `serve` (memory://) and `worker` (redis://)."""

from __future__ import annotations

from datetime import timedelta

from channels import FeedConsumer, LeaderboardConsumer, Leaderboards
from metrics import ConsumerRunner, EventIngest, EventStream
from metrics.attribution import AttributionConsumer
from metrics.links import LinkSigner
from metrics.live import KFactorDashboard
from metrics.rewards import Paid
from realtime import Hub
from store import Database

from .config import Settings


async def push_reward(hub: Hub, paid: Paid) -> None:
    await hub.broadcast(f"user:{paid.user_id}", "reward", paid.push_payload())


def build_runner(
    settings: Settings,
    database: Database,
    stream: EventStream,
    ingest: EventIngest,
    hub: Hub,
    leaderboards: Leaderboards,
) -> ConsumerRunner:
    """Every consumer of the event stream; `hub` is how their results reach sockets on every node."""
    return ConsumerRunner(
        database,
        stream,
        [
            FeedConsumer(hub),
            LeaderboardConsumer(leaderboards, hub),
            AttributionConsumer(
                LinkSigner(settings.secret_key, settings.old_secret_keys),
                settings.attribution_model,
                notify=KFactorDashboard(hub, database).changed,
                reward=lambda paid: push_reward(hub, paid),
            ),
        ],
        relay=ingest.relay_unpublished,
        reconcile_every=settings.events_maintenance_every,
        reconcile_after=timedelta(seconds=settings.events_reconcile_after),
    )
