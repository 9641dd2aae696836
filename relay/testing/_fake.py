"""What every fake provider shares: an HTTP/2 server on loopback and its lifecycle."""

from __future__ import annotations

from types import TracebackType
from typing import Self

from relay.testing.h2server import H2Server


class FakeServer:
    """An :class:`H2Server` on 127.0.0.1 (port chosen by the OS), usable as ``async with``.

    Subclasses build ``self._server`` in their constructor with their own request handler.
    """

    _server: H2Server

    @property
    def port(self) -> int:
        """The TCP port (0 until started)."""
        return self._server.port

    @property
    def url(self) -> str:
        """``https://127.0.0.1:<port>``: the origin clients are pointed at."""
        return self._server.url

    @property
    def connections_opened(self) -> int:
        """How many connections completed the TLS handshake so far."""
        return self._server.connections_opened

    @property
    def server(self) -> H2Server:
        """The underlying HTTP/2 server (open connections, GOAWAY with other error codes)."""
        return self._server

    async def start(self) -> None:
        """Start listening on 127.0.0.1 with a port chosen by the OS."""
        await self._server.start()

    async def stop(self) -> None:
        """Close every connection (GOAWAY first) and stop listening."""
        await self._server.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
