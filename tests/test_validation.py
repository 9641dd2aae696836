"""Every malformed request gets INVALID_ARGUMENT naming the field, and costs no provider call."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.apns import ApnsSettings
from pushrelay.v1 import relay_pb2 as pb
from relay.config import AppConfig, Limits, PrivacyPolicy
from relay.model import Privacy
from relay.testing.device import TestSubscription
from relay.validate import check_request
from tests.support import apns_token, request

TOKEN = "ab" * 32
VALID_POINT = TestSubscription.generate().p256dh


def _with(**changes: object) -> pb.SendRequest:
    sent = request(TOKEN)
    for path, value in changes.items():
        target, field = (sent.notification, path[2:]) if path.startswith("n_") else (sent, path)
        setattr(target, field, value)
    return sent


def _devices(*devices: pb.Device) -> pb.SendRequest:
    sent = request()
    sent.devices.extend(devices)
    return sent


CASES = {
    "no devices": (request(), "devices: at least one device"),
    "too many devices": (request(*[TOKEN] * 101), "devices: more than 100 devices"),
    "kind unspecified": (_with(n_kind=pb.KIND_UNSPECIFIED), "notification.kind: required"),
    "kind unknown": (_with(n_kind=42), "notification.kind: not a known kind"),
    "privacy unknown": (_with(n_privacy=9), "notification.privacy: not a known"),
    "sender too long": (_with(n_sender_display_name="x" * 257), "sender_display_name: over 256"),
    "preview too long": (_with(n_preview="x" * 4001), "notification.preview: over 4000"),
    "conversation id too long": (
        _with(n_conversation_id="é" * 129),
        "notification.conversation_id: over 256 bytes",
    ),
    "ttl too long": (_with(n_ttl_seconds=10**8), "notification.ttl_seconds: over"),
    "request id not printable": (_with(request_id="a\nb"), "request_id: at most 128 printable"),
    "unknown app": (_devices(pb.Device(app_id="nope", token=TOKEN)), "devices[0].app_id: not a"),
    "missing app": (_devices(pb.Device(token=TOKEN)), "devices[0].app_id: required"),
    "missing token": (_devices(pb.Device(app_id="chat-ios")), "devices[0].token: required"),
    "token not hex": (request(TOKEN, "zz" * 32), "devices[1].token: not a hex APNs token"),
    "token too short": (request("ab" * 31), "devices[0].token: not a hex APNs token"),
    "token too long": (request("a" * 201), "devices[0].token: not a hex APNs token"),
    "bad p256dh": (
        _devices(pb.Device(app_id="chat-ios", token=TOKEN, keys=pb.DeviceKeys(p256dh=b"x"))),
        "devices[0].keys.p256dh: must be a 65-byte",
    ),
    "p256dh off the curve": (
        _devices(
            pb.Device(
                app_id="chat-ios",
                token=TOKEN,
                keys=pb.DeviceKeys(p256dh=b"\x04" + b"\x01" * 64, auth=b"a" * 16),
            )
        ),
        "devices[0].keys.p256dh: must be a 65-byte",
    ),
    "bad auth": (
        _devices(
            pb.Device(
                app_id="chat-ios",
                token=TOKEN,
                keys=pb.DeviceKeys(p256dh=VALID_POINT, auth=b"short"),
            )
        ),
        "devices[0].keys.auth: must be 16 bytes",
    ),
}


@pytest.mark.parametrize(("sent", "expected"), CASES.values(), ids=CASES.keys())
async def test_bad_request_is_invalid_argument_naming_the_field(
    stub, fake_apns, sent, expected
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Send(sent, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in caught.value.details()
    assert fake_apns.received == []


async def test_every_problem_is_reported_at_once(stub) -> None:
    sent = request("nothex", app_id="chat-ios", kind=pb.KIND_UNSPECIFIED, preview="x" * 4001)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Send(sent)
    details = caught.value.details()
    for field in ("notification.kind", "notification.preview", "devices[0].token"):
        assert field in details


async def test_error_messages_never_echo_values(stub) -> None:
    secret = "Ω-secret-" + apns_token()
    sent = request(secret, app_id=secret, sender_display_name=secret * 20)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Send(sent)
    assert secret not in caught.value.details()


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    kind=st.integers(0, 6),
    privacy=st.integers(0, 6),
    sender=st.text(max_size=300),
    preview=st.text(max_size=4100),
    conversation=st.text(max_size=300),
    tokens=st.lists(st.text(max_size=210) | st.just(TOKEN), max_size=4),
)
def test_validation_never_crashes(kind, privacy, sender, preview, conversation, tokens) -> None:
    # Fuzzing the validator directly (the gRPC path is covered above): any request either
    # passes or yields problems that each name a field.
    sent = pb.SendRequest(
        notification=pb.Notification(
            kind=kind,
            privacy=privacy,
            sender_display_name=sender,
            preview=preview,
            conversation_id=conversation,
        ),
        devices=[pb.Device(app_id="chat-ios", token=t) for t in tokens],
    )
    problems = check_request(sent, APPS, Limits())
    assert all(": " in p for p in problems)


APPS = {
    "chat-ios": AppConfig(
        id="chat-ios",
        platform="apns",
        privacy=PrivacyPolicy(default=Privacy.FULL, max=Privacy.FULL),
        max_concurrency=1,
        settings=ApnsSettings(app_id="chat-ios", topic="com.example.chat"),
    )
}
