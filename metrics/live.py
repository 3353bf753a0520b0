"""Live growth numbers: `metrics_update` pushes to dashboards, coalesced to at most one a second.

Whatever changes the inputs (a batch of events consumed, a link clicked) calls `changed()` on some
node; the notice travels over the broker, and each node with dashboards open recomputes the report
once per interval — not once per event — and pushes it to each viewer whose numbers moved. The
pushed JSON is exactly what `GET /api/metrics/k-factor` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from realtime import BrokerUnavailable, Hub
from store import Database

from .growth import k_factor_report

log = logging.getLogger(__name__)

CHANGES_TOPIC = "__metrics__"


class Viewer(Protocol):
    days: int
    last_sent: dict[str, Any] | None

    def push(self, event: str, payload: Any) -> None: ...


class ChangeListener(ABC):
    """Hears change notices on a broker topic and calls `tick()` at most once every `interval` seconds.

    The shape every live view shares: notices mark what moved (`note`, which calls `wake()`), the
    tick turns them into at most one push per viewer per interval. The first notice after a quiet
    spell is acted on at once (leading edge); notices during the next `interval` wait for its end
    (trailing edge), so a burst costs two ticks, not one per notice. Without notices the tick still
    runs every `interval` (a leaderboard period rolls over with no event). Subclasses implement
    `note` and `tick`.
    """

    def __init__(self, hub: Hub, topic: str, interval: float, name: str) -> None:
        self.hub = hub
        self.topic = topic
        self.interval = interval
        self._name = name
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Something moved: tick as soon as the interval allows."""
        self._wake.set()

    @abstractmethod
    def note(self, raw: bytes) -> None:
        """A change notice arrived (called synchronously by the hub)."""

    @abstractmethod
    async def tick(self) -> bool:
        """Push what changed; True if anything was pushed (only pushes count for the spacing)."""

    async def start(self) -> None:
        await self.hub.listen(self.topic, self.note)
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        self.hub.unlisten(self.topic, self.note)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_push = float("-inf")
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval)
            # Spacing is measured from the end of the last tick that pushed: pushes stay >= interval apart.
            wait = last_push + self.interval - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self._wake.clear()
            try:
                if await self.tick():
                    last_push = loop.time()
            except Exception:
                log.exception("%s failed", self._name)


class KFactorDashboard(ChangeListener):
    def __init__(self, hub: Hub, database: Database, interval: float = 1.0) -> None:
        super().__init__(hub, CHANGES_TOPIC, interval, "k-factor-dashboard")
        self.database = database
        self._viewers: set[Viewer] = set()
        self._dirty = False

    async def changed(self) -> None:
        """Tell every node the inputs moved (cheap: one small broker message; best effort)."""
        try:
            await self.hub.publish_raw(CHANGES_TOPIC, b"1")
        except BrokerUnavailable as exc:
            log.debug("could not announce a metrics change: %s", exc)

    async def report(self, days: int) -> dict[str, Any]:
        async with self.database.session() as session:
            return await k_factor_report(session, days, datetime.now(UTC))

    def watch(self, viewer: Viewer) -> None:
        self._viewers.add(viewer)

    def unwatch(self, viewer: Viewer) -> None:
        self._viewers.discard(viewer)

    def note(self, raw: bytes) -> None:
        self._dirty = True
        self.wake()

    async def tick(self) -> bool:
        if self._dirty and self._viewers:
            self._dirty = False
            return await self.refresh() > 0
        return False

    async def refresh(self) -> int:
        """One report per distinct window in use; a push to each viewer whose numbers changed."""
        by_days: dict[int, list[Viewer]] = {}
        for viewer in list(self._viewers):
            by_days.setdefault(viewer.days, []).append(viewer)
        pushed = 0
        for days, viewers in by_days.items():
            pushed += _push_changed(viewers, await self.report(days))
        return pushed


EXPERIMENTS_TOPIC = "__experiments__"


