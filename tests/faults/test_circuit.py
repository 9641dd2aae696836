"""The circuit breaker and the retry budget from outside: a failing provider costs little.

Through the real server and each fake: a 503 storm opens the app's circuit, after which devices
are answered CircuitOpen with no provider call (provider requests stay under half the pushes);
once the provider heals the circuit closes again within its cool-down; a 30 % failure storm
whose retries deliver never trips it.
"""

from __future__ import annotations

import asyncio

from pushrelay.v1 import relay_pb2 as pb
from relay.breaker import RetryBudgetPolicy
from relay.client import RelayClient
from tests.faults.conftest import CIRCUIT, Relay, Target, metric, one

PUSHES = 200


def state(target: Target) -> str:
    return f'pushrelay_circuit_state{{app="{target.app.id}"}}'


async def test_a_storm_opens_the_circuit_sheds_load_and_it_recovers(
    target: Target, relay_for: Relay
) -> None:
    relay = await relay_for(target)
    target.fail(503, 100_000, None)
    results: list[pb.DeviceResult] = []
    async with RelayClient(f"127.0.0.1:{relay.port}") as client:
        for batch in range(PUSHES // 20):
            responses = await asyncio.gather(
                *(client.send(one(target, f"b{batch}-{i}"), timeout=5) for i in range(20))
            )
            for response in responses:
                assert len(response.results) == 1  # exactly one result per device
                results.extend(response.results)
        assert {pb.Outcome.Name(r.outcome) for r in results} == {"UNAVAILABLE"}
        shed = [r for r in results if r.reason == "CircuitOpen"]
        assert target.provider_requests <= PUSHES // 2
        assert len(shed) >= PUSHES // 2
        assert all(r.retry_after_seconds >= 1 for r in shed)
        assert await metric(relay, state(target)) == 1  # open
        opened = f'pushrelay_circuit_transitions_total{{app="{target.app.id}",state="open"}}'
        assert await metric(relay, opened) == 1  # once, however many pushes it refused

        # The provider heals; within the cool-down (0.5 s) probes go through and it closes.
        target.fake.clear()
        delivered = 0
        for _ in range(100):  # 100 x 20 ms: four cool-downs at most
            response = await client.send(one(target), timeout=5)
            if response.results[0].outcome == pb.DELIVERED:
                delivered += 1
                if delivered == CIRCUIT.probes:
                    break
            else:
                await asyncio.sleep(0.02)
        assert delivered == CIRCUIT.probes
        assert await metric(relay, state(target)) == 0  # closed


async def test_a_30_percent_failure_storm_is_retried_through_without_tripping(
    target: Target, relay_for: Relay
) -> None:
    relay = await relay_for(target)
    async with RelayClient(f"127.0.0.1:{relay.port}") as client:
        outcomes = []
        for batch in range(PUSHES // 10):
            for i in range(10):
                if i in (0, 3, 6):  # 3 in every 10 pushes fail once; their retries pass
                    target.fail(503, 1, None)
                response = await client.send(one(target, f"b{batch}-{i}"), timeout=5)
                outcomes.append(pb.Outcome.Name(response.results[0].outcome))
    assert outcomes == ["DELIVERED"] * PUSHES
    assert await metric(relay, state(target)) == 0
    opened = f'pushrelay_circuit_transitions_total{{app="{target.app.id}",state="open"}}'
    assert await metric(relay, opened) == 0


async def test_the_retry_budget_caps_retries_below_the_breakers_threshold(
    target: Target, relay_for: Relay
) -> None:
    # A breaker that never opens, to see the budget alone: 100 % failures, one push at a time.
    never = CIRCUIT.__class__(min_requests=1_000_000)
    budget = RetryBudgetPolicy(ratio=0.2, min_per_second=0)
    relay = await relay_for(target, circuit=never, retry_budget=budget)
    target.fail(503, 100_000, None)
    async with RelayClient(f"127.0.0.1:{relay.port}") as client:
        for i in range(100):
            response = await client.send(one(target, f"r{i}"), timeout=5)
            assert response.results[0].outcome == pb.UNAVAILABLE
    retries = target.provider_requests - 100
    # Without a budget: 200 retries (3 attempts a push). With it: a fifth, plus what it holds.
    assert retries <= 0.2 * 100 + 10
    series = f'pushrelay_provider_retries_total{{platform="{target.platform}"}}'
    assert await metric(relay, series) == retries
