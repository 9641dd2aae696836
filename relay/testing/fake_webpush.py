"""A fake Web Push service (RFC 8030/8291/8292): strict HTTP/2 over TLS on loopback.

It checks what a real push service checks, and more: it decrypts every message with the test
subscription's private key and records the plaintext, so a test sees exactly what the device
would. Use it in tests, the demo, or your own tests::

    async with FakeWebPush() as wp:
        sub = wp.subscribe()             # sub.endpoint, sub.keys: what a browser hands out
        ...                              # push to sub.endpoint, trusting wp.ca_pem
        assert wp.received[0].plaintext == b'{"relay": ...}'
        wp.expire(sub)                   # 410 from now on

Requests are checked in this order, each failure answering at once (reasons as Apple's service
words them, in a JSON ``{"reason": ...}`` body): method (405), path and subscription (404), a
repeated header (400), VAPID (missing or unparsable → 401; bad key, signature or claims, or a key
other than the subscription's ``applicationServerKey`` → 403), an expired subscription
(:meth:`FakeWebPush.expire`: 404/410), ``TTL``/``Urgency``/``Topic`` (400), size (> 4096 → 413),
``Content-Encoding`` and decryption (400; the VAPID key reused as the ECDH key → 400); then
scripted answers (:meth:`FakeWebPush.inject`: 429, 5xx, 3xx ...), else 201 with ``Location``
and ``TTL`` (shortened to ``max_ttl_seconds``). Accepted messages land in the subscription's
:meth:`FakeWebPush.inbox`, where a newer message with the same ``Topic`` replaces an older one.
"""

from __future__ import annotations

import base64
import collections
import json
import re
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from h2.settings import SettingCodes

from adapters.base import DeviceKeys
from relay.testing._fake import FakeServer
from relay.testing.device import DecryptionError, TestSubscription
from relay.testing.h2server import DropConnection, Faults, H2Server, Request, Response
from relay.testing.tls import TestPKI

__all__ = ["FakeSubscription", "FakeWebPush", "ReceivedWebPush"]

MAX_BODY_BYTES = 4096  # RFC 8030 §7.2
MAX_JWT_LIFETIME_SECONDS = 24 * 3600  # RFC 8292 §2
URGENCIES = frozenset({"very-low", "low", "normal", "high"})

_PUSH_PREFIX = "/push/"
_TOPIC = re.compile(r"[A-Za-z0-9_-]{1,32}")
_SINGLE_HEADERS = ("ttl", "urgency", "topic", "content-encoding", "authorization")
_REASONS = {
    301: "MovedPermanently",
    302: "Found",
    307: "TemporaryRedirect",
    308: "PermanentRedirect",
    400: "BadWebPushRequest",
    404: "NotFound",
    410: "Gone",
    429: "TooManyRequests",
    500: "InternalServerError",
    502: "BadGateway",
    503: "ServiceUnavailable",
}


@dataclass(frozen=True)
class FakeSubscription:
    """A subscription on the fake, as a browser's ``PushSubscription`` would describe it.

    Attributes:
        id: the random id in the endpoint path.
        endpoint: ``https://127.0.0.1:<port>/push/<id>``.
        subscription: the device side: key pair, auth secret, :meth:`TestSubscription.decrypt`.
        application_server_key: the VAPID public key (65 raw bytes) the subscription is
            restricted to, or None for any key.
    """

    id: str
    endpoint: str
    subscription: TestSubscription = field(repr=False)
    application_server_key: bytes | None = None

    @property
    def keys(self) -> DeviceKeys:
        """``p256dh`` and ``auth``, as the relay receives them in ``Device.keys``."""
        return self.subscription.keys


@dataclass
class ReceivedWebPush:
    """One request as the fake received it, with the answer it got.

    Attributes:
        subscription_id: the id from the path ("" when the path named none).
        endpoint: the URL the request was made to (origin and path).
        headers: the request headers by lower-case name, pseudo-headers included (for a repeated
            header, the last value).
        body: the raw (encrypted) body.
        plaintext: the decrypted message, when decryption got that far and succeeded.
        status: the answer's ``:status``; 0 while unanswered (delayed, stalled, dropped).
        reason: the answer's reason ("" for 201 and while unanswered).
        vapid_claims: the VAPID JWT's claims as sent (read before verification), or None.
        connection: the serial number of the connection it came on (1 = first).
    """

    subscription_id: str
    endpoint: str
    headers: dict[str, str]
    body: bytes
    plaintext: bytes | None = None
    status: int = 0
    reason: str = ""
    vapid_claims: dict[str, Any] | None = None
    connection: int = 0


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    reason: str = ""
    retry_after: int | None = None
    location: str | None = None


