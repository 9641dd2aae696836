"""The gRPC listener on grpclib: calls, message ceiling, TLS, health, reflection, drain.

The relay serves gRPC with grpclib (HTTP/2 in Python on the relay's own event loop) rather than
grpcio's server: measured side by side on one core, a streamed message costs the server ~34 µs
with grpclib against ~115 µs with grpc.aio, and a unary call ~220 against ~240 µs
(bench/RESULTS.md). This module is everything the relay needs of a gRPC server beyond grpclib:

- :class:`Call`: what a handler knows of its call (metadata, the peer's certificate, the time
  left, how to end it with a status and trailers);
- :func:`messages`: a call's requests, refused with ``RESOURCE_EXHAUSTED`` before a byte of a
  message over the ceiling is buffered (grpcio's ``max_receive_message_length``);
- :func:`server_tls`: an ``ssl.SSLContext`` from PEM held in memory (no file is written);
- :class:`Health` and :class:`Reflection`: ``grpc.health.v1.Health`` and
  ``grpc.reflection.v1alpha.ServerReflection`` with grpcio's semantics, on the message classes
  of grpcio-health-checking and grpcio-reflection (pure protobuf modules, shared with callers in
  the same process);
- :class:`Listener`: one listening server and its connections, with a graceful stop: no new
  connection, a GOAWAY to every client, calls in flight finish within the grace, then the rest
  are cancelled;
- the hot path beneath grpclib: unary ``Send`` on a lean path (:class:`UnaryStream`,
  :class:`_LeanStream`), answers that fit the caller's window written as prebuilt frames with
  h2's state kept in step (:func:`_answer`, :func:`send_streamed`), requests read through a
  lighter buffer (:class:`_Buffer`), headers decoded once (:func:`_decoded`). Each was measured
  side by side (bench/RESULTS.md); grpclib is pinned below 0.5 for the internals they touch.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import functools
import logging
import os
import ssl
import struct
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any, cast

from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpclib.const import Cardinality, Handler, Status
from grpclib.encoding.base import StatusDetailsCodecBase
from grpclib.exceptions import GRPCError
from grpclib.metadata import Deadline, decode_metadata, encode_bin_value, encode_grpc_message
from grpclib.protocol import Connection as ProtocolConnection
from grpclib.protocol import EventsProcessor, H2Protocol
from grpclib.protocol import Stream as ProtocolStream
from grpclib.server import Handler as _GrpclibHandler
from grpclib.server import Server, Stream
from h2.connection import ConnectionInputs, H2Connection
from h2.events import RequestReceived
from h2.exceptions import StreamClosedError
from h2.settings import SettingCodes
from h2.stream import StreamInputs
from h2.utilities import SizeLimitDict

Metadata = tuple[tuple[str, str | bytes], ...]
AuthContext = Mapping[str, list[bytes]]
Servable = Any  # an object with grpclib's ``__mapping__``

log = logging.getLogger("relay.ingress")

_HEADER = struct.Struct(">?I")
# Concurrent streams a client may open on one connection, beyond the relay's in-flight cap:
# calls over the cap are refused RESOURCE_EXHAUSTED (up to this many at once) rather than held
# back inside the caller, and a connection still cannot hold idle streams without bound.
STREAMS_OVER_CAP = 100


class Call:
    """One gRPC call, as its handler sees it (the subset of grpcio's ``ServicerContext`` the
    relay uses)."""

    __slots__ = ("stream",)

    def __init__(self, stream: Stream[Any, Any]) -> None:
        self.stream = stream

    def time_remaining(self) -> float | None:
        deadline = self.stream.deadline
        return None if deadline is None else deadline.time_remaining()

    def invocation_metadata(self) -> Metadata:
        metadata = self.stream.metadata  # decoded from the headers on each read in the lean path
        return tuple(metadata.items()) if metadata else ()

    def auth_context(self) -> AuthContext:
        """``x509_pem_cert``: the verified client certificate under mutual TLS, as grpcio has it."""
        ssl_object = self.stream.peer._transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        return {"x509_pem_cert": [ssl.DER_cert_to_PEM_cert(der).encode()]} if der else {}

    async def abort(
        self, status: Status, message: str, details: bytes | None = None, **trailers: str
    ) -> None:
        """End the call with ``status``: trailers only if nothing was sent yet. Raises GRPCError,
        which grpclib then takes as the call's end (the status has already left)."""
        await self.stream.send_trailing_metadata(
            status=status,
            status_message=message,
            status_details=details,
            metadata={key.replace("_", "-"): value for key, value in trailers.items()},
        )
        raise GRPCError(status, message)


