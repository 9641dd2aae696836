"""The one wrapper around every adapter: circuit, concurrency, retries, timing and counting.

Adapters only speak their provider's protocol. Everything cross-cutting lives here, once, so
that each app gets the same behaviour: its circuit breaker answers at once, without a provider
call, while its provider is failing (``relay/breaker.py``); at most ``max_concurrency`` pushes
are in flight per app (one provider's slowness never holds another app's pushes); retryable
failures are sent again with jittered backoff while the deadline and the app's retry budget
allow; and every provider request is timed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from adapters.base import Adapter, Outcome, Push
from relay.breaker import CircuitBreaker, Permit, RetryBudget, State, is_transient
from relay.config import AppConfig
from relay.logs import error_fields, fingerprint
from relay.metrics import Metrics

log = logging.getLogger("relay.dispatch")

MAX_ATTEMPTS = 3
BACKOFF_BASE_SECONDS = 0.05


@dataclass(frozen=True, slots=True)
class Guards:
    """An app's circuit breaker and retry budget. They outlive a reload that keeps the app's
    policies (:class:`GuardRegistry`), so a reload never closes an open circuit."""

    breaker: CircuitBreaker
    budget: RetryBudget


class GuardRegistry:
    """The guards of every app, kept across reloads while an app's policies stay the same."""

    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._metrics = metrics
        self._clock = clock
        self._guards: dict[str, Guards] = {}

    def for_app(self, app: AppConfig) -> Guards:
        guards = self._guards.get(app.id)
        if (
            guards is None
            or guards.breaker.policy != app.circuit
            or guards.budget.policy != app.retry_budget
        ):
            on_change = functools.partial(_circuit_changed, self._metrics, app.id)
            breaker = CircuitBreaker(app.circuit, clock=self._clock, on_change=on_change)
            guards = Guards(breaker, RetryBudget(app.retry_budget, clock=self._clock))
            self._guards[app.id] = guards
            self._metrics.circuit_state.labels(app=app.id).set(breaker.state)
        return guards


def _circuit_changed(metrics: Metrics, app: str, old: State, new: State) -> None:
    metrics.circuit_state.labels(app=app).set(new)
    metrics.circuit_transitions.labels(app=app, state=new.name.lower()).inc()
    # Once per transition, never per push.
    level = logging.WARNING if new is State.OPEN else logging.INFO
    log.log(level, "circuit " + new.name.lower().replace("_", "-"), extra={"app": app})


class AppRuntime:
    """A configured app with its live adapter and its guards."""

    def __init__(
        self,
        app: AppConfig,
        adapter: Adapter[object],
        metrics: Metrics,
        guards: Guards | None = None,
    ) -> None:
        self.app = app
        self.adapter = adapter
        self._metrics = metrics
        self._slots = asyncio.Semaphore(app.max_concurrency)
        self._duration = metrics.provider_duration.labels(platform=app.platform)
        guards = guards or GuardRegistry(metrics).for_app(app)
        self.breaker, self.budget = guards.breaker, guards.budget

    @property
    def platform(self) -> str:
        return self.app.platform

    async def deliver(self, push: Push, deadline: float) -> Outcome:
        """Send ``push``, retrying retryable failures while ``deadline`` (loop time) and the
        retry budget allow; refused at once while the app's circuit is open.

        The caller bounds the whole call by the deadline and may cancel it at any await.
        """
        started = time.perf_counter()
        permit = self.breaker.allow()  # before the slots: an open circuit answers at once
        if permit is Permit.REFUSED:
            outcome = self.breaker.refused()
            self._log_push(push, outcome, 0, started)
            return outcome
        async with self._slots:
            attempts = 0
            while True:  # the attempt is inline, not a coroutine of its own: it runs per push
                attempts += 1
                begun = time.perf_counter()
                failed = True  # cancelled at the deadline: the provider did not answer in time
                try:
                    outcome = await self.adapter.send(push)
                    failed = is_transient(outcome)
                except Exception as exc:  # an adapter bug must cost one device, not the request
                    failed = False  # not the provider's failure
                    self._log_failure(push, exc)
                    outcome = Outcome.unavailable("InternalError", retryable=False)
                finally:
                    self.breaker.record(permit, failed)
                    self._duration.observe(time.perf_counter() - begun)
                if attempts == 1:
                    self.budget.earn()
                if attempts == MAX_ATTEMPTS or not outcome.retryable:
                    break
                pause = _backoff(attempts, outcome)
                if _left(deadline) <= pause or not self.budget.spend():
                    break
                await asyncio.sleep(pause)
                permit = self.breaker.allow()
                if permit is Permit.REFUSED:
                    break  # the circuit opened meanwhile: the last answer stands
                self._metrics.provider_retries.labels(platform=self.platform).inc()
        self._log_push(push, outcome, attempts, started)
        return outcome

    def _log_push(self, push: Push, outcome: Outcome, attempts: int, started: float) -> None:
        # One line per device, at DEBUG: the token only as its keyed fingerprint, the provider's
        # reason word, never the payload.
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "push",
                extra={
                    "app": self.app.id,
                    "platform": self.platform,
                    "token_fp": fingerprint(push.token),
                    "outcome": outcome.verdict.name,
                    "reason": outcome.reason,
                    "attempts": attempts,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                },
            )

    def _log_failure(self, push: Push, exc: BaseException) -> None:
        # The exception's message may hold whatever the adapter had in hand (a token, a
        # payload): log its type and where it was raised, never its text or local variables.
        fields = {"app": self.app.id, "token_fp": fingerprint(push.token)}
        log.error("adapter raised", extra=fields | error_fields(exc, limit=5))


def _backoff(attempt: int, outcome: Outcome) -> float:
    if outcome.retry_after_seconds:
        return float(outcome.retry_after_seconds)
    base: float = BACKOFF_BASE_SECONDS * 2 ** (attempt - 1)
    return base * random.uniform(0.5, 1.5)


def _left(deadline: float) -> float:
    return deadline - asyncio.get_running_loop().time()
