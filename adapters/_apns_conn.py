"""HTTP/2 connections to APNs: aioapns 4.0's protocol and pool, subclassed to fix their defects.

``adapters/apns.py`` explains each aioapns defect and its fix; this module holds the machinery:

- :class:`ApnsProtocol` (an aioapns ``APNsTLSClientProtocol``): per-request state keyed by stream
  id and removed however the stream ends, received DATA acknowledged, bodies reassembled across
  frames, outbound DATA respecting flow control, PING when idle instead of closing.

The pool that hands out their stream slots, and the CONNECT tunnel, are in
``adapters/_apns_pool.py``.

Nothing here sees a push's content except as opaque header values and body bytes, and nothing
here logs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from aioapns.common import NotificationRequest, NotificationResult
from aioapns.connection import APNsTLSClientProtocol
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError

if TYPE_CHECKING:  # the pool imports this module; the protocol only names the pool's type
    from adapters._apns_pool import FairPool

logger = logging.getLogger(__name__)

_MAX_ERROR_BODY = 16 * 1024  # APNs error bodies are tens of bytes; keep no more than this


class ConnectFailed(Exception):
    """No connection to APNs could be opened (refused, TLS, proxy, timeout, pool closed)."""


@dataclass(slots=True)
class ApnsResponse:
    """APNs's answer to one request; ``status`` 0 means there was none and ``reason`` says why."""

    status: int
    reason: str = ""
    apns_id: str = ""
    timestamp_ms: int = 0
    retry_after: int | None = None
    connection: ApnsProtocol | None = None


class _Stream:
    """One request in flight: what its caller waits on, and what has arrived so far."""

    __slots__ = ("body", "future", "headers", "unsent")

    def __init__(self, future: asyncio.Future[ApnsResponse], unsent: bytes) -> None:
        self.future = future
        self.unsent = unsent
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""


class _H2Connection(H2Connection):
    # h2 remembers how each closed stream ended (to tolerate frames racing a RST_STREAM) in a
    # 65,536-entry dict per connection: megabytes that look like a leak. A few times the
    # connection's stream limit is plenty.
    MAX_CLOSED_STREAMS = 4096


