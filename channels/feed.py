"""Activity feeds: events become feed items, stored per feed with monotonic offsets, pushed live.

Public feeds (`feed:global`, `feed:subject:{s}`) hold text rendered by the privacy rule as it shows the
user to everyone (a minor or unknown user is "A student", one who opted out is not in them), and never
an id; a user's own feed (`feed:user:{id}`) carries their name. When a user's privacy changes,
`feeds_follow_changes` re-renders their public items: gone ones are deleted and pushed as
`activity_removed` `{"offsets": [...], "epoch"}`, reworded ones as `activity_updated` `{"items": [...],
"epoch"}` (the items as in history), so history and live viewers both follow the rule at once; the
feed's epoch is renewed, so a client that was away gets a fresh page rather than resuming.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from realtime import Hub
from store import Database, Event, Feed, FeedItem, Reaction, dialect_insert, utcnow
from store.privacy import OUTSIDER, PrivacyRules, PrivacyState, Viewer

from .access import is_self_or_admin
from .presence import SUBJECT
from .privacy import PrivacyChange

ITEM_EVENT = "new_activity"
REMOVED_EVENT = "activity_removed"
UPDATED_EVENT = "activity_updated"
HISTORY_PAGE = 20
RETAINED_PER_FEED = 1000
# A streak is worth telling others about on these days (and every 50 after 100).
STREAK_MILESTONES = frozenset({3, 7, 14, 21, 30, 50, 100})


@dataclass(frozen=True, slots=True)
class Activity:
    kind: str
    subject: str | None
    public_text: str | None  # None: not shared publicly
    own_text: str
    data: dict[str, Any]


def _subject_label(subject: str) -> str:
    return subject.replace("_", " ").replace("-", " ").title()


def describe(event: dict[str, Any], *, name: str, public_name: str | None) -> Activity | None:
    """The activity an event makes, worded for the public (`public_name`; None = not public) and the user."""
    props = event["props"]
    kind = event["type"]
    subject = props.get("subject")
    label = _subject_label(subject) if isinstance(subject, str) else None

    def both(template: str, **data: Any) -> Activity:
        public = template.format(who=public_name) if public_name is not None else None
        return Activity(kind, subject, public, template.format(who=name), data)

    if kind == "session_completed":
        minutes = round(float(props["minutes"]))
        return both(f"{{who}} finished a {minutes}-minute {label} session", minutes=minutes)
    if kind == "quiz_result":
        score = round(float(props["score"]))
        return both(f"{{who}} scored {score}% on a {label} quiz", score=score)
    if kind == "practice_completed":
        return both(f"{{who}} completed {label} practice")
    if kind == "streak_updated":
        days = int(props["days"])
        if days in STREAK_MILESTONES or (days > 100 and days % 50 == 0):
            return both(f"{{who}} hit a {days}-day streak", days=days)
    return None


def public_name(privacy: PrivacyRules, state: PrivacyState) -> str | None:
    """The name public feeds give this user, or None: their activity is not public. Only a name: the
    text is the same in every public feed, so no handle (and never an id) goes into it."""
    shown = privacy.show(state, OUTSIDER, feed_topic("global"))
    return shown.name if shown is not None else None


def own_name(privacy: PrivacyRules, state: PrivacyState) -> str:
    shown = privacy.show(state, Viewer(state.uid), feed_topic(f"user:{state.uid}"))
    assert shown is not None  # a user always sees themself
    return shown.name


def feed_refusal(feed: str, claims: dict[str, Any]) -> str | None:
    """Why these claims may not read `feed` ("unauthorized", "invalid subject", "unknown feed"), or None."""
    if feed == "global":
        return None
    if feed.startswith("subject:"):
        return None if SUBJECT.match(feed.removeprefix("subject:")) else "invalid subject"
    if feed.startswith("user:"):
        return None if is_self_or_admin(claims, feed.removeprefix("user:")) else "unauthorized"
    return "unknown feed"


def feed_topic(feed: str) -> str:
    return f"feed:{feed}"


def item_payload(item: FeedItem) -> dict[str, Any]:
    return {
        "offset": item.offset,
        "kind": item.kind,
        "text": item.text,
        "data": item.data,
        "created_at": item.created_at.isoformat(),
    }


def row_payload(row: dict[str, Any]) -> dict[str, Any]:
    """The same shape as `item_payload`, from a row about to be inserted."""
    return {
        "offset": row["offset"],
        "kind": row["kind"],
        "text": row["text"],
        "data": row["data"],
        "created_at": row["created_at"].isoformat(),
    }


async def reserve_offsets(session: AsyncSession, counts: dict[str, int]) -> dict[str, tuple[int, str]]:
    """Reserve `counts[feed]` consecutive offsets in each feed; returns the first offset and the epoch
    of each.

    Feed rows are locked in name order (PostgreSQL: SELECT … FOR UPDATE), so workers processing
    batches at the same time wait for each other instead of deadlocking; SQLite locks the database.
    """
    if not counts:
        return {}
    names = sorted(counts)
    insert = dialect_insert(session.bind.dialect.name)
    await session.execute(
        insert(Feed).on_conflict_do_nothing(),
        [{"name": name, "epoch": secrets.token_hex(8), "next_offset": 1} for name in names],
    )
    rows = (
        await session.execute(
            select(Feed.name, Feed.next_offset, Feed.epoch)
            .where(Feed.name.in_(names))
            .order_by(Feed.name)
            .with_for_update()
        )
    ).all()
    first = {name: (int(offset), epoch) for name, offset, epoch in rows}
    await session.execute(
        update(Feed),
        [{"name": name, "next_offset": first[name][0] + counts[name]} for name in names],
    )
    return first


class FeedConsumer:
    """Turns events into feed items (idempotently: the runner records what it did) and pushes them."""

    name = "feed"

    def __init__(self, hub: Hub, privacy: PrivacyRules, retained: int = RETAINED_PER_FEED) -> None:
        self.hub = hub
        self.privacy = privacy
        self.retained = retained

    async def maintain(self, database: Database) -> int:
        """Keep the newest `retained` items of each feed; a client further behind gets `recovered: false`."""
        async with database.session() as session, session.begin():
            feeds = (await session.execute(select(Feed.name, Feed.next_offset))).all()
            removed = 0
            for name, next_offset in feeds:
                keep_from = next_offset - self.retained
                if keep_from > 1:
                    result = await session.execute(
                        delete(FeedItem).where(FeedItem.feed == name, FeedItem.offset < keep_from)
                    )
                    removed += result.rowcount or 0
        return removed

    async def handle(self, events: list[dict[str, Any]], session: AsyncSession) -> Any:
        states = await self.privacy.load(session, {e["user_id"] for e in events})
        planned: list[tuple[str, str, str, Activity]] = []  # (feed, text, event id, activity)
        for event in events:
            state = states[event["user_id"]]
            activity = describe(
                event, name=own_name(self.privacy, state), public_name=public_name(self.privacy, state)
            )
            if activity is None:
                continue
            planned.append((f"user:{event['user_id']}", activity.own_text, event["id"], activity))
            if activity.public_text is not None:
                planned.append(("global", activity.public_text, event["id"], activity))
                if activity.subject:
                    planned.append(
                        (f"subject:{activity.subject}", activity.public_text, event["id"], activity)
                    )
        if not planned:
            return None
        counts: dict[str, int] = {}
        for feed, *_ in planned:
            counts[feed] = counts.get(feed, 0) + 1
        reserved = await reserve_offsets(session, counts)
        next_offset = {feed: offset for feed, (offset, _) in reserved.items()}
        now = utcnow()
        rows = []
        for feed, text, event_id, activity in planned:
            rows.append(
                {
                    "feed": feed,
                    "offset": next_offset[feed],
                    "event_id": event_id,
                    "kind": activity.kind,
                    "text": text,
                    "data": {"subject": activity.subject, **activity.data},
                    "created_at": now,
                }
            )
            next_offset[feed] += 1
        await session.execute(insert(FeedItem), rows)

        async def push() -> None:
            # Live items carry the feed's epoch: a client that joined before the feed had any item
            # (epoch "") learns it here, so it can resume with `since` after a reconnect.
            for row in rows:
                payload = {**row_payload(row), "epoch": reserved[row["feed"]][1]}
                await self.hub.broadcast(feed_topic(row["feed"]), ITEM_EVENT, payload)

        return push


@dataclass
class PublicItemChanges:
    """What a privacy change did to public feeds: items removed and re-worded, per feed, and each
    changed feed's new epoch. The epoch is renewed so a client that was away resumes with a fresh page
    instead of keeping a copy the rule no longer allows."""

    removed: dict[str, list[int]] = field(default_factory=dict)
    updated: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    epochs: dict[str, str] = field(default_factory=dict)

    async def tell(self, hub: Hub) -> None:
        """Push the changes to live viewers (after the commit)."""
        for feed, epoch in self.epochs.items():
            if feed in self.removed:
                offsets = sorted(self.removed[feed])
                await hub.broadcast(feed_topic(feed), REMOVED_EVENT, {"offsets": offsets, "epoch": epoch})
            if feed in self.updated:
                items = sorted(self.updated[feed], key=lambda i: i["offset"])
                await hub.broadcast(feed_topic(feed), UPDATED_EVENT, {"items": items, "epoch": epoch})


async def rerender_public_items(
    session: AsyncSession, privacy: PrivacyRules, state: PrivacyState
) -> PublicItemChanges:
    """In the caller's transaction: the user's items in public feeds rendered again from their stored
    events as the rule shows `state` (an item it no longer allows is deleted, with its reactions)."""
    changes = PublicItemChanges()
    for item, text in await _rerendered(session, privacy, state):
        if text is None:
            changes.removed.setdefault(item.feed, []).append(item.offset)
            await session.delete(item)
        elif text != item.text:
            item.text = text
            changes.updated.setdefault(item.feed, []).append(item_payload(item))
    for feed, offsets in changes.removed.items():
        await session.execute(delete(Reaction).where(Reaction.feed == feed, Reaction.offset.in_(offsets)))
    for feed in sorted({*changes.removed, *changes.updated}):  # name order, as reserve_offsets locks
        changes.epochs[feed] = secrets.token_hex(8)
        await session.execute(update(Feed).where(Feed.name == feed).values(epoch=changes.epochs[feed]))
    await session.flush()
    return changes


async def withdraw_public_items(
    session: AsyncSession, privacy: PrivacyRules, user_id: str
) -> PublicItemChanges:
    """In the caller's transaction, before the user's data is deleted: take every item made from their
    events out of the public feeds."""
    state = await privacy.load_one(session, user_id)
    return await rerender_public_items(session, privacy, replace(state, opted_out=True))


def feeds_follow_changes(
    database: Database, hub: Hub, privacy: PrivacyRules
) -> Callable[[PrivacyChange], Awaitable[None]]:
    """The shared handler for a user's privacy change: their public items follow the rule now
    (`rerender_public_items`), and live viewers are told. A deleted user's items were withdrawn with
    their data (`withdraw_public_items`), so there is nothing left to do. Safe to run twice."""

    async def apply(change: PrivacyChange) -> None:
        async with database.session() as session, session.begin():
            state = await privacy.load_one(session, change.user_id)
            changes = await rerender_public_items(session, privacy, state)
        await changes.tell(hub)

    return apply


async def _rerendered(
    session: AsyncSession, privacy: PrivacyRules, state: PrivacyState
) -> list[tuple[FeedItem, str | None]]:
    """Each public item made from the user's events, with its text as the rule renders it now (None:
    it must not be public)."""
    events = (await session.execute(select(Event.type, Event.props).where(Event.user_id == state.uid))).all()
    subjects = {props.get("subject") for _, props in events if isinstance(props, dict)}
    # Named feeds, so the (feed, event_id) index finds the rows without reading every user's feed.
    feeds = ["global", *sorted(f"subject:{s}" for s in subjects if isinstance(s, str))]
    rows = await session.execute(
        select(FeedItem, Event.type, Event.props)
        .join(Event, Event.id == FeedItem.event_id)
        .where(Event.user_id == state.uid, FeedItem.feed.in_(feeds))
    )
    name, public = own_name(privacy, state), public_name(privacy, state)
    rendered = []
    for item, kind, props in rows:
        activity = describe({"type": kind, "props": props}, name=name, public_name=public)
        rendered.append((item, activity.public_text if activity is not None else None))
    return rendered


async def feed_history(
    session: AsyncSession,
    feed: str,
    *,
    since: int | None = None,
    epoch: str | None = None,
    limit: int = HISTORY_PAGE,
) -> dict[str, Any]:
    """The latest page, or everything after `since` when it can be recovered."""
    row = await session.get(Feed, feed)
    current_epoch = row.epoch if row is not None else ""
    latest = row.next_offset - 1 if row is not None else 0
    if since is not None:
        oldest = (
            await session.execute(select(func.min(FeedItem.offset)).where(FeedItem.feed == feed))
        ).scalar_one_or_none()
        still_there = oldest is None or since >= oldest - 1
        # A feed that did not exist yet had no epoch: "" with since 0 resumes from its beginning.
        same_epoch = epoch == current_epoch or (epoch == "" and since == 0)
        if same_epoch and still_there and since <= latest:
            items = await items_after(session, feed, since)
            return {"recovered": True, "items": items, "offset": latest, "epoch": current_epoch}
    items = await _items(session, feed, before=None, limit=limit)
    result: dict[str, Any] = {"items": items, "offset": latest, "epoch": current_epoch}
    if since is not None:
        result["recovered"] = False
    return result


async def items_after(
    session: AsyncSession, feed: str, offset: int, limit: int = RETAINED_PER_FEED
) -> list[dict[str, Any]]:
    """Items with an offset above `offset`, oldest first."""
    query = select(FeedItem).where(FeedItem.feed == feed, FeedItem.offset > offset)
    rows = (await session.execute(query.order_by(FeedItem.offset).limit(limit))).scalars().all()
    return [item_payload(i) for i in rows]


async def _items(session: AsyncSession, feed: str, *, before: int | None, limit: int) -> list[dict[str, Any]]:
    """The newest `limit` items (below `before`, when given), oldest first."""
    query = select(FeedItem).where(FeedItem.feed == feed)
    if before is not None:
        query = query.where(FeedItem.offset < before)
    rows: Sequence[FeedItem] = (
        (await session.execute(query.order_by(FeedItem.offset.desc()).limit(limit))).scalars().all()
    )
    return [item_payload(i) for i in reversed(rows)]


async def feed_page(session: AsyncSession, feed: str, *, before: int | None, limit: int) -> dict[str, Any]:
    """Cursor pagination for HTTP: items older than `before`, oldest first, and the next cursor."""
    items = await _items(session, feed, before=before, limit=limit)
    next_before = items[0]["offset"] if len(items) == limit else None
    return {"items": items, "next_before": next_before}
