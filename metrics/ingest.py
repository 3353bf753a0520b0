"""The one way events come in: validate, store (idempotently), then hand to the stream.

The database row is the source of truth. The `published` flag is the outbox: an event is marked
once the stream has it; `relay_unpublished` (run by the worker) retries those that did not make it,
so a crash or a Redis outage between commit and append loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import case, select, update

from store import Database, Event, User, UserActivity, dialect_insert, utcnow
from store.privacy import opt_out_user

from .events import EventIn
from .stream import EventStream, StreamUnavailable

log = logging.getLogger(__name__)


def _later(current: Any, new: Any) -> Any:
    """The later of two nullable timestamps, the same on PostgreSQL and SQLite."""
    return case((new.is_(None), current), (current.is_(None), new), (new > current, new), else_=current)


class IngestUnavailable(Exception):
    """The database could not take the events: nothing was accepted; retry later."""


@dataclass(frozen=True, slots=True)
class Accepted:
    id: str
    duplicate: bool


def event_message(event: Event) -> dict[str, Any]:
    """What consumers receive: the stored row, JSON-ready."""
    return {
        "id": event.id,
        "type": event.type,
        "user_id": event.user_id,
        "ts": event.ts.isoformat(),
        "props": event.props,
        "actor_id": event.actor_id,
    }


class EventIngest:
    def __init__(self, database: Database, stream: EventStream, *, write_timeout: float = 5.0) -> None:
        """`write_timeout` bounds the storing transaction: a database that does not answer in time
        (a network partition hangs rather than refuses) gets the caller a prompt "unavailable"."""
        self.database = database
        self.stream = stream
        self.write_timeout = write_timeout
        self._streamed: set[str] = set()
        self._marker: asyncio.Task[None] | None = None
        # Told, after the commit, of each user whose privacy state an ingest changed (an opt-out, a
        # token marking them a minor), so the change takes effect everywhere (channels/privacy.py).
        self.privacy_changed: Callable[[str], Awaitable[None]] | None = None

    async def ingest(
        self, events: Sequence[EventIn], *, actor_id: str, actor_claims: dict[str, Any] | None = None
    ) -> list[Accepted]:
        """Store new events (duplicates by id are skipped) and stream them.

        `actor_claims`, when the caller is a user, refresh that user's role, and mark them a minor when
        the token says so (a token only adds protection: no claim makes a minor an adult). An `opt_out`
        event opts its user out in the same transaction (by themself, or by the admin who sent it).
        """
        unique = list({e.id: e for e in events}.values())  # an id twice in one batch is one event
        now = utcnow()
        rows = [
            {
                "id": e.id,
                "type": e.type,
                "user_id": e.user_id,
                "ts": e.ts,
                "received_at": now,
                "props": e.props,
                "actor_id": actor_id,
                "published": False,
            }
            for e in unique
        ]
        insert = dialect_insert(self.database.dialect)
        try:
            async with (
                asyncio.timeout(self.write_timeout),
                self.database.session() as session,
                session.begin(),
            ):
                # One cached statement, many parameter sets: SQLAlchemy batches them into multi-row
                # INSERTs ("insertmanyvalues") and still tells us which rows were new.
                stmt = insert(Event).on_conflict_do_nothing(index_elements=["id"]).returning(Event.id)
                created: set[str] = set((await session.execute(stmt, rows)).scalars()) if rows else set()
                if created:
                    await self._touch_activity(session, insert, [r for r in rows if r["id"] in created])
                changed: set[str] = set()
                if actor_claims is not None and actor_claims.get("role") != "admin":
                    if await self._refresh_profile(session, insert, actor_claims):
                        changed.add(str(actor_claims["sub"]))
                opted_out = {e.user_id for e in unique if e.id in created and e.type == "opt_out"}
                changed |= opted_out
                for user_id in sorted(opted_out):
                    # At ingest, not in a consumer: from this commit on, no consumer renders them publicly.
                    await opt_out_user(
                        session, user_id, by="self" if user_id == actor_id else "admin", now=now
                    )
        except Exception as exc:
            # A timeout may strike during COMMIT, so the events may in fact be stored: the caller retries
            # with the same ids and is told `duplicate`; never is a batch answered accepted and not stored.
            reason = (
                f"no answer within {self.write_timeout:g}s" if isinstance(exc, TimeoutError) else str(exc)
            )
            log.warning("event ingest could not write to the database: %s", reason)
            raise IngestUnavailable(reason) from exc
        if created:
            await self.publish([Event(**row) for row in rows if row["id"] in created])
        if self.privacy_changed is not None:
            for user_id in sorted(changed):
                await self.privacy_changed(user_id)
        return [Accepted(e.client_id or e.id, e.id not in created) for e in events]

    @staticmethod
    async def _touch_activity(session: Any, insert: Any, rows: list[dict[str, Any]]) -> None:
        """Move each user's latest-event and latest-signup times forward (never back), in user order
        so concurrent batches lock the rows in the same order."""
        latest: dict[str, list[Any]] = {}
        for row in rows:
            seen = latest.setdefault(row["user_id"], [row["ts"], None])
            seen[0] = max(seen[0], row["ts"])
            if row["type"] == "signup":
                seen[1] = row["ts"] if seen[1] is None else max(seen[1], row["ts"])
        values = [
            {"user_id": user, "last_ts": last, "last_signup_ts": signup}
            for user, (last, signup) in sorted(latest.items())
        ]
        stmt = insert(UserActivity)
        await session.execute(
            stmt.on_conflict_do_update(
                index_elements=["user_id"],
                set_={
                    "last_ts": _later(UserActivity.last_ts, stmt.excluded.last_ts),
                    "last_signup_ts": _later(UserActivity.last_signup_ts, stmt.excluded.last_signup_ts),
                },
            ),
            values,
        )

    @staticmethod
    async def _refresh_profile(session: Any, insert: Any, claims: dict[str, Any]) -> bool:
        """Upsert the caller's profile; True when this made them a minor."""
        now = utcnow()
        role = claims.get("role") if claims.get("role") in ("student", "parent", "tutor") else "student"
        minor = claims.get("minor") is True
        stmt = insert(User).values(
            id=str(claims["sub"]), role=role, minor=minor, subjects=[], created_at=now, updated_at=now
        )
        # minor = stored OR claimed: the claim can set the flag, never clear it.
        written = await session.execute(
            stmt.on_conflict_do_update(
                index_elements=["id"],
                set_={"role": role, "minor": User.minor | stmt.excluded.minor, "updated_at": now},
                where=(User.role != role) | (stmt.excluded.minor & ~User.minor),
            ).returning(User.id)
        )
        return minor and written.first() is not None

    async def publish(self, events: Sequence[Event]) -> bool:
        try:
            await self.stream.append([event_message(e) for e in events])
        except StreamUnavailable as exc:
            log.warning("%d events stored but not yet streamed (%s); the relay will retry", len(events), exc)
            return False
        if self._marker is not None:
            # Marked in the background, many requests at a time: the request does not wait for it.
            self._streamed.update(e.id for e in events)
        else:
            await self._mark_published([e.id for e in events])
        return True

    async def _mark_published(self, ids: Sequence[str]) -> None:
        async with self.database.session() as session, session.begin():
            await session.execute(update(Event).where(Event.id.in_(ids)).values(published=True))

    async def start(self) -> None:
        """Mark streamed events published in the background (otherwise each publish does it inline).
        An event streamed but not yet marked when the process dies is streamed again by the relay:
        a duplicate, which consumers ignore."""
        self._marker = asyncio.create_task(self._mark_forever(), name="ingest-mark-published")

    async def stop(self) -> None:
        if self._marker is not None:
            self._marker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._marker
            self._marker = None
        await self._flush_marks()

    async def _mark_forever(self, interval: float = 0.2) -> None:
        while True:
            await asyncio.sleep(interval)
            await self._flush_marks()

    async def _flush_marks(self) -> None:
        if not self._streamed:
            return
        ids, self._streamed = list(self._streamed), set()
        try:
            for start in range(0, len(ids), 1000):
                await self._mark_published(ids[start : start + 1000])
        except Exception as exc:
            log.warning(
                "could not mark %d events published (%s); the relay may stream them again", len(ids), exc
            )

    async def relay_unpublished(
        self, *, older_than: timedelta = timedelta(seconds=5), limit: int = 500
    ) -> int:
        """Stream events that were stored but never streamed; returns how many went out."""
        cutoff = utcnow() - older_than
        async with self.database.session() as session:
            pending = (
                (
                    await session.execute(
                        select(Event)
                        .where(Event.published.is_(False), Event.received_at < cutoff)
                        .order_by(Event.received_at)
                        .limit(limit)
                    )
                )
                .scalars()
                .all()
            )
        if pending and await self.publish(list(pending)):
            log.info("relayed %d events that had not reached the stream", len(pending))
            return len(pending)
        return 0
