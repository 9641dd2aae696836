"""FCM HTTP v1 adapter: ``messages:send`` over the shared libcurl HTTP/2 transport.

The relay renders the v1 ``message`` object without its target (``relay/render.py``); this
adapter adds the target (``token``, or ``fid`` for a device token written ``fid:<id>``), fills
``android.priority``/``ttl``/``collapse_key`` from the :class:`~adapters.base.Push` only where the
payload lacks them, and POSTs ``{"message": …}`` with an OAuth2 access token from the service
account (``adapters/_google_oauth.py``). The token exchange, a request an hour, and every push go
through ``adapters/_transport.py`` (libcurl, ~25× cheaper per request than httpx).

How answers become outcomes (providers.md §2.3, §6). The FCM ``errorCode`` detail decides, not
the HTTP status alone, so that a misconfigured project (404 without ``UNREGISTERED``) never
tells the caller to delete every token:

- 200 → ``DELIVERED``, the message ``name`` as ``provider_message_id``;
- 404 ``UNREGISTERED``, 403 ``SENDER_ID_MISMATCH``, and 400 ``INVALID_ARGUMENT`` saying "The
  registration token is not a valid FCM registration token" → ``TOKEN_INVALID``;
- 429 → ``RATE_LIMITED`` after ``Retry-After`` (60 s when absent, Google's minimum backoff);
- 5xx, a lost connection, a timeout → ``UNAVAILABLE``, retryable (the relay's wrapper retries);
- 401 without an FCM code (our access token refused) → refresh it and send once more; a second
  401 → ``REJECTED``;
- any other 4xx (a bad message, 401 ``THIRD_PARTY_AUTH_ERROR``) → ``REJECTED``;
- the token endpoint refusing the grant → ``REJECTED`` (``OAUTH_INVALID_GRANT``, …); the token
  endpoint unreachable or failing → ``UNAVAILABLE``, retryable.

Nothing logged carries a device token, an access token, a URL or key material.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from adapters._google_oauth import (
    DEFAULT_REFRESH_MARGIN_SECONDS,
    OAuthError,
    ServiceAccountKey,
    TokenSource,
)
from adapters._transport import Response, Transport, TransportError, TransportSettings
from adapters.base import Adapter, Outcome, Push, Verdict, encode_json, json_object

log = logging.getLogger("adapters.fcm")

FCM_BASE_URL = "https://fcm.googleapis.com"
FID_PREFIX = "fid:"
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
INVALID_TOKEN_MESSAGE = "not a valid fcm registration token"  # lower-cased, matched inside
QUOTA_DEFAULT_RETRY_SECONDS = 60  # Google: back off at least a minute after QUOTA_EXCEEDED
_MAX_RETRY_AFTER_SECONDS = 24 * 3600
_CONTENT_TYPE = b"content-type: application/json"


@dataclass(frozen=True, slots=True)
class FcmSettings:
    """One Android app's FCM settings, as ``relay/config.py`` builds them.

    ``service_account`` is the parsed service-account JSON (``project_id``, ``private_key``,
    ``private_key_id``, ``client_email``, ``token_uri``); the access token is fetched from its
    ``token_uri`` and held in memory only.
    """

    app_id: str
    service_account: Mapping[str, Any] = field(repr=False)
    endpoint: str = ""  # https://host:port; empty = https://fcm.googleapis.com
    ca_pem: bytes = b""  # extra trust anchors for the endpoint and token_uri (PEM)
    proxy: str = ""
    # Refresh the access token this long before it expires (capped at half its lifetime).
    token_refresh_margin_seconds: float = DEFAULT_REFRESH_MARGIN_SECONDS


@dataclass(frozen=True, slots=True)
class _Answer:
    """The parts of an FCM response that classification reads."""

    status: int
    error_code: str  # FcmError errorCode, "" when absent
    rpc_status: str  # google.rpc status name, "" when absent
    message: str
    name: str
    retry_after: int | None

    @classmethod
    def of(cls, response: Response) -> _Answer:
        body = json_object(response.body)
        error = body.get("error")
        error = error if isinstance(error, dict) else {}
        return cls(
            status=response.status,
            error_code=_fcm_error_code(error),
            rpc_status=_str(error.get("status")),
            message=_str(error.get("message")),
            name=_str(body.get("name")),
            retry_after=_retry_after(response.header("retry-after")),
        )

    @property
    def reason(self) -> str:
        return self.error_code or self.rpc_status or f"HTTP_{self.status}"

    @property
    def oauth_refused(self) -> bool:
        """A 401 about our access token (an FCM code such as THIRD_PARTY_AUTH_ERROR is not)."""
        return self.status == 401 and not self.error_code


class FcmAdapter(Adapter[FcmSettings]):
    """Sends pushes for one app through FCM HTTP v1.

    Build it with :meth:`create` inside the running loop; it owns its transport (pushes and the
    OAuth token exchange) unless one was injected.
    """

    platform = "fcm"

    def __init__(
        self,
        settings: FcmSettings,
        key: ServiceAccountKey,
        transport: Transport,
        *,
        owns_transport: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._app_id = settings.app_id
        self._transport = transport
        self._owns_transport = owns_transport
        self._closed = False
        base = (settings.endpoint or FCM_BASE_URL).rstrip("/")
        self._url = f"{base}/v1/projects/{quote(key.project_id, safe='')}/messages:send"
        self._tokens = TokenSource(
            key,
            transport,
            app_id=settings.app_id,
            refresh_margin_seconds=settings.token_refresh_margin_seconds,
            clock=clock,
        )
        self._auth_token, self._auth_line = "", b""

    @classmethod
    async def create(
        cls,
        settings: FcmSettings,
        *,
        transport: Transport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> FcmAdapter:
        """Check the service account and set up the transport (no request is made yet).

        Args:
            settings: the app's settings.
            transport: the transport for pushes and the token endpoint, instead of building
                one (the caller closes it).
            clock: a monotonic clock for token expiry (tests move it forward).

        Raises:
            ValueError: the service account is unusable; the message names the app and the
                field, never a value.
        """
        try:
            key = ServiceAccountKey.from_info(settings.service_account)
        except ValueError as exc:
            raise ValueError(f"app {settings.app_id!r}: {exc}") from None
        owns_transport = transport is None
        if transport is None:
            try:
                transport = Transport(
                    TransportSettings(ca_pem=settings.ca_pem, proxy=settings.proxy)
                )
            except ValueError as exc:
                raise ValueError(f"app {settings.app_id!r}: {exc}") from None
        return cls(settings, key, transport, owns_transport=owns_transport, clock=clock)

    @property
    def ready(self) -> bool:
        """True until :meth:`aclose`."""
        return not self._closed

    async def send(self, push: Push) -> Outcome:
        """POST one message; a 401 on our access token refreshes it and sends once more."""
        if self._closed:
            return Outcome.unavailable("AdapterClosed", retryable=False)
        body = _body(push)
        try:
            for _ in range(2):  # a 401 on our access token: drop it, fetch one, send once more
                token = self._tokens.fresh() or await self._tokens.get()
                headers = (self._authorization(token), _CONTENT_TYPE, b"Accept:")
                answer = _Answer.of(await self._transport.request(self._url, headers, body))
                if not answer.oauth_refused:
                    break
                self._tokens.invalidate(token)
            else:
                log.warning(
                    "fcm refused a fresh access token",
                    extra={"app": self._app_id, "reason": answer.reason},
                )
        except OAuthError as exc:
            verdict = Verdict.UNAVAILABLE if exc.retryable else Verdict.REJECTED
            return Outcome(verdict, exc.reason, retryable=exc.retryable)
        except TransportError as exc:  # no answer: timeout, connection lost or refused, TLS
            return Outcome.unavailable(exc.reason)
        if answer.error_code == "THIRD_PARTY_AUTH_ERROR":
            # The APNs/Web Push credential uploaded to Firebase is wrong: operators must act.
            log.warning("fcm reports a third-party auth error", extra={"app": self._app_id})
        return _classify(answer)

    async def aclose(self) -> None:
        """Stop refreshing and close the transport (if this adapter built it); idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._tokens.aclose()
        if self._owns_transport:
            await self._transport.aclose()

    def _authorization(self, token: str) -> bytes:
        """The header line for ``token``, built once per token rather than per push."""
        if token != self._auth_token:
            self._auth_token = token
            self._auth_line = b"authorization: Bearer " + token.encode("ascii")
        return self._auth_line


