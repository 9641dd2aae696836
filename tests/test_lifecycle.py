"""Graceful shutdown and reload: real `push-relay serve` processes and real signals."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import jwt
import pytest

from pushrelay.v1 import relay_pb2 as pb
from relay.client import RelayClient
from relay.testing.configs import apns_app, local_config
from relay.testing.credentials import ApnsKey
from relay.testing.fake_apns import FakeAPNs
from tests.support import apns_token, request
from tests.test_cli import ENV, write_config


class Serve:
    """A `push-relay serve` subprocess whose JSON log lines are collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[dict[str, object]] = []
        self._reader = asyncio.create_task(self._read())
        self.port = 0

    @classmethod
    async def start(cls, config: Path, module: str = "relay.cli") -> Serve:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, "serve", "--config", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=ENV,
        )  # fmt: skip
        serve = cls(proc)
        line = await serve.wait_for("serving")
        serve.port = int(str(line["port"]))
        return serve

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(json.loads(raw))

    async def wait_for(self, msg: str, timeout: float = 30) -> dict[str, object]:
        async def seen() -> dict[str, object]:
            while True:
                for line in self.lines:
                    if line.get("msg") == msg:
                        return line
                if self._reader.done():
                    pytest.fail(f"serve exited before logging {msg!r}")
                await asyncio.sleep(0.02)

        return await asyncio.wait_for(seen(), timeout)

    async def finish(self, timeout: float = 30) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await self._reader
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        await self._reader


async def test_sigterm_under_load_leaves_no_call_unanswered(tmp_path, fake_apns, apns_key):
    serve = await Serve.start(write_config(tmp_path, fake_apns, apns_key))
    try:
        fake_apns.delay(0.5)  # every push takes a while, so calls are in flight at SIGTERM
        async with RelayClient(f"127.0.0.1:{serve.port}") as client:
            calls = [
                asyncio.ensure_future(client.send(request(apns_token()), timeout=20))
                for _ in range(50)
            ]
            while len(fake_apns.received) < 50:  # noqa: ASYNC110 (polling a fake's record)
                await asyncio.sleep(0.01)
            serve.proc.send_signal(signal.SIGTERM)
            answers = await asyncio.gather(*calls, return_exceptions=True)
            late = await asyncio.gather(
                client.send(request(apns_token()), timeout=5), return_exceptions=True
            )
        assert all(isinstance(a, pb.SendResponse) for a in answers), answers
        assert all(a.results[0].outcome == pb.DELIVERED for a in answers)  # type: ignore[union-attr]
        (refused,) = late
        assert isinstance(refused, grpc.aio.AioRpcError)
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
        assert await serve.finish() == 0
    finally:
        await serve.kill()


async def test_sighup_rotates_the_apns_key_under_load(tmp_path, fake_apns, apns_key):
    config = write_config(tmp_path, fake_apns, apns_key)
    serve = await Serve.start(config)
    rotated = ApnsKey.generate(team_id=apns_key.team_id)
    fake_apns.add_key(rotated)
    try:
        async with RelayClient(f"127.0.0.1:{serve.port}") as client:
            stop = asyncio.Event()

            async def load() -> list[pb.SendResponse]:
                answers = []
                while not stop.is_set():
                    answers.append(await client.send(request(apns_token()), timeout=10))
                return answers

            workers = [asyncio.ensure_future(load()) for _ in range(8)]
            await asyncio.sleep(0.3)
            _rotate(config, rotated)
            serve.proc.send_signal(signal.SIGHUP)
            await serve.wait_for("reloaded")
            before = len(fake_apns.received)
            while len(fake_apns.received) < before + 20:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            stop.set()
            answers = [a for batch in await asyncio.gather(*workers) for a in batch]
        assert answers and all(a.results[0].outcome == pb.DELIVERED for a in answers)
        kids = [_kid(push.headers) for push in fake_apns.received[before:]]
        assert kids[-1] == rotated.key_id
        serve.proc.send_signal(signal.SIGTERM)
        assert await serve.finish() == 0
    finally:
        await serve.kill()


async def test_sighup_with_a_broken_config_keeps_the_old_one(tmp_path, fake_apns, apns_key):
    config = write_config(tmp_path, fake_apns, apns_key)
    serve = await Serve.start(config)
    try:
        config.write_text(config.read_text().replace('"topic"', '"topik"'))
        serve.proc.send_signal(signal.SIGHUP)
        refused = await serve.wait_for("reload refused: invalid config")
        assert any("topik" in p for p in refused["problems"])  # type: ignore[union-attr]
        async with RelayClient(f"127.0.0.1:{serve.port}") as client:
            answer = await client.send(request(apns_token()), timeout=10)
        assert answer.results[0].outcome == pb.DELIVERED
        serve.proc.send_signal(signal.SIGTERM)
        assert await serve.finish() == 0
    finally:
        await serve.kill()


