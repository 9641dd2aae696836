"""relay/cutoffs.py: deadlines shared by grain, on asyncio's and uvloop's loops alike.

End to end, the deadline tests in test_e2e_apns.py and tests/faults go through it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

import pytest
import uvloop

from relay.cutoffs import GRAIN_SECONDS, Cutoffs

Waiter = Callable[[float], Awaitable[str]]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Iterator[Callable[[Awaitable[None]], None]]:
    def on_loop(main: Awaitable[None]) -> None:
        if request.param == "uvloop":
            uvloop.run(main)  # type: ignore[arg-type]
        else:
            asyncio.run(main)  # type: ignore[arg-type]

    yield on_loop


def _waiting() -> tuple[Cutoffs, asyncio.Future[None], Waiter]:
    """Fresh cutoffs, a future that stands for the provider's answer, and a wait on it that the
    cutoffs cut off: it says ``answered`` or ``deadline``."""
    cutoffs = Cutoffs()
    blocker: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def wait(deadline: float) -> str:
        task = asyncio.current_task()
        assert task is not None
        cutoff = cutoffs.arm(task, deadline)
        try:
            await blocker
            return "answered"
        except asyncio.CancelledError:
            if not cutoff.expired(task):
                raise
            return "deadline"
        finally:
            cutoff.leave(task)

    return cutoffs, blocker, wait


def test_waits_past_their_deadline_are_cut_off_by_one_timer_per_grain(run: Callable) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        cutoffs, _, wait = _waiting()
        deadline = (int(loop.time() / GRAIN_SECONDS) + 10) * GRAIN_SECONDS + GRAIN_SECONDS / 2
        tasks = [asyncio.create_task(wait(deadline + i * GRAIN_SECONDS / 100)) for i in range(40)]
        await asyncio.sleep(0)
        assert len(cutoffs) == 1  # forty deadlines in one grain: one timer
        (cutoff,) = cutoffs._due.values()
        assert cutoff._timer.when() <= deadline  # early by less than a grain, never late
        assert await asyncio.wait_for(asyncio.gather(*tasks), 5) == ["deadline"] * 40
        assert len(cutoffs) == 0
        assert all(task.cancelling() == 0 for task in tasks)  # the cut is withdrawn

    run(main())


def test_waits_that_end_in_time_leave_no_timer_behind(run: Callable) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        cutoffs, answer, wait = _waiting()
        tasks = [asyncio.create_task(wait(loop.time() + 1 + i * 0.1)) for i in range(30)]
        await asyncio.sleep(0)
        assert len(cutoffs) == 30  # thirty grains apart: thirty timers
        answer.set_result(None)
        assert await asyncio.gather(*tasks) == ["answered"] * 30
        assert len(cutoffs) == 0

    run(main())


def test_a_cancel_from_elsewhere_is_not_taken_for_the_deadline(run: Callable) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        cutoffs, _, wait = _waiting()
        # Cancelled long before its deadline.
        early = asyncio.create_task(wait(loop.time() + 60))
        # Cancelled by its caller at the very moment the deadline cuts it off too.
        both = asyncio.create_task(wait(loop.time() + 0.02))
        await asyncio.sleep(0)
        (late_cutoff,) = (c for c in cutoffs._due.values() if both in c.tasks)
        early.cancel()
        late_cutoff._timer.cancel()
        late_cutoff._fire()
        both.cancel()
        for task in (early, both):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert len(cutoffs) == 0

    run(main())


def test_a_deadline_already_past_cuts_off_at_once(run: Callable) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        cutoffs, _, wait = _waiting()
        assert await asyncio.wait_for(wait(loop.time() - 1), 5) == "deadline"
        assert len(cutoffs) == 0

    run(main())
