"""The CONNECT proxy: real tunnels to the fake APNs (HTTP/2 over TLS) and to an echo server."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import httpx
import pytest

from relay.testing.credentials import ApnsKey
from relay.testing.fake_apns import FakeAPNs
from relay.testing.proxy import ConnectProxy

TOKEN = "c3" * 32


@pytest.fixture
async def echo() -> AsyncIterator[int]:
    """A TCP echo server on loopback; yields its port."""
    handlers: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            handlers.discard(task)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    for task in list(handlers):
        task.cancel()
    await asyncio.gather(*handlers, return_exceptions=True)
    await server.wait_closed()


async def open_tunnel(
    proxy: ConnectProxy, request: bytes
) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    """Send a request head to the proxy; return its response head and the open streams."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    return head, reader, writer


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def connect(target: str) -> bytes:
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()


async def test_https_h2_through_the_proxy_to_the_fake_apns() -> None:
    key = ApnsKey.generate()
    async with FakeAPNs(keys=[key]) as apns, ConnectProxy() as proxy:
        ctx = apns.pki.client_context()
        async with httpx.AsyncClient(http2=True, verify=ctx, proxy=proxy.url) as client:
            response = await client.post(
                f"{apns.url}/3/device/{TOKEN}",
                content=b'{"aps":{}}',
                headers={
                    "authorization": f"bearer {key.provider_token()}",
                    "apns-topic": "com.example.chat",
                },
            )
        assert (response.status_code, response.http_version) == (200, "HTTP/2")
        assert proxy.url == f"http://127.0.0.1:{proxy.port}"
        assert proxy.connects == [f"127.0.0.1:{apns.port}"]
        assert apns.received[0].token == TOKEN


async def test_tunnel_splices_both_ways_and_passes_half_close(echo: int) -> None:
    async with ConnectProxy(allowed_targets=[f"127.0.0.1:{echo}"]) as proxy:
        # The first tunnelled bytes ride in the same segment as the CONNECT head.
        head, reader, writer = await open_tunnel(proxy, connect(f"127.0.0.1:{echo}") + b"early ")
        assert head.startswith(b"HTTP/1.1 200 ")
        writer.write(b"x" * 200_000)
        writer.write_eof()
        echoed = await reader.read(-1)  # the echo server closes after our EOF reached it
        assert echoed == b"early " + b"x" * 200_000
        await close(writer)
        assert proxy.connects == [f"127.0.0.1:{echo}"]


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"405"),
        (b"CONNECT 127.0.0.1 HTTP/1.1\r\n\r\n", b"400"),
        (b"nonsense\r\n\r\n", b"400"),
        (connect("example.com:443"), b"403"),
    ],
)
async def test_refusals(request_head: bytes, status: bytes) -> None:
    async with ConnectProxy(allowed_targets=["127.0.0.1:1"]) as proxy:
        head, reader, writer = await open_tunnel(proxy, request_head)
        assert head.split(b" ")[1] == status
        assert await reader.read(-1) == b""  # and the connection is closed
        await close(writer)
        assert proxy.connects == []
    if status == b"405":
        assert b"\r\nAllow: CONNECT\r\n" in head
    if status == b"403":
        assert proxy.refused == ["example.com:443"]


async def test_unreachable_target_is_bad_gateway() -> None:
    with socket.socket() as probe:  # a port nobody listens on: bound, then released
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with ConnectProxy() as proxy:
        head, _, writer = await open_tunnel(proxy, connect(f"127.0.0.1:{port}"))
        await close(writer)
    assert head.startswith(b"HTTP/1.1 502 ")
    assert proxy.refused == [f"127.0.0.1:{port}"]


async def test_stop_closes_open_tunnels(echo: int) -> None:
    proxy = ConnectProxy()
    await proxy.start()
    head, reader, writer = await open_tunnel(proxy, connect(f"127.0.0.1:{echo}"))
    assert head.startswith(b"HTTP/1.1 200 ")
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"

    await asyncio.wait_for(proxy.stop(), 2)

    assert await reader.read(-1) == b""
    await close(writer)
