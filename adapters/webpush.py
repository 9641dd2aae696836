"""Web Push adapter: RFC 8030 delivery, RFC 8291 encryption, RFC 8292 VAPID, over httpx.

Also serves UnifiedPush distributors, which speak Web Push. Not pywebpush: its async path is
aiohttp and its default TTL of 0 drops pushes to offline devices. Instead ``adapters/_ece.py``
encrypts, ``adapters/_vapid.py`` signs and an ``httpx.AsyncClient`` (HTTP/2 when the service
offers it) posts.

The endpoint URL comes from the caller, so it is an SSRF vector: :func:`check_endpoint` allows
only ``https`` URLs whose host matches the app's ``allowed_endpoints`` (deny by default), the
relay calls it while validating a request and :meth:`WebPushAdapter.send` checks again, and
redirects are never followed. An endpoint URL is a bearer capability: it appears in no log line
and no outcome (httpx's own request log line is cut down to the origin, see ``_RedactUrls``).

Responses: 2xx → DELIVERED; 404/410 → TOKEN_INVALID; 429 → RATE_LIMITED; 5xx → UNAVAILABLE
(retryable); 3xx and other 4xx (400, 401, 403, 413, ...) → REJECTED.
"""

from __future__ import annotations

import email.utils
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from adapters._ece import Encrypt, encrypt
from adapters._http import provider_client
from adapters._vapid import VapidSigner, load_vapid_key
from adapters.base import Adapter, Outcome, Push, Verdict, encode_json

__all__ = ["WebPushAdapter", "WebPushSettings", "check_endpoint"]

log = logging.getLogger(__name__)

# Real endpoints are 150-400 characters; anything far longer is not a push subscription.
MAX_ENDPOINT_CHARS = 2048
_REQUEST_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
_MAX_RESPONSE_BYTES = 4096  # error bodies are a short JSON reason; never buffer more
_MAX_RETRY_AFTER_SECONDS = 24 * 3600
_URL_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII: no spaces, controls or Unicode
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
    on an allowed host is accepted (the host is the trust boundary). The URL is parsed by httpx,
    the parser that will send the request, so the check and the connection cannot disagree.

    Args:
        settings: the app's settings (its allow-list).
        endpoint: the subscription endpoint URL (``Device.token``).

    Returns:
        A problem naming the field and the rule (never echoing the URL), or None.
    """
    url = _parse_endpoint(endpoint)
    if isinstance(url, str):
        return url
    host = url.raw_host.decode("ascii").lower()
    if not any(_glob_matches(glob, host) for glob in settings.allowed_endpoints):
        return "token: endpoint host not in allowed_endpoints"
    return None


def _parse_endpoint(endpoint: str) -> httpx.URL | str:
    not_https = "token: endpoint must be an https URL"
    if len(endpoint) > MAX_ENDPOINT_CHARS:
        return f"token: endpoint longer than {MAX_ENDPOINT_CHARS} characters"
    if not _URL_CHARS.fullmatch(endpoint):
        return not_https
    try:
        url = httpx.URL(endpoint)
    except httpx.InvalidURL:
        return not_https
    if url.scheme != "https" or not url.raw_host:
        return not_https
    if url.userinfo:
        return "token: endpoint must not contain credentials"
    if url.port is not None and not 0 < url.port < 65536:
        return not_https
    host = url.raw_host.decode("ascii").lower()
    # IPv6 literals pass only as "not allowed": the allow-list syntax has no way to name them.
    if not _HOSTNAME.fullmatch(host) and ":" not in host:
        return not_https
    return url


def _glob_matches(glob: str, host: str) -> bool:
    pattern = "".join(
        "[a-z0-9.-]*" if c == "*" else "[a-z0-9-]" if c == "?" else re.escape(c)
        for c in glob.lower()
    )
    return re.fullmatch(pattern, host) is not None


def _origin(url: httpx.URL) -> str:
    """The ASCII serialization of the URL's origin: the VAPID ``aud``."""
    host = url.raw_host.decode("ascii")
    host = f"[{host}]" if ":" in host else host
    port = f":{url.port}" if url.port is not None else ""  # httpx drops the default port
    return f"{url.scheme}://{host}{port}"


