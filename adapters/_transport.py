"""The one HTTP/2 transport every adapter sends through: libcurl's multi interface on asyncio.

Why libcurl (pycurl): measured against a C sink (``bench/RESULTS.md``,
``shared/reference/http2-clients.md``), a push through libcurl + nghttp2 costs ~45 µs of CPU,
against ~300 µs through aioapns (pure-Python h2) and ~1,250 µs through httpx. Its C core also
does, once and for every provider, what the adapters used to do by hand: HPACK, flow control
(received DATA is always acknowledged, so error floods never stall a connection), honouring the
server's ``SETTINGS_MAX_CONCURRENT_STREAMS``, reconnecting after GOAWAY, resets and lost
connections, queueing transfers in arrival order when every connection is full, HTTP CONNECT
proxies and client certificates.

This module only drives it from the asyncio loop (``socket_action``: libcurl says which sockets
to watch and when to wake it; the loop calls it back) and turns a finished transfer into a
:class:`Response` or a :class:`TransportError`. Three things keep that cheap: when the loop is
busy, requests and answers are gathered for one call per window (:meth:`_Engine._window`); a
readable connection is read through one of its transfers, not all of them (:meth:`_Engine._read`);
idle handles no request needed are closed (:meth:`Transport._trim_idle`). It knows nothing of
any provider, and it never logs: URLs, headers and bodies carry tokens and content.

Lifecycle: build it inside the running loop, ``await transport.request(...)`` concurrently, then
``await transport.aclose()``. Cancelling a request removes its transfer at once: libcurl resets
the stream (RST_STREAM) and its slot is free for the next one.
"""

from __future__ import annotations

import asyncio
import math
import os
import ssl
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import certifi
import pycurl

__all__ = ["Response", "Transport", "TransportError", "TransportSettings", "check_settings"]

# Connections stay open while idle (Apple asks providers to keep them for hours); TCP keepalive
# finds a peer that vanished without closing. libcurl's own default closes them after 118 s.
_MAX_IDLE_SECONDS = 24 * 3600
_CONNECT_ERRORS = frozenset(
    {
        pycurl.E_COULDNT_RESOLVE_PROXY,
        pycurl.E_COULDNT_RESOLVE_HOST,
        pycurl.E_COULDNT_CONNECT,
        pycurl.E_SSL_CONNECT_ERROR,
        pycurl.E_PEER_FAILED_VERIFICATION,
        pycurl.E_SSL_CERTPROBLEM,
        pycurl.E_SSL_CACERT_BADFILE,
        getattr(pycurl, "E_PROXY", 97),
    }
)
_TRUNCATED = frozenset({pycurl.E_FILESIZE_EXCEEDED, pycurl.E_WRITE_ERROR})
_UPLOAD_BUFFER_BYTES = 16 * 1024
_MAX_IDLE_HANDLES = 128  # easy handles kept for reuse; more are closed when they finish
_LOAD_SAMPLE_SECONDS = 0.05  # how often the loop thread's busy fraction is measured
_IN = frozenset({pycurl.POLL_IN, pycurl.POLL_INOUT})
_OUT = frozenset({pycurl.POLL_OUT, pycurl.POLL_INOUT})


class TransportError(Exception):
    """No answer: ``reason`` is one word (``Timeout``, ``ConnectFailed``, ``ConnectionLost``,
    ``Closed``) and ``code`` libcurl's error number; neither holds a URL or any content."""

    def __init__(self, reason: str, code: int = 0) -> None:
        super().__init__(f"{reason} (curl {code})" if code else reason)
        self.reason = reason
        self.code = code


