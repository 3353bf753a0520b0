"""The tables. Every timestamp is timezone-aware UTC; the `events` row is the source of truth."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, Index, Integer, String, Text, UniqueConstraint
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
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


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
        Index("ix_events_type_ts", "type", "ts"),
        Index("ix_events_unpublished", "published", "received_at"),
    )


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

    __table_args__ = (Index("ix_scores_subject_ts", "subject", "ts"),)


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

    __table_args__ = (
        Index("ix_clicks_link_visitor", "nonce", "visitor", "clicked_at"),
        Index("ix_clicks_time", "clicked_at"),
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

    __table_args__ = (
        Index("ix_conversions_referrer", "referrer_id", "signup_at"),
        Index("ix_conversions_signup", "signup_at"),
    )


class Reward(Base):
    """The rewards ledger: who got what, why, for which conversion. One row per (user, kind, reason,
    conversion): processing the same conversion again cannot pay twice."""

    __tablename__ = "rewards"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    user_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # "xp" | "streak_shield"
    amount: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(32))  # "referral_signup" | "referral_activated"
    conversion_user_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        UniqueConstraint("user_id", "kind", "reason", "conversion_user_id", name="uq_rewards_once"),
        Index("ix_rewards_user_time", "user_id", "created_at"),
    )
