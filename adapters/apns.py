"""APNs adapter: Apple's HTTP/2 provider API, on aioapns 4.0 with its defects neutralized.

aioapns is the fastest Python APNs client we measured (~1,700 pushes/s per process), so we keep
its protocol and pool, subclassed in ``adapters/_apns_conn.py`` and ``adapters/_apns_pool.py``
(never patched in place). The subclasses assume aioapns 4.0 exactly (``pyproject.toml`` pins it;
:data:`TESTED_AIOAPNS`). What each fixes, and why:

1. Received DATA was never acknowledged, so the 64 KiB receive window only shrank: after ~1,200
   error bodies (410 ``Unregistered``...) on one connection every further error response hung.
   Every DATA frame is now acknowledged as it arrives.
2. Per-send state leaked on success (~290 bytes a push). State now lives in one dict keyed by
   stream id and is removed however the stream ends: response, RST_STREAM, cancellation,
   connection loss. h2's own closed-stream memory is capped too.
3. Responses were matched by ``apns-id``, so two pushes sharing an id lost one answer. They are
   matched by stream id, and every push carries its own ``apns-id`` (``Push.push_id`` or uuid4).
4. An error body split across DATA frames broke the JSON parse: bodies are reassembled and
   parsed once the stream ends.
5. No per-send timeout: a stalled stream waited forever. The relay cancels ``send`` at its
   deadline, which resets the stream and frees its slot; ``send_timeout_seconds`` is a generous
   backstop of our own.
6. Connections closed after 10 s idle, while Apple asks providers to keep them for hours: they
   stay open and send a PING after ``idle_ping_seconds`` without traffic (closed if unanswered).
7. The CONNECT-proxy path failed on Python 3.11+ and uvloop (the proxy transport's socket was
   reused while still owned). The tunnel is now set up on a plain socket before TLS starts.
8. A full pool busy-waited with ``sleep(0.01)`` in no order. Waiters queue on futures and are
   woken oldest first, exactly when a stream slot frees or a connection opens.
9. The pool called ``asyncio.get_event_loop()`` in its constructor: :meth:`ApnsAdapter.create`
   builds it inside the running loop.

Also: Apple's sandbox host is ``api.sandbox.push.apple.com`` (aioapns has the legacy alias), the
provider token is shared by all connections of an app and re-minted once on 403
``ExpiredProviderToken``, and the server's ``MAX_CONCURRENT_STREAMS`` is honoured from its first
SETTINGS frame. Nothing here logs a device token, a payload or any other request content.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hpack import NeverIndexedHeaderTuple

from adapters._apns_conn import ApnsResponse, ConnectFailed, protocol_class
from adapters._apns_pool import FairPool, Proxy
from adapters.base import Adapter, Outcome, Push, Verdict, encode_json

TESTED_AIOAPNS = "4.0"
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
        self._minted_at = 0.0

    def get_header(self) -> str:
        if not self._header or time.monotonic() - self._minted_at >= self.TOKEN_TTL:
            self._mint()
        return self._header

    def refresh(self, rejected: str) -> None:
        """Mint a new token unless another send already replaced ``rejected``."""
        if self._header == rejected:
            self._mint()

    def _mint(self) -> None:
        claims = {"iss": self._team_id, "iat": int(self.wall_clock())}
        token = jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self._key_id})
        self._header = f"bearer {token}"
        self._minted_at = time.monotonic()


class ApnsAdapter(Adapter[ApnsSettings]):
    """Sends pushes to one app's APNs environment over a small pool of HTTP/2 connections."""

    platform = "apns"

    def __init__(self, settings: ApnsSettings, pool: FairPool, auth: ProviderToken | None) -> None:
        self._settings = settings
        self._pool = pool
        self._auth = auth
        host, port = pool.protocol_class.APNS_SERVER, pool.protocol_class.APNS_PORT
        authority = f"[{host}]" if ":" in host else host
        self._fixed = [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":authority", (authority if port == 443 else f"{authority}:{port}").encode()),
        ]
        self._topic = settings.topic.encode()
        self._closed = False

    @classmethod
    async def create(cls, settings: ApnsSettings) -> ApnsAdapter:
        """Build the adapter and its pool in the running loop; connections open on demand.

        Raises:
            ValueError: the settings are unusable (message names the field, never its value).
        """
        _check_aioapns_version()
        host, port = _endpoint(settings)
        pool = FairPool(
            protocol=protocol_class(host, port),
            ssl_context=_ssl_context(settings),
            topic=settings.topic,
            max_connections=settings.max_connections,
            max_streams=settings.max_streams_per_connection,
            connect_timeout=settings.connect_timeout_seconds,
            idle_ping_seconds=settings.idle_ping_seconds,
            proxy=Proxy.parse(settings.proxy) if settings.proxy else None,
        )
        return cls(settings, pool, _provider_token(settings))

    @property
    def ready(self) -> bool:
        return not self._closed

    async def send(self, push: Push) -> Outcome:
        if self._closed:
            return Outcome.unavailable("AdapterClosed", retryable=False)
        if not _HEX_TOKEN.fullmatch(push.token):
            return Outcome(Verdict.TOKEN_INVALID, "BadDeviceToken")
        if push.collapse_key and not _valid_header_value(push.collapse_key, 64):
            return Outcome(Verdict.REJECTED, "BadCollapseId")  # what APNs would answer
        apns_id = _apns_id(push.push_id)
        body = push.payload if isinstance(push.payload, bytes) else encode_json(push.payload)
        response = await self._send_once(push, apns_id, body)
        if response.status == 403 and response.reason in _RETRY_ONCE:
            response = await self._send_once(push, apns_id, body)
        return to_outcome(response)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._pool.aclose()

    async def _send_once(self, push: Push, apns_id: str, body: bytes) -> ApnsResponse:
        authorization = self._auth.get_header() if self._auth is not None else ""
        headers = self._headers(push, apns_id, authorization)
        try:
            async with asyncio.timeout(self._settings.send_timeout_seconds):
                conn = await self._pool.acquire()
                response = await conn.send_request(headers, body)
        except TimeoutError:
            return ApnsResponse(0, "Timeout")
        except ConnectFailed as exc:
            return ApnsResponse(0, f"ConnectFailed:{exc}")
        self._after(response, authorization)
        return response

    def _headers(self, push: Push, apns_id: str, authorization: str) -> list[tuple[bytes, bytes]]:
        headers = [
            *self._fixed,
            # Unique per push: indexing them would only churn the HPACK table.
            NeverIndexedHeaderTuple(b":path", b"/3/device/" + push.token.encode("ascii")),
            NeverIndexedHeaderTuple(b"apns-id", apns_id.encode("ascii")),
            (b"apns-topic", self._topic),
            (b"apns-push-type", b"background" if push.background else b"alert"),
            (b"apns-priority", b"10" if push.high_priority and not push.background else b"5"),
            (b"apns-expiration", _expiration(push.ttl_seconds)),
        ]
        if push.collapse_key:
            headers.append((b"apns-collapse-id", push.collapse_key.encode()))
        if authorization:
            headers.append((b"authorization", authorization.encode("ascii")))
        return headers

    def _after(self, response: ApnsResponse, authorization: str) -> None:
        """Connection and credential upkeep an answer calls for."""
        if response.reason == "ExpiredProviderToken" and self._auth is not None:
            self._auth.refresh(authorization)
        if response.reason in _RETIRE_CONNECTION and response.connection is not None:
            response.connection.retire()


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


