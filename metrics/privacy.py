"""FERPA/COPPA requests for one user: export everything we hold about them, or delete it.

`export_user` returns their rows grouped per table, JSON-ready. Rows are exported as stored, except
the clicks on their links: those carry no visitor identifiers (cookie, IP and network hashes belong
to whoever clicked, not to the user).

`delete_user` works in the caller's transaction. `pseudonym(key, user_id)` — `deleted:` and a keyed
hash (HMAC-SHA256 with the app's secret) — replaces their id where other people's records need a
stand-in: stable for one key, not reversible, never the raw id. Per table:

- deleted, as only theirs: `users` (the profile), `events` they are the subject of, those events'
  `event_consumptions`, `score_entries`, `user_activity`, `streaks`, `consents` for them,
  `experiment_exposures` and `experiment_conversions`, `rewards` paid to them, `links` they made with
  those links' `link_clicks` and `link_rejections`, `conversions` where they are the new user (the
  referrer's conversion count drops by one; the referrer keeps the reward it earned), `prompt_decisions`
  where they are the recipient, `loop_items` they own with those items' `loop_members` and
  `loop_jobs`, their own `loop_members` rows and `loop_jobs` about them (`payload.user`);
- deleted, as made from their data: `feed_items` rendered from their events (in every feed: global,
  subject and their own), their own feed's counter (`feeds` row `user:{id}`), and `feed_reactions`
  they made or that were made on those items;
- pseudonymised, as others' records need them: `conversions.referrer_id` (their referrals still count
  in the growth metrics, under the pseudonym), `rewards.ref` (what another user was paid for),
  `loop_items.other_id`, `prompt_decisions.sender_id`, `consents.parent_id` and `users.parent_id` (a
  child's consent record stays valid), `events.actor_id`, `experiment_audit.actor`,
  `loop_controls.paused_by`, `audit_log.subject` (also scoped ones such as `conversion:{id}`) and
  `audit_log.actor` (the compliance trail stays, about the pseudonym);
- scrubbed: every JSON and free-text (`Text`) value in anyone's row that names them (e.g. a study
  buddy nudge listing them, another event's props) gets the pseudonym in place of their id. This pass
  reads those columns in full (a LIKE over `events.props`): deletions are rare, correctness first.
- untouched: `ai_costs`, `alerts`, `experiments` hold nobody's data.

What the growth numbers keep: referrals they made still count as signups (by source and day) but
leave the cycle time, which needs the deleted link; their invites, clicks on their links and their
activity leave the report, and their exposures leave experiment results.

One `audit_log` row records the deletion: action `user_deleted`, subject the pseudonym, details the
counts and who asked (`by`). Caches (leaderboards) and open sockets live elsewhere: after the commit
the caller announces the deletion (channels/privacy.py), which takes the user off them.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from sqlalchemy import JSON, ColumnElement, Select, Text, cast, delete, exists, inspect, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from store import (
    AuditLog,
    Base,
    Click,
    Consent,
    Consumption,
    Conversion,
    Event,
    ExperimentAudit,
    ExperimentConversion,
    ExperimentExposure,
    Feed,
    FeedItem,
    Link,
    LinkRejection,
    LoopControl,
    LoopItem,
    LoopJob,
    LoopMember,
    PromptDecision,
    Reaction,
    Reward,
    ScoreEntry,
    Streak,
    User,
    UserActivity,
)

PSEUDONYM_PREFIX = "deleted:"
# Tables the scrub pass leaves alone (module docstring: "untouched").
HOLD_NOBODYS_DATA = frozenset({"ai_costs", "alerts", "experiments"})
# Click columns that identify the visitor, not the link's owner: never exported.
VISITOR_COLUMNS = frozenset({"visitor", "ip_hash", "net_hash"})
_ID_CHAR = r"A-Za-z0-9_.\-"  # ':' is a separator: "user:{id}" names the id


def pseudonym(key: bytes | str, user_id: str) -> str:
    """The stand-in for a deleted user's id: stable for one key, not reversible, 32 characters."""
    raw = key.encode() if isinstance(key, str) else key
    digest = hmac.new(raw, b"user-deletion\x00" + user_id.encode(), hashlib.sha256).hexdigest()
    return PSEUDONYM_PREFIX + digest[:24]


