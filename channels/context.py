"""What the product's channels need from the running app, handed to every socket."""

from __future__ import annotations

from dataclasses import dataclass

from metrics import EventIngest
from presence import PresenceTracker
from store import Database


@dataclass(frozen=True)
class ChannelContext:
    presence: PresenceTracker
    database: Database
    ingest: EventIngest
    # Keys the per-topic pseudonyms of minors in presence lists (stable, not reversible by clients).
    pseudonym_key: bytes
