"""A fake FCM HTTP v1 with its OAuth2 token endpoint: strict HTTP/2 over TLS on loopback.

It follows providers.md §2.5. Use it in tests, the demo, or your own tests::

    async with FakeFCM(project_id="demo-project") as fcm:
        account = fcm.service_account()   # a key file's content, its token_uri at the fake
        ...  # point the client at fcm.url, trusting fcm.ca_pem
        fcm.mark_dead(token)              # 404 UNREGISTERED from now on
        assert fcm.received[0].message["data"] == {...}

``POST /token`` takes the JWT-bearer grant, checked as ``relay/testing/_fcm_oauth.py`` says
(signature, ``iss``, ``aud`` = the fake's ``token_uri`` or Google's, ``scope``, lifetime); it
issues opaque access tokens that expire after ``token_ttl_seconds``. Refusals are OAuth JSON
(``{"error": "invalid_grant", ...}``).

``POST /v1/projects/<id>/messages:send`` is checked in this order, each failure answering at
once: method (405), path and project (404 ``NOT_FOUND``, no FCM code), the bearer token (401
``UNAUTHENTICATED``, no FCM code), the body (400 ``INVALID_ARGUMENT``, as
``relay/testing/_fcm_messages.py`` says); then injected answers (:meth:`FakeFCM.inject`), then
scripted targets (:meth:`FakeFCM.mark_dead`, :meth:`FakeFCM.script`), else 200 with the
message ``name``. Errors are google.rpc ``Status`` bodies with an ``FcmError`` detail (and a
``BadRequest`` one for invalid messages).

Scripts and faults are keyed by the target as the relay writes device tokens: the registration
token, or ``fid:<id>``. Nothing is written to disk.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from h2.settings import SettingCodes

from relay.testing._fake import FakeServer
from relay.testing._fcm_messages import (
    INVALID_TOKEN_MESSAGE,
    Answer,
    InvalidMessage,
    check_message,
    error_answer,
    field_of,
    parse_body,
    rpc_error_body,
    target_of,
)
from relay.testing._fcm_oauth import (
    GOOGLE_TOKEN_URI,
    JWT_BEARER_GRANT,
    GrantError,
    ServiceAccount,
    Verifier,
    verify_assertion,
)
from relay.testing.h2server import Connection, DropConnection, Faults, H2Server, Request, Response
from relay.testing.tls import TestPKI

_SEND_PATH = re.compile(r"/v1/projects/([^/]+)/messages:send")
_UNAUTHENTICATED = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
    "cookie or other valid authentication credential."
)


@dataclass
class ReceivedMessage:
    """One send request as the fake received it, with the answer it got.

    Attributes:
        target_kind: ``token``, ``fid``, ``topic`` or ``condition`` ("" when none or several).
        target: the target's value (for ``fid``, the bare id).
        message: the body's ``message`` object ({} when the body had none).
        headers: the request headers by lower-case name, pseudo-headers included.
        status: the answer's HTTP status; 0 while unanswered (delayed, stalled, dropped).
        error_code: the answer's FcmError code ("" for 200, for errors without one, and while
            unanswered).
        body: the raw body.
        name: the message name answered on success (``.../fake_message_id`` for a dry run).
        validate_only: the body asked for a dry run.
        connection: the serial number of the connection it came on (1 = first).
    """

    target_kind: str
    target: str
    message: dict[str, Any]
    headers: dict[str, str]
    status: int = 0
    error_code: str = ""
    body: bytes = b""
    name: str = ""
    validate_only: bool = False
    connection: int = 0

    @property
    def key(self) -> str:
        """The target as scripts and faults name it: the token, or ``<kind>:<value>``."""
        if self.target_kind in ("token", ""):
            return self.target
        return f"{self.target_kind}:{self.target}"


_OK = Answer(200)


class _Reject(Exception):
    """The request fails a check: answer with ``answer`` and stop checking."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.message)
        self.answer = answer

    @classmethod
    def invalid(cls, exc: InvalidMessage) -> _Reject:
        """400 INVALID_ARGUMENT with a BadRequest field violation."""
        violation = ((exc.field, exc.message),)
        return cls(Answer(400, "INVALID_ARGUMENT", exc.message, violations=violation))


@dataclass(frozen=True, slots=True)
class _OAuthFault:
    status: int
    error: str


