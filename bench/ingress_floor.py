"""The gRPC server's own cost: grpc.aio against grpclib, with a servicer that does nothing.

    .venv/bin/python bench/ingress_floor.py [--seconds 4] [--rounds 2]

Each server (grpc.aio, grpclib; both on uvloop) answers PushRelay's ``Send`` and ``SendStream``
at once, pinned to core 0; a load generator pinned to core 1 keeps 100 requests in flight on one
``SendStream``. The load generator writes pre-encoded HTTP/2 frames and only counts the answers'
gRPC messages, so it is never the limit (its CPU is printed): the server's CPU per message is
what the server costs. A third row per server uses ``bench/bench_push.py``'s grpc.aio client
(unary, 64 concurrent), whose own CPU is then the limit. Figures: ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "proto"), str(HERE)]


# -- the servers -----------------------------------------------------------------------------------


def _answer(pb: Any, request: Any) -> Any:
    return pb.SendResponse(
        request_id=request.request_id, results=[pb.DeviceResult(outcome=pb.DELIVERED)]
    )


async def _grpc_aio(port: int) -> None:
    import grpc

    from pushrelay.v1 import relay_pb2 as pb
    from pushrelay.v1 import relay_pb2_grpc

    class Servicer(relay_pb2_grpc.PushRelayServicer):
        async def Send(self, request: Any, context: Any) -> Any:
            return _answer(pb, request)

        async def SendStream(self, requests: Any, context: Any) -> Any:
            async for request in requests:
                yield _answer(pb, request)

    server = grpc.aio.server()
    relay_pb2_grpc.add_PushRelayServicer_to_server(Servicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


async def _grpclib(port: int) -> None:
    from grpclib.const import Cardinality, Handler
    from grpclib.server import Server

    from pushrelay.v1 import relay_pb2 as pb

    async def send(stream: Any) -> None:
        await stream.send_message(_answer(pb, await stream.recv_message()))

    async def send_stream(stream: Any) -> None:
        async for request in stream:
            await stream.send_message(_answer(pb, request))

    class Service:
        def __mapping__(self) -> dict[str, Handler]:
            path = "/pushrelay.v1.PushRelay/"
            req, rep = pb.SendRequest, pb.SendResponse
            return {
                path + "Send": Handler(send, Cardinality.UNARY_UNARY, req, rep),
                path + "SendStream": Handler(send_stream, Cardinality.STREAM_STREAM, req, rep),
            }

    server = Server([Service()])
    await server.start("127.0.0.1", port)
    print("ready", flush=True)
    await server.wait_closed()


# -- the raw HTTP/2 load generator ---------------------------------------------------------------


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    head = struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream)
    return head + payload


class _Raw(asyncio.Protocol):
    """One SendStream over raw frames: ``inflight`` messages out, a new one per answer."""

    def __init__(self, port: int, inflight: int, messages: list[bytes]) -> None:
        self.port, self.inflight, self.messages = port, inflight, messages
        self.buffer = self.grpc = b""
        self.window = self.stream_window = self.initial = 65535
        self.sent = self.out = self.count = 0
        self.counting = False
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        import hpack

        self.transport = transport
        headers = hpack.Encoder().encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/pushrelay.v1.PushRelay/SendStream"),
                (":authority", f"127.0.0.1:{self.port}"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ]
        )
        big = (1 << 31) - 1
        transport.write(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + _frame(4, 0, 0, struct.pack(">HI", 4, big))  # SETTINGS: a large stream window
            + _frame(8, 0, 0, struct.pack(">I", big - 65535))  # and connection window
            + _frame(1, 4, 1, headers)
        )
        self._pump()

    def _pump(self) -> None:
        out = []
        while self.out < self.inflight:
            message = self.messages[self.sent % len(self.messages)]
            if len(message) > min(self.window, self.stream_window):
                break
            self.sent += 1
            self.out += 1
            self.window -= len(message)
            self.stream_window -= len(message)
            out.append(_frame(0, 0, 1, message))
        if out:
            self.transport.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        buffer, at = self.buffer + data, 0
        while len(buffer) - at >= 9:
            length = int.from_bytes(buffer[at : at + 3], "big")
            if len(buffer) - at < 9 + length:
                break
            kind, flags = buffer[at + 3], buffer[at + 4]
            stream = int.from_bytes(buffer[at + 5 : at + 9], "big") & 0x7FFFFFFF
            payload = buffer[at + 9 : at + 9 + length]
            at += 9 + length
            if kind == 0:
                self._answers(payload)
            elif kind == 4 and not flags & 1:  # SETTINGS: acknowledge, track the stream window
                for i in range(0, len(payload), 6):
                    ident, value = struct.unpack(">HI", payload[i : i + 6])
                    if ident == 4:
                        self.stream_window += value - self.initial
                        self.initial = value
                self.transport.write(_frame(4, 1, 0, b""))
            elif kind == 8:
                grant = int.from_bytes(payload, "big") & 0x7FFFFFFF
                if stream == 0:
                    self.window += grant
                else:
                    self.stream_window += grant
            elif kind == 6 and not flags & 1:
                self.transport.write(_frame(6, 1, 0, payload))
            elif (kind in (3, 7) or (kind == 1 and flags & 1)) and not self.lost.done():
                # a reset, a GOAWAY or the call's trailers: the load ended early
                self.lost.set_exception(RuntimeError(f"frame type {kind}: {payload[:100]!r}"))
        self.buffer = buffer[at:]
        self._pump()

    def _answers(self, payload: bytes) -> None:
        data, at, answered = self.grpc + payload, 0, 0
        while len(data) - at >= 5:
            length = int.from_bytes(data[at + 1 : at + 5], "big")
            if len(data) - at < 5 + length:
                break
            at += 5 + length
            answered += 1
        self.grpc = data[at:]
        self.out -= answered
        if self.counting:
            self.count += answered

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


async def _raw_load(port: int, inflight: int, seconds: float, warmup: float) -> dict[str, float]:
    import bench_push

    from pushrelay.v1 import relay_pb2 as pb

    messages = []
    for i in range(4096):
        body = bench_push._request(pb, i, "chat-ios", {}).SerializeToString()
        messages.append(b"\0" + struct.pack(">I", len(body)) + body)
    loop = asyncio.get_running_loop()
    transport, raw = await loop.create_connection(
        lambda: _Raw(port, inflight, messages), "127.0.0.1", port
    )
    await asyncio.sleep(warmup)
    raw.counting = True
    cpu, start = time.process_time(), loop.time()
    await asyncio.wait([raw.lost], timeout=seconds)
    if raw.lost.done() and raw.lost.exception():
        raise raw.lost.exception()  # type: ignore[misc]
    elapsed = loop.time() - start
    transport.abort()
    return {"rate": raw.count / elapsed, "cpu_s": time.process_time() - cpu}


# -- the run -------------------------------------------------------------------------------------


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _row(server: str, load: str, seconds: float, spec: Path) -> str:
    port = _port()
    serve = [sys.executable, __file__, "--serve", server, "--port", str(port)]
    proc = subprocess.Popen(["taskset", "-c", "0", *serve], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        if load == "raw stream":
            load_cmd = [__file__, "--raw", "--port", str(port), "--seconds", str(seconds)]
        else:
            load_cmd = [str(HERE / "bench_push.py"), "--worker", "unary", "--inflight", "64"]
            load_cmd += ["--spec", str(spec), "--seconds", str(seconds), "--warmup", "1.5"]
            load_cmd += ["--target", f"127.0.0.1:{port}", "--app", "chat-ios"]
        gen = subprocess.Popen(
            ["taskset", "-c", "1", sys.executable, *load_cmd], stdout=subprocess.PIPE, text=True
        )
        time.sleep(1.8)
        cpu0, t0 = _cpu(proc.pid), time.monotonic()
        time.sleep(seconds - 0.6)
        used, wall = _cpu(proc.pid) - cpu0, time.monotonic() - t0
        out = json.loads(gen.communicate()[0])
    finally:
        proc.kill()
        proc.wait()
    per = used / wall / out["rate"] * 1e6
    return (
        f"{server:9s} {load:11s} {out['rate']:8.0f}/s  server {per:6.1f} µs a message "
        f"({100 * used / wall:3.0f}% core)  load generator {100 * out['cpu_s'] / seconds:3.0f}%"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import uvloop

    if args.serve:
        uvloop.run(_grpc_aio(args.port) if args.serve == "grpc.aio" else _grpclib(args.port))
        return 0
    if args.raw:
        print(json.dumps(uvloop.run(_raw_load(args.port, 100, args.seconds, 1.5))))
        return 0
    with tempfile.TemporaryDirectory() as work:
        spec = Path(work, "spec.json")  # what bench_push.py's workers read; unused here
        spec.write_text(json.dumps({"ca_file": os.devnull, "key_file": os.devnull}))
        for _ in range(args.rounds):
            for load in ("raw stream", "aio unary"):
                for server in ("grpc.aio", "grpclib"):
                    print(_row(server, load, args.seconds, spec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
