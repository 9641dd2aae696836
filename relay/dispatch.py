"""The one wrapper around every adapter: concurrency limit, retries, timing and counting.

Adapters only speak their provider's protocol. Everything cross-cutting lives here, once, so
that each app gets the same behaviour: at most ``max_concurrency`` pushes in flight per app (one
provider's slowness never holds another app's pushes), retryable failures sent again with
jittered backoff while the deadline allows, and every provider request timed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from adapters.base import Adapter, Outcome, Push
from relay.config import AppConfig
from relay.logs import error_fields, fingerprint
from relay.metrics import Metrics

log = logging.getLogger("relay.dispatch")

MAX_ATTEMPTS = 3
BACKOFF_BASE_SECONDS = 0.05


class AppRuntime:
    """A configured app with its live adapter."""

    def __init__(self, app: AppConfig, adapter: Adapter[object], metrics: Metrics) -> None:
        self.app = app
        self.adapter = adapter
        self._metrics = metrics
        self._slots = asyncio.Semaphore(app.max_concurrency)

    @property
    def platform(self) -> str:
        return self.app.platform

    async def deliver(self, push: Push, deadline: float) -> Outcome:
        """Send ``push``, retrying retryable failures while ``deadline`` (loop time) allows.

        The caller bounds the whole call by the deadline and may cancel it at any await.
        """
        started = time.perf_counter()
        async with self._slots:
            outcome = await self._attempt(push)
            attempts = 1
            for attempt in range(1, MAX_ATTEMPTS):
                pause = _backoff(attempt, outcome)
                if not outcome.retryable or _left(deadline) <= pause:
                    break
                await asyncio.sleep(pause)
                self._metrics.provider_retries.labels(platform=self.platform).inc()
                outcome = await self._attempt(push)
                attempts += 1
        self._log_push(push, outcome, attempts, started)
        return outcome

    async def _attempt(self, push: Push) -> Outcome:
        started = time.perf_counter()
        try:
            return await self.adapter.send(push)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an adapter bug must cost one device, not the request
            self._log_failure(push, exc)
            return Outcome.unavailable("InternalError", retryable=False)
        finally:
            elapsed = time.perf_counter() - started
            self._metrics.provider_duration.labels(platform=self.platform).observe(elapsed)

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
