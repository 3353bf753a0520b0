"""The tables. Every timestamp is timezone-aware UTC; the `events` row is the source of truth."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, Float, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .types import JSONType, UTCDateTime, utcnow


class Base(DeclarativeBase):
    pass


class User(Base):
    """The profile this service keeps of a platform account (SPEC §8a)."""

    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    display_name: Mapped[str | None] = mapped_column(String(80))
    role: Mapped[str] = mapped_column(String(16), default="student")
    minor: Mapped[bool] = mapped_column(Boolean, default=False)
    parent_id: Mapped[str | None] = mapped_column(String(64))
    timezone: Mapped[str | None] = mapped_column(String(64))
    subjects: Mapped[list[str]] = mapped_column(JSONType, default=list)
    opted_out: Mapped[bool] = mapped_column(Boolean, default=False)
    # Who opted them out: "self", "parent" or "admin"; only a parent or an admin undoes the last two.
    opted_out_by: Mapped[str | None] = mapped_column(String(8))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Tombstone(Base):
    """A deleted user, by a keyed hash of their id (never the id itself): tokens issued before
    `deleted_at` are refused, on every node."""

    __tablename__ = "user_tombstones"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    deleted_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Event(Base):
    """One accepted event. `id` is the idempotency key; `published` is the outbox flag."""

    __tablename__ = "events"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    type: Mapped[str] = mapped_column(String(40))
    user_id: Mapped[str] = mapped_column(String(64))
    ts: Mapped[datetime] = mapped_column(UTCDateTime)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    props: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    actor_id: Mapped[str] = mapped_column(String(64))
    published: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (
        Index("ix_events_user_ts", "user_id", "ts"),
        Index("ix_events_type_ts", "type", "ts", "user_id"),  # user_id: index-only counts of referrers
        Index("ix_events_unpublished", "published", "received_at"),
    )


class UserActivity(Base):
    """Per user, the time of their latest event and latest `signup`, kept by the ingest transaction.

    The growth report's base (active users in a window ending now) is a range count over `last_ts`
    instead of a DISTINCT over every event in the window; see metrics.growth.active_users.
    """

    __tablename__ = "user_activity"

    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_ts: Mapped[datetime] = mapped_column(UTCDateTime)
    last_signup_ts: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_user_activity_last", "last_ts", "last_signup_ts"),)


class Consumption(Base):
    """What a consumer did with an event: done, or parked after too many failures."""

    __tablename__ = "event_consumptions"

    consumer: Mapped[str] = mapped_column(String(40), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(8))  # "done" | "parked"
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    __table_args__ = (Index("ix_consumptions_status", "status"),)


class Feed(Base):
    """A feed's offset counter and epoch (a new epoch means old offsets no longer resume)."""

    __tablename__ = "feeds"

    name: Mapped[str] = mapped_column(String(96), primary_key=True)
    epoch: Mapped[str] = mapped_column(String(32))
    next_offset: Mapped[int] = mapped_column(BigInteger, default=1)


class FeedItem(Base):
    """One activity in one feed, rendered for that feed's audience: no private data in public feeds."""

    __tablename__ = "feed_items"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    feed: Mapped[str] = mapped_column(String(96))
    offset: Mapped[int] = mapped_column(BigInteger)
    event_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(40))
    text: Mapped[str] = mapped_column(String(280))
    data: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        UniqueConstraint("feed", "offset", name="uq_feed_items_feed_offset"),
        UniqueConstraint("feed", "event_id", name="uq_feed_items_feed_event"),
    )


class Reaction(Base):
    __tablename__ = "feed_reactions"

    feed: Mapped[str] = mapped_column(String(96), primary_key=True)
    offset: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ScoreEntry(Base):
    """Leaderboard points earned by one event; Redis sorted sets are a cache rebuilt from these rows."""

    __tablename__ = "score_entries"

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(64))
    points: Mapped[int] = mapped_column(Integer)
    ts: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index("ix_scores_subject_ts", "subject", "ts"),
        # Covering: a user's total on a board (channels.leaderboard sets the cached boards from it).
        Index("ix_scores_user_subject", "user_id", "subject", "ts", "points"),
    )


class Link(Base):
    """An invite link; `nonce` is the random part of its token (the rest is verified, not stored)."""

    __tablename__ = "links"

    nonce: Mapped[str] = mapped_column(String(32), primary_key=True)
    token: Mapped[str] = mapped_column(String(200), unique=True)
    referrer_id: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(200), default="/")
    campaign: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # When its referrer first sent it (an `invite_sent` event naming it in `link_token`); cycle time
    # runs from here, or from `created_at` for a link never announced by an event.
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_links_referrer", "referrer_id", "created_at"),)


