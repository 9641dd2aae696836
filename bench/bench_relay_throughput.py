"""Throughput of the whole relay: gRPC in, render, APNs adapter, fake APNs, gRPC out.

    .venv/bin/python bench/bench_relay_throughput.py --requests 5000

Runs the fake APNs and the relay in this process and the client in a child process (so the
client's gRPC work does not share the relay's event loop), then prints pushes per second for
SendStream (pipelined) and for concurrent unary Send calls, with unary latency percentiles.
Compare with bench/bench_apns_memory.py, which drives the bare adapter: the gap is the relay's
own cost per push.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import statistics
import sys
import time

import grpc

from pushrelay.v1 import relay_pb2 as pb
from pushrelay.v1 import relay_pb2_grpc
from relay.config import Limits
from relay.server import RelayServer
from relay.testing.configs import apns_app, local_config
from relay.testing.credentials import ApnsKey
from relay.testing.fake_apns import FakeAPNs


def _request(i: int) -> pb.SendRequest:
    return pb.SendRequest(
        request_id=f"b{i}",
        notification=pb.Notification(
            kind=pb.INSTANT_MESSAGE,
            sender_display_name="Alice Martin",
            preview="Are we still on for lunch at noon?",
            conversation_id="conv-7f3a",
        ),
        devices=[pb.Device(app_id="chat-ios", token=secrets.token_hex(32))],
    )


async def _client(target: str, requests: int, concurrency: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = relay_pb2_grpc.PushRelayStub(channel)
        await stub.Send(_request(-1), timeout=10)  # warm-up: connections, provider token
        started = time.perf_counter()
        answered = [a async for a in stub.SendStream(iter(map(_request, range(requests))))]
        stream_rate = len(answered) / (time.perf_counter() - started)
        latencies: list[float] = []

        async def worker(count: int) -> None:
            for i in range(count):
                t0 = time.perf_counter()
                await stub.Send(_request(i), timeout=10)
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
        unary_rate = len(latencies) / (time.perf_counter() - started)
    cuts = statistics.quantiles(latencies, n=100)
    return {"stream": stream_rate, "unary": unary_rate, "p50": cuts[49], "p99": cuts[98]}


async def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.ERROR)  # the open-API warning is expected here
    key = ApnsKey.generate()
    async with FakeAPNs(keys=[key], record=False) as apns:
        config = local_config(
            [apns_app(apns, key, max_concurrency=args.concurrency)],
            limits=Limits(default_deadline_seconds=30),
        )
        relay = RelayServer(config)
        await relay.start()
        try:
            child = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--client", f"127.0.0.1:{relay.port}",
                "--requests", str(args.requests), "--concurrency", str(args.concurrency),
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, _ = await child.communicate()
        finally:
            await relay.stop(grace=1)
    figures = json.loads(out)
    print(
        f"{args.requests} requests of 1 device each, {os.cpu_count()} cores, relay + fake in one "
        f"process, client in another\n"
        f"  SendStream (pipelined):        {figures['stream']:7.0f} pushes/s\n"
        f"  Send x{args.concurrency} concurrent callers: {figures['unary']:7.0f} pushes/s, "
        f"p50 {figures['p50'] * 1000:.1f} ms, p99 {figures['p99'] * 1000:.1f} ms"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--client", metavar="TARGET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        figures = asyncio.run(_client(args.client, args.requests, args.concurrency))
        print(json.dumps(figures))
        return 0
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
