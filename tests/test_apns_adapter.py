"""The APNs adapter against the strict fake APNs: requests, auth, outcome mapping, and each aioapns
defect the old adapter had to neutralize, now shown not to happen on the libcurl transport.

Never a fixed port, never an assertion on elapsed time: ordering and counts only.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aioapns.common import NotificationRequest, NotificationResult
from aioapns.connection import APNsKeyConnectionPool, APNsTLSClientProtocol

from adapters.apns import (
    DEFAULT_RETRY_AFTER_SECONDS,
    PRODUCTION_HOST,
    SANDBOX_HOST,
    ApnsAdapter,
    ApnsResponse,
    ApnsSettings,
    to_outcome,
)
from adapters.base import Outcome, Push, Verdict, encode_json
from relay.testing.credentials import ApnsKey
from relay.testing.fake_apns import FakeAPNs
from relay.testing.proxy import ConnectProxy
from relay.testing.tls import TestPKI

TOPIC = "com.example.chat"
PAYLOAD = {"aps": {"alert": {"title": "Ada", "body": "hi ✓"}}, "relay": {"v": 1}}
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

MakeAdapter = Callable[..., Awaitable[ApnsAdapter]]


def token(n: int = 0) -> str:
    return f"{n:064x}"


def push(n: int = 0, **fields: Any) -> Push:
    fields.setdefault("payload", PAYLOAD)
    return Push(token=token(n), **fields)


async def until(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(2000):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


@pytest.fixture(scope="module")
def pki() -> TestPKI:
    return TestPKI()


@pytest.fixture(scope="module")
def key() -> ApnsKey:
    return ApnsKey.generate()


@pytest.fixture
async def apns(pki: TestPKI, key: ApnsKey) -> AsyncIterator[FakeAPNs]:
    async with FakeAPNs(pki=pki, keys=[key], topics=[TOPIC]) as fake:
        yield fake


def settings_for(apns: FakeAPNs, key: ApnsKey, **fields: Any) -> ApnsSettings:
    auth: dict[str, Any] = {"key_pem": key.key_pem, "key_id": key.key_id, "team_id": key.team_id}
    if "cert_file" in fields:
        auth = {}
    defaults = {"endpoint": apns.url, "ca_pem": apns.ca_pem, "send_timeout_seconds": 10.0}
    return ApnsSettings(app_id="chat-ios", topic=TOPIC, **{**auth, **defaults, **fields})


@pytest.fixture
async def make_adapter(apns: FakeAPNs, key: ApnsKey) -> AsyncIterator[MakeAdapter]:
    made: list[ApnsAdapter] = []

    async def make(**fields: Any) -> ApnsAdapter:
        adapter = await ApnsAdapter.create(settings_for(apns, key, **fields))
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        await adapter.aclose()


@pytest.fixture
async def adapter(make_adapter: MakeAdapter) -> ApnsAdapter:
    return await make_adapter()


# -- what APNs receives ---------------------------------------------------------------------------


async def test_alert_headers_and_body(adapter: ApnsAdapter, apns: FakeAPNs) -> None:
    push_id = str(uuid.uuid4())
    before = int(time.time())
    outcome = await adapter.send(push(7, ttl_seconds=600, collapse_key="k1", push_id=push_id))
    after = int(time.time())

    assert outcome == Outcome.delivered(push_id)
    (got,) = apns.received
    assert got.token == token(7)
    assert got.headers[":method"] == "POST"
    assert got.headers[":path"] == f"/3/device/{token(7)}"
    assert got.headers[":authority"] == f"127.0.0.1:{apns.port}"
    assert got.headers["apns-topic"] == TOPIC
    assert got.headers["apns-push-type"] == "alert"
    assert got.headers["apns-priority"] == "10"
    assert before + 600 <= int(got.headers["apns-expiration"]) <= after + 600
    assert got.headers["apns-collapse-id"] == "k1"
    assert got.headers["apns-id"] == push_id
    assert got.headers["authorization"].startswith("bearer ")
    assert got.body == encode_json(PAYLOAD)
    assert got.payload == PAYLOAD


async def test_background_push_is_priority_5_now_or_never(
    adapter: ApnsAdapter, apns: FakeAPNs
) -> None:
    payload = {"aps": {"content-available": 1}}
    outcome = await adapter.send(push(1, payload=payload, background=True, high_priority=True))

    assert outcome.verdict is Verdict.DELIVERED
    (got,) = apns.received
    assert got.headers["apns-push-type"] == "background"
    assert got.headers["apns-priority"] == "5"
    assert got.headers["apns-expiration"] == "0"
    assert "apns-collapse-id" not in got.headers
    assert got.payload == payload


async def test_normal_priority_alert(adapter: ApnsAdapter, apns: FakeAPNs) -> None:
    assert (await adapter.send(push(high_priority=False))).verdict is Verdict.DELIVERED
    assert apns.received[0].headers["apns-priority"] == "5"
    assert apns.received[0].headers["apns-push-type"] == "alert"


async def test_each_push_gets_its_own_apns_id(adapter: ApnsAdapter, apns: FakeAPNs) -> None:
    outcomes = await asyncio.gather(*(adapter.send(push(n)) for n in range(3)))

    ids = [got.headers["apns-id"] for got in apns.received]
    assert len(set(ids)) == 3 and all(_UUID.fullmatch(i) for i in ids)
    assert sorted(o.provider_message_id for o in outcomes) == sorted(ids)


async def test_push_id_is_made_canonical_for_apns(adapter: ApnsAdapter, apns: FakeAPNs) -> None:
    upper = str(uuid.uuid4()).upper()
    first = await adapter.send(push(1, push_id=upper))
    second = await adapter.send(push(2, push_id="not-a-uuid"))

    assert first == Outcome.delivered(upper.lower())
    assert second.verdict is Verdict.DELIVERED and _UUID.fullmatch(second.provider_message_id)
    assert [got.status for got in apns.received] == [200, 200]


async def test_pushes_sharing_an_apns_id_are_both_answered(
    adapter: ApnsAdapter, apns: FakeAPNs
) -> None:
    apns.mark_dead(token(2))
    shared = str(uuid.uuid4())
    ok, dead = await asyncio.gather(
        adapter.send(push(1, push_id=shared)), adapter.send(push(2, push_id=shared))
    )
    assert ok.verdict is Verdict.DELIVERED
    assert dead.verdict is Verdict.TOKEN_INVALID


async def test_unsendable_collapse_id_is_refused_without_sending(
    adapter: ApnsAdapter, apns: FakeAPNs
) -> None:
    for key in ("x" * 65, "a\r\nb", " padded"):
        assert await adapter.send(push(collapse_key=key)) == Outcome(
            Verdict.REJECTED, "BadCollapseId"
        )
    assert apns.received == []


async def test_malformed_token_is_refused_without_sending(
    adapter: ApnsAdapter, apns: FakeAPNs
) -> None:
    outcome = await adapter.send(Push(token="ab/../cd", payload=PAYLOAD))
    assert outcome == Outcome(Verdict.TOKEN_INVALID, "BadDeviceToken")
    assert apns.received == []


# -- auth and endpoints ---------------------------------------------------------------------------


async def test_token_auth_shares_one_jwt(
    adapter: ApnsAdapter, apns: FakeAPNs, key: ApnsKey
) -> None:
    await asyncio.gather(*(adapter.send(push(n)) for n in range(5)))
    tokens = {got.headers["authorization"] for got in apns.received}
    assert len(tokens) == 1
    assert all(got.status == 200 for got in apns.received)


async def test_certificate_auth(
    make_adapter: MakeAdapter, apns: FakeAPNs, pki: TestPKI, tmp_path: Path
) -> None:
    cert_file = tmp_path / "apns.pem"
    cert_file.write_bytes(pki.client_cert_pem(f"Apple Push Services: {TOPIC}", uid=TOPIC))
    adapter = await make_adapter(cert_file=str(cert_file))

    assert (await adapter.send(push())).verdict is Verdict.DELIVERED
    assert "authorization" not in apns.received[0].headers


@pytest.mark.parametrize(
    ("environment", "host"), [("production", PRODUCTION_HOST), ("sandbox", SANDBOX_HOST)]
)
async def test_environment_selects_apples_host(key: ApnsKey, environment: str, host: str) -> None:
    settings = ApnsSettings(
        app_id="a",
        topic=TOPIC,
        environment=environment,
        key_pem=key.key_pem,
        key_id=key.key_id,
        team_id=key.team_id,
    )
    adapter = await ApnsAdapter.create(settings)  # connects lazily: nothing leaves the host
    try:
        assert adapter.base_url == f"https://{host}"
        assert adapter._transport.in_flight == 0
    finally:
        await adapter.aclose()


async def test_endpoint_needs_its_ca(make_adapter: MakeAdapter, apns: FakeAPNs) -> None:
    adapter = await make_adapter(ca_pem=b"")
    outcome = await adapter.send(push())
    assert outcome.verdict is Verdict.UNAVAILABLE and outcome.retryable
    assert outcome.reason.startswith("ConnectFailed")
    assert apns.received == []


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"key_pem": b""}, "auth"),
        ({"cert_file": "/nonexistent.pem"}, "auth"),
        ({"key_id": ""}, "key_id"),
        ({"key_pem": b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n"}, "key_pem"),
        ({"environment": "staging"}, "environment"),
        ({"endpoint": "http://127.0.0.1:1"}, "endpoint"),
        ({"ca_pem": b"not pem"}, "ca_pem"),
        ({"proxy": "socks5://127.0.0.1:1"}, "proxy"),
        ({"topic": "com.example chat"}, "topic"),
    ],
)
async def test_unusable_settings_are_refused(
    key: ApnsKey, fields: dict[str, Any], message: str
) -> None:
    base = {"key_pem": key.key_pem, "key_id": key.key_id, "team_id": key.team_id}
    settings = ApnsSettings(app_id="a", **{"topic": TOPIC, **base, **fields})
    with pytest.raises(ValueError, match=message):
        await ApnsAdapter.create(settings)


async def test_connect_proxy(make_adapter: MakeAdapter, apns: FakeAPNs) -> None:
    async with ConnectProxy() as proxy:
        adapter = await make_adapter(proxy=proxy.url)
        outcomes = await asyncio.gather(*(adapter.send(push(n)) for n in range(3)))
        await adapter.aclose()

    assert [o.verdict for o in outcomes] == [Verdict.DELIVERED] * 3
    assert proxy.connects == [f"127.0.0.1:{apns.port}"]


async def test_connect_proxy_refusal_is_unavailable(
    make_adapter: MakeAdapter, apns: FakeAPNs
) -> None:
    async with ConnectProxy(allowed_targets=[]) as proxy:
        adapter = await make_adapter(proxy=proxy.url)
        outcome = await adapter.send(push())
        await adapter.aclose()

    assert outcome.verdict is Verdict.UNAVAILABLE and outcome.retryable
    assert proxy.refused == [f"127.0.0.1:{apns.port}"]


# -- answers → outcomes ---------------------------------------------------------------------------

D, T, R, L, U = (
    Verdict.DELIVERED,
    Verdict.TOKEN_INVALID,
    Verdict.REJECTED,
    Verdict.RATE_LIMITED,
    Verdict.UNAVAILABLE,
)
# (status, reason, verdict, retryable, retires the connection)
ANSWERS = [
    (400, "BadCollapseId", R, False, False),
    (400, "BadDeviceToken", T, False, False),
    (400, "BadExpirationDate", R, False, False),
    (400, "BadMessageId", R, False, False),
    (400, "BadPriority", R, False, False),
    (400, "BadTopic", R, False, False),
    (400, "DeviceTokenNotForTopic", T, False, False),
    (400, "DuplicateHeaders", R, False, False),
    (400, "IdleTimeout", U, True, True),
    (400, "InvalidPushType", R, False, False),
    (400, "MissingDeviceToken", R, False, False),
    (400, "MissingTopic", R, False, False),
    (400, "PayloadEmpty", R, False, False),
    (400, "TopicDisallowed", R, False, False),
    (403, "BadCertificate", R, False, False),
    (403, "BadCertificateEnvironment", R, False, False),
    (403, "Forbidden", R, False, False),
    (403, "InvalidProviderToken", R, False, False),
    (403, "MissingProviderToken", R, False, False),
    (403, "BadEnvironmentKeyIdInToken", R, False, False),
    (404, "BadPath", R, False, False),
    (405, "MethodNotAllowed", R, False, False),
    (410, "ExpiredToken", T, False, False),
    (410, "Unregistered", T, False, False),
    (413, "PayloadTooLarge", R, False, False),
    (429, "TooManyProviderTokenUpdates", U, False, True),
    (429, "TooManyRequests", L, False, False),
    (500, "InternalServerError", U, True, False),
    (503, "ServiceUnavailable", U, True, False),
    (503, "Shutdown", U, True, True),
]


@pytest.mark.parametrize(("status", "reason", "verdict", "retryable", "retires"), ANSWERS)
async def test_answer_maps_to_outcome(
    adapter: ApnsAdapter,
    apns: FakeAPNs,
    status: int,
    reason: str,
    verdict: Verdict,
    retryable: bool,
    retires: bool,
) -> None:
    push_id = str(uuid.uuid4())
    apns.script(token(1), status, reason)

    outcome = await adapter.send(push(1, push_id=push_id))

    assert (outcome.verdict, outcome.reason, outcome.retryable) == (verdict, reason, retryable)
    assert outcome.provider_message_id == push_id
    assert len(apns.received) == 1  # answered as it is: no retry inside the adapter
    if verdict is Verdict.TOKEN_INVALID and status == 410:
        assert outcome.token_invalid_since_ms > 0
    if verdict is Verdict.RATE_LIMITED:
        assert outcome.retry_after_seconds == DEFAULT_RETRY_AFTER_SECONDS
    assert (await adapter.send(push(2))).verdict is Verdict.DELIVERED
    assert apns.received[-1].connection == (2 if retires else 1)


async def test_unregistered_carries_apples_timestamp(adapter: ApnsAdapter, apns: FakeAPNs) -> None:
    apns.mark_dead(token(3), timestamp_ms=1_700_000_000_123)
    outcome = await adapter.send(push(3))
    assert outcome.verdict is Verdict.TOKEN_INVALID
    assert (outcome.reason, outcome.token_invalid_since_ms) == ("Unregistered", 1_700_000_000_123)


async def test_retry_after_header_is_used(adapter: ApnsAdapter, apns: FakeAPNs) -> None:
    apns.inject(429, "TooManyRequests", retry_after=7)
    apns.inject(503, "ServiceUnavailable", retry_after=30)
    limited, unavailable = await adapter.send(push(1)), await adapter.send(push(2))
    assert (limited.verdict, limited.retry_after_seconds) == (Verdict.RATE_LIMITED, 7)
    assert (unavailable.verdict, unavailable.retry_after_seconds) == (Verdict.UNAVAILABLE, 30)


@pytest.mark.parametrize(
    ("response", "verdict", "retryable"),
    [
        (ApnsResponse(200, apns_id="x"), D, False),
        (ApnsResponse(0, "ConnectionLost"), U, True),
        (ApnsResponse(0, "Timeout"), U, True),
        (ApnsResponse(401, ""), R, False),
        (ApnsResponse(400, "SomethingNew"), R, False),
        (ApnsResponse(410, ""), T, False),
        (ApnsResponse(502, ""), U, True),
    ],
)
def test_unlisted_answers(response: ApnsResponse, verdict: Verdict, retryable: bool) -> None:
    outcome = to_outcome(response)
    assert (outcome.verdict, outcome.retryable) == (verdict, retryable)
    assert outcome.reason or verdict is Verdict.DELIVERED


# -- provider token -------------------------------------------------------------------------------


async def test_expired_provider_token_is_refreshed_and_retried_once(
    adapter: ApnsAdapter, apns: FakeAPNs
) -> None:
    assert adapter._auth is not None
    adapter._auth.wall_clock = lambda: time.time() - 7200  # the wall clock was 2 h behind ...
    adapter._auth.get_header()
    adapter._auth.wall_clock = time.time  # ... and has since been corrected

    outcome = await adapter.send(push())

    assert outcome.verdict is Verdict.DELIVERED
    first, second = apns.received
    assert (first.status, first.reason, second.status) == (403, "ExpiredProviderToken", 200)
    assert first.headers["authorization"] != second.headers["authorization"]
    assert first.headers["apns-id"] == second.headers["apns-id"]


async def test_expired_provider_token_twice_is_rejected(
    adapter: ApnsAdapter, apns: FakeAPNs
) -> None:
    assert adapter._auth is not None
    adapter._auth.wall_clock = lambda: time.time() - 7200  # stays wrong

    outcome = await adapter.send(push())

    assert (outcome.verdict, outcome.reason) == (Verdict.REJECTED, "ExpiredProviderToken")
    assert [got.reason for got in apns.received] == ["ExpiredProviderToken"] * 2


async def test_concurrent_expiries_mint_one_new_token(adapter: ApnsAdapter, apns: FakeAPNs) -> None:
    assert adapter._auth is not None
    adapter._auth.wall_clock = lambda: time.time() - 7200
    adapter._auth.get_header()
    adapter._auth.wall_clock = time.time

    outcomes = await asyncio.gather(*(adapter.send(push(n)) for n in range(20)))

    assert {o.verdict for o in outcomes} == {Verdict.DELIVERED}
    assert len({got.headers["authorization"] for got in apns.received}) == 2


async def test_unrelated_key_retries_once_on_a_new_connection(
    adapter: ApnsAdapter, apns: FakeAPNs
) -> None:
    apns.script(token(1), 403, "UnrelatedKeyIdInToken")
    outcome = await adapter.send(push(1))
    assert (outcome.verdict, outcome.reason) == (Verdict.REJECTED, "UnrelatedKeyIdInToken")
    assert [got.connection for got in apns.received] == [1, 2]


# -- aioapns defects ------------------------------------------------------------------------------


async def test_5000_dead_tokens_through_one_connection(
    make_adapter: MakeAdapter, apns: FakeAPNs
) -> None:
    """Defect 1: every error body is acknowledged, so the receive window never runs out."""
    adapter = await make_adapter(max_connections=1)
    for n in range(5000):
        apns.mark_dead(token(n), timestamp_ms=n + 1)
    gate = asyncio.Semaphore(250)

    async def send(n: int) -> Outcome:
        async with gate:
            return await adapter.send(push(n))

    outcomes = await asyncio.gather(*(send(n) for n in range(5000)))

    assert all(o.verdict is Verdict.TOKEN_INVALID for o in outcomes)
    assert [o.token_invalid_since_ms for o in outcomes] == list(range(1, 5001))
    assert apns.connections_opened == 1
    assert adapter._transport.in_flight == 0


async def test_raw_aioapns_stalls_on_error_bodies(apns: FakeAPNs, key: ApnsKey) -> None:
    """The defect the test above guards against, shown on aioapns 4.0 itself.

    Error bodies here are 255 bytes and 65,535 = 257 x 255: after 257 of them the window is
    exactly spent (no body split across frames, which would crash aioapns differently), so the
    next error response can never be sent.
    """

    class RawProtocol(APNsTLSClientProtocol):
        APNS_SERVER, APNS_PORT = "127.0.0.1", apns.port

    pool = APNsKeyConnectionPool(
        key=key.key_pem.decode(),
        key_id=key.key_id,
        team_id=key.team_id,
        topic=TOPIC,
        max_connections=1,
        ssl_context=ssl.create_default_context(cadata=apns.ca_pem.decode()),
    )
    pool.protocol_class = RawProtocol
    apns.script(token(1), 400, "R" * 241)  # body {"reason": "RRR..."}: 255 bytes

    def send(n: int) -> Awaitable[NotificationResult]:
        return pool.send_notification(NotificationRequest(token(n), dict(PAYLOAD)))

    await send(0)  # authenticates the connection: up to 1,000 streams from here on
    raw = pool.connections[0]
    results = await asyncio.gather(*(send(1) for _ in range(257)))
    assert {r.status for r in results} == {"400"}
    assert raw.conn.inbound_flow_control_window == 0  # nothing was ever handed back

    stalled = asyncio.ensure_future(send(1))
    done, _ = await asyncio.wait([stalled], timeout=0.2)  # a stall is forever: cannot flake
    assert not done
    stalled.cancel()
    raw.requests.clear()  # else aioapns fails the cancelled future on close
    pool.close()
    await until(lambda: raw.transport is None or raw.transport.is_closing(), "raw close")


async def test_state_is_empty_after_many_sends(adapter: ApnsAdapter, apns: FakeAPNs) -> None:
    """Defect 2: nothing per push outlives its request (aioapns kept ~290 bytes per success)."""
    for n in range(0, 600, 3):
        apns.mark_dead(token(n))
    outcomes = await asyncio.gather(*(adapter.send(push(n)) for n in range(600)))
    assert {o.verdict for o in outcomes} == {Verdict.DELIVERED, Verdict.TOKEN_INVALID}

    transport = adapter._transport
    assert transport.in_flight == 0 and transport._engine.active == {}
    # Handles are kept for reuse, each emptied of its last request's answer.
    assert all(t.future is None and t.lines == [] == t.body for t in transport._free)
    assert apns.connections_opened == 1


async def test_cancelled_stalled_send_leaves_nothing_behind(
    make_adapter: MakeAdapter, apns: FakeAPNs
) -> None:
    """Defect 5: the relay's deadline cancels send(); the stream is reset and its slot freed."""
    adapter = await make_adapter(max_connections=1, max_streams_per_connection=1)
    assert (await adapter.send(push(0))).verdict is Verdict.DELIVERED
    apns.stall(token(1))
    stalled = asyncio.ensure_future(adapter.send(push(1)))
    await until(lambda: len(apns.received) == 2, "stalled request received")

    stalled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stalled

    assert adapter._transport.in_flight == 0
    assert (await adapter.send(push(2))).verdict is Verdict.DELIVERED  # the one slot is free
    assert apns.connections_opened == 1