def _classify(answer: _Answer) -> Outcome:
    """The outcome for one FCM answer (the table in the module docstring)."""
    status, code = answer.status, answer.error_code
    if status == 200:
        return Outcome.delivered(answer.name)
    if code in ("UNREGISTERED", "SENDER_ID_MISMATCH") or _invalid_token(answer):
        return Outcome(Verdict.TOKEN_INVALID, answer.reason)
    if status == 429:
        wait = QUOTA_DEFAULT_RETRY_SECONDS if answer.retry_after is None else answer.retry_after
        return Outcome(Verdict.RATE_LIMITED, answer.reason, retry_after_seconds=wait)
    if status >= 500:
        return Outcome.unavailable(answer.reason, retry_after=answer.retry_after or 0)
    return Outcome(Verdict.REJECTED, answer.reason)


def _invalid_token(answer: _Answer) -> bool:
    # INVALID_ARGUMENT also covers message bugs; only this message means the token is dead.
    return (
        answer.status == 400
        and answer.error_code in ("INVALID_ARGUMENT", "")
        and INVALID_TOKEN_MESSAGE in answer.message.lower()
    )


def _body(push: Push) -> bytes:
    """``{"message": …}`` with the push's target added to its payload.

    A rendered push carries its payload encoded already (``Push.encoded``), with the Android
    fields :func:`_message` would otherwise add: the target is spliced in after its last field,
    giving the bytes ``encode_json`` would.
    """
    if len(push.encoded) < 3 or not push.encoded.endswith(b"}"):
        return encode_json({"message": _message(push)})
    if push.token.startswith(FID_PREFIX):
        target = b',"fid":' + _json_string(push.token[len(FID_PREFIX) :])
    else:
        target = b',"token":' + _json_string(push.token)
    return b'{"message":' + push.encoded[:-1] + target + b"}}"


