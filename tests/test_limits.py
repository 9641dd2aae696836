"""Limits: request size, per-client rate (token bucket, fake clock), the global in-flight cap.

End to end through a real relay: each refusal has its status and message, costs no provider
call, and is counted in ``pushrelay_requests_total{code}``; a rate-limited call carries its
retry delay in the trailers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from pushrelay.v1 import relay_pb2 as pb
from relay.auth import Caller
from relay.client import RelayClient
from relay.config import Limits
from relay.errors import InvalidArgument, ResourceExhausted
from relay.interceptors import RETRY_INFO, STATUS, message_class
from relay.limits import InflightGate, RateLimited, RateLimiter, TokenBucket, check_size
from relay.server import MAX_MESSAGE_BYTES, RelayServer
from relay.testing.configs import apns_app, local_config
from relay.testing.credentials import ApnsKey
from relay.testing.fake_apns import FakeAPNs
from tests.support import FakeClock, apns_token, request
from tests.test_auth import client, requests_counted, with_clients

TOKEN = secrets.token_urlsafe(24)
Start = Callable[..., Awaitable[RelayServer]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def start(fake_apns: FakeAPNs, apns_key: ApnsKey, clock: FakeClock) -> AsyncIterator[Start]:
    """Start a relay for client chat-eu with the given limits, on the fake clock."""
    servers: list[RelayServer] = []

    async def start_one(limits: Limits | None = None, **client_kw: Any) -> RelayServer:
        config = with_clients(
            local_config([apns_app(fake_apns, apns_key)], limits=limits),
            client("chat-eu", TOKEN, **client_kw),
        )
        server = RelayServer(config, clock=clock)
        await server.start()
        servers.append(server)
        return server

    yield start_one
    for server in servers:
        await server.stop(grace=0.5)


async def send(relay: RelayServer, req: pb.SendRequest) -> pb.SendResponse:
    async with RelayClient(f"127.0.0.1:{relay.port}", token=TOKEN) as caller:
        return await caller.send(req, timeout=10)


async def refused(relay: RelayServer, req: pb.SendRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await send(relay, req)
    return info.value


# --- rate -----------------------------------------------------------------------------------------


async def test_a_flood_beyond_the_rate_is_resource_exhausted_with_retry_info(
    start: Start, clock: FakeClock, fake_apns: FakeAPNs
) -> None:
    relay = await start(rate_per_second=2.0, burst=3)
    for _ in range(3):
        assert (await send(relay, request(apns_token()))).results[0].outcome == pb.DELIVERED
    error = await refused(relay, request(apns_token()))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == (
        "client chat-eu: over its rate limit of 2 requests/s (burst 3,"
        " clients[].rate_per_second, per relay process); retry in 500 ms"
    )
    trailers = dict(error.trailing_metadata() or ())
    assert trailers["retry-after-ms"] == "500"
    status = message_class(STATUS).FromString(trailers["grpc-status-details-bin"])
    assert (status.code, status.message) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
        error.details(),
    )
    [detail] = status.details
    assert detail.type_url == "type.googleapis.com/google.rpc.RetryInfo"
    retry = message_class(RETRY_INFO).FromString(detail.value)
    assert (retry.retry_delay.seconds, retry.retry_delay.nanos) == (0, 500_000_000)
    assert len(fake_apns.received) == 3
    assert requests_counted(relay, "RESOURCE_EXHAUSTED") == 1
    assert requests_counted(relay, "OK") == 3

    clock.now += 0.5  # one token back
    assert (await send(relay, request(apns_token()))).results[0].outcome == pb.DELIVERED
    assert (
        await refused(relay, request(apns_token()))
    ).code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_stream_over_the_rate_gets_rate_limited_devices(
    start: Start, clock: FakeClock, fake_apns: FakeAPNs
) -> None:
    relay = await start(rate_per_second=0.5, burst=1)
    first = request(apns_token(), request_id="first")
    second = request(apns_token(), apns_token(), request_id="second")
    async with RelayClient(f"127.0.0.1:{relay.port}", token=TOKEN) as caller:
        answers = {a.request_id: a async for a in caller.send_many([first, second], timeout=10)}
    assert answers["first"].results[0].outcome == pb.DELIVERED
    limited = answers["second"].results
    assert [(r.outcome, r.retry_after_seconds) for r in limited] == [(pb.RATE_LIMITED, 2)] * 2
    assert limited[0].reason.startswith("ResourceExhausted: client chat-eu: over its rate limit")
    assert len(fake_apns.received) == 1


async def test_a_reload_keeps_an_unchanged_bucket(
    start: Start, clock: FakeClock, fake_apns: FakeAPNs, apns_key: ApnsKey
) -> None:
    relay = await start(rate_per_second=1.0, burst=1)
    await send(relay, request(apns_token()))
    same = with_clients(
        local_config([apns_app(fake_apns, apns_key)]),
        client("chat-eu", TOKEN, rate_per_second=1.0, burst=1),
    )
    await relay.reload(same)
    assert (
        await refused(relay, request(apns_token()))
    ).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await relay.reload(dataclasses.replace(same, clients=(client("chat-eu", TOKEN, burst=5),)))
    assert (await send(relay, request(apns_token()))).results[0].outcome == pb.DELIVERED


def test_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=2, now=0.0)
    assert [bucket.take(0.0), bucket.take(0.0)] == [0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.1)
    assert bucket.take(0.05) == pytest.approx(0.05)  # half a token back
    assert bucket.take(0.1) == 0.0
    assert [bucket.take(100.0), bucket.take(100.0)] == [0.0, 0.0]  # no more than burst saved up
    assert bucket.take(100.0) > 0
    assert bucket.take(99.0) > 0  # a clock going back refills nothing


def test_the_open_api_has_no_rate() -> None:
    limiter = RateLimiter([client("chat-eu", TOKEN, rate_per_second=1.0, burst=1)], lambda: 0.0)
    limiter.check(Caller("", None))
    limiter.check(Caller("chat-eu", None))
    with pytest.raises(RateLimited) as info:
        limiter.check(Caller("chat-eu", None))
    assert info.value.retry_after_seconds == pytest.approx(1.0)


# --- in flight ------------------------------------------------------------------------------------


async def test_a_send_over_the_in_flight_cap_is_refused(start: Start, fake_apns: FakeAPNs) -> None:
    relay = await start(Limits(max_inflight_requests=1))
    slow = apns_token()
    fake_apns.stall(slow)
    async with RelayClient(f"127.0.0.1:{relay.port}", token=TOKEN) as caller:
        pending = asyncio.ensure_future(caller.send(request(slow), timeout=10))
        while not fake_apns.received:  # noqa: ASYNC110 (polling a fake's record)
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await caller.send(request(apns_token()), timeout=10)
        fake_apns.clear()  # the stalled push is answered now
        answer = await pending
        after = await caller.send(request(apns_token()), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details() == (
        "server busy: 1 requests in flight (limits.max_inflight_requests 1, per relay process);"
        " retry with backoff or on another replica"
    )
    assert answer.results[0].outcome == after.results[0].outcome == pb.DELIVERED
    assert requests_counted(relay, "RESOURCE_EXHAUSTED") == 1
    assert requests_counted(relay, "OK") == 2


async def test_one_connection_carries_calls_up_to_the_in_flight_cap(
    start: Start, fake_apns: FakeAPNs
) -> None:
    """A caller may run as many calls at once on one connection as the in-flight cap allows
    (HTTP/2's usual limit of 100 streams would hold the rest back inside the caller), and the
    cap, not the connection, refuses the next one."""
    relay = await start(Limits(max_inflight_requests=150))
    slow = [apns_token() for _ in range(150)]
    for token in slow:
        fake_apns.stall(token)
    async with RelayClient(f"127.0.0.1:{relay.port}", token=TOKEN) as caller:
        pending = [asyncio.ensure_future(caller.send(request(t), timeout=20)) for t in slow]
        while in_flight(relay) < len(slow):  # noqa: ASYNC110 (polling the relay's gauge)
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await caller.send(request(apns_token()), timeout=10)
        fake_apns.clear()
        answers = await asyncio.gather(*pending)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert {a.results[0].outcome for a in answers} == {pb.DELIVERED}


def in_flight(relay: RelayServer) -> float:
    """The relay's ``pushrelay_inflight_requests``, as /metrics shows it."""
    match = re.search(
        r"^pushrelay_inflight_requests (\S+)$", relay.metrics.exposition().decode(), re.M
    )
    assert match
    return float(match[1])


async def test_a_stream_waits_for_an_in_flight_slot(start: Start, fake_apns: FakeAPNs) -> None:
    relay = await start(Limits(max_inflight_requests=1))
    requests = [request(apns_token(), request_id=f"r{i}") for i in range(5)]
    async with RelayClient(f"127.0.0.1:{relay.port}", token=TOKEN) as caller:
        answers = [a async for a in caller.send_many(requests, timeout=10)]
    assert sorted(a.request_id for a in answers) == [f"r{i}" for i in range(5)]
    assert all(a.results[0].outcome == pb.DELIVERED for a in answers)


async def test_the_gate_hands_slots_over_in_order() -> None:
    gate = InflightGate()
    assert gate.try_enter(1)
    with pytest.raises(ResourceExhausted, match="1 requests in flight"):
        gate.enter_or_refuse(1)
    first = asyncio.ensure_future(gate.enter(1))
    second = asyncio.ensure_future(gate.enter(1))
    cancelled = asyncio.ensure_future(gate.enter(1))
    await asyncio.sleep(0)
    cancelled.cancel()
    assert not gate.try_enter(5)  # others queue first, whatever the cap
    gate.leave()
    await first
    assert not second.done() and gate.count == 1
    gate.leave()
    await second
    gate.leave()
    assert gate.count == 0 and cancelled.cancelled()


# --- size -----------------------------------------------------------------------------------------


async def test_an_oversized_request_is_invalid_argument(start: Start, fake_apns: FakeAPNs) -> None:
    relay = await start(Limits(max_request_bytes=2000))
    big = request(*[apns_token() for _ in range(30)])
    error = await refused(relay, big)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        f"request: {big.ByteSize()} bytes, over limits.max_request_bytes (2000)"
    )
    assert fake_apns.received == []
    assert requests_counted(relay, "INVALID_ARGUMENT") == 1


