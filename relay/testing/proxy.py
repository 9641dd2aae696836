"""A real HTTP/1.1 CONNECT proxy on loopback, for testing clients' proxy support.

::

    async with ConnectProxy() as proxy:
        ...  # client configured with proxy.url ("http://127.0.0.1:<port>")
        assert proxy.connects == ["127.0.0.1:8443"]

It answers ``CONNECT host:port`` with ``200``, then splices bytes both ways until both sides are
done (half-closes are passed on). Anything but CONNECT gets ``405``; a target outside
``allowed_targets`` gets ``403``; a target that cannot be reached gets ``502``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from types import TracebackType

_MAX_HEAD_BYTES = 16 * 1024
_CHUNK_BYTES = 64 * 1024
_STATUS_TEXT = {
    200: "Connection Established",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    502: "Bad Gateway",
}


class _Refusal(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class ConnectProxy:
    """An HTTP CONNECT proxy on 127.0.0.1 with a port chosen by the OS.

    Args:
        allowed_targets: ``host:port`` strings the proxy may tunnel to; None allows any.

    Attributes:
        connects: the targets tunnelled so far, in order.
        refused: the CONNECT targets refused (403) or unreachable (502), in order.
    """

    def __init__(self, *, allowed_targets: Iterable[str] | None = None) -> None:
        self.allowed_targets = None if allowed_targets is None else frozenset(allowed_targets)
        self.connects: list[str] = []
        self.refused: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``, as proxy settings take it."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Start listening."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, close every tunnel and wait for them to finish."""
        if self._server is not None:
            self._server.close()
        # Cut the sockets rather than cancel the tunnels: the pipes then end by themselves
        # (cancelling a gather of pipes mid-flight makes asyncio log a CancelledError).
        for writer in list(self._writers):
            writer.transport.abort()
        if self._tasks:
            _, stuck = await asyncio.wait(set(self._tasks), timeout=1.0)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> ConnectProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            target = await self._read_connect(reader)
            up_reader, upstream = await self._open(target)
            self._writers.add(upstream)
            writer.write(_status_line(200))
            await writer.drain()
            self.connects.append(target)
            await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, writer))
        except _Refusal as refusal:
            writer.write(_status_line(refusal.status))
            with contextlib.suppress(OSError):
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away mid-request
        finally:
            await _close(writer)
            if upstream is not None:
                await _close(upstream)
                self._writers.discard(upstream)
            self._writers.discard(writer)
            self._tasks.discard(task)

    async def _read_connect(self, reader: asyncio.StreamReader) -> str:
        """Read the request head; return the CONNECT target or refuse."""
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > _MAX_HEAD_BYTES:
            raise _Refusal(400)
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _Refusal(400)
        method, target, _ = parts
        if method != "CONNECT":
            raise _Refusal(405)
        host, sep, port = target.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise _Refusal(400)
        if self.allowed_targets is not None and target not in self.allowed_targets:
            self.refused.append(target)
            raise _Refusal(403)
        return target

    async def _open(self, target: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, _, port = target.rpartition(":")
        try:
            return await asyncio.open_connection(host.strip("[]"), int(port))
        except OSError:
            self.refused.append(target)
            raise _Refusal(502) from None


def _status_line(status: int) -> bytes:
    text = _STATUS_TEXT[status]
    if status == 200:
        return f"HTTP/1.1 200 {text}\r\n\r\n".encode()
    extra = "Allow: CONNECT\r\n" if status == 405 else ""
    return (
        f"HTTP/1.1 {status} {text}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
    ).encode()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy until end of stream, then pass the half-close on."""
    try:
        while data := await source.read(_CHUNK_BYTES):
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof() and not sink.is_closing():
            sink.write_eof()
    except OSError:
        # One side broke: cut the other so its pipe ends too instead of waiting forever.
        sink.transport.abort()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