class StatusDetails(StatusDetailsCodecBase):
    """``grpc-status-details-bin``: the caller hands over a serialized ``google.rpc.Status``."""

    def encode(self, status: Status, message: str | None, details: Any) -> bytes:
        assert isinstance(details, bytes)
        return details

    def decode(self, status: Status, message: str | None, data: bytes) -> Any:  # pragma: no cover
        return data  # a server never decodes details


async def messages(stream: Stream[Any, Any], limit: int) -> AsyncIterator[Any]:
    """The call's requests, decoded; one over ``limit`` bytes ends the call with
    ``RESOURCE_EXHAUSTED`` as soon as its length prefix arrives, as grpcio's server does.

    Compressed messages (``grpc-encoding`` gzip or deflate, as grpcio's server takes them) are
    inflated to at most ``limit`` bytes.
    """
    h2_stream = stream._stream  # grpclib's own recv_message reads the whole message first
    parse = stream._recv_type.FromString
    while (message := await _next_message(h2_stream, parse, limit)) is not None:
        yield message


async def one_message(stream: Stream[Any, Any], limit: int) -> Any:
    """A unary call's request (as :func:`messages` reads them).

    Not through :func:`messages`: an async generator left before its end is closed by the
    event loop's finalizer hook, a task of its own and a wake-up from another thread's
    signal (``call_soon_threadsafe``) per call.
    """
    message = await _next_message(stream._stream, stream._recv_type.FromString, limit)
    if message is None:
        raise GRPCError(Status.INTERNAL, "the call carried no request message")
    return message


async def _next_message(h2_stream: Any, parse: Callable[[bytes], Any], limit: int) -> Any:
    """The next request on the stream, None at its end."""
    header = await h2_stream.recv_data(5)
    if not header:
        return None
    compressed, size = _HEADER.unpack(header)
    if size > limit:
        raise GRPCError(
            Status.RESOURCE_EXHAUSTED, f"Received message larger than max ({size} vs. {limit})"
        )
    body = await h2_stream.recv_data(size) if size else b""
    if compressed:
        body = _inflated(body, getattr(h2_stream, "grpc_encoding", "identity"), limit)
    try:
        return parse(body)
    except Exception:  # DecodeError: the message never reaches a handler
        raise GRPCError(Status.INTERNAL, "Exception deserializing request!") from None


_WBITS = {"gzip": 31, "deflate": 15}


def _inflated(body: bytes, encoding: str, limit: int) -> bytes:
    wbits = _WBITS.get(encoding)
    if wbits is None:
        raise GRPCError(Status.UNIMPLEMENTED, f"Compression algorithm {encoding!r} not supported")
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise GRPCError(Status.INTERNAL, "Failed to decompress the request") from None
    if len(data) > limit:
        raise GRPCError(
            Status.RESOURCE_EXHAUSTED, f"Received message larger than max (over {limit} inflated)"
        )
    return data


# --- TLS ----------------------------------------------------------------------------------------


