"""Presence per topic, multi-node, with aggregate counts (built on `realtime`).

`PresenceTracker` keeps who is where, replicates it between nodes over the broker and pushes
Phoenix-compatible `presence_state`/`presence_diff` and throttled `presence_counts`.
"""

from .state import Entry, PresenceState
from .tracker import SYNC_TOPIC, PresenceConfig, PresenceTracker

__all__ = ["SYNC_TOPIC", "Entry", "PresenceConfig", "PresenceState", "PresenceTracker"]
