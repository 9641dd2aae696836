"""Throwaway provider credentials for tests and the demo, generated in memory."""

from __future__ import annotations

import secrets
import string
import time
from collections.abc import Iterable
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

_APPLE_ID_ALPHABET = string.ascii_uppercase + string.digits


def apple_id() -> str:
    """A random 10-character identifier shaped like Apple's key and team ids."""
    return "".join(secrets.choice(_APPLE_ID_ALPHABET) for _ in range(10))


@dataclass(frozen=True)
class ApnsKey:
    """An APNs provider-token signing key, like the ``.p8`` file Apple hands out.

    Attributes:
        key_pem: the EC P-256 private key, PKCS#8 PEM (the ``.p8`` content).
        key_id: the 10-character key id (the JWT ``kid``).
        team_id: the 10-character team id (the JWT ``iss``).
        public_key_pem: the matching public key (SubjectPublicKeyInfo PEM), for verifiers.
    """

    key_pem: bytes
    key_id: str
    team_id: str
    public_key_pem: bytes

    @classmethod
    def generate(cls, team_id: str | None = None) -> ApnsKey:
        """A fresh key with a random key id, for ``team_id`` (random when None)."""
        private = ec.generate_private_key(ec.SECP256R1())
        return cls(
            key_pem=private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            key_id=apple_id(),
            team_id=team_id or apple_id(),
            public_key_pem=private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )

    def provider_token(self, issued_at: int | None = None) -> str:
        """A provider JWT as APNs expects it: ES256, ``kid`` header, ``iss`` and ``iat`` claims.

        Args:
            issued_at: the ``iat`` claim, epoch seconds; now when None.
        """
        claims = {"iss": self.team_id, "iat": int(time.time()) if issued_at is None else issued_at}
        return jwt.encode(claims, self.key_pem, algorithm="ES256", headers={"kid": self.key_id})


class ProviderTokenError(Exception):
    """A provider JWT APNs would refuse; ``reason`` is APNs's word for it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _TeamKey:
    team_id: str
    public_key: ec.EllipticCurvePublicKey


class ProviderTokenVerifier:
    """Checks APNs provider tokens as APNs does (providers.md §1.6).

    ES256 only, signed by a registered key named by ``kid``, ``iss`` equal to that key's team,
    an integer ``iat`` no older than ``max_age_seconds`` and at most a minute ahead (clock skew).
    ``typ`` and any other header field are ignored.

    Args:
        keys: the keys whose tokens are accepted; more with :meth:`add_key`.
        max_age_seconds: how old ``iat`` may be (Apple: one hour).
    """

    _CLOCK_SKEW_SECONDS = 60
    _CACHE_LIMIT = 1024

    def __init__(self, keys: Iterable[ApnsKey] = (), *, max_age_seconds: float = 3600) -> None:
        self.max_age_seconds = max_age_seconds
        self._keys: dict[str, _TeamKey] = {}
        self._verified: dict[str, int] = {}  # token → iat; ECDSA checks cost ~0.1 ms each
        for key in keys:
            self.add_key(key)

    def add_key(self, key: ApnsKey) -> None:
        """Accept tokens signed by ``key`` (rotation, another team)."""
        public_key = serialization.load_pem_public_key(key.public_key_pem)
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise TypeError("APNs keys are EC P-256")
        self._keys[key.key_id] = _TeamKey(key.team_id, public_key)

    def verify(self, token: str) -> int:
        """Return the token's ``iat``.

        Raises:
            ProviderTokenError: ``InvalidProviderToken`` or ``ExpiredProviderToken``.
        """
        iat = self._verified.get(token)
        if iat is None:
            iat = self._check_signature_and_claims(token)
            if len(self._verified) >= self._CACHE_LIMIT:
                self._verified.clear()
            self._verified[token] = iat
        if time.time() - iat > self.max_age_seconds:
            raise ProviderTokenError("ExpiredProviderToken")
        return iat

    def _check_signature_and_claims(self, token: str) -> int:
        try:
            key = self._keys.get(str(jwt.get_unverified_header(token).get("kid")))
            if key is None:
                raise ProviderTokenError("InvalidProviderToken")
            claims = jwt.decode(
                token,
                key.public_key,
                algorithms=["ES256"],
                options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
            )
        except jwt.PyJWTError:
            raise ProviderTokenError("InvalidProviderToken") from None
        iat = claims.get("iat")
        if claims.get("iss") != key.team_id or type(iat) is not int:
            raise ProviderTokenError("InvalidProviderToken")
        if iat > time.time() + self._CLOCK_SKEW_SECONDS:
            raise ProviderTokenError("InvalidProviderToken")
        return iat
