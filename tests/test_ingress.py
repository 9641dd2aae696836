"""The gRPC listener (``relay/ingress.py``) at the HTTP/2 level, with a raw HTTP/2 caller.

grpcio's client never shows what these check: a unary answer larger than the caller's flow
control window (the lean unary path then waits for the window, as grpclib's own path does),
and the GOAWAY a graceful stop sends while a call in flight still finishes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import struct
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, RstStreamFrame, WindowUpdateFrame

from pushrelay.v1 import relay_pb2 as pb
from pushrelay.v1 import relay_pb2_grpc
from relay import ingress
from relay.client import RelayClient
from relay.config import Config
from relay.interceptors import SERVICE_NAME
from relay.server import MAX_MESSAGE_BYTES, RelayServer
from relay.testing.fake_apns import FakeAPNs
from tests.support import apns_token, request
from tests.test_auth import requests_counted
from tests.test_limits import in_flight

SEND = "/pushrelay.v1.PushRelay/Send"
SEND_STREAM = "/pushrelay.v1.PushRelay/SendStream"


def _grpc_message(message: pb.SendRequest) -> bytes:
    body = message.SerializeToString()
    return struct.pack(">?I", False, len(body)) + body


async def _h2_client(
    port: int,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, h2.connection.H2Connection]:
    """A raw HTTP/2 connection to ``port``, its preface and SETTINGS made (not yet written)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    return reader, writer, conn


async def _raw_call(port: int, path: str, body: bytes, *, window: int) -> tuple[bytes, dict]:
    """One call over a fresh connection whose stream window is ``window`` bytes; the answer's
    DATA and its trailers."""
    settings = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
    [answer], _ = await _raw_calls(port, path, [body], settings=settings)
    return answer


async def _raw_calls(
    port: int, path: str, bodies: list[bytes], *, settings: dict[int, int]
) -> tuple[list[tuple[bytes, dict]], h2.connection.H2Connection]:
    """Calls one after the other over a fresh connection with the caller's ``settings``; each
    answer's DATA and trailers, and the caller's side of the connection."""
    reader, writer, conn = await _h2_client(port)
    conn.update_settings(settings)
    try:
        answers = [await _call_on(reader, writer, conn, port, path, body) for body in bodies]
    finally:
        writer.close()
    return answers, conn


async def _call_on(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    conn: h2.connection.H2Connection,
    port: int,
    path: str,
    body: bytes,
) -> tuple[bytes, dict]:
    """One call on a raw connection: the answer's DATA and its trailers."""
    stream = conn.get_next_available_stream_id()
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", f"127.0.0.1:{port}"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    conn.send_headers(stream, headers)
    size = conn.max_outbound_frame_size
    for at in range(0, len(body), size):
        conn.send_data(stream, body[at : at + size], end_stream=at + size >= len(body))
    writer.write(conn.data_to_send())
    data, trailers = b"", {}
    while not trailers:
        chunk = await asyncio.wait_for(reader.read(65536), 10)
        assert chunk, "the relay closed the connection"
        for event in conn.receive_data(chunk):
            if isinstance(event, h2.events.DataReceived):
                data += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, stream)
            elif isinstance(event, h2.events.TrailersReceived):
                trailers = dict(event.headers)
        writer.write(conn.data_to_send())
    return data, trailers


@pytest.mark.parametrize("path", [SEND, SEND_STREAM])
async def test_an_answer_larger_than_the_callers_window_waits_for_it(
    relay: RelayServer, fake_apns: FakeAPNs, path: str
) -> None:
    """Answers that fit the caller's window leave as prebuilt frames; a larger one waits for
    the window, in pieces, on both methods."""
    tokens = [apns_token() for _ in range(20)]
    body = _grpc_message(request(*tokens, request_id="r-window"))
    data, trailers = await _raw_call(relay.port, path, body, window=64)
    assert trailers[b"grpc-status"] == b"0"
    compressed, size = struct.unpack(">?I", data[:5])
    assert not compressed and size == len(data) - 5 > 64  # more than one window's worth
    answer = pb.SendResponse.FromString(data[5:])
    assert answer.request_id == "r-window"
    assert [r.outcome for r in answer.results] == [pb.DELIVERED] * len(tokens)


