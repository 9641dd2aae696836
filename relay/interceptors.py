"""The wrapper around ``pushrelay.v1.PushRelay``'s handlers: authenticate, limit, count.

For each call to ``Send`` or ``SendStream`` (health and reflection pass untouched):

1. authenticate the caller (``relay/auth.py``) → ``UNAUTHENTICATED``;
2. on ``Send``, the client's rate limit, then the in-flight cap → ``RESOURCE_EXHAUSTED``
   (a ``SendStream`` applies both to each request it carries: ``relay/service.py``);
3. set :data:`relay.auth.CALLER` and run the servicer, which authorizes each device's app;
4. turn a :class:`~relay.errors.RelayError` raised by any of these into its status code (the one
   mapping, ``errors.status_for``), and count the call exactly once, with its final code, in
   ``pushrelay_requests_total{method,code}`` and ``pushrelay_request_duration_seconds``.

A rate-limited call carries its retry delay in the trailers twice: as ``retry-after-ms``
(milliseconds, decimal) for any client, and as the standard ``google.rpc.RetryInfo`` inside a
``google.rpc.Status`` in ``grpc-status-details-bin`` (what ``grpcio-status`` and other gRPC
libraries' rich-error helpers read). The two ``google.rpc`` messages are declared here in a
private descriptor pool, so the relay needs no googleapis package and clashes with none.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, duration_pb2
from google.protobuf.message_factory import GetMessageClass
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from pushrelay.v1 import relay_pb2 as pb
from relay.auth import ANYONE, CALLER, Caller
from relay.errors import RelayError, status_for
from relay.ingress import Call, messages, one_message, send_streamed
from relay.limits import RateLimited
from relay.metrics import Metrics
from relay.service import RelayService, Snapshot

log = logging.getLogger("relay.interceptors")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PushRelay"].full_name


class RelayInterceptor:
    """Wraps PushRelay's handlers; ``current()`` gives the snapshot (clients, limits, metrics).

    ``ceiling`` is the largest request message read at all (gRPC's own limit: a larger one ends
    the call with ``RESOURCE_EXHAUSTED`` before any handler runs). ``idle()`` returns once no
    PushRelay call is running (a graceful stop waits for those, not for health watchers).
    """

    def __init__(self, current: Callable[[], Snapshot], ceiling: int) -> None:
        self._current = current
        self._ceiling = ceiling
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()

    def _enter(self) -> None:
        self._running += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._running -= 1
        if not self._running:
            self._idle.set()

    def guard(self, servicer: RelayService) -> Any:
        """``servicer`` with both methods wrapped, as a grpclib service (``__mapping__``)."""
        send = self._unary("Send", servicer.Send)
        stream = self._stream("SendStream", servicer.SendStream)
        request, reply = pb.SendRequest, pb.SendResponse
        mapping = {
            f"/{SERVICE_NAME}/Send": Handler(send, Cardinality.UNARY_UNARY, request, reply),
            f"/{SERVICE_NAME}/SendStream": Handler(
                stream, Cardinality.STREAM_STREAM, request, reply
            ),
        }
        return _Service(mapping, lean=(f"/{SERVICE_NAME}/Send",))

    def _unary(
        self, method: str, behavior: Callable[[Any, Call], Awaitable[Any]]
    ) -> Callable[[Stream[Any, Any]], Awaitable[None]]:
        async def call(stream: Stream[Any, Any]) -> None:
            request = await one_message(stream, self._ceiling)
            context = Call(stream)
            snap, started = self._current(), time.perf_counter()
            code: Status | None = Status.OK
            caller: Caller | None = None
            self._enter()
            try:
                caller = _authenticate(snap, context)
                snap.rates.check(caller)
                snap.gate.enter_or_refuse(snap.limits.max_inflight_requests)
                try:
                    CALLER.set(caller)
                    response = await behavior(request, context)
                finally:
                    snap.gate.leave()
                await stream.send_message(response)
            except RelayError as error:
                code = None  # counted by _refuse: the status leaves before abort returns
                rid = str(getattr(request, "request_id", ""))
                await _refuse(context, snap.metrics, method, started, error, caller, rid)
            except BaseException as exc:
                code = _code_of(exc)
                raise
            finally:
                self._leave()
                if code is not None:
                    _observe(snap.metrics, method, code, started)

        return call

    def _stream(
        self, method: str, behavior: Callable[[Any, Call], AsyncIterator[Any]]
    ) -> Callable[[Stream[Any, Any]], Awaitable[None]]:
        async def call(stream: Stream[Any, Any]) -> None:
            context = Call(stream)
            snap, started = self._current(), time.perf_counter()
            code: Status | None = Status.OK
            caller: Caller | None = None
            self._enter()
            try:
                # The first request (or the stream's end) is awaited before a refusal: a status
                # sent before the caller's first message is written makes some clients (grpcio's,
                # with a request iterator) report a failed write instead of the status.
                requests = messages(stream, self._ceiling)
                first = await anext(requests, None)
                caller = _authenticate(snap, context)
                CALLER.set(caller)
                async for answer in behavior(_following(first, requests), context):
                    await send_streamed(stream, answer)
            except RelayError as error:
                code = None  # counted by _refuse: the status leaves before abort returns
                await _refuse(context, snap.metrics, method, started, error, caller)
            except BaseException as exc:
                code = _code_of(exc)
                raise
            finally:
                self._leave()
                if code is not None:
                    _observe(snap.metrics, method, code, started)

        return call


async def _following(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """``first`` (unless the stream ended before it), then ``rest``."""
    if first is None:
        return
    yield first
    async for message in rest:
        yield message


class _Service:
    """A grpclib service from a ready mapping of method paths to handlers; the unary methods
    named in ``lean`` take ``relay.ingress``'s lean path."""

    def __init__(self, mapping: dict[str, Handler], lean: tuple[str, ...] = ()) -> None:
        self._mapping = mapping
        self.__lean__ = lean

    def __mapping__(self) -> dict[str, Handler]:
        return self._mapping


