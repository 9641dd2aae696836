"""The APNs connection pool and the CONNECT tunnel, around :class:`ApnsProtocol`.

- :class:`FairPool` (an aioapns ``APNsBaseConnectionPool``): stream slots handed out first come
  first served from a queue of futures, opening connections up to the limit; no polling.
- :func:`open_tunnel`: the HTTP CONNECT exchange on a plain socket, before TLS starts.

Nothing here sees a push's content, and nothing here logs it.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import logging
import socket
import ssl
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import unquote, urlsplit

from aioapns.connection import APNsBaseConnectionPool

from adapters._apns_conn import ApnsProtocol, ConnectFailed

logger = logging.getLogger(__name__)


# -- the pool ---------------------------------------------------------------------------------


class FairPool(APNsBaseConnectionPool):
    """Up to ``max_connections`` connections; callers get stream slots in arrival order.

    A caller takes a free slot at once only when nobody is queued; otherwise it queues a future
    that :meth:`dispatch` resolves, oldest first, whenever a slot frees or a connection opens.
    """

    def __init__(
        self,
        *,
        protocol: type[ApnsProtocol],
        ssl_context: ssl.SSLContext,
        topic: str,
        max_connections: int,
        max_streams: int,
        connect_timeout: float,
        idle_ping_seconds: float,
        proxy: Proxy | None = None,
    ) -> None:
        super().__init__(topic=topic, max_connections=max_connections)
        self.protocol_class = self.protocol = protocol
        self.ssl_context = ssl_context
        self.max_streams = max_streams
        self.connect_timeout = connect_timeout
        self.idle_ping_seconds = idle_ping_seconds
        self.proxy = proxy
        self.live: list[ApnsProtocol] = []
        self.closed = False
        self._waiters: collections.deque[asyncio.Future[ApnsProtocol | None]] = collections.deque()
        self._opening = 0

    async def acquire(self) -> ApnsProtocol:
        """A connection with one stream slot reserved for the caller.

        Raises:
            ConnectFailed: a connection had to be opened and could not be, or the pool is closed.
        """
        if self.closed:
            raise ConnectFailed("PoolClosed")
        if not self._waiters:
            conn = self._reserve()
            if conn is not None:
                return conn
        if self._can_open():
            self._opening += 1
            return await self._open()
        granted = await self._wait_turn()
        return granted if granted is not None else await self._open()

    def dispatch(self) -> None:
        """Hand free slots (or the right to open a connection) to waiters, oldest first."""
        while self._waiters:
            if self._waiters[0].done():
                self._waiters.popleft()
                continue
            conn = self._reserve()
            if conn is None:
                if not self._can_open():
                    return
                self._opening += 1  # the waiter opens it
            self._waiters.popleft().set_result(conn)

    def discard_connection(self, connection: Any) -> None:
        if connection in self.live:
            self.live.remove(connection)
            self.dispatch()

    async def aclose(self) -> None:
        """Close every connection, failing what is in flight or queued."""
        self.closed = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ConnectFailed("PoolClosed"))
        self._waiters.clear()
        conns = list(self.live)
        for conn in conns:
            conn.close("PoolClosed")
        pending = [conn.closed for conn in conns if not conn.closed.done()]
        if pending:
            await asyncio.wait(pending, timeout=self.connect_timeout)
        for conn in conns:
            if conn.transport is not None:
                conn.transport.abort()

    def _reserve(self) -> ApnsProtocol | None:
        for conn in self.live:
            if conn.has_room:
                conn.reserved += 1
                return conn
        return None

    def _can_open(self) -> bool:
        # One connection at a time, each after its first answer: with token auth APNs allows a
        # single stream until the first valid JWT, and a burst would open every connection.
        return (
            not self.closed
            and self._opening == 0
            and len(self.live) < self.max_connections
            and all(conn.warm for conn in self.live)
        )

    async def _wait_turn(self) -> ApnsProtocol | None:
        waiter: asyncio.Future[ApnsProtocol | None] = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            self._give_back(waiter)
            raise

    def _give_back(self, waiter: asyncio.Future[ApnsProtocol | None]) -> None:
        """Undo what a cancelled waiter was granted, so the next waiter gets it."""
        if not waiter.done() or waiter.cancelled():
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            return
        if waiter.exception() is not None:
            return
        granted = waiter.result()
        if granted is None:
            self._opening -= 1
            self.dispatch()
        else:
            granted._release()

    async def _open(self) -> ApnsProtocol:
        """Open a connection (already counted in ``_opening``) and take its first slot."""
        try:
            conn = await self._connect_settled()
        except BaseException:
            self._opening -= 1
            self.dispatch()
            raise
        self._opening -= 1
        conn.reserved += 1
        self.live.append(conn)
        self.dispatch()
        return conn

    async def _connect_settled(self) -> ApnsProtocol:
        conn: ApnsProtocol | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                conn = await self._connect()
                await asyncio.shield(conn.settled)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            if conn is not None:
                conn.close()
            logger.warning("APNs connect to %s failed: %r", self.protocol_class.APNS_SERVER, exc)
            raise ConnectFailed(type(exc).__name__) from exc
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        if conn.closing or self.closed:
            conn.close()
            raise ConnectFailed(conn.close_reason or "PoolClosed")
        return conn

    async def _connect(self) -> ApnsProtocol:
        factory = partial(self.protocol, self)
        host, port = self.protocol.APNS_SERVER, self.protocol.APNS_PORT
        if self.proxy is None:
            _, conn = await self.loop.create_connection(factory, host, port, ssl=self.ssl_context)
            return conn
        sock = await open_tunnel(self.loop, self.proxy, host, port)
        try:
            _, conn = await self.loop.create_connection(
                factory, sock=sock, ssl=self.ssl_context, server_hostname=host
            )
        except BaseException:
            sock.close()
            raise
        return conn


# -- HTTP CONNECT proxy -----------------------------------------------------------------------


class ProxyError(OSError):
    """The proxy refused or broke the CONNECT exchange."""


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP CONNECT proxy: ``http://[user:password@]host:port``."""

    host: str
    port: int
    authorization: str = ""

    @classmethod
    def parse(cls, url: str) -> Proxy:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("proxy: expected http://host:port")
        authorization = ""
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        return cls(parts.hostname, parts.port or 80, authorization)