class Click(Base):
    """Every click on a valid link; `unique_click` is the first by that visitor on that link in 24 h."""

    __tablename__ = "link_clicks"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    nonce: Mapped[str] = mapped_column(String(32))
    visitor: Mapped[str] = mapped_column(String(64))
    unique_click: Mapped[bool] = mapped_column(Boolean)
    clicked_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Keyed hashes (HMAC with the secret) of the client's IP and its /24 (IPv4) or /48 (IPv6) network:
    # fraud signals compare them, nobody can read an address back.
    ip_hash: Mapped[str | None] = mapped_column(String(32))
    net_hash: Mapped[str | None] = mapped_column(String(32))

    __table_args__ = (
        Index("ix_clicks_link_visitor", "nonce", "visitor", "clicked_at"),
        # Covering: the growth report counts clicks in a window from the index alone.
        Index("ix_clicks_time", "clicked_at", "nonce", "visitor", "unique_click"),
    )


class LinkRejection(Base):
    """A click on a link we refused (tampered, expired, unknown), for abuse monitoring."""

    __tablename__ = "link_rejections"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    token: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(String(32))
    rejected_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Conversion(Base):
    """A new user attributed to the referrer whose link brought them (one per new user)."""

    __tablename__ = "conversions"

    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    referrer_id: Mapped[str] = mapped_column(String(64))
    nonce: Mapped[str] = mapped_column(String(32))
    source: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(16))  # "last_touch" | "first_touch"
    touched_at: Mapped[datetime] = mapped_column(UTCDateTime)
    signup_at: Mapped[datetime] = mapped_column(UTCDateTime)
    signup_event_id: Mapped[str] = mapped_column(String(64))
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # "ok" (rewarded), "pending" (held for review) or "flagged" (fraud signals; never rewarded).
    status: Mapped[str] = mapped_column(String(12), default="ok", server_default="ok")
    fraud_reasons: Mapped[list[str]] = mapped_column(JSONType, default=list)

    __table_args__ = (
        Index("ix_conversions_referrer", "referrer_id", "signup_at"),
        Index("ix_conversions_signup", "signup_at"),
    )


class Reward(Base):
    """The rewards ledger: who got what, why, for what. One row per (user, kind, reason, ref):
    processing the same conversion or loop outcome again cannot pay twice."""

    __tablename__ = "rewards"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    user_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # "xp" | "streak_shield" | "free_session"
    amount: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(32))  # metrics.rewards.PAYOUTS
    # What it is for: the converted user's id for referral rewards, the loop item's id for loop rewards.
    ref: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        UniqueConstraint("user_id", "kind", "reason", "ref", name="uq_rewards_once"),
        Index("ix_rewards_user_time", "user_id", "created_at"),
    )


class LoopJob(Base):
    """Timed work of the loops (expiries, deadlines, weekly cards): the durable scheduler's queue.

    `key` makes scheduling idempotent (the same key twice is one job). A worker runs a due job while it
    holds the lease (`lease_owner` until `lease_until`); the job's effects and `status = done` commit
    together, and only while the lease is still that worker's — so no job's effects land twice.
    """

    __tablename__ = "loop_jobs"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    kind: Mapped[str] = mapped_column(String(40))
    key: Mapped[str] = mapped_column(String(160), unique=True)
    run_at: Mapped[datetime] = mapped_column(UTCDateTime)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    status: Mapped[str] = mapped_column(String(12), default="pending")  # pending | done | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_loop_jobs_due", "status", "run_at"),)


class LoopItem(Base):
    """One run of a loop: a nudge, a challenge, a rally, a parent share, a rescue. `state` follows the
    loop's own state machine (loops/); `data` holds what only that loop needs."""

    __tablename__ = "loop_items"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    loop: Mapped[str] = mapped_column(String(24))
    owner_id: Mapped[str] = mapped_column(String(64))
    other_id: Mapped[str | None] = mapped_column(String(64))
    subject: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index("ix_loop_items_owner", "owner_id", "loop", "created_at"),
        Index("ix_loop_items_other", "other_id", "loop", "created_at"),
    )


class LoopMember(Base):
    """A participant of a loop item (rally peers, challenge players) with their result."""

    __tablename__ = "loop_members"

    item_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))  # owner | invited | joined
    score: Mapped[float | None] = mapped_column(Float)
    joined_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (Index("ix_loop_members_user", "user_id"),)


class Streak(Base):
    """A student's daily streak: alive while they are active at least once every 24 h."""

    __tablename__ = "streaks"

    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    days: Mapped[int] = mapped_column(Integer, default=0)
    last_activity_at: Mapped[datetime] = mapped_column(UTCDateTime)
    deadline_at: Mapped[datetime] = mapped_column(UTCDateTime)
    best: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (Index("ix_streaks_deadline", "deadline_at"),)