@dataclass(frozen=True)
class DeletionReport:
    """What `delete_user` did, per table: rows deleted, and values pseudonymised (a row counts once per
    column changed); and the subjects of the leaderboards they scored on (their caches must drop them)."""

    pseudonym: str
    deleted: dict[str, int] = field(default_factory=dict)
    anonymised: dict[str, int] = field(default_factory=dict)
    leaderboard_subjects: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "pseudonym": self.pseudonym,
            "deleted": self.deleted,
            "anonymised": self.anonymised,
            "leaderboard_subjects": self.leaderboard_subjects,
        }


def _own_events(user_id: str) -> Select[str]:
    return select(Event.id).where(Event.user_id == user_id)


def _own_links(user_id: str) -> Select[str]:
    return select(Link.nonce).where(Link.referrer_id == user_id)


def _own_items(user_id: str) -> Select[str]:
    return select(LoopItem.id).where(LoopItem.owner_id == user_id)


def _about_them_feed_items(user_id: str) -> ColumnElement[bool]:
    return or_(FeedItem.event_id.in_(_own_events(user_id)), FeedItem.feed == f"user:{user_id}")


def _scoped_subject(user_id: str) -> ColumnElement[bool]:
    return AuditLog.subject.endswith(f":{user_id}", autoescape=True)


# The columns that hold a user id: someone with a row matching any of these is someone we hold data on.
def _identifying(user_id: str) -> list[ColumnElement[bool]]:
    return [
        User.id == user_id,
        User.parent_id == user_id,
        Event.user_id == user_id,
        Event.actor_id == user_id,
        UserActivity.user_id == user_id,
        ScoreEntry.user_id == user_id,
        Reaction.user_id == user_id,
        Link.referrer_id == user_id,
        Conversion.user_id == user_id,
        Conversion.referrer_id == user_id,
        Reward.user_id == user_id,
        Reward.ref == user_id,
        LoopItem.owner_id == user_id,
        LoopItem.other_id == user_id,
        LoopMember.user_id == user_id,
        Streak.user_id == user_id,
        PromptDecision.user_id == user_id,
        PromptDecision.sender_id == user_id,
        Consent.user_id == user_id,
        Consent.parent_id == user_id,
        ExperimentExposure.user_id == user_id,
        ExperimentConversion.user_id == user_id,
        ExperimentAudit.actor == user_id,
        AuditLog.subject == user_id,
        AuditLog.actor == user_id,
        LoopControl.paused_by == user_id,
    ]


async def holds_data(session: AsyncSession, user_id: str) -> bool:
    """Whether any row names this user in a column that holds user ids."""
    for condition in _identifying(user_id):
        if await session.scalar(select(exists().where(condition))):
            return True
    return False


