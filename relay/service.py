"""The PushRelay servicer: validate, fan out per device under the deadline, collect in order.

Every device of a valid request gets exactly one ``DeviceResult``, in request order: what its
provider said, or ``UNAVAILABLE``/``DeadlineExceeded`` when the deadline came first. The answer
always leaves before the caller's deadline (a small margin is kept for the trip back).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field

import grpc

from adapters.base import Outcome, Push, Verdict
from pushrelay.v1 import relay_pb2 as pb
from pushrelay.v1 import relay_pb2_grpc
from relay.config import AppConfig, Limits
from relay.dispatch import AppRuntime
from relay.errors import Draining, RelayError, status_for
from relay.metrics import Metrics, kind_label
from relay.model import Message, Privacy
from relay.render import GroupingKeys, effective_privacy, render
from relay.validate import device_keys, requested_privacy, validated

log = logging.getLogger("relay.service")

Context = grpc.aio.ServicerContext[pb.SendRequest, pb.SendResponse]

DEADLINE_EXCEEDED = Outcome(Verdict.UNAVAILABLE, "DeadlineExceeded")
RENDER_FAILED = Outcome(Verdict.REJECTED, "RenderFailed")
MAX_STREAM_INFLIGHT = 4096  # requests in flight on one SendStream before we stop reading


class Usage:
    """Counts the requests running on a snapshot, so a reload can retire it once idle."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        self.count += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.count -= 1
            if self.count == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


@dataclass(frozen=True)
class Snapshot:
    """Everything a request needs, swapped as a whole (so a reload never mixes two configs).

    A request takes the current snapshot when it starts and keeps it to the end: calls in
    flight during a reload finish on the adapters they started with.
    """

    apps: Mapping[str, AppRuntime]
    limits: Limits
    grouping: GroupingKeys
    metrics: Metrics
    usage: Usage = field(default_factory=Usage, compare=False)


@dataclass(frozen=True, slots=True)
class _Job:
    runtime: AppRuntime | None
    push: Push | None
    privacy: Privacy
    immediate: Outcome | None = None


class RelayService(relay_pb2_grpc.PushRelayServicer):
    """The gRPC servicer; ``current()`` gives the snapshot each request runs on."""

    def __init__(
        self, current: Callable[[], Snapshot], draining: Callable[[], bool] = lambda: False
    ) -> None:
        self._current = current
        self._draining = draining
        self._stragglers: set[asyncio.Task[Outcome]] = set()

    async def Send(self, request: pb.SendRequest, context: Context) -> pb.SendResponse:
        snap = self._current()
        started = time.perf_counter()
        deadline = _deadline(context, snap.limits)
        try:
            if self._draining():
                raise Draining("server is shutting down: retry on another replica")
            message = validated(request, _configs(snap), snap.limits)
        except RelayError as error:
            _observe(snap, "Send", status_for(error), started)
            await context.abort(status_for(error), str(error))
            raise  # unreachable: abort raises
        with snap.usage.hold():
            results = await self._settle(snap, request, message, deadline)
        _observe(snap, "Send", grpc.StatusCode.OK, started)
        _log_request("Send", request, results, started)
        return pb.SendResponse(request_id=request.request_id, results=results)

    async def SendStream(
        self,
        request_iterator: AsyncIterator[pb.SendRequest],
        context: Context,
    ) -> AsyncIterator[pb.SendResponse]:
        snap = self._current()
        started = time.perf_counter()
        answers: asyncio.Queue[pb.SendResponse | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read_stream(request_iterator, context, answers))
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await reader  # re-raise what ended the reading, if anything did
        finally:
            reader.cancel()
            _observe(snap, "SendStream", grpc.StatusCode.OK, started)

    async def _read_stream(
        self,
        requests: AsyncIterator[pb.SendRequest],
        context: Context,
        answers: asyncio.Queue[pb.SendResponse | None],
    ) -> None:
        # Each request runs as its own task, so a slow one never holds the others back; the
        # in-flight bound turns into HTTP/2 flow control towards a caller that sends too fast.
        slots = asyncio.Semaphore(MAX_STREAM_INFLIGHT)
        tasks: set[asyncio.Task[None]] = set()
        try:
            async for request in requests:
                await slots.acquire()
                task = asyncio.create_task(self._answer_one(request, context, answers))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                task.add_done_callback(lambda _: slots.release())
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await answers.put(None)

    async def _answer_one(
        self,
        request: pb.SendRequest,
        context: Context,
        answers: asyncio.Queue[pb.SendResponse | None],
    ) -> None:
        snap = self._current()
        started = time.perf_counter()
        deadline = _deadline(context, snap.limits)
        try:
            message = validated(request, _configs(snap), snap.limits)
        except RelayError as error:
            # A stream cannot fail one request with a status without failing all the others
            # in flight: an invalid request is answered with every device REJECTED, the reason
            # naming the problem.
            results = _rejected_all(request, f"InvalidArgument: {error}")
        else:
            with snap.usage.hold():
                results = await self._settle(snap, request, message, deadline)
        _log_request("SendStream", request, results, started)
        await answers.put(pb.SendResponse(request_id=request.request_id, results=results))

    async def _settle(
        self, snap: Snapshot, request: pb.SendRequest, message: Message, deadline: float
    ) -> list[pb.DeviceResult]:
        requested = requested_privacy(request.notification)
        jobs = [_job(snap, device, message, requested) for device in request.devices]
        tasks = {i: self._start(snap, job, deadline) for i, job in enumerate(jobs) if job.push}
        if tasks:
            timeout = max(0.0, deadline - asyncio.get_running_loop().time())
            await asyncio.wait(tasks.values(), timeout=timeout)
        results = []
        for i, job in enumerate(jobs):
            outcome = job.immediate or _finished(tasks[i])
            _count(snap, message, job, outcome)
            results.append(_result(outcome, job.privacy))
        return results

    def _start(self, snap: Snapshot, job: _Job, deadline: float) -> asyncio.Task[Outcome]:
        assert job.runtime is not None and job.push is not None
        task = asyncio.create_task(_tracked(snap.metrics, job.runtime.deliver(job.push, deadline)))
        # A task still running at the deadline is cancelled and forgotten by the request;
        # keep a reference until it has unwound, so it is never destroyed while pending.
        self._stragglers.add(task)
        task.add_done_callback(self._stragglers.discard)
        return task


