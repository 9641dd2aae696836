"""RFC 8292 VAPID: the ``Authorization: vapid t=<JWT>, k=<key>`` header, cached per origin.

Signed with PyJWT (already a dependency) rather than py-vapid: the JWT is three claims and one
ES256 signature, and py-vapid would add a package for it. Tokens are reused per origin until
shortly before they expire: RFC 8292 encourages reuse so services can cache verification, and
Apple asks for no more than one new token an hour.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["TOKEN_LIFETIME_SECONDS", "VapidSigner", "load_vapid_key"]

# RFC 8292 §2: exp at most 24 h ahead; half that leaves room for clock skew at the service.
TOKEN_LIFETIME_SECONDS = 12 * 3600
# Renew this long before exp, so a token never expires on its way to the service.
RENEW_BEFORE_SECONDS = 3600
# Origins are bounded by the app's allow-list, but a glob can match many hosts: bound the cache.
_MAX_CACHED_ORIGINS = 1024


def load_vapid_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    """Load a VAPID signing key: a PEM EC P-256 private key.

    Raises:
        ValueError: not a PEM private key, or not EC P-256 (the message holds no key material).
    """
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise ValueError("VAPID key: not a PEM private key without a password") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError("VAPID key: not an EC P-256 private key")
    return key


@dataclass(frozen=True, slots=True)
class _Token:
    header: str
    expires_at: float


class VapidSigner:
    """Signs VAPID JWTs for push-service origins and keeps one per origin until near expiry.

    Args:
        key: the application server's P-256 signing key.
        subject: the ``sub`` claim, a ``mailto:`` or ``https:`` contact URI.
        clock: epoch seconds; injectable so tests can move time.
    """

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        subject: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = key
        self._subject = subject
        self._clock = clock
        self._tokens: dict[str, _Token] = {}
        raw = key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        self.public_key = base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    def authorization(self, origin: str) -> tuple[str, bool]:
        """The ``Authorization`` header value for a push resource on ``origin``.

        Args:
            origin: ``https://host[:port]`` of the endpoint, the JWT ``aud``.

        Returns:
            The header value, and whether it was signed just now (False: from the cache).
        """
        now = self._clock()
        token = self._tokens.get(origin)
        if token is not None and now < token.expires_at - RENEW_BEFORE_SECONDS:
            return token.header, False
        token = self._sign(origin, now)
        self._remember(origin, token)
        return token.header, True

    def forget(self, origin: str) -> None:
        """Drop the cached token for ``origin`` (the service refused it): the next is fresh."""
        self._tokens.pop(origin, None)

    def _sign(self, origin: str, now: float) -> _Token:
        expires_at = int(now) + TOKEN_LIFETIME_SECONDS
        claims = {"aud": origin, "exp": expires_at, "sub": self._subject}
        jwt_token = jwt.encode(claims, self._key, algorithm="ES256", headers={"typ": "JWT"})
        return _Token(f"vapid t={jwt_token}, k={self.public_key}", float(expires_at))

    def _remember(self, origin: str, token: _Token) -> None:
        self._tokens.pop(origin, None)  # re-insert at the end: the dict is oldest-first
        self._tokens[origin] = token
        while len(self._tokens) > _MAX_CACHED_ORIGINS:
            del self._tokens[next(iter(self._tokens))]
