"""`dashboard:k_factor` (admin only): the K-factor report on join, then live `metrics_update` pushes."""

from __future__ import annotations

from typing import Any

from metrics.growth import PERIODS
from realtime import JoinError

from .access import is_admin
from .context import ProductChannel


class KFactorChannel(ProductChannel):
    __slots__ = ("days", "last_sent")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.days = 7
        self.last_sent: dict[str, Any] | None = None

    async def join(self, params: dict[str, Any]) -> dict[str, Any]:
        if not is_admin(self.claims):
            raise JoinError("unauthorized")
        days = params.get("days", 7)
        if days not in PERIODS:
            raise JoinError(f"days must be one of {list(PERIODS)}")
        self.days = days
        report = await self.services.k_factor.report(days)
        self.last_sent = report
        self.services.k_factor.watch(self)
        return report

    async def terminate(self, reason: str) -> None:
        self.services.k_factor.unwatch(self)