class ExperimentsDashboard(ChangeListener):
    """`dashboard:experiments` (the list, as `GET /api/experiments`) and `dashboard:experiment:{key}`
    (results, as `GET /api/experiments/{key}/results`): recomputed for the experiments whose numbers
    or settings moved, at most once per interval, pushed to the viewers whose view changed."""

    def __init__(self, hub: Hub, database: Database, interval: float = 1.0) -> None:
        super().__init__(hub, EXPERIMENTS_TOPIC, interval, "experiments-dashboard")
        self.database = database
        self._lists: set[Viewer] = set()
        self._by_key: dict[str, set[Viewer]] = {}
        self._dirty: set[str] = set()

    async def changed(self, keys: Sequence[str]) -> None:
        try:
            await self.hub.publish_raw(EXPERIMENTS_TOPIC, orjson.dumps(list(keys)))
        except BrokerUnavailable as exc:
            log.debug("could not announce an experiments change: %s", exc)

    async def listing(self) -> dict[str, Any]:
        from . import experiments

        async with self.database.session() as session:
            return {"experiments": [experiments.to_json(e) for e in await experiments.listing(session)]}

    async def results(self, key: str) -> dict[str, Any]:
        from . import experiments

        async with self.database.session() as session:
            return await experiments.results(session, await experiments.get(session, key))

    def watch(self, viewer: Viewer, key: str | None) -> None:
        if key is None:
            self._lists.add(viewer)
        else:
            self._by_key.setdefault(key, set()).add(viewer)

    def unwatch(self, viewer: Viewer, key: str | None) -> None:
        if key is None:
            self._lists.discard(viewer)
        else:
            viewers = self._by_key.get(key)
            if viewers is not None:
                viewers.discard(viewer)
                if not viewers:
                    del self._by_key[key]

    def note(self, raw: bytes) -> None:
        with contextlib.suppress(orjson.JSONDecodeError, TypeError):
            self._dirty.update(str(k) for k in orjson.loads(raw))
            self.wake()

    async def tick(self) -> bool:
        dirty, self._dirty = self._dirty, set()
        if not dirty:
            return False
        pushed = 0
        for key in sorted(dirty & set(self._by_key)):
            pushed += _push_changed(self._by_key.get(key, ()), await self.results(key))
        if self._lists:
            pushed += _push_changed(self._lists, await self.listing())
        return pushed > 0


def _push_changed(viewers: Iterable[Viewer], view: dict[str, Any]) -> int:
    pushed = 0
    for viewer in list(viewers):
        if view != viewer.last_sent:
            viewer.last_sent = view
            viewer.push("metrics_update", view)
            pushed += 1
    return pushed


GUARDRAILS_TOPIC = "__guardrails__"


class GuardrailsDashboard(ChangeListener):
    """`dashboard:guardrails`: the guardrails report (as `GET /api/guardrails`) on join, then
    `metrics_update` when an evaluation, an alert or an unpause changed it (≤ 1 per interval)."""

    def __init__(self, hub: Hub, database: Database, config: Any, interval: float = 1.0) -> None:
        super().__init__(hub, GUARDRAILS_TOPIC, interval, "guardrails-dashboard")
        self.database = database
        self.config = config
        self.clock: Any = None  # set by the app: the loops' clock
        self._viewers: set[Viewer] = set()
        self._dirty = False

    async def changed(self) -> None:
        try:
            await self.hub.publish_raw(GUARDRAILS_TOPIC, b"1")
        except BrokerUnavailable as exc:
            log.debug("could not announce a guardrails change: %s", exc)

    async def report(self) -> dict[str, Any]:
        from .guardrails import report

        now = self.clock.now() if self.clock is not None else datetime.now(UTC)
        async with self.database.session() as session:
            return await report(session, now, self.config)

    def watch(self, viewer: Viewer) -> None:
        self._viewers.add(viewer)

    def unwatch(self, viewer: Viewer) -> None:
        self._viewers.discard(viewer)

    def note(self, raw: bytes) -> None:
        self._dirty = True
        self.wake()

    async def tick(self) -> bool:
        if not (self._dirty and self._viewers):
            return False
        self._dirty = False
        return _push_changed(self._viewers, await self.report()) > 0
