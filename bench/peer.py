"""The peer gateway side by side: Matrix's Sygnal, the relay and bare aioapns, one run, one sink.

    .venv/bin/python bench/peer.py --sygnal-python PATH [--rounds 2] [--seconds 8] [--warmup 2]

Sygnal is not on PyPI: install it from its sources (github.com/element-hq/sygnal) into a venv
of its own and pass that venv's Python, for example::

    python3 -m venv /tmp/sygnal && /tmp/sygnal/bin/pip install ./sygnal
    make bench-peer SYGNAL_PYTHON=/tmp/sygnal/bin/python

Each round, on the nginx sink of ``make bench`` (``bench/sink.py``, pinned to core 1): bare
aioapns 4.0 with 100 in flight, the relay's ``SendStream`` (100 in flight) and unary ``Send``
(64 concurrent), Sygnal with 64 concurrent ``/_matrix/push/v1/notify`` calls (one APNs device
each, HTTP/1.1 keep-alive, JSON), then bare aioapns again. The relay and Sygnal each run pinned
to core 0, alone there while measured, logging as they ship (the relay at info, Sygnal at INFO
to a discarded stdout); their load generators run on core 1 and print their CPU. Sygnal's
aioapns 3 is pointed at the sink instead of Apple (its ``APNS_SERVER``/``APNS_PORT`` class
attributes) and offers ALPN ``h2``, which nginx needs and Apple does not; it trusts the sink
through ``SSL_CERT_FILE``, as the relay does. Printed: the ``make bench`` columns for each
phase, then the ratios relay/Sygnal and each of them over bare aioapns.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_push as bench

SYGNAL = "Sygnal, 64 concurrent (HTTP/1.1 JSON)"
APP_ID = bench.TOPIC

# Run by Sygnal's own Python: its APNs client (aioapns 3) pointed at the sink, then Sygnal.
_LAUNCH = """
import os, ssl
import aioapns.connection as c
for cls in (c.APNsBaseClientProtocol, c.APNsTLSClientProtocol,
            c.APNsProductionClientProtocol, c.APNsDevelopmentClientProtocol):
    cls.APNS_SERVER = os.environ["APNS_HOST"]
c.APNsTLSClientProtocol.APNS_PORT = int(os.environ["APNS_PORT"])
_default = ssl.create_default_context
def _with_h2(*args, **kwargs):
    context = _default(*args, **kwargs)
    context.set_alpn_protocols(["h2"])
    return context
