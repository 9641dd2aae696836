"""The PushRelay servicer: validate, fan out per device under the deadline, collect in order.

Every device of a valid request gets exactly one ``DeviceResult``, in request order: what its
provider said, or ``UNAVAILABLE``/``DeadlineExceeded`` when the deadline came first. The answer
always leaves before the caller's deadline (a small margin is kept for the trip back).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

from adapters.base import Outcome, Push, Verdict
from pushrelay.v1 import relay_pb2 as pb
from relay.auth import Authenticator, check_apps, current_caller
from relay.config import AppConfig, Limits
from relay.cutoffs import Cutoffs
from relay.dispatch import AppRuntime
from relay.errors import Draining, RelayError, status_for
from relay.ingress import Call
from relay.limits import InflightGate, RateLimited, RateLimiter, check_size
from relay.logs import info_line
from relay.metrics import Metrics
from relay.model import Message, Privacy
from relay.render import GroupingKeys, effective_privacy, render
from relay.validate import device_keys, requested_privacy, validated

log = logging.getLogger("relay.service")

Context = Call

DEADLINE_EXCEEDED = Outcome(Verdict.UNAVAILABLE, "DeadlineExceeded")
RENDER_FAILED = Outcome(Verdict.REJECTED, "RenderFailed")
MAX_STREAM_INFLIGHT = 4096  # requests in flight on one SendStream before we stop reading


class Usage:
    """Counts the requests running on a snapshot, so a reload can retire it once idle.

    ``with usage.hold():`` around a request (a plain context manager: it runs per request).
    """

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def hold(self) -> Usage:
        return self

    def __enter__(self) -> None:
        self.count += 1
        self._idle.clear()

    def __exit__(self, *_: object) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


@dataclass(frozen=True)
class Snapshot:
    """Everything a request needs, swapped as a whole (so a reload never mixes two configs).

    A request takes the current snapshot when it starts and keeps it to the end: calls in
    flight during a reload finish on the adapters they started with. The client table lives
    here too, so a reload rotates tokens; ``gate`` is the one process-wide in-flight count,
    handed from snapshot to snapshot.
    """

    apps: Mapping[str, AppRuntime]
    limits: Limits
    grouping: GroupingKeys
    metrics: Metrics
    auth: Authenticator
    rates: RateLimiter
    gate: InflightGate
    usage: Usage = field(default_factory=Usage, compare=False)

    @functools.cached_property
    def configs(self) -> Mapping[str, AppConfig]:
        """The apps' configs by id, as validation reads them (derived once per snapshot)."""
        return {app_id: runtime.app for app_id, runtime in self.apps.items()}


@dataclass(frozen=True, slots=True)
class _Job:
    runtime: AppRuntime
    push: Push | None
    privacy: Privacy
    immediate: Outcome | None = None


