"""What the product's channels need from the running app, handed to every socket."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from metrics import EventIngest
from metrics.live import ExperimentsDashboard, GuardrailsDashboard, KFactorDashboard
from presence import PresenceTracker
from realtime import Channel
from store import Database
from store.privacy import PrivacyRules

if TYPE_CHECKING:
    from loops import LoopEngine

    from .leaderboard import Leaderboards
    from .leaderboard_channel import BoardWatcher
    from .privacy import PrivacyNotices


@dataclass(frozen=True)
class ChannelContext:
    presence: PresenceTracker
    database: Database
    ingest: EventIngest
    leaderboards: Leaderboards
    board_watcher: BoardWatcher
    k_factor: KFactorDashboard
    experiments: ExperimentsDashboard
    guardrails: GuardrailsDashboard
    loops: LoopEngine
    # Privacy states from the store and the one rule showing a user to a viewer; changes announced.
    privacy: PrivacyRules
    notices: PrivacyNotices


class ProductChannel(Channel):
    """A channel of this product: `services` is the app's ChannelContext, typed."""

    __slots__ = ()

    @property
    def services(self) -> ChannelContext:
        context: ChannelContext = self.socket.context
        return context
