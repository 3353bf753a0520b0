"""Prometheus exposition of the engine's counters, read at scrape time (no work on the hot path)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import fields

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from realtime import PhoenixEndpoint

from .readiness import ReadinessMonitor

_COUNTERS = {
    "sockets_opened": "WebSocket connections accepted",
    "sockets_closed": "WebSocket connections ended",
    "sockets_rejected": "WebSocket upgrades refused (bad token, unsupported vsn)",
    "joins": "channel joins accepted",
    "joins_refused": "channel joins refused",
    "frames_in": "frames received from clients",
    "frames_out": "frames sent to clients",
    "writes": "socket writes (system calls) that carried them, on the fast path: frames_out / writes is "
    "how many frames each write batched",
    "broadcasts": "broadcasts published from this process",
    "malformed_frames": "frames refused as not Phoenix V2 JSON",
    "oversized_frames": "frames refused as larger than the limit",
    "rate_limited": "client messages refused by the inbound rate limit",
    "slow_consumers_dropped": "sockets disconnected because they could not keep up",
    "idle_timeouts": "sockets closed for not sending heartbeats",
    "close_timeouts": "closing sockets aborted after 5 s without finishing the close (not reading)",
    "channel_crashes": "channel handlers that raised",
}

# The per-socket limits (realtime.SocketLimits, set by the WS_* variables), one gauge each, so that a
# dashboard can put the refusal counters above next to the limits that caused them.
_LIMITS_HELP = (
    "per-socket limit in force, by name: max_frame_bytes (bytes, WS_MAX_FRAME_BYTES), max_topics "
    "(WS_MAX_TOPICS), rate_per_second and rate_burst (client messages, WS_RATE_PER_SECOND, "
    "WS_RATE_BURST), rate_strikes_before_close (strikes before close 1008; a refusal adds one, an "
    "accepted message takes one back), "
    "outbound_max_bytes (WS_OUTBOUND_MAX_BYTES), outbound_max_messages (WS_OUTBOUND_MAX_MESSAGES), "
    "idle_timeout (seconds, WS_IDLE_TIMEOUT); and max_sockets, this process's cap on sockets "
    "(WS_MAX_SOCKETS, or derived from the open-files limit)"
)


class RealtimeCollector(Collector):
    def __init__(self, endpoint: PhoenixEndpoint) -> None:
        self.endpoint = endpoint

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        ep = self.endpoint
        # Which process answered: with `serve --workers N` each scrape reaches one of them.
        info = GaugeMetricFamily("viral_process_info", "this process (pid), always 1", labels=["pid"])
        info.add_metric([str(os.getpid())], 1)
        yield info
        # Every counter the engine keeps, described or not: a new one is never silently missing.
        for name, value in ep.stats.as_dict().items():
            family = CounterMetricFamily(f"viral_realtime_{name}", _COUNTERS.get(name, f"realtime {name}"))
            family.add_metric([], value)
            yield family
        limits = GaugeMetricFamily("viral_ws_limit", _LIMITS_HELP, labels=["name"])
        for limit in fields(ep.limits):
            value = getattr(ep.limits, limit.name)
            if limit.name == "max_sockets":  # 0 configured means derived from the open-files limit
                value = getattr(ep, "max_sockets", value)
            if isinstance(value, int | float) and not isinstance(value, bool):
                limits.add_metric([limit.name], float(value))
        yield limits
        yield GaugeMetricFamily("viral_realtime_sockets", "open WebSocket connections", value=len(ep.sockets))
        yield GaugeMetricFamily(
            "viral_realtime_topics", "topics with at least one local subscriber", value=ep.hub.topics()
        )
        yield GaugeMetricFamily(
            "viral_broker_lag_seconds",
            "round trip of the latest broker lag probe (publish → own subscription)",
            value=ep.hub.broker.lag_seconds(),
        )


class ReadinessCollector(Collector):
    """Broker and database reachability as the background monitor last saw it (checked every second)."""

    def __init__(self, monitor: ReadinessMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        now = time.monotonic()
        for dep in self.monitor.dependencies:
            yield GaugeMetricFamily(
                f"viral_{dep.name}_up", f"1 when the {dep.name} answered the latest check", value=int(dep.up)
            )
            outages = CounterMetricFamily(
                f"viral_{dep.name}_outages", f"times the {dep.name} went from reachable to unreachable"
            )
            outages.add_metric([], dep.outages)
            yield outages
            down = CounterMetricFamily(
                f"viral_{dep.name}_down_seconds", f"seconds the {dep.name} was seen unreachable, in total"
            )
            down.add_metric([], dep.total_down_seconds(now))
            yield down


def build_registry(endpoint: PhoenixEndpoint, readiness: ReadinessMonitor | None = None) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(RealtimeCollector(endpoint))
    if readiness is not None:
        registry.register(ReadinessCollector(readiness))
    # process_resident_memory_bytes, CPU seconds, open fds: what load testers divide by sockets.
    ProcessCollector(registry=registry)
    return registry