class _Reject(Exception):
    """Validation failed: answer with ``answer`` and stop checking."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.answer = _Answer(status, reason)


class FakeWebPush(FakeServer):
    """A fake push service on ``https://127.0.0.1:<port>`` with scriptable answers and faults.

    Args:
        pki: the test CA to use (a new one when None); clients must trust ``ca_pem``.
        vapid_public_key: when set, new subscriptions are restricted to this VAPID key (raw 65
            bytes or base64url), as a browser's ``applicationServerKey`` restricts them.
        max_ttl_seconds: the longest TTL kept; longer requests are answered with this ``TTL``.
        clock: epoch seconds for checking VAPID ``exp``; injectable so tests can move time.
    """

    def __init__(
        self,
        *,
        pki: TestPKI | None = None,
        vapid_public_key: bytes | str | None = None,
        max_ttl_seconds: int = 28 * 86400,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pki = pki or TestPKI()
        self.ca_pem = self.pki.ca_pem
        self._vapid_public_key = _raw_key(vapid_public_key)
        self.max_ttl_seconds = max_ttl_seconds
        self.received: list[ReceivedWebPush] = []
        self._clock = clock
        self._subscriptions: dict[str, FakeSubscription] = {}
        self._expired: dict[str, int] = {}
        self._inboxes: dict[str, list[ReceivedWebPush]] = collections.defaultdict(list)
        self._injected: collections.deque[_Answer] = collections.deque()
        self._faults = Faults()
        # Announce a stream limit as real push services do: httpx keeps to one stream per
        # connection until the server announces one.
        self._server = H2Server(
            self._handle,
            self.pki.server_context(),
            initial_settings=lambda _conn: {SettingCodes.MAX_CONCURRENT_STREAMS: 100},
        )

    # -- lifecycle (start, stop, port, url: FakeServer) ------------------------------------

    @property
    def host(self) -> str:
        """``127.0.0.1``: the host an app's ``allowed_endpoints`` must name."""
        return self._server.host

    # -- subscriptions and scripting ----------------------------------------------------------

    @property
    def vapid_public_key(self) -> bytes | None:
        """The VAPID key (raw 65 bytes) new subscriptions are restricted to, or None for any.

        Set it as raw bytes or base64url (``WebPushAdapter.vapid_public_key``).
        """
        return self._vapid_public_key

    @vapid_public_key.setter
    def vapid_public_key(self, key: bytes | str | None) -> None:
        self._vapid_public_key = _raw_key(key)

    def subscribe(self, application_server_key: bytes | str | None = None) -> FakeSubscription:
        """A new subscription with fresh device keys.

        Args:
            application_server_key: restrict it to this VAPID key (raw or base64url); defaults
                to the fake's ``vapid_public_key``.
        """
        if not self.port:
            raise RuntimeError("start the fake before subscribing: the endpoint needs its port")
        sub_id = secrets.token_urlsafe(24)
        sub = FakeSubscription(
            id=sub_id,
            endpoint=f"{self.url}{_PUSH_PREFIX}{sub_id}",
            subscription=TestSubscription.generate(),
            application_server_key=_raw_key(application_server_key) or self.vapid_public_key,
        )
        self._subscriptions[sub_id] = sub
        return sub

    def expire(self, sub: FakeSubscription, status: int = 410) -> None:
        """Answer ``status`` (404 or 410) for ``sub`` from now on, as for a dead subscription."""
        if status not in (404, 410):
            raise ValueError("an expired subscription answers 404 or 410")
        self._expired[sub.id] = status

    def inject(
        self,
        status: int,
        count: int = 1,
        retry_after: int | None = None,
        *,
        reason: str | None = None,
        location: str | None = None,
    ) -> None:
        """Answer the next ``count`` valid requests (any subscription) with ``status``.

        Args:
            status: e.g. 429, 500, 503, or a redirect (301, 307, ...).
            count: how many requests get this answer.
            retry_after: when given, sent as a ``Retry-After`` header (seconds).
            reason: the ``reason`` in the body; a name for the status when None.
            location: the ``Location`` of a redirect; the fake's own ``/redirected`` path when
                None, so a client that follows it shows up in :attr:`received`.
        """
        if 300 <= status < 400 and location is None:
            location = f"{self.url}{_PUSH_PREFIX}redirected"
        word = reason or _REASONS.get(status, f"HTTP{status}")
        self._injected.extend([_Answer(status, word, retry_after, location)] * count)

    def delay(self, seconds: float, endpoint: FakeSubscription | str | None = None) -> None:
        """Wait ``seconds`` before answering ``endpoint`` (every request when None); 0 removes."""
        self._faults.delay(seconds, None if endpoint is None else self._key(endpoint))

    def stall(self, endpoint: FakeSubscription | str) -> None:
        """Never answer requests to ``endpoint``; their streams stay open (until :meth:`clear`)."""
        self._faults.stall(self._key(endpoint))

    def drop_next(self, count: int = 1) -> None:
        """On each of the next ``count`` requests, cut the TCP connection without answering."""
        self._faults.drop_next(count)

    def clear(self) -> None:
        """Forget what was received, inboxes, expiries, scripted answers and faults."""
        self.received.clear()
        self._inboxes.clear()
        self._expired.clear()
        self._injected.clear()
        self._faults.clear()

    def inbox(self, sub: FakeSubscription) -> list[ReceivedWebPush]:
        """The accepted messages a device would get on waking, oldest first (Topic-replaced)."""
        return list(self._inboxes.get(sub.id, ()))

    @staticmethod
    def _key(endpoint: FakeSubscription | str) -> str:
        if isinstance(endpoint, FakeSubscription):
            return endpoint.id
        return endpoint.rsplit("/", 1)[-1]

    # -- request handling ---------------------------------------------------------------------

    async def _handle(self, request: Request) -> Response:
        record = self._record(request)
        self.received.append(record)
        if self._faults.take_drop():
            raise DropConnection
        try:
            answer = self._verdict(request, record)
        except _Reject as rejection:
            answer = rejection.answer
        await self._faults.hold(record.subscription_id)
        record.status, record.reason = answer.status, answer.reason
        if answer.status == 201:
            self._deliver(record)
        return self._response(answer, record)

    def _record(self, request: Request) -> ReceivedWebPush:
        path = request.path
        sub_id = path[len(_PUSH_PREFIX) :] if path.startswith(_PUSH_PREFIX) else ""
        return ReceivedWebPush(
            subscription_id=sub_id,
            endpoint=f"{self.url}{path}",
            headers=dict(request.headers),
            body=request.body,
            connection=request.connection.serial,
        )

    def _verdict(self, request: Request, record: ReceivedWebPush) -> _Answer:
        if request.method != "POST":
            raise _Reject(405, "MethodNotAllowed")
        sub = self._subscriptions.get(record.subscription_id)
        if sub is None:
            raise _Reject(404, "BadPath")
        _check_single_headers(request.headers)
        vapid_key = self._authenticate(record, sub)
        if sub.id in self._expired:
            status = self._expired[sub.id]
            raise _Reject(status, _REASONS[status])
        _check_delivery_headers(record.headers)
        if len(record.body) > MAX_BODY_BYTES:
            raise _Reject(413, "PayloadTooLarge")
        record.plaintext = _decrypt(record, sub, vapid_key)
        if self._injected:
            return self._injected.popleft()
        return _Answer(201)

    def _authenticate(self, record: ReceivedWebPush, sub: FakeSubscription) -> bytes:
        """Verify the VAPID credentials (RFC 8292 §2-4); return the raw public key ``k``."""
        header = record.headers.get("authorization")
        if header is None:
            raise _Reject(401, "MissingAuthorization")
        params = _vapid_params(header)
        token, raw_key = params.get("t", ""), _b64decode(params.get("k", ""))
        try:
            record.vapid_claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise _Reject(401, "BadAuthorizationHeader") from None
        try:
            public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw_key)
        except ValueError:
            raise _Reject(403, "BadVapidPublicKey") from None
        if sub.application_server_key is not None and raw_key != sub.application_server_key:
            raise _Reject(403, "VapidPkHashMismatch")
        self._verify_jwt(token, public_key)
        return raw_key

    def _verify_jwt(self, token: str, public_key: ec.EllipticCurvePublicKey) -> None:
        try:
            claims = jwt.decode(
                token,
                public_key,
                algorithms=["ES256"],
                audience=self.url,
                # exp is checked below against the fake's clock, which tests may move.
                options={"require": ["aud", "exp"], "verify_exp": False, "verify_iat": False},
            )
        except jwt.PyJWTError:
            raise _Reject(403, "BadJwtToken") from None
        exp, now = claims["exp"], self._clock()
        if not isinstance(exp, int) or not now < exp <= now + MAX_JWT_LIFETIME_SECONDS:
            raise _Reject(403, "BadJwtToken")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject.startswith(("mailto:", "https:")):
            raise _Reject(403, "BadJwtToken")

    def _deliver(self, record: ReceivedWebPush) -> None:
        inbox = self._inboxes[record.subscription_id]
        topic = record.headers.get("topic")
        if topic is not None:  # RFC 8030 §5.4: the newer message replaces the undelivered one
            inbox[:] = [m for m in inbox if m.headers.get("topic") != topic]
        inbox.append(record)

    def _response(self, answer: _Answer, record: ReceivedWebPush) -> Response:
        if answer.status == 201:
            ttl = min(int(record.headers["ttl"]), self.max_ttl_seconds)
            location = f"{self.url}/message/{uuid.uuid4()}"
            return Response(201, [("location", location), ("ttl", str(ttl))])
        headers = [("content-type", "application/json")]
        if answer.retry_after is not None:
            headers.append(("retry-after", str(answer.retry_after)))
        if answer.location is not None:
            headers.append(("location", answer.location))
        return Response(answer.status, headers, json.dumps({"reason": answer.reason}).encode())