@dataclass(frozen=True, slots=True)
class TransportSettings:
    """How one app reaches its provider.

    Attributes:
        ca_pem: extra trust anchors (PEM), trusted beside the system's.
        cert_file: a PEM file with a client certificate and its key (APNs certificate auth).
        proxy: ``http://[user:pass@]host:port`` of an HTTP CONNECT proxy; "" for none (proxy
            variables in the environment are never used).
        max_connections: connections per host; transfers beyond them queue, oldest first.
        max_streams: streams per connection we open at most (the server's own limit, from its
            SETTINGS, lowers it).
        connect_timeout_seconds: TCP + proxy + TLS handshake.
        timeout_seconds: a whole request, a backstop (callers cancel at their own deadline).
        keepalive_seconds: idle time before TCP keepalive probes start.
        max_response_bytes: response bodies are cut here (provider error bodies are tiny).
        batch_window_seconds: when libcurl was driven less than this long ago, new requests
            and answers wait until this long after it, to be handled together (0 = never
            wait). The window opens only as far as the event loop is busy (``busy_fraction``).
        idle_handle_seconds: an idle easy handle no request took for this long is closed
            (each keeps its 16 KiB request buffer and ~3 KiB of state inside libcurl).
        busy_fraction: (closed, open): the share of the last ~50 ms the event loop's thread
            spent running (its CPU time over wall time) below which the window stays shut,
            and from which it is fully open; in between, it opens in proportion. An idle
            loop answers at once; a busy one gathers work to do it in fewer calls.
    """

    ca_pem: bytes = b""
    cert_file: str = ""
    proxy: str = ""
    max_connections: int = 10
    max_streams: int = 1000
    connect_timeout_seconds: float = 10.0
    timeout_seconds: float = 30.0
    keepalive_seconds: int = 60
    max_response_bytes: int = 16 * 1024
    batch_window_seconds: float = 0.003
    idle_handle_seconds: float = 10.0
    busy_fraction: tuple[float, float] = (0.6, 0.85)


class Response:
    """A provider's answer: status, header lines as received, and the (capped) body."""

    __slots__ = ("_body", "_lines", "connection", "generation", "status")

    def __init__(
        self, status: int, lines: list[bytes], body: list[bytes], connection: int, generation: int
    ) -> None:
        self.status = status
        self._lines = lines
        self._body = body
        self.connection = connection  # our side's port: which connection carried it
        self.generation = generation  # which set of connections (see Transport.retire)

    @property
    def body(self) -> bytes:
        return b"".join(self._body)

    def header(self, name: str) -> str | None:
        """The last value of header ``name`` (lower case) in the final response, or None."""
        prefix = name.encode("ascii") + b":"
        for line in reversed(self._lines):
            if line.startswith(b"HTTP/"):  # the final response's status line; a proxy's is older
                return None
            if line[: len(prefix)].lower() == prefix:
                return line[len(prefix) :].strip().decode("latin-1")
        return None


class _Pending(asyncio.Future[Response]):
    """A request's answer to come. Cancelled (its caller gave up), it takes its transfer out of
    libcurl at once, which resets the stream and frees the slot. It lets go of the transfer once
    settled: the two point at each other only while the request runs, so neither ever waits
    for the cyclic garbage collector."""

    __slots__ = ("engine", "transfer")

    def __init__(self, transfer: _Transfer, engine: _Engine) -> None:
        super().__init__(loop=engine.loop)
        self.transfer: _Transfer | None = transfer
        self.engine = engine

    def cancel(self, msg: object = None) -> bool:
        if not super().cancel(msg):
            return False
        transfer, self.transfer = self.transfer, None
        if transfer is not None and transfer.future is self and self.engine.stop(transfer):
            self.engine.release(transfer)
        return True


class _Transfer:
    """One easy handle, reused request after request, and what its current caller waits on."""

    __slots__ = ("body", "curl", "future", "lines")

    def __init__(self, curl: pycurl.Curl) -> None:
        self.curl = curl
        self.future: _Pending | None = None
        self.lines: list[bytes] = []
        self.body: list[bytes] = []
        self.reset()

    def begin(self, engine: _Engine) -> _Pending:
        self.future = _Pending(self, engine)
        return self.future

    def succeed(self, response: Response) -> None:
        future = self.future
        if future is not None and not future.done():
            future.set_result(response)
            future.transfer = None

    def fail(self, error: TransportError) -> None:
        future = self.future
        if future is not None and not future.done():
            future.set_exception(error)
            future.transfer = None

    def reset(self) -> None:
        # Fresh lists per request: a Response keeps the ones it was built from.
        self.future = None
        self.lines, self.body = [], []
        # pycurl holds the request body (the push's payload) until the option is set again: an
        # idle handle must not keep the last push it carried alive.
        self.curl.setopt(pycurl.POSTFIELDS, b"")
        self.curl.setopt(pycurl.HEADERFUNCTION, self.lines.append)
        self.curl.setopt(pycurl.WRITEFUNCTION, self.body.append)