class RelayService:
    """The PushRelay service; ``current()`` gives the snapshot each request runs on.

    It runs behind ``relay.interceptors.RelayInterceptor``, which authenticates the caller and
    turns the :class:`RelayError` raised here into the call's status (and counts it).
    """

    def __init__(
        self, current: Callable[[], Snapshot], draining: Callable[[], bool] = lambda: False
    ) -> None:
        self._current = current
        self._draining = draining
        self._stragglers: set[asyncio.Task[Outcome]] = set()
        self._cutoffs = Cutoffs()  # the deadlines of one-device requests, by few-ms grains

    async def Send(self, request: pb.SendRequest, context: Context) -> pb.SendResponse:
        snap = self._current()
        started = time.perf_counter()
        deadline = _deadline(context, snap.limits)
        if self._draining():
            raise Draining("server is shutting down: retry on another replica")
        message = _admitted(snap, request)
        with snap.usage.hold():
            results = await self._settle(snap, request, message, deadline)
        _log_request(snap, "Send", request, results, started)
        return pb.SendResponse(request_id=request.request_id, results=results)

    async def SendStream(
        self,
        request_iterator: AsyncIterator[pb.SendRequest],
        context: Context,
    ) -> AsyncIterator[pb.SendResponse]:
        answers: asyncio.Queue[pb.SendResponse | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read_stream(request_iterator, context, answers))
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await reader  # re-raise what ended the reading, if anything did
        finally:
            reader.cancel()

    async def _read_stream(
        self,
        requests: AsyncIterator[pb.SendRequest],
        context: Context,
        answers: asyncio.Queue[pb.SendResponse | None],
    ) -> None:
        # Each request runs as its own task, so a slow one never holds the others back; the
        # in-flight bounds (this stream's and the process's) turn into HTTP/2 flow control
        # towards a caller that sends too fast.
        slots = asyncio.Semaphore(MAX_STREAM_INFLIGHT)
        tasks: set[asyncio.Task[None]] = set()
        try:
            async for request in requests:
                await slots.acquire()
                snap = self._current()
                await snap.gate.enter(snap.limits.max_inflight_requests)
                task = asyncio.create_task(self._answer_one(request, context, answers))
                tasks.add(task)
                task.add_done_callback(functools.partial(_request_done, tasks, slots, snap.gate))
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
            snap.rates.check(current_caller())
            message = _admitted(snap, request)
        except RelayError as error:
            # A stream cannot fail one request with a status without failing all the others
            # in flight: a refused request is answered with every device REJECTED (or
            # RATE_LIMITED, with the wait), the reason naming the problem.
            results = _refused_all(request, error)
        else:
            with snap.usage.hold():
                results = await self._settle(snap, request, message, deadline)
        _log_request(snap, "SendStream", request, results, started)
        await answers.put(pb.SendResponse(request_id=request.request_id, results=results))

    async def _settle(
        self, snap: Snapshot, request: pb.SendRequest, message: Message, deadline: float
    ) -> list[pb.DeviceResult]:
        requested = requested_privacy(request.notification)
        if len(request.devices) == 1:  # most requests: no task of its own, no wait set
            job = _job(snap, request.devices[0], message, requested, None)
            jobs = [job]
            outcomes = [job.immediate or RENDER_FAILED]
            if job.push is not None:
                # Awaited in the request's own task (inline, not a coroutine of its own: this
                # runs per push), cut off at the deadline by a timer it shares with the requests
                # due in the same few milliseconds; counted in flight as _tracked does.
                task = asyncio.current_task()
                assert task is not None
                cutoff = self._cutoffs.arm(task, deadline)
                inflight = snap.metrics.inflight
                inflight.inc()
                try:
                    outcomes[0] = await job.runtime.deliver(job.push, deadline)
                except asyncio.CancelledError:
                    if not cutoff.expired(task):
                        raise  # the call itself was cancelled
                    outcomes[0] = DEADLINE_EXCEEDED
                except Exception:  # as _finished: a bug costs this device, never the request
                    outcomes[0] = Outcome.unavailable("InternalError")
                finally:
                    cutoff.leave(task)
                    inflight.dec()
        else:
            rendered: dict[tuple[str, Privacy], Push] = {}
            jobs = [_job(snap, device, message, requested, rendered) for device in request.devices]
            outcomes = await self._settle_many(snap, jobs, deadline)
        results = []
        for job, outcome in zip(jobs, outcomes, strict=True):
            _count(snap, message, job, outcome)
            results.append(_result(outcome, job.privacy))
        return results

    async def _settle_many(
        self, snap: Snapshot, jobs: list[_Job], deadline: float
    ) -> list[Outcome]:
        tasks = {i: self._start(snap, job, deadline) for i, job in enumerate(jobs) if job.push}
        if tasks:
            timeout = max(0.0, deadline - asyncio.get_running_loop().time())
            await asyncio.wait(tasks.values(), timeout=timeout)
        return [job.immediate or _finished(tasks[i]) for i, job in enumerate(jobs)]

    def _start(self, snap: Snapshot, job: _Job, deadline: float) -> asyncio.Task[Outcome]:
        assert job.push is not None
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


def _request_done(
    tasks: set[asyncio.Task[None]],
    slots: asyncio.Semaphore,
    gate: InflightGate,
    task: asyncio.Task[None],
) -> None:
    tasks.discard(task)
    slots.release()
    gate.leave()


def _admitted(snap: Snapshot, request: pb.SendRequest) -> Message:
    """The request's message once its size, content and the caller's apps are checked.

    Raises:
        InvalidArgument: too large, or invalid (every problem, by field).
        PermissionDenied: a device names an app the caller may not use.
    """
    check_size(request.ByteSize(), snap.limits)
    message = validated(request, snap.configs, snap.limits)
    check_apps(current_caller(), [device.app_id for device in request.devices])
    return message