async def test_unary_answers_follow_a_header_table_the_caller_shrank(
    relay: RelayServer, fake_apns: FakeAPNs
) -> None:
    """A unary answer's header blocks are prebuilt (they never touch HPACK's dynamic table), but
    after the caller shrinks the table, the next block must open with the size update
    (RFC 7541 §4.2): that answer takes h2's own path, and the ones after it decode as well."""
    bodies = [_grpc_message(request(apns_token(), request_id=f"r{i}")) for i in range(3)]
    settings = {h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0}
    answers, conn = await _raw_calls(relay.port, SEND, bodies, settings=settings)
    assert conn.decoder.header_table.maxsize == 0  # the update reached the caller
    for i, (data, trailers) in enumerate(answers):
        assert trailers == {b"grpc-status": b"0"}
        answer = pb.SendResponse.FromString(data[5:])
        assert answer.request_id == f"r{i}"
        assert [r.outcome for r in answer.results] == [pb.DELIVERED]


async def test_a_graceful_stop_sends_goaway_and_lets_the_call_in_flight_finish(
    relay: RelayServer, fake_apns: FakeAPNs
) -> None:
    slow = apns_token()
    fake_apns.stall(slow)
    # A second, idle caller that only watches for the GOAWAY.
    reader, writer, watcher = await _h2_client(relay.port)
    writer.write(watcher.data_to_send())
    async with RelayClient(f"127.0.0.1:{relay.port}") as caller:
        pending = asyncio.ensure_future(caller.send(request(slow), timeout=10))
        while not fake_apns.received:  # noqa: ASYNC110 (polling a fake's record)
            await asyncio.sleep(0.01)
        stopping = asyncio.ensure_future(relay.stop(grace=5))
        goaway = await asyncio.wait_for(_next_goaway(reader), 5)
        assert (goaway.last_stream_id, goaway.error_code) == (2**31 - 1, 0)
        assert not pending.done() and not stopping.done()  # the call still runs
        fake_apns.clear()  # the provider answers now
        answer = await pending
        await asyncio.wait_for(stopping, 5)
    writer.close()
    assert answer.results[0].outcome == pb.DELIVERED
    async with RelayClient(f"127.0.0.1:{relay.port}") as late:  # and the port is closed
        try:
            await late.send(request(apns_token()), timeout=2)
            raise AssertionError("a stopped relay answered")
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE


async def _next_goaway(reader: asyncio.StreamReader) -> GoAwayFrame:
    buffer = b""
    while True:
        chunk = await reader.read(65536)
        assert chunk, "the connection closed before any GOAWAY"
        buffer += chunk
        while len(buffer) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(buffer[:9]))
            if len(buffer) < 9 + length:
                break
            frame.parse_body(memoryview(buffer[9 : 9 + length]))
            buffer = buffer[9 + length :]
            if isinstance(frame, GoAwayFrame):
                return frame


async def test_a_connection_may_open_the_in_flight_cap_and_a_hundred_streams(
    start_relay: Callable[[Config], Awaitable[RelayServer]], relay_config: Config
) -> None:
    """Beyond the cap, calls are refused by the relay (RESOURCE_EXHAUSTED) rather than held back
    in the caller; yet one connection cannot hold idle streams without bound."""
    limits = dataclasses.replace(relay_config.limits, max_inflight_requests=150)
    relay = await start_relay(dataclasses.replace(relay_config, limits=limits))
    reader, writer, conn = await _h2_client(relay.port)
    writer.write(conn.data_to_send())
    advertised: list[int] = []
    try:
        while len(advertised) < 2:  # h2's first SETTINGS (100), then the relay's
            for event in conn.receive_data(await asyncio.wait_for(reader.read(65536), 5)):
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    setting = event.changed_settings.get(
                        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
                    )
                    if setting is not None:
                        advertised.append(setting.new_value)
            writer.write(conn.data_to_send())
    finally:
        writer.close()
    assert advertised == [100, 250]