class _Engine:
    """One libcurl multi handle (its connections) driven from the loop.

    A transport replaces its engine when told a provider retired its connections; the old one
    finishes what it carries and then closes, so no new request ever rides a retired connection.
    """

    def __init__(
        self,
        settings: TransportSettings,
        generation: int,
        release: Callable[[_Transfer], None],
    ) -> None:
        self.generation = generation
        self.release = release
        self.loop = asyncio.get_running_loop()
        self.multi = pycurl.CurlMulti()
        self.multi.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        self.multi.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)
        self.multi.setopt(pycurl.M_PIPELINING, pycurl.PIPE_MULTIPLEX)
        self.multi.setopt(pycurl.M_MAX_HOST_CONNECTIONS, settings.max_connections)
        self.multi.setopt(pycurl.M_MAX_CONCURRENT_STREAMS, settings.max_streams)
        self.active: dict[pycurl.Curl, _Transfer] = {}
        self.retired = False
        self.closed = False
        self._batch_seconds = settings.batch_window_seconds
        self._busy_shut, self._busy_open = settings.busy_fraction
        self._open = 0.0  # how far the window is open, 0..1
        self._sampled = self.loop.time()
        self._thread_cpu = time.thread_time()
        self._last_act = -math.inf  # loop time libcurl was last driven
        self._watched: dict[int, int] = {}  # fd -> the pycurl.POLL_* it is watched for
        self._paused: set[int] = set()  # watched for IN, but left to the next pump
        self._timer: asyncio.TimerHandle | None = None
        self._pump: asyncio.Handle | None = None
        self._kicked = False
        self._failures = 0  # transfers settled without an answer, ever

    def start(self, transfer: _Transfer) -> None:
        self.active[transfer.curl] = transfer
        self.multi.add_handle(transfer.curl)
        self._kick()

    def stop(self, transfer: _Transfer) -> bool:
        """Take a transfer out of libcurl (a stream in flight is reset); False if not here."""
        if self.active.pop(transfer.curl, None) is None:
            return False
        self.multi.remove_handle(transfer.curl)
        if self.retired and not self.active:
            self.close()
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for transfer in list(self.active.values()):
            transfer.fail(TransportError("Closed"))
            self.active.pop(transfer.curl)
            self.multi.remove_handle(transfer.curl)
            self.release(transfer)
        for handle in (self._timer, self._pump):
            if handle is not None:
                handle.cancel()
        self._paused.clear()
        for fd in list(self._watched):
            self._unwatch(fd)
        self.multi.close()

    # -- libcurl's callbacks (they must not call back into libcurl) -----------------------------

    def _on_socket(self, what: int, fd: int, _multi: object, _data: object) -> None:
        # Only what changed is (un)registered: libcurl flips between IN and INOUT around every
        # write, and the reader can stay registered through it.
        was = self._watched.get(fd, 0)
        if what == was:
            return
        wants_in, wants_out = what in _IN, what in _OUT
        if (was in _IN) != wants_in:
            if wants_in:
                self.loop.add_reader(fd, self._readable, fd)
            elif fd in self._paused:
                self._paused.discard(fd)  # its reader is off already
            else:
                self.loop.remove_reader(fd)
        if (was in _OUT) != wants_out:
            if wants_out:
                self.loop.add_writer(fd, self._act, fd, pycurl.CSELECT_OUT)
            else:
                self.loop.remove_writer(fd)
        if what == pycurl.POLL_REMOVE:
            self._watched.pop(fd, None)
        else:
            self._watched[fd] = what

    def _on_timer(self, timeout_ms: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if timeout_ms == 0:
            self._kick()
        elif timeout_ms > 0:
            self._timer = self.loop.call_later(timeout_ms / 1000, self._on_timeout)

    # -- driving libcurl from the loop ---------------------------------------------------------

    def _kick(self) -> None:
        if not self._kicked:
            self._kicked = True
            self._schedule_pump()

    def _window(self) -> float:
        """The batch window, open as far as the loop's thread has been busy lately.

        Below saturation a window only delays (at 500 pushes/s a 3 ms window added ~6 ms to
        every push for no CPU saved); at saturation it is what lets the loop keep up
        (bench/RESULTS.md). The measure is the loop thread's own CPU time: a loop waiting on
        I/O is not busy, whatever else the process does.
        """
        now = self.loop.time()
        if now - self._sampled >= _LOAD_SAMPLE_SECONDS:
            cpu = time.thread_time()
            busy = (cpu - self._thread_cpu) / (now - self._sampled)
            self._sampled, self._thread_cpu = now, cpu
            if busy >= self._busy_open:
                self._open = 1.0
            elif busy <= self._busy_shut:
                self._open = 0.0
            else:
                self._open = (busy - self._busy_shut) / (self._busy_open - self._busy_shut)
        return self._batch_seconds * self._open

    def _readable(self, fd: int) -> None:
        if self.loop.time() - self._last_act >= self._window():
            self._read([fd])
            return
        # Answers come faster than one per window: leave them to gather in the socket until
        # the pump reads them all at once (its reader is off meanwhile, or the loop would call
        # back at once again).
        self.loop.remove_reader(fd)
        self._paused.add(fd)
        self._schedule_pump()

    def _schedule_pump(self) -> None:
        """Drive libcurl now if it has been quiet for a window, else once the window is over.

        Every call into libcurl costs in proportion to all the transfers it carries, whatever
        the number of pushes it moves (bench/RESULTS.md): under load, one call per window for
        new requests and answers together carries many pushes instead of one or two each. A
        lone push after a quiet spell goes at once.
        """
        if self._pump is not None:
            return
        wake = self._last_act + self._window()
        if wake <= self.loop.time():
            self._pump = self.loop.call_soon(self._run_pump)
        else:
            self._pump = self.loop.call_at(wake, self._run_pump)

    def _run_pump(self) -> None:
        self._pump = None
        paused, self._paused = self._paused, set()
        waiting = [fd for fd in paused if self._watched.get(fd, 0) in _IN]
        for fd in waiting:
            self.loop.add_reader(fd, self._readable, fd)
        self._read(waiting)
        if self._kicked:
            self._on_timeout()

    def _read(self, fds: list[int]) -> None:
        """Read the connections behind ``fds`` (readable sockets), each through one transfer.

        Told that a socket is readable, libcurl runs every transfer on that connection, and each
        tries a read of its own: with hundreds waiting on a slow provider, every answer cost
        hundreds of runs and failed reads (1,000 in flight: ~1,100 µs a push, most of it in
        ``recv``). Woken instead (``pause(CONT)``, then a timeout action), one transfer on the
        connection reads all that came; the HTTP/2 layer wakes the streams that got data.
        The newest transfer is woken, as its own answer, which ends its reading, likely comes
        last; when it came before the rest, another one reads on. A connection without a
        transfer (idle), or one where a transfer failed (the connection may be gone: all its
        transfers must hear it at once), gets libcurl's own handling.
        """
        whole: list[int] = []
        for _ in range(len(self.active) + 1):
            readers = {}
            for fd in fds:
                curl = self._newest_on(fd)
                if curl is None:
                    whole.append(fd)
                    continue
                try:
                    curl.pause(pycurl.PAUSE_CONT)
                except pycurl.error:  # not on a connection after all
                    whole.append(fd)
                    continue
                readers[fd] = curl
            if not readers:
                break
            failures = self._failures
            self._kicked = False
            self._act(pycurl.SOCKET_TIMEOUT, 0)
            fds = [
                fd
                for fd, curl in readers.items()
                if curl not in self.active and self._watched.get(fd, 0) in _IN
            ]
            if self._failures != failures:
                whole += fds
                break
        for fd in whole:
            if self._watched.get(fd, 0) in _IN:  # still: reading one may have closed another
                self._act(fd, pycurl.CSELECT_IN)

    def _newest_on(self, fd: int) -> pycurl.Curl | None:
        for curl in reversed(self.active):
            if curl.getinfo(pycurl.ACTIVESOCKET) == fd:
                return curl
        return None

    def _on_timeout(self) -> None:
        self._kicked = False
        self._act(pycurl.SOCKET_TIMEOUT, 0)

    def _act(self, fd: int, events: int) -> None:
        if self.closed:
            return
        self._last_act = self.loop.time()
        self.multi.socket_action(fd, events)
        while True:
            queued, done, failed = self.multi.info_read()
            for curl in done:
                self._settle(curl, 0)
            for curl, code, _message in failed:  # the message may name the host: dropped
                self._settle(curl, code)
            # A retired engine closes itself once its last transfer settles: its multi handle
            # is gone, whatever else libcurl had queued (nothing: no transfer is left).
            if not queued or self.closed:
                return

    def _settle(self, curl: pycurl.Curl, code: int) -> None:
        transfer = self.active.get(curl)
        if transfer is None:
            return
        status = curl.getinfo(pycurl.RESPONSE_CODE) if code in _TRUNCATED or not code else 0
        if status:
            port = curl.getinfo(pycurl.LOCAL_PORT)
            transfer.succeed(Response(status, transfer.lines, transfer.body, port, self.generation))
        else:
            self._failures += 1
            transfer.fail(_error(code))
        self.stop(transfer)
        self.release(transfer)

    def _unwatch(self, fd: int) -> None:
        what = self._watched.pop(fd, 0)
        if what in _IN:
            self.loop.remove_reader(fd)
        if what in _OUT:
            self.loop.remove_writer(fd)


class Transport:
    """HTTP/2 over TLS to one app's provider(s), shared by every request of that app.

    Raises:
        ValueError: unusable settings (the message names the field, never a value).
    """

    def __init__(self, settings: TransportSettings) -> None:
        check_settings(settings)
        self._settings = settings
        self._engine = _Engine(settings, 1, self._release)
        self._draining: set[_Engine] = set()
        self._free: list[_Transfer] = []
        self._fewest_free = 0  # the fewest idle handles since the last trim
        self._trim = self._schedule_trim()
        self._closed = False
        self._trust = _trust_anchors(settings.ca_pem) if settings.ca_pem else b""
        self._verify_paths = ssl.get_default_verify_paths()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def in_flight(self) -> int:
        return len(self._engine.active) + sum(len(e.active) for e in self._draining)

    @property
    def generation(self) -> int:
        """Bumped by :meth:`retire`: requests from here on ride new connections."""
        return self._engine.generation

    def request(
        self, url: str, headers: Sequence[bytes], body: bytes, *, fresh_connection: bool = False
    ) -> asyncio.Future[Response]:
        """POST ``body`` to ``url`` (https) with ``headers`` (``b"name: value"`` lines); await
        the answer.

        A future, not a coroutine: no frame keeps the request's URL and headers while it is in
        flight (libcurl has copied them; pycurl holds the body until the transfer ends).
        Cancelling it resets the stream and frees its slot.

        Args:
            fresh_connection: open a new connection for this request instead of reusing one.

        Raises:
            TransportError: no answer (the reason says why); never holds the URL.
        """
        if self._closed:
            raise TransportError("Closed")
        transfer = self._free.pop() if self._free else _Transfer(self._new_curl())
        self._fewest_free = min(self._fewest_free, len(self._free))
        curl = transfer.curl
        curl.setopt(pycurl.URL, url)
        curl.setopt(pycurl.HTTPHEADER, headers)
        curl.setopt(pycurl.POSTFIELDS, body)
        curl.setopt(pycurl.FRESH_CONNECT, 1 if fresh_connection else 0)
        engine = self._engine
        future = transfer.begin(engine)
        engine.start(transfer)
        return future

    def retire(self, response: Response) -> None:
        """The provider said the connections behind ``response`` are done (GOAWAY-like
        answers): new requests open new connections; those in flight finish where they are."""
        engine = self._engine
        if self._closed or response.generation != engine.generation:
            return
        engine.retired = True
        self._engine = _Engine(self._settings, engine.generation + 1, self._release)
        if engine.active:
            self._draining.add(engine)
        else:
            engine.close()
        self._draining = {e for e in self._draining if not e.closed}

    async def aclose(self) -> None:
        """Fail what is in flight and close every connection; idempotent."""
        if self._closed:
            return
        self._closed = True
        for engine in (self._engine, *self._draining):
            engine.close()
        self._draining.clear()
        self._trim.cancel()
        for transfer in self._free:
            transfer.curl.close()
        self._free.clear()

    def _release(self, transfer: _Transfer) -> None:
        """Keep a finished transfer's handle for the next request, up to a bound: a handle holds
        its own copy of the trust anchors (~220 KiB with the system's bundle in a blob), so a
        burst must not leave hundreds of them behind."""
        if self._closed or len(self._free) >= _MAX_IDLE_HANDLES:
            transfer.curl.close()
        else:
            transfer.reset()
            self._free.append(transfer)

    def _trim_idle(self) -> None:
        """Close the idle handles no request needed over the last period.

        Each keeps its 16 KiB request buffer and ~3 KiB of state inside libcurl, and with an
        app's ``ca_pem`` a copy of the whole trust blob (~220 KiB): up to 128 of them per app
        stayed after a burst for good, 2 MiB, or 30 MiB with ``ca_pem`` (``bench/RESULTS.md``).
        """
        for _ in range(min(self._fewest_free, len(self._free))):
            self._free.pop(0).curl.close()  # the least recently used first
        self._fewest_free = len(self._free)
        self._trim = self._schedule_trim()

    def _schedule_trim(self) -> asyncio.TimerHandle:
        ref = weakref.ref(self)  # a transport nobody closed is still collected

        def trim() -> None:
            transport = ref()
            if transport is not None and not transport._closed:
                transport._trim_idle()

        return self._engine.loop.call_later(self._settings.idle_handle_seconds, trim)

    def _new_curl(self) -> pycurl.Curl:
        s = self._settings
        curl = pycurl.Curl()
        curl.setopt(pycurl.NOSIGNAL, 1)
        curl.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_2TLS)
        curl.setopt(pycurl.PIPEWAIT, 1)  # wait for a connection that multiplexes over a new one
        curl.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTPS)
        curl.setopt(pycurl.FOLLOWLOCATION, 0)  # never: Web Push (SSRF), and no provider needs it
        curl.setopt(pycurl.USERAGENT, "push-relay")
        curl.setopt(pycurl.CONNECTTIMEOUT_MS, int(s.connect_timeout_seconds * 1000))
        curl.setopt(pycurl.TIMEOUT_MS, int(s.timeout_seconds * 1000))
        curl.setopt(pycurl.MAXAGE_CONN, _MAX_IDLE_SECONDS)
        curl.setopt(pycurl.TCP_KEEPALIVE, 1)
        curl.setopt(pycurl.TCP_KEEPIDLE, s.keepalive_seconds)
        curl.setopt(pycurl.TCP_KEEPINTVL, max(1, s.keepalive_seconds // 4))
        curl.setopt(pycurl.MAXFILESIZE, s.max_response_bytes)
        # libcurl's smallest upload buffer (16 KiB, its default is 64 KiB) holds any push body
        # (at most ~5 KB): each push in flight has one, so this saves ~45 KiB a push.
        curl.setopt(pycurl.UPLOAD_BUFFERSIZE, _UPLOAD_BUFFER_BYTES)
        curl.setopt(pycurl.PROXY, s.proxy)  # "" also stops libcurl reading *_proxy variables
        if s.proxy:
            curl.setopt(pycurl.HTTPPROXYTUNNEL, 1)
        if self._trust:
            curl.setopt(pycurl.CAINFO_BLOB, self._trust)
        else:
            if self._verify_paths.cafile:
                curl.setopt(pycurl.CAINFO, self._verify_paths.cafile)
            if self._verify_paths.capath:
                curl.setopt(pycurl.CAPATH, self._verify_paths.capath)
        if s.cert_file:
            curl.setopt(pycurl.SSLCERT, s.cert_file)
            curl.setopt(pycurl.SSLCERTTYPE, "PEM")
        return curl


def check_settings(settings: TransportSettings) -> None:
    """Refuse settings libcurl would only trip over at the first request.

    Raises:
        ValueError: naming the field (``proxy``, ``ca_pem``, ``cert_file``, ``busy_fraction``),
            never its value.
    """
    shut, full = settings.busy_fraction
    if not 0.0 <= shut <= full:
        raise ValueError("busy_fraction: expected 0 <= closed <= open")
    if settings.proxy:
        parts = urlsplit(settings.proxy)
        if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError("proxy: expected http://host:port")
    # Only to parse what the settings name: without the system's trust store (~1 MiB).
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if settings.ca_pem:
        try:
            context.load_verify_locations(cadata=settings.ca_pem.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
            raise ValueError("ca_pem: not PEM certificates") from exc
    if settings.cert_file:
        try:
            context.load_cert_chain(settings.cert_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError("cert_file: cannot load a certificate and key from it") from exc


def _trust_anchors(ca_pem: bytes) -> bytes:
    """The system's trust anchors followed by the extra ones, as one PEM blob.

    libcurl trusts only the blob once one is set (the CA file is then ignored), so the system's
    bundle is read once, here, and the extra anchors appended to it.
    """
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, certifi.where()):
        if candidate and os.path.isfile(candidate):
            with open(candidate, "rb") as bundle:
                return bundle.read().rstrip(b"\n") + b"\n" + ca_pem
    return ca_pem


def _error(code: int) -> TransportError:
    if code == pycurl.E_OPERATION_TIMEDOUT:
        return TransportError("Timeout", code)
    if code in _CONNECT_ERRORS:
        return TransportError("ConnectFailed", code)
    return TransportError("ConnectionLost", code)
