"""TLS on the gRPC port, mutual TLS, certificate subjects naming clients, and the plaintext
health listener, with real certificates from the in-memory test PKI and real handshakes."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pushrelay.v1 import relay_pb2 as pb
from pushrelay.v1 import relay_pb2_grpc
from relay.client import RelayClient
from relay.config import Config, TlsConfig
from relay.server import SERVICE_NAME, RelayServer
from relay.testing.configs import apns_app, local_config
from relay.testing.credentials import ApnsKey
from relay.testing.fake_apns import FakeAPNs
from relay.testing.tls import TestPKI, _split_pem
from tests.support import apns_token, request
from tests.test_auth import client, requests_counted, with_clients

TOKEN = secrets.token_urlsafe(24)
Start = Callable[[Config], Awaitable[RelayServer]]
SERVING = health_pb2.HealthCheckResponse.SERVING


def tls(pki: TestPKI, *, mutual: bool) -> TlsConfig:
    return TlsConfig(
        cert_pem=pki.server_cert_pem,
        key_pem=pki.server_key_pem,
        client_ca_pem=pki.ca_pem if mutual else b"",
    )


def identity(pki: TestPKI, common_name: str) -> dict[str, Any]:
    """RelayClient keyword arguments presenting a certificate for ``common_name``."""
    cert, key = _split_pem(pki.client_cert_pem(common_name))
    return {"client_cert_pem": cert, "client_key_pem": key}


async def call(relay: RelayServer, pki: TestPKI, **kw: Any) -> pb.SendResponse:
    async with RelayClient(f"127.0.0.1:{relay.port}", ca_pem=pki.ca_pem, **kw) as caller:
        return await caller.send(request(apns_token()), timeout=10)


async def failed(relay: RelayServer, pki: TestPKI, **kw: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(relay, pki, **kw)
    return info.value


# --- TLS ------------------------------------------------------------------------------------------


async def test_tls_serves_callers_that_trust_the_ca(
    start_relay: Start, relay_config: Config, pki: TestPKI
) -> None:
    relay = await start_relay(with_clients(relay_config, tls=tls(pki, mutual=False)))
    assert (await call(relay, pki)).results[0].outcome == pb.DELIVERED
    async with RelayClient(f"127.0.0.1:{relay.port}") as plain:  # plaintext to a TLS port
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await plain.send(request(apns_token()), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    stranger = TestPKI()  # a caller trusting another CA does not trust the relay
    assert (await failed(relay, stranger)).code() == grpc.StatusCode.UNAVAILABLE


async def test_tls_with_a_bearer_token(
    start_relay: Start, relay_config: Config, pki: TestPKI
) -> None:
    config = with_clients(relay_config, client("chat-eu", TOKEN), tls=tls(pki, mutual=False))
    relay = await start_relay(config)
    assert (await call(relay, pki, token=TOKEN)).results[0].outcome == pb.DELIVERED
    assert (await failed(relay, pki)).code() == grpc.StatusCode.UNAUTHENTICATED


# --- mutual TLS -----------------------------------------------------------------------------------


async def test_mutual_tls_requires_a_certificate_from_the_client_ca(
    start_relay: Start, relay_config: Config, pki: TestPKI, fake_apns: FakeAPNs
) -> None:
    relay = await start_relay(with_clients(relay_config, tls=tls(pki, mutual=True)))
    assert (await call(relay, pki, **identity(pki, "anyone"))).results[0].outcome == pb.DELIVERED
    assert (await failed(relay, pki)).code() == grpc.StatusCode.UNAVAILABLE  # no certificate
    other_ca = identity(TestPKI(), "chat-eu")
    assert (await failed(relay, pki, **other_ca)).code() == grpc.StatusCode.UNAVAILABLE
    assert len(fake_apns.received) == 1  # the refused handshakes cost nothing


async def test_a_certificate_subject_names_its_client(
    start_relay: Start, relay_config: Config, pki: TestPKI, fake_apns: FakeAPNs
) -> None:
    config = with_clients(
        relay_config,
        client("chat-eu", subject="CN=chat-eu"),
        client("chat-us", TOKEN),
        tls=tls(pki, mutual=True),
    )
    relay = await start_relay(config)
    eu = identity(pki, "chat-eu")
    assert (await call(relay, pki, **eu)).results[0].outcome == pb.DELIVERED

    unknown = await failed(relay, pki, **identity(pki, "chat-xx"))
    assert unknown.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (unknown.details() or "").startswith(
        "client certificate: its subject names no configured client"
    )
    # a token naming another client than the certificate does is refused
    mixed = await failed(relay, pki, token=TOKEN, **eu)
    assert mixed.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "name different clients" in (mixed.details() or "")
    # a certificate that names no client leaves the token to decide
    other = await call(relay, pki, token=TOKEN, **identity(pki, "chat-xx"))
    assert other.results[0].outcome == pb.DELIVERED
    assert len(fake_apns.received) == 2
    assert requests_counted(relay, "UNAUTHENTICATED") == 2


async def test_a_certificate_named_client_is_held_to_its_apps(
    start_relay: Start, pki: TestPKI, fake_apns: FakeAPNs, apns_key: ApnsKey
) -> None:
    apps = [apns_app(fake_apns, apns_key), apns_app(fake_apns, apns_key, app_id="chat-web")]
    config = with_clients(
        local_config(apps),
        client("chat-eu", subject="CN=chat-eu", apps=("chat-ios",)),
        tls=tls(pki, mutual=True),
    )
    relay = await start_relay(config)
    req = request(apns_token())
    req.devices[0].app_id = "chat-web"
    async with RelayClient(
        f"127.0.0.1:{relay.port}", ca_pem=pki.ca_pem, **identity(pki, "chat-eu")
    ) as caller:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await caller.send(req, timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.details() == "devices[0].app_id: client chat-eu may not use app chat-web"
    assert fake_apns.received == []
    assert requests_counted(relay, "PERMISSION_DENIED") == 1


# --- the plaintext health listener ----------------------------------------------------------------


async def test_health_is_served_in_plaintext_while_the_api_needs_mutual_tls(
    start_relay: Start, relay_config: Config, pki: TestPKI
) -> None:
    config = with_clients(relay_config, tls=tls(pki, mutual=True), health_listen="127.0.0.1:0")
    relay = await start_relay(config)
    assert relay.health_port not in (0, relay.port)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{relay.health_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == SERVING
        await relay.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING  # the same servicer
        with pytest.raises(grpc.aio.AioRpcError) as info:  # and nothing but health
            await relay_pb2_grpc.PushRelayStub(channel).Send(request(apns_token()), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert (await failed(relay, pki)).code() == grpc.StatusCode.UNAVAILABLE  # main port: mTLS


async def test_no_health_listener_unless_configured(
    start_relay: Start, relay_config: Config
) -> None:
    relay = await start_relay(relay_config)
    assert relay.health_port == 0
