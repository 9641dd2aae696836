"""Nothing a request carries leaks, and providers read only what each privacy mode allows.

Every request carries its own canaries: unique strings as sender, preview and conversation id,
and unique device tokens. They travel every path: success on each platform in each privacy
mode and kind, each provider error (some echoing the token back), validation errors, deadline
expiry, and an adapter raising with the canaries in its exception text. Then none of them may
appear in the logs (JSON lines, relay and protocol libraries at DEBUG), in ``/metrics``, in a
gRPC error message or in a result's reason; and what each fake provider received is checked
against the mode the relay reports it applied (``DeviceResult.privacy``): outside ``FULL`` the
sender and the preview are nowhere in the bytes Apple or Google received (or, for Web Push, in
the decrypted document); the raw conversation id appears only as ``relay.conversation_id`` (on
purpose, outside ``ENCRYPTED``), never in a grouping key, which must be the keyed HMAC.

``tests/test_no_writes.py`` drives the same mix through a real ``push-relay serve``.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import logging
import secrets
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest

from adapters import ADAPTERS
from adapters.base import Push, encode_json
from adapters.fcm import FcmAdapter
from pushrelay.v1 import relay_pb2 as pb
from pushrelay.v1 import relay_pb2_grpc
from relay import logs
from relay.dispatch import MAX_ATTEMPTS
from relay.render import GroupingKeys
from relay.server import RelayServer, grouping_keys
from relay.testing.configs import apns_app, fcm_app, local_config, webpush_app
from relay.testing.credentials import ApnsKey
from relay.testing.device import TestSubscription
from relay.testing.fake_apns import FakeAPNs
from relay.testing.fake_fcm import FakeFCM, ServiceAccount
from relay.testing.fake_webpush import FakeSubscription, FakeWebPush
from relay.testing.tls import TestPKI
from tests.support import TOPIC

HMAC_KEY = b"push-relay leak-test grouping key, 32+ bytes"
KINDS = (
    pb.INSTANT_MESSAGE,
    pb.INVITATION,
    pb.MISSED_CALL,
    pb.MESSAGE_WAITING,
    pb.INCOMING_CALL,  # on iOS to the VoIP app (ios_for)
    pb.CLEAR,
)
VOIP_APP = "chat-ios-voip"
MODES = (pb.FULL, pb.REDACTED, pb.ID_ONLY, pb.ENCRYPTED)
PURPOSES = ("thread", "instant_message", "invitation", "missed_call", "message_waiting")
RAISE_CUE = "raise-"  # FCM tokens starting with this make CueRaisingFcm raise


def canary(label: str) -> str:
    """A unique string no code path could produce by chance (plain alphanumerics, so that no
    encoding along the way, JSON or URL, hides it from a substring search)."""
    return f"{label}Q{secrets.token_hex(8)}"


@dataclass
class Fakes:
    """The three fake providers and what a relay needs to reach them."""

    apns: FakeAPNs
    fcm: FakeFCM
    webpush: FakeWebPush
    apns_key: ApnsKey
    account: ServiceAccount


@asynccontextmanager
async def running_fakes(pki: TestPKI, apns_key: ApnsKey) -> AsyncIterator[Fakes]:
    async with AsyncExitStack() as stack:
        apns = await stack.enter_async_context(FakeAPNs(pki=pki, keys=[apns_key], topics=[TOPIC]))
        fcm = await stack.enter_async_context(FakeFCM(pki=pki))
        webpush = await stack.enter_async_context(FakeWebPush(pki=pki))
        yield Fakes(apns, fcm, webpush, apns_key, fcm.service_account())


@dataclass
class Sent:
    """One request of the mix, what it carried and what came back."""

    request: pb.SendRequest
    response: pb.SendResponse | None = None
    error: str = ""  # the gRPC error's code and details, when the call failed

    def applied(self, token: str) -> int:
        """The privacy mode the relay reports it applied to the device with ``token``."""
        assert self.response is not None
        for device, result in zip(self.request.devices, self.response.results, strict=True):
            if device.token == token:
                return result.privacy
        raise KeyError(token)


@dataclass
class Mix:
    """Everything sent, by device token, and every secret that must not leak."""

    sent: list[Sent] = field(default_factory=list)
    by_token: dict[str, Sent] = field(default_factory=dict)
    secrets: set[str] = field(default_factory=set)

    def add(self, request: pb.SendRequest) -> Sent:
        sent = Sent(request)
        self.sent.append(sent)
        n = request.notification
        self.secrets.update(s for s in (n.sender_display_name, n.preview, n.conversation_id) if s)
        for device in request.devices:
            self.by_token[device.token] = sent
            self.secrets.add(device.token)
        return sent

    def leaked(self, text: str) -> list[str]:
        return sorted(s for s in self.secrets if s in text)


def device_keys() -> pb.DeviceKeys:
    keys = TestSubscription.generate().keys
    return pb.DeviceKeys(p256dh=keys.p256dh, auth=keys.auth)


def ios(token: str | None = None) -> pb.Device:
    # Keys on every device, so ENCRYPTED is served wherever the relay can serve it.
    return pb.Device(app_id="chat-ios", token=token or secrets.token_hex(32), keys=device_keys())


def ios_for(kind: int) -> pb.Device:
    """An iPhone's device for ``kind``: a ringing call goes to the app's PushKit token."""
    device = ios()
    if kind == pb.INCOMING_CALL:
        device.app_id = VOIP_APP
    return device


def android(token: str | None = None) -> pb.Device:
    return pb.Device(app_id="chat-android", token=token or canary("fcmtoken"), keys=device_keys())


def web(sub: FakeSubscription) -> pb.Device:
    keys = pb.DeviceKeys(p256dh=sub.keys.p256dh, auth=sub.keys.auth)
    return pb.Device(app_id="chat-web", token=sub.endpoint, keys=keys)


def notification(kind: int = pb.INSTANT_MESSAGE, privacy: int = pb.FULL, **fields: Any) -> Any:
    values = {
        "kind": kind,
        "privacy": privacy,
        "sender_display_name": canary("sender"),
        "preview": canary("preview"),
        "conversation_id": canary("conv"),
        "badge": 2,
        "waiting_count": 3 if kind == pb.MESSAGE_WAITING else 0,
        **fields,
    }
    return pb.Notification(**values)


class Sender:
    """Sends requests of the mix and records each, with its answer or its error."""

    def __init__(self, stub: relay_pb2_grpc.PushRelayStub, mix: Mix, prefix: str = "mix") -> None:
        self.stub = stub
        self.mix = mix
        self._prefix = prefix
        self._ids = itertools.count(1)

    def request(self, *devices: pb.Device, **notification_fields: Any) -> pb.SendRequest:
        return pb.SendRequest(
            request_id=f"{self._prefix}-{next(self._ids)}",  # logged by design: no canary
            notification=notification(**notification_fields),
            devices=list(devices),
        )

    async def send(self, *devices: pb.Device, timeout: float = 10, **fields: Any) -> Sent:
        sent = self.mix.add(self.request(*devices, **fields))
        try:
            sent.response = await self.stub.Send(sent.request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            sent.error = f"{error.code().name}: {error.details()}"
        return sent

    async def stream(self, *requests: pb.SendRequest) -> None:
        sents = {r.request_id: self.mix.add(r) for r in requests}
        async for answer in self.stub.SendStream(iter(requests), timeout=10):
            sents[answer.request_id].response = answer


async def send_mix(stub: relay_pb2_grpc.PushRelayStub, fakes: Fakes, *, raising: bool) -> Mix:
    """Every kind × platform × privacy mode, every error path; see the module docstring."""
    mix = Mix()
    sender = Sender(stub, mix)
    await _matrix(sender, fakes)
    await _provider_errors(sender, fakes)
    await _validation_errors(sender, fakes)
    await _deadline_expiry(sender, fakes)
    if raising:
        sent = await sender.send(android(RAISE_CUE + canary("tok")))
        assert _outcomes(sent) == [("UNAVAILABLE", "InternalError")]
    return mix


async def _matrix(sender: Sender, fakes: Fakes) -> None:
    sends = [
        sender.send(
            ios_for(kind), android(), web(fakes.webpush.subscribe()), kind=kind, privacy=mode
        )
        for kind in KINDS
        for mode in MODES
    ]
    for sent in await asyncio.gather(*sends):
        assert not sent.error, sent.error
        assert {o for o, _ in _outcomes(sent)} == {"DELIVERED"}, _outcomes(sent)
    stream = [
        sender.request(ios(), android(), web(fakes.webpush.subscribe()), privacy=mode)
        for mode in MODES
    ]
    bad = sender.request(ios("zz" + canary("badtoken")))  # refused whole, inside the stream
    await sender.stream(*stream, bad)


async def _provider_errors(sender: Sender, fakes: Fakes) -> None:
    # Scripted per token: these may run together.
    dead, bad = secrets.token_hex(32), secrets.token_hex(32)
    fakes.apns.mark_dead(dead)
    fakes.apns.script(bad, 400, "BadDeviceToken")
    gone, unknown = canary("fcmdead"), canary("fcmbad")
    fakes.fcm.mark_dead(gone)
    # A provider echoing the request in its error message: the message must go nowhere.
    fakes.fcm.script(unknown, 400, "INVALID_ARGUMENT", message=f"Invalid value {unknown}")
    expired = fakes.webpush.subscribe()
    fakes.webpush.expire(expired, 410)
    scripted = await asyncio.gather(
        sender.send(ios(dead), ios(bad)),
        sender.send(android(gone), android(unknown)),
        sender.send(web(expired)),
    )
    assert [_verdicts(sent) for sent in scripted] == [
        ["TOKEN_INVALID", "TOKEN_INVALID"],
        ["TOKEN_INVALID", "REJECTED"],
        ["TOKEN_INVALID"],
    ]
    # Injected answers go to whichever request comes next: one request at a time, each
    # consuming all of its answers (a 5xx is sent MAX_ATTEMPTS times; the rest once).
    injected = [
        (fakes.apns.inject, (429, "TooManyRequests"), {"retry_after": 120}, ios, "RATE_LIMITED"),
        (
            fakes.apns.inject,
            (503, "ServiceUnavailable"),
            {"count": MAX_ATTEMPTS},
            ios,
            "UNAVAILABLE",
        ),
        (fakes.fcm.inject, (429, "QUOTA_EXCEEDED"), {"retry_after": 120}, android, "RATE_LIMITED"),
        (fakes.fcm.inject, (500, "INTERNAL"), {"count": MAX_ATTEMPTS}, android, "UNAVAILABLE"),
    ]
    for inject, args, options, device, verdict in injected:
        inject(*args, **options)
        assert _verdicts(await sender.send(device())) == [verdict]
    for status, count, verdict in (
        (413, 1, "REJECTED"),
        (429, 1, "RATE_LIMITED"),
        (400, 1, "REJECTED"),
        (503, MAX_ATTEMPTS, "UNAVAILABLE"),
    ):
        sub = fakes.webpush.subscribe()
        fakes.webpush.inject(status, count=count, reason=f"echo {sub.endpoint}")
        assert _verdicts(await sender.send(web(sub))) == [verdict]


async def _validation_errors(sender: Sender, fakes: Fakes) -> None:
    sub = fakes.webpush.subscribe()
    outside = web(sub)
    outside.token = f"https://{canary('host')}.example.net/push/{canary('path')}"
    unknown_app = pb.Device(app_id=canary("app"), token=secrets.token_hex(32))
    no_keys = pb.Device(app_id="chat-web", token=fakes.webpush.subscribe().endpoint)
    bad_keys = web(fakes.webpush.subscribe())
    bad_keys.keys.auth = b"short"
    cases: list[tuple[tuple[pb.Device, ...], dict[str, Any]]] = [
        ((ios("zz" + canary("hex")),), {}),
        ((android("has space " + canary("fcm")),), {}),
        ((unknown_app,), {}),
        ((outside,), {}),
        ((no_keys,), {}),
        ((bad_keys,), {}),
        ((ios(),), {"kind": pb.KIND_UNSPECIFIED}),
        ((ios(),), {"sender_display_name": canary("longsender") * 20}),
        ((ios(),), {"preview": canary("longpreview") * 300}),
        ((ios(),), {"conversation_id": canary("longconv") * 20}),
    ]
    for devices, fields in cases:
        sent = await sender.send(*devices, **fields)
        assert sent.error.startswith("INVALID_ARGUMENT: "), sent.error


async def _deadline_expiry(sender: Sender, fakes: Fakes) -> None:
    stalled_ios, stalled_android = secrets.token_hex(32), canary("fcmstall")
    stalled_web = fakes.webpush.subscribe()
    fakes.apns.stall(stalled_ios)
    fakes.fcm.stall(stalled_android)
    fakes.webpush.stall(stalled_web)
    sent = await sender.send(
        ios(stalled_ios), android(stalled_android), web(stalled_web), timeout=2.5
    )
    assert _outcomes(sent) == [("UNAVAILABLE", "DeadlineExceeded")] * 3


def _verdicts(sent: Sent) -> list[str]:
    return [outcome for outcome, _ in _outcomes(sent)]


def _outcomes(sent: Sent) -> list[tuple[str, str]]:
    assert sent.response is not None, sent.error
    return [(pb.Outcome.Name(r.outcome), r.reason) for r in sent.response.results]


# -- what may leave: checks ---------------------------------------------------------------------


def answers_text(mix: Mix) -> str:
    """Everything the relay said back besides results' ids: error messages and reasons."""
    parts = [sent.error for sent in mix.sent]
    for sent in mix.sent:
        if sent.response is not None:
            parts += [result.reason for result in sent.response.results]
    return "\n".join(parts)