def server_tls(cert_pem: bytes, key_pem: bytes, client_ca_pem: bytes = b"") -> ssl.SSLContext:
    """A TLS context for the gRPC listener; a client CA requires and verifies client
    certificates (mutual TLS). HTTP/2 only, TLS 1.2 or later."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # never SSLKEYLOGFILE's key log
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    with _readable(cert_pem) as cert, _readable(key_pem) as key:
        context.load_cert_chain(cert, key)
    if client_ca_pem:
        context.load_verify_locations(cadata=client_ca_pem.decode("ascii"))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@contextlib.contextmanager
def _readable(data: bytes) -> Iterator[str]:
    """A path to read ``data`` from, without writing a file: a pipe holding it.

    ``ssl`` loads a certificate chain only from a file name; the config holds the PEM in memory.
    """
    read, write = os.pipe()
    try:
        if len(data) > 65536:  # the default pipe buffer; a write must not block
            fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, len(data))
        os.write(write, data)
        os.close(write)
        write = -1
        yield f"/dev/fd/{read}"
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)


# --- health -------------------------------------------------------------------------------------

_HealthStatus = int  # health_pb2.HealthCheckResponse.ServingStatus's values


class Health:
    """``grpc.health.v1.Health`` as grpcio-health-checking's ``HealthServicer`` behaves: ``Check``
    answers ``NOT_FOUND`` for a service never set, ``Watch`` sends the status now and on every
    change, ``enter_graceful_shutdown`` turns everything ``NOT_SERVING`` for good."""

    def __init__(self) -> None:
        self._status: dict[str, _HealthStatus] = {"": health_pb2.HealthCheckResponse.SERVING}
        self._changed: dict[str, asyncio.Event] = collections.defaultdict(asyncio.Event)
        self._watchers: collections.Counter[str] = collections.Counter()
        self._shutting_down = False

    async def set(self, service: str, status: _HealthStatus) -> None:
        if not self._shutting_down:
            self._set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        self._shutting_down = True
        for service in self._status:
            self._set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    def _set(self, service: str, status: _HealthStatus) -> None:
        self._status[service] = status
        event = self._changed.pop(service, None)
        if event is not None:
            event.set()

    async def Check(self, stream: Stream[Any, Any]) -> None:
        request = await one_message(stream, 1 << 16)
        status = self._status.get(request.service)
        if status is None:
            raise GRPCError(Status.NOT_FOUND)
        await stream.send_message(health_pb2.HealthCheckResponse(status=status))

    async def Watch(self, stream: Stream[Any, Any]) -> None:
        service = (await one_message(stream, 1 << 16)).service
        self._watchers[service] += 1
        try:
            last = None
            while True:
                changed = self._changed[service]  # set by the next change, even mid-send
                status = self._status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                if status != last:
                    await stream.send_message(health_pb2.HealthCheckResponse(status=status))
                    last = status
                await changed.wait()
        finally:  # a name no watcher asks about any more leaves nothing behind
            self._watchers[service] -= 1
            if not self._watchers[service]:
                del self._watchers[service]
                self._changed.pop(service, None)

    def __mapping__(self) -> dict[str, Handler]:
        request, reply = health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
        return {
            f"/{HEALTH}/Check": Handler(self.Check, Cardinality.UNARY_UNARY, request, reply),
            f"/{HEALTH}/Watch": Handler(self.Watch, Cardinality.UNARY_STREAM, request, reply),
        }


HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


# --- reflection ---------------------------------------------------------------------------------

REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name


class Reflection:
    """``grpc.reflection.v1alpha.ServerReflection`` over the default descriptor pool, answering
    as grpcio-reflection does (what grpcurl and other tools ask)."""

    def __init__(self, services: tuple[str, ...]) -> None:
        self._services = tuple(sorted(services))
        self._pool = descriptor_pool.Default()

    async def ServerReflectionInfo(self, stream: Stream[Any, Any]) -> None:
        async for request in messages(stream, 1 << 16):
            await stream.send_message(self._answer(request))

    def _answer(self, request: Any) -> Any:
        response = reflection_pb2.ServerReflectionResponse
        pool, which = self._pool, request.WhichOneof("message_request")
        try:
            if which == "file_by_filename":
                return self._files(request, pool.FindFileByName(request.file_by_filename))
            if which == "file_containing_symbol":
                symbol = request.file_containing_symbol
                return self._files(request, pool.FindFileContainingSymbol(symbol))
            if which == "file_containing_extension":
                asked = request.file_containing_extension
                message = pool.FindMessageTypeByName(asked.containing_type)
                extension = pool.FindExtensionByNumber(message, asked.extension_number)
                return self._files(request, pool.FindFileContainingSymbol(extension.full_name))
            if which == "all_extension_numbers_of_type":
                message = pool.FindMessageTypeByName(request.all_extension_numbers_of_type)
                numbers = sorted(extension.number for extension in pool.FindAllExtensions(message))
                return response(
                    all_extension_numbers_response=reflection_pb2.ExtensionNumberResponse(
                        base_type_name=message.full_name, extension_number=numbers
                    ),
                    original_request=request,
                )
            if which == "list_services":
                return response(
                    list_services_response=reflection_pb2.ListServiceResponse(
                        service=[reflection_pb2.ServiceResponse(name=s) for s in self._services]
                    ),
                    original_request=request,
                )
        except KeyError:
            return _reflection_error(request, Status.NOT_FOUND, "not found")
        return _reflection_error(request, Status.INVALID_ARGUMENT, "invalid argument")

    @staticmethod
    def _files(request: Any, descriptor: Any) -> Any:
        files: dict[str, Any] = {}
        _with_dependencies(descriptor, files)
        protos = []
        for file in files.values():
            proto = descriptor_pb2.FileDescriptorProto()
            file.CopyToProto(proto)
            protos.append(proto.SerializeToString())
        return reflection_pb2.ServerReflectionResponse(
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(
                file_descriptor_proto=protos
            ),
            original_request=request,
        )

    def __mapping__(self) -> dict[str, Handler]:
        request, reply = (
            reflection_pb2.ServerReflectionRequest,
            reflection_pb2.ServerReflectionResponse,
        )
        return {
            f"/{REFLECTION}/ServerReflectionInfo": Handler(
                self.ServerReflectionInfo, Cardinality.STREAM_STREAM, request, reply
            )
        }


def _with_dependencies(descriptor: Any, seen: dict[str, Any]) -> None:
    seen[descriptor.name] = descriptor
    for dependency in descriptor.dependencies:
        if dependency.name not in seen:
            _with_dependencies(dependency, seen)


def _reflection_error(request: Any, status: Status, message: str) -> Any:
    return reflection_pb2.ServerReflectionResponse(
        error_response=reflection_pb2.ErrorResponse(error_code=status.value, error_message=message),
        original_request=request,
    )


# --- the lean unary path --------------------------------------------------------------------------

_OK_HEADERS = [(":status", "200"), ("content-type", "application/grpc+proto")]
_OK_TRAILERS = [("grpc-status", "0")]


def _frame_head(kind: int, flags: int, length: int, stream_id: int) -> bytes:
    return struct.pack(">I", length)[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id)


def _literal(name_index: int, value: bytes) -> bytes:
    """HPACK "literal without indexing" with a static-table name (RFC 7541 §6.2.2): it leaves
    the dynamic table as it is, so the same bytes mean the same on every connection."""
    assert name_index < 15 + 128 and len(value) < 127
    name = bytes([name_index]) if name_index < 15 else bytes([15, name_index - 15])
    return name + bytes([len(value)]) + value


# _OK_HEADERS and _OK_TRAILERS as HPACK blocks: ":status: 200" is static entry 8 (one byte),
# "content-type" static name 31; "grpc-status" is a literal name (RFC 7541 §6.2.2).
_OK_HEADERS_BLOCK = b"\x88" + _literal(31, b"application/grpc+proto")
_OK_TRAILERS_BLOCK = b"\x00" + bytes([11]) + b"grpc-status" + bytes([1]) + b"0"
_HEADERS, _DATA = 1, 0
_END_HEADERS, _END_STREAM = 0x4, 0x1


def _answer(h2: H2Connection, stream_id: int, data: bytes) -> None:
    """A unary call's whole answer (headers, the message in one DATA frame, trailers) into
    ``h2``'s outgoing bytes, as ``send_headers``, ``send_data`` and ``send_headers`` would put
    it, with the same state changes, from prebuilt header blocks: h2's own path builds,
    encodes and serializes three frames (~27 of ~32 µs a call, bench/RESULTS.md).

    The caller has checked that ``data`` :func:`_fits`, and that no HPACK table size update is
    pending (that must lead the next header block h2 encodes).
    """
    _headers_frame(h2, stream_id, _OK_HEADERS_BLOCK, end_stream=False)
    _data_frame(h2, stream_id, data)
    _headers_frame(h2, stream_id, _OK_TRAILERS_BLOCK, end_stream=True)


def _headers_frame(h2: H2Connection, stream_id: int, block: bytes, *, end_stream: bool) -> None:
    """A prebuilt header ``block`` as one HEADERS frame into ``h2``'s outgoing bytes, with
    ``send_headers``'s state changes."""
    stream = h2.streams[stream_id]
    h2.state_machine.process_input(ConnectionInputs.SEND_HEADERS)
    stream.state_machine.process_input(StreamInputs.SEND_HEADERS)
    flags = _END_HEADERS
    if end_stream:
        stream.state_machine.process_input(StreamInputs.SEND_END_STREAM)
        flags |= _END_STREAM
    h2._data_to_send += _frame_head(_HEADERS, flags, len(block), stream_id) + block


