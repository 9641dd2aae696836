"""A fake APNs provider API: strict HTTP/2 over TLS on loopback, as providers.md §1.10 lists.

Use it in tests, the demo, or your own tests::

    key = ApnsKey.generate()
    async with FakeAPNs(keys=[key]) as apns:
        ...  # point the client at apns.url, trusting apns.ca_pem
        apns.mark_dead(token)            # 410 Unregistered + timestamp from now on
        assert apns.received[0].payload == {...}

Requests are checked in this order, each failure answering at once: method (405), path (404 /
400 MissingDeviceToken), repeated headers, authentication (the TLS client certificate, else the
provider JWT: 403 / 429), the ``apns-*`` headers, the topic, the body; then scripted answers
(:meth:`FakeAPNs.inject`, then :meth:`FakeAPNs.mark_dead` / :meth:`FakeAPNs.script`), else 200.

Choices where Apple documents nothing: a body that is not a JSON object gets 400 ``BadPayload``;
a topic belonging to an allowed app but carrying another push type's suffix (``alert`` to
``<bundle>.voip``) gets 400 ``BadTopic``; a JWT whose ``iat`` lies more than a minute in the
future is ``InvalidProviderToken``.
"""

from __future__ import annotations

import collections
import json
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from h2.settings import SettingCodes

from relay.testing._fake import FakeServer
from relay.testing.credentials import ApnsKey, ProviderTokenError, ProviderTokenVerifier
from relay.testing.h2server import Connection, DropConnection, Faults, H2Server, Request, Response
from relay.testing.tls import TestPKI, certificate_uid

# apns-push-type → the suffix its apns-topic carries after the bundle id (providers.md §1.3).
PUSH_TYPE_TOPIC_SUFFIX: Mapping[str, str] = {
    "alert": "",
    "background": "",
    "mdm": "",
    "voip": ".voip",
    "complication": ".complication",
    "fileprovider": ".pushkit.fileprovider",
    "location": ".location-query",
    "liveactivity": ".push-type.liveactivity",
    "pushtotalk": ".voip-ptt",
    "controls": ".push-type.controls",
    "widgets": ".push-type.widgets",
}
MAX_PAYLOAD_BYTES = 4096
MAX_VOIP_PAYLOAD_BYTES = 5120
MAX_COLLAPSE_ID_BYTES = 64

_TOKEN_PATH = re.compile(r"/3/device/([0-9a-fA-F]+)")
_DEVICE_PREFIX = "/3/device/"
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass
class ReceivedPush:
    """One request as the fake received it, with the answer it got.

    Attributes:
        token: the device token from the path ("" when the path had none).
        headers: the request headers by lower-case name, pseudo-headers included (for a repeated
            header, the last value).
        body: the raw body.
        payload: the body parsed as JSON when it is a JSON object, else None.
        status: the answer's ``:status``; 0 while unanswered (delayed, stalled, dropped).
        reason: the answer's ``reason`` ("" for 200 and while unanswered).
        apns_id: the ``apns-id`` answered (the request's, or a generated one).
        connection: the serial number of the connection it came on (1 = first).
    """

    token: str
    headers: dict[str, str]
    body: bytes
    payload: dict[str, Any] | None
    status: int
    reason: str
    apns_id: str
    connection: int


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    reason: str = ""
    retry_after: int | None = None
    timestamp_ms: int | None = None


_OK = _Answer(200)


