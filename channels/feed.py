"""Activity feeds: events become feed items, stored per feed with monotonic offsets, pushed live.

Public feeds (`feed:global`, `feed:subject:{s}`) are rendered for everyone when the item is made:
minors appear as "A student", users who opted out do not appear at all, and no user id is
stored in a public row. A user's own feed (`feed:user:{id}`) carries their name.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from realtime import Hub
from store import Database, Feed, FeedItem, User, dialect_insert, utcnow
from store.privacy import PrivacyRules

from .access import is_self_or_admin
from .presence import SUBJECT
from .privacy import ANONYMOUS_NAME

ITEM_EVENT = "new_activity"
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
    """The activity an event makes, worded for the public (`public_name`; None = opted out) and the user."""
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
        user_ids = {e["user_id"] for e in events}
        users = {
            u.id: u for u in (await session.execute(select(User).where(User.id.in_(user_ids)))).scalars()
        }
        planned: list[tuple[str, str, str, Activity]] = []  # (feed, text, event id, activity)
        for event in events:
            user = users.get(event["user_id"])
            name = user.display_name if user is not None and user.display_name else ANONYMOUS_NAME
            public_name: str | None = ANONYMOUS_NAME if user is None or user.minor else name
            if user is not None and user.opted_out:
                public_name = None
            activity = describe(event, name=name, public_name=public_name)
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


async def feed_history(
    session: AsyncSession,
    feed: str,
    *,
    since: int | None = None,
    epoch: str | None = None,
    limit: int = HISTORY_PAGE,
) -> dict[str, Any]:
    """The feed contract of SPEC §7: latest page, or everything after `since` when it can be recovered."""
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
