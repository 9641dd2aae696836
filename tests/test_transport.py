"""adapters/_transport.py on its own: trust anchors, the environment, retiring connections.

The adapters' tests cover the rest of it through each provider's protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pycurl
import pytest

from adapters._transport import Transport, TransportError, TransportSettings, _Transfer
from relay.testing.credentials import ApnsKey
from relay.testing.fake_apns import FakeAPNs
from relay.testing.tls import TestPKI

PATH = "/3/device/" + "ab" * 32


@pytest.fixture
async def two_fakes() -> AsyncIterator[tuple[FakeAPNs, FakeAPNs]]:
    """Two servers whose certificates chain to two different CAs."""
    async with FakeAPNs(pki=TestPKI()) as system, FakeAPNs(pki=TestPKI()) as private:
        yield system, private


async def reaches(transport: Transport, fake: FakeAPNs) -> bool:
    try:
        response = await transport.request(fake.url + PATH, [], b"{}")
    except TransportError as error:
        assert error.reason == "ConnectFailed"
        return False
    return response.status > 0


async def test_extra_trust_anchors_are_trusted_beside_the_systems(
    two_fakes: tuple[FakeAPNs, FakeAPNs], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system, private = two_fakes
    bundle = tmp_path / "system-bundle.pem"
    bundle.write_bytes(system.ca_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))  # the "system" store, for this test

    plain = Transport(TransportSettings())
    extra = Transport(TransportSettings(ca_pem=private.ca_pem))
    try:
        assert await reaches(plain, system) and not await reaches(plain, private)
        # libcurl trusts only a CA blob once one is set: the system's must be in it too.
        assert await reaches(extra, system) and await reaches(extra, private)
    finally:
        await plain.aclose()
        await extra.aclose()


async def test_proxy_variables_in_the_environment_are_ignored(
    two_fakes: tuple[FakeAPNs, FakeAPNs], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, fake = two_fakes
    for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    transport = Transport(TransportSettings(ca_pem=fake.ca_pem))
    try:
        assert await reaches(transport, fake)  # straight to the server, as configured
    finally:
        await transport.aclose()


async def test_retire_moves_new_requests_to_new_connections_and_lets_old_ones_finish(
    two_fakes: tuple[FakeAPNs, FakeAPNs],
) -> None:
    _, fake = two_fakes
    transport = Transport(TransportSettings(ca_pem=fake.ca_pem))
    try:
        first = await transport.request(fake.url + PATH, [], b"{}")
        fake.delay(0.3)
        slow = asyncio.ensure_future(transport.request(fake.url + PATH, [], b"{}"))
        await asyncio.sleep(0.1)
        transport.retire(first)
        transport.retire(first)  # a second answer from the same connections changes nothing
        fake.delay(0)
        fresh = await transport.request(fake.url + PATH, [], b"{}")
        late = await slow  # finished on the retired connection
        assert (first.generation, late.generation, fresh.generation) == (1, 1, 2)
        assert late.connection == first.connection != fresh.connection
        assert fake.connections_opened == 2
    finally:
        await transport.aclose()


async def test_unusable_settings_name_the_field() -> None:
    for settings, field in [
        (TransportSettings(proxy="socks5://127.0.0.1:1080"), "proxy"),
        (TransportSettings(ca_pem=b"not a certificate"), "ca_pem"),
        (TransportSettings(cert_file="/nonexistent.pem"), "cert_file"),
        (TransportSettings(busy_fraction=(0.9, 0.5)), "busy_fraction"),
    ]:
        with pytest.raises(ValueError, match=field):
            Transport(settings)


class CountingMulti:
    """A libcurl multi handle that counts the calls that drive it."""

    def __init__(self, multi: Any) -> None:
        self._multi = multi
        self.calls = 0

    def socket_action(self, fd: int, events: int) -> Any:
        self.calls += 1
        return self._multi.socket_action(fd, events)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._multi, name)


@pytest.mark.parametrize(
    ("window", "busy", "burn", "batched"),
    [
        (0.0, (0.0, 0.0), False, False),  # no window
        (0.05, (0.0, 0.0), False, True),  # a window always open
        (0.05, TransportSettings().busy_fraction, False, False),  # an idle loop: shut
        (0.05, TransportSettings().busy_fraction, True, True),  # a busy loop: open
    ],
)
async def test_requests_and_answers_close_together_are_driven_together_when_the_loop_is_busy(
    window: float, busy: tuple[float, float], burn: bool, batched: bool
) -> None:
    """Every call into libcurl costs in proportion to all the transfers it carries: when the
    loop is busy, one call carries many requests and answers, and none of them is lost while
    it waits. When the loop has time to spare, nothing waits."""
    key = ApnsKey.generate()
    headers = [
        b"authorization: bearer " + key.provider_token().encode(),
        b"apns-topic: com.example.chat",
        b"apns-push-type: alert",
    ]
    async with FakeAPNs(keys=[key], record=False) as fake:
        settings = TransportSettings(
            ca_pem=fake.ca_pem, max_connections=1, batch_window_seconds=window, busy_fraction=busy
        )
        transport = Transport(settings)
        done = asyncio.Event()

        async def burner() -> None:  # the loop's thread busy, as under a gRPC load
            while not done.is_set():
                until = time.perf_counter() + 0.002
                while time.perf_counter() < until:
                    pass
                await asyncio.sleep(0)

        try:
            first = await transport.request(fake.url + PATH, headers, b"{}")  # authenticated
            assert first.status == 200
            multi = CountingMulti(transport._engine.multi)
            transport._engine.multi = multi
            burning = asyncio.create_task(burner()) if burn else None
            await asyncio.sleep(0.1)  # the loop's load measured

            async def one(after: float) -> int:
                await asyncio.sleep(after)
                return (await transport.request(fake.url + PATH, headers, b"{}")).status

            # Requests trickling in 3 ms apart, as they do from gRPC callers.
            statuses = await asyncio.gather(*(one(i * 0.003) for i in range(200)))
            done.set()
            if burning is not None:
                await burning
            assert statuses == [200] * 200
            if batched:
                assert multi.calls <= 200 / 4
            else:  # requests and answers each drive libcurl, a few at a time at most
                assert multi.calls > 200 / 2
        finally:
            await transport.aclose()


def _apns_headers(key: ApnsKey) -> list[bytes]:
    return [
        b"authorization: bearer " + key.provider_token().encode(),
        b"apns-topic: com.example.chat",
        b"apns-push-type: alert",
    ]


async def _waiting_on_one_connection(
    fake: FakeAPNs, transport: Transport, headers: list[bytes], count: int
) -> list[asyncio.Future[Any]]:
    """``count`` requests the fake received and will not answer, on the transport's connection
    (opened and authenticated first by one answered request)."""
    assert (await transport.request(fake.url + PATH, headers, b"{}")).status == 200
    tokens = [f"{i:064x}" for i in range(count)]
    for token in tokens:
        fake.stall(token)
    waiting = [
        asyncio.ensure_future(transport.request(fake.url + "/3/device/" + t, headers, b"{}"))
        for t in tokens
    ]
    while fake.requests_seen < 1 + count:  # noqa: ASYNC110 (polling a fake)
        await asyncio.sleep(0.01)
    return waiting


async def test_an_answer_runs_its_own_transfer_not_every_one_waiting_beside_it() -> None:
    """libcurl runs every transfer on a connection when its socket turns readable, each one
    trying a read: with hundreds waiting on a slow provider, every answer cost hundreds of
    runs. The transport reads a connection through one transfer on it instead, and libcurl
    wakes the streams that got data. Counted with libcurl's progress callback, which it calls
    at every run of a transfer."""
    key = ApnsKey.generate()
    headers = _apns_headers(key)
    async with FakeAPNs(keys=[key], record=False) as fake:
        transport = Transport(
            TransportSettings(ca_pem=fake.ca_pem, max_connections=1, batch_window_seconds=0)
        )
        runs = 0

        def count(*_: int) -> int:
            nonlocal runs
            runs += 1
            return 0

        new_curl = transport._new_curl

        def counted() -> Any:
            curl = new_curl()
            curl.setopt(pycurl.NOPROGRESS, 0)
            curl.setopt(pycurl.XFERINFOFUNCTION, count)
            return curl

        transport._new_curl = counted  # type: ignore[method-assign]
        waiting: list[asyncio.Future[Any]] = []
        try:
            waiting = await _waiting_on_one_connection(fake, transport, headers, 300)
            await asyncio.sleep(0.05)
            runs = 0
            for _ in range(50):  # one at a time: each answer is a readable socket of its own
                assert (await transport.request(fake.url + PATH, headers, b"{}")).status == 200
            assert runs < 50 * 30  # every waiting transfer run per answer: 50 * 300 and more
            assert not any(task.done() for task in waiting)
        finally:
            for task in waiting:
                task.cancel()
            await transport.aclose()


async def test_a_lost_connection_fails_every_transfer_waiting_on_it() -> None:
    """Read through one transfer, a connection's end still reaches all the others at once."""
    key = ApnsKey.generate()
    headers = _apns_headers(key)
    async with FakeAPNs(keys=[key], record=False) as fake:
        transport = Transport(TransportSettings(ca_pem=fake.ca_pem, max_connections=1))
        try:
            waiting = await _waiting_on_one_connection(fake, transport, headers, 300)
            fake.drop_next()  # the next request cuts the connection
            cut = asyncio.ensure_future(transport.request(fake.url + PATH, headers, b"{}"))
            results = await asyncio.wait_for(
                asyncio.gather(*waiting, return_exceptions=True), timeout=10
            )
            assert {r.reason if isinstance(r, TransportError) else r for r in results} == {
                "ConnectionLost"
            }
            # The request that met the cut may be resent by libcurl on a fresh connection (it
            # got nothing on a reused one): it ends either way.
            with contextlib.suppress(TransportError):
                assert (await asyncio.wait_for(cut, timeout=10)).status == 200
        finally:
            await transport.aclose()


