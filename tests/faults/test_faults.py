"""Provider faults, through the real server, for APNs, FCM and Web Push alike.

Every case checks what a caller relies on: exactly one result per device, never UNKNOWN or
INTERNAL, the right outcome and reason, the answer within the deadline (a 100 ms margin for the
trip back), and the metric counting it.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from pushrelay.v1 import relay_pb2 as pb
from relay.client import RelayClient
from relay.testing.credentials import ApnsKey
from relay.testing.fake_apns import FakeAPNs
from relay.testing.tls import TestPKI
from tests.faults.conftest import Relay, Target, apns_target, metric, one

DEADLINE = 1.5  # seconds the caller gives each call


async def call(relay, target: Target) -> tuple[pb.DeviceResult, float]:  # type: ignore[no-untyped-def]
    async with RelayClient(f"127.0.0.1:{relay.port}") as client:
        started = time.monotonic()
        try:
            response = await client.send(one(target), timeout=DEADLINE)
        except grpc.aio.AioRpcError as error:  # pragma: no cover - the assertion says why
            pytest.fail(f"the call failed whole: {error.code().name}")
        took = time.monotonic() - started
    assert len(response.results) == 1
    return response.results[0], took


async def counted(relay, target: Target, outcome: str) -> float:  # type: ignore[no-untyped-def]
    series = (
        f'pushrelay_notifications_total{{kind="instant_message",outcome="{outcome}",'
        f'platform="{target.platform}"}}'
    )
    return await metric(relay, series)


async def check(relay, target: Target, outcome: str, reason: str | None = None) -> pb.DeviceResult:  # type: ignore[no-untyped-def]
    before = await counted(relay, target, outcome)
    result, took = await call(relay, target)
    assert pb.Outcome.Name(result.outcome) == outcome, result
    if reason is not None:
        assert result.reason == reason, result
    assert took <= DEADLINE + 0.1, f"answered after {took:.2f} s"
    assert await counted(relay, target, outcome) == before + 1
    return result


async def test_a_503_burst_is_retried_through(target: Target, relay_for: Relay) -> None:
    relay = await relay_for(target)
    target.fail(503, 1, None)
    await check(relay, target, "DELIVERED")
    assert target.provider_requests == 2


async def test_a_500_storm_ends_unavailable_after_bounded_retries(
    target: Target, relay_for: Relay
) -> None:
    relay = await relay_for(target)
    target.fail(500, 100, None)
    result = await check(relay, target, "UNAVAILABLE")
    assert result.reason  # the provider's word
    assert target.provider_requests == 3  # MAX_ATTEMPTS, never more


@pytest.mark.parametrize("retry_after", [1, 3600])
async def test_429_is_rate_limited_with_the_providers_wait(
    target: Target, relay_for: Relay, retry_after: int
) -> None:
    relay = await relay_for(target)
    target.fail(429, 1, retry_after)
    result = await check(relay, target, "RATE_LIMITED")
    assert result.retry_after_seconds == retry_after
    assert target.provider_requests == 1  # never retried inside the relay: it deepens the limit


async def test_connections_cut_mid_request_end_unavailable(
    target: Target, relay_for: Relay
) -> None:
    relay = await relay_for(target)
    target.fake.drop_next(100)
    await check(relay, target, "UNAVAILABLE", "ConnectionLost")


async def test_one_cut_connection_is_retried_through(target: Target, relay_for: Relay) -> None:
    relay = await relay_for(target)
    target.fake.drop_next(1)
    await check(relay, target, "DELIVERED")


async def test_answers_slower_than_the_deadline(target: Target, relay_for: Relay) -> None:
    relay = await relay_for(target)
    target.fake.delay(DEADLINE * 2)
    await check(relay, target, "UNAVAILABLE", "DeadlineExceeded")


async def test_a_provider_address_that_cannot_serve(
    target: Target, relay_for: Relay, dead_end: tuple[int, str]
) -> None:
    port, reason = dead_end  # a refused port, a silent listener, a failing TLS handshake
    moved = target.with_endpoint(f"https://127.0.0.1:{port}")
    relay = await relay_for(moved)
    await check(relay, moved, "UNAVAILABLE", reason)


async def test_an_untrusted_certificate(target: Target, relay_for: Relay) -> None:
    moved = target.with_endpoint(target.fake.url, trusted=False)
    relay = await relay_for(moved)
    # FCM meets the certificate first at its token endpoint (the same fake).
    reason = "OAUTH_UNAVAILABLE" if target.platform == "fcm" else "ConnectFailed"
    await check(relay, moved, "UNAVAILABLE", reason)
    assert target.provider_requests == 0


@pytest.mark.parametrize("target", ["apns"], indirect=True)  # GOAWAY is the APNs fake's fault
async def test_goaway_mid_request_apns(target: Target, relay_for: Relay) -> None:
    relay = await relay_for(target)
    device = target.device()
    target.fake.stall(device.token)
    async with RelayClient(f"127.0.0.1:{relay.port}") as client:
        request = one(target)
        request.devices[0].CopyFrom(device)
        pending = asyncio.ensure_future(client.send(request, timeout=DEADLINE))
        for _ in range(400):
            if target.provider_requests:
                break
            await asyncio.sleep(0.005)
        await target.fake.goaway("Shutdown")
        target.fake.clear()
        response = await pending
    # The stalled push was cut by the GOAWAY and retried on a new connection.
    assert pb.Outcome.Name(response.results[0].outcome) == "DELIVERED"


@pytest.mark.parametrize("target", ["fcm"], indirect=True)  # only FCM has a token endpoint
async def test_the_oauth_token_endpoint_failing_fcm(target: Target, relay_for: Relay) -> None:
    relay = await relay_for(target)
    target.fake.fail_token_requests(503, count=100)
    result = await check(relay, target, "UNAVAILABLE")
    assert result.reason.startswith("OAUTH"), result.reason
    assert target.provider_requests == 0


@pytest.mark.parametrize("target", ["fcm"], indirect=True)
async def test_an_access_token_refused_mid_life_is_renewed_fcm(
    target: Target, relay_for: Relay
) -> None:
    relay = await relay_for(target)
    await check(relay, target, "DELIVERED")
    target.fake.expire_access_tokens()  # Google revoked it early: 401 on the next push
    await check(relay, target, "DELIVERED")


async def test_an_expired_provider_token_is_reminted_apns(
    pki: TestPKI, apns_key: ApnsKey, relay_for: Relay
) -> None:
    # APNs refuses JWTs older than token_max_age_seconds (Apple: one hour) with 403
    # ExpiredProviderToken; the relay mints a new one and sends again.
    async with FakeAPNs(
        pki=pki, keys=[apns_key], token_max_age_seconds=1, token_update_min_seconds=0.5
    ) as apns:
        target = apns_target(apns, apns_key)
        relay = await relay_for(target)
        await check(relay, target, "DELIVERED")
        await asyncio.sleep(1.2)
        await check(relay, target, "DELIVERED")
        assert [r.reason for r in apns.received][-2:] == ["ExpiredProviderToken", ""]
