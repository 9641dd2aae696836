"""Web Push adapter: RFC 8030 delivery, RFC 8291 encryption, RFC 8292 VAPID, over libcurl.

Also serves UnifiedPush distributors, which speak Web Push. Not pywebpush: its async path is
aiohttp and its default TTL of 0 drops pushes to offline devices. Instead ``adapters/_ece.py``
encrypts, ``adapters/_vapid.py`` signs and the shared transport (``adapters/_transport.py``:
HTTP/2 when the service offers it, HTTP/1.1 otherwise) posts.

The endpoint URL comes from the caller, so it is an SSRF vector: :func:`check_endpoint` allows
only ``https`` URLs whose host matches the app's ``allowed_endpoints`` (deny by default), the
relay calls it while validating a request and :meth:`WebPushAdapter.send` checks again, and
redirects are never followed. The URL is parsed once (:func:`_parse_endpoint`, strict RFC 3986
over printable ASCII: an ``@`` anywhere before the path is refused as credentials), and libcurl
is handed the URL rebuilt from the parts that were checked (:attr:`_Endpoint.url`), so the
check and the connection cannot disagree about the host. An endpoint URL is a bearer
capability: it appears in no log line and no outcome; the transport logs nothing.

Responses: 2xx → DELIVERED; 404/410 → TOKEN_INVALID; 429 → RATE_LIMITED; 5xx → UNAVAILABLE
(retryable); 3xx and other 4xx (400, 401, 403, 413, ...) → REJECTED.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from adapters._ece import Encrypt, encrypt
from adapters._transport import Response, Transport, TransportError, TransportSettings
from adapters._vapid import VapidSigner, load_vapid_key
from adapters.base import Adapter, Outcome, Push, Verdict, json_object, payload_bytes

__all__ = ["WebPushAdapter", "WebPushSettings", "check_endpoint"]

log = logging.getLogger(__name__)

# Real endpoints are 150-400 characters; anything far longer is not a push subscription.
MAX_ENDPOINT_CHARS = 2048
_MAX_RESPONSE_BYTES = 4096  # error bodies are a short JSON reason; never buffer more
_MAX_RETRY_AFTER_SECONDS = 24 * 3600
_URL_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII: no spaces, controls or Unicode
# RFC 3986's generic syntax: scheme, then an authority up to the first "/", "?" or "#" (a
# fragment is never sent).
_URL = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/?#]*)"
    r"(?P<path>[^?#]*)(?:\?(?P<query>[^#]*))?(?:#.*)?"
)
_AUTHORITY = re.compile(
    r"(?:(?P<name>[^:\[\]]+)|\[(?P<ipv6>[0-9A-Fa-f:.]+)\])(?::(?P<port>[0-9]{0,5}))?"
)
# Printable ASCII that RFC 3986 allows nowhere in a path or query: percent-encoded, as browsers
# and httpx do ("%" itself passes as it is: endpoints arrive encoded).
_ENCODE = str.maketrans({c: f"%{ord(c):02X}" for c in '"<>\\^`{|}'})
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_TOPIC = re.compile(r"[A-Za-z0-9_-]{1,32}")  # RFC 8030 §5.4
_REASON = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")  # a provider's reason word, nothing else
_STATUS_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    410: "Gone",
    413: "PayloadTooLarge",
    429: "TooManyRequests",
    500: "InternalServerError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}


@dataclass(frozen=True, slots=True)
class WebPushSettings:
    """One web app's Web Push settings, as ``relay/config.py`` builds them.

    ``allowed_endpoints`` are host globs (``*.push.services.mozilla.com``): an endpoint whose host
    matches none is refused (deny by default), so a caller cannot make the relay POST anywhere.
    """

    app_id: str
    vapid_private_key_pem: bytes = field(repr=False)
    subject: str  # mailto: or https: contact URI
    allowed_endpoints: tuple[str, ...] = ()
    ca_pem: bytes = b""  # extra trust anchors for push services (PEM), e.g. a test fake's CA
    proxy: str = ""


def check_endpoint(settings: WebPushSettings, endpoint: str) -> str | None:
    """Why the relay must not POST to ``endpoint`` for this app, or None when it may.

    The endpoint must be an absolute ``https`` URL without credentials whose host matches one of
    ``settings.allowed_endpoints``. A glob's ``*`` matches any run of host characters, dots
    included, so ``*.example.com`` allows ``a.example.com`` and ``a.b.example.com`` but neither
    ``example.com`` nor ``evilexample.com``; ``?`` matches one character within a label. Any port
    on an allowed host is accepted (the host is the trust boundary). The URL libcurl is given is
    rebuilt from the parts checked here, so the check and the connection cannot disagree.

    Args:
        settings: the app's settings (its allow-list).
        endpoint: the subscription endpoint URL (``Device.token``).

    Returns:
        A problem naming the field and the rule (never echoing the URL), or None.
    """
    url = _parse_endpoint(endpoint)
    return url if isinstance(url, str) else _check_host(settings, url)


def _check_host(settings: WebPushSettings, url: _Endpoint) -> str | None:
    if not any(_glob_matches(glob, url.host) for glob in settings.allowed_endpoints):
        return "token: endpoint host not in allowed_endpoints"
    return None


@dataclass(frozen=True, slots=True)
class _Endpoint:
    """A checked endpoint: host (lower case; an IPv6 literal without brackets), port (None for
    https's 443) and target (path and query, percent-encoded where RFC 3986 requires)."""

    host: str
    port: int | None
    target: str

    @property
    def origin(self) -> str:
        """The ASCII serialization of the URL's origin: the VAPID ``aud``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}" if self.port is None else f"https://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The URL libcurl is given: the checked origin and the encoded target."""
        return self.origin + self.target


def _parse_endpoint(endpoint: str) -> _Endpoint | str:
    not_https = "token: endpoint must be an https URL"
    if len(endpoint) > MAX_ENDPOINT_CHARS:
        return f"token: endpoint longer than {MAX_ENDPOINT_CHARS} characters"
    if not _URL_CHARS.fullmatch(endpoint):
        return not_https
    parts = _URL.fullmatch(endpoint)
    if parts is None or parts["scheme"].lower() != "https":
        return not_https
    authority = parts["authority"]
    if "@" in authority:  # userinfo, or a host some parser would read past a "\\" or "%2f"
        return "token: endpoint must not contain credentials"
    where = _AUTHORITY.fullmatch(authority)
    if where is None:
        return not_https
    host = (where["name"] or where["ipv6"] or "").lower()
    # IPv6 literals pass only as "not allowed": the allow-list syntax has no way to name them.
    if not (where["ipv6"] or _HOSTNAME.fullmatch(host)):
        return not_https
    port = int(where["port"]) if where["port"] else None
    if port is not None and not 0 < port < 65536:
        return not_https
    target = (parts["path"] or "/") + ("?" + parts["query"] if parts["query"] is not None else "")
    return _Endpoint(host, None if port == 443 else port, target.translate(_ENCODE))


def _glob_matches(glob: str, host: str) -> bool:
    return _glob_pattern(glob).fullmatch(host) is not None


@functools.lru_cache(maxsize=256)  # the configured globs: a handful per app
def _glob_pattern(glob: str) -> re.Pattern[str]:
    return re.compile(
        "".join(
            "[a-z0-9.-]*" if c == "*" else "[a-z0-9-]" if c == "?" else re.escape(c)
            for c in glob.lower()
        )
    )


class WebPushAdapter(Adapter[WebPushSettings]):
    """Posts encrypted, VAPID-signed pushes to Web Push (and UnifiedPush) endpoints.

    Args:
        settings: the app's settings.
        transport: the HTTP transport (it never follows redirects). Closed by :meth:`aclose`
            only when ``owns_transport``.
        signer: the VAPID signer for the app's key.
        encrypt: the encryption step (RFC 8291 by default); see ``adapters/_ece.py``.
        owns_transport: whether :meth:`aclose` closes ``transport``.
    """

    platform = "webpush"

    def __init__(
        self,
        settings: WebPushSettings,
        transport: Transport,
        signer: VapidSigner,
        *,
        encrypt: Encrypt = encrypt,
        owns_transport: bool = False,
    ) -> None:
        self._settings = settings
        self._transport = transport
        self._signer = signer
        self._encrypt = encrypt
        self._owns_transport = owns_transport
        self._closed = False

    @classmethod
    async def create(
        cls,
        settings: WebPushSettings,
        *,
        transport: Transport | None = None,
        clock: Callable[[], float] = time.time,
        encrypt: Encrypt = encrypt,
    ) -> WebPushAdapter:
        """Build the adapter for one app.

        Args:
            settings: the app's settings.
            transport: an HTTP transport to use instead of the adapter's own (tests); the
                caller closes it.
            clock: epoch seconds for VAPID token expiry; injectable for tests.
            encrypt: the encryption step.

        Raises:
            ValueError: the VAPID key or subject is unusable; the message names the app.
        """
        try:
            key = load_vapid_key(settings.vapid_private_key_pem)
        except ValueError as exc:
            raise ValueError(f"app {settings.app_id}: {exc}") from None
        if not settings.subject.startswith(("mailto:", "https:")):
            raise ValueError(f"app {settings.app_id}: VAPID subject must be mailto: or https:")
        signer = VapidSigner(key, settings.subject, clock=clock)
        owns = transport is None
        if transport is None:
            try:
                transport = Transport(transport_settings(settings))
            except ValueError as exc:
                raise ValueError(f"app {settings.app_id}: {exc}") from None
        return cls(settings, transport, signer, encrypt=encrypt, owns_transport=owns)

    @property
    def ready(self) -> bool:
        """True until :meth:`aclose`."""
        return not self._closed

    @property
    def vapid_public_key(self) -> str:
        """The VAPID public key (base64url): the ``applicationServerKey`` to subscribe with."""
        return self._signer.public_key

    async def send(self, push: Push) -> Outcome:
        """POST one push to its endpoint and classify the answer (see the module docstring)."""
        if self._closed:
            return Outcome.unavailable("AdapterClosed", retryable=False)
        url = _parse_endpoint(push.token)  # parsed once, here: it is also where we POST
        if isinstance(url, str) or _check_host(self._settings, url) is not None:
            return Outcome(Verdict.REJECTED, "EndpointNotAllowed")  # the relay checked: a bug
        if push.keys is None:
            return Outcome(Verdict.REJECTED, "MissingKeys")
        if push.collapse_key and not _TOPIC.fullmatch(push.collapse_key):
            return Outcome(Verdict.REJECTED, "BadTopic")
        plaintext = payload_bytes(push)
        try:
            body = self._encrypt(plaintext, push.keys, pad_to=push.pad_to)
        except ValueError:
            return Outcome(Verdict.REJECTED, "InvalidKeys")
        return await self._deliver(url, body, _headers(push))

    async def _deliver(self, url: _Endpoint, body: bytes, headers: list[bytes]) -> Outcome:
        origin = url.origin
        target = origin + url.target
        authorization, fresh = self._signer.authorization(origin)
        try:
            response = await self._post(target, body, headers, authorization)
            if response.status == 403 and not fresh:
                # The service refused a cached token (clock skew, key rotation on its side):
                # sign a new one and try once more, as RFC 8292 services expect.
                self._signer.forget(origin)
                authorization, _ = self._signer.authorization(origin)
                response = await self._post(target, body, headers, authorization)
        except TransportError as exc:  # its reason is one word, never the URL
            return Outcome.unavailable(exc.reason)
        status = response.status
        outcome = _classify(response)
        if status in (401, 403):
            self._signer.forget(origin)
            log.warning(
                "push service refused the VAPID credentials",
                extra={"app": self._settings.app_id, "status": status, "reason": outcome.reason},
            )
        return outcome

    def _post(
        self, url: str, body: bytes, headers: list[bytes], authorization: str
    ) -> asyncio.Future[Response]:
        return self._transport.request(
            url, [*headers, b"Authorization: " + authorization.encode("ascii")], body
        )

    async def aclose(self) -> None:
        """Close the transport if the adapter made it; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns_transport:
            await self._transport.aclose()


def transport_settings(settings: WebPushSettings) -> TransportSettings:
    """How this app reaches push services: bodies never kept past the short reason they carry."""
    return TransportSettings(
        ca_pem=settings.ca_pem,
        proxy=settings.proxy,
        connect_timeout_seconds=5.0,
        timeout_seconds=10.0,
        max_response_bytes=_MAX_RESPONSE_BYTES,
    )


def _headers(push: Push) -> list[bytes]:
    headers = [
        # Always sent: RFC 8030 services answer 400 without it; 0 means "now or never".
        b"TTL: %d" % max(0, push.ttl_seconds),
        b"Urgency: high" if push.high_priority else b"Urgency: normal",
        b"Content-Encoding: aes128gcm",
        b"Content-Type: application/octet-stream",
        b"Accept:",
    ]
    if push.collapse_key:
        headers.append(b"Topic: " + push.collapse_key.encode("ascii"))
    return headers


def _classify(response: Response) -> Outcome:
    status = response.status
    if 200 <= status < 300:
        return Outcome.delivered(response.header("location") or "")
    reason = _reason(status, response.body)
    if status in (404, 410):
        return Outcome(Verdict.TOKEN_INVALID, reason)
    if status == 429:
        # Not retried inside the relay: resending at once only deepens the rate limit.
        retry_after = _retry_after(response.header("retry-after"))
        return Outcome(Verdict.RATE_LIMITED, reason, retry_after_seconds=retry_after)
    if status >= 500:
        return Outcome.unavailable(reason, retry_after=_retry_after(response.header("retry-after")))
    if 300 <= status < 400:
        return Outcome(Verdict.REJECTED, "Redirect")  # never followed: see check_endpoint
    return Outcome(Verdict.REJECTED, reason)


def _reason(status: int, content: bytes) -> str:
    """The service's reason word (Apple: ``{"reason": "BadJwtToken"}``), else the status name."""
    word = json_object(content).get("reason")
    if isinstance(word, str) and _REASON.fullmatch(word):
        return word
    return _STATUS_REASONS.get(status, f"HTTP{status}")


def _retry_after(value: str | None) -> int:
    """Retry-After as whole seconds (delta-seconds or an HTTP-date); 0 when absent or bad."""
    if not value:
        return 0
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return 0
    return int(min(max(seconds, 0.0), _MAX_RETRY_AFTER_SECONDS))