def _data_frame(h2: H2Connection, stream_id: int, data: bytes) -> None:
    """``data`` as one DATA frame into ``h2``'s outgoing bytes, with ``send_data``'s state
    changes; the caller has checked that it :func:`_fits`."""
    stream = h2.streams[stream_id]
    h2.state_machine.process_input(ConnectionInputs.SEND_DATA)
    stream.state_machine.process_input(StreamInputs.SEND_DATA)
    stream.outbound_flow_control_window -= len(data)
    h2.outbound_flow_control_window -= len(data)
    h2._data_to_send += _frame_head(_DATA, 0, len(data), stream_id) + data


def _fits(h2: H2Connection, stream_id: int, data: bytes) -> bool:
    """Whether ``data`` can leave now as one DATA frame: within the stream's (and the
    connection's) window and the caller's frame size."""
    return len(data) <= min(h2.local_flow_control_window(stream_id), h2.max_outbound_frame_size)


class UnaryStream:
    """A unary call without grpclib's ``Stream``: the same surface a handler here uses
    (``deadline``, ``metadata``, ``peer``, ``send_message``, ``send_trailing_metadata``), and the
    answer's headers, message and trailers made in one go.

    grpclib's own path runs five event-dispatch coroutines, a deadline timer and three separate
    sends a call; a unary ``Send`` spent ~190 µs in gRPC against ~35 µs a streamed request
    (bench/RESULTS.md). The handler answers within the caller's deadline by itself
    (``relay/service.py``), so no timer cancels it; a reset from the caller still does.
    """

    __slots__ = ("_headers", "_recv_type", "_sent", "_stream", "_trailed", "deadline", "peer")

    def __init__(self, stream: Any, headers: list[tuple[str, str]], recv_type: Any) -> None:
        self._stream = stream
        self._headers = headers
        self._recv_type = recv_type
        self._sent = False
        self._trailed = False
        self.deadline = Deadline.from_headers(headers)
        self.peer = stream.connection.get_peer()

    @property
    def metadata(self) -> Any:
        return decode_metadata(self._headers)

    async def send_message(self, message: Any) -> None:
        assert not self._sent, "a unary call answers once"
        body = message.SerializeToString()
        data = _HEADER.pack(False, len(body)) + body
        stream, h2 = self._stream, self._stream._h2_connection
        await stream.connection.write_ready.wait()
        if stream.id not in h2.streams:
            raise StreamClosedError(stream.id)
        fits = _fits(h2, stream.id, data)
        if fits and not h2.encoder.header_table.resized:
            _answer(h2, stream.id, data)
            self._sent = self._trailed = True
            stream._transport.write(h2.data_to_send())
            return
        h2.send_headers(stream.id, _OK_HEADERS)
        self._sent = True
        if fits:
            h2.send_data(stream.id, data)
            h2.send_headers(stream.id, _OK_TRAILERS, end_stream=True)
            self._trailed = True
            stream._transport.write(h2.data_to_send())
        else:  # a window too small for it: grpclib's send waits for the window
            stream._transport.write(h2.data_to_send())
            await stream.send_data(data)

    async def send_trailing_metadata(
        self,
        *,
        status: Status = Status.OK,
        status_message: str | None = None,
        status_details: bytes | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        assert not self._trailed, "trailers already sent"
        headers = [] if self._sent else list(_OK_HEADERS)  # else trailers only
        headers.append(("grpc-status", str(status.value)))
        if status_message is not None:
            headers.append(("grpc-message", encode_grpc_message(status_message)))
        if status_details is not None:
            headers.append(("grpc-status-details-bin", encode_bin_value(status_details).decode()))
        headers.extend((metadata or {}).items())
        self._trailed = True
        await self._stream.send_headers(headers, end_stream=True)
        if status is not Status.OK and self._stream.closable:
            self._stream.reset_nowait()

    async def finish(self, error: BaseException | None) -> None:
        """Trailers for how the handler ended, unless it sent them."""
        if self._trailed or self._stream._transport.is_closing():
            return
        if error is None and self._sent:
            await self.send_trailing_metadata()
        elif isinstance(error, GRPCError):
            details = error.details if isinstance(error.details, bytes) else None
            await self.send_trailing_metadata(
                status=error.status, status_message=error.message, status_details=details
            )
        else:
            await self.send_trailing_metadata(
                status=Status.UNKNOWN, status_message="Internal Server Error"
            )


async def send_streamed(stream: Stream[Any, Any], message: Any) -> None:
    """One answer on a streaming call: grpclib's ``send_message`` without its event dispatch,
    codec and chunking loop. An answer that fits the caller's window and one frame goes
    straight into h2's outgoing bytes (``SendStream`` 2–4 % a push, bench/RESULTS.md); any
    other through grpclib's own send, which waits for the window."""
    if not stream._send_initial_metadata_done:
        await stream.send_initial_metadata()
    body = message.SerializeToString()
    data = _HEADER.pack(False, len(body)) + body
    own = stream._stream
    h2, stream_id = own._h2_connection, own.id
    if (
        own.connection.write_ready.is_set()
        and stream_id in h2.streams
        and _fits(h2, stream_id, data)
    ):
        _data_frame(h2, stream_id, data)
        own._transport.write(h2.data_to_send())
    else:
        await own.send_data(data)
    stream._send_message_done = True


async def _lean_unary(
    handler: Callable[[Any], Awaitable[None]],
    stream: Any,
    headers: list[tuple[str, str]],
    recv_type: Any,
    release_stream: Callable[[], Any],
    tasks: Callable[[], dict[Any, Any]],
) -> None:
    call = UnaryStream(stream, headers, recv_type)
    try:
        try:
            await handler(call)
        except GRPCError as error:
            await call.finish(error)
        except Exception as error:
            log.error("handler failed", exc_info=error)
            await call.finish(error)
        else:
            await call.finish(None)
    except StreamClosedError:
        pass  # the caller reset the call
    finally:
        release_stream()
        tasks().pop(stream, None)


class _Buffer:
    """grpclib's ``Buffer``, for every call: the caller's DATA as it arrives, each chunk
    acknowledged (its flow control credit returned) once a read reaches it, as grpclib's own
    does, so a caller can send no more than the relay reads. grpclib's makes an
    ``asyncio.Queue`` per call and goes through it for every read; this one waits on a future
    only when a read finds too little (``SendStream`` ~3 % a push, bench/RESULTS.md). Its
    chunks sit in lists: a request is one chunk or a few, and a deque's first block alone is
    ~0.6 KiB, held for as long as the call (bench/RESULTS.md).
    """

    __slots__ = ("_connection", "_eof", "_pending", "_read", "_size", "_stream_id", "_waiter")

    def __init__(self, connection: ProtocolConnection, stream_id: int) -> None:
        self._connection = connection  # acknowledges what was read (connection.ack)
        self._stream_id = stream_id
        self._pending: list[tuple[bytes, int]] = []  # unacked
        self._read: list[bytes] = []  # acked, not yet read
        self._size = 0  # bytes in _read
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None

    def add(self, data: bytes, ack_size: int) -> None:
        self._pending.append((data, ack_size))
        self._wake()

    def eof(self) -> None:
        self._eof = True
        self._wake()

    def unacked_size(self) -> int:
        return sum(ack_size for _, ack_size in self._pending)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self, size: int) -> bytes:
        """``size`` bytes; b"" once the caller has ended the stream and none are left."""
        while True:
            while self._size < size and self._pending:
                data, ack_size = self._pending.pop(0)
                if data:
                    self._read.append(data)
                    self._size += len(data)
                if ack_size:
                    self._connection.ack(self._stream_id, ack_size)
            if self._size >= size or (self._eof and not self._pending):
                break
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if not self._size or not size:
            return b""
        if self._size < size:  # grpclib's Buffer raises the same
            raise AssertionError("Received less data than expected")
        self._size -= size
        first = self._read[0]
        if len(first) == size:
            return self._read.pop(0)
        if len(first) > size:
            self._read[0] = first[size:]
            return first[:size]
        chunks = []
        while size:
            chunk = self._read.pop(0)
            if len(chunk) > size:
                self._read.insert(0, chunk[size:])
                chunk = chunk[:size]
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)