def grouping_candidates(conversation_id: str, keys: GroupingKeys) -> set[str]:
    return {keys.for_conversation(conversation_id, purpose=p) for p in PURPOSES}


def check_providers(fakes: Fakes, mix: Mix, keys: GroupingKeys) -> int:
    """Check every push each fake received against its applied mode; return how many."""
    checked = 0
    for push in fakes.apns.received:
        _check_one(mix, keys, push.token, push.headers, push.body, push.payload or {}, "apns")
        checked += 1
    for message in fakes.fcm.received:
        _check_one(mix, keys, message.key, message.headers, message.body, message.message, "fcm")
        checked += 1
    for record in fakes.webpush.received:
        token = record.endpoint
        _check_one(mix, keys, token, record.headers, record.body, {}, "webpush")
        if record.plaintext is not None:
            document = json.loads(record.plaintext)
            _check_document(mix, token, record.plaintext, document)
        checked += 1
    return checked


def _check_one(
    mix: Mix,
    keys: GroupingKeys,
    token: str,
    headers: dict[str, str],
    body: bytes,
    document: dict[str, Any],
    platform: str,
) -> None:
    sent = mix.by_token[token]
    n = sent.request.notification
    applied = sent.applied(token)
    seen = json.dumps(headers).encode() + b"\n" + body
    where = f"{platform} {pb.Privacy.Name(applied)} {pb.Kind.Name(n.kind)}"
    if applied != pb.FULL or n.kind == pb.CLEAR:  # a CLEAR names no one, whatever the mode
        assert n.sender_display_name.encode() not in seen, f"{where}: sender reached provider"
        assert n.preview.encode() not in seen, f"{where}: preview reached provider"
    cid = n.conversation_id.encode()
    if applied == pb.ENCRYPTED or platform == "webpush":  # Web Push: ciphertext and headers
        assert cid not in seen, f"{where}: raw conversation id reached provider"
    else:
        outside = json.dumps(headers).encode() + encode_json(_without_relay_id(document, platform))
        assert cid not in outside, f"{where}: raw conversation id outside relay data"
    for key in _grouping_keys(platform, headers, document):
        assert key in grouping_candidates(n.conversation_id, keys), f"{where}: {key!r}"


