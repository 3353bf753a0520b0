"""A change of a user's privacy state (opted out or in, marked a minor, consent, deleted) takes effect
everywhere at once.

Whoever changes the state in the store calls `PrivacyNotices.changed` after the commit. That runs the
shared work once, here (purging and re-rendering what is stored for everyone: public feed items, the
leaderboard caches), then tells every node over the broker, where the local work runs (presence metas of
the user's sockets, closing a deleted user's sockets, refusing their old tokens, re-pushing boards).
The rendering itself is `store.privacy.PrivacyRules.show`. `PrivacyDirectory` is a node's cache of
states for the hot join path, dropped per user by every notice (and after `STATE_TTL` in any case).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from realtime import Hub, PhoenixEndpoint, Revocations
from store import Database
from store.privacy import ANONYMOUS_NAME, PrivacyRules, PrivacyState, Shown, Viewer

log = logging.getLogger(__name__)

PRIVACY_TOPIC = "__privacy__"
# Tombstones are re-read this often, so a node that missed a notice (it was reconnecting to the
# broker) still refuses a deleted user's old tokens soon after.
TOMBSTONE_REFRESH = 30.0


@dataclass(frozen=True, slots=True)
class PrivacyChange:
    user_id: str
    deleted_at: datetime | None = None

    @property
    def deleted(self) -> bool:
        return self.deleted_at is not None


Handler = Callable[[PrivacyChange], Awaitable[None]]


class PrivacyNotices:
    def __init__(
        self,
        hub: Hub,
        database: Database,
        rules: PrivacyRules,
        revocations: Revocations,
        directory: PrivacyDirectory | None = None,
    ) -> None:
        self.hub = hub
        self.database = database
        self.rules = rules
        self.revocations = revocations
        self.directory = directory or PrivacyDirectory(database, rules)
        self._shared: list[Handler] = []
        self._local: list[Handler] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._refresher: asyncio.Task[None] | None = None

    def on_change(self, handler: Handler, *, shared: bool = False) -> None:
        """Call `handler` on every change: `shared` work (stored for everyone) once, on the node that made
        the change; local work on every node, this one included."""
        (self._shared if shared else self._local).append(handler)

    async def changed(self, user_id: str, *, deleted_at: datetime | None = None) -> None:
        """The user's privacy state changed in the store (committed): apply it everywhere."""
        change = self._note(PrivacyChange(user_id, deleted_at))
        for handler in self._shared:
            await self._run(handler, change)
        message = {"user": user_id, "deleted_at": deleted_at.timestamp() if deleted_at else None}
        try:
            await self.hub.publish_raw(PRIVACY_TOPIC, orjson.dumps(message))
        except Exception as exc:  # the broker is down: this node applies it; others refresh tombstones
            log.warning("privacy change of a user not announced to other nodes: %s", exc)
            self._on_message(orjson.dumps(message))

    async def start(self) -> None:
        # The database may be down at start-up (readiness reports it): the refresher keeps trying.
        try:
            await self.reload_tombstones()
        except Exception as exc:
            log.warning(
                "deleted users' tombstones not read at start-up (retried every %gs): %s",
                TOMBSTONE_REFRESH,
                exc,
            )
        await self.hub.listen(PRIVACY_TOPIC, self._on_message)
        self._refresher = asyncio.create_task(self._refresh_forever(), name="privacy-tombstones")

    async def stop(self) -> None:
        self.hub.unlisten(PRIVACY_TOPIC, self._on_message)
        tasks = [t for t in (self._refresher, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._refresher = None

    async def reload_tombstones(self) -> None:
        async with self.database.session() as session:
            found = await self.rules.tombstones(session)
        self.revocations.replace({key: at.timestamp() for key, at in found.items()})

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(TOMBSTONE_REFRESH)
            try:
                await self.reload_tombstones()
            except Exception as exc:
                log.warning("could not re-read deleted users' tombstones: %s", exc)

    def _on_message(self, raw: bytes) -> None:
        try:
            message: dict[str, Any] = orjson.loads(raw)
            user_id = str(message["user"])
            deleted = message.get("deleted_at")
            deleted_at = datetime.fromtimestamp(float(deleted), UTC) if deleted is not None else None
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("ignored a malformed privacy notice: %r", raw[:200])
            return
        change = self._note(PrivacyChange(user_id, deleted_at))
        task = asyncio.get_running_loop().create_task(self._apply_local(change), name="privacy-change")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _note(self, change: PrivacyChange) -> PrivacyChange:
        """What this node does at once: drop its cached state; for a deletion, refuse older tokens."""
        self.directory.forget(change.user_id)
        if change.deleted_at is not None:
            self.revocations.revoke(self.rules.tombstone_key(change.user_id), change.deleted_at.timestamp())
        return change

    async def _apply_local(self, change: PrivacyChange) -> None:
        for handler in self._local:
            await self._run(handler, change)

    @staticmethod
    async def _run(handler: Handler, change: PrivacyChange) -> None:
        try:
            await handler(change)
        except Exception:
            log.exception("applying a privacy change failed in %r", handler)


# How long a cached state may serve without a notice: bounds the harm of a notice the broker lost.
STATE_TTL = 30.0
STATE_CACHE_SIZE = 100_000


class PrivacyDirectory:
    """This node's cache of privacy states read from the store. Misses within one event-loop tick are
    read in one query (a thousand sockets joining at once cost a few reads, not a thousand). A read that
    started before an invalidation of the same user does not store its (maybe stale) result."""

    def __init__(self, database: Database, rules: PrivacyRules, ttl: float = STATE_TTL) -> None:
        self.database = database
        self.rules = rules
        self.ttl = ttl
        self._states: dict[str, tuple[float, PrivacyState]] = {}
        self._generation: dict[str, int] = {}
        self._waiting: dict[str, asyncio.Future[PrivacyState]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def get(self, uid: str) -> PrivacyState:
        cached = self._states.get(uid)
        if cached is not None and time.monotonic() - cached[0] < self.ttl:
            return cached[1]
        waiting = self._waiting.get(uid)
        if waiting is None:
            waiting = self._waiting[uid] = asyncio.get_running_loop().create_future()
            if self._reader is None:
                self._reader = asyncio.get_running_loop().create_task(self._read(), name="privacy-states")
        return await asyncio.shield(waiting)

    async def _read(self) -> None:
        await asyncio.sleep(0)  # the rest of this tick's misses join the batch
        self._reader = None
        batch, self._waiting = self._waiting, {}
        generations = {uid: self._generation.get(uid, 0) for uid in batch}
        started = time.monotonic()
        try:
            async with self.database.session() as session:
                states = await self.rules.load(session, batch)
        except Exception as exc:
            # The store cannot be read (an outage): fail protective, not closed — shown as a minor
            # would be, and not cached, until the store answers again.
            log.warning(
                "privacy states of %d users unreadable, shown protected meanwhile: %s", len(batch), exc
            )
            for uid, waiting in batch.items():
                waiting.set_result(PrivacyState(uid, minor=True))
            return
        for uid, waiting in batch.items():
            if self._generation.get(uid, 0) == generations[uid]:
                if len(self._states) >= STATE_CACHE_SIZE:
                    self._states.pop(next(iter(self._states)))  # the oldest entry
                self._states[uid] = (started, states[uid])
            waiting.set_result(states[uid])

    def forget(self, uid: str) -> None:
        self._states.pop(uid, None)
        self._generation[uid] = self._generation.get(uid, 0) + 1
        if len(self._generation) > STATE_CACHE_SIZE:
            self._generation.clear()  # reads in flight may then store once more; the TTL bounds it


# A deleted user's sockets close with this code: a policy reason, not an error; phoenix.js reconnects and
# is refused at the upgrade (their old tokens no longer verify).
CLOSE_USER_DELETED = 1008


def sockets_follow_changes(endpoint: PhoenixEndpoint) -> Handler:
    """The node-local handler for this endpoint's sockets: a deleted user's are closed; for anyone
    else, every joined channel that renders its user to others (`privacy_changed`) re-renders."""

    async def apply(change: PrivacyChange) -> None:
        for sock in [s for s in endpoint.sockets if s.user_id == change.user_id]:
            if change.deleted:
                sock.close(CLOSE_USER_DELETED, "this account was deleted")
                continue
            for channel in list(sock.channels.values()):
                rerender = getattr(channel, "privacy_changed", None)
                if rerender is not None:
                    await rerender()

    return apply


__all__ = [
    "ANONYMOUS_NAME",
    "CLOSE_USER_DELETED",
    "PRIVACY_TOPIC",
    "PrivacyChange",
    "PrivacyDirectory",
    "PrivacyNotices",
    "PrivacyRules",
    "PrivacyState",
    "Shown",
    "Viewer",
    "sockets_follow_changes",
]