async def test_internal_timeout_bounds_a_stalled_send(
    make_adapter: MakeAdapter, apns: FakeAPNs
) -> None:
    adapter = await make_adapter(send_timeout_seconds=0.5)
    assert (await adapter.send(push(0))).verdict is Verdict.DELIVERED  # connected
    apns.stall(token(1))
    outcome = await adapter.send(push(1))
    assert outcome == Outcome.unavailable("Timeout")
    assert adapter._transport.in_flight == 0
    assert (await adapter.send(push(2))).verdict is Verdict.DELIVERED
    assert apns.connections_opened == 1


async def test_full_pool_serves_waiters_in_arrival_order(
    make_adapter: MakeAdapter, apns: FakeAPNs
) -> None:
    """Defect 8: over-subscribed pushes queue inside libcurl (no polling) and each goes out as a
    slot frees. libcurl's queue is not strictly FIFO; arrival order is kept one level up, by the
    relay's per-app semaphore (``max_concurrency``), which stays below the streams available."""
    adapter = await make_adapter(max_connections=1, max_streams_per_connection=2)
    await adapter.send(push(0))  # authenticate the connection: the fake then allows 2 streams
    apns.clear()
    apns.stall(token(100))
    apns.stall(token(101))
    holders = [asyncio.ensure_future(adapter.send(push(n))) for n in (100, 101)]
    await until(lambda: len(apns.received) == 2, "both slots taken")

    queued = {n: asyncio.ensure_future(adapter.send(push(n))) for n in range(1, 11)}
    await until(lambda: adapter._transport.in_flight == 12, "ten pushes queued")
    await asyncio.sleep(0.05)
    assert len(apns.received) == 2  # nobody got past the full connection
    queued.pop(5).cancel()  # a caller that gives up leaves the queue
    holders[0].cancel()  # one slot frees: the queue drains through it, oldest first

    outcomes = await asyncio.gather(*queued.values())
    assert {o.verdict for o in outcomes} == {Verdict.DELIVERED}
    assert sorted(got.token for got in apns.received[2:]) == [token(n) for n in queued]
    holders[1].cancel()
    await asyncio.gather(*holders, return_exceptions=True)
    assert adapter._transport.in_flight == 0
    assert apns.connections_opened == 1


