"""``push-relay demo``: the relay and the bundled fake providers in one process, on loopback.

Sends every kind in every privacy mode to every platform (APNs, FCM, Web Push) through the real
gRPC API (on iOS an incoming call goes to the app's VoIP entry, as a PushKit push), plus a dead
token for each and a push for a misconfigured app, then prints what each provider received
(Web Push: the plaintext the browser decrypts; ``ENCRYPTED`` on APNs and FCM: the ciphertext,
shortened, and the document the device decrypts from it) and each outcome. Every device has
keys, so ``ENCRYPTED`` is served as such. Exits 0 when every outcome is the one expected.
Nothing is written to disk: keys and certificates are made in memory.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from pushrelay.v1 import relay_pb2 as pb
from relay.client import RelayClient
from relay.server import RelayServer
from relay.testing.configs import apns_app, fcm_app, local_config, webpush_app
from relay.testing.credentials import ApnsKey
from relay.testing.device import DecryptionError, TestSubscription
from relay.testing.fake_apns import FakeAPNs, ReceivedPush
from relay.testing.fake_fcm import FakeFCM, ReceivedMessage
from relay.testing.fake_webpush import FakeSubscription, FakeWebPush, ReceivedWebPush
from relay.testing.tls import TestPKI

KINDS = (
    pb.INSTANT_MESSAGE,
    pb.INVITATION,
    pb.MISSED_CALL,
    pb.MESSAGE_WAITING,
    pb.INCOMING_CALL,
    pb.CLEAR,
)
MODES = (pb.FULL, pb.REDACTED, pb.ID_ONLY, pb.ENCRYPTED)
TOPIC = "com.example.chat"
APPS = {"apns": "chat-ios", "fcm": "chat-android", "webpush": "chat-web"}
VOIP_APP = "chat-ios-voip"  # a ringing call on iOS goes to the app's PushKit token


@dataclass
class Row:
    label: str
    platform: str
    request: pb.SendRequest
    expected: int
    result: pb.DeviceResult | None = None
    received: str = "-"


@dataclass
class Fakes:
    apns: FakeAPNs
    fcm: FakeFCM
    webpush: FakeWebPush
    subscriptions: dict[str, FakeSubscription] = field(default_factory=dict)
    # The phones' keys, by token: what their app would generate for the ENCRYPTED mode.
    phones: dict[str, TestSubscription] = field(default_factory=dict)

    def device(self, platform: str, app_id: str = "") -> pb.Device:
        if platform == "webpush":
            sub = self.webpush.subscribe()
            self.subscriptions[sub.endpoint] = sub
            keys = pb.DeviceKeys(p256dh=sub.keys.p256dh, auth=sub.keys.auth)
            return pb.Device(app_id=APPS[platform], token=sub.endpoint, keys=keys)
        if platform == "apns":
            token = secrets.token_hex(32)
        else:
            token = f"demo-{secrets.token_urlsafe(100)}"
        phone = self.phones[token] = TestSubscription.generate()
        keys = pb.DeviceKeys(p256dh=phone.p256dh, auth=phone.auth)
        return pb.Device(app_id=app_id or APPS[platform], token=token, keys=keys)


def _request(
    kind: pb.Kind.ValueType, privacy: pb.Privacy.ValueType, device: pb.Device
) -> pb.SendRequest:
    return pb.SendRequest(
        request_id=f"demo-{secrets.token_hex(4)}",
        notification=pb.Notification(
            kind=kind,
            sender_display_name="Alice Martin",
            preview="Are we still on for lunch at noon? 🍜",
            conversation_id="conv-7f3a",
            badge=1,
            waiting_count=3,
            privacy=privacy,
        ),
        devices=[device],
    )


def _plan(fakes: Fakes) -> list[Row]:
    rows = [
        Row(
            pb.Kind.Name(k).lower(),
            p,
            _request(k, m, fakes.device(p, _app_for(p, k))),
            pb.DELIVERED,
        )
        for p in APPS
        for k in KINDS
        for m in MODES
    ]
    for platform in APPS:
        row = Row(
            "dead token",
            platform,
            _request(pb.INSTANT_MESSAGE, pb.FULL, fakes.device(platform)),
            pb.TOKEN_INVALID,
        )
        _kill(fakes, row.request.devices[0])
        rows.append(row)
    wrong = fakes.device("apns")
    wrong.app_id = "misconfigured"
    rows.append(
        Row("wrong topic", "apns", _request(pb.INSTANT_MESSAGE, pb.FULL, wrong), pb.REJECTED)
    )
    return rows


def _app_for(platform: str, kind: pb.Kind.ValueType) -> str:
    return VOIP_APP if (platform, kind) == ("apns", pb.INCOMING_CALL) else APPS[platform]


def _kill(fakes: Fakes, device: pb.Device) -> None:
    if device.app_id == APPS["apns"]:
        fakes.apns.mark_dead(device.token, timestamp_ms=1_735_689_600_000)
    elif device.app_id == APPS["fcm"]:
        fakes.fcm.mark_dead(device.token)
    else:
        fakes.webpush.expire(fakes.subscriptions[device.token], status=410)


async def run_demo() -> int:
    """Run the demo; 0 when every outcome is as expected."""
    pki, key = TestPKI(), ApnsKey.generate()
    async with (
        FakeAPNs(pki=pki, keys=[key], topics=[TOPIC]) as apns,
        FakeFCM(pki=pki) as fcm,
        FakeWebPush(pki=pki) as webpush,
    ):
        fakes = Fakes(apns, fcm, webpush)
        config = local_config(
            [
                apns_app(apns, key),
                apns_app(apns, key, app_id=VOIP_APP, voip=True),
                apns_app(apns, key, app_id="misconfigured", topic="com.example.not-ours"),
                fcm_app(fcm, fcm.service_account()),
                webpush_app(webpush),
            ]
        )
        relay = RelayServer(config)
        await relay.start()
        try:
            rows = _plan(fakes)
            _header(relay, fakes)
            await _send_all(relay, rows)
        finally:
            await relay.stop(grace=1)
        _match(rows, fakes)
    _table(rows)
    return 0 if all(r.result and r.result.outcome == r.expected for r in rows) else 1


async def _send_all(relay: RelayServer, rows: list[Row]) -> None:
    async with RelayClient(f"127.0.0.1:{relay.port}") as client:
        for row in rows:
            response = await client.send(row.request, timeout=10)
            row.result = response.results[0]


def _match(rows: list[Row], fakes: Fakes) -> None:
    seen: dict[str, str] = {}
    for push in fakes.apns.received:
        opened = _opened(fakes.phones.get(push.token), "apns", push.payload)
        seen[push.token] = f"{_apns_headers(push)}  {_apns_body(push)}{opened}"
    for message in fakes.fcm.received:
        opened = _opened(fakes.phones.get(message.target), "fcm", message.message)
        seen[message.target] = _fcm_body(message) + opened
    for web in fakes.webpush.received:
        seen[web.endpoint] = _web_body(web)
    for row in rows:
        row.received = seen.get(row.request.devices[0].token, "-")


def _header(relay: RelayServer, fakes: Fakes) -> None:
    print("push-relay demo: the relay and three fake providers, on loopback, nothing on disk")
    print(f"  relay:         gRPC on 127.0.0.1:{relay.port} (pushrelay.v1.PushRelay)")
    print(f"  fake APNs:     {fakes.apns.url} (HTTP/2, TLS, ES256 provider tokens)")
    print(f"  fake FCM:      {fakes.fcm.url} (HTTP v1, OAuth2 service account)")
    print(f"  fake Web Push: {fakes.webpush.url} (RFC 8030, aes128gcm, VAPID)")
    print("  sender 'Alice Martin', preview 'Are we still on for lunch at noon? 🍜'\n")


def _table(rows: list[Row]) -> None:
    print(
        f"{'#':>2}  {'platform':<8} {'kind':<16} {'privacy asked → applied':<24} "
        f"{'outcome':<28} what the provider received"
    )
    for i, row in enumerate(rows, 1):
        asked = pb.Privacy.Name(row.request.notification.privacy)
        applied = pb.Privacy.Name(row.result.privacy) if row.result else "-"
        print(
            f"{i:>2}  {row.platform:<8} {row.label:<16} {asked + ' → ' + applied:<24} "
            f"{_outcome(row.result):<28} {row.received}"
        )


def _apns_headers(push: ReceivedPush) -> str:
    h = push.headers
    collapse = " collapse" if "apns-collapse-id" in h else ""
    topic = h.get("apns-topic", "")
    voip = f" {topic}" if topic.endswith(".voip") else ""
    return f"[{h.get('apns-push-type', '?')} p{h.get('apns-priority', '?')}{collapse}{voip}]"


def _outcome(result: pb.DeviceResult | None) -> str:
    if result is None:
        return "-"
    name = pb.Outcome.Name(result.outcome)
    return f"{name} ({result.reason})" if result.reason else name


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _opened(phone: TestSubscription | None, platform: str, payload: Any) -> str:
    """What the phone decrypts from an ENCRYPTED push ("" for the other modes)."""
    if phone is None or not isinstance(payload, dict) or "enc" not in _relay_of(payload):
        return ""
    try:
        document = phone.decrypt_document(platform, payload)
    except DecryptionError as exc:
        return f"  ⇒ the device cannot decrypt it: {exc}"
    return f"  ⇒ the device decrypts {_compact(document)}"


def _relay_of(payload: dict[str, Any]) -> dict[str, Any]:
    relay = payload.get("relay")
    if "data" in payload:  # FCM: the relay object is a JSON string
        relay = json.loads(payload["data"].get("relay", "{}"))
    return relay if isinstance(relay, dict) else {}


def _short_enc(relay: Any) -> Any:
    """The relay object with its ciphertext shortened for the table."""
    if isinstance(relay, dict) and isinstance(relay.get("enc"), str):
        enc = relay["enc"]
        return relay | {"enc": f"{enc[:10]}…({len(enc)} chars)"}
    return relay


def _apns_body(push: ReceivedPush) -> str:
    if push.status != 200:
        return f"HTTP {push.status} {push.reason}"
    payload: dict[str, Any] = dict(push.payload or {})
    aps = dict(payload.get("aps", {}))
    if "thread-id" in aps:
        aps["thread-id"] = aps["thread-id"][:6] + "…"  # an HMAC: shortened for the table
    return _compact({"aps": aps, "relay": _short_enc(payload.get("relay"))})


def _fcm_body(message: ReceivedMessage) -> str:
    if message.status != 200:
        return f"HTTP {message.status} {message.error_code}"
    shown = {k: v for k, v in message.message.items() if k in ("notification", "data")}
    if "data" in shown:
        shown["data"] = {"relay": _short_enc(_relay_of(message.message))}
    android = message.message.get("android", {})
    return f"[{android.get('priority', '?')}]  {_compact(shown)}"


def _web_body(web: ReceivedWebPush) -> str:
    if web.status != 201:
        return f"HTTP {web.status} {web.reason}".rstrip()
    urgency = web.headers.get("urgency", "?")
    plaintext = (web.plaintext or b"").decode()
    return f"[{urgency}, decrypted]  {plaintext}"