def _job(
    snap: Snapshot,
    device: pb.Device,
    message: Message,
    requested: Privacy | None,
    rendered: dict[tuple[str, Privacy], Push] | None,
) -> _Job:
    runtime = snap.apps[device.app_id]
    keys = device_keys(device)
    policy = runtime.app.privacy
    privacy = effective_privacy(requested, policy.default, policy.max, has_keys=keys is not None)
    platform = runtime.platform
    try:
        # A request's devices on one platform in one mode get the same payload: it is rendered
        # once and only the device's own fields change. ENCRYPTED is sealed to each device's
        # keys, so it is rendered per device.
        template = rendered.get((platform, privacy)) if rendered is not None else None
        if template is not None:
            push = dataclasses.replace(template, token=device.token, keys=keys, push_id=_push_id())
        else:
            push = render(
                message,
                platform,
                privacy,
                token=device.token,
                keys=keys,
                grouping=snap.grouping,
                push_id=_push_id(),
            )
            if rendered is not None and privacy is not Privacy.ENCRYPTED:
                rendered[platform, privacy] = push
    except Exception as exc:  # a rendering bug costs this device, never the request
        log.error("render failed", extra={"app": runtime.app.id, "error": type(exc).__name__})
        return _Job(runtime, None, privacy, RENDER_FAILED)
    return _Job(runtime, push, privacy)


def _push_id() -> str:
    """A fresh random (version 4) UUID, as ``str(uuid.uuid4())`` spells it, at a third of the
    cost: one per device."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40
    raw[8] = raw[8] & 0x3F | 0x80
    x = raw.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


def _finished(task: asyncio.Task[Outcome]) -> Outcome:
    if not task.done():
        task.cancel()
        return DEADLINE_EXCEEDED
    if task.cancelled():
        return DEADLINE_EXCEEDED
    if task.exception() is not None:
        return Outcome.unavailable("InternalError")
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
        outcome=_OUTCOME_VALUES[outcome.verdict],
        reason=outcome.reason,
        provider_message_id=outcome.provider_message_id,
        retry_after_seconds=outcome.retry_after_seconds,
        privacy=pb.Privacy.ValueType(privacy),
        token_invalid_since_ms=outcome.token_invalid_since_ms,
    )


def _refused_all(request: pb.SendRequest, error: RelayError) -> list[pb.DeviceResult]:
    """One result per device for a stream request refused whole: the reason is the status the
    request would have had as a ``Send`` (``InvalidArgument: devices[0].token: …``)."""
    reason = status_for(error).name.title().replace("_", "") + f": {error}"
    outcome, wait = pb.REJECTED, 0
    if isinstance(error, RateLimited):
        outcome, wait = pb.RATE_LIMITED, math.ceil(error.retry_after_seconds)
    return [
        pb.DeviceResult(outcome=outcome, reason=reason, retry_after_seconds=wait)
        for _ in request.devices
    ]


def _count(snap: Snapshot, message: Message, job: _Job, outcome: Outcome) -> None:
    snap.metrics.count_push(message.kind, job.runtime.platform, job.runtime.app.id, outcome.verdict)


def _log_request(
    snap: Snapshot,
    method: str,
    request: pb.SendRequest,
    results: list[pb.DeviceResult],
    started: float,
) -> None:
    # The canonical line: ids, counts by platform and outcome, timing — never content or tokens.
    if not log.isEnabledFor(logging.INFO):
        return
    counts: dict[str, dict[str, int]] = {}
    outcomes: dict[str, int] = {}
    platforms: dict[str, int] = {}
    for device, result in zip(request.devices, results, strict=True):
        runtime = snap.apps.get(device.app_id)
        platform = runtime.platform if runtime else "unknown"
        name = _OUTCOME_NAMES.get(result.outcome, "OUTCOME_UNSPECIFIED")
        by_outcome = counts.setdefault(platform, {})
        by_outcome[name] = by_outcome.get(name, 0) + 1
        outcomes[name] = outcomes.get(name, 0) + 1
        platforms[platform] = platforms.get(platform, 0) + 1
    info_line(
        log,
        "request",
        {
            "method": method,
            "request_id": request.request_id,
            "kind": _KIND_NAMES.get(request.notification.kind, "unknown"),
            "devices": len(results),
            "outcomes": outcomes,
            "platforms": platforms,
            "counts": counts,
            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
        },
    )


# Looked up once: the canonical line is written for every request.
_KIND_NAMES = {value: pb.Kind.Name(value) for value in pb.Kind.values()}
_OUTCOME_NAMES = {value: pb.Outcome.Name(value) for value in pb.Outcome.values()}
_OUTCOME_VALUES = {verdict: pb.Outcome.Value(verdict.name) for verdict in Verdict}
