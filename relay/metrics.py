"""Every metric the relay exports (DESIGN §6: names are exact, label sets closed).

Label values come only from closed sets: gRPC method and status names, kinds, platforms,
outcomes, and configured app names. Nothing a request carries ever becomes a label. Each
server owns its registry, so several servers in one process (tests, the demo) never mix counts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from cryptography import x509
from grpclib.const import Status
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.process_collector import ProcessCollector

from adapters.apns import ApnsSettings
from adapters.base import Verdict
from relay import __version__
from relay.breaker import State
from relay.config import AppConfig
from relay.model import Kind

log = logging.getLogger("relay.metrics")

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
        self.circuit_state = Gauge(
            "pushrelay_circuit_state",
            "An app's circuit breaker: 0 closed, 1 open, 2 half-open.",
            ["app"],
            registry=r,
        )
        self.circuit_transitions = Counter(
            "pushrelay_circuit_transitions",
            "Circuit breaker transitions, by app and the state entered.",
            ["app", "state"],
            registry=r,
        )
        self.app_notifications = Counter(
            "pushrelay_app_notifications",
            "Pushes by configured app and outcome (the per-app view of notifications_total).",
            ["app", "outcome"],
            registry=r,
        )
        self.inflight = Gauge(
            "pushrelay_inflight_notifications", "Pushes being delivered now.", registry=r
        )
        self.build_info = Gauge(
            "pushrelay_build_info", "The running version.", ["version"], registry=r
        )
        self.credential_expiry = Gauge(
            "pushrelay_credential_expiry_timestamp_seconds",
            "When an app's APNs client certificate expires (notAfter), in Unix seconds.",
            ["app"],
            registry=r,
        )
        self.inflight_requests = Gauge(
            "pushrelay_inflight_requests",
            "Requests (Send calls and SendStream requests) being served now.",
            registry=r,
        )
        self.inflight_requests_limit = Gauge(
            "pushrelay_inflight_requests_limit",
            "limits.max_inflight_requests: the cap pushrelay_inflight_requests is held to.",
            registry=r,
        )
        ProcessCollector(registry=r)
        self._push_children: dict[tuple[Kind, str, str, Verdict], tuple[Counter, Counter]] = {}
        self._request_children: dict[tuple[str, Status], tuple[Counter, Histogram]] = {}
        self._precreate()

    def observe_request(self, method: str, code: Status, seconds: float) -> None:
        """Count one finished call with its final code and time it; children looked up once."""
        key = (method, code)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(method=method, code=code.name),
                self.request_duration.labels(method=method),
            )
        children[0].inc()
        children[1].observe(seconds)

    def count_push(self, kind: Kind, platform: str, app: str, verdict: Verdict) -> None:
        """Count one push's outcome in both views; label children are looked up once each."""
        key = (kind, platform, app, verdict)
        children = self._push_children.get(key)
        if children is None:
            children = self._push_children[key] = (
                self.notifications.labels(
                    kind=kind_label(kind), platform=platform, outcome=verdict.name
                ),
                self.app_notifications.labels(app=app, outcome=verdict.name),
            )
        for child in children:
            child.inc()

    def precreate_apps(self, apps: Iterable[str]) -> None:
        """Series for every configured app and outcome, so dashboards see zeros, not gaps."""
        for app in apps:
            for verdict in Verdict:
                self.app_notifications.labels(app=app, outcome=verdict.name)
            self.circuit_state.labels(app=app)
            for state in State:
                self.circuit_transitions.labels(app=app, state=state.name.lower())

    def track_inflight_requests(self, count: Callable[[], int], limit: Callable[[], int]) -> None:
        """Read the in-flight count and its cap when scraped (the cap changes on reload)."""
        self.inflight_requests.set_function(count)
        self.inflight_requests_limit.set_function(limit)

    def track_credential_expiry(self, apps: Iterable[AppConfig]) -> None:
        """Export the notAfter of every APNs app using certificate auth; idempotent.

        Read once at start-up, as the adapter reads the certificate: an operator alerts on
        ``pushrelay_credential_expiry_timestamp_seconds - time() < 14 * 86400``. Token-auth keys
        (.p8) do not expire, so only certificate apps get a series.
        """
        for app in apps:
            settings = app.settings
            if not (isinstance(settings, ApnsSettings) and settings.cert_file):
                continue
            expiry = certificate_expiry(settings.cert_file)
            if expiry is None:
                log.warning("cannot read the certificate's expiry", extra={"app": app.id})
                continue
            self.credential_expiry.labels(app=app.id).set(expiry)

    def _precreate(self) -> None:
        self.build_info.labels(version=__version__).set(1)
        for method in METHODS:
            self.request_duration.labels(method=method)
            for code in Status:
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


def certificate_expiry(path: str) -> float | None:
    """The notAfter of the leaf (first) certificate in a PEM file, in Unix seconds.

    The file may hold the private key before the certificate (``openssl pkcs12`` output varies).
    """
    try:
        leaf = x509.load_pem_x509_certificates(Path(path).read_bytes())[0]
    except (OSError, ValueError):
        return None
    return leaf.not_valid_after_utc.timestamp()