async def _tracked(metrics: Metrics, work: collections.abc.Awaitable[Outcome]) -> Outcome:
    metrics.inflight.inc()
    try:
        return await work
    finally:
        metrics.inflight.dec()


def _configs(snap: Snapshot) -> Mapping[str, AppConfig]:
    return {app_id: runtime.app for app_id, runtime in snap.apps.items()}


def _job(snap: Snapshot, device: pb.Device, message: Message, requested: Privacy | None) -> _Job:
    runtime = snap.apps[device.app_id]
    keys = device_keys(device)
    policy = runtime.app.privacy
    privacy = effective_privacy(requested, policy.default, policy.max, has_keys=keys is not None)
    try:
        push = render(
            message,
            runtime.platform,
            privacy,
            token=device.token,
            keys=keys,
            grouping=snap.grouping,
            push_id=str(uuid.uuid4()),
        )
    except Exception as exc:  # a rendering bug costs this device, never the request
        log.error("render failed", extra={"app": runtime.app.id, "error": type(exc).__name__})
        return _Job(runtime, None, privacy, RENDER_FAILED)
    return _Job(runtime, push, privacy)


def _finished(task: asyncio.Task[Outcome]) -> Outcome:
    if not task.done():
        task.cancel()
        return DEADLINE_EXCEEDED
    if task.cancelled() or task.exception() is not None:
        return DEADLINE_EXCEEDED if task.cancelled() else Outcome.unavailable("InternalError")
    return task.result()


def _deadline(context: Context, limits: Limits) -> float:
    """Loop time by which the answer must be ready: the caller's deadline less a margin."""
    budget = limits.default_deadline_seconds
    remaining = context.time_remaining()
    if remaining is not None:
        margin = min(max(0.1 * remaining, 0.01), 0.25)
        budget = remaining - margin
    return asyncio.get_running_loop().time() + max(budget, 0.0)


def _result(outcome: Outcome, privacy: Privacy) -> pb.DeviceResult:
    return pb.DeviceResult(
        outcome=pb.Outcome.Value(outcome.verdict.name),
        reason=outcome.reason,
        provider_message_id=outcome.provider_message_id,
        retry_after_seconds=outcome.retry_after_seconds,
        privacy=pb.Privacy.ValueType(privacy),
        token_invalid_since_ms=outcome.token_invalid_since_ms,
    )


def _rejected_all(request: pb.SendRequest, reason: str) -> list[pb.DeviceResult]:
    return [pb.DeviceResult(outcome=pb.REJECTED, reason=reason) for _ in request.devices]


def _count(snap: Snapshot, message: Message, job: _Job, outcome: Outcome) -> None:
    platform = job.runtime.platform if job.runtime else "unknown"
    snap.metrics.notifications.labels(
        kind=kind_label(message.kind), platform=platform, outcome=outcome.verdict.name
    ).inc()


def _observe(snap: Snapshot, method: str, code: grpc.StatusCode, started: float) -> None:
    snap.metrics.requests.labels(method=method, code=code.name).inc()
    snap.metrics.request_duration.labels(method=method).observe(time.perf_counter() - started)


def _log_request(
    method: str, request: pb.SendRequest, results: list[pb.DeviceResult], started: float
) -> None:
    # The canonical line: ids, counts and timing only — never content or tokens.
    outcomes = collections.Counter(pb.Outcome.Name(r.outcome) for r in results)
    log.info(
        "request",
        extra={
            "method": method,
            "request_id": request.request_id,
            "kind": pb.Kind.Name(request.notification.kind)
            if request.notification.kind in pb.Kind.values()
            else "unknown",
            "devices": len(results),
            "outcomes": dict(outcomes),
            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
        },
    )
