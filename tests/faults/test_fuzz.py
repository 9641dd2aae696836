"""Whole SendRequests from Hypothesis, over gRPC, to a running relay with all three platforms.

Any field values and sizes, Unicode with control characters and bidi marks, byte strings of any
length for keys, enum numbers outside the declared values, 0 to 101 devices: only ``OK`` or
``INVALID_ARGUMENT`` ever comes back, every ``OK`` answer has one result per device, and the
relay keeps serving. The relay runs on its own loop in a thread, so that Hypothesis drives a
plain blocking client.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pushrelay.v1 import relay_pb2 as pb
from pushrelay.v1 import relay_pb2_grpc
from relay.server import RelayServer
from relay.testing.configs import apns_app, fcm_app, local_config, webpush_app
from relay.testing.credentials import ApnsKey
from relay.testing.fake_apns import FakeAPNs
from relay.testing.fake_fcm import FakeFCM
from relay.testing.fake_webpush import FakeWebPush
from relay.testing.tls import TestPKI


@contextlib.asynccontextmanager
async def _relay() -> AsyncIterator[tuple[RelayServer, str]]:
    pki, key = TestPKI(), ApnsKey.generate()
    async with (
        FakeAPNs(pki=pki, keys=[key]) as apns,
        FakeFCM(pki=pki) as fcm,
        FakeWebPush(pki=pki) as webpush,
    ):
        apps = [apns_app(apns, key), fcm_app(fcm, fcm.service_account()), webpush_app(webpush)]
        relay = RelayServer(local_config(apps))
        await relay.start()
        try:
            yield relay, webpush.subscribe().endpoint
        finally:
            await relay.stop(grace=1)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[grpc.Channel, str]]:
    """A relay on a loop of its own thread, and a blocking channel to it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    context = _relay()
    relay, endpoint = asyncio.run_coroutine_threadsafe(context.__aenter__(), loop).result(30)
    channel = grpc.insecure_channel(f"127.0.0.1:{relay.port}")
    try:
        yield channel, endpoint
    finally:
        channel.close()
        asyncio.run_coroutine_threadsafe(context.__aexit__(None, None, None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# Text that validation must survive: controls, bidi overrides, combining marks, emoji, NUL.
_TRICKY = st.sampled_from(
    ["\u202e", "\u200f", "\x00", "\x1b[31m", "\u0301", "👩‍💻", "\ud7ff", "\n"]
)
_TEXT = st.one_of(
    st.text(max_size=40),
    st.lists(st.one_of(_TRICKY, st.text(max_size=3)), max_size=30).map("".join),
    st.text(min_size=250, max_size=300),
    st.text(alphabet="x", min_size=3990, max_size=4010),
)
_ENUM = st.integers(min_value=-3, max_value=12)
_UINT32 = st.integers(min_value=0, max_value=2**32 - 1)
_BYTES = st.one_of(st.binary(max_size=70), st.binary(min_size=65, max_size=65))


def _token(endpoint: str) -> st.SearchStrategy[str]:
    return st.one_of(
        _TEXT,
        st.text(alphabet="0123456789abcdefABCDEF", min_size=0, max_size=210),
        st.just(endpoint),
        st.just("fcm-token-" + "x" * 140),
        st.builds(lambda s: f"https://127.0.0.1/{s}", st.text(max_size=20)),
    )


def _device(endpoint: str) -> st.SearchStrategy[pb.Device]:
    apps = st.one_of(st.sampled_from(["chat-ios", "chat-android", "chat-web", "", "nope"]), _TEXT)
    keys = st.one_of(st.none(), st.builds(pb.DeviceKeys, p256dh=_BYTES, auth=_BYTES))
    return st.builds(
        lambda app, token, k: pb.Device(app_id=app, token=token, keys=k),
        apps,
        _token(endpoint),
        keys,
    )


def _request(endpoint: str) -> st.SearchStrategy[pb.SendRequest]:
    notification = st.builds(
        pb.Notification,
        kind=_ENUM,
        sender_display_name=_TEXT,
        preview=_TEXT,
        conversation_id=_TEXT,
        badge=_UINT32,
        waiting_count=_UINT32,
        privacy=_ENUM,
        ttl_seconds=_UINT32,
    )
    devices = st.one_of(
        st.lists(_device(endpoint), max_size=4),
        st.lists(_device(endpoint), min_size=99, max_size=101),
    )
    return st.builds(
        lambda rid, n, d: pb.SendRequest(request_id=rid, notification=n, devices=d),
        _TEXT,
        notification,
        devices,
    )


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_only_ok_or_invalid_argument_and_one_result_per_device(
    served: tuple[grpc.Channel, str], data: Any
) -> None:
    channel, endpoint = served
    request = data.draw(_request(endpoint))
    stub = relay_pb2_grpc.PushRelayStub(channel)
    try:
        response = stub.Send(request, timeout=10)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
        return
    assert len(response.results) == len(request.devices)
    assert response.request_id == request.request_id
    for result in response.results:
        assert result.outcome != pb.OUTCOME_UNSPECIFIED


def test_the_relay_still_serves_after_the_fuzzing(served: tuple[grpc.Channel, str]) -> None:
    channel, _ = served
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    request = pb.SendRequest(
        request_id="after",
        notification=pb.Notification(kind=pb.INSTANT_MESSAGE, preview="still here"),
        devices=[pb.Device(app_id="chat-ios", token="ab" * 32)],
    )
    response = relay_pb2_grpc.PushRelayStub(channel).Send(request, timeout=10)
    assert [pb.Outcome.Name(r.outcome) for r in response.results] == ["DELIVERED"]
