"""`leaderboard:{subject}:{window}`: the top 10 and the viewer's own standing, kept current.

The join reply is `{"top": [...], "you": {"rank", "score"} | null, "period"}`. After that each node
pushes `leaderboard_update` with the same shape to its own viewers at most once a second per
board, and only to a viewer whose top 10 or own standing changed (a new period counts as a change,
and so does a privacy change of someone on it: names are rendered from the store on every refresh).
"""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime
from typing import Any

import orjson

from metrics.live import ChangeListener
from realtime import Hub, JoinError

from .context import ProductChannel
from .leaderboard import CHANGES_TOPIC, WINDOWS, Leaderboards, period
from .presence import SUBJECT

log = logging.getLogger(__name__)


class LeaderboardChannel(ProductChannel):
    __slots__ = ("last_sent", "subject", "window")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        _, self.subject, self.window = ([*self.topic.split(":", 2), "", ""])[:3]
        self.last_sent: dict[str, Any] | None = None

    async def join(self, params: dict[str, Any]) -> dict[str, Any]:
        if not SUBJECT.match(self.subject):
            raise JoinError("invalid subject: use 1-64 letters, digits, '-' or '_'")
        if self.window not in WINDOWS:
            raise JoinError(f"window must be one of {list(WINDOWS)}")
        view = await self.services.leaderboards.view(
            self.subject, self.window, str(self.claims["sub"]), datetime.now(UTC)
        )
        self.last_sent = view
        self.services.board_watcher.watch(self)
        return view

    async def terminate(self, reason: str) -> None:
        self.services.board_watcher.unwatch(self)


class BoardWatcher(ChangeListener):
    """Per node: hears which subjects changed, and refreshes its own viewers once a second."""

    def __init__(self, hub: Hub, leaderboards: Leaderboards, interval: float = 1.0) -> None:
        super().__init__(hub, CHANGES_TOPIC, interval, "leaderboard-watcher")
        self.leaderboards = leaderboards
        self._viewers: dict[tuple[str, str], set[LeaderboardChannel]] = {}
        self._dirty: set[str] = set()
        self._periods: dict[tuple[str, str], str] = {}

    def watch(self, channel: LeaderboardChannel) -> None:
        self._viewers.setdefault((channel.subject, channel.window), set()).add(channel)

    def unwatch(self, channel: LeaderboardChannel) -> None:
        viewers = self._viewers.get((channel.subject, channel.window))
        if viewers is not None:
            viewers.discard(channel)
            if not viewers:
                del self._viewers[(channel.subject, channel.window)]

    def note(self, raw: bytes) -> None:
        with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
            self._dirty.add(str(orjson.loads(raw)["subject"]))
            self.wake()

    async def tick(self) -> bool:
        return await self.refresh() > 0  # every tick, not only on notices: a new period is a change too

    async def refresh(self) -> int:
        """Push to every viewer whose view changed; returns how many pushes went out."""
        now = datetime.now(UTC)
        dirty, self._dirty = self._dirty, set()
        pushed = 0
        for (subject, window), viewers in list(self._viewers.items()):
            current_period = period(window, now)
            rolled = self._periods.get((subject, window)) not in (None, current_period)
            self._periods[(subject, window)] = current_period
            if subject not in dirty and not rolled:
                continue
            key, top = await self.leaderboards.top(subject, window, now)
            for channel in list(viewers):
                you = await self.leaderboards.you(key, str(channel.claims["sub"]))
                view = {"top": top, "you": you, "period": current_period}
                if view != channel.last_sent:
                    channel.last_sent = view
                    channel.push("leaderboard_update", view)
                    pushed += 1
        return pushed
