"""INCOMING_CALL (a ringing call) and CLEAR (read, answered or ended elsewhere).

Rendering per platform and mode, then end to end through the real server and the fakes: what
each provider received (push type, topic, priority, expiration, payload), the refusals that keep
a VoIP push from ever not ringing, and that no CLEAR ever carries a sender or a preview.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from adapters.base import Push, encode_json
from pushrelay.v1 import relay_pb2 as pb
from relay.client import RelayClient
from relay.config import Config
from relay.model import Kind, Message, Privacy
from relay.render import GroupingKeys, render
from relay.server import RelayServer
from relay.testing.configs import apns_app, fcm_app, local_config, webpush_app
from relay.testing.credentials import ApnsKey
from relay.testing.fake_apns import FakeAPNs
from relay.testing.fake_fcm import FakeFCM
from relay.testing.fake_webpush import FakeWebPush
from relay.testing.tls import TestPKI
from tests.support import apns_token

GROUPING = GroupingKeys(b"\x07" * 32)
SENDER, PREVIEW, CID = "Zelda Quux", "secret plan at dawn", "call-8812"
THREAD = GROUPING.for_conversation(CID)
SENT_AT = 1_767_225_600_000
PLATFORMS = ("apns", "fcm", "webpush")
PLAIN_MODES = (Privacy.FULL, Privacy.REDACTED, Privacy.ID_ONLY)
FCM_TOKEN = "fcm-token-" + "c" * 140


def rendered(kind: Kind, platform: str, mode: Privacy, **fields: Any) -> Push:
    message = Message(kind, SENDER, PREVIEW, CID, **({"badge": 4} | fields))
    return render(
        message, platform, mode, token="t", keys=None, grouping=GROUPING, sent_at_ms=SENT_AT
    )


def parsed(push: Push) -> dict[str, Any]:
    raw = push.payload if isinstance(push.payload, bytes) else encode_json(push.payload)
    document: dict[str, Any] = json.loads(raw)
    return document


def relay_of(platform: str, payload: dict[str, Any]) -> dict[str, Any]:
    relay: dict[str, Any] = (
        json.loads(payload["data"]["relay"]) if platform == "fcm" else payload["relay"]
    )
    return relay


# -- rendering -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("platform", "mode"), list(itertools.product(PLATFORMS, PLAIN_MODES)))
def test_an_incoming_call_rings_with_what_the_app_reports_to_callkit(
    platform: str, mode: Privacy
) -> None:
    push = rendered(Kind.INCOMING_CALL, platform, mode)
    payload = parsed(push)
    relay = {"v": 1, "kind": "incoming_call", "conversation_id": CID, "sent_at_ms": SENT_AT}
    if mode is not Privacy.ID_ONLY:
        relay["badge"] = 4
    if mode is Privacy.FULL:
        relay["caller"] = SENDER  # only FULL names the caller
    assert relay_of(platform, payload) == relay
    assert (push.voip, push.high_priority, push.ttl_seconds) == (True, True, 30)
    assert PREVIEW not in encode_json(payload).decode()
    if platform == "apns":
        assert payload == {"aps": {}, "relay": relay}  # PushKit: no alert, sound or badge
    elif platform == "fcm":
        assert set(payload) == {"android", "data"}  # data-only
        assert payload["android"] == {"priority": "high", "ttl": "30s"}
    else:
        assert payload == {"relay": relay}


@pytest.mark.parametrize(("ttl", "expected"), [(0, 30), (10, 10), (30, 30), (3600, 30)])
def test_a_call_lives_as_long_as_it_rings(ttl: int, expected: int) -> None:
    assert (
        rendered(Kind.INCOMING_CALL, "apns", Privacy.FULL, ttl_seconds=ttl).ttl_seconds == expected
    )


def test_a_long_caller_name_is_cut_to_fit() -> None:
    push = rendered(Kind.INCOMING_CALL, "webpush", Privacy.FULL)
    message = Message(Kind.INCOMING_CALL, "\x01" * 256, "", "\x01" * 256)
    cut = render(message, "webpush", Privacy.FULL, token="t", keys=None, grouping=GROUPING)
    assert len(cut.payload) <= 3000 and relay_of("webpush", parsed(cut))["caller"].endswith("…")
    assert relay_of("webpush", parsed(push))["caller"] == SENDER


@pytest.mark.parametrize(("platform", "mode"), list(itertools.product(PLATFORMS, PLAIN_MODES)))
def test_a_clear_is_silent_and_names_the_thread_to_withdraw(platform: str, mode: Privacy) -> None:
    push = rendered(Kind.CLEAR, platform, mode, badge=0)
    payload = parsed(push)
    relay = {"v": 1, "kind": "clear", "conversation_id": CID, "badge": 0, "thread": THREAD}
    assert relay_of(platform, payload) == relay  # badge 0 here means "set it to 0"
    assert push.background and not push.voip and not push.high_priority
    text = encode_json(payload).decode()
    assert SENDER not in text and PREVIEW not in text
    if platform == "apns":
        assert payload == {"aps": {"content-available": 1}, "relay": relay}
    elif platform == "fcm":
        assert set(payload) == {"android", "data"}
        assert payload["android"]["priority"] == "normal"
    else:
        assert payload == {"relay": relay}


# -- end to end ----------------------------------------------------------------------------------


@pytest.fixture
async def fakes(
    pki: TestPKI, apns_key: ApnsKey
) -> AsyncIterator[tuple[FakeAPNs, FakeFCM, FakeWebPush]]:
    async with (
        FakeAPNs(pki=pki, keys=[apns_key]) as apns,
        FakeFCM(pki=pki) as fcm,
        FakeWebPush(pki=pki) as webpush,
    ):
        yield apns, fcm, webpush


@pytest.fixture
def config(fakes: tuple[FakeAPNs, FakeFCM, FakeWebPush], apns_key: ApnsKey) -> Config:
    apns, fcm, webpush = fakes
    alert = apns_app(apns, apns_key)
    voip = apns_app(apns, apns_key, app_id="chat-ios-voip")
    voip = dataclasses.replace(voip, settings=dataclasses.replace(voip.settings, voip=True))
    return local_config([alert, voip, fcm_app(fcm, fcm.service_account()), webpush_app(webpush)])


@pytest.fixture
async def relay(start_relay, config: Config) -> RelayServer:  # type: ignore[no-untyped-def]
    server: RelayServer = await start_relay(config)
    return server


def request(kind: int, *devices: pb.Device, **fields: Any) -> pb.SendRequest:
    notification = {"sender_display_name": SENDER, "preview": PREVIEW, "conversation_id": CID}
    return pb.SendRequest(
        request_id="k",
        notification=pb.Notification(kind=kind, **(notification | fields)),
        devices=devices,
    )


def one_of_each(ios_app: str, webpush: FakeWebPush) -> list[pb.Device]:
    """An iPhone (of ``ios_app``), an Android phone and a browser."""
    sub = webpush.subscribe()
    keys = pb.DeviceKeys(p256dh=sub.keys.p256dh, auth=sub.keys.auth)
    return [
        pb.Device(app_id=ios_app, token=apns_token()),
        pb.Device(app_id="chat-android", token=FCM_TOKEN),
        pb.Device(app_id="chat-web", token=sub.endpoint, keys=keys),
    ]


async def test_an_incoming_call_reaches_each_platform_as_it_must(
    relay: RelayServer, fakes: tuple[FakeAPNs, FakeFCM, FakeWebPush]
) -> None:
    apns, fcm, webpush = fakes
    devices = one_of_each("chat-ios-voip", webpush)
    before = int(time.time())
    async with RelayClient(f"127.0.0.1:{relay.port}") as client:
        response = await client.send(
            request(pb.INCOMING_CALL, *devices, ttl_seconds=20), timeout=10
        )
    assert [pb.Outcome.Name(r.outcome) for r in response.results] == ["DELIVERED"] * 3

    (ios,) = apns.received
    assert ios.headers["apns-push-type"] == "voip"
    assert ios.headers["apns-topic"] == "com.example.chat.voip"
    assert ios.headers["apns-priority"] == "10"
    assert before + 20 <= int(ios.headers["apns-expiration"]) <= int(time.time()) + 20
    assert ios.payload is not None and ios.payload["aps"] == {}
    assert (
        ios.payload["relay"]["caller"] == SENDER and ios.payload["relay"]["kind"] == "incoming_call"
    )

    (android,) = fcm.received
    assert "notification" not in android.message
    assert android.message["android"] == {"priority": "high", "ttl": "20s"}

    (browser,) = webpush.received
    assert browser.headers["urgency"] == "high" and browser.headers["ttl"] == "20"
    assert json.loads(browser.plaintext or b"")["relay"]["caller"] == SENDER


async def test_a_clear_reaches_each_platform_silently(
    relay: RelayServer, fakes: tuple[FakeAPNs, FakeFCM, FakeWebPush]
) -> None:
    apns, fcm, webpush = fakes
    devices = one_of_each("chat-ios", webpush)
    async with RelayClient(f"127.0.0.1:{relay.port}") as client:
        response = await client.send(request(pb.CLEAR, *devices, badge=2), timeout=10)
    assert [pb.Outcome.Name(r.outcome) for r in response.results] == ["DELIVERED"] * 3

    (ios,) = apns.received
    assert (ios.headers["apns-push-type"], ios.headers["apns-priority"]) == ("background", "5")
    assert ios.headers["apns-topic"] == "com.example.chat"
    assert ios.payload is not None and ios.payload["aps"] == {"content-available": 1}
    (android,) = fcm.received
    assert (
        "notification" not in android.message and android.message["android"]["priority"] == "normal"
    )
    (browser,) = webpush.received
    assert browser.headers["urgency"] == "normal"
    documents = [ios.payload["relay"], json.loads(android.message["data"]["relay"])]
    documents.append(json.loads(browser.plaintext or b"")["relay"])
    for document in documents:
        assert document["kind"] == "clear" and document["badge"] == 2
        assert document["thread"] == ios.payload["relay"]["thread"]  # one key everywhere
    for raw in (ios.body, android.body, browser.plaintext or b""):
        assert SENDER.encode() not in raw and PREVIEW.encode() not in raw


@pytest.mark.parametrize(
    ("kind", "app_id", "problem"),
    [
        (
            pb.INCOMING_CALL,
            "chat-ios",
            "devices[0].app_id: INCOMING_CALL needs an APNs app with voip: true",
        ),
        (
            pb.INSTANT_MESSAGE,
            "chat-ios-voip",
            "devices[0].app_id: a voip app takes only INCOMING_CALL",
        ),
        (pb.CLEAR, "chat-ios-voip", "devices[0].app_id: a voip app takes only INCOMING_CALL"),
    ],
)
async def test_a_voip_push_that_would_not_ring_is_refused(
    relay: RelayServer,
    fakes: tuple[FakeAPNs, FakeFCM, FakeWebPush],
    kind: int,
    app_id: str,
    problem: str,
) -> None:
    apns, _, _ = fakes
    async with RelayClient(f"127.0.0.1:{relay.port}") as client:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.send(
                request(kind, pb.Device(app_id=app_id, token=apns_token())), timeout=10
            )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert problem in (refused.value.details() or "")
    assert apns.received == []


async def test_the_fake_refuses_what_apple_refuses_for_voip(
    fakes: tuple[FakeAPNs, FakeFCM, FakeWebPush], apns_key: ApnsKey
) -> None:
    """The adapter's second line: a VoIP push to an app not configured for it never leaves."""
    from adapters.apns import ApnsAdapter

    apns, _, _ = fakes
    settings = apns_app(apns, apns_key).settings
    adapter = await ApnsAdapter.create(settings)  # type: ignore[arg-type]
    try:
        outcome = await adapter.send(Push(token=apns_token(), payload={"aps": {}}, voip=True))
    finally:
        await adapter.aclose()
    assert (outcome.reason, apns.received) == ("NotVoipApp", [])