class PromptDecision(Base):
    """Every decision of the orchestrator and the compliance gate: a prompt shown, or suppressed and why."""

    __tablename__ = "prompt_decisions"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    user_id: Mapped[str] = mapped_column(String(64))  # the recipient
    sender_id: Mapped[str | None] = mapped_column(String(64))
    loop: Mapped[str] = mapped_column(String(24))
    action: Mapped[str] = mapped_column(String(40))
    shown: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        Index("ix_prompt_decisions_user", "user_id", "shown", "created_at"),
        Index("ix_prompt_decisions_loop", "loop", "created_at"),
        Index("ix_prompt_decisions_sender", "sender_id", "created_at"),
    )


class Consent(Base):
    """Verifiable parental consent for a minor's social features outside the platform."""

    __tablename__ = "consents"

    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    parent_id: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(32))
    granted_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AiCost(Base):
    """The personalisation providers' cost ledger: tokens and money per call, summed per UTC day."""

    __tablename__ = "ai_costs"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    day: Mapped[str] = mapped_column(String(10))  # YYYY-MM-DD, UTC
    provider: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(64))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    cost_usd: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (Index("ix_ai_costs_day", "day"),)


class Experiment(Base):
    """An A/B test of a loop (metrics/experiments.py): variants with weights and config payloads,
    coverage, seed and namespace for GrowthBook-compatible assignment, target and guardrail metrics."""

    __tablename__ = "experiments"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(120))
    hypothesis: Mapped[str] = mapped_column(Text, default="")
    loop: Mapped[str | None] = mapped_column(String(24))  # the loop whose variant it sets, if any
    variants: Mapped[list[dict[str, Any]]] = mapped_column(JSONType)  # [{key, name, weight, config}]
    coverage: Mapped[float] = mapped_column(Float, default=1.0)
    seed: Mapped[str] = mapped_column(String(64))
    hash_version: Mapped[int] = mapped_column(Integer, default=2)
    namespace: Mapped[list[Any] | None] = mapped_column(JSONType)  # [id, start, end]
    target_metric: Mapped[str] = mapped_column(String(40))
    guardrail_metrics: Mapped[list[str]] = mapped_column(JSONType, default=list)
    window_days: Mapped[int] = mapped_column(Integer, default=14)
    sequential: Mapped[bool] = mapped_column(Boolean, default=False)
    mde: Mapped[float] = mapped_column(Float, default=0.02)
    status: Mapped[str] = mapped_column(String(12), default="draft")
    winner: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_experiments_status", "status", "loop"),)


class ExperimentAudit(Base):
    """Every change to an experiment: who, when, what."""

    __tablename__ = "experiment_audit"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    experiment_key: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(16))
    changes: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (Index("ix_experiment_audit_key", "experiment_key", "at"),)


class ExperimentExposure(Base):
    """A user's first exposure to an experiment: the variant they keep (sticky) and when."""

    __tablename__ = "experiment_exposures"

    experiment_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    variant: Mapped[str] = mapped_column(String(64))
    exposed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    event_id: Mapped[str] = mapped_column(String(64))


class ExperimentConversion(Base):
    """An exposed user's events of one metric (target or guardrail) after exposure, within the window."""

    __tablename__ = "experiment_conversions"

    experiment_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    metric: Mapped[str] = mapped_column(String(40), primary_key=True)
    events: Mapped[int] = mapped_column(Integer, default=0)
    value: Mapped[float] = mapped_column(Float, default=0.0)
    first_at: Mapped[datetime] = mapped_column(UTCDateTime)


class AuditLog(Base):
    """Who did what to whom, for the compliance records: consent granted or revoked, opt-out and
    opt-in, data export, deletion, an admin unpausing what the guardrails paused."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(String(96))  # a user id, "loop:<name>" or "experiment:<key>"
    details: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (Index("ix_audit_log_subject", "subject", "at"),)


class LoopControl(Base):
    """A loop switched off: by the guardrails on a critical alert (`auto`) or by an admin; only an
    admin switches it back on."""

    __tablename__ = "loop_controls"

    loop: Mapped[str] = mapped_column(String(24), primary_key=True)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[str | None] = mapped_column(String(200))
    paused_by: Mapped[str | None] = mapped_column(String(64))
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Alert(Base):
    """A guardrail threshold crossed: one open alert per (metric, scope, level) until it clears."""

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    metric: Mapped[str] = mapped_column(String(40))
    scope: Mapped[str] = mapped_column(String(96))  # "global", "loop:<name>", "experiment:<key>"
    level: Mapped[str] = mapped_column(String(10))  # warn | critical
    value: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(10), default="open")  # open | resolved
    action: Mapped[str | None] = mapped_column(String(40))  # e.g. "paused loop:buddy_challenge"
    webhook_status: Mapped[str | None] = mapped_column(String(16))  # delivered | failed | none
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_alerts_open", "state", "metric", "scope"),)