def _endpoint(settings: ApnsSettings) -> tuple[str, int]:
    if not _valid_header_value(settings.topic, 255) or " " in settings.topic:
        raise ValueError("topic: expected a bundle id")
    if settings.environment not in ("production", "sandbox"):
        raise ValueError("environment: must be production or sandbox")
    if not settings.endpoint:
        return (SANDBOX_HOST if settings.environment == "sandbox" else PRODUCTION_HOST), 443
    parts = urlsplit(settings.endpoint)
    if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError("endpoint: expected https://host[:port]")
    return parts.hostname, parts.port or 443


def _ssl_context(settings: ApnsSettings) -> ssl.SSLContext:
    if bool(settings.key_pem) == bool(settings.cert_file):
        raise ValueError("auth: set exactly one of key_pem (token auth) or cert_file")
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["h2"])
    if settings.ca_pem:
        try:
            ctx.load_verify_locations(cadata=settings.ca_pem.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError) as exc:
            raise ValueError("ca_pem: not PEM certificates") from exc
    if settings.cert_file:
        try:
            ctx.load_cert_chain(settings.cert_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError("cert_file: cannot load a certificate and key from it") from exc
    return ctx


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


def _check_aioapns_version() -> None:
    installed = metadata.version("aioapns")
    if installed != TESTED_AIOAPNS:
        logger.warning(
            "aioapns %s installed; the APNs adapter's fixes were tested on %s",
            installed,
            TESTED_AIOAPNS,
        )