class _RedactUrls(logging.Filter):
    """Cuts the URL in httpx's "HTTP Request: POST <url>" log line down to its origin."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _origin(arg) if isinstance(arg, httpx.URL) else arg for arg in record.args
            )
        return True


# httpx logs every request's full URL at INFO, and a Web Push URL is the device's token.
_httpx_log = logging.getLogger("httpx")
if not any(isinstance(f, _RedactUrls) for f in _httpx_log.filters):
    _httpx_log.addFilter(_RedactUrls())


class WebPushAdapter(Adapter[WebPushSettings]):
    """Posts encrypted, VAPID-signed pushes to Web Push (and UnifiedPush) endpoints.

    Args:
        settings: the app's settings.
        client: the HTTP client; it must not follow redirects. Closed by :meth:`aclose` only when
            ``owns_client``.
        signer: the VAPID signer for the app's key.
        encrypt: the encryption step (RFC 8291 by default); see ``adapters/_ece.py``.
        owns_client: whether :meth:`aclose` closes ``client``.
    """

    platform = "webpush"

    def __init__(
        self,
        settings: WebPushSettings,
        client: httpx.AsyncClient,
        signer: VapidSigner,
        *,
        encrypt: Encrypt = encrypt,
        owns_client: bool = False,
    ) -> None:
        self._settings = settings
        self._client = client
        self._signer = signer
        self._encrypt = encrypt
        self._owns_client = owns_client
        self._closed = False

    @classmethod
    async def create(
        cls,
        settings: WebPushSettings,
        *,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
        encrypt: Encrypt = encrypt,
    ) -> WebPushAdapter:
        """Build the adapter for one app.

        Args:
            settings: the app's settings.
            client: an HTTP client to use instead of the adapter's own (tests); the caller
                closes it.
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
        owns = client is None
        client = client or provider_client(
            ca_pem=settings.ca_pem, proxy=settings.proxy, timeout=_REQUEST_TIMEOUT
        )
        return cls(settings, client, signer, encrypt=encrypt, owns_client=owns)

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
        if check_endpoint(self._settings, push.token) is not None:
            return Outcome(Verdict.REJECTED, "EndpointNotAllowed")  # the relay checked: a bug
        if push.keys is None:
            return Outcome(Verdict.REJECTED, "MissingKeys")
        if push.collapse_key and not _TOPIC.fullmatch(push.collapse_key):
            return Outcome(Verdict.REJECTED, "BadTopic")
        plaintext = push.payload if isinstance(push.payload, bytes) else encode_json(push.payload)
        try:
            body = self._encrypt(plaintext, push.keys, pad_to=push.pad_to)
        except ValueError:
            return Outcome(Verdict.REJECTED, "InvalidKeys")
        url = httpx.URL(push.token)
        return await self._deliver(url, body, _headers(push))

    async def _deliver(self, url: httpx.URL, body: bytes, headers: dict[str, str]) -> Outcome:
        origin = _origin(url)
        authorization, fresh = self._signer.authorization(origin)
        try:
            status, response_headers, content = await self._post(url, body, headers, authorization)
            if status == 403 and not fresh:
                # The service refused a cached token (clock skew, key rotation on its side):
                # sign a new one and try once more, as RFC 8292 services expect.
                self._signer.forget(origin)
                authorization, _ = self._signer.authorization(origin)
                status, response_headers, content = await self._post(
                    url, body, headers, authorization
                )
        except httpx.TimeoutException:
            return Outcome.unavailable("Timeout")
        except httpx.RequestError as exc:
            # The exception text may hold the URL: only its type is kept.
            return Outcome.unavailable(type(exc).__name__)
        outcome = _classify(status, response_headers, content)
        if status in (401, 403):
            self._signer.forget(origin)
            log.warning(
                "push service refused the VAPID credentials",
                extra={"app": self._settings.app_id, "status": status, "reason": outcome.reason},
            )
        return outcome

    async def _post(
        self, url: httpx.URL, body: bytes, headers: dict[str, str], authorization: str
    ) -> tuple[int, httpx.Headers, bytes]:
        request = self._client.build_request(
            "POST", url, content=body, headers={**headers, "Authorization": authorization}
        )
        response = await self._client.send(request, stream=True, follow_redirects=False)
        try:
            content = b""
            async for chunk in response.aiter_raw():  # raw: never inflate what a service sends
                content += chunk
                if len(content) >= _MAX_RESPONSE_BYTES:
                    break
        finally:
            await response.aclose()
        return response.status_code, response.headers, content[:_MAX_RESPONSE_BYTES]

    async def aclose(self) -> None:
        """Close the HTTP client if the adapter made it; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            await self._client.aclose()


def _headers(push: Push) -> dict[str, str]:
    headers = {
        # Always sent: RFC 8030 services answer 400 without it; 0 means "now or never".
        "TTL": str(max(0, push.ttl_seconds)),
        "Urgency": "high" if push.high_priority else "normal",
        "Content-Encoding": "aes128gcm",
        "Content-Type": "application/octet-stream",
    }
    if push.collapse_key:
        headers["Topic"] = push.collapse_key
    return headers


def _classify(status: int, headers: httpx.Headers, content: bytes) -> Outcome:
    if 200 <= status < 300:
        return Outcome.delivered(headers.get("location", ""))
    reason = _reason(status, content)
    if status in (404, 410):
        return Outcome(Verdict.TOKEN_INVALID, reason)
    if status == 429:
        # Not retried inside the relay: resending at once only deepens the rate limit.
        retry_after = _retry_after(headers.get("retry-after"))
        return Outcome(Verdict.RATE_LIMITED, reason, retry_after_seconds=retry_after)
    if status >= 500:
        return Outcome.unavailable(reason, retry_after=_retry_after(headers.get("retry-after")))
    if 300 <= status < 400:
        return Outcome(Verdict.REJECTED, "Redirect")  # never followed: see check_endpoint
    return Outcome(Verdict.REJECTED, reason)


def _reason(status: int, content: bytes) -> str:
    """The service's reason word (Apple: ``{"reason": "BadJwtToken"}``), else the status name."""
    try:
        document: Any = json.loads(content)
    except ValueError:
        document = None
    word = document.get("reason") if isinstance(document, dict) else None
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