async def test_an_oversized_request_on_a_stream_is_rejected(
    start: Start, fake_apns: FakeAPNs
) -> None:
    relay = await start(Limits(max_request_bytes=2000))
    big = request(*[apns_token() for _ in range(30)], request_id="big")
    async with RelayClient(f"127.0.0.1:{relay.port}", token=TOKEN) as caller:
        [answer] = [a async for a in caller.send_many([big], timeout=10)]
    assert {r.reason for r in answer.results} == {
        f"InvalidArgument: request: {big.ByteSize()} bytes, over limits.max_request_bytes (2000)"
    }
    assert fake_apns.received == []


async def test_grpc_refuses_a_message_over_its_own_ceiling(
    start: Start, fake_apns: FakeAPNs
) -> None:
    relay = await start()
    huge = request(apns_token())
    huge.devices[0].token = "a" * (MAX_MESSAGE_BYTES + 1)
    error = await refused(relay, huge)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # gRPC's own, before any handler
    assert fake_apns.received == []


def test_check_size_names_the_limit() -> None:
    check_size(100, Limits(max_request_bytes=100))
    with pytest.raises(
        InvalidArgument, match=r"request: 101 bytes, over limits\.max_request_bytes"
    ):
        check_size(101, Limits(max_request_bytes=100))
