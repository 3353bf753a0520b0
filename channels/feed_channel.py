"""Feed topics: `feed:global`, `feed:subject:{subject}` for anyone, `feed:user:{id}` for its user.

The join reply carries history (`{"items", "offset", "epoch"}`); joining with `{"since", "epoch"}`
resumes after a reconnect. Items arrive live as `new_activity`; after a privacy change of their user,
public feeds push `activity_removed` (drop these offsets) and `activity_updated` (replace these items);
`react` adds a cheer.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import func, select

from realtime import JoinError, ReplyError
from store import FeedItem, Reaction, dialect_insert, utcnow

from .context import ProductChannel
from .feed import HISTORY_PAGE, ITEM_EVENT, feed_history, feed_refusal, items_after

REACTIONS = frozenset({"cheer"})
REACTIONS_PER_MINUTE = 20


class FeedChannel(ProductChannel):
    __slots__ = ("_offset", "_reactions")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._offset = 0
        self._reactions: list[float] = []

    @property
    def feed(self) -> str:
        return self.topic.removeprefix("feed:")

    async def join(self, params: dict[str, Any]) -> dict[str, Any]:
        feed = self.feed
        refusal = feed_refusal(feed, self.claims)
        if refusal == "invalid subject":
            raise JoinError("invalid subject: use 1-64 letters, digits, '-' or '_'")
        if refusal is not None:
            raise JoinError("unmatched topic" if refusal == "unknown feed" else refusal)
        since = params.get("since")
        epoch = params.get("epoch")
        limit = params.get("limit", HISTORY_PAGE)
        if since is not None and (not isinstance(since, int) or isinstance(since, bool) or since < 0):
            raise JoinError("since must be a non-negative integer offset")
        if epoch is not None and not isinstance(epoch, str):
            raise JoinError("epoch must be a string")
        if not isinstance(limit, int) or not 1 <= limit <= 100:
            raise JoinError("limit must be an integer from 1 to 100")
        async with self.services.database.session() as session:
            history = await feed_history(session, feed, since=since, epoch=epoch, limit=limit)
        self._offset = history["offset"]
        return history

    async def after_join(self) -> None:
        # Items made between reading the history and subscribing would be lost: send them now.
        # Clients keep items by offset, so one that also arrived live is not shown twice.
        async with self.services.database.session() as session:
            for item in await items_after(session, self.feed, self._offset):
                self.push(ITEM_EVENT, item)

    async def handle_in(self, event: str, payload: Any, ref: str | None) -> Any:
        if event != "react":
            return await super().handle_in(event, payload, ref)
        if not isinstance(payload, dict) or not isinstance(payload.get("offset"), int):
            raise ReplyError('payload must be {"offset": N, "kind": "cheer"}')
        kind = payload.get("kind", "cheer")
        if kind not in REACTIONS:
            raise ReplyError(f"kind must be one of {sorted(REACTIONS)}")
        now = time.monotonic()
        self._reactions = [t for t in self._reactions if now - t < 60]
        if len(self._reactions) >= REACTIONS_PER_MINUTE:
            raise ReplyError("rate limited", retry_after_ms=int((60 - (now - self._reactions[0])) * 1000) + 1)
        self._reactions.append(now)
        return await self._react(payload["offset"], kind)

    async def _react(self, offset: int, kind: str) -> dict[str, Any]:
        user_id = str(self.claims["sub"])
        async with self.services.database.session() as session, session.begin():
            exists = await session.scalar(
                select(FeedItem.id).where(FeedItem.feed == self.feed, FeedItem.offset == offset)
            )
            if exists is None:
                raise ReplyError("no such item in this feed")
            insert = dialect_insert(session.bind.dialect.name)
            added = (
                await session.execute(
                    insert(Reaction)
                    .values(feed=self.feed, offset=offset, user_id=user_id, kind=kind, created_at=utcnow())
                    .on_conflict_do_nothing()
                    .returning(Reaction.user_id)
                )
            ).first() is not None  # reacting twice is one reaction
            count = await session.scalar(
                select(func.count()).where(
                    Reaction.feed == self.feed, Reaction.offset == offset, Reaction.kind == kind
                )
            )
        if added:
            await self.broadcast("reaction", {"offset": offset, "kind": kind, "count": count})
        return {"offset": offset, "kind": kind, "count": count, "added": added}
