"""The Web Push adapter against the fake Web Push service, plus its pure parts.

The adapter is driven directly with hand-built pushes: RFC 8291 encryption (Appendix A vector),
VAPID (aud per origin, expiry, caching, renewal), every response row of the outcome table, the
endpoint allow-list, redirects, the size limit, and what reaches the logs.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from adapters._ece import MAX_BODY_BYTES, MAX_PLAINTEXT_BYTES, OVERHEAD_BYTES, encrypt
from adapters._transport import Transport, TransportSettings
from adapters._vapid import RENEW_BEFORE_SECONDS, TOKEN_LIFETIME_SECONDS, VapidSigner
from adapters.base import DeviceKeys, Outcome, Push, Verdict
from adapters.webpush import (
    WebPushAdapter,
    WebPushSettings,
    _parse_endpoint,
    _retry_after,
    check_endpoint,
)
from relay.testing.device import DecryptionError, TestSubscription
from relay.testing.fake_webpush import FakeSubscription, FakeWebPush
from relay.testing.proxy import ConnectProxy
from relay.testing.tls import TestPKI
from tests.support import FakeClock

SUBJECT = "mailto:ops@example.com"
PAYLOAD = b'{"relay":{"v":1,"kind":"instant_message"},"title":"Alice","body":"Lunch?"}'
TOPIC = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"


def b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


VAPID_KEY = ec.generate_private_key(ec.SECP256R1())
VAPID_PEM = key_pem(VAPID_KEY)


Clock = FakeClock
EPOCH_NOW = 1_900_000_000.0  # the adapter and the fake share the clock: epoch seconds


def settings(*allowed: str, ca_pem: bytes = b"", **overrides: object) -> WebPushSettings:
    values: dict[str, object] = {
        "app_id": "chat-web",
        "vapid_private_key_pem": VAPID_PEM,
        "subject": SUBJECT,
        "allowed_endpoints": allowed,
        "ca_pem": ca_pem,
    }
    values.update(overrides)
    return WebPushSettings(**values)  # type: ignore[arg-type]


def push(sub: FakeSubscription, payload: bytes = PAYLOAD, **fields: Any) -> Push:
    values: dict[str, Any] = {"token": sub.endpoint, "ttl_seconds": 60, "keys": sub.keys}
    values.update(fields)
    return Push(payload=payload, **values)


@pytest.fixture
def clock() -> Clock:
    return Clock(EPOCH_NOW)


@pytest.fixture
async def wp(pki: TestPKI, clock: Clock) -> AsyncIterator[FakeWebPush]:
    async with FakeWebPush(pki=pki, clock=clock) as fake:
        yield fake


@pytest.fixture
async def adapter(wp: FakeWebPush, clock: Clock) -> AsyncIterator[WebPushAdapter]:
    adapter = await WebPushAdapter.create(settings(wp.host, ca_pem=wp.ca_pem), clock=clock)
    yield adapter
    await adapter.aclose()


# -- RFC 8291 encryption -------------------------------------------------------------------

# RFC 8291 Appendix A.
VECTOR_PLAINTEXT = b"When I grow up, I want to be a watermelon"
VECTOR_AUTH = b64("BTBZMqHH6r4Tts7J_aSIgg")
VECTOR_UA_PRIVATE = b64("q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94")
VECTOR_UA_PUBLIC = b64(
    "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4"
)
VECTOR_AS_PRIVATE = b64("yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw")
VECTOR_SALT = b64("DGv6ra1nlYgDCS1FRnbzlw")
VECTOR_BODY = b64(
    "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmY"
    "WAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSg"
    "Sxsj_Qulcy4a-fN"
)


def vector_device() -> TestSubscription:
    return TestSubscription.from_private_bytes(VECTOR_UA_PRIVATE, VECTOR_AUTH)


def test_encrypt_reproduces_the_rfc8291_test_vector() -> None:
    sender = ec.derive_private_key(int.from_bytes(VECTOR_AS_PRIVATE, "big"), ec.SECP256R1())
    keys = DeviceKeys(p256dh=VECTOR_UA_PUBLIC, auth=VECTOR_AUTH)
    body = encrypt(VECTOR_PLAINTEXT, keys, salt=VECTOR_SALT, sender_key=sender)
    assert body == VECTOR_BODY


def test_device_decrypts_the_rfc8291_test_vector() -> None:
    device = vector_device()
    assert device.p256dh == VECTOR_UA_PUBLIC
    assert device.decrypt(VECTOR_BODY) == VECTOR_PLAINTEXT


@pytest.mark.parametrize("plaintext", [b"", b"x", b"ends in zeros\x00\x00", bytes(range(256))])
@pytest.mark.parametrize("pad_to", [0, 100, 1024])
def test_encrypt_pads_to_a_bucket_and_round_trips(plaintext: bytes, pad_to: int) -> None:
    device = TestSubscription.generate()
    body = encrypt(plaintext, device.keys, pad_to=pad_to)
    assert len(body) == OVERHEAD_BYTES + max(len(plaintext), pad_to)
    assert device.decrypt(body) == plaintext


def test_each_message_gets_a_fresh_salt_and_sender_key() -> None:
    device = TestSubscription.generate()
    first, second = encrypt(b"same", device.keys), encrypt(b"same", device.keys)
    assert first[:16] != second[:16] and first[21:86] != second[21:86]


def test_encrypt_refuses_keys_off_the_curve_or_of_the_wrong_size() -> None:
    device = TestSubscription.generate()
    with pytest.raises(ValueError):
        encrypt(b"x", DeviceKeys(p256dh=b"\x04" + b"\x01" * 64, auth=device.auth))
    with pytest.raises(ValueError):
        encrypt(b"x", DeviceKeys(p256dh=device.p256dh, auth=b"short"))


def test_device_refuses_what_a_receiver_must_refuse() -> None:
    device = TestSubscription.generate()
    body = encrypt(b"hello", device.keys)
    with pytest.raises(DecryptionError, match="tag"):
        TestSubscription.generate().decrypt(body)  # someone else's keys
    with pytest.raises(DecryptionError, match="tag"):
        device.decrypt(body[:-1] + bytes([body[-1] ^ 1]))
    with pytest.raises(DecryptionError, match="idlen"):
        device.decrypt(body[:20] + b"\x40" + body[21:])
    with pytest.raises(DecryptionError, match="one record"):
        device.decrypt(body[:16] + (18).to_bytes(4, "big") + body[20:])
    with pytest.raises(DecryptionError, match="shorter"):
        device.decrypt(body[:90])


def test_device_refuses_a_record_not_ending_in_the_final_delimiter() -> None:
    device = TestSubscription.generate()
    # A plaintext ending in 0x01 plus zero padding, with no 0x02: what a non-final record holds.
    body = encrypt(b"hello\x01", device.keys)
    tampered = _reencrypt_without_delimiter(device, body)
    with pytest.raises(DecryptionError, match="delimiter"):
        device.decrypt(tampered)


def _reencrypt_without_delimiter(device: TestSubscription, body: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from adapters._ece import _derive

    sender = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), body[21:86])
    secret = device.private_key.exchange(ec.ECDH(), sender)
    key, nonce = _derive(secret, device.auth, device.p256dh, body[21:86], body[:16])
    return body[:86] + AESGCM(key).encrypt(nonce, b"hello\x01\x00\x00", None)


# -- delivery ----------------------------------------------------------------------------------


async def test_delivers_an_encrypted_signed_push(wp: FakeWebPush, adapter: WebPushAdapter) -> None:
    sub = wp.subscribe()
    outcome = await adapter.send(push(sub))
    assert outcome.verdict is Verdict.DELIVERED
    assert outcome.provider_message_id.startswith(f"{wp.url}/message/")
    [received] = wp.received
    assert (received.status, received.plaintext) == (201, PAYLOAD)
    assert received.headers["ttl"] == "60"
    assert received.headers["urgency"] == "high"
    assert received.headers["content-encoding"] == "aes128gcm"
    assert received.headers[":path"] == f"/push/{sub.id}"
    assert "topic" not in received.headers
    assert received.vapid_claims is not None and received.vapid_claims["sub"] == SUBJECT
    assert wp.inbox(sub) == [received]


async def test_headers_follow_the_push(wp: FakeWebPush, adapter: WebPushAdapter) -> None:
    sub = wp.subscribe()
    low = push(sub, ttl_seconds=0, high_priority=False, collapse_key=TOPIC)
    assert (await adapter.send(low)).verdict is Verdict.DELIVERED
    assert (
        await adapter.send(push(sub, b"newer", collapse_key=TOPIC))
    ).verdict is Verdict.DELIVERED
    first = wp.received[0]
    assert (first.headers["ttl"], first.headers["urgency"]) == ("0", "normal")
    assert first.headers["topic"] == TOPIC
    assert [m.plaintext for m in wp.inbox(sub)] == [b"newer"]  # same Topic replaced the older


async def test_concurrent_pushes_share_one_http2_connection(
    wp: FakeWebPush, adapter: WebPushAdapter
) -> None:
    subs = [wp.subscribe() for _ in range(20)]
    outcomes = await asyncio.gather(*(adapter.send(push(s, s.id.encode())) for s in subs))
    assert {o.verdict for o in outcomes} == {Verdict.DELIVERED}
    assert {r.plaintext for r in wp.received} == {s.id.encode() for s in subs}
    assert {r.connection for r in wp.received} == {1}


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        (("expire", 410), Outcome(Verdict.TOKEN_INVALID, "Gone")),
        (("expire", 404), Outcome(Verdict.TOKEN_INVALID, "NotFound")),
        (
            ("inject", 429, 7),
            Outcome(Verdict.RATE_LIMITED, "TooManyRequests", retry_after_seconds=7),
        ),
        (("inject", 500, None), Outcome.unavailable("InternalServerError")),
        (("inject", 503, 3), Outcome.unavailable("ServiceUnavailable", retry_after=3)),
        (("inject", 400, None), Outcome(Verdict.REJECTED, "BadWebPushRequest")),
        (("inject", 202, None), Outcome(Verdict.DELIVERED)),  # UnifiedPush: any 2xx
    ],
)
async def test_provider_answers_map_to_outcomes(
    wp: FakeWebPush, adapter: WebPushAdapter, script: tuple[object, ...], expected: Outcome
) -> None:
    sub = wp.subscribe()
    if script[0] == "expire":
        wp.expire(sub, status=int(script[1]))  # type: ignore[call-overload]
    else:
        wp.inject(int(script[1]), retry_after=script[2])  # type: ignore[call-overload, arg-type]
    assert await adapter.send(push(sub)) == expected
    assert len(wp.received) == 1


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_redirects_are_never_followed(
    wp: FakeWebPush, adapter: WebPushAdapter, status: int
) -> None:
    sub = wp.subscribe()
    wp.inject(status, location=wp.subscribe().endpoint)
    assert await adapter.send(push(sub)) == Outcome(Verdict.REJECTED, "Redirect")
    assert [r.subscription_id for r in wp.received] == [sub.id]


async def test_largest_body_is_accepted_and_one_byte_more_is_413(
    wp: FakeWebPush, adapter: WebPushAdapter
) -> None:
    sub = wp.subscribe()
    largest = b"x" * MAX_PLAINTEXT_BYTES
    assert (await adapter.send(push(sub, largest))).verdict is Verdict.DELIVERED
    assert len(wp.received[0].body) == MAX_BODY_BYTES
    assert wp.received[0].plaintext == largest
    too_big = await adapter.send(push(sub, largest + b"x"))
    assert too_big == Outcome(Verdict.REJECTED, "PayloadTooLarge")
    assert (wp.received[1].status, len(wp.received[1].body)) == (413, MAX_BODY_BYTES + 1)


async def test_a_cut_connection_is_retryable_unavailable(
    wp: FakeWebPush, adapter: WebPushAdapter
) -> None:
    sub = wp.subscribe()
    wp.drop_next()
    outcome = await adapter.send(push(sub))
    assert (outcome.verdict, outcome.retryable) == (Verdict.UNAVAILABLE, True)
    assert (await adapter.send(push(sub))).verdict is Verdict.DELIVERED  # a new connection


async def test_a_stalled_service_times_out_as_unavailable(wp: FakeWebPush, pki: TestPKI) -> None:
    sub = wp.subscribe()
    wp.stall(sub)
    transport = Transport(TransportSettings(ca_pem=wp.ca_pem, timeout_seconds=0.2))
    adapter = await WebPushAdapter.create(settings(wp.host), transport=transport)
    assert await adapter.send(push(sub)) == Outcome.unavailable("Timeout")
    await adapter.aclose()
    assert not transport.closed  # an injected transport belongs to the caller
    await transport.aclose()
    wp.clear()


async def test_the_service_certificate_is_verified(wp: FakeWebPush) -> None:
    adapter = await WebPushAdapter.create(settings(wp.host))  # the fake's CA not trusted
    outcome = await adapter.send(push(wp.subscribe()))
    await adapter.aclose()
    assert outcome == Outcome.unavailable("ConnectFailed")
    assert wp.received == []


async def test_pushes_go_through_the_configured_proxy(wp: FakeWebPush, clock: Clock) -> None:
    async with ConnectProxy() as proxy:
        adapter = await WebPushAdapter.create(
            settings(wp.host, ca_pem=wp.ca_pem, proxy=proxy.url), clock=clock
        )
        outcome = await adapter.send(push(wp.subscribe()))
        await adapter.aclose()
    assert outcome.verdict is Verdict.DELIVERED
    assert proxy.connects == [f"{wp.host}:{wp.port}"]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"keys": None}, "MissingKeys"),
        ({"keys": DeviceKeys(p256dh=b"\x04" + b"\x01" * 64, auth=b"a" * 16)}, "InvalidKeys"),
        ({"collapse_key": "not a topic!"}, "BadTopic"),
        ({"collapse_key": "A" * 33}, "BadTopic"),
    ],
)
async def test_unsendable_pushes_are_rejected_without_sending(
    wp: FakeWebPush, adapter: WebPushAdapter, fields: dict[str, Any], reason: str
) -> None:
    assert await adapter.send(push(wp.subscribe(), **fields)) == Outcome(Verdict.REJECTED, reason)
    assert wp.received == []


# -- VAPID -------------------------------------------------------------------------------------


async def test_vapid_token_is_per_origin_and_cached(
    pki: TestPKI, wp: FakeWebPush, clock: Clock
) -> None:
    async with FakeWebPush(pki=pki, clock=clock) as other:
        adapter = await WebPushAdapter.create(settings(wp.host, ca_pem=pki.ca_pem), clock=clock)
        try:
            for fake in (wp, other, wp, other):
                assert (await adapter.send(push(fake.subscribe()))).verdict is Verdict.DELIVERED
        finally:
            await adapter.aclose()
        for fake in (wp, other):
            first, again = fake.received
            assert first.vapid_claims is not None
            assert first.vapid_claims["aud"] == fake.url
            assert 0 < first.vapid_claims["exp"] - clock.now <= 24 * 3600
            assert first.headers["authorization"] == again.headers["authorization"]
        assert wp.received[0].headers["authorization"] != other.received[0].headers["authorization"]


async def test_vapid_token_is_renewed_before_it_expires(
    wp: FakeWebPush, adapter: WebPushAdapter, clock: Clock
) -> None:
    sub = wp.subscribe()
    await adapter.send(push(sub))
    clock.now += TOKEN_LIFETIME_SECONDS - RENEW_BEFORE_SECONDS - 1
    await adapter.send(push(sub))
    clock.now += 2
    assert (await adapter.send(push(sub))).verdict is Verdict.DELIVERED
    first, reused, renewed = (r.headers["authorization"] for r in wp.received)
    assert first == reused != renewed
    assert wp.received[2].vapid_claims is not None
    assert wp.received[2].vapid_claims["exp"] == int(clock.now) + TOKEN_LIFETIME_SECONDS


def test_vapid_header_carries_a_verifiable_es256_token() -> None:
    clock = Clock(EPOCH_NOW)
    signer = VapidSigner(VAPID_KEY, SUBJECT, clock=clock)
    header, fresh = signer.authorization("https://push.example.com")
    assert fresh and header.startswith("vapid t=")
    token, key = header.removeprefix("vapid t=").split(", k=")
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b64(key))
    claims = jwt.decode(
        token,
        public,
        algorithms=["ES256"],
        audience="https://push.example.com",
        options={"verify_exp": False},
    )
    assert claims["sub"] == SUBJECT and claims["exp"] - clock.now <= 24 * 3600
    assert jwt.get_unverified_header(token)["typ"] == "JWT"
    assert signer.authorization("https://push.example.com") == (header, False)


async def test_a_refused_cached_token_is_resigned_once_then_rejected(
    wp: FakeWebPush, adapter: WebPushAdapter
) -> None:
    await adapter.send(push(wp.subscribe()))  # caches a token for the fake's origin
    other_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    restricted = wp.subscribe(
        application_server_key=other_key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    )
    assert await adapter.send(push(restricted)) == Outcome(Verdict.REJECTED, "VapidPkHashMismatch")
    cached, fresh = (r.headers["authorization"] for r in wp.received[1:])
    assert cached == wp.received[0].headers["authorization"] != fresh


async def test_subscription_restricted_to_our_key_accepts_it(
    wp: FakeWebPush, adapter: WebPushAdapter
) -> None:
    sub = wp.subscribe(application_server_key=adapter.vapid_public_key)
    assert (await adapter.send(push(sub))).verdict is Verdict.DELIVERED
    wp.vapid_public_key = adapter.vapid_public_key  # every new subscription restricted to it
    assert wp.subscribe().application_server_key == b64(adapter.vapid_public_key)
    assert (await adapter.send(push(wp.subscribe()))).verdict is Verdict.DELIVERED


@pytest.mark.parametrize(
    ("pem", "subject"),
    [
        (b"not a key", SUBJECT),
        (key_pem(ec.generate_private_key(ec.SECP384R1())), SUBJECT),
        (key_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)), SUBJECT),
        (VAPID_PEM, "ops@example.com"),
    ],
)
async def test_create_names_the_app_when_vapid_settings_are_unusable(
    pem: bytes, subject: str
) -> None:
    with pytest.raises(ValueError, match="chat-web") as caught:
        await WebPushAdapter.create(
            settings("push.example.com", vapid_private_key_pem=pem, subject=subject)
        )
    assert "BEGIN" not in str(caught.value)


# -- endpoint allow-list -----------------------------------------------------------------------

ALLOWED = ("*.push.example.com", "fcm.googleapis.com", "wns?.notify.example.net")


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://fcm.googleapis.com/fcm/send/abc",
        "https://FCM.googleapis.com:443/fcm/send/abc",
        "https://fcm.googleapis.com:8443/fcm/send/abc",  # any port on an allowed host
        "https://updates.push.example.com/wpush/v2/abc",
        "https://a.b.push.example.com/x",
        "https://wns2.notify.example.net/w/?token=abc",
    ],
)
def test_allowed_endpoints(endpoint: str) -> None:
    assert check_endpoint(settings(*ALLOWED), endpoint) is None


@pytest.mark.parametrize(
    ("endpoint", "problem"),
    [
        ("https://push.example.com/x", "not in allowed_endpoints"),  # *. needs a subdomain
        ("https://evilpush.example.com/x", "not in allowed_endpoints"),
        ("https://push.example.com.evil.net/x", "not in allowed_endpoints"),
        ("https://fcm.googleapis.com.evil.net/x", "not in allowed_endpoints"),
        ("https://evil.net/fcm.googleapis.com/x", "not in allowed_endpoints"),
        ("https://wns22.notify.example.net/w", "not in allowed_endpoints"),
        ("https://[::1]:8443/x", "not in allowed_endpoints"),
        ("http://fcm.googleapis.com/fcm/send/abc", "must be an https URL"),
        ("wss://fcm.googleapis.com/x", "must be an https URL"),
        ("//fcm.googleapis.com/x", "must be an https URL"),
        ("fcm.googleapis.com/x", "must be an https URL"),
        ("https:///x", "must be an https URL"),
        ("https://fcm.googleapis.com:99999/x", "must be an https URL"),
        ("https://fcm.googleapis.com./x", "must be an https URL"),
        ("https://fcm.goo gleapis.com/x", "must be an https URL"),
        ("https://fcm.googleapis.com/x\n", "must be an https URL"),
        ("https://fcm.googleapis.com%2f@evil.net/x", "must not contain credentials"),
        ("https://user:pw@fcm.googleapis.com/x", "must not contain credentials"),
        ("https://fcm.googleapis.com\\@evil.net/x", "must not contain credentials"),
        ("https://fcm.googleapis.com/" + "x" * 3000, "longer than"),
    ],
)
def test_refused_endpoints(endpoint: str, problem: str) -> None:
    message = check_endpoint(settings(*ALLOWED), endpoint)
    assert message is not None and message.startswith("token: ") and problem in message
    assert "googleapis" not in message and "evil" not in message  # never echoes the URL


@pytest.mark.parametrize(
    ("endpoint", "url", "origin"),
    [
        (
            "https://A.Push.example.com/w/abc?x=1#fragment",
            "https://a.push.example.com/w/abc?x=1",
            "https://a.push.example.com",
        ),
        (
            "HTTPS://a.push.example.com:443/w",
            "https://a.push.example.com/w",
            "https://a.push.example.com",
        ),
        (
            "https://a.push.example.com:8443",
            "https://a.push.example.com:8443/",
            "https://a.push.example.com:8443",
        ),
        (
            'https://a.push.example.com/w/"{x}"|^`\\?q=<1>',
            "https://a.push.example.com/w/%22%7Bx%7D%22%7C%5E%60%5C?q=%3C1%3E",
            "https://a.push.example.com",
        ),
        (
            "https://a.push.example.com/w/%2F%zz",
            "https://a.push.example.com/w/%2F%zz",
            "https://a.push.example.com",
        ),
    ],
)
def test_libcurl_is_given_the_url_rebuilt_from_the_checked_parts(
    endpoint: str, url: str, origin: str
) -> None:
    """Host lower-cased, https's port dropped (the VAPID audience is the origin), a fragment
    never sent, and what RFC 3986 allows nowhere percent-encoded, as browsers do."""
    assert check_endpoint(settings(*ALLOWED), endpoint) is None
    parsed = _parse_endpoint(endpoint)
    assert not isinstance(parsed, str)
    assert (parsed.url, parsed.origin) == (url, origin)


def test_an_empty_allow_list_denies_everything() -> None:
    assert check_endpoint(settings(), "https://fcm.googleapis.com/x") is not None


@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_a_refused_endpoint_sends_nothing(pki: TestPKI, wp: FakeWebPush, scheme: str) -> None:
    adapter = await WebPushAdapter.create(settings("push.example.com", ca_pem=pki.ca_pem))
    sub = wp.subscribe()
    endpoint = sub.endpoint.replace("https://", f"{scheme}://")
    outcome = await adapter.send(push(sub, token=endpoint))
    await adapter.aclose()
    assert outcome == Outcome(Verdict.REJECTED, "EndpointNotAllowed")
    assert wp.received == []


# -- logs, lifecycle, parsing ------------------------------------------------------------------


async def test_no_endpoint_or_key_material_in_logs(
    wp: FakeWebPush, adapter: WebPushAdapter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="adapters")
    sub = wp.subscribe()
    await adapter.send(push(sub))
    wp.drop_next()
    await adapter.send(push(sub))
    wp.inject(403, count=2, reason="BadJwtToken")  # refused, re-signed, refused again
    await adapter.send(push(sub))
    assert caplog.records, "expected the VAPID warning"
    secrets = [sub.endpoint, sub.id, VAPID_PEM.decode()]
    secrets += [base64.urlsafe_b64encode(k).decode().rstrip("=") for k in (sub.keys.p256dh,)]
    secrets += [base64.urlsafe_b64encode(sub.keys.auth).decode().rstrip("=")]
    secrets += [r.headers["authorization"].split("t=")[1].split(",")[0] for r in wp.received]
    lines = [caplog.text] + [repr(vars(record)) for record in caplog.records]
    for secret in secrets:
        assert not any(secret in line for line in lines)


async def test_aclose_is_idempotent_and_clears_ready(wp: FakeWebPush) -> None:
    adapter = await WebPushAdapter.create(settings(wp.host, ca_pem=wp.ca_pem))
    assert adapter.ready
    await adapter.aclose()
    await adapter.aclose()
    assert not adapter.ready
    assert await adapter.send(push(wp.subscribe())) == Outcome.unavailable(
        "AdapterClosed", retryable=False
    )


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, 0), ("", 0), ("12", 12), (" 5 ", 5), ("soon", 0), ("99999999", 86400)],
)
def test_retry_after_parsing(value: str | None, seconds: int) -> None:
    assert _retry_after(value) == seconds


def test_retry_after_accepts_an_http_date_in_the_past_as_zero() -> None:
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0


# -- the fake's own checks (what a push service would refuse) ----------------------------------


async def test_fake_refuses_malformed_requests(wp: FakeWebPush, clock: Clock) -> None:
    sub = wp.subscribe()
    signer = VapidSigner(VAPID_KEY, SUBJECT, clock=clock)
    auth, _ = signer.authorization(wp.url)
    body = encrypt(b"hi", sub.keys)
    good = {"ttl": "60", "content-encoding": "aes128gcm", "authorization": auth}
    nospace = auth.replace(", k=", ",k=")
    stale = VapidSigner(VAPID_KEY, SUBJECT, clock=lambda: clock.now - 13 * 3600)
    far = VapidSigner(VAPID_KEY, SUBJECT, clock=lambda: clock.now + 13 * 3600)
    wrong_aud, _ = signer.authorization("https://127.0.0.1:1")
    cases: list[tuple[dict[str, str | None], bytes, int, str]] = [
        ({}, body, 201, ""),
        ({"authorization": nospace}, body, 201, ""),
        ({"authorization": None}, body, 401, "MissingAuthorization"),
        ({"authorization": "Bearer x"}, body, 401, "BadAuthorizationHeader"),
        ({"authorization": wrong_aud}, body, 403, "BadJwtToken"),
        ({"authorization": stale.authorization(wp.url)[0]}, body, 403, "BadJwtToken"),
        ({"authorization": far.authorization(wp.url)[0]}, body, 403, "BadJwtToken"),
        ({"ttl": None}, body, 400, "BadTtl"),
        ({"urgency": "urgent"}, body, 400, "BadUrgency"),
        ({"topic": "A" * 33}, body, 400, "BadWebPushTopic"),
        ({"content-encoding": "aesgcm"}, body, 400, "BadContentEncoding"),
        ({}, body[:-1], 400, "DecryptionFailed"),
    ]
    async with httpx.AsyncClient(http2=True, verify=_context(wp)) as client:
        for overrides, content, status, reason in cases:
            headers = {k: v for k, v in {**good, **overrides}.items() if v is not None}
            response = await client.post(sub.endpoint, content=content, headers=headers)
            assert (response.status_code, wp.received[-1].reason) == (status, reason), overrides
        response = await client.get(sub.endpoint)
        assert response.status_code == 405
        response = await client.post(f"{wp.url}/push/unknown", content=body, headers=good)
        assert response.status_code == 404


def _context(wp: FakeWebPush) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=wp.ca_pem.decode("ascii"))