async def test_calls_in_flight_finish_on_the_old_adapters(
    start_relay, fake_apns: FakeAPNs, apns_key: ApnsKey
) -> None:
    relay = await start_relay(local_config([apns_app(fake_apns, apns_key)]))
    slow = apns_token()
    fake_apns.delay(1.0, token=slow)
    async with RelayClient(f"127.0.0.1:{relay.port}") as client:
        pending = asyncio.ensure_future(client.send(request(slow), timeout=10))
        while not fake_apns.received:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        await relay.reload(local_config([apns_app(fake_apns, apns_key, max_concurrency=5)]))
        fresh = await client.send(request(apns_token()), timeout=10)
        answer = await pending
    assert answer.results[0].outcome == pb.DELIVERED
    assert fresh.results[0].outcome == pb.DELIVERED
    assert relay.current().apps["chat-ios"].app.max_concurrency == 5


def _rotate(config: Path, key: ApnsKey) -> None:
    (config.parent / "AuthKey.p8").write_bytes(key.key_pem)
    data = json.loads(config.read_text())
    data["apps"][0]["auth"]["key_id"] = key.key_id
    config.write_text(json.dumps(data))


def _kid(headers: dict[str, str]) -> str:
    token = headers["authorization"].split(" ", 1)[1]
    return str(jwt.get_unverified_header(token)["kid"])


async def test_grouping_keys_hold_across_a_reload_without_a_configured_key(
    start_relay, fake_apns: FakeAPNs, apns_key: ApnsKey
) -> None:
    # Without server.hmac_key_file the secret is the process's own: a reload must not draw a
    # new one, or a conversation's pushes would stop grouping with the ones before it.
    config = local_config([apns_app(fake_apns, apns_key)], hmac_key=b"")
    relay = await start_relay(config)
    async with RelayClient(f"127.0.0.1:{relay.port}") as client:
        await client.send(request(apns_token()), timeout=10)
        await relay.reload(config)
        await client.send(request(apns_token()), timeout=10)
    before, after = (push.payload["aps"]["thread-id"] for push in fake_apns.received)
    assert before == after


# -- no memory leaves the process ------------------------------------------------------------------


# Run without privileges: starts a command, waits for its first output line, then reports
# whether /proc/<child>/mem opens (as the child's parent, so Yama's ptrace_scope=1 allows it when
# the child is dumpable) and the child's core-file limit.
_PROBE = """
import json, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
child.stdout.readline()
try:
    open(f"/proc/{child.pid}/mem", "rb").close()
    readable = True
except OSError:
    readable = False
with open(f"/proc/{child.pid}/limits") as limits:
    core = [l.split()[4:6] for l in limits if l.startswith("Max core file size")][0]
child.kill()
print(json.dumps({"readable": readable, "core": core}))
"""


def _probe(command: list[str]) -> dict[str, object]:
    """Start ``command`` from an unprivileged process; as root, one with every capability
    dropped, so only the child's dumpable flag decides, as between two ordinary processes."""
    probe = [sys.executable, "-c", _PROBE, *command]
    if os.geteuid() == 0:
        probe = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", *probe]
    done = subprocess.run(probe, capture_output=True, check=True, env=ENV, timeout=60)
    result: dict[str, object] = json.loads(done.stdout)
    return result


@pytest.mark.skipif(sys.platform != "linux", reason="prctl and /proc are Linux's")
def test_relay_process_cannot_be_dumped_or_read(tmp_path, fake_apns, apns_key):
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to read as an unprivileged process")
    config = write_config(tmp_path, fake_apns, apns_key)
    relay = _probe([sys.executable, "-m", "relay", "serve", "--config", str(config)])
    # The same probe opens an ordinary process's memory: the check is not vacuous.
    control = _probe([sys.executable, "-c", "print('up', flush=True); input()"])

    assert relay == {"readable": False, "core": ["0", "0"]}
    assert control["readable"] is True and control["core"] != ["0", "0"]