async def test_idle_handles_no_request_needed_are_closed() -> None:
    """A burst leaves its easy handles idle (~23 KiB each inside libcurl); those no request
    took for a whole period are closed, those in use stay."""
    key = ApnsKey.generate()
    headers = _apns_headers(key)
    async with FakeAPNs(keys=[key], record=False) as fake:
        transport = Transport(TransportSettings(ca_pem=fake.ca_pem, idle_handle_seconds=0.1))
        try:
            burst = [transport.request(fake.url + PATH, headers, b"{}") for _ in range(20)]
            assert [r.status for r in await asyncio.gather(*burst)] == [200] * 20
            assert len(transport._free) == 20
            for _ in range(20):  # one request at a time over ~4 periods: one handle needed
                assert (await transport.request(fake.url + PATH, headers, b"{}")).status == 200
                await asyncio.sleep(0.02)
            assert len(transport._free) == 1
            await asyncio.sleep(0.35)  # then nothing: the last one goes too
            assert transport._free == []
            assert (await transport.request(fake.url + PATH, headers, b"{}")).status == 200
        finally:
            await transport.aclose()


async def test_handles_beyond_the_idle_bound_are_freed_without_the_garbage_collector() -> None:
    """A burst wider than the idle bound closes the extra handles as they finish; nothing of
    theirs may wait for the cyclic garbage collector (a request's future and its transfer point
    at each other while it runs)."""
    key = ApnsKey.generate()
    headers = _apns_headers(key)
    async with FakeAPNs(keys=[key], record=False) as fake:
        transport = Transport(TransportSettings(ca_pem=fake.ca_pem))
        gc.disable()
        try:
            burst = [transport.request(fake.url + PATH, headers, b"{}") for _ in range(300)]
            assert [r.status for r in await asyncio.gather(*burst)] == [200] * 300
            del burst
            left = [o for o in gc.get_objects() if isinstance(o, _Transfer)]
            assert len(transport._free) == 128
            assert len(left) == 128, "closed handles kept alive by a reference cycle"
        finally:
            gc.enable()
            await transport.aclose()


async def test_an_idle_handle_keeps_no_request_body() -> None:
    """pycurl holds the body it was given until the option is set again; a handle kept for
    reuse must not keep the last push's payload (its preview, in FULL) alive meanwhile."""
    key = ApnsKey.generate()
    headers = _apns_headers(key)
    async with FakeAPNs(keys=[key], record=False) as fake:
        transport = Transport(TransportSettings(ca_pem=fake.ca_pem))
        try:
            body = bytes(bytearray(b'{"aps":{"alert":"a preview"}}'))  # its own object
            before = sys.getrefcount(body)
            assert (await transport.request(fake.url + PATH, headers, body)).status == 200
            assert len(transport._free) == 1
            assert sys.getrefcount(body) == before
        finally:
            await transport.aclose()