def _check_document(mix: Mix, token: str, plaintext: bytes, document: dict[str, Any]) -> None:
    """The Web Push document the device decrypts: only what the mode allows (``ENCRYPTED``
    carries everything to the device, which is its point)."""
    sent = mix.by_token[token]
    n = sent.request.notification
    applied = sent.applied(token)
    if applied in (pb.REDACTED, pb.ID_ONLY) or n.kind == pb.CLEAR:
        assert n.sender_display_name.encode() not in plaintext
        assert n.preview.encode() not in plaintext
    if applied != pb.ENCRYPTED:
        outside = encode_json({k: v for k, v in document.items() if k != "relay"})
        assert n.conversation_id.encode() not in outside


def _without_relay_id(document: dict[str, Any], platform: str) -> dict[str, Any]:
    """The payload with ``relay.conversation_id`` (the one place the raw id may be) removed."""
    document = json.loads(json.dumps(document))
    if platform == "fcm":
        data = document.get("data", {})
        if "relay" in data:
            relay = json.loads(data["relay"])
            relay.pop("conversation_id", None)
            data["relay"] = json.dumps(relay)
    elif isinstance(document.get("relay"), dict):
        document["relay"].pop("conversation_id", None)
    return document


def _grouping_keys(platform: str, headers: dict[str, str], document: dict[str, Any]) -> list[str]:
    if platform == "apns":
        found = [headers.get("apns-collapse-id"), document.get("aps", {}).get("thread-id")]
        relay = document.get("relay")
    elif platform == "fcm":
        android_part = document.get("android", {})
        found = [android_part.get("collapse_key"), android_part.get("notification", {}).get("tag")]
        relay = json.loads(document.get("data", {}).get("relay", "{}"))
    else:
        found = [headers.get("topic")]
        relay = None
    if isinstance(relay, dict):
        found.append(relay.get("thread"))  # a CLEAR's key of the notifications to withdraw
    return [key for key in found if key]


