"""Admin dashboards' channels: `dashboard:k_factor`, `dashboard:experiments`, `dashboard:experiment:{key}`."""

from __future__ import annotations

from typing import Any

from metrics.experiments import ExperimentError
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


class ExperimentsChannel(ProductChannel):
    """`dashboard:experiments` (the list) and `dashboard:experiment:{key}` (one experiment's results), admin
    only: the current view in the join reply, then `metrics_update` whenever it changes (≤ 1/s)."""

    __slots__ = ("key", "last_sent")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.key: str | None = None
        self.last_sent: dict[str, Any] | None = None

    async def join(self, params: dict[str, Any]) -> dict[str, Any]:
        if not is_admin(self.claims):
            raise JoinError("unauthorized")
        dashboard = self.services.experiments
        if self.topic == "dashboard:experiments":
            view = await dashboard.listing()
        else:
            self.key = self.topic.removeprefix("dashboard:experiment:")
            try:
                view = await dashboard.results(self.key)
            except ExperimentError as exc:
                raise JoinError(str(exc)) from None
        self.last_sent = view
        dashboard.watch(self, self.key)
        return view

    async def terminate(self, reason: str) -> None:
        self.services.experiments.unwatch(self, self.key)


class GuardrailsChannel(ProductChannel):
    """`dashboard:guardrails` (admin only): the guardrails report on join, then `metrics_update`."""

    __slots__ = ("last_sent",)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.last_sent: dict[str, Any] | None = None

    async def join(self, params: dict[str, Any]) -> dict[str, Any]:
        if not is_admin(self.claims):
            raise JoinError("unauthorized")
        view = await self.services.guardrails.report()
        self.last_sent = view
        self.services.guardrails.watch(self)
        return view

    async def terminate(self, reason: str) -> None:
        self.services.guardrails.unwatch(self)
