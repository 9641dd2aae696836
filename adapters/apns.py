"""APNs adapter: Apple's HTTP/2 provider API over the shared libcurl transport.

Until this module moved to ``adapters/_transport.py`` it ran on aioapns 4.0, whose pure-Python
h2 stack cost ~300 µs of CPU per push and had eight defects to work around (see
``shared/reference/aioapns.md``). The transport (libcurl + nghttp2) has none of them, and each
is still tested here against the strict fake APNs:

1. Received DATA is acknowledged by nghttp2, so error floods (5,000 ``Unregistered`` answers on
   one connection) never exhaust the receive window.
2. Nothing per push outlives its request: the easy handle goes back to a free list.
3. Answers are matched by stream, not by ``apns-id``; every push still carries its own
   ``apns-id`` (``Push.push_id`` or a fresh uuid4).
4. Error bodies split across DATA frames are reassembled before they are parsed.
5. ``send`` may be cancelled at any time (the relay's deadline): the stream is reset and its slot
   freed; ``send_timeout_seconds`` is a backstop of our own.
6. Connections stay open while idle (Apple asks providers to keep them), with TCP keepalive
   after ``idle_ping_seconds`` to find a peer that vanished.
7. The HTTP CONNECT proxy and certificate auth are libcurl's own, on any event loop.
8. Requests beyond the connections' stream slots queue inside libcurl, in arrival order.

Also: Apple's sandbox host is ``api.sandbox.push.apple.com``; the provider token is shared by all
connections of an app and re-minted once on 403 ``ExpiredProviderToken``; after answers that end
a connection's usefulness (``Shutdown``, ``IdleTimeout``, ``TooManyProviderTokenUpdates``) new
pushes ride new connections, and ``UnrelatedKeyIdInToken`` is retried once on a fresh one. The
server's ``MAX_CONCURRENT_STREAMS`` is honoured from its first SETTINGS frame. Nothing here logs
a device token, a payload or any other request content.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from adapters._transport import Response, Transport, TransportError, TransportSettings
from adapters.base import Adapter, Outcome, Push, Verdict, json_object, payload_bytes

PRODUCTION_HOST = "api.push.apple.com"
SANDBOX_HOST = "api.sandbox.push.apple.com"
DEFAULT_RETRY_AFTER_SECONDS = 60  # 429 without Retry-After: Apple only says "retry with a delay"

logger = logging.getLogger(__name__)

_HEX_TOKEN = re.compile(r"[0-9a-fA-F]{16,400}")  # Apple: "don't assume a token size"
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True, slots=True)
class ApnsSettings:
    """One iOS app's APNs connection settings, as ``relay/config.py`` builds them.

    Exactly one of token auth (``key_pem`` + ``key_id`` + ``team_id``) or certificate auth
    (``cert_file``: a PEM file holding the client certificate and its key) is set.
    """

    app_id: str
    topic: str
    environment: str = "production"  # production | sandbox
    key_pem: bytes = field(default=b"", repr=False)  # the .p8 provider-token key
    key_id: str = ""
    team_id: str = ""
    cert_file: str = ""
    endpoint: str = ""  # https://host:port; empty = Apple's host for the environment
    ca_pem: bytes = b""  # extra trust anchors for the endpoint (PEM)
    proxy: str = ""  # http://host:port of an HTTP CONNECT proxy; empty = direct
    max_connections: int = 10
    max_streams_per_connection: int = 1000  # lowered further by the server's SETTINGS
    send_timeout_seconds: float = 30.0  # backstop; the relay's own deadline is shorter
    connect_timeout_seconds: float = 10.0
    idle_ping_seconds: float = 300.0
    # A VoIP (PushKit) app: its tokens are PushKit tokens, its pushes ring (INCOMING_CALL only),
    # and they go to the topic <topic>.voip. Alert pushes need an app entry of their own.
    voip: bool = False


class ProviderToken:
    """The provider JWT (ES256), shared by every connection of one app.

    Minted again after ``TOKEN_TTL`` (Apple: no more often than every 20 min, no less than every
    60), or once when APNs calls the current one expired. Age is measured on the monotonic clock;
    ``iat`` comes from ``wall_clock``.
    """

    TOKEN_TTL = 40 * 60

    def __init__(self, key: ec.EllipticCurvePrivateKey, key_id: str, team_id: str) -> None:
        self._key, self._key_id, self._team_id = key, key_id, team_id
        self.wall_clock: Callable[[], float] = time.time
        self._header = ""
        self._line = b""
        self._minted_at = 0.0

    def get_header(self) -> str:
        """The ``authorization`` value: ``bearer <JWT>``."""
        self.get_line()
        return self._header

    def get_line(self) -> bytes:
        """The whole ``authorization`` header line, built once per token, not per push."""
        if not self._header or time.monotonic() - self._minted_at >= self.TOKEN_TTL:
            self._mint()
        return self._line

    def refresh(self, rejected: bytes) -> None:
        """Mint a new token unless another send already replaced ``rejected`` (a line)."""
        if self._line == rejected:
            self._mint()

    def _mint(self) -> None:
        claims = {"iss": self._team_id, "iat": int(self.wall_clock())}
        token = jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self._key_id})
        self._header = f"bearer {token}"
        self._line = b"authorization: " + self._header.encode("ascii")
        self._minted_at = time.monotonic()


@dataclass(slots=True)
class ApnsResponse:
    """APNs's answer to one request; ``status`` 0 means there was none and ``reason`` says why."""

    status: int
    reason: str = ""
    apns_id: str = ""
    timestamp_ms: int = 0
    retry_after: int | None = None

    @classmethod
    def of(cls, response: Response, apns_id: str) -> ApnsResponse:
        reason, timestamp_ms, retry_after = "", 0, None
        if response.status != 200:
            retry_after = _retry_after(response.header("retry-after"))
            document = json_object(response.body)
            word = document.get("reason")
            reason = word if isinstance(word, str) else ""
            stamp = document.get("timestamp")
            if isinstance(stamp, int | float) and not isinstance(stamp, bool) and stamp > 0:
                timestamp_ms = int(stamp)
        return cls(
            response.status,
            reason,
            response.header("apns-id") or apns_id,
            timestamp_ms,
            retry_after,
        )


