"""A small, strict HTTP/2 server (asyncio + h2) that the fake providers are built on.

One :class:`H2Server` listens on loopback (TLS with ALPN ``h2``, or cleartext h2c when no
``ssl_context`` is given) and calls an async handler once per complete request::

    async def handler(request: Request) -> Response: ...

    async with H2Server(handler, pki.server_context()) as server:
        ...  # server.url, server.port

It behaves like a real HTTP/2 peer where client bugs show up:

- **Flow control is respected both ways.** Received DATA is acknowledged as it arrives; response
  bodies are sent only as far as the client's stream and connection windows allow, and otherwise
  wait for its WINDOW_UPDATE. Windows are never enlarged on the client's behalf, so a client that
  never acknowledges DATA stalls, as it would against APNs. A DATA frame waits until the window
  holds all of it (``fill_window=True`` splits it to fill the window instead).
- ``SETTINGS_MAX_CONCURRENT_STREAMS`` is whatever the fake sets (per connection, changeable), and
  h2 enforces it once the client has acknowledged it.
- Client RST_STREAM cancels that request's handler; a lost connection cancels all of its handlers.

Faults: a handler raises :class:`DropConnection` to cut the TCP connection without answering,
awaits :meth:`Faults.hold` for latency and stalls, and :meth:`H2Server.goaway` ends every
connection with a GOAWAY frame carrying debug data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from cryptography import x509

log = logging.getLogger(__name__)

# Generous for header blocks; APNs requests are a few hundred bytes.
_MAX_HEADER_LIST_BYTES = 64 * 1024
# How long stop() lets clients finish the TLS close handshake before cutting connections.
_DEFAULT_GRACE_SECONDS = 0.25


class DropConnection(Exception):
    """Raised by a handler: abort the TCP connection at once, answering nothing."""


@dataclass(frozen=True, slots=True)
class Response:
    """What a handler answers: ``:status``, then headers, then an optional body."""

    status: int
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""


@dataclass(slots=True)
class Request:
    """One complete request as received.

    Attributes:
        method: the ``:method`` pseudo-header ("" when absent).
        path: the ``:path`` pseudo-header ("" when absent).
        headers: every header in arrival order, pseudo-headers included, so repeats are visible.
        body: the request body, all DATA frames joined.
        stream_id: the HTTP/2 stream id.
        connection: the connection it arrived on (TLS peer certificate, per-connection state).
    """

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    stream_id: int
    connection: Connection

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower-case), or None."""
        return next((value for key, value in self.headers if key == name), None)


Handler = Callable[[Request], Awaitable[Response]]


class Faults:
    """Latency, stalls and connection drops, keyed by device token; shared by the fakes.

    A fake's handler calls :meth:`take_drop` when a request arrives (raising
    :class:`DropConnection` when it says so) and awaits :meth:`hold` just before answering.
    """

    def __init__(self) -> None:
        self._delays: dict[str | None, float] = {}
        self._stalled: set[str] = set()
        self._drops = 0
        self._release = asyncio.Event()

    def delay(self, seconds: float, key: str | None = None) -> None:
        """Wait ``seconds`` before answering requests for ``key`` (all requests when None)."""
        if seconds > 0:
            self._delays[key] = seconds
        else:
            self._delays.pop(key, None)

    def stall(self, key: str) -> None:
        """Never answer requests for ``key`` (until :meth:`clear`)."""
        self._stalled.add(key)

    def drop_next(self, count: int = 1) -> None:
        """Cut the connection of each of the next ``count`` requests, whatever their key."""
        self._drops += count

    def clear(self) -> None:
        """Remove every fault; requests stalled so far are released and answered."""
        self._delays.clear()
        self._stalled.clear()
        self._drops = 0
        self._release.set()
        self._release = asyncio.Event()

    def take_drop(self) -> bool:
        """Whether the request arriving now is to be dropped (consumes one pending drop)."""
        if self._drops <= 0:
            return False
        self._drops -= 1
        return True

    async def hold(self, key: str) -> None:
        """Apply the latency and stall configured for ``key`` before its answer goes out."""
        seconds = self._delays.get(key, self._delays.get(None, 0.0))
        if seconds:
            await asyncio.sleep(seconds)
        if key in self._stalled:
            await self._release.wait()


SettingsFactory = Callable[["Connection"], Mapping[int, int]]


@dataclass(slots=True)
class _Stream:
    headers: list[tuple[str, str]]
    body: bytearray = field(default_factory=bytearray)