def check_positive_controls(fakes: Fakes, mix: Mix) -> None:
    """The search finds canaries where they belong, so finding none elsewhere means something;
    and grouping keys were there to check on every platform."""
    assert any(_grouping_keys("apns", p.headers, p.payload or {}) for p in fakes.apns.received)
    assert any(_grouping_keys("fcm", m.headers, m.message) for m in fakes.fcm.received)
    assert any(_grouping_keys("webpush", r.headers, {}) for r in fakes.webpush.received)
    full = [p for p in fakes.apns.received if mix.by_token[p.token].applied(p.token) == pb.FULL]
    assert full and any(
        mix.by_token[p.token].request.notification.sender_display_name.encode() in p.body
        for p in full
    )
    redacted = [
        p for p in fakes.apns.received if mix.by_token[p.token].applied(p.token) == pb.REDACTED
    ]
    assert redacted and all(
        (p.payload or {}).get("relay", {}).get("conversation_id")
        == mix.by_token[p.token].request.notification.conversation_id
        for p in redacted
    )
    web_full = [
        r for r in fakes.webpush.received if mix.by_token[r.endpoint].applied(r.endpoint) == pb.FULL
    ]
    assert web_full and any(
        mix.by_token[r.endpoint].request.notification.preview.encode() in (r.plaintext or b"")
        for r in web_full
    )


