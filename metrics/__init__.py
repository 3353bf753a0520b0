"""Event ingest, attribution and signed links, K-factor and growth analytics, experiments, guardrails."""

from .consumers import Consumer, ConsumerRunner
from .events import EVENT_TYPES, EventIn, EventRejected, validate_event
from .ingest import Accepted, EventIngest, IngestUnavailable
from .stream import EventStream, MemoryEventStream, RedisEventStream, StreamUnavailable, stream_from_url

__all__ = [
    "EVENT_TYPES",
    "Accepted",
    "Consumer",
    "ConsumerRunner",
    "EventIn",
    "EventIngest",
    "EventRejected",
    "EventStream",
    "IngestUnavailable",
    "MemoryEventStream",
    "RedisEventStream",
    "StreamUnavailable",
    "stream_from_url",
    "validate_event",
]
