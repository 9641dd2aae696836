"""The ENCRYPTED privacy mode: the document, its buckets and padding, each platform's envelope,
and end to end through the gRPC API: what each fake provider received holds no sender, preview
or raw conversation id, and the reference device (relay/testing/device.py) decrypts the document.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import regex  # type: ignore[import-untyped, unused-ignore]
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters._ece import OVERHEAD_BYTES, encrypt
from adapters.base import DeviceKeys, Push, encode_json
from pushrelay.v1 import relay_pb2 as pb
from pushrelay.v1 import relay_pb2_grpc
from relay._encrypted import BUCKETS, MAX_DOCUMENT_BYTES, bucket_for, document
from relay._truncate import ELLIPSIS
from relay.model import Kind, Message, Privacy
from relay.render import LIMIT_BYTES, GroupingKeys, render
from relay.server import RelayServer
from relay.testing.configs import apns_app, fcm_app, local_config, webpush_app
from relay.testing.credentials import ApnsKey
from relay.testing.device import DecryptionError, TestSubscription, sealed_body
from relay.testing.fake_apns import FakeAPNs
from relay.testing.fake_fcm import FakeFCM
from relay.testing.fake_webpush import FakeSubscription, FakeWebPush
from relay.testing.tls import TestPKI
from tests.support import apns_token

GROUPING = GroupingKeys(b"\x01" * 32)
PLATFORMS = ("apns", "fcm", "webpush")
SENDER = "Zelda Quuxley"
PREVIEW = "Pv9Secret plan: meet at dawn"
CID = "!conv-4242:example.org"
# Each long enough that random base64url ciphertext (~2,900 characters) matches none by chance.
SECRETS = (b"Zelda", b"Quuxley", b"Pv9Secret", b"meet at dawn", b"conv-4242", b"example.org")
SENT_AT_MS = 1_735_689_600_123
DEVICE = TestSubscription.generate()
IM, INV, CALL, MW = Kind.INSTANT_MESSAGE, Kind.INVITATION, Kind.MISSED_CALL, Kind.MESSAGE_WAITING
ALL = list(itertools.product(Kind, PLATFORMS))
FALLBACK = {
    IM: ("New message", "INSTANT_MESSAGE"),
    INV: ("New invitation", "INVITATION"),
    CALL: ("Missed call", "MISSED_CALL"),
    MW: ("New voicemail", "MESSAGE_WAITING"),
}


def msg(kind: Kind = IM, **fields: Any) -> Message:
    base: dict[str, Any] = {"sender": SENDER, "preview": PREVIEW, "conversation_id": CID}
    return Message(kind=kind, **(base | fields))


def sealed(message: Message, platform: str, device: TestSubscription = DEVICE) -> Push:
    return render(
        message,
        platform,
        Privacy.ENCRYPTED,
        token="tok",
        keys=device.keys,
        grouping=GROUPING,
        push_id="p1",
        sent_at_ms=SENT_AT_MS,
    )


def encoded(push: Push) -> bytes:
    return push.payload if isinstance(push.payload, bytes) else encode_json(push.payload)


def received(push: Push, device: TestSubscription = DEVICE) -> dict[str, Any] | bytes:
    """What the device gets: the payload as the provider delivers it (Web Push: encrypted)."""
    if isinstance(push.payload, bytes):
        return encrypt(push.payload, device.keys, pad_to=push.pad_to)
    parsed: dict[str, Any] = json.loads(encode_json(push.payload))
    return parsed


def opened(push: Push, platform: str, device: TestSubscription = DEVICE) -> dict[str, Any]:
    return device.decrypt_document(platform, received(push, device))


def expected_document(kind: Kind, **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"v": 1, "kind": kind.name.lower()}
    doc |= {"sender": SENDER, "preview": PREVIEW, "conversation_id": CID}
    doc |= fields
    doc["sent_at_ms"] = SENT_AT_MS
    return doc


# --- the document and its envelope on each platform -----------------------------------------


@pytest.mark.parametrize(("kind", "platform"), ALL)
def test_every_platform_carries_the_same_document(kind: Kind, platform: str) -> None:
    push = sealed(msg(kind, badge=2, waiting_count=3), platform)
    extra: dict[str, Any] = {"badge": 3, "count": 3} if kind is MW else {"badge": 2}
    expected = expected_document(kind, **extra)
    if kind is Kind.CLEAR:  # no sender or preview; the thread key of what to withdraw
        del expected["sender"], expected["preview"]
        expected["thread"] = GROUPING.for_conversation(CID)
    assert opened(push, platform) == expected
    assert len(encoded(push)) <= LIMIT_BYTES[platform]
    assert (push.token, push.keys, push.push_id) == ("tok", DEVICE.keys, "p1")


@pytest.mark.parametrize("kind", [k for k in Kind if k not in (Kind.INCOMING_CALL, Kind.CLEAR)])
def test_apns_envelope_is_a_mutable_generic_alert_and_the_ciphertext(kind: Kind) -> None:
    push = sealed(msg(kind, badge=2, waiting_count=3), "apns")
    payload = received(push)
    assert isinstance(payload, dict)
    body, loc_key = FALLBACK[kind]
    assert payload["aps"] == {
        "alert": {"body": body, "loc-key": loc_key},
        "mutable-content": 1,  # the Notification Service Extension runs
        "sound": "default",
        "thread-id": GROUPING.for_conversation(CID),
    }  # no badge in the clear: the extension sets it from the document
    assert set(payload["relay"]) == {"v", "enc"} and payload["relay"]["v"] == 1
    assert not push.background and push.pad_to == 0


@pytest.mark.parametrize("kind", list(Kind))
def test_fcm_envelope_is_data_only_with_the_ciphertext(kind: Kind) -> None:
    push = sealed(msg(kind, badge=2, waiting_count=3), "fcm")
    payload = received(push)
    assert isinstance(payload, dict)
    assert set(payload) == {"android", "data"}  # no notification block: the app posts it
    assert set(payload["data"]) == {"relay"} and isinstance(payload["data"]["relay"], str)
    relay = json.loads(payload["data"]["relay"])
    assert set(relay) == {"v", "enc"} and relay["v"] == 1
    android = payload["android"]
    assert "notification" not in android
    assert android["priority"] == ("normal" if kind in (MW, Kind.CLEAR) else "high")
    assert push.background


def test_apns_incoming_call_is_a_voip_push_with_only_the_ciphertext() -> None:
    push = sealed(msg(Kind.INCOMING_CALL), "apns")
    payload = received(push)
    assert isinstance(payload, dict)
    assert payload["aps"] == {}  # PushKit: no alert to fall back on, the app rings via CallKit
    assert set(payload["relay"]) == {"v", "enc"}
    assert push.voip and push.high_priority and push.ttl_seconds == 30


def test_apns_clear_is_a_silent_push_with_only_the_ciphertext() -> None:
    push = sealed(msg(Kind.CLEAR, badge=2), "apns")
    payload = received(push)
    assert isinstance(payload, dict)
    assert payload["aps"] == {"content-available": 1}  # no alert, sound or badge in the clear
    assert set(payload["relay"]) == {"v", "enc"}
    assert push.background and not push.voip and not push.high_priority


def test_webpush_body_is_the_document_padded_by_the_adapter() -> None:
    push = sealed(msg(), "webpush")
    assert isinstance(push.payload, bytes)
    assert json.loads(push.payload) == expected_document(IM)
    assert push.pad_to == bucket_for(len(push.payload)) == 256
    body = received(push)
    assert isinstance(body, bytes) and len(body) == 256 + OVERHEAD_BYTES


@pytest.mark.parametrize("platform", PLATFORMS)
def test_a_cleared_count_carries_zero(platform: str) -> None:
    push = sealed(msg(MW, waiting_count=0), platform)
    assert opened(push, platform) == expected_document(MW, badge=0, count=0)
    if platform == "apns":
        # No alert, so no extension: the badge it clears must be in the clear.
        payload = received(push)
        assert isinstance(payload, dict) and set(payload["aps"]) == {"badge", "thread-id"}
        assert payload["aps"]["badge"] == 0
    else:
        assert push.background


@pytest.mark.parametrize("platform", PLATFORMS)
def test_empty_fields_are_left_out_of_the_document(platform: str) -> None:
    push = sealed(msg(IM, sender="", preview="", conversation_id=""), platform)
    doc = {"v": 1, "kind": "instant_message", "sent_at_ms": SENT_AT_MS}
    assert opened(push, platform) == doc
    assert push.collapse_key == ""


@pytest.mark.parametrize(("kind", "platform"), ALL)
def test_no_sender_preview_or_conversation_id_in_the_clear(kind: Kind, platform: str) -> None:
    push = sealed(msg(kind, badge=7, waiting_count=9), platform)
    if platform == "webpush":
        clear = received(push)  # the whole body is ciphertext
        assert isinstance(clear, bytes)
    else:
        clear = encoded(push)
    for secret in SECRETS:
        assert secret not in clear
        assert secret.decode() not in push.collapse_key
    # Kind and badge are not fields in the clear either (the fallback alert names the kind).
    assert b'"kind"' not in clear and b"instant_message" not in clear
    assert b"badge" not in clear  # the extension or the app sets it from the document


def test_each_push_is_encrypted_afresh() -> None:
    one, two = (encoded(sealed(msg(), "apns")) for _ in range(2))
    assert one != two  # a fresh salt and sender key each time


def test_sent_at_defaults_to_now() -> None:
    before = time.time_ns() // 1_000_000
    push = render(msg(), "fcm", Privacy.ENCRYPTED, token="t", keys=DEVICE.keys, grouping=GROUPING)
    assert before <= opened(push, "fcm")["sent_at_ms"] <= time.time_ns() // 1_000_000


def test_unusable_keys_are_refused_without_echoing_them() -> None:
    off_curve = DeviceKeys(p256dh=b"\x04" + b"\x02" * 64, auth=b"\x03" * 16)
    with pytest.raises(ValueError, match="keys") as caught:
        render(msg(), "apns", Privacy.ENCRYPTED, token="t", keys=off_curve, grouping=GROUPING)
    assert "\\x02" not in str(caught.value)


def test_another_device_cannot_decrypt() -> None:
    push = sealed(msg(), "apns")
    with pytest.raises(DecryptionError, match="tag"):
        opened(push, "apns", TestSubscription.generate())
    with pytest.raises(DecryptionError, match=r"relay\.enc"):
        sealed_body("apns", {"aps": {}, "relay": {"v": 1}})
    with pytest.raises(DecryptionError, match="base64url"):
        sealed_body("fcm", {"data": {"relay": '{"v":1,"enc":"a+b/"}'}})


# --- buckets and padding ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "bucket"),
    [(0, 256), (256, 256), (257, 512), (512, 512), (513, 1024), (1025, 2048), (2048, 2048)],
)
def test_the_smallest_bucket_that_holds_the_document(size: int, bucket: int) -> None:
    assert bucket_for(size) == bucket


def test_nothing_is_over_the_largest_bucket() -> None:
    assert BUCKETS == (256, 512, 1024, 2048) and MAX_DOCUMENT_BYTES == 2048
    with pytest.raises(ValueError, match="2048"):
        bucket_for(2049)


def preview_for_size(size: int) -> str:
    """A preview that makes the document exactly ``size`` bytes long."""
    base = len(document(msg(preview="x"), None, SENT_AT_MS))
    return "x" * (size - base + 1)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("bucket", BUCKETS)
def test_length_reveals_only_the_bucket(platform: str, bucket: int) -> None:
    shortest = len(document(msg(preview="x"), None, SENT_AT_MS))
    smallest = BUCKETS[BUCKETS.index(bucket) - 1] + 1 if bucket > BUCKETS[0] else shortest
    bodies = []
    for size in (smallest, bucket):
        push = sealed(msg(preview=preview_for_size(size)), platform)
        bodies.append(sealed_body(platform, received(push)))
        assert opened(push, platform)["preview"] == preview_for_size(size)
    assert {len(body) for body in bodies} == {bucket + OVERHEAD_BYTES}


def test_a_document_over_the_largest_bucket_is_cut_to_it() -> None:
    push = sealed(msg(preview="y" * 4000), "apns")
    doc = opened(push, "apns")
    assert doc["preview"].endswith(ELLIPSIS) and doc["sender"] == SENDER
    assert len(encode_json(doc)) == MAX_DOCUMENT_BYTES  # one more "y" would not fit
    assert len(sealed_body("apns", received(push))) == MAX_DOCUMENT_BYTES + OVERHEAD_BYTES


@pytest.mark.parametrize(("kind", "platform"), ALL)
def test_a_maximal_request_fits_every_platform(kind: Kind, platform: str) -> None:
    # Control characters cost 6 bytes escaped (7 inside FCM's JSON-in-a-string).
    for bad in ("\x01", '"', "😀"):
        message = msg(
            kind,
            sender=bad * 256,
            preview=bad * 4000,
            conversation_id="\x01" * 256,
            badge=2**32 - 1,
            waiting_count=2**32 - 1,
        )
        push = sealed(message, platform)
        assert len(encoded(push)) <= LIMIT_BYTES[platform]
        doc = opened(push, platform)
        assert doc["conversation_id"] == "\x01" * 256
        assert len(encode_json(doc)) <= MAX_DOCUMENT_BYTES


WORST = ["\x00", "\x1f", '"', "\\", "😀", "👨", "\u200d", "\u0301", "🇫", "\u2028", "漢"]
CHAR = st.one_of(st.characters(codec="utf-8"), st.sampled_from(WORST))


def text_up_to(max_chars: int) -> st.SearchStrategy[str]:
    unit = st.text(CHAR, min_size=1, max_size=12)
    return st.one_of(st.text(CHAR, max_size=30), unit.map(lambda u: (u * max_chars)[:max_chars]))


def graphemes(text: str) -> list[str]:
    found: list[str] = regex.findall(r"\X", text)
    return found


def is_whole_prefix(cut: str, original: str) -> bool:
    bounds = set(itertools.accumulate(len(g) for g in graphemes(original)))
    return original.startswith(cut) and (cut == "" or len(cut) in bounds)


@given(
    platform=st.sampled_from(PLATFORMS),
    kind=st.sampled_from([k for k in Kind if k is not Kind.CLEAR]),  # a CLEAR carries no text
    sender=text_up_to(256),
    preview=text_up_to(4000),
    conversation_id=text_up_to(256).map(lambda s: s.encode()[:256].decode(errors="ignore")),
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_text_fits_decrypts_and_is_cut_on_whole_graphemes(
    platform: str, kind: Kind, sender: str, preview: str, conversation_id: str
) -> None:
    message = msg(kind, sender=sender, preview=preview, conversation_id=conversation_id)
    push = sealed(message, platform)
    assert len(encoded(push)) <= LIMIT_BYTES[platform]
    body = sealed_body(platform, received(push))
    doc = opened(push, platform)
    plaintext = encode_json(doc)
    assert len(body) == bucket_for(len(plaintext)) + OVERHEAD_BYTES  # the smallest bucket
    assert doc.get("conversation_id", "") == conversation_id
    shown_sender, shown_preview = doc.get("sender", ""), doc.get("preview", "")
    for shown, original in ((shown_sender, sender), (shown_preview, preview)):
        assert shown == original or (
            shown.endswith(ELLIPSIS) and is_whole_prefix(shown[:-1], original)
        )
    if shown_sender != sender:
        assert shown_preview == ELLIPSIS  # the preview goes before the sender is touched
    if (shown_sender, shown_preview) != (sender, preview):
        whole = dict(doc, sender=sender, preview=preview)
        assert len(encode_json(whole)) > MAX_DOCUMENT_BYTES  # it would not have fitted


# --- end to end: gRPC API, real relay, fake providers ----------------------------------------

FCM_TOKEN = "fcm-token-" + "e" * 140
Stub = Any  # relay_pb2_grpc.PushRelayStub on a grpc.aio channel: its stubs type it as blocking


@pytest.fixture
async def fake_fcm(pki: TestPKI) -> AsyncIterator[FakeFCM]:
    async with FakeFCM(pki=pki) as fake:
        yield fake


@pytest.fixture
async def fake_webpush(pki: TestPKI) -> AsyncIterator[FakeWebPush]:
    async with FakeWebPush(pki=pki) as fake:
        yield fake


@pytest.fixture
async def stub(
    start_relay: Any,
    fake_apns: FakeAPNs,
    apns_key: ApnsKey,
    fake_fcm: FakeFCM,
    fake_webpush: FakeWebPush,
) -> AsyncIterator[Stub]:
    apps = [
        apns_app(fake_apns, apns_key),
        fcm_app(fake_fcm, fake_fcm.service_account()),
        webpush_app(fake_webpush),
        # Ceilings: REDACTED = ENCRYPTED in exposure, so each is served under the other.
        apns_app(fake_apns, apns_key, app_id="ios-max-redacted", maximum=Privacy.REDACTED),
        apns_app(
            fake_apns,
            apns_key,
            app_id="ios-encrypted",
            default=Privacy.ENCRYPTED,
            maximum=Privacy.ENCRYPTED,
        ),
    ]
    relay: RelayServer = await start_relay(local_config(apps))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{relay.port}") as channel:
        yield relay_pb2_grpc.PushRelayStub(channel)


def with_keys(device: pb.Device, sub: TestSubscription) -> pb.Device:
    device.keys.CopyFrom(pb.DeviceKeys(p256dh=sub.p256dh, auth=sub.auth))
    return device


def web_device(sub: FakeSubscription) -> pb.Device:
    return with_keys(pb.Device(app_id="chat-web", token=sub.endpoint), sub.subscription)


def send(*devices: pb.Device, privacy: int = pb.ENCRYPTED, **fields: Any) -> pb.SendRequest:
    notification: dict[str, Any] = {
        "kind": pb.INSTANT_MESSAGE,
        "sender_display_name": SENDER,
        "preview": PREVIEW,
        "conversation_id": CID,
        "badge": 4,
        "privacy": privacy,
    } | fields
    return pb.SendRequest(
        request_id="enc-1", notification=pb.Notification(**notification), devices=devices
    )


def results(response: pb.SendResponse) -> list[tuple[str, str]]:
    return [(pb.Outcome.Name(r.outcome), pb.Privacy.Name(r.privacy)) for r in response.results]


def assert_no_secrets(*raw: bytes) -> None:
    for chunk in raw:
        for secret in SECRETS:
            assert secret not in chunk


def header_bytes(headers: dict[str, str]) -> bytes:
    return "\n".join(f"{k}: {v}" for k, v in headers.items()).encode()


async def test_every_provider_gets_ciphertext_the_device_decrypts(
    stub: Stub,
    fake_apns: FakeAPNs,
    fake_fcm: FakeFCM,
    fake_webpush: FakeWebPush,
) -> None:
    iphone, android = TestSubscription.generate(), TestSubscription.generate()
    sub = fake_webpush.subscribe()
    before = time.time_ns() // 1_000_000
    devices = [
        with_keys(pb.Device(app_id="chat-ios", token=apns_token()), iphone),
        with_keys(pb.Device(app_id="chat-android", token=FCM_TOKEN), android),
        web_device(sub),
    ]
    response = await stub.Send(send(*devices), timeout=10)
    assert results(response) == [("DELIVERED", "ENCRYPTED")] * 3

    (apns,), (fcm,), (web,) = fake_apns.received, fake_fcm.received, fake_webpush.received
    assert_no_secrets(apns.body, header_bytes(apns.headers), fcm.body, header_bytes(fcm.headers))
    assert_no_secrets(web.body, header_bytes(web.headers))
    assert (apns.headers["apns-push-type"], apns.headers["apns-priority"]) == ("alert", "10")
    assert apns.payload is not None and apns.payload["aps"]["mutable-content"] == 1
    assert "notification" not in fcm.message

    assert apns.payload is not None
    docs = [
        iphone.decrypt_document("apns", apns.payload),
        android.decrypt_document("fcm", fcm.message),
        sub.subscription.decrypt_document("webpush", web.body),
    ]
    assert json.loads(web.plaintext or b"") == docs[2]  # the fake service's own decryption
    sent = {"v": 1, "kind": "instant_message", "sender": SENDER, "preview": PREVIEW}
    sent |= {"conversation_id": CID, "badge": 4}
    for doc in docs:
        assert before <= doc.pop("sent_at_ms") <= time.time_ns() // 1_000_000
        assert doc == sent
    assert len(web.body) == 256 + OVERHEAD_BYTES  # padded to its bucket by the adapter


async def test_a_device_without_keys_gets_redacted_and_is_told(
    stub: Stub, fake_apns: FakeAPNs, fake_fcm: FakeFCM
) -> None:
    devices = [
        pb.Device(app_id="chat-ios", token=apns_token()),
        pb.Device(app_id="chat-android", token=FCM_TOKEN),
        pb.Device(app_id="ios-encrypted", token=apns_token()),  # ENCRYPTED by default
    ]
    response = await stub.Send(send(*devices), timeout=10)
    assert results(response) == [("DELIVERED", "REDACTED")] * 3
    raws = [p.body for p in fake_apns.received] + [m.body for m in fake_fcm.received]
    assert_no_secrets(*(raw.replace(CID.encode(), b"") for raw in raws))  # REDACTED: id shown
    for push in fake_apns.received:
        assert push.payload is not None
        assert push.payload["aps"]["alert"] == {"body": "New message", "loc-key": "INSTANT_MESSAGE"}
        assert "mutable-content" not in push.payload["aps"]


@pytest.mark.parametrize(
    ("app_id", "asked", "keys", "served"),
    [
        ("ios-max-redacted", pb.ENCRYPTED, True, "ENCRYPTED"),  # same exposure as the ceiling
        ("ios-max-redacted", pb.FULL, True, "REDACTED"),
        ("ios-encrypted", pb.FULL, True, "ENCRYPTED"),  # served at the ceiling
        ("ios-encrypted", pb.PRIVACY_UNSPECIFIED, True, "ENCRYPTED"),
        ("ios-encrypted", pb.REDACTED, True, "REDACTED"),
        ("ios-encrypted", pb.ID_ONLY, True, "ID_ONLY"),
        ("ios-encrypted", pb.FULL, False, "REDACTED"),
    ],
)
async def test_ceilings_through_the_api(
    stub: Stub,
    fake_apns: FakeAPNs,
    app_id: str,
    asked: int,
    keys: bool,
    served: str,
) -> None:
    phone = TestSubscription.generate()
    device = pb.Device(app_id=app_id, token=apns_token())
    response = await stub.Send(send(with_keys(device, phone) if keys else device, privacy=asked))
    assert results(response) == [("DELIVERED", served)]
    (push,) = fake_apns.received
    assert_no_secrets(push.body.replace(CID.encode(), b"") if served != "ENCRYPTED" else push.body)
    if served == "ENCRYPTED":
        assert phone.decrypt_document("apns", push.payload or {})["preview"] == PREVIEW


@pytest.mark.parametrize("platform", PLATFORMS)
async def test_a_maximal_encrypted_request_is_accepted_by_each_provider(
    stub: Stub,
    fake_apns: FakeAPNs,
    fake_fcm: FakeFCM,
    fake_webpush: FakeWebPush,
    platform: str,
) -> None:
    phone = TestSubscription.generate()
    if platform == "webpush":
        sub = fake_webpush.subscribe()
        device, phone = web_device(sub), sub.subscription
    else:
        app_id = "chat-ios" if platform == "apns" else "chat-android"
        token = apns_token() if platform == "apns" else FCM_TOKEN
        device = with_keys(pb.Device(app_id=app_id, token=token), phone)
    request = send(
        device,
        kind=pb.MESSAGE_WAITING,
        sender_display_name="\x01" * 256,
        preview="\x01" * 4000,
        conversation_id="\x01" * 256,
        waiting_count=2**32 - 1,
    )
    assert results(await stub.Send(request, timeout=10)) == [("DELIVERED", "ENCRYPTED")]
    got: dict[str, Any] | bytes
    if platform == "apns":
        got = fake_apns.received[0].payload or {}
    elif platform == "fcm":
        got = fake_fcm.received[0].message
    else:
        got = fake_webpush.received[0].body
    doc = phone.decrypt_document(platform, got)
    assert (doc["count"], doc["conversation_id"]) == (2**32 - 1, "\x01" * 256)
    assert len(sealed_body(platform, got)) == MAX_DOCUMENT_BYTES + OVERHEAD_BYTES
