"""When a provider fails, stop making it worse: a circuit breaker and a retry budget per app.

**Circuit breaker.** Every provider answer for an app is recorded in a sliding window of
one-second buckets. Only *transient* failures count against it (an ``UNAVAILABLE`` the adapter
marks retryable: 5xx, connection refused or lost, timeouts); a dead token, a rejected payload or
a 429 is the provider working as it should. When at least ``min_requests`` answers in the window
failed at ``failure_rate`` or more, the circuit **opens**: the app's devices are answered
``UNAVAILABLE``/``CircuitOpen`` at once, with no provider call, for ``cooldown_seconds``. Then it
is **half-open**: up to ``probes`` pushes go through; if they all succeed it **closes** (and the
window starts afresh), and one failure opens it again. A rate, not a run of consecutive
failures, so a 30 % reset storm whose retries still deliver never trips it.

**Retry budget.** Each first attempt earns ``ratio`` of a retry and the budget refills by
``min_per_second`` (so a quiet app can still retry); a retry spends one. Below the breaker's
threshold the relay thus never multiplies a provider's load by more than ``1 + ratio`` (plus the
small floor; 1.5 by default), where three attempts per push would triple it.

Neither holds anything a request carries: counts and times only.
"""

from __future__ import annotations

import collections
import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from adapters.base import Outcome, Verdict

Clock = Callable[[], float]


class State(enum.IntEnum):
    """The circuit's state; the value is what ``pushrelay_circuit_state`` exports."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class Permit(enum.Enum):
    """What :meth:`CircuitBreaker.allow` grants one attempt."""

    REFUSED = "refused"
    ALLOWED = "allowed"
    PROBE = "probe"  # a half-open trial: its answer decides the circuit


@dataclass(frozen=True, slots=True)
class CircuitPolicy:
    """``apps[].circuit`` in the config."""

    failure_rate: float = 0.5
    window_seconds: float = 10.0
    min_requests: int = 20
    cooldown_seconds: float = 5.0
    probes: int = 3


@dataclass(frozen=True, slots=True)
class RetryBudgetPolicy:
    """``apps[].retry_budget`` in the config."""

    ratio: float = 0.5  # lets a 30 % failure storm retry through; 3 attempts would be 3x
    min_per_second: float = 1.0


def is_transient(outcome: Outcome) -> bool:
    """A failure the breaker counts: the provider (or the way to it) is failing."""
    return outcome.verdict is Verdict.UNAVAILABLE and outcome.retryable


class CircuitBreaker:
    """One app's circuit. ``on_change(old, new)`` is called once per transition."""

    def __init__(
        self,
        policy: CircuitPolicy,
        *,
        clock: Clock = time.monotonic,
        on_change: Callable[[State, State], None] = lambda old, new: None,
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._on_change = on_change
        self.state = State.CLOSED
        self._buckets: collections.deque[list[int]] = collections.deque()  # [second, total, failed]
        self._opened_at = 0.0
        self._probing = 0
        self._passed = 0

    def allow(self) -> Permit:
        """Whether one attempt may go to the provider now."""
        if self.state is State.CLOSED:
            return Permit.ALLOWED
        if self.state is State.OPEN:
            if self._clock() - self._opened_at < self.policy.cooldown_seconds:
                return Permit.REFUSED
            self._move(State.HALF_OPEN)
            self._probing = self._passed = 0
        if self._probing + self._passed >= self.policy.probes:
            return Permit.REFUSED
        self._probing += 1
        return Permit.PROBE

    def record(self, permit: Permit, failed: bool) -> None:
        """The answer to an attempt :meth:`allow` let through."""
        if permit is Permit.PROBE:
            self._probing -= 1
            if self.state is not State.HALF_OPEN:
                return
            if failed:
                self._open()
            else:
                self._passed += 1
                if self._passed >= self.policy.probes:
                    self._buckets.clear()
                    self._move(State.CLOSED)
            return
        if permit is Permit.ALLOWED and self.state is State.CLOSED:
            total, failures = self._count(failed)
            if total >= self.policy.min_requests and failures >= self.policy.failure_rate * total:
                self._open()

    def retry_after_seconds(self) -> int:
        """How long a refused caller should wait: the rest of the cool-down, at least 1 s."""
        left = self._opened_at + self.policy.cooldown_seconds - self._clock()
        return max(1, math.ceil(left))

    def refused(self) -> Outcome:
        return Outcome(
            Verdict.UNAVAILABLE, "CircuitOpen", retry_after_seconds=self.retry_after_seconds()
        )

    def _count(self, failed: bool) -> tuple[int, int]:
        second = int(self._clock())
        horizon = second - self.policy.window_seconds
        while self._buckets and self._buckets[0][0] <= horizon:
            self._buckets.popleft()
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append([second, 0, 0])
        bucket = self._buckets[-1]
        bucket[1] += 1
        bucket[2] += failed
        return sum(b[1] for b in self._buckets), sum(b[2] for b in self._buckets)

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._move(State.OPEN)

    def _move(self, state: State) -> None:
        old, self.state = self.state, state
        if old is not state:
            self._on_change(old, state)


class RetryBudget:
    """Retries allowed as a fraction of first attempts (a token bucket)."""

    CAPACITY = 10.0  # retries that may be spent at once

    def __init__(self, policy: RetryBudgetPolicy, *, clock: Clock = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._tokens = self.CAPACITY
        self._at = clock()

    def earn(self) -> None:
        """A first attempt was made."""
        self._tokens = min(self.CAPACITY, self._tokens + self.policy.ratio)

    def spend(self) -> bool:
        """Take one retry if the budget has one."""
        now = self._clock()
        refill = (now - self._at) * self.policy.min_per_second
        self._tokens, self._at = min(self.CAPACITY, self._tokens + refill), now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True