def _json_ready(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def _row(obj: Base, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    return {
        attr.key: _json_ready(getattr(obj, attr.key))
        for attr in inspect(type(obj)).column_attrs
        if attr.key not in skip
    }


def _export_queries(user_id: str) -> list[tuple[str, type[Base], ColumnElement[bool]]]:
    """(section, model, which rows) for every table that can hold data about the user."""
    return [
        ("profile", User, User.id == user_id),
        ("events", Event, Event.user_id == user_id),
        ("user_activity", UserActivity, UserActivity.user_id == user_id),
        ("feed_items", FeedItem, _about_them_feed_items(user_id)),
        ("feed_reactions", Reaction, Reaction.user_id == user_id),
        ("score_entries", ScoreEntry, ScoreEntry.user_id == user_id),
        ("links", Link, Link.referrer_id == user_id),
        ("link_clicks", Click, Click.nonce.in_(_own_links(user_id))),
        ("conversions", Conversion, or_(Conversion.user_id == user_id, Conversion.referrer_id == user_id)),
        ("rewards", Reward, Reward.user_id == user_id),
        ("streaks", Streak, Streak.user_id == user_id),
        ("loop_items", LoopItem, or_(LoopItem.owner_id == user_id, LoopItem.other_id == user_id)),
        ("loop_members", LoopMember, LoopMember.user_id == user_id),
        (
            "prompt_decisions",
            PromptDecision,
            or_(PromptDecision.user_id == user_id, PromptDecision.sender_id == user_id),
        ),
        ("consents", Consent, or_(Consent.user_id == user_id, Consent.parent_id == user_id)),
        ("experiment_exposures", ExperimentExposure, ExperimentExposure.user_id == user_id),
        ("experiment_conversions", ExperimentConversion, ExperimentConversion.user_id == user_id),
        (
            "audit_log",
            AuditLog,
            or_(AuditLog.subject == user_id, AuditLog.actor == user_id, _scoped_subject(user_id)),
        ),
    ]


async def export_user(session: AsyncSession, user_id: str) -> dict[str, Any]:
    """Everything we hold about the user: `{"user_id", "tables": {section: [row, ...]}}`, JSON-ready.
    Sections are per table (`profile` is `users`); an empty section is an empty list."""
    tables: dict[str, list[dict[str, Any]]] = {}
    for section, model, condition in _export_queries(user_id):
        order = [c for c in inspect(model).primary_key]
        rows = (await session.scalars(select(model).where(condition).order_by(*order))).all()
        skip = VISITOR_COLUMNS if model is Click else frozenset()
        tables[section] = [_row(r, skip) for r in rows]
    return {"user_id": user_id, "tables": tables}


def _count(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


_NO_SYNC = {"synchronize_session": False}


async def _delete(session: AsyncSession, model: type[Base], *where: ColumnElement[bool]) -> int:
    return _count(await session.execute(delete(model).where(*where).execution_options(**_NO_SYNC)))


async def _replace(
    session: AsyncSession, column: InstrumentedAttribute[Any], user_id: str, stand_in: str
) -> int:
    model = column.class_
    statement = update(model).where(column == user_id).values({column.key: stand_in})
    return _count(await session.execute(statement.execution_options(**_NO_SYNC)))


def _scrubber(user_id: str, stand_in: str) -> Any:
    """A function replacing the user id inside a JSON value or text: whole strings and dict keys equal
    to it, and occurrences bounded by non-id characters ("user:{id}", "with {id}.")."""
    pattern = re.compile(rf"(?<![{_ID_CHAR}]){re.escape(user_id)}(?![{_ID_CHAR}])")

    def text(value: str) -> str:
        return stand_in if value == user_id else pattern.sub(stand_in, value)

    def scrub(value: Any) -> Any:
        if isinstance(value, str):
            return text(value)
        if isinstance(value, list):
            return [scrub(v) for v in value]
        if isinstance(value, dict):
            return {text(k) if isinstance(k, str) else k: scrub(v) for k, v in value.items()}
        return value

    return scrub


async def _scrub_free_values(session: AsyncSession, user_id: str, stand_in: str) -> dict[str, int]:
    """Replace the id in every JSON and Text column of every table; returns rows changed per table."""
    scrub = _scrubber(user_id, stand_in)
    changed: dict[str, int] = {}
    for mapper in Base.registry.mappers:
        model = mapper.class_
        if model.__tablename__ in HOLD_NOBODYS_DATA:
            continue  # an experiment's variant key or an alert's scope may equal some user's id
        for attr in mapper.column_attrs:
            column = attr.columns[0]
            if not isinstance(column.type, JSON | Text):
                continue
            candidates = (
                await session.scalars(
                    select(model).where(cast(column, Text).contains(user_id, autoescape=True))
                )
            ).all()
            for obj in candidates:
                before = getattr(obj, attr.key)
                after = scrub(before)
                if after != before:
                    setattr(obj, attr.key, after)
                    table = str(model.__tablename__)
                    changed[table] = changed.get(table, 0) + 1
    await session.flush()
    return changed


def _chunks(values: Sequence[str], size: int = 200) -> list[Sequence[str]]:
    return [values[i : i + size] for i in range(0, len(values), size)]


async def delete_user(
    session: AsyncSession,
    user_id: str,
    *,
    actor: str,
    now: datetime,
    key: bytes | str,
    by: str = "admin",
) -> DeletionReport:
    """Delete or pseudonymise every row that names `user_id` (the rules are in the module docstring),
    in the caller's transaction, and record it in `audit_log` under the pseudonym; `by` says as what
    `actor` asked ("admin" or "parent")."""
    stand_in = pseudonym(key, user_id)
    report = DeletionReport(stand_in)
    deleted, anonymised = report.deleted, report.anonymised

    subjects = await session.scalars(
        select(ScoreEntry.subject)
        .where(ScoreEntry.user_id == user_id)
        .distinct()
        .order_by(ScoreEntry.subject)
    )
    report.leaderboard_subjects.extend(subjects.all())
    nonces = list((await session.scalars(_own_links(user_id))).all())
    items = _own_items(user_id)
    on_their_items = exists().where(
        FeedItem.feed == Reaction.feed, FeedItem.offset == Reaction.offset, _about_them_feed_items(user_id)
    )

    async def drop(model: type[Base], *where: ColumnElement[bool]) -> None:
        table = model.__tablename__
        deleted[table] = deleted.get(table, 0) + await _delete(session, model, *where)

    # Rows hanging off their events, links and loop items first, while those still identify them.
    await drop(Reaction, or_(Reaction.user_id == user_id, on_their_items))
    await drop(FeedItem, _about_them_feed_items(user_id))
    await drop(Feed, Feed.name == f"user:{user_id}")
    await drop(Consumption, Consumption.event_id.in_(_own_events(user_id)))
    await drop(ScoreEntry, or_(ScoreEntry.user_id == user_id, ScoreEntry.event_id.in_(_own_events(user_id))))
    await drop(ExperimentConversion, ExperimentConversion.user_id == user_id)
    await drop(ExperimentExposure, ExperimentExposure.user_id == user_id)
    deleted["link_rejections"] = 0
    for chunk in _chunks(nonces):
        # A refused click keeps the token it came with: the link's nonce is its first part.
        await drop(
            LinkRejection, or_(*(LinkRejection.token.startswith(f"{n}.", autoescape=True) for n in chunk))
        )
    await drop(Click, Click.nonce.in_(_own_links(user_id)))
    await drop(Conversion, Conversion.user_id == user_id)
    await drop(Link, Link.referrer_id == user_id)
    await drop(Reward, Reward.user_id == user_id)
    await drop(
        LoopJob,
        or_(LoopJob.payload["user"].as_string() == user_id, LoopJob.payload["id"].as_string().in_(items)),
    )
    await drop(LoopMember, or_(LoopMember.user_id == user_id, LoopMember.item_id.in_(items)))
    await drop(LoopItem, LoopItem.owner_id == user_id)
    await drop(Streak, Streak.user_id == user_id)
    await drop(PromptDecision, PromptDecision.user_id == user_id)
    await drop(Consent, Consent.user_id == user_id)
    await drop(UserActivity, UserActivity.user_id == user_id)
    await drop(Event, Event.user_id == user_id)
    await drop(User, User.id == user_id)

    for column in (
        Conversion.referrer_id,
        Reward.ref,
        LoopItem.other_id,
        PromptDecision.sender_id,
        Consent.parent_id,
        User.parent_id,
        Event.actor_id,
        ExperimentAudit.actor,
        AuditLog.subject,
        AuditLog.actor,
        LoopControl.paused_by,
    ):
        count = await _replace(session, column, user_id, stand_in)
        table = column.class_.__tablename__
        anonymised[table] = anonymised.get(table, 0) + count
    # Audit subjects that name them after a scope, e.g. `conversion:{id}` (metrics/fraud.py).
    scoped = await session.scalars(select(AuditLog).where(_scoped_subject(user_id)))
    for row in scoped:
        row.subject = row.subject[: -len(user_id)] + stand_in
        anonymised["audit_log"] = anonymised.get("audit_log", 0) + 1
    for table, count in (await _scrub_free_values(session, user_id, stand_in)).items():
        anonymised[table] = anonymised.get(table, 0) + count

    session.add(
        AuditLog(
            actor=actor if actor != user_id else stand_in,
            action="user_deleted",
            subject=stand_in,
            details={"by": by, **{k: v for k, v in report.as_dict().items() if k != "pseudonym"}},
            at=now,
        )
    )
    await session.flush()
    return report


__all__ = ["DeletionReport", "delete_user", "export_user", "holds_data", "pseudonym"]
