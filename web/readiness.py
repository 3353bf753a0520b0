"""Whether this process can reach its broker and its database, checked in the background.

`/readyz` asks both live; this monitor keeps the answer over time for `/metrics`: an up gauge per
dependency and a count of outages (up → down transitions), so a scrape shows an outage that began
and ended between two scrapes, and how often the connection was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class Dependency:
    name: str
    ping: Callable[[], Awaitable[bool]]
    up: bool = True
    outages: int = 0
    down_seconds: float = 0.0  # total time seen down, completed outages and the current one
    _down_since: float | None = None

    def record(self, ok: bool, now: float) -> None:
        if ok and self._down_since is not None:
            self.down_seconds += now - self._down_since
            log.warning("%s reachable again after %.1fs", self.name, now - self._down_since)
            self._down_since = None
        elif not ok and self._down_since is None:
            self.outages += 1
            self._down_since = now
            log.warning("%s unreachable", self.name)
        self.up = ok

    def total_down_seconds(self, now: float) -> float:
        current = now - self._down_since if self._down_since is not None else 0.0
        return self.down_seconds + current


class ReadinessMonitor:
    def __init__(self, dependencies: list[Dependency], every: float = 1.0) -> None:
        self.dependencies = dependencies
        self.every = every
        self._task: asyncio.Task[None] | None = None

    async def check(self) -> None:
        results = await asyncio.gather(*(d.ping() for d in self.dependencies), return_exceptions=True)
        now = time.monotonic()
        for dependency, result in zip(self.dependencies, results, strict=True):
            dependency.record(result is True, now)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="readiness-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:
                log.exception("readiness check failed")
            await asyncio.sleep(self.every)
