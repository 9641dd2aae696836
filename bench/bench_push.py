"""`make bench`: the relay beside the bare provider libraries, in one run, on one C sink.

    .venv/bin/python bench/bench_push.py [--seconds 8] [--warmup 2]

Every phase sends to the same nginx sink (``bench/sink.py``), pinned to core 1 and never the
bottleneck (its CPU is printed). Bare clients run in a process of their own pinned to core 0.
The relay is the real ``push-relay serve`` (as shipped: its event loop, logging at info) pinned to
core 0, and its load generator, a gRPC client in another process, is pinned to core 1 beside the
sink (its CPU is printed too). Each phase warms up, then counts what completes in its window.
Most phases keep a number of pushes in flight (a closed loop); the added-latency target is taken
from paced phases instead (sends start at 500/s, at most 10 at once, latency counted from each
send's scheduled start), since ten closed-loop callers saturate a relay or a bare client alike.

Printed per phase: pushes/s, CPU µs per push of the process under test, p50/p99 latency, the
sink's and the load generator's CPU (% of a core), and the relay's peak RSS (sampled every 0.2 s
while the load runs, after its warm-up); then the ratios the performance issue sets targets for,
and the start-up time of ``serve`` with four apps.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import secrets
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sink import Sink, available

RELAY_CORE, SIDE_CORE = "0", "1"
TOPIC = "com.example.chat"
# Phase names, as printed.
BARE_AIOAPNS = "APNs bare aioapns 4.0, 100 in flight"
BARE_TRANSPORT = "APNs bare transport, 100 in flight"
BARE_HTTPX = "FCM bare httpx, 100 in flight"
AGAIN = ", again"
RELAY_STREAM = "APNs relay SendStream, 100 in flight"
RELAY_UNARY = "APNs relay Send, 64 concurrent"
RELAY_FCM = "FCM relay SendStream, 100 in flight"
RELAY_WEBPUSH = "WebPush relay SendStream, 100 in fl."
RELAY_UNARY_10 = "APNs relay Send, 10 concurrent"
RELAY_PACED = "APNs relay Send, ≤10 at once, 500/s"
BARE_PACED = "APNs bare aioapns 4.0, ≤10 at once, 500/s"
PACED_RATE = 500.0  # well below the saturation of the relay and of bare aioapns alike
RELAY_1000 = "APNs relay, 1,000 in flight (1 s sink)"
BARE_AIOAPNS_10 = "APNs bare aioapns 4.0, 10 concurrent"
PAYLOAD = json.dumps(
    {"aps": {"alert": {"title": "Alice Martin", "body": "Are we still on for lunch at noon?"}}}
).encode()


# -- load generators and bare clients (each in a process of its own) ------------------------------


async def _drive(
    send: Callable[[int], Awaitable[object]], args: argparse.Namespace
) -> dict[str, float]:
    """Keep ``args.inflight`` sends going; count and time those that finish inside the window.

    With ``args.rate``, sends start on a fixed schedule instead (open loop, at most ``inflight``
    at once), and each latency runs from the send's scheduled start, so a late start counts.
    """
    inflight, rate = args.inflight, args.rate
    loop = asyncio.get_running_loop()
    start = loop.time() + args.warmup
    end = start + args.seconds
    latencies: list[float] = []
    cpu: list[float] = []
    errors = 0
    slots = itertools.count()
    first = loop.time()

    async def worker(w: int) -> None:
        nonlocal errors
        i = w
        while (now := loop.time()) < end:
            if rate:
                now = first + next(slots) / rate
                if now > loop.time():
                    await asyncio.sleep(now - loop.time())
            if not cpu and now >= start:
                cpu.append(time.process_time())
            try:
                await send(i)
            except Exception:
                errors += 1
            done = loop.time()
            if start <= now and done <= end:
                latencies.append(done - now)
            i += inflight

    await asyncio.gather(*(worker(w) for w in range(inflight)))
    used = time.process_time() - (cpu[0] if cpu else 0.0)
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 100 else [0.0] * 99
    return {
        "count": len(latencies),
        "rate": len(latencies) / args.seconds,
        "p50_ms": cuts[49] * 1000,
        "p99_ms": cuts[98] * 1000,
        "cpu_s": used,
        "errors": errors,
    }


def _apns_headers(token_header: str) -> Callable[[], list[bytes]]:
    def headers() -> list[bytes]:
        return [
            b"apns-id: " + str(uuid.uuid4()).encode(),
            b"apns-topic: " + TOPIC.encode(),
            b"apns-push-type: alert",
            b"apns-priority: 10",
            b"apns-expiration: 0",
            b"authorization: " + token_header.encode(),
            b"Accept:",
            b"Content-Type:",
        ]

    return headers


async def _bare(args: argparse.Namespace) -> dict[str, float]:
    info = args.info
    ca_pem = info["ca_pem"].encode()
    if args.worker == "aioapns":
        return await _bare_aioapns(args, info, ca_pem)
    if args.worker == "transport":
        from cryptography.hazmat.primitives import serialization

        from adapters._transport import Transport, TransportSettings
        from adapters.apns import ProviderToken

        key: Any = serialization.load_pem_private_key(info["key_pem"].encode(), None)
        header = ProviderToken(key, info["key_id"], info["team_id"]).get_header()
        headers = _apns_headers(header)
        transport = Transport(TransportSettings(ca_pem=ca_pem))
        url = info["url"] + "/3/device/"

        async def send(i: int) -> object:
            response = await transport.request(url + secrets.token_hex(32), headers(), PAYLOAD)
            assert response.status == 200
            return response

        try:
            return await _drive(send, args)
        finally:
            await transport.aclose()
    return await _bare_httpx(args, info, ca_pem)


async def _bare_aioapns(
    args: argparse.Namespace, info: dict[str, Any], ca_pem: bytes
) -> dict[str, float]:
    from aioapns.common import NotificationRequest
    from aioapns.connection import APNsKeyConnectionPool, APNsTLSClientProtocol

    host, port = info["url"].removeprefix("https://").split(":")

    class Protocol(APNsTLSClientProtocol):  # aioapns's documented way to point elsewhere
        APNS_SERVER, APNS_PORT = host, int(port)

    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.set_alpn_protocols(["h2"])  # as aioapns does for its own context
    pool = APNsKeyConnectionPool(
        key=info["key_pem"],
        key_id=info["key_id"],
        team_id=info["team_id"],
        topic=TOPIC,
        max_connections=1,
        ssl_context=context,
    )
    pool.protocol_class = Protocol
    message = json.loads(PAYLOAD)

    async def send(i: int) -> object:
        result = await pool.send_notification(
            NotificationRequest(secrets.token_hex(32), message, notification_id=str(uuid.uuid4()))
        )
        assert result.is_successful, result.status
        return result

    try:
        return await _drive(send, args)
    finally:
        pool.close()


async def _bare_httpx(
    args: argparse.Namespace, info: dict[str, Any], ca_pem: bytes
) -> dict[str, float]:
    import httpx

    url = info["url"] + "/v1/projects/bench/messages:send"
    context = ssl.create_default_context(cadata=ca_pem.decode())
    async with httpx.AsyncClient(http2=True, verify=context) as client:

        async def send(i: int) -> object:
            message = {"message": {"token": secrets.token_hex(80), "notification": {"body": "x"}}}
            response = await client.post(
                url, json=message, headers={"authorization": "Bearer bench-token"}
            )
            assert response.status_code == 200
            return response

        return await _drive(send, args)


def _request(pb: Any, i: int, app: str, info: dict[str, Any]) -> Any:
    keys = None
    token = secrets.token_hex(32)
    if app == "chat-android":
        token = secrets.token_hex(80)
    elif app == "chat-web":
        token = f"{info['url']}/push/{secrets.token_hex(8)}"
        keys = pb.DeviceKeys(p256dh=bytes.fromhex(info["p256dh"]), auth=bytes.fromhex(info["auth"]))
    return pb.SendRequest(
        request_id=f"r{i}",
        notification=pb.Notification(
            kind=pb.INSTANT_MESSAGE,
            sender_display_name="Alice Martin",
            preview="Are we still on for lunch at noon?",
            conversation_id="conv-7f3a",
        ),
        devices=[pb.Device(app_id=app, token=token, keys=keys)],
    )


async def _load(args: argparse.Namespace) -> dict[str, float]:
    import grpc

    from pushrelay.v1 import relay_pb2 as pb
    from pushrelay.v1 import relay_pb2_grpc

    requests = [_request(pb, i, args.app, args.info) for i in range(4096)]
    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = relay_pb2_grpc.PushRelayStub(channel)
        await stub.Send(requests[0], timeout=30)  # connections, provider tokens
        if args.worker == "unary":

            async def send(i: int) -> object:
                response = await stub.Send(requests[i % len(requests)], timeout=30)
                assert response.results[0].outcome == pb.DELIVERED, response
                return response

            return await _drive(send, args)
        return await _stream(stub, requests, args)


async def _stream(stub: Any, requests: list[Any], args: argparse.Namespace) -> dict[str, float]:
    """One SendStream with ``inflight`` requests outstanding, answered in any order."""
    call = stub.SendStream()
    pending: dict[str, asyncio.Future[None]] = {}
    outbox: asyncio.Queue[Any] = asyncio.Queue()

    async def reader() -> None:
        async for response in call:
            future = pending.pop(response.request_id, None)
            if future is not None:
                future.set_result(None)

    async def writer() -> None:  # one writer: a call's writes must not overlap
        while (request := await outbox.get()) is not None:
            await call.write(request)
        await call.done_writing()

    tasks = [asyncio.create_task(reader()), asyncio.create_task(writer())]
    loop = asyncio.get_running_loop()

    async def send(i: int) -> object:
        request = requests[i % len(requests)]
        future = loop.create_future()
        pending[request.request_id] = future
        outbox.put_nowait(request)
        return await future

    try:
        return await _drive(send, args)
    finally:
        outbox.put_nowait(None)
        await asyncio.gather(*tasks)


# -- the run -------------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status(path: str, field: str) -> int:
    """A number from a ``/proc`` status file (its first word after ``field:``), 0 if absent."""
    for line in Path(path).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _rss_mib(pid: int) -> float:
    return _status(f"/proc/{pid}/status", "VmRSS") / 1024


def _peak_rss_mib(worker: subprocess.Popen[str], pid: int, warmup: float) -> float:
    """The highest RSS of ``pid`` sampled every 0.2 s while ``worker`` runs, after its warm-up:
    what the process holds under the load, not what is left once the load has stopped."""
    time.sleep(warmup)
    peak = _rss_mib(pid)
    while worker.poll() is None:
        peak = max(peak, _rss_mib(pid))
        time.sleep(0.2)
    return peak


class Run:
    def __init__(self, args: argparse.Namespace, sink: Sink, spec: Path) -> None:
        self.args, self.sink, self.spec = args, sink, spec
        self.rows: dict[str, dict[str, float]] = {}

    def phase(
        self,
        name: str,
        worker: str,
        inflight: int,
        *,
        app: str = "",
        relay: int = 0,
        rate: float = 0.0,
    ) -> dict[str, float]:
        """Run one worker process; measure the sink (and the relay) around it."""
        core = SIDE_CORE if relay else RELAY_CORE
        command = ["taskset", "-c", core, sys.executable, __file__, "--worker", worker]
        command += ["--spec", str(self.spec), "--inflight", str(inflight)]
        command += ["--seconds", str(self.args.seconds), "--warmup", str(self.args.warmup)]
        command += ["--rate", str(rate)]
        if relay:
            command += ["--target", self.args.target, "--app", app]
        return self.measure(name, command, relay)

    def measure(
        self, name: str, command: list[str], relay: int, server: str = "relay"
    ) -> dict[str, float]:
        """Run ``command``, a worker printing :func:`_drive`'s figures; measure the sink and,
        if ``relay`` names one, the server under test (``server`` in the printed line)."""
        sink_pid = self.sink.process.pid if self.sink.process else 0
        before = {pid: _cpu_seconds(pid) for pid in (sink_pid, relay) if pid}
        worker = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        peak = _peak_rss_mib(worker, relay, self.args.warmup) if relay else 0.0
        out, _ = worker.communicate()
        if worker.returncode:
            raise subprocess.CalledProcessError(worker.returncode, command)
        after = {pid: _cpu_seconds(pid) for pid in before}
        row = json.loads(out)
        total = self.args.seconds + self.args.warmup
        count = max(row["count"], 1)
        # The sink's and the relay's CPU are read over the whole phase (warm-up included) and
        # shared out over the pushes of the whole phase, estimated from the window's rate.
        pushes = max(row["rate"] * total, 1)
        row["sink_pct"] = 100 * (after[sink_pid] - before[sink_pid]) / total
        if relay:
            row["relay_us"] = 1e6 * (after[relay] - before[relay]) / pushes
            row["relay_pct"] = 100 * (after[relay] - before[relay]) / total
            row["load_pct"] = 100 * row["cpu_s"] / self.args.seconds
            row["rss_mib"] = peak
        else:
            row["client_us"] = 1e6 * row["cpu_s"] / count
            row["client_pct"] = 100 * row["cpu_s"] / self.args.seconds
        self.rows[name] = row
        _print_row(name, row, server)
        return row


def _print_row(name: str, row: dict[str, float], server: str = "relay") -> None:
    """One phase's line; ``server`` names the process whose CPU a push is shown (the relay, or
    the peer gateway in ``bench/peer.py``)."""
    if "relay_us" in row:
        cost = f"{server} {row['relay_us']:6.0f} µs/push ({row['relay_pct']:3.0f}% core)"
        side = f"load gen {row['load_pct']:3.0f}%  RSS {row['rss_mib']:5.1f} MiB"
    else:
        cost = f"client {row['client_us']:5.0f} µs/push ({row['client_pct']:3.0f}% core)"
        side = ""
    print(
        f"{name:44s} {row['rate']:8.0f}/s  {cost}  p50 {row['p50_ms']:6.1f} "
        f"p99 {row['p99_ms']:6.1f} ms  sink {row['sink_pct']:3.0f}%  {side}"
        + (f"  errors {row['errors']:.0f}" if row["errors"] else ""),
        flush=True,
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_config(sink: Sink, work: Path, grpc_port: int, http_port: int) -> tuple[Path, Path]:
    from relay.testing._fcm_oauth import ServiceAccount
    from relay.testing.credentials import ApnsKey
    from relay.testing.device import TestSubscription
    from relay.testing.tls import system_trust_with

    key = ApnsKey.generate()
    (work / "ca.pem").write_bytes(sink.ca_pem)
    (work / "apns.p8").write_bytes(key.key_pem)
    account = ServiceAccount.generate("bench", token_uri=f"{sink.url}/token")
    (work / "sa.json").write_text(account.to_json())
    from relay.testing.configs import vapid_key_pem

    (work / "vapid.pem").write_bytes(vapid_key_pem())
    sub = TestSubscription.generate()
    # The relay trusts the sink as it trusts Apple and Google: through the system's store
    # (SSL_CERT_FILE, see _start_relay), not a ca_file, whose blob libcurl copies per handle.
    (work / "trust.pem").write_bytes(system_trust_with(sink.ca_pem))
    apns = {"platform": "apns", "topic": TOPIC, "max_concurrency": 1000}
    auth = {"key_file": "apns.p8", "key_id": key.key_id, "team_id": key.team_id}
    config = {
        "server": {"listen": f"127.0.0.1:{grpc_port}", "http_listen": f"127.0.0.1:{http_port}",
                   "log_level": "info"},
        "limits": {"max_inflight_requests": 4000, "default_deadline_seconds": 30},
        "apps": [
            {"id": "chat-ios", **apns, "endpoint": sink.url, "auth": auth},
            {"id": "slow-ios", **apns, "endpoint": sink.slow_url, "auth": auth},
            {"id": "chat-android", "platform": "fcm", "service_account_file": "sa.json",
             "endpoint": sink.url, "max_concurrency": 1000},
            {"id": "chat-web", "platform": "webpush", "max_concurrency": 1000,
             "vapid": {"private_key_file": "vapid.pem", "subject": "mailto:ops@example.com"},
             "allowed_endpoints": ["127.0.0.1"]},
        ],
    }  # fmt: skip
    path = work / "relay.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    spec = work / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "url": sink.url,
                "ca_file": str(work / "ca.pem"),
                "key_file": str(work / "apns.p8"),
                "key_id": key.key_id,
                "team_id": key.team_id,
                "p256dh": sub.p256dh.hex(),
                "auth": sub.auth.hex(),
            }
        )
    )
    return path, spec


def _start_relay(config: Path, http_port: int) -> tuple[subprocess.Popen[bytes], float]:
    """``push-relay serve`` pinned to the relay's core; seconds until /readyz says ready."""
    binary = Path(sys.executable).with_name("push-relay")
    trust = str(config.with_name("trust.pem"))
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "SSL_CERT_FILE": trust}
    started = time.perf_counter()
    relay = subprocess.Popen(
        ["taskset", "-c", RELAY_CORE, str(binary), "serve", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    while time.perf_counter() - started < 30:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return relay, time.perf_counter() - started
        except OSError:
            time.sleep(0.01)
    relay.kill()
    raise RuntimeError("the relay never became ready")


def _ratio(rows: dict[str, dict[str, float]], a: str, b: str, target: str) -> None:
    """``a``'s rate over ``b``'s, ``b`` averaged over its runs before and after the relay's."""
    runs = [rows[name]["rate"] for name in (b, b + AGAIN) if name in rows]
    if a in rows and runs and all(runs):
        base = sum(runs) / len(runs)
        spread = "" if len(runs) == 1 else f" (runs {' and '.join(f'{r:.0f}' for r in runs)}/s)"
        print(f"  {a} / {b}{spread}: {rows[a]['rate'] / base:.2f}  (target {target})")


def _unavailable() -> str:
    """Why this machine cannot run a bench on the sink ("" when it can)."""
    problem = available()
    if problem:
        return f"{problem}; `make bench` installs it"
    if (os.cpu_count() or 1) < 2:
        return "needs two cores (relay and sink pinned apart)"
    return ""


@contextlib.contextmanager
def _on_sink(prefix: str) -> Iterator[tuple[Sink, Path]]:
    """The nginx sink, pinned to its core, and a scratch directory removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        with Sink(_free_port(), core=int(SIDE_CORE)) as sink:
            yield sink, work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace) -> int:
    problem = _unavailable()
    if problem:
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    with _on_sink("push-relay-bench-") as (sink, work):
        return _phases(args, sink, work)


def _phases(args: argparse.Namespace, sink: Sink, work: Path) -> int:
    grpc_port, http_port = _free_port(), _free_port()
    config, spec = _write_config(sink, work, grpc_port, http_port)
    args.target = f"127.0.0.1:{grpc_port}"
    run = Run(args, sink, spec)
    print(
        f"bench: {args.warmup:g} s warm-up + {args.seconds:g} s per phase; sink nginx on core "
        f"{SIDE_CORE}; bare clients and the relay on core {RELAY_CORE}, load gen on core "
        f"{SIDE_CORE}\n"
    )
    run.phase(BARE_AIOAPNS, "aioapns", 100)
    run.phase(BARE_TRANSPORT, "transport", 100)
    run.phase(BARE_HTTPX, "httpx", 100)
    relay, startup = _start_relay(config, http_port)
    try:
        rss_start = _rss_mib(relay.pid)
        pid = relay.pid
        run.phase(RELAY_STREAM, "stream", 100, app="chat-ios", relay=pid)
        run.phase(RELAY_UNARY, "unary", 64, app="chat-ios", relay=pid)
        run.phase(RELAY_FCM, "stream", 100, app="chat-android", relay=pid)
        run.phase(RELAY_WEBPUSH, "stream", 100, app="chat-web", relay=pid)
        # The bare libraries again, the relay idle: this machine's speed drifts by 10-20 % over
        # minutes, so the ratios take the bare runs before and after the relay's phases.
        run.phase(BARE_AIOAPNS + AGAIN, "aioapns", 100)
        run.phase(BARE_HTTPX + AGAIN, "httpx", 100)
        run.phase(RELAY_UNARY_10, "unary", 10, app="chat-ios", relay=pid)
        run.phase(RELAY_PACED, "unary", 10, app="chat-ios", relay=pid, rate=PACED_RATE)
        run.phase(RELAY_1000, "stream", 1000, app="slow-ios", relay=pid)
        rss_end = _rss_mib(relay.pid)
    finally:
        relay.terminate()
        relay.wait(15)
    run.phase(BARE_AIOAPNS_10, "aioapns", 10)
    run.phase(BARE_PACED, "aioapns", 10, rate=PACED_RATE)
    rows = run.rows
    print("\nratios (same sink, same core):")
    _ratio(rows, RELAY_STREAM, BARE_AIOAPNS, "≥ 1.2")
    _ratio(rows, RELAY_UNARY, BARE_AIOAPNS, "≥ 0.8")
    _ratio(rows, RELAY_FCM, BARE_HTTPX, "≥ 4")
    _ratio(rows, BARE_TRANSPORT, BARE_AIOAPNS, "-")
    added = rows[RELAY_PACED]["p99_ms"] - rows[BARE_PACED]["p99_ms"]
    print(
        f"  added p99 below saturation, ≤10 at once at {PACED_RATE:.0f}/s (relay - bare "
        f"aioapns): {added:.2f} ms  (target ≤ 2 ms)"
    )
    # Ten callers in a closed loop saturate both on one core: latency there is queueing, 10 x
    # the CPU per push, shown for reference.
    added = rows[RELAY_UNARY_10]["p99_ms"] - rows[BARE_AIOAPNS_10]["p99_ms"]
    print(f"  added p99 at saturation, 10 callers in a closed loop: {added:.2f} ms  (reference)")
    print(
        f"  relay RSS: {rss_start:.1f} MiB at start, {rows[RELAY_1000]['rss_mib']:.1f} "
        f"MiB at its peak with 1,000 in flight, {rss_end:.1f} MiB at the end  (target ≤ 100 MB "
        f"= 95.4 MiB)"
    )
    print(f"  start-up: serve SERVING (/readyz) in {startup:.2f} s with 4 apps  (target ≤ 1.5 s)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measured window per phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up per phase")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--inflight", type=int, default=100, help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--app", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.spec:
        spec = json.loads(Path(args.spec).read_text())
        ca_pem, key_pem = (Path(spec[name]).read_text() for name in ("ca_file", "key_file"))
        args.info = {**spec, "ca_pem": ca_pem, "key_pem": key_pem}
    if args.worker in ("aioapns", "transport", "httpx"):
        print(json.dumps(asyncio.run(_bare(args))))
        return 0
    if args.worker in ("stream", "unary"):
        print(json.dumps(asyncio.run(_load(args))))
        return 0
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
