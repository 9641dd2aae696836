"""The plaintext HTTP listener for operators: ``/metrics``, ``/healthz`` and ``/readyz``.

A deliberately tiny HTTP/1.1 server on asyncio streams (GET only, one response per connection):
Prometheus and Kubernetes probes need no more, and it keeps health reachable in plaintext when
the gRPC port speaks TLS. It serves nothing a request carried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger("relay.http")

READ_LIMIT_BYTES = 8192
READ_TIMEOUT_SECONDS = 5.0
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class OpsHttpServer:
    """Serves ``metrics()`` at /metrics, 200 at /healthz, and ``ready()`` at /readyz."""

    def __init__(self, metrics: Callable[[], bytes], ready: Callable[[], bool]) -> None:
        self._metrics = metrics
        self._ready = ready
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self._server = await asyncio.start_server(
            self._handle, host.strip("[]"), int(port), limit=READ_LIMIT_BYTES
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, ctype, body = await asyncio.wait_for(
                self._respond(reader), READ_TIMEOUT_SECONDS
            )
        except (TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError):
            status, ctype, body = "400 Bad Request", "text/plain", b"bad request\n"
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(ConnectionError):
            writer.write(head.encode() + body)
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
        request_line = (await reader.readuntil(b"\r\n")).decode("latin-1")
        while (await reader.readuntil(b"\r\n")) != b"\r\n":
            pass  # headers are not needed
        method, path, _ = request_line.split(" ", 2)
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"method not allowed\n"
        path = path.split("?", 1)[0]
        if path == "/metrics":
            return "200 OK", METRICS_TYPE, self._metrics()
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            if self._ready():
                return "200 OK", "text/plain", b"ready\n"
            return "503 Service Unavailable", "text/plain", b"not ready\n"
        return "404 Not Found", "text/plain", b"not found\n"
