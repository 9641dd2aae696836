"""Who is calling: bearer tokens and client-certificate subjects, mapped to configured clients.

A call names its client by ``authorization: Bearer <token>`` metadata, or, under mutual TLS, by
its certificate's subject (``clients[].subject``, compared as normalized RFC 4514 text). When it
carries both, they must name the same client. Tokens are compared in constant time against
every client's, so timing tells nothing about which client, if any, nearly matched. Without a
``clients`` section the API is open and every caller is :data:`ANYONE`.

The interceptor (``relay/interceptors.py``) authenticates each call and sets :data:`CALLER`; the
servicer authorizes each device's app against it (:func:`check_apps`). Messages name configured
clients and apps, never a token.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

from cryptography import x509

from relay.config import ClientConfig
from relay.errors import PermissionDenied, Unauthenticated

_BEARER = "bearer "
AuthContext = Mapping[str, Iterable[bytes]]  # grpc's ServicerContext.auth_context()


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller: its configured name and apps; ``apps`` None = every app."""

    name: str
    apps: frozenset[str] | None

    def may_use(self, app_id: str) -> bool:
        return self.apps is None or app_id in self.apps


ANYONE = Caller("", None)  # the caller of an open API (no ``clients`` configured)

# Set by the interceptor for the call being served; tasks the servicer starts inherit it.
CALLER: ContextVar[Caller] = ContextVar("relay_caller")


def current_caller() -> Caller:
    """The caller of the call being served.

    Raises:
        LookupError: outside a call the interceptor admitted (so a missing interceptor fails
            closed rather than open).
    """
    return CALLER.get()


class Authenticator:
    """Maps a call's credentials to one of ``clients``; an empty table is an open API."""

    def __init__(self, clients: Sequence[ClientConfig]) -> None:
        self.open = not clients
        self._tokens = [(_digest(c.token), c) for c in clients if c.token]
        self._subjects = {c.subject: c for c in clients if c.subject}
        self._callers = {c.name: Caller(c.name, frozenset(c.apps)) for c in clients}

    def authenticate(
        self,
        metadata: Sequence[tuple[str, str | bytes]],
        auth_context: AuthContext,
    ) -> Caller:
        """The caller named by ``metadata`` and the TLS ``auth_context``.

        Raises:
            Unauthenticated: no credentials, or ones that name no client, or two that disagree.
        """
        if self.open:
            return ANYONE
        by_token = self._by_token(metadata)
        by_cert = self._by_cert(auth_context)
        if by_token and by_cert and by_token is not by_cert:
            raise Unauthenticated(
                "authorization: the bearer token and the client certificate name different clients"
            )
        client = by_token or by_cert
        if client is None:
            raise Unauthenticated(self._missing(auth_context))
        return self._callers[client.name]

    def _by_token(self, metadata: Sequence[tuple[str, str | bytes]]) -> ClientConfig | None:
        values = [value for key, value in metadata if key == "authorization"]
        if not values:
            return None
        if len(values) > 1 or not isinstance(values[0], str):
            raise Unauthenticated("authorization: send exactly one 'Bearer <token>' value")
        if values[0][: len(_BEARER)].lower() != _BEARER:
            raise Unauthenticated("authorization: expected 'Bearer <token>'")
        presented = _digest(values[0][len(_BEARER) :].strip().encode())
        found = None
        for digest, client in self._tokens:  # every client, no early exit: constant time
            if hmac.compare_digest(digest, presented):
                found = client
        if found is None:
            raise Unauthenticated("authorization: the bearer token matches no configured client")
        return found

    def _by_cert(self, auth_context: AuthContext) -> ClientConfig | None:
        pem = _peer_pem(auth_context)
        if pem is None or not self._subjects:
            return None
        return self._subjects.get(_subject(pem))

    def _missing(self, auth_context: AuthContext) -> str:
        if _peer_pem(auth_context) is not None and self._subjects:
            return (
                "client certificate: its subject names no configured client (clients[].subject)"
                " and no 'authorization: Bearer <token>' metadata was sent"
            )
        return "authorization: missing; send 'authorization: Bearer <token>' metadata"


def check_apps(caller: Caller, app_ids: Sequence[str]) -> None:
    """Every device's app must be one ``caller`` may use.

    Raises:
        PermissionDenied: naming each device and app refused.
    """
    refused = [
        f"devices[{i}].app_id: client {caller.name} may not use app {app_id}"
        for i, app_id in enumerate(app_ids)
        if not caller.may_use(app_id)
    ]
    if refused:
        more = f"; and {len(refused) - 10} more" if len(refused) > 10 else ""
        raise PermissionDenied("; ".join(refused[:10]) + more)


def _digest(token: bytes) -> bytes:
    # Hashing first makes the comparison independent of the tokens' lengths, too.
    return hashlib.sha256(token).digest()


def _peer_pem(auth_context: AuthContext) -> bytes | None:
    """The verified peer certificate gRPC puts in the auth context under mutual TLS."""
    return next(iter(auth_context.get("x509_pem_cert", ())), None)


@functools.lru_cache(maxsize=256)
def _subject(pem: bytes) -> str:
    """A peer certificate's subject as normalized RFC 4514 text (cached: callers reconnect)."""
    return x509.load_pem_x509_certificate(pem).subject.rfc4514_string()
