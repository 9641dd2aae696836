"""End to end across platforms: one relay in front of the fake APNs, FCM and Web Push."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest

from pushrelay.v1 import relay_pb2 as pb
from pushrelay.v1 import relay_pb2_grpc
from relay.config import Config
from relay.server import RelayServer
from relay.testing.configs import apns_app, fcm_app, local_config, webpush_app
from relay.testing.credentials import ApnsKey
from relay.testing.fake_apns import FakeAPNs
from relay.testing.fake_fcm import FakeFCM, ServiceAccount
from relay.testing.fake_webpush import FakeSubscription, FakeWebPush
from relay.testing.tls import TestPKI
from tests.support import apns_token

FCM_TOKEN = "fcm-token-" + "x" * 140


@pytest.fixture
async def fake_fcm(pki: TestPKI) -> AsyncIterator[FakeFCM]:
    async with FakeFCM(pki=pki) as fake:
        yield fake


@pytest.fixture
def fcm_account(fake_fcm: FakeFCM) -> ServiceAccount:
    return fake_fcm.service_account()


@pytest.fixture
async def fake_webpush(pki: TestPKI) -> AsyncIterator[FakeWebPush]:
    async with FakeWebPush(pki=pki) as fake:
        yield fake


@pytest.fixture
def platforms_config(
    fake_apns: FakeAPNs,
    apns_key: ApnsKey,
    fake_fcm: FakeFCM,
    fcm_account: ServiceAccount,
    fake_webpush: FakeWebPush,
) -> Config:
    return local_config(
        [
            apns_app(fake_apns, apns_key),
            fcm_app(fake_fcm, fcm_account),
            webpush_app(fake_webpush),
        ]
    )


@pytest.fixture
async def mixed_stub(start_relay, platforms_config) -> AsyncIterator[relay_pb2_grpc.PushRelayStub]:
    relay: RelayServer = await start_relay(platforms_config)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{relay.port}") as channel:
        yield relay_pb2_grpc.PushRelayStub(channel)


def web_device(sub: FakeSubscription, app_id: str = "chat-web") -> pb.Device:
    keys = pb.DeviceKeys(p256dh=sub.keys.p256dh, auth=sub.keys.auth)
    return pb.Device(app_id=app_id, token=sub.endpoint, keys=keys)


def mixed(*devices: pb.Device, privacy: int = pb.FULL, **notification: object) -> pb.SendRequest:
    fields: dict[str, object] = {
        "kind": pb.INSTANT_MESSAGE,
        "sender_display_name": "Alice Example",
        "preview": "Lunch at noon?",
        "conversation_id": "conv-42",
        "privacy": privacy,
    }
    fields.update(notification)
    return pb.SendRequest(
        request_id="mixed-1",
        notification=pb.Notification(**fields),  # type: ignore[arg-type]
        devices=list(devices),
    )


def outcomes(response: pb.SendResponse) -> list[tuple[str, str]]:
    return [(pb.Outcome.Name(r.outcome), r.reason) for r in response.results]


async def test_one_request_reaches_iphone_android_and_browser(
    mixed_stub, fake_apns, fake_fcm, fake_webpush
) -> None:
    sub = fake_webpush.subscribe()
    ios = pb.Device(app_id="chat-ios", token=apns_token())
    android = pb.Device(app_id="chat-android", token=FCM_TOKEN)
    response = await mixed_stub.Send(mixed(ios, android, web_device(sub)), timeout=10)

    assert outcomes(response) == [("DELIVERED", "")] * 3
    (apns,) = fake_apns.received
    assert apns.payload["aps"]["alert"]["title"] == "Alice Example"
    (fcm,) = fake_fcm.received
    assert (fcm.target_kind, fcm.target) == ("token", FCM_TOKEN)
    assert fcm.message["notification"] == {"title": "Alice Example", "body": "Lunch at noon?"}
    assert json.loads(fcm.message["data"]["relay"])["conversation_id"] == "conv-42"
    assert response.results[1].provider_message_id == fcm.name
    (web,) = fake_webpush.received
    document = json.loads(web.plaintext or b"")
    assert (document["title"], document["body"]) == ("Alice Example", "Lunch at noon?")
    assert document["relay"]["kind"] == "instant_message"
    assert response.results[2].provider_message_id  # the push resource's Location


@pytest.mark.parametrize("privacy", [pb.REDACTED, pb.ID_ONLY], ids=pb.Privacy.Name)
async def test_providers_never_see_content_outside_full(
    mixed_stub, fake_fcm, fake_webpush, privacy
) -> None:
    sub = fake_webpush.subscribe()
    android = pb.Device(app_id="chat-android", token=FCM_TOKEN)
    await mixed_stub.Send(mixed(android, web_device(sub), privacy=privacy), timeout=10)
    for raw in (fake_fcm.received[0].body, fake_webpush.received[0].plaintext or b""):
        assert b"Alice" not in raw and b"Lunch" not in raw
    if privacy == pb.ID_ONLY:
        assert "notification" not in fake_fcm.received[0].message
        assert fake_fcm.received[0].message["android"]["priority"].lower() == "high"


FCM_ROWS = [
    (404, "UNREGISTERED", None, ("TOKEN_INVALID", "UNREGISTERED")),
    (403, "SENDER_ID_MISMATCH", None, ("TOKEN_INVALID", "SENDER_ID_MISMATCH")),
    (
        400,
        "INVALID_ARGUMENT",
        "The registration token is not a valid FCM registration token",
        ("TOKEN_INVALID", "INVALID_ARGUMENT"),
    ),
    (
        400,
        "INVALID_ARGUMENT",
        "Invalid value at 'message.data[0].value'",
        ("REJECTED", "INVALID_ARGUMENT"),
    ),
    (401, "THIRD_PARTY_AUTH_ERROR", None, ("REJECTED", "THIRD_PARTY_AUTH_ERROR")),
]


@pytest.mark.parametrize(("status", "code", "message", "expected"), FCM_ROWS)
async def test_fcm_outcome_mapping(mixed_stub, fake_fcm, status, code, message, expected):
    fake_fcm.script(FCM_TOKEN, status, code, message=message)
    android = pb.Device(app_id="chat-android", token=FCM_TOKEN)
    response = await mixed_stub.Send(mixed(android), timeout=10)
    assert outcomes(response) == [expected]


async def test_fcm_quota_is_rate_limited_with_retry_after(mixed_stub, fake_fcm) -> None:
    fake_fcm.inject(429, "QUOTA_EXCEEDED", retry_after=120)
    android = pb.Device(app_id="chat-android", token=FCM_TOKEN)
    (result,) = (await mixed_stub.Send(mixed(android), timeout=10)).results
    assert pb.Outcome.Name(result.outcome) == "RATE_LIMITED"
    assert result.retry_after_seconds == 120


async def test_fcm_unavailable_is_retried_then_unavailable(mixed_stub, fake_fcm) -> None:
    android = pb.Device(app_id="chat-android", token=FCM_TOKEN)
    fake_fcm.inject(503, "UNAVAILABLE", count=1)
    assert outcomes(await mixed_stub.Send(mixed(android), timeout=10)) == [("DELIVERED", "")]
    fake_fcm.inject(500, "INTERNAL", count=10)
    (result,) = (await mixed_stub.Send(mixed(android), timeout=10)).results
    assert pb.Outcome.Name(result.outcome) == "UNAVAILABLE"


async def test_fcm_access_token_refreshed_after_expiry(mixed_stub, fake_fcm) -> None:
    android = pb.Device(app_id="chat-android", token=FCM_TOKEN)
    await mixed_stub.Send(mixed(android), timeout=10)
    fake_fcm.expire_access_tokens()
    assert outcomes(await mixed_stub.Send(mixed(android), timeout=10)) == [("DELIVERED", "")]
    assert fake_fcm.tokens_issued == 2


async def test_fcm_installation_id_target(mixed_stub, fake_fcm) -> None:
    android = pb.Device(app_id="chat-android", token="fid:cK3mAbcDefGhijKlmnOpq")
    assert outcomes(await mixed_stub.Send(mixed(android), timeout=10)) == [("DELIVERED", "")]
    assert (fake_fcm.received[0].target_kind, fake_fcm.received[0].target) == (
        "fid",
        "cK3mAbcDefGhijKlmnOpq",
    )


WEB_ROWS = [
    (404, ("TOKEN_INVALID",)),
    (410, ("TOKEN_INVALID",)),
    (413, ("REJECTED",)),
    (429, ("RATE_LIMITED",)),
    (503, ("UNAVAILABLE",)),
]


@pytest.mark.parametrize(("status", "expected"), WEB_ROWS)
async def test_webpush_outcome_mapping(mixed_stub, fake_webpush, status, expected) -> None:
    sub = fake_webpush.subscribe()
    fake_webpush.inject(status, count=10)
    (result,) = (await mixed_stub.Send(mixed(web_device(sub)), timeout=10)).results
    assert (pb.Outcome.Name(result.outcome),) == expected


async def test_webpush_expired_subscription(mixed_stub, fake_webpush) -> None:
    sub = fake_webpush.subscribe()
    fake_webpush.expire(sub, status=410)
    (result,) = (await mixed_stub.Send(mixed(web_device(sub)), timeout=10)).results
    assert pb.Outcome.Name(result.outcome) == "TOKEN_INVALID"


async def test_webpush_endpoint_outside_allow_list_is_invalid_argument(
    mixed_stub, fake_webpush
) -> None:
    sub = fake_webpush.subscribe()
    outside = web_device(sub)
    outside.token = "https://attacker.example.net/push/abc"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mixed_stub.Send(mixed(outside), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "devices[0].token: endpoint host not in allowed_endpoints" in caught.value.details()
    assert "attacker" not in caught.value.details()
    assert fake_webpush.received == []


async def test_webpush_device_without_keys_is_invalid_argument(mixed_stub, fake_webpush):
    sub = fake_webpush.subscribe()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mixed_stub.Send(mixed(pb.Device(app_id="chat-web", token=sub.endpoint)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "devices[0].keys: required" in caught.value.details()


async def test_one_failing_provider_spoils_no_other_result(
    mixed_stub, fake_apns, fake_fcm, fake_webpush
) -> None:
    sub = fake_webpush.subscribe()
    fake_fcm.inject(500, "INTERNAL", count=10)
    devices = [
        pb.Device(app_id="chat-ios", token=apns_token()),
        pb.Device(app_id="chat-android", token=FCM_TOKEN),
        web_device(sub),
    ]
    response = await mixed_stub.Send(mixed(*devices), timeout=10)
    assert [o for o, _ in outcomes(response)] == ["DELIVERED", "UNAVAILABLE", "DELIVERED"]


async def test_a_slow_provider_never_delays_another_apps_results(
    start_relay, fake_apns, apns_key, fake_fcm, fcm_account
) -> None:
    config = local_config(
        [apns_app(fake_apns, apns_key), fcm_app(fake_fcm, fcm_account, max_concurrency=2)]
    )
    relay = await start_relay(config)
    fake_fcm.stall(FCM_TOKEN)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{relay.port}") as channel:
        stub = relay_pb2_grpc.PushRelayStub(channel)
        android = pb.Device(app_id="chat-android", token=FCM_TOKEN)
        # Fill the FCM app's concurrency with stalled pushes ...
        stalled = [asyncio.ensure_future(stub.Send(mixed(android), timeout=8)) for _ in range(4)]
        while len(fake_fcm.received) < 2:  # noqa: ASYNC110 (polling a fake's record)
            await asyncio.sleep(0.01)
        # ... and an APNs push is still answered while every one of them is pending.
        ios = pb.Device(app_id="chat-ios", token=apns_token())
        response = await stub.Send(mixed(ios), timeout=8)
        assert outcomes(response) == [("DELIVERED", "")]
        assert not any(task.done() for task in stalled)
        for answer in await asyncio.gather(*stalled):
            assert outcomes(answer) == [("UNAVAILABLE", "DeadlineExceeded")]


MAX_EMOJI = "😀" * 4000


@pytest.mark.parametrize("platform", ["apns", "fcm", "webpush"])
async def test_a_maximal_request_fits_each_provider(
    mixed_stub, fake_apns, fake_fcm, fake_webpush, platform
) -> None:
    device = {
        "apns": lambda: pb.Device(app_id="chat-ios", token=apns_token()),
        "fcm": lambda: pb.Device(app_id="chat-android", token=FCM_TOKEN),
        "webpush": lambda: web_device(fake_webpush.subscribe()),
    }[platform]()
    sent = mixed(
        device, sender_display_name="👩‍👩‍👧‍👦" * 36, preview=MAX_EMOJI, conversation_id="c" * 256
    )
    assert outcomes(await mixed_stub.Send(sent, timeout=10)) == [("DELIVERED", "")]
