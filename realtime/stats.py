"""Plain counters the engine keeps; the web layer exports them to Prometheus.

Integers bumped on the hot path cost next to nothing; the exporter reads them at scrape time.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(slots=True)
class RealtimeStats:
    sockets_opened: int = 0
    sockets_closed: int = 0
    sockets_rejected: int = 0
    joins: int = 0
    joins_refused: int = 0
    frames_in: int = 0
    frames_out: int = 0
    # Writes to the transport on the fast path (one per socket per event-loop tick with frames pending,
    # plus replies written at once): frames_out / writes is the batching a fan-out got.
    writes: int = 0
    broadcasts: int = 0
    malformed_frames: int = 0
    oversized_frames: int = 0
    rate_limited: int = 0
    slow_consumers_dropped: int = 0
    idle_timeouts: int = 0
    # Closes the client never finished (no echo, or not reading): the connection was aborted.
    close_timeouts: int = 0
    channel_crashes: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