def json_lines(text: str) -> Iterator[dict[str, Any]]:
    for line in text.splitlines():
        if line.strip():
            record = json.loads(line)  # every line is one JSON object
            assert isinstance(record, dict)
            yield record


def check_canonical_lines(text: str, mix: Mix) -> None:
    """One canonical line per answered request, with counts by platform and outcome."""
    lines = {r["request_id"]: r for r in json_lines(text) if r.get("msg") == "request"}
    answered = [sent for sent in mix.sent if sent.response is not None]
    assert set(lines) == {sent.request.request_id for sent in answered}
    for sent in answered:
        assert sent.response is not None
        line = lines[sent.request.request_id]
        outcomes = [pb.Outcome.Name(r.outcome) for r in sent.response.results]
        assert line["devices"] == len(outcomes)
        assert sum(line["platforms"].values()) == len(outcomes)
        assert line["outcomes"] == {o: outcomes.count(o) for o in set(outcomes)}
        assert sum(sum(c.values()) for c in line["counts"].values()) == len(outcomes)
        assert isinstance(line["duration_ms"], float | int)


async def fetch_metrics(port: int) -> str:
    async with httpx.AsyncClient(trust_env=False) as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics")
    response.raise_for_status()
    return response.text


# -- the in-process run ----------------------------------------------------------------------------