def _authenticate(snap: Snapshot, context: Call) -> Caller:
    if snap.auth.open:  # no clients configured: nothing to read from the call
        return ANYONE
    return snap.auth.authenticate(context.invocation_metadata(), context.auth_context())


async def _refuse(
    context: Call,
    metrics: Metrics,
    method: str,
    started: float,
    error: RelayError,
    caller: Caller | None,
    request_id: str = "",
) -> NoReturn:
    """Count, log and end the call with ``error``'s status (counted first: once the status has
    left, the caller may already be reading the metrics)."""
    code = status_for(error)
    _observe(metrics, method, code, started)
    log.info(
        "refused",
        extra={
            "method": method,
            "code": code.name,
            "client": caller.name if caller else "",
            "request_id": request_id,  # the caller's correlation id: no personal data by contract
        },
    )
    if isinstance(error, RateLimited):
        millis = retry_millis(error.retry_after_seconds)
        await context.abort(
            code, str(error), retry_status(code, str(error), millis), retry_after_ms=str(millis)
        )
    await context.abort(code, str(error))
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


def _code_of(exc: BaseException) -> Status:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return Status.CANCELLED
    if isinstance(exc, GRPCError):  # ended with a code of its own (e.g. gRPC's message ceiling)
        return exc.status
    return Status.UNKNOWN


def _observe(metrics: Metrics, method: str, code: Status, started: float) -> None:
    metrics.observe_request(method, code, time.perf_counter() - started)


# --- retry info in trailers -----------------------------------------------------------------------


def retry_millis(seconds: float) -> int:
    """The retry delay as trailers carry it: whole milliseconds, at least one."""
    return max(1, round(seconds * 1000))


def retry_status(code: Status, message: str, millis: int) -> bytes:
    """A serialized ``google.rpc.Status`` holding ``google.rpc.RetryInfo`` (see the module doc)."""
    delay = _RetryInfo(retry_delay={"seconds": millis // 1000, "nanos": millis % 1000 * 1_000_000})
    detail = {"type_url": f"type.googleapis.com/{RETRY_INFO}", "value": delay.SerializeToString()}
    status = _Status(code=code.value, message=message, details=[detail])
    return bytes(status.SerializeToString())


STATUS, RETRY_INFO = "google.rpc.Status", "google.rpc.RetryInfo"


def _google_rpc_pool() -> descriptor_pool.DescriptorPool:
    """``google/rpc/status.proto``'s Status and ``error_details.proto``'s RetryInfo, wire-equal."""
    field = descriptor_pb2.FieldDescriptorProto
    message = descriptor_pb2.DescriptorProto
    optional = field.LABEL_OPTIONAL
    rpc = descriptor_pb2.FileDescriptorProto(
        name="relay/google_rpc_subset.proto",
        package="google.rpc",
        syntax="proto3",
        dependency=["google/protobuf/any.proto", "google/protobuf/duration.proto"],
        message_type=[
            message(
                name="Status",
                field=[
                    field(name="code", number=1, type=field.TYPE_INT32, label=optional),
                    field(name="message", number=2, type=field.TYPE_STRING, label=optional),
                    field(
                        name="details",
                        number=3,
                        type=field.TYPE_MESSAGE,
                        label=field.LABEL_REPEATED,
                        type_name=".google.protobuf.Any",
                    ),
                ],
            ),
            message(
                name="RetryInfo",
                field=[
                    field(
                        name="retry_delay",
                        number=1,
                        type=field.TYPE_MESSAGE,
                        label=optional,
                        type_name=".google.protobuf.Duration",
                    )
                ],
            ),
        ],
    )
    pool = descriptor_pool.DescriptorPool()
    for dependency in (any_pb2, duration_pb2):
        pool.AddSerializedFile(dependency.DESCRIPTOR.serialized_pb)
    pool.AddSerializedFile(rpc.SerializeToString())
    return pool


GOOGLE_RPC = _google_rpc_pool()
# Message classes built at run time: typed Any, since the stubs know no fields of theirs.
_Status: Any = GetMessageClass(GOOGLE_RPC.FindMessageTypeByName(STATUS))
_RetryInfo: Any = GetMessageClass(GOOGLE_RPC.FindMessageTypeByName(RETRY_INFO))


def message_class(full_name: str) -> Any:
    """A class of :data:`GOOGLE_RPC` by name, for callers (and tests) that decode the trailers."""
    return GetMessageClass(GOOGLE_RPC.FindMessageTypeByName(full_name))