c.ssl.create_default_context = _with_h2  # aioapns.connection's own reference to the module
from sygnal.sygnal import main
main()
"""


def _sygnal_config(work: Path, spec: dict[str, Any], port: int) -> Path:
    info = {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}
    stdout = {"class": "logging.StreamHandler", "formatter": "normal", "stream": "ext://sys.stdout"}
    config = {
        "log": {
            "setup": {
                "version": 1,
                "formatters": {"normal": info},
                "handlers": {"stdout": stdout},
                "root": {"handlers": ["stdout"], "level": "INFO"},
                "disable_existing_loggers": False,
            },
            "access": {"x_forwarded_for": False},
        },
        "http": {"bind_addresses": ["127.0.0.1"], "port": port},
        "metrics": {name: {"enabled": False} for name in ("prometheus", "opentracing", "sentry")},
        "apps": {
            APP_ID: {
                "type": "apns",
                "keyfile": spec["key_file"],
                "key_id": spec["key_id"],
                "team_id": spec["team_id"],
                "topic": bench.TOPIC,
                "platform": "production",
            }
        },
    }
    path = work / "sygnal.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        if process.poll() is not None:
            raise RuntimeError("Sygnal exited at start (its stderr is above)")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("Sygnal never listened")


def _sygnal_phase(
    run: bench.Run, args: argparse.Namespace, config: Path, work: Path, port: int
) -> None:
    """Sygnal on the relay's core, its load generator (this file's worker) on the other."""
    sink_url = run.sink.url.rsplit(":", 1)
    env = {
        **os.environ,
        "SYGNAL_CONF": str(config),
        "APNS_HOST": "127.0.0.1",
        "APNS_PORT": sink_url[1],
        "SSL_CERT_FILE": str(work / "trust.pem"),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    command = ["taskset", "-c", bench.RELAY_CORE, args.sygnal_python, "-c", _LAUNCH]
    sygnal = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    try:
        _wait_listening(port, sygnal)
        load = ["taskset", "-c", bench.SIDE_CORE, sys.executable, __file__, "--worker", "sygnal"]
        load += ["--port", str(port), "--inflight", "64"]
        load += ["--seconds", str(args.seconds), "--warmup", str(args.warmup)]
        run.measure(SYGNAL, load, sygnal.pid, server="Sygnal")
    finally:
        sygnal.terminate()
        sygnal.wait(15)


async def _sygnal_load(args: argparse.Namespace) -> dict[str, float]:
    """``args.inflight`` keep-alive HTTP/1.1 connections, one notify call at a time on each."""
    connections = [
        await asyncio.open_connection("127.0.0.1", args.port) for _ in range(args.inflight)
    ]
    requests = []
    for i in range(4096):
        device = {"app_id": APP_ID, "pushkey": base64.b64encode(secrets.token_bytes(32)).decode()}
        notification = {
            "event_id": f"$event{i}",
            "room_id": "!room:example.org",
            "type": "m.room.message",
            "sender": "@alice:example.org",
            "sender_display_name": "Alice Martin",
            "content": {"msgtype": "m.text", "body": "Are we still on for lunch at noon?"},
            "counts": {"unread": 1},
            "devices": [{**device, "pushkey_ts": 0}],
        }
        body = json.dumps({"notification": notification}).encode()
        head = (
            b"POST /_matrix/push/v1/notify HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        requests.append(head + body)

    async def send(i: int) -> None:
        reader, writer = connections[i % args.inflight]
        writer.write(requests[i % len(requests)])
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        fields = dict(
            line.split(b":", 1) for line in head.lower().split(b"\r\n")[1:] if b":" in line
        )
        if b"chunked" in fields.get(b"transfer-encoding", b""):
            body = b""
            while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
                body += (await reader.readexactly(size + 2))[:-2]
            await reader.readuntil(b"\r\n")  # the empty trailer section
        else:
            body = await reader.readexactly(int(fields.get(b"content-length", b"0")))
        if status != 200 or json.loads(body) != {"rejected": []}:
            raise RuntimeError(f"Sygnal answered {status}")

    await send(0)  # the first call opens Sygnal's APNs connection
    return await bench._drive(send, args)


def _ratios(rows: dict[str, dict[str, float]]) -> None:
    bench._ratio(rows, bench.RELAY_UNARY, SYGNAL, "-")
    bench._ratio(rows, bench.RELAY_STREAM, SYGNAL, "-")
    bench._ratio(rows, SYGNAL, bench.BARE_AIOAPNS, "-")
    bench._ratio(rows, bench.RELAY_UNARY, bench.BARE_AIOAPNS, "≥ 0.8")
    bench._ratio(rows, bench.RELAY_STREAM, bench.BARE_AIOAPNS, "≥ 1.2")


def _run(args: argparse.Namespace) -> int:
    problem = bench._unavailable()
    if problem:
        print(f"peer: {problem}", file=sys.stderr)
        return 2
    if not args.sygnal_python or not Path(args.sygnal_python).is_file():
        where = args.sygnal_python or "--sygnal-python (SYGNAL_PYTHON= for make)"
        print(
            f"peer: no Python at {where}; see bench/peer.py on installing Sygnal", file=sys.stderr
        )
        return 2
    with bench._on_sink("push-relay-peer-") as (sink, work):
        grpc_port, http_port, sygnal_port = (bench._free_port() for _ in range(3))
        config, spec = bench._write_config(sink, work, grpc_port, http_port)
        sygnal_config = _sygnal_config(work, json.loads(spec.read_text()), sygnal_port)
        args.target = f"127.0.0.1:{grpc_port}"
        print(
            f"peer: {args.warmup:g} s warm-up + {args.seconds:g} s per phase; sink nginx on "
            f"core {bench.SIDE_CORE}; bare aioapns, the relay and Sygnal on core "
            f"{bench.RELAY_CORE}, each alone there; load generators on core {bench.SIDE_CORE}"
        )
        for round_ in range(1, args.rounds + 1):
            print(f"\nround {round_}:")
            run = bench.Run(args, sink, spec)
            run.phase(bench.BARE_AIOAPNS, "aioapns", 100)
            relay, _ = bench._start_relay(config, http_port)
            try:
                run.phase(bench.RELAY_STREAM, "stream", 100, app="chat-ios", relay=relay.pid)
                run.phase(bench.RELAY_UNARY, "unary", 64, app="chat-ios", relay=relay.pid)
            finally:
                relay.terminate()
                relay.wait(15)
            _sygnal_phase(run, args, sygnal_config, work, sygnal_port)
            run.phase(bench.BARE_AIOAPNS + bench.AGAIN, "aioapns", 100)
            print("ratios (same sink, same core):")
            _ratios(run.rows)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sygnal-python", default="", help="a Python with Sygnal installed")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured window per phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up per phase")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--inflight", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "sygnal":
        args.rate = 0.0
        print(json.dumps(asyncio.run(_sygnal_load(args))))
        return 0
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
