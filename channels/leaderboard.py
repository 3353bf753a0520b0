"""Mini-leaderboards per subject and window (`daily`, `weekly`, `all_time`), scored from events.

Scoring (documented in the README):
- `practice_completed`: 10 points;
- `quiz_result`: the score as a percentage, 0-100 points (scores outside 0-100 earn nothing);
- `session_completed`: 1 point a minute, at most 120 a session;
- at most 1,000 points per user per subject per UTC day: a bad client cannot buy first place.

Windows roll over at UTC midnight (daily) and Monday 00:00 UTC (weekly). The `score_entries`
rows are the truth; the boards (Redis sorted sets, or memory) are a cache rebuilt from them when
missing. Ties share a rank (competition ranking: 1, 2, 2, 4) and are listed by user id.
Minors appear as "A student" without their id; opted-out users are left out entirely.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import orjson
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from metrics.stream import redis_from_url
from realtime import Hub
from store import Database, ScoreEntry, User
from store.privacy import PrivacyRules

from .privacy import ANONYMOUS_NAME

log = logging.getLogger(__name__)

WINDOWS = ("daily", "weekly", "all_time")
DAILY_CAP = 1000
SESSION_CAP = 120
TOP_N = 10
CHANGES_TOPIC = "__leaderboards__"


def points_for(event: dict[str, Any]) -> int:
    props = event["props"]
    kind = event["type"]
    if kind == "practice_completed":
        return 10
    if kind == "quiz_result":
        score = float(props["score"])
        return round(score) if 0 <= score <= 100 else 0
    if kind == "session_completed":
        minutes = float(props["minutes"])
        return min(SESSION_CAP, max(0, round(minutes)))
    return 0


def period(window: str, ts: datetime) -> str:
    ts = ts.astimezone(UTC)
    if window == "daily":
        return ts.strftime("%Y-%m-%d")
    if window == "weekly":
        year, week, _ = ts.isocalendar()
        return f"{year}-W{week:02d}"
    return "all"


def window_start(window: str, ts: datetime) -> datetime | None:
    ts = ts.astimezone(UTC)
    day = ts.replace(hour=0, minute=0, second=0, microsecond=0)
    if window == "daily":
        return day
    if window == "weekly":
        return day - timedelta(days=day.weekday())
    return None


def board_key(subject: str, window: str, ts: datetime) -> str:
    return f"lb:{subject}:{window}:{period(window, ts)}"


@dataclass(frozen=True, slots=True)
class Label:
    """How a member is shown on boards: minors (and users we know nothing of) anonymously."""

    name: str
    anonymous: bool

    def dump(self) -> bytes:
        return orjson.dumps([self.name, self.anonymous])

    @classmethod
    def load(cls, raw: bytes | None) -> Label:
        if not raw:
            return ANONYMOUS
        name, anonymous = orjson.loads(raw)
        return cls(name, bool(anonymous))


ANONYMOUS = Label(ANONYMOUS_NAME, True)


@dataclass(frozen=True, slots=True)
class Standing:
    rank: int
    score: int


class BoardStore(Protocol):
    async def exists(self, key: str) -> bool: ...
    async def add(self, key: str, member: str, points: int, ttl: int | None) -> None: ...
    async def replace(self, key: str, scores: dict[str, int], ttl: int | None) -> None: ...
    async def raise_to(self, key: str, scores: dict[str, int], ttl: int | None) -> None: ...
    async def top(self, key: str, n: int) -> list[tuple[str, int]]: ...
    async def standing(self, key: str, member: str) -> Standing | None: ...
    async def set_label(self, member: str, label: Label) -> None: ...
    async def labels(self, members: Sequence[str]) -> dict[str, Label]: ...
    async def forget(self, member: str) -> int: ...
    async def close(self) -> None: ...


class MemoryBoards:
    def __init__(self) -> None:
        self._boards: dict[str, dict[str, int]] = {}
        self._labels: dict[str, Label] = {}

    async def exists(self, key: str) -> bool:
        return key in self._boards

    async def add(self, key: str, member: str, points: int, ttl: int | None) -> None:
        board = self._boards.setdefault(key, {})
        board[member] = board.get(member, 0) + points

    async def replace(self, key: str, scores: dict[str, int], ttl: int | None) -> None:
        self._boards[key] = dict(scores)

    async def raise_to(self, key: str, scores: dict[str, int], ttl: int | None) -> None:
        board = self._boards.setdefault(key, {})
        for member, score in scores.items():
            board[member] = max(board.get(member, score), score)

    async def top(self, key: str, n: int) -> list[tuple[str, int]]:
        board = self._boards.get(key, {})
        return sorted(board.items(), key=lambda item: (-item[1], item[0]))[:n]

    async def standing(self, key: str, member: str) -> Standing | None:
        board = self._boards.get(key, {})
        if member not in board:
            return None
        score = board[member]
        return Standing(1 + sum(1 for s in board.values() if s > score), score)

    async def set_label(self, member: str, label: Label) -> None:
        self._labels[member] = label

    async def labels(self, members: Sequence[str]) -> dict[str, Label]:
        return {m: self._labels.get(m, ANONYMOUS) for m in members}

    async def forget(self, member: str) -> int:
        """Take `member` off every board, of every period, and drop their label; returns the boards."""
        boards = sum(1 for board in self._boards.values() if board.pop(member, None) is not None)
        self._labels.pop(member, None)
        return boards

    async def close(self) -> None:
        return None


class RedisBoards:
    """Sorted sets holding negated points, so ascending order is best-first and ties go by user id."""

    LABELS = "lb:labels"

    def __init__(self, url: str) -> None:
        self._redis = redis_from_url(url)

    async def exists(self, key: str) -> bool:
        return bool(await self._redis.exists(key))

    async def add(self, key: str, member: str, points: int, ttl: int | None) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zincrby(key, -points, member)
            if ttl:
                pipe.expire(key, ttl)
            await pipe.execute()

    async def replace(self, key: str, scores: dict[str, int], ttl: int | None) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            if scores:
                pipe.zadd(key, {m: -s for m, s in scores.items()})
                if ttl:
                    pipe.expire(key, ttl)
            await pipe.execute()

    async def raise_to(self, key: str, scores: dict[str, int], ttl: int | None) -> None:
        """Set each member's total, unless the board already holds a higher one (ZADD LT on the
        negated points): totals only grow, so a stale write never lowers a fresher one."""
        if not scores:
            return
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zadd(key, {m: -s for m, s in scores.items()}, lt=True)
            if ttl:
                pipe.expire(key, ttl)
            await pipe.execute()

    async def top(self, key: str, n: int) -> list[tuple[str, int]]:
        rows = await self._redis.zrange(key, 0, n - 1, withscores=True)
        return [(m.decode(), int(-s)) for m, s in rows]

    async def standing(self, key: str, member: str) -> Standing | None:
        score = await self._redis.zscore(key, member)
        if score is None:
            return None
        better = await self._redis.zcount(key, "-inf", f"({score}")
        return Standing(int(better) + 1, int(-score))

    async def set_label(self, member: str, label: Label) -> None:
        await self._redis.hset(self.LABELS, member, label.dump())

    async def labels(self, members: Sequence[str]) -> dict[str, Label]:
        if not members:
            return {}
        values = await self._redis.hmget(self.LABELS, list(members))
        return {m: Label.load(v) for m, v in zip(members, values, strict=True)}

    async def forget(self, member: str) -> int:
        """Take `member` off every board, of every period, and drop their label; returns the boards."""
        boards = 0
        async for key in self._redis.scan_iter(match="lb:*", _type="zset", count=500):
            boards += int(await self._redis.zrem(key, member))
        await self._redis.hdel(self.LABELS, member)
        return boards

    async def close(self) -> None:
        await self._redis.aclose()


def boards_from_url(url: str) -> BoardStore:
    return MemoryBoards() if url.startswith("memory://") else RedisBoards(url)


TTL = {"daily": 3 * 86400, "weekly": 15 * 86400, "all_time": None}


class Leaderboards:
    """Reads and rebuilds boards; the consumer below writes them."""

    def __init__(self, database: Database, store: BoardStore, privacy: PrivacyRules) -> None:
        self.database = database
        self.store = store
        self.privacy = privacy
        self._rebuilding: dict[str, asyncio.Lock] = {}

    async def ensure(self, subject: str, window: str, now: datetime) -> tuple[str, bool]:
        """The board's key, and whether it had to be rebuilt from the database (the cache lost it)."""
        key = board_key(subject, window, now)
        if await self.store.exists(key):
            return key, False
        lock = self._rebuilding.setdefault(key, asyncio.Lock())
        async with lock:
            if await self.store.exists(key):
                return key, False
            await self.rebuild(subject, window, now)
        return key, True

    async def rebuild(self, subject: str, window: str, now: datetime) -> int:
        start = window_start(window, now)
        async with self.database.session() as session:
            query = (
                select(ScoreEntry.user_id, func.sum(ScoreEntry.points))
                .join(User, User.id == ScoreEntry.user_id, isouter=True)
                .where(
                    ScoreEntry.subject == subject, (User.opted_out.is_(None)) | (User.opted_out.is_(False))
                )
                .group_by(ScoreEntry.user_id)
            )
            if start is not None:
                query = query.where(ScoreEntry.ts >= start)
            scores = {user: int(total) for user, total in (await session.execute(query)).all() if total}
        # Raised, not replaced: totals another process set meanwhile from fresher rows stay.
        await self.store.raise_to(board_key(subject, window, now), scores, TTL[window])
        log.info("rebuilt leaderboard %s/%s from the database (%d users)", subject, window, len(scores))
        return len(scores)

    async def totals(self, subject: str, window: str, now: datetime, users: set[str]) -> dict[str, int]:
        """These users' points on the board, from the score rows (the truth)."""
        query = (
            select(ScoreEntry.user_id, func.sum(ScoreEntry.points))
            .where(ScoreEntry.user_id.in_(users), ScoreEntry.subject == subject)
            .group_by(ScoreEntry.user_id)
        )
        start = window_start(window, now)
        if start is not None:
            query = query.where(ScoreEntry.ts >= start)
        async with self.database.session() as session:
            return {user: int(total) for user, total in (await session.execute(query)).all() if total}

    async def top(self, subject: str, window: str, now: datetime) -> tuple[str, list[dict[str, Any]]]:
        """The board's key and its top entries, ranked, with names as viewers may see them."""
        key, _ = await self.ensure(subject, window, now)
        top = await self.store.top(key, TOP_N)
        labels = await self.store.labels([m for m, _ in top])
        entries = []
        previous_score, rank = None, 0
        for position, (member, score) in enumerate(top, start=1):
            if score != previous_score:
                rank, previous_score = position, score
            label = labels.get(member, ANONYMOUS)
            entry: dict[str, Any] = {"rank": rank, "name": label.name, "score": score}
            if not label.anonymous:
                entry["user_id"] = member
            entries.append(entry)
        return key, entries

    async def you(self, key: str, viewer: str) -> dict[str, int] | None:
        mine = await self.store.standing(key, viewer)
        return {"rank": mine.rank, "score": mine.score} if mine else None

    async def view(self, subject: str, window: str, viewer: str, now: datetime) -> dict[str, Any]:
        key, entries = await self.top(subject, window, now)
        return {"top": entries, "you": await self.you(key, viewer), "period": period(window, now)}


