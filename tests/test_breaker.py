"""The circuit breaker and the retry budget (relay/breaker.py), on a clock the tests move."""

from __future__ import annotations

import pytest

from adapters.base import Outcome, Verdict
from relay.breaker import (
    CircuitBreaker,
    CircuitPolicy,
    Permit,
    RetryBudget,
    RetryBudgetPolicy,
    State,
    is_transient,
)
from tests.support import FakeClock as Clock

POLICY = CircuitPolicy(
    failure_rate=0.5, window_seconds=10, min_requests=20, cooldown_seconds=5, probes=3
)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def breaker(clock: Clock, changes: list[tuple[State, State]] | None = None) -> CircuitBreaker:
    seen = changes if changes is not None else []
    return CircuitBreaker(POLICY, clock=clock, on_change=lambda a, b: seen.append((a, b)))


def answer(b: CircuitBreaker, failed: bool, times: int = 1) -> None:
    for _ in range(times):
        permit = b.allow()
        assert permit is not Permit.REFUSED
        b.record(permit, failed)


def test_opens_on_a_failure_rate_not_before_enough_answers(clock: Clock) -> None:
    changes: list[tuple[State, State]] = []
    b = breaker(clock, changes)
    answer(b, failed=True, times=19)
    assert b.state is State.CLOSED  # 19 < min_requests
    answer(b, failed=True)
    assert b.state is State.OPEN
    assert changes == [(State.CLOSED, State.OPEN)]
    assert b.allow() is Permit.REFUSED
    outcome = b.refused()
    assert (outcome.verdict, outcome.reason, outcome.retryable) == (
        Verdict.UNAVAILABLE,
        "CircuitOpen",
        False,
    )
    assert outcome.retry_after_seconds == 5


def test_a_30_percent_failure_rate_keeps_it_closed(clock: Clock) -> None:
    b = breaker(clock)
    for _ in range(100):  # 3 failures in every 10 answers, over many windows
        answer(b, failed=True, times=3)
        answer(b, failed=False, times=7)
        clock.now += 0.5
    assert b.state is State.CLOSED


def test_exactly_the_threshold_opens_it(clock: Clock) -> None:
    b = breaker(clock)
    answer(b, failed=False, times=10)
    answer(b, failed=True, times=10)
    assert b.state is State.OPEN


def test_old_failures_leave_the_window(clock: Clock) -> None:
    b = breaker(clock)
    answer(b, failed=True, times=15)
    clock.now += 11  # the failures are now older than window_seconds
    answer(b, failed=False, times=10)
    answer(b, failed=True, times=5)  # 5 of 15 in the window: a third
    assert b.state is State.CLOSED


def test_half_open_lets_the_probes_through_and_closes_when_they_pass(clock: Clock) -> None:
    changes: list[tuple[State, State]] = []
    b = breaker(clock, changes)
    answer(b, failed=True, times=20)
    clock.now += 4.9
    assert b.allow() is Permit.REFUSED
    clock.now += 0.2
    probes = [b.allow() for _ in range(3)]
    assert probes == [Permit.PROBE] * 3 and b.state is State.HALF_OPEN
    assert b.allow() is Permit.REFUSED  # no more than `probes` at once
    for permit in probes:
        b.record(permit, failed=False)
    assert b.state is State.CLOSED
    assert changes == [
        (State.CLOSED, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.CLOSED),
    ]
    answer(b, failed=True, times=19)  # the window started afresh
    assert b.state is State.CLOSED


def test_a_failed_probe_opens_it_again_for_a_full_cooldown(clock: Clock) -> None:
    b = breaker(clock)
    answer(b, failed=True, times=20)
    clock.now += 5
    first, second = b.allow(), b.allow()
    b.record(first, failed=True)
    assert b.state is State.OPEN
    b.record(second, failed=False)  # a late probe answer changes nothing
    assert b.state is State.OPEN and b.allow() is Permit.REFUSED
    clock.now += 5
    assert b.allow() is Permit.PROBE


def test_answers_begun_before_it_opened_do_not_count(clock: Clock) -> None:
    b = breaker(clock)
    early = [b.allow() for _ in range(5)]
    answer(b, failed=True, times=20)
    assert b.state is State.OPEN
    for permit in early:
        b.record(permit, failed=False)
    assert b.state is State.OPEN


@pytest.mark.parametrize(
    ("outcome", "transient"),
    [
        (Outcome.unavailable("ServiceUnavailable"), True),
        (Outcome.unavailable("ConnectionLost"), True),
        (Outcome.unavailable("Timeout"), True),
        (Outcome(Verdict.TOKEN_INVALID, "Unregistered"), False),
        (Outcome(Verdict.REJECTED, "BadTopic"), False),
        (Outcome(Verdict.RATE_LIMITED, "TooManyRequests", retry_after_seconds=30), False),
        (Outcome(Verdict.UNAVAILABLE, "TooManyProviderTokenUpdates"), False),
        (Outcome.unavailable("InternalError", retryable=False), False),
        (Outcome.delivered("x"), False),
    ],
)
def test_only_transient_failures_count(outcome: Outcome, transient: bool) -> None:
    assert is_transient(outcome) is transient


def test_retry_budget_caps_retries_at_a_fraction_of_first_attempts(clock: Clock) -> None:
    budget = RetryBudget(RetryBudgetPolicy(ratio=0.2, min_per_second=0), clock=clock)
    spent = 0
    for _ in range(1000):  # a storm: every first attempt fails and wants a retry
        budget.earn()
        spent += budget.spend()
    assert spent <= 0.2 * 1000 + RetryBudget.CAPACITY


def test_retry_budget_refills_slowly_for_a_quiet_app(clock: Clock) -> None:
    budget = RetryBudget(RetryBudgetPolicy(ratio=0.0, min_per_second=1.0), clock=clock)
    assert sum(budget.spend() for _ in range(20)) == RetryBudget.CAPACITY
    assert not budget.spend()
    clock.now += 3
    assert sum(budget.spend() for _ in range(20)) == 3
