"""What the product's channels need from the running app, handed to every socket."""

from __future__ import annotations

from dataclasses import dataclass

from presence import PresenceTracker


@dataclass(frozen=True)
class ChannelContext:
    presence: PresenceTracker
    # Keys the per-topic pseudonyms of minors in presence lists (stable, not reversible by clients).
    pseudonym_key: bytes
