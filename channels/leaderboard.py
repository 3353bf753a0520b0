"""Mini-leaderboards per subject and window (`daily`, `weekly`, `all_time`), scored from events.

Scoring (documented in the README):
- `practice_completed`: 10 points;
- `quiz_result`: the score as a percentage, 0-100 points (scores outside 0-100 earn nothing);
- `session_completed`: 1 point a minute, at most 120 a session;
- at most 1,000 points per user per subject per UTC day: a bad client cannot buy first place.

Windows roll over at UTC midnight (daily) and Monday 00:00 UTC (weekly). The `score_entries`
rows are the truth; the boards (Redis sorted sets, or memory) are a cache of points only, rebuilt
from them when missing. Ties share a rank (competition ranking: 1, 2, 2, 4) and are listed by user id.
Names are rendered when a board is read, from the store, by the privacy rule: minors (and users the
store does not know) are "A student" with a handle, opted-out users are not on boards at all. A
privacy change re-renders live boards at once (`boards_follow_changes`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import orjson
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from metrics.stream import redis_from_url
from realtime import Hub
from store import Database, ScoreEntry
from store.privacy import OUTSIDER, PrivacyRules, PrivacyState, Shown

from .privacy import PrivacyChange

log = logging.getLogger(__name__)

WINDOWS = ("daily", "weekly", "all_time")
DAILY_CAP = 1000
SESSION_CAP = 120
TOP_N = 10
# Read past the top 10 by this many, so a member hidden since they were cached does not shorten it.
SPARE = 5
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


def board_subject(key: str) -> str:
    """The subject of a board key `lb:{subject}:{window}:{period}` (subjects hold no ':')."""
    return key.split(":", 2)[1]


def board_scope(subject: str, window: str) -> str:
    """The privacy scope of a board: its topic, so a handle is stable across periods, not boards."""
    return f"leaderboard:{subject}:{window}"


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
    async def forget(self, member: str) -> list[str]: ...
    async def close(self) -> None: ...


class MemoryBoards:
    def __init__(self) -> None:
        self._boards: dict[str, dict[str, int]] = {}

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

    async def forget(self, member: str) -> list[str]:
        """Take `member` off every board, of every period; returns the keys of the boards they were on."""
        return sorted(key for key, board in self._boards.items() if board.pop(member, None) is not None)

    async def close(self) -> None:
        return None


class RedisBoards:
    """Sorted sets holding negated points, so ascending order is best-first and ties go by user id."""

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

    async def forget(self, member: str) -> list[str]:
        """Take `member` off every board, of every period; returns the keys of the boards they were on."""
        keys = []
        async for key in self._redis.scan_iter(match="lb:*", _type="zset", count=500):
            if await self._redis.zrem(key, member):
                keys.append(key.decode())
        return sorted(keys)

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

    def on_boards(self, state: PrivacyState) -> bool:
        """Whether the rule shows this user to everyone (by name or as "A student"): only then are
        their points on the cached boards. The scope changes a handle, never whether."""
        return self.privacy.show(state, OUTSIDER, "leaderboard") is not None

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
                .where(ScoreEntry.subject == subject)
                .group_by(ScoreEntry.user_id)
            )
            if start is not None:
                query = query.where(ScoreEntry.ts >= start)
            scores = {user: int(total) for user, total in (await session.execute(query)).all() if total}
            states = await self.privacy.load(session, scores)
        scores = {user: total for user, total in scores.items() if self.on_boards(states[user])}
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

    async def restore(self, subject: str, window: str, now: datetime, users: set[str]) -> None:
        """Set these users' points on the board of the current period to their totals read back from
        the rows, not incremented: a board rebuilt from the rows meanwhile (which already counts them)
        or a restore that ran twice cannot count anything twice."""
        key, rebuilt = await self.ensure(subject, window, now)
        if not rebuilt:  # a rebuilt board already holds them
            await self.store.raise_to(key, await self.totals(subject, window, now, users), TTL[window])

    async def top(self, subject: str, window: str, now: datetime) -> tuple[str, list[dict[str, Any]]]:
        """The board's key and its top entries, ranked, each user shown as the rule shows them to
        everyone, read from the store now (one query): a change of name, age or opt-out shows at once."""
        key, _ = await self.ensure(subject, window, now)
        scope = board_scope(subject, window)
        wanted = TOP_N + SPARE
        while True:
            cached = await self.store.top(key, wanted)
            async with self.database.session() as session:
                states = await self.privacy.load(session, [member for member, _ in cached])
            visible: list[tuple[Shown, int]] = []
            for member, score in cached:
                shown = self.privacy.show(states[member], OUTSIDER, scope)
                if shown is not None:  # hidden since it was cached: its purge is under way
                    visible.append((shown, score))
            if len(visible) >= TOP_N or len(cached) < wanted:
                break
            wanted *= 2
        entries = []
        previous_score, rank = None, 0
        for position, (shown, score) in enumerate(visible[:TOP_N], start=1):
            if score != previous_score:
                rank, previous_score = position, score
            entries.append({"rank": rank, **shown.as_dict(), "score": score})
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
        states = await self.boards.privacy.load(session, {r["user_id"] for r in rows})

        async def apply() -> None:
            now = datetime.now(UTC)
            touched: dict[tuple[str, str], set[str]] = {}  # (subject, window) -> users
            for row in rows:
                if not self.boards.on_boards(states[row["user_id"]]):
                    continue  # scored (it counts if they opt back in), never shown
                for window in WINDOWS:
                    if period(window, row["ts"]) == period(window, now):  # backfills: the database has them
                        touched.setdefault((row["subject"], window), set()).add(row["user_id"])
            for (subject, window), members in touched.items():
                await self.boards.restore(subject, window, now, members)
            for subject in {s for s, _ in touched}:
                await self.hub.publish_raw(CHANGES_TOPIC, orjson.dumps({"subject": subject}))

        return apply


def boards_follow_changes(boards: Leaderboards, hub: Hub) -> Callable[[PrivacyChange], Awaitable[None]]:
    """The shared handler for a user's privacy change: deleted, or no longer on boards (opted out),
    they leave every cached board of every period; on boards again, their totals go back on the
    current boards of every subject they scored in. Either way every board of theirs is re-rendered
    on every node: a minor's name goes at once though no point moved. Safe to run twice."""

    async def apply(change: PrivacyChange) -> None:
        uid = change.user_id
        async with boards.database.session() as session:
            subjects = set(
                await session.scalars(select(ScoreEntry.subject).where(ScoreEntry.user_id == uid).distinct())
            )
            state = await boards.privacy.load_one(session, uid)
        if change.deleted or not boards.on_boards(state):
            # A deleted user's rows are gone: the boards they were taken off name the subjects.
            subjects.update(board_subject(key) for key in await boards.store.forget(uid))
        else:
            now = datetime.now(UTC)
            for subject in sorted(subjects):
                for window in WINDOWS:
                    await boards.restore(subject, window, now, {uid})
        for subject in sorted(subjects):
            await hub.publish_raw(CHANGES_TOPIC, orjson.dumps({"subject": subject}))

    return apply


def _day(event: dict[str, Any]) -> datetime:
    day = window_start("daily", datetime.fromisoformat(event["ts"]))
    assert day is not None
    return day