def _raw_key(key: bytes | str | None) -> bytes | None:
    if key is None or isinstance(key, bytes):
        return key
    return _b64decode(key)


def _b64decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        return b""


def _vapid_params(header: str) -> dict[str, str]:
    """``vapid t=<jwt>, k=<key>`` (with or without the space after the comma) as a dict."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    for part in rest.split(","):
        name, _, value = part.strip().partition("=")
        params[name] = value
    if scheme.lower() != "vapid" or not params.get("t") or not params.get("k"):
        raise _Reject(401, "BadAuthorizationHeader")
    return params


def _check_single_headers(headers: Sequence[tuple[str, str]]) -> None:
    names = [name for name, _ in headers if name in _SINGLE_HEADERS]
    if len(names) != len(set(names)):
        raise _Reject(400, "BadWebPushRequest")  # RFC 8030 §5.3: several values get 400


def _check_delivery_headers(headers: dict[str, str]) -> None:
    ttl = headers.get("ttl")
    if ttl is None or not (ttl.isascii() and ttl.isdigit()):
        raise _Reject(400, "BadTtl")
    if headers.get("urgency", "normal") not in URGENCIES:
        raise _Reject(400, "BadUrgency")
    topic = headers.get("topic")
    if topic is not None and not _TOPIC.fullmatch(topic):
        raise _Reject(400, "BadWebPushTopic")


def _decrypt(record: ReceivedWebPush, sub: FakeSubscription, vapid_key: bytes) -> bytes:
    if not record.body:
        return b""  # RFC 8030 allows a push without data, and then without Content-Encoding
    if record.headers.get("content-encoding") != "aes128gcm":
        raise _Reject(400, "BadContentEncoding")
    if record.body[21:86] == vapid_key:
        raise _Reject(400, "VapidKeyUsedForEcdh")  # RFC 8292 §2: separate signing and ECDH keys
    try:
        return sub.subscription.decrypt(record.body)
    except DecryptionError:
        raise _Reject(400, "DecryptionFailed") from None
