"""Caller authentication and app authorization, end to end through a real relay.

Every refusal has its status and a message naming the rule, costs no provider call, and is
counted in ``pushrelay_requests_total{code}``. TLS and certificate subjects: tests/test_tls.py.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import re
import secrets
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pushrelay.v1 import relay_pb2 as pb
from relay import ingress
from relay.auth import ANYONE, Authenticator, Caller, check_apps
from relay.client import RelayClient
from relay.config import ClientConfig, Config
from relay.errors import PermissionDenied, Unauthenticated
from relay.server import RelayServer
from relay.testing.configs import apns_app, local_config
from relay.testing.credentials import ApnsKey
from relay.testing.fake_apns import FakeAPNs
from relay.testing.tls import TestPKI, _split_pem
from tests.support import apns_token, request

EU_TOKEN = "eu-" + secrets.token_urlsafe(24)
US_TOKEN = "us-" + secrets.token_urlsafe(24)


def client(
    name: str, token: str = "", apps: tuple[str, ...] = ("chat-ios",), **kw: Any
) -> ClientConfig:
    return ClientConfig(name=name, token=token.encode(), apps=apps, **kw)


def with_clients(config: Config, *clients: ClientConfig, **server: Any) -> Config:
    """``config`` with ``clients`` and changed ``server`` settings."""
    return dataclasses.replace(
        config, clients=clients, server=dataclasses.replace(config.server, **server)
    )


def requests_counted(relay: RelayServer, code: str, method: str = "Send") -> float:
    """The relay's ``pushrelay_requests_total{method,code}``, as /metrics shows it."""
    text = relay.metrics.exposition().decode()
    pattern = rf'^pushrelay_requests_total{{code="{code}",method="{method}"}} (\S+)$'
    match = re.search(pattern, text, re.M)
    assert match, (code, method)
    return float(match[1])


@pytest.fixture
def two_apps(fake_apns: FakeAPNs, apns_key: ApnsKey) -> Config:
    return local_config(
        [apns_app(fake_apns, apns_key), apns_app(fake_apns, apns_key, app_id="chat-web")]
    )


@pytest.fixture
async def guarded(start_relay, two_apps: Config) -> RelayServer:  # type: ignore[no-untyped-def]
    """A relay with two clients: chat-eu may use chat-ios only, chat-us both apps."""
    config = with_clients(
        two_apps,
        client("chat-eu", EU_TOKEN),
        client("chat-us", US_TOKEN, ("chat-ios", "chat-web")),
    )
    relay: RelayServer = await start_relay(config)
    return relay


async def refused(
    relay: RelayServer, req: pb.SendRequest, **client_kw: Any
) -> grpc.aio.AioRpcError:
    async with RelayClient(f"127.0.0.1:{relay.port}", **client_kw) as caller:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await caller.send(req, timeout=10)
    return info.value


# --- bearer tokens --------------------------------------------------------------------------------