class ApnsAdapter(Adapter[ApnsSettings]):
    """Sends pushes to one app's APNs environment over a few multiplexed HTTP/2 connections."""

    platform = "apns"

    def __init__(
        self, settings: ApnsSettings, transport: Transport, auth: ProviderToken | None, base: str
    ) -> None:
        self._settings = settings
        self._transport = transport
        self._auth = auth
        self._base = f"{base}/3/device/"
        self._topic = b"apns-topic: " + settings.topic.encode()
        self._voip_topic = b"apns-topic: " + settings.topic.encode() + b".voip"
        self._closed = False

    @classmethod
    async def create(cls, settings: ApnsSettings) -> ApnsAdapter:
        """Build the adapter and its transport in the running loop; connections open on demand.

        Raises:
            ValueError: the settings are unusable (message names the field, never its value).
        """
        base = _endpoint(settings)
        if bool(settings.key_pem) == bool(settings.cert_file):
            raise ValueError("auth: set exactly one of key_pem (token auth) or cert_file")
        auth = _provider_token(settings)
        transport = Transport(
            TransportSettings(
                ca_pem=settings.ca_pem,
                cert_file=settings.cert_file,
                proxy=settings.proxy,
                max_connections=settings.max_connections,
                max_streams=settings.max_streams_per_connection,
                connect_timeout_seconds=settings.connect_timeout_seconds,
                timeout_seconds=settings.send_timeout_seconds,
                keepalive_seconds=max(1, int(settings.idle_ping_seconds)),
            )
        )
        return cls(settings, transport, auth, base)

    @property
    def ready(self) -> bool:
        return not self._closed

    @property
    def base_url(self) -> str:
        """Where pushes go: ``https://host[:port]``."""
        return self._base.removesuffix("/3/device/")

    async def send(self, push: Push) -> Outcome:
        if self._closed:
            return Outcome.unavailable("AdapterClosed", retryable=False)
        if not _HEX_TOKEN.fullmatch(push.token):
            return Outcome(Verdict.TOKEN_INVALID, "BadDeviceToken")
        if push.collapse_key and not _valid_header_value(push.collapse_key, 64):
            return Outcome(Verdict.REJECTED, "BadCollapseId")  # what APNs would answer
        if push.voip != self._settings.voip:
            # The relay refuses these requests first; a VoIP push that does not ring gets an
            # iOS app terminated, and an alert to a PushKit token goes nowhere.
            return Outcome(Verdict.REJECTED, "VoipOnlyApp" if self._settings.voip else "NotVoipApp")
        apns_id = _apns_id(push.push_id)
        body = payload_bytes(push)
        fresh = retried = False
        while True:  # inline, not a coroutine per attempt: this runs per push
            authorization = self._auth.get_line() if self._auth is not None else b""
            try:
                answer = await self._transport.request(
                    self._base + push.token,
                    self._headers(push, apns_id, authorization),
                    body,
                    fresh_connection=fresh,
                )
            except TransportError as exc:
                return to_outcome(ApnsResponse(0, exc.reason))
            response = ApnsResponse.of(answer, apns_id)
            if response.reason == "ExpiredProviderToken" and self._auth is not None:
                self._auth.refresh(authorization)
            if response.reason in _RETIRE_CONNECTION:
                self._transport.retire(answer)
            if retried or response.status != 403 or response.reason not in _RETRY_ONCE:
                return to_outcome(response)
            retried, fresh = True, response.reason == "UnrelatedKeyIdInToken"

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._transport.aclose()

    def _headers(self, push: Push, apns_id: str, authorization: bytes) -> list[bytes]:
        headers = [
            b"apns-id: " + apns_id.encode("ascii"),
            *self._kind_headers(push),
            b"apns-expiration: " + _expiration(push.ttl_seconds),
            *_NO_DEFAULT_HEADERS,
        ]
        if push.collapse_key:
            headers.append(b"apns-collapse-id: " + push.collapse_key.encode())
        if authorization:
            headers.append(authorization)
        return headers

    def _kind_headers(self, push: Push) -> tuple[bytes, bytes, bytes]:
        """Topic, push type and priority (background pushes must be priority 5)."""
        if push.voip:
            return self._voip_topic, b"apns-push-type: voip", b"apns-priority: 10"
        if push.background:
            return self._topic, b"apns-push-type: background", b"apns-priority: 5"
        priority = b"apns-priority: 10" if push.high_priority else b"apns-priority: 5"
        return self._topic, b"apns-push-type: alert", priority


