"""Request limits: size, per-client rate, and the global in-flight cap.

    check_size      a request over ``limits.max_request_bytes`` → INVALID_ARGUMENT naming the limit
    RateLimiter     one token bucket per configured client: ``burst`` requests at once, refilled
                    at ``rate_per_second``; one more → :class:`RateLimited` (RESOURCE_EXHAUSTED,
                    with the wait until a token is back)
    InflightGate    requests being served; a ``Send`` over ``limits.max_inflight_requests`` is
                    refused (RESOURCE_EXHAUSTED), a ``SendStream``'s next request waits for a slot
                    instead, which becomes HTTP/2 flow control towards the caller

Every limit is **per relay process**: nothing is shared between replicas (the relay stores
nothing), so N replicas behind a balancer let a client through at up to N times its rate.
A request is one ``Send`` call or one request on a ``SendStream``, whatever its device count.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Iterable

from relay.auth import Caller
from relay.config import ClientConfig, Limits
from relay.errors import InvalidArgument, ResourceExhausted

Clock = Callable[[], float]


class RateLimited(ResourceExhausted):
    """A client is over its rate; ``retry_after_seconds`` is when its next request fits."""

    def __init__(self, message: str, retry_after_seconds: float) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


def check_size(size: int, limits: Limits) -> None:
    """Raises InvalidArgument when a serialized request of ``size`` bytes is over the limit."""
    if size > limits.max_request_bytes:
        raise InvalidArgument(
            [f"request: {size} bytes, over limits.max_request_bytes ({limits.max_request_bytes})"]
        )


class TokenBucket:
    """``burst`` tokens, refilled continuously at ``rate`` per second; a request takes one."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._updated = now

    def take(self, now: float) -> float:
        """Take a token: 0.0 when one was there, else the seconds until one will be."""
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        self._updated = max(now, self._updated)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate


class RateLimiter:
    """A token bucket per configured client.

    Built anew on each reload from the new ``clients``; a client whose rate and burst did not
    change keeps its bucket from ``previous``, so a reload is no way around the limit.
    """

    def __init__(
        self,
        clients: Iterable[ClientConfig],
        clock: Clock = time.monotonic,
        previous: RateLimiter | None = None,
    ) -> None:
        self._clock = clock
        old = previous._buckets if previous is not None else {}
        self._buckets: dict[str, TokenBucket] = {}
        for client in clients:
            bucket = old.get(client.name)
            if bucket is None or (bucket.rate, bucket.burst) != (
                client.rate_per_second,
                client.burst,
            ):
                bucket = TokenBucket(client.rate_per_second, client.burst, clock())
            self._buckets[client.name] = bucket

    def check(self, caller: Caller) -> None:
        """Take one token from ``caller``'s bucket (an open API's callers have none).

        Raises:
            RateLimited: the bucket is empty.
        """
        bucket = self._buckets.get(caller.name)
        if bucket is None:
            return
        wait = bucket.take(self._clock())
        if wait > 0:
            raise RateLimited(
                f"client {caller.name}: over its rate limit of {bucket.rate:g} requests/s"
                f" (burst {bucket.burst}, clients[].rate_per_second, per relay process);"
                f" retry in {_ms(wait)} ms",
                wait,
            )


class InflightGate:
    """Counts the requests being served in this process, against a cap given at each entry
    (so a reload's new ``limits.max_inflight_requests`` applies at once)."""

    def __init__(self) -> None:
        self.count = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def try_enter(self, limit: int) -> bool:
        """Take a slot if one is free and nobody is queued for one."""
        if self.count >= limit or self._waiters:
            return False
        self.count += 1
        return True

    def enter_or_refuse(self, limit: int) -> None:
        """Take a slot, or raise ResourceExhausted."""
        if not self.try_enter(limit):
            raise ResourceExhausted(
                f"server busy: {self.count} requests in flight"
                f" (limits.max_inflight_requests {limit}, per relay process);"
                " retry with backoff or on another replica"
            )

    async def enter(self, limit: int) -> None:
        """Take a slot, waiting in line for one when none is free."""
        if self.try_enter(limit):
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # leave() hands its slot over: the count already includes this one
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.leave()  # the slot came just as the wait was cancelled: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def leave(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.count -= 1


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000 + 0.999))
