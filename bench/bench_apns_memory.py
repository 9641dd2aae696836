"""Memory benchmark for the APNs adapter: RSS must stay flat across many sends on one connection.

aioapns 4.0 keeps ~290 bytes per successful push on the connection (+57 MB per 200k sends);
``adapters/apns.py`` (on the libcurl transport since 2026-12-04) keeps nothing per push once its
request ends. This script runs the fake
APNs and the adapter in one process, warms up, then prints RSS every ``--every`` sends and the
verdict: flat when every sample stays within ±10 % of the first one after warm-up.

    .venv/bin/python bench/bench_apns_memory.py --sends 100000
    .venv/bin/python bench/bench_apns_memory.py --sends 100000 --raw   # aioapns as it is

The warm-up (70k by default) also fills the fake server's own bounded h2 state, which lives in
the same process. One push in ten goes to a dead token (410 + body), so the error path is
measured too (not with ``--raw``: aioapns stalls after ~1,200 error bodies on a connection).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aioapns.common import NotificationRequest
from aioapns.connection import APNsKeyConnectionPool, APNsTLSClientProtocol

from adapters.apns import ApnsAdapter, ApnsSettings
from adapters.base import Push
from relay.testing.credentials import ApnsKey
from relay.testing.fake_apns import FakeAPNs

TOPIC = "com.example.chat"
PAYLOAD = {"aps": {"alert": {"title": "Ada", "body": "See you at eight?"}}, "relay": {"v": 1}}
DEAD_EVERY = 10

Send = Callable[[int], Awaitable[object]]


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def token(n: int) -> str:
    return f"{n:064x}"


async def adapter_sender(
    apns: FakeAPNs, key: ApnsKey
) -> tuple[Send, Callable[[], Awaitable[None]]]:
    settings = ApnsSettings(
        app_id="bench",
        topic=TOPIC,
        key_pem=key.key_pem,
        key_id=key.key_id,
        team_id=key.team_id,
        endpoint=apns.url,
        ca_pem=apns.ca_pem,
        max_connections=1,
    )
    adapter = await ApnsAdapter.create(settings)

    async def send(n: int) -> object:
        return await adapter.send(Push(token=token(n % DEAD_EVERY), payload=PAYLOAD))

    return send, adapter.aclose


async def raw_sender(apns: FakeAPNs, key: ApnsKey) -> tuple[Send, Callable[[], Awaitable[None]]]:
    class Protocol(APNsTLSClientProtocol):
        APNS_SERVER, APNS_PORT = "127.0.0.1", apns.port

    pool = APNsKeyConnectionPool(
        key=key.key_pem.decode(),
        key_id=key.key_id,
        team_id=key.team_id,
        topic=TOPIC,
        max_connections=1,
        ssl_context=ssl.create_default_context(cadata=apns.ca_pem.decode()),
    )
    pool.protocol_class = Protocol

    async def send(n: int) -> object:
        return await pool.send_notification(NotificationRequest(token(1), dict(PAYLOAD)))

    async def close() -> None:
        pool.close()
        await asyncio.sleep(0.2)

    return send, close


async def run_batch(send: Send, apns: FakeAPNs, start: int, count: int, concurrency: int) -> None:
    """``count`` sends, ``concurrency`` at a time, by a fixed set of workers (no task per send)."""
    numbers = iter(range(start, start + count))

    async def worker() -> None:
        for n in numbers:
            await send(n)
            if len(apns.received) >= 1000:
                apns.received.clear()  # the fake's own log of requests is not ours to measure

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def sample(baseline: float, done: int) -> float:
    gc.collect()
    rss = rss_mib()
    print(
        f"after {done:>7} sends: RSS {rss:7.1f} MiB ({(rss - baseline) / baseline * 100:+5.1f} %)"
    )
    return rss


async def measure(apns: FakeAPNs, send: Send, args: argparse.Namespace) -> list[float]:
    """Warm up, then RSS every ``args.every`` sends; returns [baseline, samples...]."""
    await run_batch(send, apns, 0, args.warmup, args.concurrency)
    apns.received.clear()
    gc.collect()
    rss = [rss_mib()]
    client = "aioapns 4.0 as is" if args.raw else "ApnsAdapter"
    print(f"client: {client}; warm-up {args.warmup} sends; baseline RSS {rss[0]:.1f} MiB")
    for done in range(args.every, args.sends + 1, args.every):
        await run_batch(send, apns, args.warmup + done - args.every, args.every, args.concurrency)
        rss.append(sample(rss[0], done))
    return rss


async def main(args: argparse.Namespace) -> int:
    args.every = max(1, min(args.every, args.sends))  # at least one sample, whatever the counts
    key = ApnsKey.generate()
    async with FakeAPNs(keys=[key], topics=[TOPIC]) as apns:
        apns.mark_dead(token(0))  # one push in DEAD_EVERY goes to token 0
        send, close = await (raw_sender if args.raw else adapter_sender)(apns, key)
        started = time.perf_counter()
        baseline, *samples = await measure(apns, send, args)
        elapsed = time.perf_counter() - started
        await close()
        connections = apns.connections_opened
    worst = max(abs(s - baseline) / baseline * 100 for s in samples)
    flat = worst <= 10.0
    total = args.warmup + len(samples) * args.every
    print(
        f"{total} sends in {elapsed:.1f} s ({total / elapsed:.0f}/s) on {connections} "
        f"connection(s); worst drift {worst:.1f} % -> {'FLAT' if flat else 'GROWING'} (±10 %)"
    )
    return 0 if flat else 1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sends", type=int, default=100_000, help="sends measured")
    # 70k: past the fake server's own h2 closed-stream memory (65,536 streams per connection).
    parser.add_argument("--warmup", type=int, default=70_000, help="sends before the baseline")
    parser.add_argument("--every", type=int, default=10_000, help="sends between RSS samples")
    parser.add_argument("--concurrency", type=int, default=200, help="sends in flight")
    parser.add_argument("--raw", action="store_true", help="measure aioapns 4.0 unfixed")
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