# libcurl's defaults that APNs has no use for: sent empty, they are left out.
_NO_DEFAULT_HEADERS = (b"Accept:", b"Content-Type:")


# -- outcomes ---------------------------------------------------------------------------------

_RETRY_ONCE = frozenset({"ExpiredProviderToken", "UnrelatedKeyIdInToken"})
# Answers after which that connection is of no further use (Apple's guidance per reason).
_RETIRE_CONNECTION = frozenset(
    {"Shutdown", "IdleTimeout", "UnrelatedKeyIdInToken", "TooManyProviderTokenUpdates"}
)
_TOKEN_DEAD = frozenset({"BadDeviceToken", "DeviceTokenNotForTopic"})


def to_outcome(response: ApnsResponse) -> Outcome:
    """Classify one APNs answer as in providers.md §6 (status 0 = no answer at all)."""
    status, apns_id = response.status, response.apns_id
    if status == 200:
        return Outcome.delivered(apns_id)
    reason = response.reason or f"HTTP{status}"
    if status == 410 or (status == 400 and reason in _TOKEN_DEAD):
        return Outcome(
            Verdict.TOKEN_INVALID, reason, apns_id, token_invalid_since_ms=response.timestamp_ms
        )
    if status == 429 and reason == "TooManyProviderTokenUpdates":
        return Outcome(Verdict.UNAVAILABLE, reason, apns_id)  # Apple: do not retry
    if status == 429:
        retry_after = response.retry_after or DEFAULT_RETRY_AFTER_SECONDS
        return Outcome(Verdict.RATE_LIMITED, reason, apns_id, retry_after_seconds=retry_after)
    if status == 0 or status >= 500 or reason == "IdleTimeout":
        retry_after = response.retry_after or 0
        return Outcome(
            Verdict.UNAVAILABLE, reason, apns_id, retry_after_seconds=retry_after, retryable=True
        )
    return Outcome(Verdict.REJECTED, reason, apns_id)


# -- settings ---------------------------------------------------------------------------------


def _apns_id(push_id: str) -> str:
    """The push's own id when it is a UUID (APNs wants it canonical: lower case), else a new one."""
    candidate = push_id.lower()
    return candidate if _CANONICAL_UUID.fullmatch(candidate) else str(uuid.uuid4())


def _expiration(ttl_seconds: int) -> bytes:
    """``apns-expiration``: 0 = deliver now or never; otherwise now + ttl (epoch seconds)."""
    return b"0" if ttl_seconds <= 0 else str(int(time.time()) + ttl_seconds).encode()


def _valid_header_value(value: str, max_bytes: int) -> bool:
    # h2 refuses some values (and a refused header block spoils the connection), so check first.
    raw = value.encode("utf-8", "surrogateescape")
    return value.isprintable() and value.strip() == value and 0 < len(raw) <= max_bytes


def _endpoint(settings: ApnsSettings) -> str:
    """``https://host[:port]`` pushes go to (Apple's host for the environment by default)."""
    if not _valid_header_value(settings.topic, 255) or " " in settings.topic:
        raise ValueError("topic: expected a bundle id")
    if settings.environment not in ("production", "sandbox"):
        raise ValueError("environment: must be production or sandbox")
    if not settings.endpoint:
        return "https://" + (SANDBOX_HOST if settings.environment == "sandbox" else PRODUCTION_HOST)
    parts = urlsplit(settings.endpoint)
    if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError("endpoint: expected https://host[:port]")
    return settings.endpoint.rstrip("/")


def _retry_after(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def _provider_token(settings: ApnsSettings) -> ProviderToken | None:
    if not settings.key_pem:
        return None
    if not settings.key_id or not settings.team_id:
        raise ValueError("auth: token auth needs key_id and team_id")
    try:
        key: Any = serialization.load_pem_private_key(settings.key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError("key_pem: not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError("key_pem: APNs keys are P-256 (ES256)")
    return ProviderToken(key, settings.key_id, settings.team_id)