@pytest.mark.skipif(sys.platform != "linux", reason="SCHED_BATCH and /proc are Linux's")
async def test_serve_runs_its_other_threads_behind_the_event_loop(tmp_path, fake_apns, apns_key):
    """Every thread but the event loop's is on SCHED_BATCH at nice 19 once serving (uvloop's
    workers: they never preempt the loop on one core); the loop's own thread is untouched."""
    serve = await Serve.start(write_config(tmp_path, fake_apns, apns_key), module="relay")
    try:
        line = await serve.wait_for("threads yield to the event loop")
        pid = serve.proc.pid
        policies = {
            int(tid): os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")
        }
        nice = {tid: os.getpriority(os.PRIO_PROCESS, tid) for tid in policies}
        assert policies.pop(pid) == os.SCHED_OTHER  # the main thread runs the event loop
        assert nice.pop(pid) == os.getpriority(os.PRIO_PROCESS, 0)  # as the test's own
        assert len(policies) >= 3  # uvloop's worker threads (name resolution)
        assert set(policies.values()) == {os.SCHED_BATCH}
        assert set(nice.values()) == {19}
        assert line["threads"] == len(policies) and line["nice"] == 19
        async with RelayClient(f"127.0.0.1:{serve.port}") as client:  # and it still serves
            response = await client.send(request(apns_token()), timeout=10)
        assert response.results[0].outcome == pb.DELIVERED
    finally:
        serve.proc.send_signal(signal.SIGTERM)
        assert await serve.finish() == 0


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc_trim and /proc")
def test_freed_heap_memory_goes_back_to_the_system() -> None:
    """What a burst freed inside the heap (not at its top, which glibc returns by itself) goes
    back to the system when serve releases free memory, as it does every 10 s."""
    code = """
import ctypes
from relay.cli import release_free_memory
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss_mib():
    status = open("/proc/self/status").read()
    return int(status.split("VmRSS:")[1].split()[0]) // 1024
blocks = [libc.malloc(64 * 1024) for _ in range(800)]  # 50 MiB, below the mmap threshold
for block in blocks:
    ctypes.memset(block, 1, 64 * 1024)
for block in blocks[:-1]:  # the last one holds the heap's top in place
    libc.free(block)
before = rss_mib()
released = release_free_memory()
print(released, before - rss_mib())
"""
    out = subprocess.run(
        [sys.executable, "-c", code], env=ENV, capture_output=True, text=True, check=True
    )
    released, freed_mib = out.stdout.split()
    assert released == "True"
    assert int(freed_mib) > 40


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt and /proc")
def test_a_lean_heap_keeps_only_the_written_page_of_a_16_kib_buffer() -> None:
    """libcurl holds a 16 KiB request buffer per transfer in flight, ~0.5 KiB of it written:
    once serve has made the heap lean, 1,000 of them cost ~4 MiB of RSS, not the 16 MiB that
    calloc makes resident when it carves them from the heap."""
    code = """
import ctypes
from relay.cli import keep_the_heap_lean
libc = ctypes.CDLL(None)
libc.calloc.restype = ctypes.c_void_p
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss_kib():
    status = open("/proc/self/status").read()
    return int(status.split("VmRSS:")[1].split()[0])
lean = keep_the_heap_lean()
churn = [libc.malloc(16 * 1024 + 48) for _ in range(200)]  # a busy heap: freed room inside it
for block in churn[:-1]:
    libc.free(block)
before = rss_kib()
buffers = [libc.calloc(1, 16 * 1024 + 48) for _ in range(1000)]
for block in buffers:
    ctypes.memset(block, 1, 600)  # what a push writes into its buffer
print(lean, (rss_kib() - before) // 1024)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], env=ENV, capture_output=True, text=True, check=True
    )
    lean, grown_mib = out.stdout.split()
    assert lean == "True"
    assert int(grown_mib) <= 8  # ~14 MiB with glibc's defaults


async def test_serve_keeps_the_heap_lean_and_returns_free_memory_periodically(
    tmp_path, fake_apns, apns_key
):
    serve = await Serve.start(write_config(tmp_path, fake_apns, apns_key), module="relay")
    try:
        line = await serve.wait_for("blocks of 16 KiB and more mapped on their own")
        assert line["mmap_threshold_bytes"] == 16384
        line = await serve.wait_for("free memory returned to the system periodically")
        assert line["every_seconds"] == 10.0
        line = await serve.wait_for("start-up objects frozen out of the garbage collector")
        assert line["objects"] > 20_000  # modules, descriptors, config: ~42,000 here
    finally:
        serve.proc.send_signal(signal.SIGTERM)
        assert await serve.finish() == 0


def test_serve_loads_no_http_client_library_beside_libcurl() -> None:
    """Every provider request, the FCM token exchange included, goes through libcurl: httpx and
    its HTTP/2 stack (~4 MiB of RSS) are for the tests and the benchmark, never loaded by the
    service. aioapns neither, nor grpcio: its C core (threads of its own, ~10 MiB) serves the
    client side only; the server is grpclib's (relay/ingress.py)."""
    code = (
        "import sys, relay.cli, relay.server, adapters.apns, adapters.fcm, adapters.webpush\n"
        "print(sorted(m for m in ('httpx', 'httpcore', 'h11', 'anyio', 'aioapns', 'grpc') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=ENV, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