async def test_pool_opens_connections_up_to_its_limit(
    make_adapter: MakeAdapter, apns: FakeAPNs
) -> None:
    adapter = await make_adapter(max_connections=3, max_streams_per_connection=1)
    apns.delay(0.05)
    outcomes = await asyncio.gather(*(adapter.send(push(n)) for n in range(12)))
    assert {o.verdict for o in outcomes} == {Verdict.DELIVERED}
    assert apns.connections_opened == 3
    assert len({got.connection for got in apns.received}) == 3


async def test_idle_connection_is_kept_open_with_tcp_keepalive(
    make_adapter: MakeAdapter, apns: FakeAPNs
) -> None:
    """Defect 6: no 10 s inactivity close; a quiet connection is probed by TCP keepalive."""
    adapter = await make_adapter(idle_ping_seconds=7)
    await adapter.send(push(1))
    (options,) = _socket_options_to(("127.0.0.1", apns.port))
    assert options == (1, 7)  # SO_KEEPALIVE on, first probe after 7 s idle
    await asyncio.sleep(0.5)
    assert (await adapter.send(push(2))).verdict is Verdict.DELIVERED
    assert apns.connections_opened == 1


def _socket_options_to(peer: tuple[str, int]) -> list[tuple[int, int]]:
    """(SO_KEEPALIVE, TCP_KEEPIDLE) of each of this process's sockets connected to ``peer``."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue  # not a socket
        with sock:
            try:
                if sock.type != socket.SOCK_STREAM or sock.getpeername()[:2] != peer:
                    continue
            except OSError:
                continue
            keepalive = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            found.append((keepalive, sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)))
    return found


async def test_dropped_connection_is_retryable(adapter: ApnsAdapter, apns: FakeAPNs) -> None:
    await adapter.send(push(0))
    # libcurl sends a request once more, on a new connection, when a reused connection dies
    # before any answer; the second drop is the one the adapter sees.
    apns.drop_next(2)
    outcome = await adapter.send(push(1))
    assert (outcome.verdict, outcome.retryable) == (Verdict.UNAVAILABLE, True)
    assert outcome.reason == "ConnectionLost"
    assert (await adapter.send(push(2))).verdict is Verdict.DELIVERED
    assert apns.connections_opened == 3


async def test_goaway_fails_in_flight_and_reconnects(adapter: ApnsAdapter, apns: FakeAPNs) -> None:
    apns.stall(token(1))
    in_flight = asyncio.ensure_future(adapter.send(push(1)))
    await until(lambda: len(apns.received) == 1, "stalled request received")

    await apns.goaway("Shutdown")

    outcome = await in_flight
    # libcurl does not surface GOAWAY's debug data: the push is "connection lost", retryable.
    assert (outcome.verdict, outcome.retryable) == (Verdict.UNAVAILABLE, True)
    assert (await adapter.send(push(2))).verdict is Verdict.DELIVERED
    assert apns.connections_opened == 2


async def test_error_body_split_across_data_frames(pki: TestPKI, key: ApnsKey) -> None:
    """Defect 4: the body is reassembled before it is parsed."""
    async with FakeAPNs(pki=pki, keys=[key], topics=[TOPIC], fill_window=True) as apns:
        adapter = await ApnsAdapter.create(settings_for(apns, key))
        apns.script(token(1), 400, "R" * 2000)
        try:
            outcome = await adapter.send(push(1))
        finally:
            await adapter.aclose()
    assert (outcome.verdict, outcome.reason) == (Verdict.REJECTED, "R" * 2000)


async def test_aclose_is_idempotent_and_final(adapter: ApnsAdapter) -> None:
    assert (await adapter.send(push())).verdict is Verdict.DELIVERED
    assert adapter.ready
    await adapter.aclose()
    await adapter.aclose()
    assert not adapter.ready
    outcome = await adapter.send(push())
    assert (outcome.verdict, outcome.retryable) == (Verdict.UNAVAILABLE, False)
    assert adapter._transport.closed and adapter._transport._free == []