class _Flag:
    """A stream's ``window_updated`` (and the events grpclib sets on a client's streams): an
    ``asyncio.Event`` made only once something waits on it. grpclib sets ``window_updated`` on
    every stream at each connection window update; only an answer larger than the caller's
    window ever waits (after a ``clear()``, so a ``set()`` before that needs no record)."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None

    def set(self) -> None:
        if self._event is not None:
            self._event.set()

    def clear(self) -> None:
        if self._event is not None:
            self._event.clear()

    def is_set(self) -> bool:
        return self._event is not None and self._event.is_set()

    async def wait(self) -> None:
        if self._event is None:
            self._event = asyncio.Event()
        await self._event.wait()


class _LeanStream(ProtocolStream):
    """grpclib's protocol ``Stream`` for a lean unary call, made without its ``Buffer`` and
    three ``asyncio.Event`` (~4 % of a call, bench/RESULTS.md); grpclib's event processing and
    its ``send_*`` methods work on it unchanged."""

    def __init__(self, connection: ProtocolConnection, stream_id: int) -> None:
        self.connection = connection
        self._h2_connection = connection._connection
        self._transport = connection._transport
        self.wrapper = None
        self.id = stream_id
        buffer: Any = _Buffer(connection, stream_id)
        self.buffer = buffer
        connection.streams_started += 1
        self.created = connection.last_stream_created = time.monotonic()
        flag: Any = _Flag()
        self.window_updated = self.headers_received = self.trailers_received = flag


# Header fields whose values repeat from call to call (never a credential, nor grpc-timeout):
# their decoded pairs are kept and shared by every call that carries them.
_REPEATED = frozenset(
    {
        b":method",
        b":scheme",
        b":path",
        b":authority",
        b"content-type",
        b"te",
        b"user-agent",
        b"grpc-accept-encoding",
        b"grpc-encoding",
        b"accept-encoding",
    }
)
_DECODED: dict[tuple[bytes, bytes], tuple[str, str]] = {}
_DECODED_MAX = 1024  # pairs; beyond it (callers sending ever new values) nothing more is kept


def _decoded(raw: Any) -> list[tuple[str, str]]:
    """A request's headers as h2 hands them over (bytes, see _Server), decoded once as plain
    tuples (h2's own decoding made a second ``HeaderTuple`` of each); the repeated ones are
    looked up rather than decoded, and held once per process rather than once per call in
    flight (~1.6 KiB a unary call, bench/RESULTS.md)."""
    headers = []
    for header in raw:
        pair = _DECODED.get(header)
        if pair is None:
            name, value = header
            pair = (name.decode("ascii"), value.decode("ascii"))
            if name in _REPEATED and len(_DECODED) < _DECODED_MAX:
                _DECODED[bytes(name), bytes(value)] = pair
        headers.append(pair)
    return headers


class _Handler(_GrpclibHandler):
    """grpclib's per-connection request handler; calls to a path in ``lean`` whose headers are
    plain gRPC (POST, ``application/grpc`` or ``+proto``, ``te: trailers``) take
    :func:`_lean_unary`, the rest grpclib's own path (with its answers to anything else).

    It takes each new call from grpclib's event processor (:meth:`request_received`, in place of
    the processor's own), so that a lean call's stream is a :class:`_LeanStream`.
    """

    def __init__(self, *args: Any, lean: Mapping[str, Any]) -> None:
        super().__init__(*args)
        self._lean = lean

    def request_received(self, processor: EventsProcessor, event: RequestReceived) -> None:
        headers = _decoded(event.headers)
        method = content = te = path = encoding = ""
        for name, value in headers:
            if name == ":path":
                path = value
            elif name == "grpc-encoding":
                encoding = value
            elif name == ":method":
                method = value
            elif name == "content-type":
                content = value
            elif name == "te":
                te = value
        lean = self._lean.get(path)
        stream: Any
        if (
            lean is not None
            and method == "POST"
            and te == "trailers"
            and content in ("application/grpc", "application/grpc+proto")
        ):
            stream = _LeanStream(processor.connection, event.stream_id)
        else:
            lean = None
            stream = processor.connection.create_stream(stream_id=event.stream_id)
            stream.buffer = _Buffer(processor.connection, event.stream_id)
        if encoding:
            stream.grpc_encoding = encoding  # for messages(): grpclib keeps no grpc- header
        release_stream = processor.register(stream)
        if lean is None:
            self.accept(stream, headers, release_stream)
            return
        # The call's task leaves the handler's table as it ends (grpclib's own path instead
        # walks the whole table every ten calls for the tasks that are done).
        self._tasks[stream] = self.loop.create_task(
            _lean_unary(lean.func, stream, headers, lean.request_type, release_stream, self._table)
        )

    def _table(self) -> dict[Any, Any]:
        return self._tasks  # grpclib replaces the dict as it collects: read it at the end

    def cancel(self, stream: Any) -> None:
        task = self._tasks.pop(stream, None)  # None: a lean call that has just ended
        if task is not None:
            task.cancel()
            self._cancelled.add(task)


# --- the listener -------------------------------------------------------------------------------

# GOAWAY, NO_ERROR, last stream 2^31-1: "stop opening streams here" (RFC 9113 §6.8), written
# beside h2's own state (which would refuse every frame after a GOAWAY of its own).
_GOAWAY = _frame_head(7, 0, 8, 0) + struct.pack(">Ii", 0x7FFFFFFF, 0)


class _Connection(H2Connection):
    """h2's connection, counting the caller's open streams less often, and remembering fewer
    closed ones.

    h2 counts them (and forgets closed ones) by walking every stream it holds, for each new
    stream a caller opens: with 64 unary calls in flight that walk was ~5 % of a call's CPU, and
    with thousands (a burst) it grew with their square. Below the limit, the streams it holds
    are an upper bound of the open ones, which is all the check needs; the full walk runs every
    :data:`_WALK_EVERY` new streams, so closed streams are still forgotten.

    h2 then records how each forgotten stream closed, for its last 2^16 streams: 120-170 bytes
    each, so every long-lived caller's connection grew by 8-11 MiB of objects (~14 MiB of RSS)
    over its first 65,536 calls: the soak's early climb. The record only picks the answer to a
    frame on a closed stream, and the frames a well-behaved caller sends late (RST_STREAM,
    WINDOW_UPDATE, DATA) get the same answer without it: ignored, ignored, and RST_STREAM with
    the connection's window acknowledged. Past the record, only a caller's protocol error
    (HEADERS on a stream it closed) is answered differently, and with a connection error
    either way. So the relay keeps the last :attr:`MAX_CLOSED_STREAMS` (set on each connection
    by :meth:`_Server._protocol_factory`).
    """

    MAX_CLOSED_STREAMS = 1024
    _since_walk = 0

    @property
    def open_inbound_streams(self) -> int:
        held = len(self.streams)
        if held < self.local_settings.max_concurrent_streams and self._since_walk < _WALK_EVERY:
            self._since_walk += 1
            return held
        self._since_walk = 0
        return int(H2Connection.open_inbound_streams.fget(self))  # type: ignore[attr-defined]


_WALK_EVERY = 64


class _Server(Server):
    """grpclib's server, keeping its connections (for GOAWAY and closing)."""

    def __init__(self, services: list[Servable], max_streams: Callable[[], int]) -> None:
        super().__init__(services, status_details_codec=StatusDetails())
        self.max_streams = max_streams
        self.connections: set[H2Protocol] = set()
        # Unary methods of the services that ask for it (``__lean__``) take the lean path.
        self._lean = {
            path: handler
            for service in services
            for path in getattr(service, "__lean__", ())
            if (handler := self._mapping[path]).cardinality is Cardinality.UNARY_UNARY
        }
        self.none_left = asyncio.Event()
        self.none_left.set()
        # A request's headers reach _Handler.request_received as bytes, the only place a server
        # reads them.
        self._h2_config.header_encoding = None

    def _protocol_factory(self) -> H2Protocol:
        self.__gc_step__()
        handler = _Handler(
            self._mapping,
            self._codec,
            self._status_details_codec,
            self.__dispatch__,
            lean=self._lean,
        )
        self._handlers.add(handler)
        protocol = H2Protocol(handler, self._config, self._h2_config)
        made, lost = protocol.connection_made, protocol.connection_lost

        def connection_made(transport: Any) -> None:  # after TLS's handshake, if any
            made(cast(asyncio.Transport, _Corked(transport)))
            processor = protocol.processor
            processor.processors[RequestReceived] = functools.partial(  # type: ignore[assignment]
                handler.request_received, processor
            )
            connection = protocol.connection._connection
            connection.__class__ = _Connection  # made by grpclib as h2's
            connection._closed_streams = SizeLimitDict(size_limit=_Connection.MAX_CLOSED_STREAMS)
            # h2 allows a client 100 streams at once (see Listener).
            connection.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams()})
            protocol.connection.flush()
            self.connections.add(protocol)
            self.none_left.clear()

        def connection_lost(exc: BaseException | None) -> None:
            self.connections.discard(protocol)
            if not self.connections:
                self.none_left.set()
            lost(exc)

        protocol.connection_made = connection_made  # type: ignore[method-assign]
        protocol.connection_lost = connection_lost  # type: ignore[method-assign]
        return protocol


