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
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, cast

import grpc
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, duration_pb2
from google.protobuf.message_factory import GetMessageClass

from pushrelay.v1 import relay_pb2_grpc
from relay.auth import ANYONE, CALLER, Caller
from relay.errors import RelayError, status_for
from relay.limits import RateLimited
from relay.metrics import Metrics
from relay.service import Snapshot

log = logging.getLogger("relay.interceptors")

Context = grpc.aio.ServicerContext[Any, Any]
Metadata = tuple[tuple[str, str | bytes], ...]


class RelayInterceptor:
    """Wraps PushRelay's handlers; ``current()`` gives the snapshot (clients, limits, metrics).

    The wrapping is done once, when the servicer is registered (:meth:`guard`), rather than by
    a ``grpc.aio.ServerInterceptor``: gRPC runs an interceptor's coroutines for every call of
    every service, and the wrapped handler would be rebuilt each time (bench/RESULTS.md).
    """

    def __init__(self, current: Callable[[], Snapshot]) -> None:
        self._current = current

    def guard(self, servicer: relay_pb2_grpc.PushRelayServicer) -> relay_pb2_grpc.PushRelayServicer:
        """``servicer`` with both methods wrapped, for ``add_PushRelayServicer_to_server``."""
        guarded = types.SimpleNamespace(
            Send=self._unary("Send", cast(Any, servicer.Send)),
            SendStream=self._stream("SendStream", cast(Any, servicer.SendStream)),
        )
        return cast(relay_pb2_grpc.PushRelayServicer, guarded)

    def _unary(
        self, method: str, behavior: Callable[[Any, Context], Awaitable[Any]]
    ) -> Callable[[Any, Context], Awaitable[Any]]:
        async def call(request: Any, context: Context) -> Any:
            snap, started = self._current(), time.perf_counter()
            code: grpc.StatusCode | None = grpc.StatusCode.OK
            caller: Caller | None = None
            try:
                caller = _authenticate(snap, context)
                snap.rates.check(caller)
                snap.gate.enter_or_refuse(snap.limits.max_inflight_requests)
                try:
                    CALLER.set(caller)
                    return await behavior(request, context)
                finally:
                    snap.gate.leave()
            except RelayError as error:
                code = None  # counted by _refuse: the status leaves before abort returns
                rid = str(getattr(request, "request_id", ""))
                await _refuse(context, snap.metrics, method, started, error, caller, rid)
            except BaseException as exc:
                code = _code_of(exc, context)
                raise
            finally:
                if code is not None:
                    _observe(snap.metrics, method, code, started)

        return call

    def _stream(
        self, method: str, behavior: Callable[[Any, Context], AsyncIterator[Any]]
    ) -> Callable[[Any, Context], AsyncIterator[Any]]:
        async def call(requests: Any, context: Context) -> AsyncIterator[Any]:
            snap, started = self._current(), time.perf_counter()
            code: grpc.StatusCode | None = grpc.StatusCode.OK
            caller: Caller | None = None
            try:
                caller = _authenticate(snap, context)
                CALLER.set(caller)
                async for answer in behavior(requests, context):
                    yield answer
            except RelayError as error:
                code = None  # counted by _refuse: the status leaves before abort returns
                await _refuse(context, snap.metrics, method, started, error, caller)
            except BaseException as exc:
                code = _code_of(exc, context)
                raise
            finally:
                if code is not None:
                    _observe(snap.metrics, method, code, started)

        return call


def _authenticate(snap: Snapshot, context: Context) -> Caller:
    if snap.auth.open:  # no clients configured: nothing to read from the call
        return ANYONE
    metadata = cast(Metadata, tuple(context.invocation_metadata() or ()))
    return snap.auth.authenticate(metadata, context.auth_context())


async def _refuse(
    context: Context,
    metrics: Metrics,
    method: str,
    started: float,
    error: RelayError,
    caller: Caller | None,
    request_id: str = "",
) -> NoReturn:
    """Count, log and end the call with ``error``'s status (counted first: once ``abort`` has
    sent the status, the caller may already be reading the metrics)."""
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
    trailers = (
        retry_trailers(code, str(error), error.retry_after_seconds)
        if isinstance(error, RateLimited)
        else ()
    )
    await context.abort(code, str(error), trailing_metadata=trailers)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


def _code_of(exc: BaseException, context: Context) -> grpc.StatusCode:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    if isinstance(exc, grpc.aio.AbortError):  # the servicer aborted with a code of its own
        code = context.code()
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.UNKNOWN


def _observe(metrics: Metrics, method: str, code: grpc.StatusCode, started: float) -> None:
    metrics.observe_request(method, code, time.perf_counter() - started)


# --- retry info in trailers -----------------------------------------------------------------------


def retry_trailers(code: grpc.StatusCode, message: str, seconds: float) -> Metadata:
    """Trailing metadata telling the caller to retry after ``seconds`` (see the module doc)."""
    millis = max(1, round(seconds * 1000))
    delay = _RetryInfo(retry_delay={"seconds": millis // 1000, "nanos": millis % 1000 * 1_000_000})
    detail = {"type_url": f"type.googleapis.com/{RETRY_INFO}", "value": delay.SerializeToString()}
    status = _Status(code=code.value[0], message=message, details=[detail])
    return (
        ("retry-after-ms", str(millis)),
        ("grpc-status-details-bin", status.SerializeToString()),
    )


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
