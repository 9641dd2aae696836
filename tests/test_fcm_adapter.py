"""The FCM adapter against the fake FCM (real HTTP/2 over TLS on loopback), driven directly."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import jwt
import pytest

from adapters import fcm as fcm_adapter
from adapters._transport import Transport, TransportSettings
from adapters.base import Outcome, Push, Verdict, encode_json
from adapters.fcm import FcmAdapter, FcmSettings
from relay.config import AppConfig, PrivacyPolicy
from relay.dispatch import MAX_ATTEMPTS, AppRuntime
from relay.logs import JsonFormatter
from relay.metrics import Metrics
from relay.model import Kind, Message, Privacy
from relay.render import GroupingKeys, render
from relay.testing.fake_fcm import FakeFCM, ServiceAccount
from relay.testing.tls import TestPKI
from tests.support import FakeClock

GROUPING = GroupingKeys(b"k" * 32)

INVALID_TOKEN = "The registration token is not a valid FCM registration token"
PAYLOAD: dict[str, Any] = {
    "notification": {"title": "Alice", "body": "Lunch at noon?"},
    "android": {"priority": "high", "ttl": "60s", "notification": {"tag": "t1"}},
    "data": {"relay": '{"v":1,"kind":"instant_message"}'},
}

MakeAdapter = Callable[..., Awaitable[FcmAdapter]]


Clock = FakeClock


def push(token: str = "reg-token-1", payload: dict[str, Any] | None = None, **fields: Any) -> Push:
    return Push(token=token, payload=PAYLOAD if payload is None else payload, **fields)


@pytest.fixture(scope="session")
def base_account() -> ServiceAccount:
    # One RSA key for the whole file: each fake re-registers it with its own token_uri.
    return ServiceAccount.generate()


@pytest.fixture
async def fcm(pki: TestPKI) -> AsyncIterator[FakeFCM]:
    async with FakeFCM(pki=pki) as fake:
        yield fake


@pytest.fixture
async def make_adapter(fcm: FakeFCM, base_account: ServiceAccount) -> AsyncIterator[MakeAdapter]:
    built: list[FcmAdapter] = []

    async def make(clock: Callable[[], float] = time.monotonic, **settings: Any) -> FcmAdapter:
        account = fcm.service_account(base_account)
        adapter = await FcmAdapter.create(
            FcmSettings(
                app_id="chat-android",
                service_account=account.info,
                endpoint=fcm.url,
                ca_pem=fcm.ca_pem,
                **settings,
            ),
            clock=clock,
        )
        built.append(adapter)
        return adapter

    yield make
    for adapter in built:
        await adapter.aclose()


@pytest.fixture
async def adapter(make_adapter: MakeAdapter) -> FcmAdapter:
    return await make_adapter()


# -- delivery and targets ----------------------------------------------------------------------


async def test_delivered_carries_the_message_name(adapter: FcmAdapter, fcm: FakeFCM) -> None:
    outcome = await adapter.send(push())

    (received,) = fcm.received
    assert outcome == Outcome.delivered(received.name)
    assert received.name.startswith("projects/demo-project/messages/")
    assert (received.target_kind, received.target) == ("token", "reg-token-1")
    assert {k: v for k, v in received.message.items() if k != "token"} == PAYLOAD
    assert received.headers[":path"] == "/v1/projects/demo-project/messages:send"
    assert received.headers["authorization"].startswith("Bearer ya29.")
    assert received.headers["content-type"] == "application/json"


async def test_fid_tokens_target_the_installation(adapter: FcmAdapter, fcm: FakeFCM) -> None:
    fcm.mark_dead("fid:dead-installation")

    delivered = await adapter.send(push("fid:installation-1"))
    dead = await adapter.send(push("fid:dead-installation"))

    assert delivered.verdict is Verdict.DELIVERED
    assert dead == Outcome(Verdict.TOKEN_INVALID, "UNREGISTERED")
    first = fcm.received[0]
    assert (first.target_kind, first.target) == ("fid", "installation-1")
    assert "token" not in first.message


async def test_push_fields_fill_only_what_the_payload_lacks(
    adapter: FcmAdapter, fcm: FakeFCM
) -> None:
    bare = {"data": {"relay": "{}"}}
    await adapter.send(push(payload=bare, high_priority=False, ttl_seconds=30, collapse_key="grp"))
    await adapter.send(push(collapse_key="grp"))

    assert fcm.received[0].message["android"] == {
        "priority": "normal",
        "ttl": "30s",
        "collapse_key": "grp",
    }
    rendered = fcm.received[1].message["android"]
    assert (rendered["priority"], rendered["ttl"]) == ("high", "60s")
    assert rendered["collapse_key"] == "grp"


# -- the outcome table ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "message", "expected"),
    [
        (404, "UNREGISTERED", None, Outcome(Verdict.TOKEN_INVALID, "UNREGISTERED")),
        (403, "SENDER_ID_MISMATCH", None, Outcome(Verdict.TOKEN_INVALID, "SENDER_ID_MISMATCH")),
        (
            400,
            "INVALID_ARGUMENT",
            INVALID_TOKEN,
            Outcome(Verdict.TOKEN_INVALID, "INVALID_ARGUMENT"),
        ),
        (400, "INVALID_ARGUMENT", None, Outcome(Verdict.REJECTED, "INVALID_ARGUMENT")),
        (401, "THIRD_PARTY_AUTH_ERROR", None, Outcome(Verdict.REJECTED, "THIRD_PARTY_AUTH_ERROR")),
        # Without an FCM code a 404 or 403 is about the project, never the token: don't prune.
        (404, "", "Requested entity was not found.", Outcome(Verdict.REJECTED, "NOT_FOUND")),
        (403, "", "Permission denied.", Outcome(Verdict.REJECTED, "PERMISSION_DENIED")),
    ],
)
async def test_error_outcomes(
    adapter: FcmAdapter,
    fcm: FakeFCM,
    status: int,
    code: str,
    message: str | None,
    expected: Outcome,
) -> None:
    fcm.script("reg-token-1", status, code, message)

    assert await adapter.send(push()) == expected
    assert len(fcm.received) == 1  # none of these is sent twice
    assert fcm.tokens_issued == 1


async def test_quota_exceeded_is_rate_limited_with_retry_after(
    adapter: FcmAdapter, fcm: FakeFCM
) -> None:
    fcm.inject(429, "QUOTA_EXCEEDED", retry_after=120)
    fcm.inject(429, "QUOTA_EXCEEDED")

    with_header = await adapter.send(push())
    without_header = await adapter.send(push())

    assert with_header == Outcome(Verdict.RATE_LIMITED, "QUOTA_EXCEEDED", retry_after_seconds=120)
    assert without_header.retry_after_seconds == 60  # Google: back off at least a minute
    assert not without_header.retryable


@pytest.mark.parametrize(
    ("status", "code", "retry_after"), [(500, "INTERNAL", None), (503, "UNAVAILABLE", 7)]
)
async def test_server_errors_are_retryable_unavailable(
    adapter: FcmAdapter, fcm: FakeFCM, status: int, code: str, retry_after: int | None
) -> None:
    fcm.inject(status, code, retry_after=retry_after)

    failed = await adapter.send(push())
    retried = await adapter.send(push())

    assert failed == Outcome.unavailable(code, retry_after=retry_after or 0)
    assert failed.retryable
    assert retried.verdict is Verdict.DELIVERED


@pytest.mark.parametrize(
    ("failures", "verdict"), [(2, Verdict.DELIVERED), (3, Verdict.UNAVAILABLE)]
)
async def test_relay_retries_server_errors_then_gives_up(
    adapter: FcmAdapter, fcm: FakeFCM, failures: int, verdict: Verdict
) -> None:
    app = AppConfig("chat-android", "fcm", PrivacyPolicy(), 10, FcmSettings("chat-android", {}))
    runtime = AppRuntime(app, adapter, Metrics(["fcm"]))  # type: ignore[arg-type]
    fcm.inject(503, "UNAVAILABLE", count=failures)

    deadline = asyncio.get_running_loop().time() + 10
    outcome = await runtime.deliver(push(), deadline)

    assert outcome.verdict is verdict
    assert len(fcm.received) == min(failures + 1, MAX_ATTEMPTS)


async def test_invalid_messages_are_rejected(adapter: FcmAdapter, fcm: FakeFCM) -> None:
    not_a_string = {**PAYLOAD, "data": {"count": 3}}
    bad_ttl = {**PAYLOAD, "android": {"priority": "high", "ttl": "1 week"}}
    unknown_field = {**PAYLOAD, "android": {**PAYLOAD["android"], "colapse_key": "x"}}

    outcomes = [await adapter.send(push(payload=p)) for p in (not_a_string, bad_ttl, unknown_field)]

    assert outcomes == [Outcome(Verdict.REJECTED, "INVALID_ARGUMENT")] * 3
    assert [r.status for r in fcm.received] == [400, 400, 400]


async def test_camel_case_fields_are_accepted(adapter: FcmAdapter) -> None:
    camel = {**PAYLOAD, "android": {"priority": "HIGH", "ttl": "2419200s", "collapseKey": "k"}}

    assert (await adapter.send(push(payload=camel))).verdict is Verdict.DELIVERED


async def test_message_at_the_size_limit_is_accepted_and_one_byte_more_rejected(
    adapter: FcmAdapter, fcm: FakeFCM
) -> None:
    def padded(size: int) -> dict[str, Any]:
        # Multi-byte text: the limit counts UTF-8 bytes, not characters.
        payload = {**PAYLOAD, "data": {**PAYLOAD["data"], "pad": "é" * 100}}
        payload["data"]["pad"] += "x" * (size - len(encode_json(payload)))
        assert len(encode_json(payload)) == size
        return payload

    at_limit = await adapter.send(push(payload=padded(4096)))
    over_limit = await adapter.send(push(payload=padded(4097)))

    assert at_limit.verdict is Verdict.DELIVERED
    assert over_limit == Outcome(Verdict.REJECTED, "INVALID_ARGUMENT")


# -- access tokens -------------------------------------------------------------------------------


async def test_concurrent_sends_share_one_token_fetch(adapter: FcmAdapter, fcm: FakeFCM) -> None:
    fcm.token_delay_seconds = 0.05  # every send is waiting while the one fetch is in flight

    outcomes = await asyncio.gather(*(adapter.send(push(f"tok-{i}")) for i in range(50)))

    assert {o.verdict for o in outcomes} == {Verdict.DELIVERED}
    assert fcm.tokens_issued == 1
    assert fcm.token_requests == 1


async def test_token_is_refreshed_before_it_expires(
    make_adapter: MakeAdapter, fcm: FakeFCM
) -> None:
    clock = Clock()
    adapter = await make_adapter(clock=clock, token_refresh_margin_seconds=300)

    await adapter.send(push())
    clock.advance(3299)  # the 3600 s token is not yet due
    await adapter.send(push())
    assert fcm.tokens_issued == 1
    clock.advance(2)  # within 300 s of expiry: refreshed while the old one still works
    await adapter.send(push())

    assert fcm.tokens_issued == 2
    assert [r.status for r in fcm.received] == [200, 200, 200]
    bearers = [r.headers["authorization"] for r in fcm.received]
    assert bearers[0] == bearers[1] != bearers[2]


async def test_short_lived_tokens_are_used_for_half_their_life(
    pki: TestPKI, base_account: ServiceAccount
) -> None:
    clock = Clock()
    async with FakeFCM(pki=pki, token_ttl_seconds=100) as fake:
        account = fake.service_account(base_account)
        settings = FcmSettings("chat-android", account.info, fake.url, fake.ca_pem)
        adapter = await FcmAdapter.create(settings, clock=clock)  # default 225 s margin
        try:
            await adapter.send(push())
            clock.advance(49)
            await adapter.send(push())
            assert fake.tokens_issued == 1
            clock.advance(2)
            await adapter.send(push())
            assert fake.tokens_issued == 2
        finally:
            await adapter.aclose()


async def test_refused_token_is_refreshed_and_the_send_retried_once(
    adapter: FcmAdapter, fcm: FakeFCM
) -> None:
    await adapter.send(push())
    fcm.expire_access_tokens()

    outcome = await adapter.send(push())

    assert outcome.verdict is Verdict.DELIVERED
    assert [r.status for r in fcm.received] == [200, 401, 200]
    assert fcm.tokens_issued == 2


async def test_token_refused_twice_is_rejected(adapter: FcmAdapter, fcm: FakeFCM) -> None:
    fcm.inject(401, "", count=2)

    outcome = await adapter.send(push())

    assert outcome == Outcome(Verdict.REJECTED, "UNAUTHENTICATED")
    assert [r.status for r in fcm.received] == [401, 401]
    assert fcm.tokens_issued == 2  # one refresh, one retry, no more


async def test_many_refused_sends_trigger_one_refresh(adapter: FcmAdapter, fcm: FakeFCM) -> None:
    await adapter.send(push())
    fcm.expire_access_tokens()

    outcomes = await asyncio.gather(*(adapter.send(push(f"tok-{i}")) for i in range(20)))

    assert {o.verdict for o in outcomes} == {Verdict.DELIVERED}
    assert fcm.tokens_issued == 2


async def test_grant_refused_is_rejected(
    adapter: FcmAdapter, fcm: FakeFCM, base_account: ServiceAccount
) -> None:
    fcm.revoke(base_account)

    outcome = await adapter.send(push())

    assert outcome == Outcome(Verdict.REJECTED, "OAUTH_INVALID_GRANT")
    assert fcm.received == []


async def test_token_endpoint_failure_is_retryable(adapter: FcmAdapter, fcm: FakeFCM) -> None:
    fcm.fail_token_requests(503)

    failed = await adapter.send(push())
    retried = await adapter.send(push())

    assert failed == Outcome.unavailable("OAUTH_UNAVAILABLE")
    assert retried.verdict is Verdict.DELIVERED


async def test_failed_early_refresh_keeps_the_valid_token(
    make_adapter: MakeAdapter, fcm: FakeFCM
) -> None:
    clock = Clock()
    adapter = await make_adapter(clock=clock)
    await adapter.send(push())
    clock.advance(3500)  # due for refresh, not expired
    fcm.fail_token_requests(503)

    outcomes = await asyncio.gather(*(adapter.send(push()) for _ in range(5)))
    await adapter.send(push())  # the failed refresh is not retried at once
    clock.advance(11)
    await adapter.send(push())

    assert {o.verdict for o in outcomes} == {Verdict.DELIVERED}
    assert (fcm.token_requests, fcm.tokens_issued) == (3, 2)
    assert [r.status for r in fcm.received] == [200] * 8


# -- transport faults and lifecycle ----------------------------------------------------------------


async def test_dropped_connection_is_retryable(adapter: FcmAdapter, fcm: FakeFCM) -> None:
    await adapter.send(push())
    # libcurl sends a request once more, on a new connection, when a reused connection dies
    # before any answer; the second drop is the one the adapter sees.
    fcm.drop_next(2)

    dropped = await adapter.send(push())
    again = await adapter.send(push())

    assert dropped == Outcome.unavailable("ConnectionLost")
    assert again.verdict is Verdict.DELIVERED


async def test_cancelled_send_leaves_the_connection_usable(
    adapter: FcmAdapter, fcm: FakeFCM
) -> None:
    fcm.stall("stuck")

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(adapter.send(push("stuck")), 0.2)
    opened = fcm.connections_opened  # the token exchange and the pushes share it
    outcome = await adapter.send(push("fine"))

    assert outcome.verdict is Verdict.DELIVERED
    assert fcm.connections_opened == opened == 1


async def test_closed_adapter_refuses_sends(adapter: FcmAdapter) -> None:
    await adapter.aclose()
    await adapter.aclose()  # idempotent

    assert not adapter.ready
    assert await adapter.send(push()) == Outcome.unavailable("AdapterClosed", retryable=False)


async def test_an_injected_transport_is_left_open(
    fcm: FakeFCM, base_account: ServiceAccount
) -> None:
    account = fcm.service_account(base_account)
    settings = FcmSettings("chat-android", account.info, fcm.url)
    transport = Transport(TransportSettings(ca_pem=fcm.ca_pem))
    adapter = await FcmAdapter.create(settings, transport=transport)
    assert (await adapter.send(push())).verdict is Verdict.DELIVERED  # token and push through it
    await adapter.aclose()
    assert not transport.closed
    await transport.aclose()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"private_key": "-----BEGIN PRIVATE KEY-----\nnot a key\n"}, "private_key"),
        ({"client_email": None}, "client_email"),
        ({"token_uri": "file:///etc/passwd"}, "token_uri"),
    ],
)
async def test_unusable_service_account_names_the_app(
    base_account: ServiceAccount, change: dict[str, Any], field: str
) -> None:
    info = {**base_account.info, **change}

    with pytest.raises(ValueError, match=f"'chat-android'.*{field}") as raised:
        await FcmAdapter.create(FcmSettings("chat-android", info))

    assert "not a key" not in str(raised.value)
    assert "/etc/passwd" not in str(raised.value)


# -- logs ------------------------------------------------------------------------------------------


async def test_no_secret_reaches_a_log_line(
    make_adapter: MakeAdapter,
    fcm: FakeFCM,
    base_account: ServiceAccount,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    clock = Clock()
    adapter = await make_adapter(clock=clock)
    device = "device-token-that-must-stay-private"
    fcm.script(device, 401, "THIRD_PARTY_AUTH_ERROR")
    await adapter.send(push(device))
    fcm.inject(401, "", count=2)
    await adapter.send(push(device))
    clock.advance(3500)
    fcm.fail_token_requests(503)
    await adapter.send(push(device))
    fcm.revoke(base_account)
    fcm.expire_access_tokens()
    await adapter.send(push(device))

    bearers = {r.headers["authorization"].split()[1] for r in fcm.received}
    key_lines = [line for line in base_account.info["private_key"].splitlines() if "--" not in line]
    secrets = [device, fcm.url, fcm.token_uri, *bearers, *key_lines]
    ours = [r for r in caplog.records if r.name.startswith("adapters")]
    assert len(ours) >= 4  # third-party auth, refused twice, early refresh, grant refused
    # As the relay writes them; caplog's own formatter adds `message`, which production lacks.
    lines = [JsonFormatter().format(_without_caplog_fields(r)) for r in caplog.records]
    lines += [r.getMessage() + json.dumps(vars(r), default=str) for r in ours]
    assert not [s for s in secrets for line in lines if s in line]


def _without_caplog_fields(record: logging.LogRecord) -> logging.LogRecord:
    fields = {k: v for k, v in vars(record).items() if k not in ("message", "asctime")}
    return logging.makeLogRecord(fields)


# -- the fake's token endpoint -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "error"),
    [
        ({"exp_after": 7200}, "invalid_grant"),  # longer than an hour
        ({"aud": "https://elsewhere.example/token"}, "invalid_grant"),
        ({"scope": "https://www.googleapis.com/auth/userinfo.email"}, "invalid_scope"),
        ({"iss": "stranger@demo-project.iam.gserviceaccount.com"}, "invalid_grant"),
        ({"sign_with_other_key": True}, "invalid_grant"),
    ],
)
async def test_fake_token_endpoint_checks_the_grant(
    fcm: FakeFCM, base_account: ServiceAccount, claims: dict[str, Any], error: str
) -> None:
    account = fcm.service_account(base_account)
    now = int(time.time())
    payload = {
        "iss": claims.get("iss", account.client_email),
        "aud": claims.get("aud", fcm.token_uri),
        "scope": claims.get("scope", "https://www.googleapis.com/auth/firebase.messaging"),
        "iat": now,
        "exp": now + claims.get("exp_after", 3600),
    }
    key = account.info["private_key"]
    if claims.get("sign_with_other_key"):
        key = ServiceAccount.generate().info["private_key"]
    assertion = jwt.encode(payload, key, algorithm="RS256")
    form = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion}

    async with httpx.AsyncClient(http2=True, verify=fcm.pki.client_context()) as client:
        response = await client.post(fcm.token_uri, data=form)

    assert (response.status_code, response.json()["error"]) == (400, error)
    assert fcm.tokens_issued == 0


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("privacy", [Privacy.FULL, Privacy.REDACTED, Privacy.ID_ONLY])
@pytest.mark.parametrize("token", ["t0k3n:with-characters_\u00e9", "fid:installation-1"])
def test_a_rendered_push_is_sent_as_if_encoded_whole(kind, privacy, token) -> None:
    """The body spliced from render's bytes is the body of the payload encoded whole."""
    message = Message(kind, 'Al "the" \u00e9', "Lunch?\n", "conv-9", badge=3, waiting_count=2)
    push = render(message, "fcm", privacy, token=token, keys=None, grouping=GROUPING)
    assert push.encoded
    whole = dataclasses.replace(push, encoded=b"")
    assert fcm_adapter._body(push) == fcm_adapter._body(whole)
    assert json.loads(fcm_adapter._body(push))["message"] == fcm_adapter._message(whole)
