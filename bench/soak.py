"""A soak: a fixed-rate mixed load on the real relay, with provider errors, for a bounded time.

    .venv/bin/python bench/soak.py [--seconds 60] [--rate 300] [--error-rate 0.05]

``push-relay serve`` runs in its own process against the bundled fake APNs, FCM and Web Push
(in this process, on loopback; their CA trusted through the system store, as Apple's and
Google's are, or with ``--ca-file`` through each app's ``ca_file``); this process sends
one-device ``Send`` calls at a fixed rate, spread across the three platforms, while the fakes
answer 5 % of requests with a 503 (the relay retries them within its budget). The relay and this
process run on a core each when there are two. It prints the relay's RSS and open descriptors
(from its own /metrics: the process is non-dumpable, so /proc/<pid> is not ours to read) idle,
after a warm-up at the same load and at the end, each read twice: as the load stops, and
settled, once the relay has been idle for ``--settle`` seconds (it hands free heap pages back
every 10 s). The settled pair is the growth: read as the load stops, RSS is the high-water mark
of the last burst of calls in flight (this process stalls at times and then sends in bursts),
which the relay gives back. Then what was delivered, every outcome (a call that failed whole
by its status, and the seconds such calls were sent in: RESOURCE_EXHAUSTED is the relay's
in-flight cap refusing a burst this process sent after a stall), p50/p99, this process's own
CPU and the circuit transitions. Memory and descriptors must not grow: compare the last lines.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from pushrelay.v1 import relay_pb2 as pb
from relay.client import RelayClient
from relay.testing.configs import vapid_key_pem
from relay.testing.credentials import ApnsKey
from relay.testing.fake_apns import FakeAPNs
from relay.testing.fake_fcm import FakeFCM
from relay.testing.fake_webpush import FakeWebPush
from relay.testing.tls import TestPKI, system_trust_with


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(
    work: Path, pki: TestPKI, key: ApnsKey, fakes: dict[str, Any], ca_file: bool
) -> tuple[Path, int, int]:
    (work / "ca.pem").write_bytes(pki.ca_pem)
    # The fakes' CA is trusted as Apple's and Google's are, through the system's store
    # (SSL_CERT_FILE, see _soak), unless --ca-file: then each app names it (ca_file), and
    # libcurl holds a copy of the whole trust blob (~220 KiB) for every request in flight.
    (work / "trust.pem").write_bytes(system_trust_with(pki.ca_pem))
    trust = {"ca_file": "ca.pem"} if ca_file else {}
    (work / "apns.p8").write_bytes(key.key_pem)
    (work / "sa.json").write_text(fakes["fcm"].service_account().to_json())
    (work / "vapid.pem").write_bytes(vapid_key_pem())
    grpc_port, http_port = _port(), _port()
    auth = {"key_file": "apns.p8", "key_id": key.key_id, "team_id": key.team_id}
    config = {
        "server": {"listen": f"127.0.0.1:{grpc_port}", "http_listen": f"127.0.0.1:{http_port}",
                   "log_level": "warning"},
        "apps": [
            {"id": "chat-ios", "platform": "apns", "topic": "com.example.chat", "auth": auth,
             "endpoint": fakes["apns"].url, **trust},
            {"id": "chat-android", "platform": "fcm", "service_account_file": "sa.json",
             "endpoint": fakes["fcm"].url, **trust},
            {"id": "chat-web", "platform": "webpush", **trust,
             "vapid": {"private_key_file": "vapid.pem", "subject": "mailto:ops@example.com"},
             "allowed_endpoints": ["127.0.0.1"]},
        ],
    }  # fmt: skip
    path = work / "relay.yaml"
    path.write_text(json.dumps(config))
    return path, grpc_port, http_port


async def _process_metrics(http_port: int) -> dict[str, float]:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{http_port}/metrics")).text
    wanted = ("process_resident_memory_bytes", "process_open_fds")
    values = {}
    for line in text.splitlines():
        name = line.split(" ")[0]
        if name in wanted:
            values[name] = float(line.split(" ")[1])
        if name.startswith("pushrelay_circuit_transitions_total") and 'state="open"' in name:
            values["circuit_opened"] = values.get("circuit_opened", 0) + float(line.split(" ")[1])
    return values


def _print_process(when: str, values: dict[str, float]) -> None:
    print(
        f"  {when}: RSS {values['process_resident_memory_bytes'] / 2**20:.1f} MiB, "
        f"{values['process_open_fds']:.0f} open descriptors",
        flush=True,
    )


def _device(platform: str, fakes: dict[str, Any]) -> pb.Device:
    if platform == "apns":
        return pb.Device(app_id="chat-ios", token=os.urandom(32).hex())
    if platform == "fcm":
        return pb.Device(app_id="chat-android", token="fcm-" + os.urandom(70).hex())
    sub = fakes["webpush"].subscribe()
    keys = pb.DeviceKeys(p256dh=sub.keys.p256dh, auth=sub.keys.auth)
    return pb.Device(app_id="chat-web", token=sub.endpoint, keys=keys)


def _inject(platform: str, fake: Any) -> None:
    if platform == "apns":
        fake.inject(503, "ServiceUnavailable")
    elif platform == "fcm":
        fake.inject(503, "UNAVAILABLE")
    else:
        fake.inject(503)


async def _load(args: argparse.Namespace, port: int, fakes: dict[str, Any]) -> dict[str, Any]:
    outcomes: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    failed: list[float] = []  # when each call that failed whole was sent, from the start
    platforms = ("apns", "fcm", "webpush")
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()
    async with RelayClient(f"127.0.0.1:{port}") as client:

        async def one(i: int, platform: str) -> None:
            request = pb.SendRequest(
                request_id=f"soak-{i}",
                notification=pb.Notification(
                    kind=pb.INSTANT_MESSAGE,
                    sender_display_name="Ada",
                    preview="soak",
                    conversation_id=f"c{i % 50}",
                ),
                devices=[_device(platform, fakes)],
            )
            started = loop.time()
            try:
                response = await client.send(request, timeout=10)
            except Exception as error:  # the call failed whole: count it by type and status
                code = getattr(error, "code", None)
                status = f":{code().name}" if callable(code) else ""
                outcomes[f"call:{type(error).__name__}{status}"] += 1
                failed.append(started - start)
                return
            latencies.append(loop.time() - started)
            result = response.results[0]
            outcomes[f"{platform}:{pb.Outcome.Name(result.outcome)}"] += 1

        start = loop.time()
        i = 0
        while (now := loop.time()) - start < args.seconds:
            due = start + i / args.rate
            if due > now:
                await asyncio.sleep(due - now)
            platform = platforms[i % 3]
            if random.random() < args.error_rate:
                _inject(platform, fakes[platform])
            task = asyncio.create_task(one(i, platform))
            pending.add(task)
            task.add_done_callback(pending.discard)
            for fake in fakes.values():
                fake.received.clear()  # the fakes must not be what grows
            i += 1
        await asyncio.gather(*pending)
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 100 else [0.0] * 99
    return {"sent": i, "outcomes": outcomes, "p50": cuts[49], "p99": cuts[98], "failed": failed}


async def _soak(args: argparse.Namespace) -> int:
    pki, key = TestPKI(), ApnsKey.generate()
    work = Path(tempfile.mkdtemp(prefix="push-relay-soak-"))
    try:
        async with (
            FakeAPNs(pki=pki, keys=[key]) as apns,
            FakeFCM(pki=pki) as fcm,
            FakeWebPush(pki=pki) as webpush,
        ):
            fakes = {"apns": apns, "fcm": fcm, "webpush": webpush}
            config, grpc_port, http_port = _config(work, pki, key, fakes, args.ca_file)
            # The relay and this process (the fakes and the load) on cores of their own, when
            # there are two: sharing both, this process stalled and then sent in bursts.
            cores = sorted(os.sched_getaffinity(0))
            pinned = len(cores) >= 2
            if pinned:
                os.sched_setaffinity(0, set(cores[1:]))
            relay = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).with_name("push-relay")), "serve", "--config", str(config),
                env={
                    **os.environ,
                    "PYTHONDONTWRITEBYTECODE": "1",
                    "SSL_CERT_FILE": str(work / "trust.pem"),
                },
                preexec_fn=(lambda: os.sched_setaffinity(0, {cores[0]})) if pinned else None,
            )  # fmt: skip
            try:
                return await _run(args, grpc_port, http_port, fakes)
            finally:
                relay.terminate()
                await relay.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def _run(
    args: argparse.Namespace, grpc_port: int, http_port: int, fakes: dict[str, Any]
) -> int:
    for _ in range(300):
        try:
            start = await _process_metrics(http_port)
            break
        except httpx.HTTPError:
            await asyncio.sleep(0.05)
    else:
        print("soak: the relay never came up", file=sys.stderr)
        return 1
    print(
        f"soak: {args.seconds:g} s at {args.rate:g} Send calls/s (one device each, APNs, FCM and "
        f"Web Push in turn), {args.error_rate:.0%} of provider requests answered 503",
        flush=True,
    )
    _print_process("idle ", start)
    warm = argparse.Namespace(**{**vars(args), "seconds": args.warmup})
    await _load(warm, grpc_port, fakes)  # connections, tokens, caches: then the baseline
    _print_process(f"after {args.warmup:g} s warm-up", await _process_metrics(http_port))
    await asyncio.sleep(args.settle)
    start = await _process_metrics(http_port)
    _print_process(f"  settled ({args.settle:g} s idle)", start)
    cpu, wall = time.process_time(), time.monotonic()
    result = await _load(args, grpc_port, fakes)
    own = 100 * (time.process_time() - cpu) / (time.monotonic() - wall)
    await asyncio.sleep(1)  # let the last answers settle
    loaded = await _process_metrics(http_port)
    _print_process("end  ", loaded)
    await asyncio.sleep(args.settle)
    end = await _process_metrics(http_port)
    _print_process(f"  settled ({args.settle:g} s idle)", end)
    delivered = sum(n for k, n in result["outcomes"].items() if k.endswith(":DELIVERED"))
    print(
        f"  sent {result['sent']}, delivered {delivered} ({delivered / max(result['sent'], 1):.1%})"
    )
    for name, count in sorted(result["outcomes"].items()):
        print(f"    {name:28s} {count}")
    if result["failed"]:
        seconds = sorted({int(t) for t in result["failed"]})
        print(
            f"    the calls that failed whole were sent in {len(seconds)} distinct seconds, "
            f"from {seconds[0]} s to {seconds[-1]} s into the load"
        )
    print(f"  latency p50 {result['p50'] * 1000:.1f} ms, p99 {result['p99'] * 1000:.1f} ms")
    print(f"  this process (fakes and load): {own:.0f} % of a core")
    print(f"  circuit opened: {end.get('circuit_opened', 0):.0f} times")
    growth = end["process_resident_memory_bytes"] / start["process_resident_memory_bytes"] - 1
    burst = loaded["process_resident_memory_bytes"] / start["process_resident_memory_bytes"] - 1
    descriptors = end["process_open_fds"] - start["process_open_fds"]
    print(f"  RSS as the load stopped {burst:+.1%} (the last burst's high-water mark)")
    print(f"  RSS settled {growth:+.1%}, descriptors {descriptors:+.0f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=300.0, help="Send calls per second")
    parser.add_argument("--error-rate", type=float, default=0.05)
    parser.add_argument("--warmup", type=float, default=10.0, help="load before the baseline")
    parser.add_argument(
        "--ca-file",
        action="store_true",
        help="trust the fakes through each app's ca_file instead of the system store",
    )
    parser.add_argument(
        "--settle", type=float, default=12.0, help="idle seconds before each settled reading"
    )
    return asyncio.run(_soak(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
