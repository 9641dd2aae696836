"""Deadlines for many requests at once: one loop timer per few milliseconds, not one per push.

``asyncio.timeout_at`` gives every push its own timer: two coroutines to enter and leave it and
a timer handle in the loop, ~5 µs and ~0.7 KB for every push in flight (``bench/RESULTS.md``).
Requests in flight together have deadlines close together, so here the deadlines falling in one
grain (:data:`GRAIN_SECONDS`) share one timer. It fires at the grain's start: a request is cut
off early by less than a grain, never late (the caller's deadline keeps a margin of at least
10 ms beyond ours anyway, ``relay.service._deadline``).

Use, inside the task to cut off::

    cutoff = cutoffs.arm(task, deadline)
    try:
        result = await work()
    except asyncio.CancelledError:
        if not cutoff.expired(task):
            raise  # cancelled by someone else
        result = ...  # the deadline came first
    finally:
        cutoff.leave(task)
"""

from __future__ import annotations

import asyncio
import math

GRAIN_SECONDS = 0.005


class Cutoffs:
    """The cutoffs due, by grain, for one event loop."""

    def __init__(self) -> None:
        self._due: dict[int, Cutoff] = {}

    def arm(self, task: asyncio.Task[object], deadline: float) -> Cutoff:
        """Cancel ``task`` at ``deadline`` (loop time; the start of its grain) unless it leaves
        its cutoff first."""
        grain = math.floor(deadline / GRAIN_SECONDS)
        cutoff = self._due.get(grain)
        if cutoff is None:
            cutoff = self._due[grain] = Cutoff(self, grain)
        cutoff.tasks[task] = task.cancelling()
        return cutoff

    def __len__(self) -> int:
        """How many timers are armed."""
        return len(self._due)


class Cutoff:
    """The tasks due in one grain, and the one timer that cuts them off."""

    __slots__ = ("_cutoffs", "_grain", "_timer", "fired", "tasks")

    def __init__(self, cutoffs: Cutoffs, grain: int) -> None:
        self._cutoffs = cutoffs
        self._grain = grain
        self.tasks: dict[asyncio.Task[object], int] = {}  # task -> its cancel requests when armed
        self.fired = False
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(grain * GRAIN_SECONDS, self._fire)

    def expired(self, task: asyncio.Task[object]) -> bool:
        """After ``task`` saw ``CancelledError``: whether this cutoff's cancel was the only one,
        so the deadline is what ended its wait (its cancel request is then withdrawn)."""
        if not self.fired or task not in self.tasks:
            return False
        return task.uncancel() <= self.tasks[task]

    def leave(self, task: asyncio.Task[object]) -> None:
        """``task`` is done waiting: drop it, and the timer when no task is left to cut off."""
        self.tasks.pop(task, None)
        if not self.tasks and not self.fired:
            self._timer.cancel()
            del self._cutoffs._due[self._grain]

    def _fire(self) -> None:
        self.fired = True
        del self._cutoffs._due[self._grain]
        for task in self.tasks:
            task.cancel()