async def open_tunnel(
    loop: asyncio.AbstractEventLoop, proxy: Proxy, host: str, port: int
) -> socket.socket:
    """A plain socket tunnelled through ``proxy`` to ``host:port``, ready for TLS.

    aioapns hands the proxy transport's ``TransportSocket`` to ``create_connection`` while the
    transport still owns it, which fails on Python 3.11+ and uvloop; doing the exchange on a
    socket nobody else owns avoids that.
    """
    infos = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, address)
        await loop.sock_sendall(sock, _connect_request(proxy, host, port))
        _check_connect_reply(await _read_reply_head(loop, sock))
    except BaseException:
        sock.close()
        raise
    return sock


def _connect_request(proxy: Proxy, host: str, port: int) -> bytes:
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if proxy.authorization:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


async def _read_reply_head(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await loop.sock_recv(sock, 4096)
        if not chunk or len(head) > 16384:
            raise ProxyError("proxy closed the connection during CONNECT")
        head += chunk
    # The TLS server speaks only after our ClientHello, so nothing may follow the reply head.
    if not head.endswith(b"\r\n\r\n"):
        raise ProxyError("proxy sent data after its CONNECT reply")
    return head


def _check_connect_reply(head: bytes) -> None:
    status_line = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(status_line) < 2 or not status_line[1].startswith(b"2"):
        raise ProxyError(f"proxy refused CONNECT: {status_line[1:2]!r}")
