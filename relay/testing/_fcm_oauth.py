"""Service accounts for the fake FCM, and how its token endpoint checks a JWT-bearer grant.

A grant is accepted when its RS256 assertion is signed by a registered account (``kid``, when
given, must be the account's ``private_key_id``) and carries that account's ``iss``, an ``aud``
the endpoint accepts, the FCM (or cloud-platform) ``scope``, and ``exp - iat`` of at most one
hour, ``iat`` within a minute of now. Refusals are OAuth errors as Google words them.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
MAX_ASSERTION_LIFETIME_SECONDS = 3600

_CLOCK_SKEW_SECONDS = 60
_SHORT_LIVED = (
    "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
    "Check your iat and exp values in the JWT claim."
)


@dataclass(frozen=True)
class ServiceAccount:
    """A throwaway service account: a key file's content and its public key.

    Attributes:
        info: the parsed JSON key file, shaped like Google's (``type``, ``project_id``,
            ``private_key_id``, ``private_key``, ``client_email``, ``token_uri``, ...).
        public_key_pem: the RSA public key (SubjectPublicKeyInfo PEM), for verifiers.
    """

    info: dict[str, Any]
    public_key_pem: bytes

    @classmethod
    def generate(
        cls, project_id: str = "demo-project", token_uri: str = GOOGLE_TOKEN_URI
    ) -> ServiceAccount:
        """A fresh RSA-2048 account of ``project_id`` whose tokens come from ``token_uri``."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode("ascii")
        public_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        email = f"firebase-adminsdk-{secrets.token_hex(3)}@{project_id}.iam.gserviceaccount.com"
        info = {
            "type": "service_account",
            "project_id": project_id,
            "private_key_id": secrets.token_hex(20),
            "private_key": key_pem,
            "client_email": email,
            "client_id": str(secrets.randbelow(10**21)),
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
            "universe_domain": "googleapis.com",
        }
        return cls(info=info, public_key_pem=public_pem)

    @property
    def client_email(self) -> str:
        """The account's e-mail address (the grant's ``iss``)."""
        return str(self.info["client_email"])

    @property
    def private_key_id(self) -> str:
        """The key's id (the grant's ``kid``)."""
        return str(self.info["private_key_id"])

    def with_token_uri(self, token_uri: str, project_id: str | None = None) -> ServiceAccount:
        """The same key, pointed at another token endpoint (and project, when given)."""
        info = {**self.info, "token_uri": token_uri}
        if project_id is not None:
            info["project_id"] = project_id
        return ServiceAccount(info=info, public_key_pem=self.public_key_pem)

    def to_json(self) -> str:
        """The key file's text."""
        return json.dumps(self.info, indent=2)


@dataclass(frozen=True, slots=True)
class Verifier:
    """What the token endpoint knows of one registered account."""

    key_id: str
    public_key: rsa.RSAPublicKey

    @classmethod
    def of(cls, account: ServiceAccount) -> Verifier:
        """The verifier for ``account``'s public key."""
        public_key = serialization.load_pem_public_key(account.public_key_pem)
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise TypeError("service-account keys are RSA")
        return cls(account.private_key_id, public_key)


class GrantError(Exception):
    """A refused grant: the OAuth ``error`` code and its ``error_description``."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


def verify_assertion(
    assertion: str, verifiers: Mapping[str, Verifier], audiences: Sequence[str]
) -> str:
    """Check a grant assertion; return its account's e-mail address.

    Args:
        assertion: the JWT from the ``assertion`` form field.
        verifiers: registered accounts by e-mail address.
        audiences: the ``aud`` values accepted.

    Raises:
        GrantError: the grant is refused.
    """
    try:
        header = jwt.get_unverified_header(assertion)
        unverified = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise GrantError("invalid_grant", "Invalid JWT.") from None
    email = str(unverified.get("iss"))
    verifier = verifiers.get(email)
    if verifier is None:
        raise GrantError("invalid_grant", "Invalid grant: account not found")
    if header.get("alg") != "RS256" or header.get("kid", verifier.key_id) != verifier.key_id:
        raise GrantError("invalid_grant", "Invalid JWT Signature.")
    claims = _verified_claims(assertion, verifier, audiences)
    scopes = str(claims.get("scope", "")).split()
    if FCM_SCOPE not in scopes and CLOUD_PLATFORM_SCOPE not in scopes:
        raise GrantError("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
    return email


def _verified_claims(
    assertion: str, verifier: Verifier, audiences: Sequence[str]
) -> dict[str, Any]:
    try:
        claims: dict[str, Any] = jwt.decode(
            assertion,
            verifier.public_key,
            algorithms=["RS256"],
            audience=list(audiences),
            options={"require": ["iss", "aud", "iat", "exp", "scope"]},
            leeway=_CLOCK_SKEW_SECONDS,
        )
    except jwt.InvalidSignatureError:
        raise GrantError("invalid_grant", "Invalid JWT Signature.") from None
    except jwt.InvalidAudienceError:
        raise GrantError("invalid_grant", "Invalid JWT: Failed audience check.") from None
    except jwt.PyJWTError:  # expired, issued in the future, a claim missing
        raise GrantError("invalid_grant", _SHORT_LIVED) from None
    iat, exp = claims["iat"], claims["exp"]
    if not (isinstance(iat, int) and isinstance(exp, int)):
        raise GrantError("invalid_grant", _SHORT_LIVED)
    if not 0 < exp - iat <= MAX_ASSERTION_LIFETIME_SECONDS:
        raise GrantError("invalid_grant", _SHORT_LIVED)
    return claims