class CueRaisingFcm(FcmAdapter):
    """The real FCM adapter, except that it fails like a buggy one on a cue.

    This is not a mock of the code under test: the code under test is the relay's one wrapper
    around every adapter (``relay/dispatch.py``) and the service around it, which must turn an
    adapter's exception into ``UNAVAILABLE``/``InternalError`` and log it without its text. No
    real adapter raises on any input we know of (each maps every failure to an outcome), so the
    failure is made here, carrying the canaries in its message.
    """

    async def send(self, push: Push) -> Any:
        if push.token.startswith(RAISE_CUE):
            payload = push.payload if isinstance(push.payload, bytes) else encode_json(push.payload)
            raise RuntimeError(f"adapter bug holding {push.token}: {payload!r}")
        return await super().send(push)


@pytest.fixture
def debug_logs() -> Iterator[io.StringIO]:
    """The process's logging as ``push-relay serve`` sets it up at DEBUG, into a buffer."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.Formatter.converter)
    quiet = {name: logging.getLogger(name).level for name in logs.QUIET_LOGGERS}
    buffer = io.StringIO()
    logs.setup_logging("debug", stream=buffer)
    yield buffer
    root.handlers[:], level, logging.Formatter.converter = saved
    root.setLevel(level)
    for name, value in quiet.items():
        logging.getLogger(name).setLevel(value)


async def test_canaries_never_leak(
    pki: TestPKI, apns_key: ApnsKey, start_relay, debug_logs, monkeypatch
) -> None:
    monkeypatch.setitem(ADAPTERS, "fcm", CueRaisingFcm)
    async with running_fakes(pki, apns_key) as fakes:
        config = local_config(
            [
                apns_app(fakes.apns, apns_key),
                apns_app(fakes.apns, apns_key, app_id=VOIP_APP, voip=True),
                fcm_app(fakes.fcm, fakes.account),
                webpush_app(fakes.webpush),
            ],
            hmac_key=HMAC_KEY,
        )
        relay: RelayServer = await start_relay(config)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{relay.port}") as channel:
            mix = await send_mix(relay_pb2_grpc.PushRelayStub(channel), fakes, raising=True)
        metrics = await fetch_metrics(relay.http_port)
        checked = check_providers(fakes, mix, grouping_keys(HMAC_KEY))
        check_positive_controls(fakes, mix)

    text = debug_logs.getvalue()
    assert mix.leaked(text) == [], "in the logs"
    assert mix.leaked(metrics) == [], "in /metrics"
    assert mix.leaked(answers_text(mix)) == [], "in gRPC errors or results' reasons"
    assert checked >= len(KINDS) * len(MODES) * 3
    check_canonical_lines(text, mix)
    records = list(json_lines(text))
    # Protocol libraries stayed at WARNING although the relay logs at DEBUG.
    assert all(
        r["level"] in ("warning", "error", "critical")
        for r in records
        if r["logger"].split(".")[0] in logs.QUIET_LOGGERS
    )
    assert any(r["msg"] == "push" and r["level"] == "debug" for r in records)
    (raised,) = [r for r in records if r["msg"] == "adapter raised"]
    assert raised["error"] == "RuntimeError" and raised["where"]
    assert len(raised["token_fp"]) == 16 and raised["token_fp"] not in mix.secrets


def test_tracebacks_are_logged_without_their_text_or_locals() -> None:
    secret = canary("local")

    def failing(token: str) -> None:
        payload = {"preview": secret}  # a local the traceback must not show
        raise ValueError(f"cannot send {token} {payload}")

    try:
        failing(secret)
    except ValueError:
        record = logging.LogRecord("relay", logging.ERROR, __file__, 1, "failed", None, None)
        record.exc_info = sys.exc_info()
    line = json.loads(logs.JsonFormatter().format(record))
    assert secret not in json.dumps(line)
    assert line["error"] == "ValueError"
    assert line["where"][-1].endswith(":failing")


def test_formatter_never_renders_arguments() -> None:
    secret = canary("arg")
    record = logging.LogRecord("httpx", logging.WARNING, __file__, 1, "POST %s", (secret,), None)
    assert secret not in logs.JsonFormatter().format(record)


def test_fingerprints_are_keyed() -> None:
    token = secrets.token_hex(32)
    assert logs.fingerprint(token) == logs.fingerprint(token) != token
    before = logs.fingerprint(token)
    try:
        logs.use_fingerprint_key(b"k" * 32)
        assert logs.fingerprint(token) == logs.Fingerprints(b"k" * 32).of(token) != before
    finally:
        logs.use_fingerprint_key(b"")


def test_the_request_line_written_directly_is_the_formatters_line(
    debug_logs: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    """``info_line`` writes straight to the relay's handler only when nothing else would see the
    record, and then writes exactly what the logging module's path writes."""
    logger = logging.getLogger("relay.service")
    fields: dict[str, Any] = {
        "method": "SendStream",
        "request_id": 'req-é"\\\n1',
        "devices": 2,
        "outcomes": {"DELIVERED": 1, "TOKEN_INVALID": 1},
        "counts": {"apns": {"DELIVERED": 1}, "fcm": {"TOKEN_INVALID": 1}},
        "duration_ms": 12.34,
        "flags": [True, None],
    }
    root = logging.getLogger()
    others = [h for h in root.handlers if h is not logs._handler]
    assert others, "pytest's own handlers: the record must reach them too"
    root.handlers[:] = [h for h in root.handlers if h is logs._handler]
    try:
        logs.info_line(logger, "request", fields)  # the relay's handler alone: direct
    finally:
        root.handlers.extend(others)
    logs.info_line(logger, "request", fields)  # pytest listens too: through logging
    direct, routed = list(json_lines(debug_logs.getvalue()))[-2:]
    assert [r.getMessage() for r in caplog.records] == ["request"]  # only the routed one
    assert direct.pop("ts") <= routed.pop("ts")
    assert (
        direct == routed == {"level": "info", "logger": "relay.service", "msg": "request"} | fields
    )


def test_a_filter_on_the_logger_still_applies_to_the_request_line(debug_logs: io.StringIO) -> None:
    logger = logging.getLogger("relay.service")
    root = logging.getLogger()
    others = [h for h in root.handlers if h is not logs._handler]
    root.handlers[:] = [h for h in root.handlers if h is logs._handler]
    drop_all = logging.Filter("nothing.matches")
    logger.addFilter(drop_all)
    try:
        logs.info_line(logger, "request", {"request_id": "r1"})
    finally:
        logger.removeFilter(drop_all)
        root.handlers.extend(others)
    assert debug_logs.getvalue() == ""