class LeaderboardConsumer:
    name = "leaderboard"

    def __init__(self, boards: Leaderboards, hub: Hub) -> None:
        self.boards = boards
        self.hub = hub

    async def handle(self, events: list[dict[str, Any]], session: AsyncSession) -> Any:
        scored = [(e, points_for(e)) for e in events]
        scored = [(e, p) for e, p in scored if p > 0 and isinstance(e["props"].get("subject"), str)]
        if not scored:
            return None
        # What each (user, subject, day) already earned, so the daily cap holds across batches.
        days = {_day(e) for e, _ in scored}
        earned: dict[tuple[str, str, datetime], int] = {}
        previous = await session.execute(
            select(ScoreEntry.user_id, ScoreEntry.subject, ScoreEntry.ts, ScoreEntry.points).where(
                ScoreEntry.user_id.in_({e["user_id"] for e, _ in scored}),
                ScoreEntry.subject.in_({e["props"]["subject"] for e, _ in scored}),
                ScoreEntry.ts >= min(days),
                ScoreEntry.ts < max(days) + timedelta(days=1),
            )
        )
        for user_id, subject, ts, points in previous:
            bucket = (user_id, subject, ts.replace(hour=0, minute=0, second=0, microsecond=0))
            earned[bucket] = earned.get(bucket, 0) + points
        rows = []
        for event, wanted in scored:
            bucket = (event["user_id"], event["props"]["subject"], _day(event))
            points = min(wanted, max(0, DAILY_CAP - earned.get(bucket, 0)))
            if points:
                earned[bucket] = earned.get(bucket, 0) + points
                rows.append(
                    {
                        "event_id": event["id"],
                        "user_id": event["user_id"],
                        "subject": event["props"]["subject"],
                        "points": points,
                        "ts": datetime.fromisoformat(event["ts"]),
                    }
                )
        if not rows:
            return None
        await session.execute(insert(ScoreEntry), rows)
        user_ids = {r["user_id"] for r in rows}
        users = {
            u.id: u for u in (await session.execute(select(User).where(User.id.in_(user_ids)))).scalars()
        }

        async def apply() -> None:
            # The cached boards are set to each touched user's total read back from the rows, not
            # incremented: a board rebuilt from the rows meanwhile (which already counts these) or
            # an apply that ran twice cannot count anything twice.
            store = self.boards.store
            now = datetime.now(UTC)
            touched: dict[tuple[str, str], set[str]] = {}  # (subject, window) -> users
            for row in rows:
                user = users.get(row["user_id"])
                if user is not None and user.opted_out:
                    continue  # scored (it counts if they opt back in and boards are rebuilt), never shown
                for window in WINDOWS:
                    if period(window, row["ts"]) == period(window, now):  # backfills: the database has them
                        touched.setdefault((row["subject"], window), set()).add(row["user_id"])
            for user_id in user_ids:
                user = users.get(user_id)
                label = (
                    ANONYMOUS
                    if user is None or user.minor or not user.display_name
                    else Label(user.display_name, False)
                )
                await store.set_label(user_id, label)
            for (subject, window), members in touched.items():
                key, rebuilt = await self.boards.ensure(subject, window, now)
                if not rebuilt:  # a rebuilt board already holds these points
                    totals = await self.boards.totals(subject, window, now, members)
                    await store.raise_to(key, totals, TTL[window])
            for subject in {s for s, _ in touched}:
                await self.hub.publish_raw(CHANGES_TOPIC, orjson.dumps({"subject": subject}))

        return apply


def _day(event: dict[str, Any]) -> datetime:
    day = window_start("daily", datetime.fromisoformat(event["ts"]))
    assert day is not None
    return day
