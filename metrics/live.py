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
from datetime import UTC, datetime
from typing import Any, Protocol

from realtime import BrokerUnavailable, Hub
from store import Database

from .growth import k_factor_report

log = logging.getLogger(__name__)

CHANGES_TOPIC = "__metrics__"


class Viewer(Protocol):
    days: int
    last_sent: dict[str, Any] | None

    def push(self, event: str, payload: Any) -> None: ...


class KFactorDashboard:
    def __init__(self, hub: Hub, database: Database, interval: float = 1.0) -> None:
        self.hub = hub
        self.database = database
        self.interval = interval
        self._viewers: set[Viewer] = set()
        self._dirty = False
        self._task: asyncio.Task[None] | None = None

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

    async def start(self) -> None:
        await self.hub.listen(CHANGES_TOPIC, self._on_change)
        self._task = asyncio.create_task(self._run(), name="k-factor-dashboard")

    async def stop(self) -> None:
        self.hub.unlisten(CHANGES_TOPIC, self._on_change)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _on_change(self, raw: bytes) -> None:
        self._dirty = True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self._dirty or not self._viewers:
                continue
            self._dirty = False
            try:
                await self.refresh()
            except Exception:
                log.exception("k-factor dashboard refresh failed")

    async def refresh(self) -> int:
        """One report per distinct window in use; a push to each viewer whose numbers changed."""
        pushed = 0
        reports: dict[int, dict[str, Any]] = {}
        for viewer in list(self._viewers):
            if viewer.days not in reports:
                reports[viewer.days] = await self.report(viewer.days)
            report = reports[viewer.days]
            if report != viewer.last_sent:
                viewer.last_sent = report
                viewer.push("metrics_update", report)
                pushed += 1
        return pushed
