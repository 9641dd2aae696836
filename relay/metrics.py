"""Every metric the relay exports (DESIGN §6: names are exact, label sets closed).

Label values come only from closed sets: gRPC method and status names, kinds, platforms,
outcomes, and configured app names. Nothing a request carries ever becomes a label. Each
server owns its registry, so several servers in one process (tests, the demo) never mix counts.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.process_collector import ProcessCollector

from adapters.base import Verdict
from relay import __version__
from relay.model import Kind

# `_created` series double every counter's cardinality for no dashboard's benefit.
disable_created_metrics()  # type: ignore[no-untyped-call]

METHODS = ("Send", "SendStream")
# Push latencies run from about a millisecond (loopback) to the 10 s default deadline.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def kind_label(kind: Kind) -> str:
    return kind.name.lower()


class Metrics:
    """The relay's metrics in their own registry, series pre-created at start."""

    def __init__(self, platforms: Iterable[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.platforms = tuple(sorted(set(platforms)))
        r = self.registry
        self.requests = Counter(
            "pushrelay_requests",
            "gRPC calls by method and status code.",
            ["method", "code"],
            registry=r,
        )
        self.notifications = Counter(
            "pushrelay_notifications",
            "Pushes by kind, platform and outcome.",
            ["kind", "platform", "outcome"],
            registry=r,
        )
        self.request_duration = Histogram(
            "pushrelay_request_duration_seconds",
            "Time to answer a request.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.provider_duration = Histogram(
            "pushrelay_provider_request_duration_seconds",
            "Time of one provider request.",
            ["platform"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.provider_retries = Counter(
            "pushrelay_provider_retries",
            "Provider requests sent again after a retryable failure.",
            ["platform"],
            registry=r,
        )
        self.inflight = Gauge(
            "pushrelay_inflight_notifications", "Pushes being delivered now.", registry=r
        )
        self.build_info = Gauge(
            "pushrelay_build_info", "The running version.", ["version"], registry=r
        )
        ProcessCollector(registry=r)
        self._precreate()

    def _precreate(self) -> None:
        self.build_info.labels(version=__version__).set(1)
        for method in METHODS:
            self.request_duration.labels(method=method)
            for code in grpc.StatusCode:
                self.requests.labels(method=method, code=code.name)
        for platform in self.platforms:
            self.provider_duration.labels(platform=platform)
            self.provider_retries.labels(platform=platform)
            for kind in Kind:
                for verdict in Verdict:
                    self.notifications.labels(
                        kind=kind_label(kind), platform=platform, outcome=verdict.name
                    )

    def exposition(self) -> bytes:
        """The text format of every series, for /metrics."""
        return generate_latest(self.registry)
