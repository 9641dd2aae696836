"""The gRPC server: PushRelay, standard health and reflection, TLS, start and graceful stop.

``serve(config, stop=event)`` runs until ``stop`` is set; only the CLI installs signal handlers,
so tests and embedding programs stop the server by setting the event.

Callers are authenticated and limited by ``relay/interceptors.py``. With ``server.health_listen``
a second, plaintext gRPC listener serves only ``grpc.health.v1.Health`` (the same servicer, so
the same statuses): Kubernetes' native gRPC probes speak no TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import os
import ssl
import time
from collections.abc import Callable, Mapping

from grpc_health.v1 import health_pb2

from adapters import ADAPTERS
from relay.auth import Authenticator
from relay.config import Config, ConfigError
from relay.dispatch import AppRuntime, GuardRegistry
from relay.http import OpsHttpServer
from relay.ingress import HEALTH, REFLECTION, Health, Listener, Reflection, server_tls
from relay.interceptors import SERVICE_NAME, RelayInterceptor
from relay.limits import Clock, InflightGate, RateLimiter
from relay.logs import use_fingerprint_key
from relay.metrics import Metrics
from relay.render import GroupingKeys
from relay.service import RelayService, Snapshot

log = logging.getLogger("relay.server")

# gRPC itself refuses a message over this with RESOURCE_EXHAUSTED before any handler runs;
# below it, the service checks limits.max_request_bytes and answers INVALID_ARGUMENT, counted.
MAX_MESSAGE_BYTES = 4 << 20


async def start_apps(
    config: Config, metrics: Metrics, guards: GuardRegistry | None = None
) -> dict[str, AppRuntime]:
    """Build every app's adapter inside the running loop; on any failure close those built."""
    guards = guards or GuardRegistry(metrics)
    runtimes: dict[str, AppRuntime] = {}
    try:
        for app in config.apps.values():
            adapter = await ADAPTERS[app.platform].create(app.settings)
            runtimes[app.id] = AppRuntime(app, adapter, metrics, guards.for_app(app))
    except BaseException:
        await close_apps(runtimes)
        raise
    return runtimes


async def close_apps(runtimes: Mapping[str, AppRuntime]) -> None:
    await asyncio.gather(*(rt.adapter.aclose() for rt in runtimes.values()))


def grouping_keys(secret: bytes) -> GroupingKeys:
    """The grouping keys derived from ``secret`` (``server.hmac_key_file``, or the process's)."""
    return GroupingKeys(hmac.new(secret, b"push-relay grouping", hashlib.sha256).digest())


def _warn_without_hmac_key(config: Config) -> None:
    # A configured secret keeps grouping keys identical across replicas and restarts; without
    # one each process draws its own, and a conversation's pushes group per replica only.
    if not config.server.hmac_key:
        log.warning("server.hmac_key_file not set: grouping keys are random per process")