class ApnsProtocol(APNsTLSClientProtocol):
    """One HTTP/2 connection to APNs, taking requests on stream slots reserved by its pool."""

    APNS_SERVER = "api.push.apple.com"
    APNS_PORT = 443

    def __init__(self, pool: FairPool) -> None:
        super().__init__(pool.apns_topic or "", pool.loop, None, None)
        self.conn = _H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.pool = pool
        self.in_flight: dict[int, _Stream] = {}
        self.reserved = 0  # slots handed out: streams in flight plus grants not yet used
        self.max_streams = 0  # none until the server's first SETTINGS frame
        self.settled: asyncio.Future[None] = pool.loop.create_future()
        self.closed: asyncio.Future[None] = pool.loop.create_future()
        self.closing = False
        self.retiring = False
        self.warm = False  # a stream has ended: the server's real stream limit is known
        self.close_reason = ""
        self.pings_acked = 0
        self._blocked: dict[int, _Stream] = {}
        self._last_received = pool.loop.time()
        self._ping_due = False
        self._idle_timer: asyncio.TimerHandle | None = None

    @property
    def has_room(self) -> bool:
        return not (self.closing or self.retiring) and self.reserved < self.max_streams

    # -- sending ---------------------------------------------------------------------------

    async def send_notification(self, request: NotificationRequest) -> NotificationResult:
        """aioapns's entry point, which has the defects fixed here: use :meth:`send_request`."""
        raise NotImplementedError("ApnsProtocol.send_request replaces send_notification")

    async def send_request(
        self, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> ApnsResponse:
        """Send one request on a slot reserved by the pool; the slot is freed however it ends."""
        stream_id, stream = self._start(headers, body)
        if stream is None:
            return ApnsResponse(0, self.close_reason or "ConnectionLost", connection=self)
        try:
            return await stream.future
        finally:
            if self.in_flight.get(stream_id) is stream:  # cancelled: the caller gave up
                self._abandon(stream_id)

    def _start(
        self, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> tuple[int, _Stream | None]:
        if self.closing:
            self._release()
            return 0, None
        try:
            stream_id = self.conn.get_next_available_stream_id()
            self.conn.send_headers(stream_id, headers, end_stream=not body)
        except ProtocolError:  # stream ids exhausted, or the connection is going away
            self.retire()
            self._release()
            return 0, None
        stream = _Stream(self.loop.create_future(), body)
        self.in_flight[stream_id] = stream
        self._send_body(stream_id, stream)
        self.flush()
        return stream_id, stream

    def _send_body(self, stream_id: int, stream: _Stream) -> None:
        while stream.unsent:
            size = min(
                self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size
            )
            if size <= 0:  # wait for the server's WINDOW_UPDATE
                self._blocked[stream_id] = stream
                return
            chunk, stream.unsent = stream.unsent[:size], stream.unsent[size:]
            self.conn.send_data(stream_id, chunk, end_stream=not stream.unsent)
        self._blocked.pop(stream_id, None)

    def _abandon(self, stream_id: int) -> None:
        self.in_flight.pop(stream_id, None)
        self._blocked.pop(stream_id, None)
        if not self.closing:
            with contextlib.suppress(ProtocolError):
                self.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
            self.flush()
        self._release()

    def _release(self) -> None:
        self.reserved -= 1
        self.warm = True
        if self.retiring and self.reserved <= 0:
            self.close()
        self.pool.dispatch()

    def flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            data = self.conn.data_to_send()
            if data:
                self.transport.write(data)

    # -- receiving -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._last_received = self.loop.time()
        try:
            events = self.conn.receive_data(data)
        except ProtocolError:  # h2 has queued a GOAWAY; send it and give up the connection
            self.flush()
            self.close("ProtocolError")
            return
        for event in events:
            handler = _HANDLERS.get(type(event))
            if handler is not None:
                handler(self, event)
        self.flush()

    def _on_response(self, event: ResponseReceived) -> None:
        stream = self.in_flight.get(event.stream_id)
        if stream is not None and event.headers is not None:
            stream.headers = event.headers

    def _on_data(self, event: DataReceived) -> None:
        # aioapns never did this: its receive window shrank until error responses stalled.
        self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        stream = self.in_flight.get(event.stream_id)
        if stream is not None and event.data and len(stream.body) < _MAX_ERROR_BODY:
            stream.body += event.data

    def _on_stream_ended(self, event: StreamEnded) -> None:
        stream = self.in_flight.pop(event.stream_id, None)
        if stream is not None:
            _resolve(stream, _parse_response(stream, self))
            self._release()

    def _on_stream_reset(self, event: StreamReset) -> None:
        stream = self.in_flight.pop(event.stream_id, None)
        self._blocked.pop(event.stream_id, None)
        if stream is not None:
            _resolve(stream, ApnsResponse(0, "StreamReset", connection=self))
            self._release()

    def _on_settings(self, event: RemoteSettingsChanged) -> None:
        remote = self.conn.remote_settings.max_concurrent_streams
        self.max_streams = min(remote, self.pool.max_streams)
        if not self.settled.done():
            self.settled.set_result(None)
        self.pool.dispatch()

    def _on_window_updated(self, event: WindowUpdated) -> None:
        for stream_id, stream in list(self._blocked.items()):
            self._send_body(stream_id, stream)

    def _on_goaway(self, event: ConnectionTerminated) -> None:
        # h2 accepts no frame after GOAWAY, so streams still open cannot complete here.
        self.close(_goaway_reason(event.additional_data))

    def _on_ping_ack(self, event: PingAckReceived) -> None:
        self._ping_due = False
        self.pings_acked += 1

    # -- lifecycle -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not aioapns's: that one arms a timer that closes the connection after 10 s idle.
        self.transport = cast(asyncio.Transport, transport)
        self.conn.initiate_connection()
        self.flush()
        self._arm_idle_timer()

    def refresh_inactivity_timer(self) -> None:
        """Disabled: Apple asks providers to keep connections open for hours (PING instead)."""

    def retire(self) -> None:
        """Take no more streams; close once those in flight have ended."""
        self.retiring = True
        self.pool.discard_connection(self)
        if self.reserved <= 0:
            self.close()

    def close(self, reason: str = "") -> None:
        """Fail the streams in flight (``reason``) and close the connection."""
        if self.closing:
            return
        self._shutdown(reason or "ConnectionClosed")
        with contextlib.suppress(ProtocolError):
            self.conn.close_connection()
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._shutdown("ConnectionLost")
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)

    def _shutdown(self, reason: str) -> None:
        if not self.closing:
            self.closing = True
            self.close_reason = reason
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if not self.settled.done():
            self.settled.set_result(None)
        self.pool.discard_connection(self)
        streams, self.in_flight = self.in_flight, {}
        self._blocked.clear()
        for stream in streams.values():
            _resolve(stream, ApnsResponse(0, self.close_reason, connection=self))
            self._release()

    def _arm_idle_timer(self) -> None:
        self._idle_timer = self.loop.call_later(self.pool.idle_ping_seconds, self._on_idle)

    def _on_idle(self) -> None:
        if self._ping_due:  # the last PING went unanswered for a whole period: dead peer
            self.close("PingTimeout")
            return
        if self.loop.time() - self._last_received >= self.pool.idle_ping_seconds:
            self.conn.ping(b"\0" * 8)
            self._ping_due = True
            self.flush()
        self._arm_idle_timer()


_HANDLERS: dict[type[Any], Callable[[ApnsProtocol, Any], None]] = {
    ResponseReceived: ApnsProtocol._on_response,
    DataReceived: ApnsProtocol._on_data,
    StreamEnded: ApnsProtocol._on_stream_ended,
    StreamReset: ApnsProtocol._on_stream_reset,
    RemoteSettingsChanged: ApnsProtocol._on_settings,
    WindowUpdated: ApnsProtocol._on_window_updated,
    ConnectionTerminated: ApnsProtocol._on_goaway,
    PingAckReceived: ApnsProtocol._on_ping_ack,
}


def _resolve(stream: _Stream, response: ApnsResponse) -> None:
    if not stream.future.done():  # already cancelled when the caller gave up
        stream.future.set_result(response)


def _parse_response(stream: _Stream, connection: ApnsProtocol) -> ApnsResponse:
    response = ApnsResponse(0, "InvalidResponse", connection=connection)
    for name, value in stream.headers:
        if name == b":status":
            response.status = int(value) if value.isdigit() else 0
        elif name == b"apns-id":
            response.apns_id = value.decode("ascii", "replace")
        elif name == b"retry-after" and value.isdigit():
            response.retry_after = int(value)
    if response.status:
        response.reason, response.timestamp_ms = _parse_error_body(stream.body)
    return response


def _parse_error_body(body: bytes) -> tuple[str, int]:
    """``reason`` and ``timestamp`` (ms) from an APNs error body; empty on success."""
    if not body:
        return "", 0
    try:
        data = json.loads(body)
    except ValueError:
        return "", 0
    if not isinstance(data, dict):
        return "", 0
    reason, timestamp = data.get("reason"), data.get("timestamp")
    reason = reason if isinstance(reason, str) else ""
    timestamp = int(timestamp) if isinstance(timestamp, int | float) else 0
    return reason, timestamp


def _goaway_reason(data: bytes | None) -> str:
    """The reason APNs puts in a GOAWAY's debug data (``{"reason": "Shutdown"}``)."""
    reason, _ = _parse_error_body(data or b"")
    return reason or "GoAway"


def protocol_class(host: str, port: int) -> type[ApnsProtocol]:
    """An :class:`ApnsProtocol` aimed at ``host:port``, the way aioapns picks its host."""
    attrs = {"APNS_SERVER": host, "APNS_PORT": port}
    return cast(type[ApnsProtocol], type(f"ApnsProtocol_{host}_{port}", (ApnsProtocol,), attrs))