async def test_the_right_token_is_served(guarded: RelayServer, fake_apns: FakeAPNs) -> None:
    async with RelayClient(f"127.0.0.1:{guarded.port}", token=EU_TOKEN) as caller:
        answer = await caller.send(request(apns_token()), timeout=10)
    assert answer.results[0].outcome == pb.DELIVERED
    assert len(fake_apns.received) == 1
    assert requests_counted(guarded, "OK") == 1


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (None, "authorization: missing; send 'authorization: Bearer <token>' metadata"),
        ("not-the-token-" + secrets.token_hex(8), "authorization: the bearer token matches no"),
        ("", "authorization: missing"),
    ],
    ids=["missing", "wrong", "empty"],
)
async def test_a_wrong_or_missing_token_is_unauthenticated(
    guarded: RelayServer,
    fake_apns: FakeAPNs,
    token: str | None,
    message: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="relay.interceptors"):
        error = await refused(guarded, request(apns_token(), request_id="rid-77"), token=token)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (error.details() or "").startswith(message)
    if token:
        assert token not in (error.details() or "")
        assert token not in caplog.text
    assert fake_apns.received == []
    assert requests_counted(guarded, "UNAUTHENTICATED") == 1
    (line,) = [r for r in caplog.records if r.getMessage() == "refused"]
    assert (line.code, line.request_id) == ("UNAUTHENTICATED", "rid-77")  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "value",
    [f"Basic {EU_TOKEN}", EU_TOKEN, f"Bearer{EU_TOKEN}"],
    ids=["basic", "no-scheme", "no-space"],
)
async def test_a_malformed_authorization_is_unauthenticated(
    guarded: RelayServer, fake_apns: FakeAPNs, value: str
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{guarded.port}") as channel:
        send = channel.unary_unary(
            "/pushrelay.v1.PushRelay/Send",
            request_serializer=pb.SendRequest.SerializeToString,
            response_deserializer=pb.SendResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await send(request(apns_token()), metadata=(("authorization", value),), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert info.value.details() == "authorization: expected 'Bearer <token>'"
    assert EU_TOKEN not in (info.value.details() or "")
    assert fake_apns.received == []


async def test_the_bearer_scheme_is_case_insensitive(guarded: RelayServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{guarded.port}") as channel:
        send = channel.unary_unary(
            "/pushrelay.v1.PushRelay/Send",
            request_serializer=pb.SendRequest.SerializeToString,
            response_deserializer=pb.SendResponse.FromString,
        )
        answer = await send(
            request(apns_token()), metadata=(("authorization", f"bearer {EU_TOKEN}"),), timeout=10
        )
    assert answer.results[0].outcome == pb.DELIVERED


async def test_a_stream_without_credentials_is_refused_whole(
    guarded: RelayServer, fake_apns: FakeAPNs
) -> None:
    async with RelayClient(f"127.0.0.1:{guarded.port}") as caller:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in caller.send_many([request(apns_token())], timeout=10):
                pass
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert fake_apns.received == []
    assert requests_counted(guarded, "UNAUTHENTICATED", "SendStream") == 1


async def test_health_and_reflection_need_no_credentials(guarded: RelayServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{guarded.port}") as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="pushrelay.v1.PushRelay"), timeout=10
        )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


# --- apps per client ------------------------------------------------------------------------------


async def test_an_app_the_client_may_not_use_is_permission_denied(
    guarded: RelayServer, fake_apns: FakeAPNs
) -> None:
    req = request(apns_token(), apns_token(), apns_token())
    req.devices[2].app_id = "chat-web"
    error = await refused(guarded, req, token=EU_TOKEN)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "devices[2].app_id: client chat-eu may not use app chat-web"
    assert fake_apns.received == []  # the allowed devices are not sent either
    assert requests_counted(guarded, "PERMISSION_DENIED") == 1


async def test_each_client_uses_its_own_apps(guarded: RelayServer) -> None:
    req = request(apns_token(), apns_token())
    req.devices[1].app_id = "chat-web"
    async with RelayClient(f"127.0.0.1:{guarded.port}", token=US_TOKEN) as caller:
        answer = await caller.send(req, timeout=10)
    assert [r.outcome for r in answer.results] == [pb.DELIVERED, pb.DELIVERED]


async def test_an_invalid_request_is_invalid_before_it_is_denied(guarded: RelayServer) -> None:
    req = request("nothex", apns_token())
    req.devices[1].app_id = "chat-web"
    error = await refused(guarded, req, token=EU_TOKEN)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("devices[0].token: not a hex APNs token")
    assert requests_counted(guarded, "INVALID_ARGUMENT") == 1


async def test_a_denied_request_on_a_stream_is_answered_rejected(
    guarded: RelayServer, fake_apns: FakeAPNs
) -> None:
    denied = request(apns_token(), apns_token(), request_id="denied")
    denied.devices[1].app_id = "chat-web"
    allowed = request(apns_token(), request_id="allowed")
    async with RelayClient(f"127.0.0.1:{guarded.port}", token=EU_TOKEN) as caller:
        answers = {a.request_id: a async for a in caller.send_many([denied, allowed], timeout=10)}
    reason = "PermissionDenied: devices[1].app_id: client chat-eu may not use app chat-web"
    assert [(r.outcome, r.reason) for r in answers["denied"].results] == [(pb.REJECTED, reason)] * 2
    assert answers["allowed"].results[0].outcome == pb.DELIVERED
    assert len(fake_apns.received) == 1
    assert requests_counted(guarded, "OK", "SendStream") == 1


# --- open API, reload -----------------------------------------------------------------------------


async def test_without_clients_the_api_is_open_and_says_so(  # type: ignore[no-untyped-def]
    start_relay, relay_config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="relay.server"):
        relay = await start_relay(relay_config)
    assert "no clients configured: the API is open to anyone who can reach it" in caplog.messages
    async with RelayClient(f"127.0.0.1:{relay.port}") as caller:
        answer = await caller.send(request(apns_token()), timeout=10)
    assert answer.results[0].outcome == pb.DELIVERED


async def test_tokens_over_plaintext_are_warned_about(  # type: ignore[no-untyped-def]
    start_relay, relay_config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="relay.server"):
        await start_relay(with_clients(relay_config, client("chat-eu", EU_TOKEN)))
    assert "clients configured without server.tls: bearer tokens travel in plaintext" in (
        caplog.messages
    )


async def test_a_reload_rotates_client_tokens(guarded: RelayServer, two_apps: Config) -> None:
    rotated = "eu2-" + secrets.token_urlsafe(24)
    await guarded.reload(with_clients(two_apps, client("chat-eu", rotated)))
    error = await refused(guarded, request(apns_token()), token=EU_TOKEN)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    async with RelayClient(f"127.0.0.1:{guarded.port}", token=rotated) as caller:
        answer = await caller.send(request(apns_token()), timeout=10)
    assert answer.results[0].outcome == pb.DELIVERED


async def test_a_reload_can_open_and_close_the_api(guarded: RelayServer, two_apps: Config) -> None:
    await guarded.reload(two_apps)
    async with RelayClient(f"127.0.0.1:{guarded.port}") as caller:
        assert (await caller.send(request(apns_token()), timeout=10)).results[0].outcome == (
            pb.DELIVERED
        )
    await guarded.reload(with_clients(two_apps, client("chat-eu", EU_TOKEN)))
    error = await refused(guarded, request(apns_token()))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


# --- the authenticator on its own -----------------------------------------------------------------


def test_tokens_are_compared_with_every_client(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(a)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    table = Authenticator([client(f"c{i}", f"token-{i}-" + "x" * 16) for i in range(5)])
    caller = table.authenticate((("authorization", "Bearer token-0-" + "x" * 16),), {})
    assert caller.name == "c0"
    assert len(calls) == 5  # no early exit on the first match


def test_two_credentials_must_name_the_same_client(pki: TestPKI) -> None:
    table = Authenticator([client("a", EU_TOKEN), client("b", US_TOKEN, subject="CN=b")])
    cert = {"x509_pem_cert": [_split_pem(pki.client_cert_pem("b"))[0]]}
    with pytest.raises(Unauthenticated, match="name different clients"):
        table.authenticate((("authorization", f"Bearer {EU_TOKEN}"),), cert)
    named = table.authenticate((), cert)
    assert (named.name, named.apps) == ("b", frozenset({"chat-ios"}))
    with pytest.raises(Unauthenticated, match="send exactly one"):
        table.authenticate((("authorization", f"Bearer {EU_TOKEN}"),) * 2, {})


def test_the_open_api_lets_anyone_use_any_app() -> None:
    assert Authenticator([]).authenticate((), {}) is ANYONE
    check_apps(ANYONE, ["anything"])
    caller = Caller("chat-eu", frozenset({"chat-ios"}))
    with pytest.raises(PermissionDenied) as info:
        check_apps(caller, ["chat-ios"] + ["chat-web"] * 12)
    assert str(info.value).startswith("devices[1].app_id: client chat-eu may not use app chat-web")
    assert str(info.value).endswith("; and 2 more")


async def test_the_listener_keeps_no_credential_among_the_headers_it_keeps_decoded(
    guarded: RelayServer, fake_apns: FakeAPNs
) -> None:
    """The gRPC listener keeps the decoded pairs of header fields that repeat from call to call
    (relay/ingress.py); a bearer token is never among them, nor any custom metadata."""
    async with RelayClient(f"127.0.0.1:{guarded.port}", token=EU_TOKEN) as caller:
        answer = await caller.send(request(apns_token()), timeout=10)
        [streamed] = [a async for a in caller.send_many([request(apns_token())], timeout=10)]
    assert answer.results[0].outcome == streamed.results[0].outcome == pb.DELIVERED
    kept = list(ingress._DECODED.values())
    names = {name for name, _ in kept}
    assert {":path", ":authority", "content-type"} <= names
    assert "authorization" not in names and "grpc-timeout" not in names
    assert not any(EU_TOKEN in value for _, value in kept)