async def test_compressed_requests_are_inflated_up_to_the_ceiling(
    relay: RelayServer, fake_apns: FakeAPNs
) -> None:
    """Callers that compress (gzip, as grpcio's server accepted) are served; a request that
    inflates past gRPC's own ceiling is refused like an uncompressed one."""
    target = f"127.0.0.1:{relay.port}"
    async with grpc.aio.insecure_channel(target, compression=grpc.Compression.Gzip) as channel:
        stub = relay_pb2_grpc.PushRelayStub(channel)
        answer = await stub.Send(request(apns_token(), request_id="zipped"), timeout=10)
        streamed = [a async for a in stub.SendStream(iter([request(apns_token())]), timeout=10)]
        huge = request(apns_token())
        huge.devices[0].token = "a" * (MAX_MESSAGE_BYTES + 1)  # a few KiB once compressed
        try:
            await stub.Send(huge, timeout=10)
            raise AssertionError("an oversized request was served")
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert answer.request_id == "zipped" and answer.results[0].outcome == pb.DELIVERED
    assert [a.results[0].outcome for a in streamed] == [pb.DELIVERED]
    assert len(fake_apns.received) == 2


async def test_health_watch_follows_the_status_and_forgets_a_name_nobody_watches(
    relay: RelayServer,
) -> None:
    """``Watch`` as grpcio's health servicer answers it: the status now and at each change,
    ``SERVICE_UNKNOWN`` for a name never set (until it is)."""
    serving = health_pb2.HealthCheckResponse
    async with grpc.aio.insecure_channel(f"127.0.0.1:{relay.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        known = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        unknown = health.Watch(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert (await known.read()).status == serving.SERVING
        assert (await unknown.read()).status == serving.SERVICE_UNKNOWN
        await relay.health.set(SERVICE_NAME, serving.NOT_SERVING)
        await relay.health.set("no.such.Service", serving.SERVING)
        assert (await known.read()).status == serving.NOT_SERVING
        assert (await unknown.read()).status == serving.SERVING
        known.cancel()
        unknown.cancel()
        for _ in range(100):  # the relay sees both cancels
            if not relay.health._watchers:
                break
            await asyncio.sleep(0.01)
    assert not relay.health._watchers and not relay.health._changed


async def test_closed_streams_are_still_forgotten(relay: RelayServer, fake_apns: FakeAPNs) -> None:
    """The relay counts a caller's open streams by a full walk only every 64 new streams (h2's
    walk on each one grew with the square of the calls in flight); closed streams are still
    dropped by those walks, so a long-lived connection holds at most ~64 of them. A unary
    call's task leaves the connection's table as the call ends."""
    async with RelayClient(f"127.0.0.1:{relay.port}") as caller:
        for i in range(300):
            await caller.send(request(apns_token(), request_id=f"r{i}"), timeout=10)
        assert relay._server is not None
        [connection] = relay._server._server.connections
        held = len(connection.connection._connection.streams)
        tasks = dict(connection.handler._tasks)
    assert held <= 65
    assert not tasks


async def test_a_connection_remembers_a_bounded_number_of_closed_streams(
    relay: RelayServer, fake_apns: FakeAPNs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """h2 remembers how each closed stream closed, for a connection's last 2^16 streams: ~14 MiB
    on every long-lived caller's connection. The relay keeps the last MAX_CLOSED_STREAMS
    (here 50), and the frames a caller may still send on a stream past that record
    (RST_STREAM, WINDOW_UPDATE, DATA) leave the connection serving."""
    monkeypatch.setattr(ingress._Connection, "MAX_CLOSED_STREAMS", 50)
    reader, writer, conn = await _h2_client(relay.port)
    try:
        for i in range(200):
            body = _grpc_message(request(apns_token(), request_id=f"r{i}"))
            await _call_on(reader, writer, conn, relay.port, SEND, body)
        assert relay._server is not None
        [connection] = relay._server._server.connections
        assert len(connection.connection._connection._closed_streams) <= 50
        late = RstStreamFrame(1)
        late.error_code = 8  # CANCEL
        update = WindowUpdateFrame(1)
        update.window_increment = 1000
        data = DataFrame(1)
        data.data = b"late"
        writer.write(late.serialize() + update.serialize() + data.serialize())
        body = _grpc_message(request(apns_token(), request_id="after"))
        answer, trailers = await _call_on(reader, writer, conn, relay.port, SEND, body)
    finally:
        writer.close()
    assert trailers == {b"grpc-status": b"0"}
    assert pb.SendResponse.FromString(answer[5:]).results[0].outcome == pb.DELIVERED
    assert relay._server._server.connections == {connection}


async def test_a_unary_call_the_caller_cancels_is_ended_and_counted(
    relay: RelayServer, fake_apns: FakeAPNs
) -> None:
    """A caller's reset reaches the lean unary path: the call's work stops, its in-flight slot
    frees, it is counted CANCELLED, and the connection serves on."""
    slow = apns_token()
    fake_apns.stall(slow)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{relay.port}") as channel:
        stub = relay_pb2_grpc.PushRelayStub(channel)
        call = stub.Send(request(slow), timeout=10)
        while not fake_apns.received:  # noqa: ASYNC110 (polling a fake's record)
            await asyncio.sleep(0.01)
        assert in_flight(relay) == 1
        assert relay._server is not None
        connections = set(relay._server._server.connections)
        call.cancel()
        for _ in range(200):
            if in_flight(relay) == 0:
                break
            await asyncio.sleep(0.01)
        after = await stub.Send(request(apns_token()), timeout=10)
        assert relay._server._server.connections == connections  # the same connection served on
    assert in_flight(relay) == 0
    assert requests_counted(relay, "CANCELLED") == 1
    assert after.results[0].outcome == pb.DELIVERED


async def test_unary_requests_beyond_the_connection_window_are_read_and_acknowledged(
    relay: RelayServer, fake_apns: FakeAPNs
) -> None:
    """A unary request's DATA is acknowledged as the relay reads it, and what a refused call
    left unread as its stream is released: six 1 MiB requests (refused, over
    limits.max_request_bytes) and two over gRPC's 4 MiB ceiling (refused from the length
    prefix, their bodies unread) pass through one connection whose window is 4 MiB, and the
    connection still carries a push."""
    big = request(apns_token())
    big.notification.preview = "x" * (1 << 20)
    huge = request(apns_token())
    huge.devices[0].token = "a" * (MAX_MESSAGE_BYTES + 1)
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{relay.port}", options=[("grpc.max_send_message_length", 8 << 20)]
    ) as channel:
        stub = relay_pb2_grpc.PushRelayStub(channel)
        codes = []
        for message in [big] * 6 + [huge] * 2:
            try:
                await stub.Send(message, timeout=10)
            except grpc.aio.AioRpcError as error:
                codes.append(error.code())
        answer = await stub.Send(request(apns_token()), timeout=10)
    assert (
        codes == [grpc.StatusCode.INVALID_ARGUMENT] * 6 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    )
    assert answer.results[0].outcome == pb.DELIVERED


async def test_what_a_unary_call_leaves_unread_is_acknowledged_as_it_ends(
    relay: RelayServer, fake_apns: FakeAPNs
) -> None:
    """A unary call reads one message: DATA after it (here a second message of 60 kB) is
    acknowledged when the call ends, or 70 such calls would use up the connection's 4 MiB
    window (h2 on the caller's side refuses to send beyond it)."""
    extra = _grpc_message(request(apns_token(), request_id="x" * 60_000))
    bodies = [_grpc_message(request(apns_token(), request_id=f"r{i}")) + extra for i in range(70)]
    answers, _ = await _raw_calls(relay.port, SEND, bodies, settings={})
    for i, (data, trailers) in enumerate(answers):
        assert trailers == {b"grpc-status": b"0"}
        assert pb.SendResponse.FromString(data[5:]).request_id == f"r{i}"


async def test_a_unary_call_leaves_no_async_generator_for_the_loop_to_close(
    relay: RelayServer, fake_apns: FakeAPNs
) -> None:
    """An async generator dropped before its end is closed by the loop's finalizer hook: a task
    of its own and a cross-thread wake-up (``call_soon_threadsafe``) for every call. The relay's
    unary path reads its request without one."""
    hooks = sys.get_asyncgen_hooks()
    left: list[str] = []

    def finalizer(agen: Any) -> None:
        if "/relay/" in agen.ag_code.co_filename:
            left.append(agen.__qualname__)
        hooks.finalizer(agen)

    sys.set_asyncgen_hooks(firstiter=hooks.firstiter, finalizer=finalizer)
    try:
        async with RelayClient(f"127.0.0.1:{relay.port}") as caller:
            for i in range(20):
                answer = await caller.send(request(apns_token(), request_id=f"r{i}"), timeout=10)
                assert answer.results[0].outcome == pb.DELIVERED
        gc.collect()
    finally:
        sys.set_asyncgen_hooks(*hooks)
    assert left == []