def _json_string(text: str) -> bytes:
    return json.dumps(text, ensure_ascii=False).encode()  # as encode_json spells strings


def _message(push: Push) -> dict[str, Any]:
    if not isinstance(push.payload, Mapping):
        raise TypeError("an FCM push payload is the message object, not bytes")
    message = dict(push.payload)
    android = dict(message.get("android") or {})
    # render sets these; a hand-built payload gets them from the Push.
    if "priority" not in android:
        android["priority"] = "high" if push.high_priority else "normal"
    if "ttl" not in android:
        android["ttl"] = f"{push.ttl_seconds}s"
    if push.collapse_key and not ({"collapse_key", "collapseKey"} & android.keys()):
        android["collapse_key"] = push.collapse_key
    message["android"] = android
    if push.token.startswith(FID_PREFIX):
        message["fid"] = push.token[len(FID_PREFIX) :]
    else:
        message["token"] = push.token
    return message


def _fcm_error_code(error: Mapping[str, Any]) -> str:
    details = error.get("details")
    for detail in details if isinstance(details, list) else ():
        if isinstance(detail, dict) and detail.get("@type") == FCM_ERROR_TYPE:
            return _str(detail.get("errorCode"))
    return ""


def _retry_after(value: str | None) -> int | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), or None."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(math.ceil(seconds), 0), _MAX_RETRY_AFTER_SECONDS)


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""