class RelayServer:
    """One running relay: ``await start()``, then ``port``, then ``await stop()``.

    ``clock`` drives the clients' rate limits and the apps' circuit breakers (tests pass a fake
    one).
    """

    def __init__(self, config: Config, *, clock: Clock = time.monotonic) -> None:
        self.config = config
        self.metrics = Metrics(app.platform for app in config.apps.values())
        self.metrics.track_credential_expiry(config.apps.values())
        self.metrics.precreate_apps(config.apps)
        self.health = Health()
        self.port = 0
        self.health_port = 0  # of the plaintext health listener, when configured
        self.draining = False
        self.ops = OpsHttpServer(self.metrics.exposition, self.ready)
        self._clock = clock
        # Drawn once, so that without a configured key the grouping keys still hold steady
        # across reloads for the life of the process.
        self._process_secret = os.urandom(32)
        self._gate = InflightGate()
        self._guards = GuardRegistry(self.metrics, clock)  # circuits survive reloads
        self._snapshot: Snapshot | None = None
        self.metrics.track_inflight_requests(lambda: self._gate.count, self._inflight_limit)
        self._server: Listener | None = None
        self._health_server: Listener | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def http_port(self) -> int:
        return self.ops.port

    def ready(self) -> bool:
        """Every app's adapter can take sends and the server is not draining."""
        return (
            not self.draining
            and self._snapshot is not None
            and all(rt.adapter.ready for rt in self._snapshot.apps.values())
        )

    def current(self) -> Snapshot:
        assert self._snapshot is not None, "requests are served only after start()"
        return self._snapshot

    async def start(self) -> None:
        use_fingerprint_key(self.config.server.hmac_key)
        _warn_about_callers(self.config)
        _warn_without_hmac_key(self.config)
        runtimes = await start_apps(self.config, self.metrics, self._guards)
        self._snapshot = self._new_snapshot(self.config, runtimes)
        service = RelayService(self.current, lambda: self.draining)
        relay = RelayInterceptor(self.current, self._ceiling())
        reflection = Reflection((SERVICE_NAME, HEALTH, REFLECTION))
        server = Listener(
            [relay.guard(service), self.health, reflection],
            idle=relay.idle,
            cap=self._inflight_limit,
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = await server.start(self.config.server.listen, self._tls())
        self._server = server
        await self._start_health_listener()
        await self.ops.start(self.config.server.http_listen)
        await self._set_health(self._readiness())
        log.info(
            "serving",
            extra={
                "port": self.port,
                "http_port": self.http_port,
                "health_port": self.health_port,
                "apps": len(runtimes),
                "clients": len(self.config.clients),
            },
        )

    def _inflight_limit(self) -> int:
        limits = self._snapshot.limits if self._snapshot is not None else self.config.limits
        return limits.max_inflight_requests

    def _new_snapshot(self, config: Config, runtimes: Mapping[str, AppRuntime]) -> Snapshot:
        old = self._snapshot
        return Snapshot(
            apps=runtimes,
            limits=config.limits,
            grouping=grouping_keys(config.server.hmac_key or self._process_secret),
            metrics=self.metrics,
            auth=Authenticator(config.clients),
            rates=RateLimiter(config.clients, self._clock, old.rates if old else None),
            gate=self._gate,
        )

    async def _start_health_listener(self) -> None:
        address = self.config.server.health_listen
        if not address:
            return
        server = Listener([self.health])
        self.health_port = await server.start(address)
        self._health_server = server

    async def reload(self, config: Config) -> None:
        """Swap in ``config``'s apps atomically; calls in flight finish on the old adapters.

        ``config`` must already be validated (``load_config``). New adapters are built first:
        if that fails, the old ones keep serving and the error propagates. Clients (tokens,
        subjects, apps, rates) and limits are swapped with the apps. Listener settings
        (addresses, TLS) need a restart; a change to them is logged and not applied.
        """
        _warn_restart_needed(self.config, config)
        _warn_about_callers(config)
        _warn_without_hmac_key(config)
        runtimes = await start_apps(config, self.metrics, self._guards)
        self.metrics.track_credential_expiry(config.apps.values())
        self.metrics.precreate_apps(config.apps)
        old = self._snapshot
        self._snapshot = self._new_snapshot(config, runtimes)
        self.config = dataclasses.replace(config, server=self.config.server)
        if old is not None:
            task = asyncio.create_task(self._retire(old))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        log.info("reloaded", extra={"apps": len(runtimes)})

    async def _retire(self, old: Snapshot) -> None:
        # Requests hold the snapshot they started on; once none does, its adapters can go.
        grace = (
            self.config.server.shutdown_grace_seconds + self.config.limits.default_deadline_seconds
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(old.usage.wait_idle(), grace)
        await close_apps(old.apps)

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let calls in flight finish within ``grace``, close providers."""
        self.draining = True
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            grace = self.config.server.shutdown_grace_seconds if grace is None else grace
            await self._server.stop(grace)
            self._server = None
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        if self._snapshot is not None:
            await close_apps(self._snapshot.apps)
            self._snapshot = None
        if self._health_server is not None:
            await self._health_server.stop(0)
            self._health_server = None
        await self.ops.stop()

    def _ceiling(self) -> int:
        return max(MAX_MESSAGE_BYTES, self.config.limits.max_request_bytes)

    def _tls(self) -> ssl.SSLContext | None:
        tls = self.config.server.tls
        return None if tls is None else server_tls(tls.cert_pem, tls.key_pem, tls.client_ca_pem)

    def _readiness(self) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
        serving = health_pb2.HealthCheckResponse
        return serving.SERVING if self.ready() else serving.NOT_SERVING

    async def _set_health(
        self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
    ) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)


def _warn_restart_needed(old: Config, new: Config) -> None:
    for key in ("listen", "http_listen", "health_listen", "tls"):
        if getattr(old.server, key) != getattr(new.server, key):
            log.warning("config change needs a restart", extra={"key": f"server.{key}"})


def _warn_about_callers(config: Config) -> None:
    if not config.clients:
        log.warning("no clients configured: the API is open to anyone who can reach it")
    elif config.server.tls is None:
        log.warning("clients configured without server.tls: bearer tokens travel in plaintext")


async def serve(
    config: Config,
    *,
    stop: asyncio.Event,
    reload: asyncio.Event | None = None,
    load: Callable[[], Config] | None = None,
    on_ready: Callable[[RelayServer], None] | None = None,
) -> None:
    """Run a relay until ``stop`` is set, then shut it down gracefully.

    Each time ``reload`` is set, ``load()`` is called for a new config (it raises
    ``ConfigError`` on an invalid one) and swapped in; a failed reload keeps the old config.
    """
    server = RelayServer(config)
    await server.start()
    try:
        if on_ready is not None:
            on_ready(server)
        while await _next_signal(stop, reload) == "reload":
            assert reload is not None and load is not None
            reload.clear()
            await _reload(server, load)
        log.info("stopping", extra={"grace_seconds": config.server.shutdown_grace_seconds})
    finally:
        await server.stop()


async def _next_signal(stop: asyncio.Event, reload: asyncio.Event | None) -> str:
    waits = {asyncio.ensure_future(stop.wait()): "stop"}
    if reload is not None:
        waits[asyncio.ensure_future(reload.wait())] = "reload"
    done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return "stop" if stop.is_set() else waits[done.pop()]


async def _reload(server: RelayServer, load: Callable[[], Config]) -> None:
    try:
        config = load()
        await server.reload(config)
    except ConfigError as error:
        log.error("reload refused: invalid config", extra={"problems": error.problems})
    except Exception as error:  # adapters failed to start: the old ones keep serving
        log.error("reload refused: apps failed to start", extra={"error": str(error)})