def _decode_headers(raw: Sequence[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    # surrogateescape keeps arbitrary bytes round-trippable while exposing plain str to handlers.
    return [
        (bytes(k).decode("utf-8", "surrogateescape"), bytes(v).decode("utf-8", "surrogateescape"))
        for k, v in raw
    ]


class Connection(asyncio.Protocol):
    """One client connection: the h2 state machine, its streams and their handler tasks.

    Attributes:
        serial: 1 for the server's first connection, 2 for the next, ...
        peer_cert: the client's TLS certificate, when it presented one (verified by the context).
        alpn_protocol: the negotiated ALPN protocol, or None.
        state: free per-connection storage for the handler (auth state and the like).
    """

    def __init__(self, server: H2Server) -> None:
        self.serial = 0
        self.peer_cert: x509.Certificate | None = None
        self.alpn_protocol: str | None = None
        self.state: dict[str, Any] = {}
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self._streams: dict[int, _Stream] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._window_opened = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if self._server.closing:
            transport.abort()  # the TLS handshake finished after stop() began
            return
        self._read_tls_details(transport)
        self._server.register(self)
        # Leave MAX_CONCURRENT_STREAMS out of the preface (unlimited, as RFC 9113 starts) and
        # announce the fake's value in a second SETTINGS frame: h2 then enforces it only once the
        # client has acknowledged it, so a client racing its first requests is not punished.
        self._h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: _MAX_HEADER_LIST_BYTES},
        )
        self._h2.initiate_connection()
        settings = self._server.initial_settings(self)
        if settings:
            self._h2.update_settings(dict(settings))
        self._flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            # h2 has queued a GOAWAY naming the error: send it, then hang up.
            self._flush()
            self._close_transport()
            return
        for event in events:
            self._dispatch(event)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._window_opened.set()
        self._writable.set()
        self._server.unregister(self)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- controls for handlers and the server -----------------------------------------------

    def update_settings(self, settings: Mapping[int, int]) -> None:
        """Send a SETTINGS frame (e.g. raise MAX_CONCURRENT_STREAMS after authentication)."""
        if self._open():
            self._h2.update_settings(dict(settings))
            self._flush()

    def goaway(self, error_code: int = 0, debug_data: bytes = b"") -> None:
        """Send GOAWAY (last stream = highest seen), cancel in-flight requests and close."""
        self._cancel_tasks()
        if self._open():
            self._h2.close_connection(error_code, additional_data=debug_data or None)
            self._flush()
        self._close_transport()

    def abort(self) -> None:
        """Cut the TCP connection without any HTTP/2 or TLS goodbye."""
        self._cancel_tasks()
        if self._transport is not None:
            self._transport.abort()

    # -- internals ----------------------------------------------------------------------------

    def _read_tls_details(self, transport: asyncio.Transport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        if not isinstance(ssl_object, ssl.SSLObject):
            return
        self.alpn_protocol = ssl_object.selected_alpn_protocol()
        der = ssl_object.getpeercert(binary_form=True)
        if der:
            self.peer_cert = x509.load_der_x509_certificate(der)

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._streams[event.stream_id] = _Stream(_decode_headers(event.headers or []))
        elif isinstance(event, h2.events.DataReceived):
            self._receive_data(event)
        elif isinstance(event, h2.events.StreamEnded):
            self._start_request(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            self._streams.pop(event.stream_id, None)
            task = self._tasks.pop(event.stream_id, None)
            if task is not None:
                task.cancel()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._wake_senders()
        elif isinstance(event, h2.events.ConnectionTerminated):
            # The client said GOAWAY: h2 allows no further frames, so nothing more can be answered.
            self._cancel_tasks()
            self._close_transport()

    def _receive_data(self, event: h2.events.DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None and event.data:
            stream.body += event.data
        # Hand the window back at once: the fake buffers bodies itself and never stalls a sender.
        self._h2.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)

    def _start_request(self, stream_id: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        headers = stream.headers
        request = Request(
            method=next((v for k, v in headers if k == ":method"), ""),
            path=next((v for k, v in headers if k == ":path"), ""),
            headers=headers,
            body=bytes(stream.body),
            stream_id=stream_id,
            connection=self,
        )
        task = asyncio.get_running_loop().create_task(self._serve(request))
        self._tasks[stream_id] = task
        self._server.track(task)

    async def _serve(self, request: Request) -> None:
        try:
            response = await self._server.handler(request)
            await self._send(request.stream_id, response)
        except DropConnection:
            self.abort()
        except h2.exceptions.ProtocolError:
            pass  # the client reset the stream or the connection is gone: nobody to answer
        except Exception:
            log.exception("fake server handler failed on stream %d", request.stream_id)
            self._reset(request.stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
        finally:
            self._tasks.pop(request.stream_id, None)

    async def _send(self, stream_id: int, response: Response) -> None:
        headers = [(":status", str(response.status)), *response.headers]
        self._h2.send_headers(stream_id, headers, end_stream=not response.body)
        self._flush()
        body = response.body
        while body:
            size = self._sendable(stream_id, len(body))
            if size <= 0:
                await self._window_change()
                continue
            self._h2.send_data(stream_id, body[:size], end_stream=size == len(body))
            body = body[size:]
            self._flush()
            await self._writable.wait()

    def _sendable(self, stream_id: int, remaining: int) -> int:
        """How many body bytes to put in the next DATA frame now (0: wait for the window)."""
        frame = min(remaining, self._h2.max_outbound_frame_size)
        window = self._h2.local_flow_control_window(stream_id)
        if self._server.fill_window:
            return min(frame, window)
        # Send whole frames: a short body (every APNs answer) is never split across frames,
        # so a client that starves the window sees a clean stall. Split only when the client's
        # window can never hold a whole frame, lest we wait forever.
        most_granted = min(self._h2.remote_settings.initial_window_size, 65535)
        return frame if window >= frame else (window if window >= most_granted else 0)

    async def _window_change(self) -> None:
        # Only the client's WINDOW_UPDATE (or a larger INITIAL_WINDOW_SIZE) reopens the window;
        # a lost connection cancels this task instead.
        await self._window_opened.wait()

    def _wake_senders(self) -> None:
        self._window_opened.set()
        self._window_opened = asyncio.Event()

    def _reset(self, stream_id: int, code: h2.errors.ErrorCodes) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.reset_stream(stream_id, code)
            self._flush()

    def _cancel_tasks(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        self._tasks.clear()

    def _open(self) -> bool:
        return (
            self._transport is not None
            and not self._transport.is_closing()
            and self._h2.state_machine.state != h2.connection.ConnectionState.CLOSED
        )

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _close_transport(self) -> None:
        if self._transport is not None:
            self._transport.close()


class H2Server:
    """An HTTP/2 server on 127.0.0.1 (port chosen by the OS) calling ``handler`` per request.

    Args:
        handler: ``async (Request) -> Response``; may raise :class:`DropConnection`.
        ssl_context: a server context offering ALPN ``h2``; None serves cleartext h2c.
        host: the loopback address to bind.
        initial_settings: per-connection SETTINGS to announce after the preface (e.g.
            ``{SettingCodes.MAX_CONCURRENT_STREAMS: 1}``), given the new connection.
        fill_window: send as much of a body as the client's window allows, splitting it across
            DATA frames; by default a frame waits until the window holds all of it (clients
            must cope with both; the default makes a starved window show up as a stall).
    """

    def __init__(
        self,
        handler: Handler,
        ssl_context: ssl.SSLContext | None = None,
        *,
        host: str = "127.0.0.1",
        initial_settings: SettingsFactory | None = None,
        fill_window: bool = False,
    ) -> None:
        self.handler = handler
        self.fill_window = fill_window
        self.host = host
        self.connections_opened = 0
        self.closing = False
        self._ssl_context = ssl_context
        self._settings_factory = initial_settings
        self._server: asyncio.Server | None = None
        self._connections: set[Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        """``https://127.0.0.1:<port>`` (``http://`` when serving h2c)."""
        scheme = "https" if self._ssl_context is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    @property
    def connections(self) -> list[Connection]:
        """The connections open right now, oldest first."""
        return sorted(self._connections, key=lambda c: c.serial)

    @property
    def active_requests(self) -> int:
        """Requests being handled or answered right now (delayed and stalled ones included)."""
        return len(self._tasks)

    async def start(self) -> None:
        """Bind and start accepting connections."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self),
            self.host,
            0,
            ssl=self._ssl_context,
            ssl_shutdown_timeout=5.0 if self._ssl_context else None,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self, grace_seconds: float = _DEFAULT_GRACE_SECONDS) -> None:
        """Stop listening, end every connection with GOAWAY and wait until all are closed."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        await self.goaway(grace_seconds=grace_seconds)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def goaway(
        self,
        error_code: int = 0,
        debug_data: bytes = b"",
        *,
        grace_seconds: float = _DEFAULT_GRACE_SECONDS,
    ) -> None:
        """Send GOAWAY on every open connection and close them; new connections are accepted.

        Returns once every connection is closed: clients get ``grace_seconds`` to complete the
        TLS close handshake, then their connections are cut.
        """
        connections = list(self._connections)
        for connection in connections:
            connection.goaway(error_code, debug_data)
        await self._wait_closed(connections, grace_seconds)

    async def _wait_closed(self, connections: list[Connection], grace_seconds: float) -> None:
        pending = [c.closed for c in connections if not c.closed.done()]
        if not pending:
            return
        _, still_open = await asyncio.wait(pending, timeout=grace_seconds)
        if still_open:
            for connection in connections:
                if not connection.closed.done():
                    connection.abort()
            await asyncio.wait(still_open)

    async def __aenter__(self) -> H2Server:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- called by connections ----------------------------------------------------------------

    def initial_settings(self, connection: Connection) -> Mapping[int, int]:
        """The SETTINGS a new connection announces after its preface."""
        return self._settings_factory(connection) if self._settings_factory else {}

    def register(self, connection: Connection) -> None:
        """Count and remember a connection whose (TLS) handshake is complete."""
        self.connections_opened += 1
        connection.serial = self.connections_opened
        self._connections.add(connection)

    def unregister(self, connection: Connection) -> None:
        """Forget a closed connection."""
        self._connections.discard(connection)

    def track(self, task: asyncio.Task[None]) -> None:
        """Remember a handler task until it finishes, so stop() can wait for it."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