class _Reject(Exception):
    """Validation failed: answer with ``answer`` and stop checking."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.answer = _Answer(status, reason)


class FakeAPNs(FakeServer):
    """A fake APNs server on ``https://127.0.0.1:<port>`` with scriptable answers and faults.

    Args:
        pki: the test CA to use (a new one when None); clients must trust ``ca_pem``.
        keys: provider-token keys whose JWTs are accepted (more via :meth:`add_key`).
        topics: the bundle ids token-authenticated connections may push to (a certificate
            connection may push to its certificate's UID instead).
        max_concurrent_streams: SETTINGS_MAX_CONCURRENT_STREAMS once a connection is
            authenticated (1 before its first valid JWT).
        token_update_min_seconds: the least time between two distinct JWTs on one connection
            (Apple: 20 minutes); shrink it in tests.
        token_max_age_seconds: how old a JWT's ``iat`` may be (Apple: one hour).
        fill_window: split error bodies across DATA frames to fill a short client window
            (exercises clients that must reassemble them); by default a body waits whole.
        record: keep every request in :attr:`received`; turn off for long benchmarks, whose
            requests would otherwise pile up in memory (:attr:`requests_seen` still counts).
    """

    def __init__(
        self,
        *,
        pki: TestPKI | None = None,
        keys: Sequence[ApnsKey] = (),
        topics: Sequence[str] = ("com.example.chat",),
        max_concurrent_streams: int = 1000,
        token_update_min_seconds: float = 20 * 60,
        token_max_age_seconds: float = 3600,
        fill_window: bool = False,
        record: bool = True,
    ) -> None:
        self.pki = pki or TestPKI()
        self.ca_pem = self.pki.ca_pem
        self.topics = tuple(topics)
        self.max_concurrent_streams = max_concurrent_streams
        self.token_update_min_seconds = token_update_min_seconds
        self.received: list[ReceivedPush] = []
        self.requests_seen = 0
        self.record = record
        self._tokens = ProviderTokenVerifier(keys, max_age_seconds=token_max_age_seconds)
        self._scripts: dict[str, _Answer] = {}
        self._injected: collections.deque[_Answer] = collections.deque()
        self._faults = Faults()
        self._server = H2Server(
            self._handle,
            self.pki.server_context(request_client_cert=True),
            initial_settings=self._initial_settings,
            fill_window=fill_window,
        )

    # -- lifecycle (start, stop, port, url: FakeServer) ------------------------------------

    # -- scripting ----------------------------------------------------------------------------

    def add_key(self, key: ApnsKey) -> None:
        """Accept JWTs signed by ``key`` too (key rotation, a second team)."""
        self._tokens.add_key(key)

    def mark_dead(self, token: str, timestamp_ms: int | None = None) -> None:
        """Answer 410 ``Unregistered`` for ``token``, with ``timestamp`` (default: now)."""
        stamp = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        self._scripts[token.lower()] = _Answer(410, "Unregistered", timestamp_ms=stamp)

    def script(self, token: str, status: int, reason: str) -> None:
        """Answer every valid request for ``token`` with ``status`` and ``reason``."""
        self._scripts[token.lower()] = _Answer(status, reason)

    def inject(
        self, status: int, reason: str, *, count: int = 1, retry_after: int | None = None
    ) -> None:
        """Answer the next ``count`` valid requests (any token) with ``status`` and ``reason``.

        Args:
            status: e.g. 429, 500, 503.
            reason: e.g. ``TooManyRequests``, ``InternalServerError``, ``ServiceUnavailable``.
            count: how many requests get this answer.
            retry_after: when given, sent as a ``retry-after`` header (seconds).
        """
        self._injected.extend([_Answer(status, reason, retry_after=retry_after)] * count)

    def delay(self, seconds: float, token: str | None = None) -> None:
        """Wait ``seconds`` before answering ``token`` (every request when None); 0 removes it."""
        self._faults.delay(seconds, token.lower() if token is not None else None)

    def stall(self, token: str) -> None:
        """Never answer ``token``'s requests; their streams stay open (until :meth:`clear`)."""
        self._faults.stall(token.lower())

    def drop_next(self, count: int = 1) -> None:
        """On each of the next ``count`` requests, cut the TCP connection without answering."""
        self._faults.drop_next(count)

    async def goaway(self, reason: str = "Shutdown") -> None:
        """Send GOAWAY with ``{"reason": reason}`` on every connection and close them.

        New connections are accepted afterwards, as APNs does after a shutdown GOAWAY.
        """
        await self._server.goaway(0, json.dumps({"reason": reason}).encode())

    def clear(self) -> None:
        """Forget what was received, scripted answers and faults (stalled requests resume)."""
        self.received.clear()
        self.requests_seen = 0
        self._scripts.clear()
        self._injected.clear()
        self._faults.clear()

    # -- request handling ---------------------------------------------------------------------

    def _initial_settings(self, connection: Connection) -> Mapping[int, int]:
        # A certificate connection is authenticated by its handshake; a token one after its
        # first valid JWT (providers.md §1.8).
        authenticated = connection.peer_cert is not None
        streams = self.max_concurrent_streams if authenticated else 1
        return {SettingCodes.MAX_CONCURRENT_STREAMS: streams}

    async def _handle(self, request: Request) -> Response:
        record = _record(request)
        self.requests_seen += 1
        if self.record:
            self.received.append(record)
        if self._faults.take_drop():
            raise DropConnection
        try:
            answer = self._verdict(request, record)
        except _Reject as rejection:
            answer = rejection.answer
        await self._faults.hold(record.token.lower())
        record.status, record.reason = answer.status, answer.reason
        return _response(answer, record.apns_id)

    def _verdict(self, request: Request, record: ReceivedPush) -> _Answer:
        _check_method_and_path(request)
        _check_repeated_headers(request.headers)
        self._authenticate(request)
        push_type = _check_apns_headers(record.headers)
        self._check_topic(request, push_type)
        _check_body(request.body, record.payload, push_type)
        if self._injected:
            return self._injected.popleft()
        return self._scripts.get(record.token.lower(), _OK)

    def _authenticate(self, request: Request) -> None:
        if request.connection.peer_cert is not None:
            return  # certificate connection: APNs ignores `authorization`
        header = request.header("authorization")
        if header is None:
            raise _Reject(403, "MissingProviderToken")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _Reject(403, "InvalidProviderToken")
        try:
            self._tokens.verify(token.strip())
        except ProviderTokenError as error:
            raise _Reject(403, error.reason) from None
        self._bind_token(request.connection, token.strip())

    def _bind_token(self, connection: Connection, token: str) -> None:
        """Apply the one-new-token-per-20-minutes rule, per connection (providers.md §1.6)."""
        current = connection.state.get("apns.jwt")
        if current == token:
            return
        now = time.monotonic()
        since = connection.state.get("apns.jwt_since", -float("inf"))
        if current is not None and now - since < self.token_update_min_seconds:
            raise _Reject(429, "TooManyProviderTokenUpdates")
        connection.state["apns.jwt"] = token
        connection.state["apns.jwt_since"] = now
        if current is None:  # the first valid token lifts the one-stream limit
            connection.update_settings(
                {SettingCodes.MAX_CONCURRENT_STREAMS: self.max_concurrent_streams}
            )

    def _check_topic(self, request: Request, push_type: str) -> None:
        topic = request.header("apns-topic")
        cert = request.connection.peer_cert
        if cert is not None:
            uid = certificate_uid(cert)
            bases = {uid} if uid else set()
            topic = topic or uid  # APNs defaults the topic to the certificate's bundle id
        else:
            bases = set(self.topics)
        if not topic:
            raise _Reject(400, "MissingTopic")
        suffix = PUSH_TYPE_TOPIC_SUFFIX[push_type]
        if topic.endswith(suffix) and topic[: len(topic) - len(suffix)] in bases:
            return
        if any(
            topic == base + other for base in bases for other in PUSH_TYPE_TOPIC_SUFFIX.values()
        ):
            raise _Reject(400, "BadTopic")
        raise _Reject(400, "TopicDisallowed")


def _record(request: Request) -> ReceivedPush:
    headers = dict(request.headers)
    match = _TOKEN_PATH.fullmatch(request.path)
    if match:
        token = match.group(1)
    elif request.path.startswith(_DEVICE_PREFIX):
        token = request.path[len(_DEVICE_PREFIX) :]
    else:
        token = ""
    apns_id = headers.get("apns-id", "")
    if not _CANONICAL_UUID.fullmatch(apns_id):
        apns_id = str(uuid.uuid4())
    return ReceivedPush(
        token=token,
        headers=headers,
        body=request.body,
        payload=_json_object(request.body),
        status=0,
        reason="",
        apns_id=apns_id,
        connection=request.connection.serial,
    )


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
        return None
    return value if isinstance(value, dict) else None


def _check_method_and_path(request: Request) -> None:
    if request.method != "POST":
        raise _Reject(405, "MethodNotAllowed")
    if request.path == _DEVICE_PREFIX:
        raise _Reject(400, "MissingDeviceToken")
    if not _TOKEN_PATH.fullmatch(request.path):
        raise _Reject(404, "BadPath")


def _check_repeated_headers(headers: Sequence[tuple[str, str]]) -> None:
    names = [name for name, _ in headers]
    if len(names) != len(set(names)):
        raise _Reject(400, "DuplicateHeaders")


def _check_apns_headers(headers: Mapping[str, str]) -> str:
    """Validate the ``apns-*`` headers; return the push type (``alert`` when absent)."""
    push_type = headers.get("apns-push-type", "alert")
    if push_type not in PUSH_TYPE_TOPIC_SUFFIX:
        raise _Reject(400, "InvalidPushType")
    priority = headers.get("apns-priority", "10")
    if priority not in {"1", "5", "10"}:
        raise _Reject(400, "BadPriority")
    if push_type == "background" and priority != "5":
        raise _Reject(400, "BadPriority")  # "Using priority 10 is an error"
    collapse_id = headers.get("apns-collapse-id")
    if collapse_id is not None and len(_raw(collapse_id)) > MAX_COLLAPSE_ID_BYTES:
        raise _Reject(400, "BadCollapseId")
    expiration = headers.get("apns-expiration")
    if expiration is not None and not (expiration.isascii() and expiration.isdigit()):
        raise _Reject(400, "BadExpirationDate")
    apns_id = headers.get("apns-id")
    if apns_id is not None and not _CANONICAL_UUID.fullmatch(apns_id):
        raise _Reject(400, "BadMessageId")
    return push_type


def _check_body(body: bytes, payload: dict[str, Any] | None, push_type: str) -> None:
    if not body:
        raise _Reject(400, "PayloadEmpty")
    limit = MAX_VOIP_PAYLOAD_BYTES if push_type == "voip" else MAX_PAYLOAD_BYTES
    if len(body) > limit:
        raise _Reject(413, "PayloadTooLarge")
    if payload is None:
        raise _Reject(400, "BadPayload")


def _raw(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


def _response(answer: _Answer, apns_id: str) -> Response:
    headers = [("apns-id", apns_id)]
    if answer.status == 200:
        return Response(200, headers)
    body: dict[str, Any] = {"reason": answer.reason}
    if answer.status == 410:
        stamp = answer.timestamp_ms
        body["timestamp"] = int(time.time() * 1000) if stamp is None else stamp
    headers.append(("content-type", "application/json"))
    if answer.retry_after is not None:
        headers.append(("retry-after", str(answer.retry_after)))
    return Response(answer.status, headers, json.dumps(body).encode())
