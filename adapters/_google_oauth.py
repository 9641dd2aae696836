"""Google OAuth2 for a service account: the JWT-bearer grant (RFC 7523), one token in memory.

Built on PyJWT rather than google-auth: google-auth's service-account credentials refresh through
a synchronous transport (``requests``) or an aiohttp-only async one, neither of which shares the
adapter's transport (its TLS trust anchors, proxy and connections). The grant itself is one
RS256-signed JWT and one form POST, so doing it here costs ~100 lines and no new dependency.

:class:`TokenSource` holds at most one access token. It refreshes ``refresh_margin_seconds``
before the token expires (google-auth uses 3 min 45 s), runs one refresh at a time however many
sends wait for it, and rides out a failed early refresh on the still-valid old token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard
from urllib.parse import urlencode

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from adapters import base
from adapters._transport import Response, Transport, TransportError

log = logging.getLogger("adapters.fcm")

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFETIME_SECONDS = 3600  # Google's maximum for a grant assertion
DEFAULT_REFRESH_MARGIN_SECONDS = 225.0  # google-auth's REFRESH_THRESHOLD
RIDE_OUT_RETRY_SECONDS = 10.0  # after a failed early refresh, the old token serves this long
_FORM_HEADERS = (b"content-type: application/x-www-form-urlencoded", b"accept: application/json")


class OAuthError(Exception):
    """The token endpoint did not give us a token.

    Attributes:
        reason: a short code for the outcome (``OAUTH_INVALID_GRANT``, ``OAUTH_UNAVAILABLE``);
            never the endpoint's URL or free-text description.
        retryable: whether asking again later may succeed (transport errors, 5xx, 429).
    """

    def __init__(self, reason: str, *, retryable: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class ServiceAccountKey:
    """The parts of a service-account JSON key file that the grant needs."""

    project_id: str
    client_email: str
    token_uri: str
    private_key_id: str
    private_key: rsa.RSAPrivateKey

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> ServiceAccountKey:
        """Check and load a parsed key file.

        Raises:
            ValueError: a field is missing or unusable; the message names the field and never
                its value.
        """
        fields = {}
        for name in ("project_id", "client_email", "token_uri", "private_key"):
            value = info.get(name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"service account: {name} is missing or not a string")
            fields[name] = value
        if not fields["token_uri"].startswith("https://"):
            raise ValueError("service account: token_uri is not an https URL")
        key_id = info.get("private_key_id", "")
        return cls(
            project_id=fields["project_id"],
            client_email=fields["client_email"],
            token_uri=fields["token_uri"],
            private_key_id=key_id if isinstance(key_id, str) else "",
            private_key=_rsa_key(fields["private_key"]),
        )

    def assertion(self, now: int) -> str:
        """The signed grant assertion, issued at ``now`` (epoch seconds)."""
        claims = {
            "iss": self.client_email,
            "scope": FCM_SCOPE,
            # RFC 7523: the audience is the token endpoint (Google's own value for its keys).
            "aud": self.token_uri,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_SECONDS,
        }
        headers = {"kid": self.private_key_id} if self.private_key_id else None
        return jwt.encode(claims, self.private_key, algorithm="RS256", headers=headers)


def _rsa_key(pem: str) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        # `from None`: the library's message could quote the key material.
        raise ValueError("service account: private_key is not an unencrypted PEM key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("service account: private_key is not an RSA key")
    return key


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    refresh_at: float  # clock time from which a send refreshes first
    expires_at: float  # clock time after which the provider refuses it


class TokenSource:
    """One service account's access token, fetched lazily and refreshed in memory.

    Args:
        key: the service account.
        transport: what the token endpoint is reached through (the adapter's own).
        app_id: the app's configured id, for log lines.
        refresh_margin_seconds: refresh this long before the token expires.
        clock: a monotonic clock in seconds (injected by tests).
    """

    def __init__(
        self,
        key: ServiceAccountKey,
        transport: Transport,
        *,
        app_id: str,
        refresh_margin_seconds: float = DEFAULT_REFRESH_MARGIN_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._key = key
        self._transport = transport
        self._app_id = app_id
        self._margin = refresh_margin_seconds
        self._clock = clock
        self._token: _Token | None = None
        self._refresh: asyncio.Task[_Token] | None = None

    def fresh(self) -> str | None:
        """The current token while it needs no refresh, else None (then ``await get()``): the
        common case without a coroutine, as it is asked for every push."""
        token = self._token
        return token.value if token is not None and self._clock() < token.refresh_at else None

    async def get(self) -> str:
        """A usable access token, refreshing first when it is due.

        Raises:
            OAuthError: no token could be had and none is still valid.
        """
        token = self._token
        if token is not None and self._clock() < token.refresh_at:
            return token.value
        try:
            return (await self._refreshed()).value
        except OAuthError as exc:
            current, now = self._token, self._clock()
            if token is None or current is None or current.value != token.value:
                raise
            if now >= current.expires_at:
                raise
            # An early refresh failed but the token still works: use it, and let the next
            # attempt wait a little, so an outage of the token endpoint is not hammered.
            if current.refresh_at <= now:
                retry_at = now + min(RIDE_OUT_RETRY_SECONDS, (current.expires_at - now) / 2)
                self._token = dataclasses.replace(current, refresh_at=retry_at)
                log.warning(
                    "fcm token refresh failed; using the current token",
                    extra={"app": self._app_id, "reason": exc.reason},
                )
            return current.value

    def invalidate(self, value: str) -> None:
        """Forget ``value`` (the provider refused it); a no-op once it has been replaced."""
        if self._token is not None and self._token.value == value:
            self._token = None

    async def aclose(self) -> None:
        """Cancel a refresh in flight."""
        task, self._refresh = self._refresh, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _refreshed(self) -> _Token:
        if self._refresh is None:
            task = asyncio.get_running_loop().create_task(self._fetch())
            task.add_done_callback(self._refresh_done)
            self._refresh = task
        # shield: a waiter cancelled by its deadline must not cancel everyone else's refresh.
        return await asyncio.shield(self._refresh)

    def _refresh_done(self, task: asyncio.Task[_Token]) -> None:
        if self._refresh is task:
            self._refresh = None
        if not task.cancelled():
            task.exception()  # retrieved here, so a refresh whose waiters all left logs nothing

    async def _fetch(self) -> _Token:
        started = self._clock()
        form = {"grant_type": JWT_BEARER_GRANT, "assertion": self._key.assertion(int(time.time()))}
        try:
            response = await self._transport.request(
                self._key.token_uri, _FORM_HEADERS, urlencode(form).encode("ascii")
            )
        except TransportError as exc:  # its reason is one word, never the URL
            self._warn("OAUTH_UNAVAILABLE", exc.reason)
            raise OAuthError("OAUTH_UNAVAILABLE", retryable=True) from None
        value, expires_in = self._parse(response)
        # Counted from when we asked, so our idea of expiry is never later than the provider's;
        # the margin is capped so that a short-lived token is still used for half its life.
        expires_at = started + expires_in
        self._token = _Token(value, expires_at - min(self._margin, expires_in / 2), expires_at)
        return self._token

    def _parse(self, response: Response) -> tuple[str, float]:
        body = base.json_object(response.body)
        status = response.status
        if status != 200:
            error = body.get("error")
            code = error if isinstance(error, str) and error.isidentifier() else "error"
            reason = f"OAUTH_{code.upper()}" if status < 500 else "OAUTH_UNAVAILABLE"
            retryable = status >= 500 or status == 429
            self._warn(reason, str(status))
            raise OAuthError(reason, retryable=retryable)
        value, expires_in = body.get("access_token"), body.get("expires_in")
        if not isinstance(value, str) or not value or not _positive_number(expires_in):
            self._warn("OAUTH_BAD_RESPONSE", "200")
            raise OAuthError("OAUTH_BAD_RESPONSE", retryable=True)
        return value, expires_in

    def _warn(self, reason: str, detail: str) -> None:
        log.warning(
            "fcm token request failed",
            extra={"app": self._app_id, "reason": reason, "detail": detail},
        )


def _positive_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0