class _Corked:
    """A transport whose writes within one turn of the event loop leave together.

    grpclib writes each frame as it makes it: a unary answer's headers, message and trailers,
    a streamed answer and the window update for each request read, each one ``send()`` system
    call. Gathered, they leave in one at the end of the loop's turn (~3 and ~2 calls fewer a
    push, measured in bench/RESULTS.md); nothing waits longer than that turn.
    """

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self._transport.is_closing():
            self._transport.write(b"".join(pending) if len(pending) > 1 else pending[0])

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


async def _nothing() -> None:
    pass


class Listener:
    """One gRPC listening address serving ``services``; ``await start()``, ``port``, ``stop()``.

    ``idle()`` returns once no call that a graceful stop must wait for is running. A client may
    open ``cap()`` + :data:`STREAMS_OVER_CAP` streams at once on one connection (read as it
    connects; h2 would allow 100, grpcio's server set no limit).
    """

    def __init__(
        self,
        services: list[Servable],
        idle: Callable[[], Awaitable[None]] = _nothing,
        *,
        cap: Callable[[], int] = lambda: 0,
    ) -> None:
        self._server = _Server(services, lambda: cap() + STREAMS_OVER_CAP)
        self._idle = idle
        self.port = 0

    async def start(self, address: str, tls: ssl.SSLContext | None = None) -> int:
        host, port = split_address(address)
        await self._server.start(host, port, ssl=tls, reuse_address=True)
        listening = cast(asyncio.Server, self._server._server)
        self.port = int(listening.sockets[0].getsockname()[1])
        return self.port

    async def stop(self, grace: float) -> None:
        """Refuse new connections, ask clients to open no new streams, let the calls
        ``idle()`` waits for finish within ``grace``, then cancel every call and close."""
        server = self._server
        if server._server is None:
            return
        server._server.close()
        for protocol in list(server.connections):
            if not protocol.connection.is_closing():
                protocol.connection.flush()
                protocol.connection._transport.write(_GOAWAY)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle(), grace)
        server.close()  # cancels the calls still running
        await server.wait_closed()
        for protocol in list(server.connections):
            protocol.connection._transport.close()
        with contextlib.suppress(TimeoutError):  # for the last frames and TLS's close_notify
            await asyncio.wait_for(server.none_left.wait(), 1.0)
        for protocol in list(server.connections):
            protocol.connection._transport.abort()


def split_address(address: str) -> tuple[str | None, int]:
    """``host:port`` as grpcio takes it: ``[::]`` and ``0.0.0.0`` bind every address of their
    family, ``[::]`` both families (grpcio's dual-stack listener)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit() or not host:
        raise ValueError(f"not a host:port address: {address!r}")
    return (None if host == "::" else host), int(port)
