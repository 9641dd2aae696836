"""The fault suite: the real relay, served over gRPC, against the bundled fakes misbehaving.

Each test runs once per platform through a :class:`Target`: the fake, an app config for it, and
how to make a device and a fault in that platform's terms.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from pushrelay.v1 import relay_pb2 as pb
from relay.breaker import CircuitPolicy
from relay.config import AppConfig, Limits
from relay.server import RelayServer
from relay.testing.configs import apns_app, fcm_app, local_config, webpush_app
from relay.testing.credentials import ApnsKey
from relay.testing.fake_apns import FakeAPNs
from relay.testing.fake_fcm import FakeFCM
from relay.testing.fake_webpush import FakeWebPush
from relay.testing.tls import TestPKI
from tests.support import apns_token

# Tight enough to see in a test, loose enough never to trip on a healthy provider.
CIRCUIT = CircuitPolicy(
    failure_rate=0.5, window_seconds=10, min_requests=20, cooldown_seconds=0.5, probes=3
)


@dataclass
class Target:
    """One platform's fake and app, and how to fail it."""

    platform: str
    fake: Any
    app: AppConfig
    device: Callable[[], pb.Device]
    fail: Callable[[int, int, int | None], None]  # (status, count, retry_after)

    @property
    def provider_requests(self) -> int:
        return len(self.fake.received)

    def with_endpoint(self, url: str, *, trusted: bool = True) -> Target:
        """The same app pointed at another https://host:port (Web Push: its devices)."""
        settings = self.app.settings
        changes: dict[str, Any] = {} if trusted else {"ca_pem": b""}
        device = self.device
        if self.platform == "webpush":
            base = self.device

            def device() -> pb.Device:
                d = base()
                return pb.Device(app_id=d.app_id, token=url + "/push/x", keys=d.keys)
        else:
            changes["endpoint"] = url
        app = dataclasses.replace(self.app, settings=dataclasses.replace(settings, **changes))
        return dataclasses.replace(self, app=app, device=device)


def apns_target(fake: FakeAPNs, key: ApnsKey) -> Target:
    def fail(status: int, count: int, retry_after: int | None) -> None:
        reason = {429: "TooManyRequests", 500: "InternalServerError"}.get(
            status, "ServiceUnavailable"
        )
        fake.inject(status, reason, count=count, retry_after=retry_after)

    return Target(
        "apns",
        fake,
        apns_app(fake, key),
        lambda: pb.Device(app_id="chat-ios", token=apns_token()),
        fail,
    )


def _fcm(fake: FakeFCM) -> Target:
    def fail(status: int, count: int, retry_after: int | None) -> None:
        code = {429: "QUOTA_EXCEEDED", 500: "INTERNAL"}.get(status, "UNAVAILABLE")
        fake.inject(status, code, count, retry_after)

    token = "fcm-token-" + "x" * 140
    return Target(
        "fcm",
        fake,
        fcm_app(fake, fake.service_account()),
        lambda: pb.Device(app_id="chat-android", token=token),
        fail,
    )


def _webpush(fake: FakeWebPush) -> Target:
    def device() -> pb.Device:
        sub = fake.subscribe()
        keys = pb.DeviceKeys(p256dh=sub.keys.p256dh, auth=sub.keys.auth)
        return pb.Device(app_id="chat-web", token=sub.endpoint, keys=keys)

    def fail(status: int, count: int, retry_after: int | None) -> None:
        fake.inject(status, count, retry_after)

    return Target("webpush", fake, webpush_app(fake), device, fail)


@pytest.fixture(params=["apns", "fcm", "webpush"])
async def target(
    request: pytest.FixtureRequest, pki: TestPKI, apns_key: ApnsKey
) -> AsyncIterator[Target]:
    if request.param == "apns":
        async with FakeAPNs(pki=pki, keys=[apns_key]) as apns:
            yield apns_target(apns, apns_key)
    elif request.param == "fcm":
        async with FakeFCM(pki=pki) as fcm:
            yield _fcm(fcm)
    else:
        async with FakeWebPush(pki=pki) as wp:
            yield _webpush(wp)


Relay = Callable[..., Awaitable[RelayServer]]


@pytest.fixture
def relay_for(start_relay) -> Relay:  # type: ignore[no-untyped-def]
    async def start(target: Target, circuit: CircuitPolicy = CIRCUIT, **app: Any) -> RelayServer:
        config_app = dataclasses.replace(target.app, circuit=circuit, **app)
        limits = Limits(default_deadline_seconds=5)
        server: RelayServer = await start_relay(local_config([config_app], limits=limits))
        return server

    return start


def one(target: Target, request_id: str = "fault") -> pb.SendRequest:
    return pb.SendRequest(
        request_id=request_id,
        notification=pb.Notification(
            kind=pb.INSTANT_MESSAGE, sender_display_name="Ada", preview="hi", conversation_id="c1"
        ),
        devices=[target.device()],
    )


async def metric(relay: RelayServer, series: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{relay.http_port}/metrics")).text
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no series {series}")


async def _not_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer a TLS ClientHello with plain HTTP/1.1: the handshake fails."""
    await reader.read(1)
    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    await writer.drain()
    writer.close()


# A provider address that cannot serve, and the reason a device then gets.
DEAD_ENDS = {
    "refused port": "ConnectFailed",
    "listener that never speaks": "DeadlineExceeded",
    "TLS handshake failure": "ConnectFailed",
}


@pytest.fixture(params=list(DEAD_ENDS))
async def dead_end(request: pytest.FixtureRequest) -> AsyncIterator[tuple[int, str]]:
    """(port, expected reason) of a loopback address that cannot serve HTTPS."""
    reason = DEAD_ENDS[request.param]
    if request.param == "refused port":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        yield port, reason  # bound, then closed: nothing listens there
        return
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepted, never answered

    handler = hold if request.param == "listener that never speaks" else _not_tls
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], reason
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()