class FakeFCM(FakeServer):
    """A fake FCM HTTP v1 server and token endpoint on ``https://127.0.0.1:<port>``.

    Args:
        pki: the test CA to use (a new one when None); clients must trust ``ca_pem``.
        project_id: the one project it serves.
        token_ttl_seconds: the lifetime of the access tokens it issues (``expires_in``).
        max_concurrent_streams: SETTINGS_MAX_CONCURRENT_STREAMS to announce; 100 as Google's
            front ends do (None: announce none, and httpx then keeps to one stream).

    Attributes:
        received: every request to a non-token path, in arrival order.
        tokens_issued: access tokens issued so far.
        token_requests: requests to the token endpoint so far, refused ones included.
        token_delay_seconds: how long the token endpoint waits before answering.
    """

    def __init__(
        self,
        *,
        pki: TestPKI | None = None,
        project_id: str = "demo-project",
        token_ttl_seconds: int = 3600,
        max_concurrent_streams: int | None = 100,
    ) -> None:
        self.pki = pki or TestPKI()
        self.ca_pem = self.pki.ca_pem
        self.project_id = project_id
        self.token_ttl_seconds = token_ttl_seconds
        self.max_concurrent_streams = max_concurrent_streams
        self.received: list[ReceivedMessage] = []
        self.tokens_issued = 0
        self.token_requests = 0
        self.token_delay_seconds = 0.0
        self._verifiers: dict[str, Verifier] = {}
        self._access_tokens: dict[str, float] = {}  # token → monotonic expiry
        self._scripts: dict[str, Answer] = {}
        self._injected: collections.deque[Answer] = collections.deque()
        self._oauth_faults: collections.deque[_OAuthFault] = collections.deque()
        self._faults = Faults()
        self._ids = itertools.count(1)
        self._server = H2Server(
            self._handle, self.pki.server_context(), initial_settings=self._initial_settings
        )

    # -- lifecycle (start, stop, port, url: FakeServer) ------------------------------------

    @property
    def token_uri(self) -> str:
        """The OAuth2 token endpoint, ``<url>/token``."""
        return f"{self.url}/token"

    # -- accounts and tokens ------------------------------------------------------------------

    def service_account(self, base: ServiceAccount | None = None) -> ServiceAccount:
        """A service account of this project registered here, its ``token_uri`` at the fake.

        Args:
            base: reuse this account's key (RSA generation takes a while) instead of a new one.
        """
        if not self.port:
            raise RuntimeError("start the fake first: the token_uri needs its port")
        if base is None:
            account = ServiceAccount.generate(self.project_id, self.token_uri)
        else:
            account = base.with_token_uri(self.token_uri, self.project_id)
        self.register(account)
        return account

    def register(self, account: ServiceAccount) -> None:
        """Accept grants signed by ``account`` (whatever its ``token_uri``)."""
        self._verifiers[account.client_email] = Verifier.of(account)

    def revoke(self, account: ServiceAccount) -> None:
        """Refuse ``account``'s grants from now on (``invalid_grant``), as for a deleted key."""
        self._verifiers.pop(account.client_email, None)

    def expire_access_tokens(self) -> None:
        """Every access token issued so far is refused (401) from now on."""
        self._access_tokens.clear()

    def fail_token_requests(
        self, status: int = 503, error: str = "temporarily_unavailable", count: int = 1
    ) -> None:
        """Answer the next ``count`` token requests with ``status`` and OAuth ``error``."""
        self._oauth_faults.extend([_OAuthFault(status, error)] * count)

    # -- scripting ----------------------------------------------------------------------------

    def mark_dead(self, token: str) -> None:
        """Answer 404 ``UNREGISTERED`` for ``token`` (or ``fid:<id>``) from now on."""
        self.script(token, 404, "UNREGISTERED")

    def mark_invalid(self, token: str) -> None:
        """Answer 400 ``INVALID_ARGUMENT`` "not a valid FCM registration token" for ``token``."""
        self.script(token, 400, "INVALID_ARGUMENT", INVALID_TOKEN_MESSAGE)

    def script(self, token: str, status: int, error_code: str, message: str | None = None) -> None:
        """Answer every valid request for ``token`` with this error.

        Args:
            token: the registration token, or ``fid:<id>``.
            status: the HTTP status.
            error_code: the FcmError code ("" for none), e.g. ``SENDER_ID_MISMATCH``.
            message: the google.rpc ``message`` (a default for the code when None).
        """
        self._scripts[token] = error_answer(status, error_code, message)

    def inject(
        self,
        status: int,
        error_code: str,
        count: int = 1,
        retry_after: int | None = None,
        *,
        message: str | None = None,
    ) -> None:
        """Answer the next ``count`` valid, authenticated requests (any target) with this error.

        Args:
            status: e.g. 429, 500, 503 (401 with ``error_code`` "" refuses the access token).
            error_code: the FcmError code, e.g. ``QUOTA_EXCEEDED``; "" for none.
            count: how many requests get this answer.
            retry_after: when given, sent as a ``retry-after`` header (seconds).
            message: the google.rpc ``message`` (a default for the code when None).
        """
        self._injected.extend([error_answer(status, error_code, message, retry_after)] * count)

    def delay(self, seconds: float, token: str | None = None) -> None:
        """Wait ``seconds`` before answering ``token`` (every send when None); 0 removes it."""
        self._faults.delay(seconds, token)

    def stall(self, token: str) -> None:
        """Never answer ``token``'s sends; their streams stay open (until :meth:`clear`)."""
        self._faults.stall(token)

    def drop_next(self, count: int = 1) -> None:
        """On each of the next ``count`` sends, cut the TCP connection without answering."""
        self._faults.drop_next(count)

    def clear(self) -> None:
        """Forget what was received, scripted and injected answers and faults.

        Stalled requests resume. Registered accounts and issued access tokens stay.
        """
        self.received.clear()
        self._scripts.clear()
        self._injected.clear()
        self._oauth_faults.clear()
        self._faults.clear()

    # -- the token endpoint -------------------------------------------------------------------

    def _initial_settings(self, connection: Connection) -> Mapping[int, int]:
        if self.max_concurrent_streams is None:
            return {}
        return {SettingCodes.MAX_CONCURRENT_STREAMS: self.max_concurrent_streams}

    async def _token_endpoint(self, request: Request) -> Response:
        self.token_requests += 1
        if self.token_delay_seconds > 0:
            await asyncio.sleep(self.token_delay_seconds)
        if self._oauth_faults:
            fault = self._oauth_faults.popleft()
            return _oauth_error(fault.status, fault.error, "injected fault")
        if request.method != "POST":
            return _oauth_error(405, "invalid_request", "POST only")
        if not (request.header("content-type") or "").startswith(
            "application/x-www-form-urlencoded"
        ):
            return _oauth_error(400, "invalid_request", "form-encoded body required")
        form = parse_qs(request.body.decode("utf-8", "replace"))
        if form.get("grant_type") != [JWT_BEARER_GRANT]:
            return _oauth_error(400, "unsupported_grant_type", "Invalid grant_type")
        audiences = (self.token_uri, GOOGLE_TOKEN_URI)
        try:
            verify_assertion(form.get("assertion", [""])[0], self._verifiers, audiences)
        except GrantError as exc:
            return _oauth_error(400, exc.error, exc.description)
        return self._issue_token()

    def _issue_token(self) -> Response:
        token = f"ya29.fake-{secrets.token_urlsafe(32)}"
        self._access_tokens[token] = time.monotonic() + self.token_ttl_seconds
        self.tokens_issued += 1
        body = {
            "access_token": token,
            "expires_in": self.token_ttl_seconds,
            "token_type": "Bearer",
        }
        return _json_response(200, body)

    # -- the send endpoint --------------------------------------------------------------------

    async def _handle(self, request: Request) -> Response:
        if request.path == "/token":
            return await self._token_endpoint(request)
        record = _record(request)
        self.received.append(record)
        if self._faults.take_drop():
            raise DropConnection
        try:
            answer = self._verdict(request, record)
        except _Reject as rejection:
            answer = rejection.answer
        await self._faults.hold(record.key)
        record.status, record.error_code = answer.status, answer.error_code
        return self._response(answer, record)

    def _verdict(self, request: Request, record: ReceivedMessage) -> Answer:
        if request.method != "POST":
            raise _Reject(error_answer(405, "", "Method not allowed."))
        match = _SEND_PATH.fullmatch(request.path)
        if match is None or match.group(1) != self.project_id:
            raise _Reject(error_answer(404, "", "Requested entity was not found."))
        self._authenticate(request)
        try:
            check_message(parse_body(request.body))
        except InvalidMessage as exc:
            raise _Reject.invalid(exc) from None
        if self._injected:
            return self._injected.popleft()
        return self._scripts.get(record.key, _OK)

    def _authenticate(self, request: Request) -> None:
        scheme, _, token = (request.header("authorization") or "").partition(" ")
        expiry = self._access_tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if expiry is None or time.monotonic() >= expiry:
            raise _Reject(Answer(401, "", _UNAUTHENTICATED))

    def _response(self, answer: Answer, record: ReceivedMessage) -> Response:
        headers = [("content-type", "application/json; charset=UTF-8")]
        if answer.status == 200:
            # A dry run gets the placeholder id FCM answers for validate_only.
            message_id = "fake_message_id" if record.validate_only else f"0:{next(self._ids)}"
            record.name = f"projects/{self.project_id}/messages/{message_id}"
            return Response(200, headers, json.dumps({"name": record.name}).encode())
        if answer.status == 401:
            headers.append(("www-authenticate", 'Bearer realm="https://accounts.google.com/"'))
        if answer.retry_after is not None:
            headers.append(("retry-after", str(answer.retry_after)))
        return Response(answer.status, headers, rpc_error_body(answer))


# -- requests and answers ------------------------------------------------------------------------


def _record(request: Request) -> ReceivedMessage:
    try:
        document = json.loads(request.body)
    except ValueError:
        document = None
    document = document if isinstance(document, dict) else {}
    message = document.get("message")
    message = message if isinstance(message, dict) else {}
    kind, target = target_of(message)
    return ReceivedMessage(
        target_kind=kind,
        target=target,
        message=message,
        headers=dict(request.headers),
        body=request.body,
        validate_only=field_of(document, "validate_only") is True,
        connection=request.connection.serial,
    )


def _oauth_error(status: int, error: str, description: str) -> Response:
    return _json_response(status, {"error": error, "error_description": description})


def _json_response(status: int, body: Mapping[str, Any]) -> Response:
    headers = [("content-type", "application/json; charset=utf-8"), ("cache-control", "no-store")]
    return Response(status, headers, json.dumps(body).encode())


__all__ = [
    "FakeFCM",
    "ReceivedMessage",
    "ServiceAccount",
]
