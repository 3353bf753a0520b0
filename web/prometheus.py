"""Prometheus exposition of the engine's counters, read at scrape time (no work on the hot path)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from realtime import PhoenixEndpoint

_COUNTERS = {
    "sockets_opened": "WebSocket connections accepted",
    "sockets_closed": "WebSocket connections ended",
    "sockets_rejected": "WebSocket upgrades refused (bad token, unsupported vsn)",
    "joins": "channel joins accepted",
    "joins_refused": "channel joins refused",
    "frames_in": "frames received from clients",
    "frames_out": "frames sent to clients",
    "broadcasts": "broadcasts published from this process",
    "malformed_frames": "frames refused as not Phoenix V2 JSON",
    "oversized_frames": "frames refused as larger than the limit",
    "rate_limited": "client messages refused by the inbound rate limit",
    "slow_consumers_dropped": "sockets disconnected because they could not keep up",
    "idle_timeouts": "sockets closed for not sending heartbeats",
    "channel_crashes": "channel handlers that raised",
}


class RealtimeCollector(Collector):
    def __init__(self, endpoint: PhoenixEndpoint) -> None:
        self.endpoint = endpoint

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        ep = self.endpoint
        values = ep.stats.as_dict()
        for name, help_text in _COUNTERS.items():
            family = CounterMetricFamily(f"viral_realtime_{name}", help_text)
            family.add_metric([], values[name])
            yield family
        yield GaugeMetricFamily("viral_realtime_sockets", "open WebSocket connections", value=len(ep.sockets))
        yield GaugeMetricFamily(
            "viral_realtime_topics", "topics with at least one local subscriber", value=ep.hub.topics()
        )
        yield GaugeMetricFamily(
            "viral_broker_lag_seconds",
            "round trip of the latest broker lag probe (publish → own subscription)",
            value=ep.hub.broker.lag_seconds(),
        )


def build_registry(endpoint: PhoenixEndpoint) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(RealtimeCollector(endpoint))
    # process_resident_memory_bytes, CPU seconds, open fds: what load testers divide by sockets.
    ProcessCollector(registry=registry)
    return registry
