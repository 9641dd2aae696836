"""Proof that the relay writes nothing: a real ``serve`` under two write detectors.

``push-relay serve`` runs as a subprocess (``python -m relay``) under both layers of
``relay/testing/audit.py``: an audit hook installed before the service's first import, and
``strace -f`` over the whole process tree (when strace is installed; ``.ci/run`` installs it,
and in CI its absence fails the suite). Meanwhile it serves every kind × platform × privacy mode,
provider errors, validation errors, deadline expiry and SendStream with the canaries of
``tests/test_no_leaks.py``, its ops endpoints are scraped, it reloads on SIGHUP and stops on
SIGTERM. Then: zero writes at either layer, no canary on its stdout or stderr.

The environment is hostile on purpose. No bytecode cache can be found (``PYTHONPYCACHEPREFIX``
names an empty directory, so every module is compiled from source and a cache write would
have somewhere to go); ``SSLKEYLOGFILE`` and ``PROMETHEUS_MULTIPROC_DIR`` ask libraries to write
TLS secrets and metric files; ``HOME`` and ``TMPDIR`` are empty directories. Caching is off as
the image runs it (``PYTHONDONTWRITEBYTECODE=1``): the negative control shows what happens
without it, and that both detectors catch every kind of write.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

import relay.testing.audit as audit
from pushrelay.v1 import relay_pb2_grpc
from relay.server import RelayServer, grouping_keys
from relay.testing.configs import vapid_key_pem
from relay.testing.credentials import ApnsKey
from relay.testing.tls import TestPKI
from tests.support import TOPIC
from tests.test_no_leaks import (
    HMAC_KEY,
    MODES,
    Fakes,
    Mix,
    Sender,
    android,
    answers_text,
    check_canonical_lines,
    check_positive_controls,
    check_providers,
    fetch_metrics,
    ios,
    json_lines,
    running_fakes,
    send_mix,
    web,
)

AUDIT_SCRIPT = Path(audit.__file__).resolve()
IN_CI = os.environ.get("CI", "").lower() == "true"


@cache
def strace_usable() -> str:
    """Why strace cannot trace here, or "" when it can."""
    if shutil.which("strace") is None:
        return "strace is not installed (apt-get install strace; .ci/run installs it)"
    with tempfile.TemporaryDirectory() as logs:  # -ff makes one file per thread: not /dev/null
        command = [*audit.strace_command(f"{logs}/probe"), sys.executable, "-c", ""]
        probe = subprocess.run(command, capture_output=True, check=False)
    if probe.returncode != 0:
        return f"strace cannot trace here: {probe.stderr.decode(errors='replace').strip()}"
    return ""


def test_strace_layer_is_available() -> None:
    """The system-call layer of the proofs below runs; in CI it must."""
    reason = strace_usable()
    if reason and IN_CI:
        pytest.fail(reason)
    if reason:
        pytest.skip(f"{reason}: the no-writes proofs ran with the audit hook only")


@dataclass
class Run:
    """A program running under the recorder (and strace, when usable)."""

    proc: asyncio.subprocess.Process
    strace_dir: Path | None
    stdout: list[str] = field(default_factory=list)
    report: asyncio.Future[bytes] | None = None
    reader: asyncio.Task[None] | None = None

    async def line(self, wanted: Callable[[dict[str, Any]], bool], timeout: float = 30) -> Any:
        """The first JSON line on stdout that ``wanted`` accepts (waiting for it)."""
        async with asyncio.timeout(timeout):
            seen = 0
            while True:
                for text in self.stdout[seen:]:
                    record = json.loads(text)
                    if wanted(record):
                        return record
                seen = len(self.stdout)
                if self.reader is not None and self.reader.done():
                    pytest.fail("the program exited:\n" + "".join(self.stdout))
                await asyncio.sleep(0.02)

    def signal(self, signum: int) -> None:
        """Signal the program itself: strace, in front of it, blocks and never forwards them."""
        pid = self.proc.pid
        if self.strace_dir is not None:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            assert len(children) == 1, children
            pid = int(children[0])
        os.kill(pid, signum)

    async def finish(self, timeout: float = 60) -> tuple[int, str, str, list[str], list[str]]:
        """Wait for the exit: code, stdout, stderr, hook findings, strace findings."""
        assert self.proc.stderr is not None and self.reader is not None
        async with asyncio.timeout(timeout):
            err = await self.proc.stderr.read()
            await self.reader
            code = await self.proc.wait()
            assert self.report is not None
            report = (await self.report).decode()
        found = [f"{kind} {event} {detail}" for kind, event, detail in audit.parse_report(report)]
        return code, "".join(self.stdout), err.decode(), found, self._strace_findings()

    def _strace_findings(self) -> list[str]:
        if self.strace_dir is None:
            return []
        lines: list[str] = []
        for log in sorted(self.strace_dir.iterdir()):
            lines += log.read_text(errors="replace").splitlines()
        assert lines, "strace logged nothing: the trace did not run"
        return list(audit.strace_writes(lines))


async def _read_all(fd: int) -> bytes:
    """Everything written to the pipe until every writer has closed it."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    try:
        return await reader.read()
    finally:
        transport.close()


@asynccontextmanager
async def audited(
    args: list[str], *, env: dict[str, str], cwd: Path, strace_dir: Path | None
) -> AsyncIterator[Run]:
    """Run ``relay/testing/audit.py ARGS`` (by path) under strace when usable."""
    read_end, write_end = os.pipe()
    command = [sys.executable, str(AUDIT_SCRIPT), "--report-fd", str(write_end), *args]
    if strace_dir is not None:
        command = [*audit.strace_command(str(strace_dir / "trace")), *command]
    try:
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=cwd,
            pass_fds=(write_end,),
            start_new_session=True,  # its own process group: strace and the service end together
        )
    finally:
        os.close(write_end)
    run = Run(proc, strace_dir)
    run.report = asyncio.ensure_future(_read_all(read_end))
    run.reader = asyncio.create_task(_collect(proc, run.stdout))
    try:
        yield run
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the group of the process started above
            await proc.wait()
        await asyncio.gather(run.reader, run.report, return_exceptions=True)


async def _collect(proc: asyncio.subprocess.Process, lines: list[str]) -> None:
    assert proc.stdout is not None
    while line := await proc.stdout.readline():
        lines.append(line.decode())


def _strace_dir(tmp_path: Path) -> Path | None:
    """A new directory for strace's logs, or None when strace cannot run here."""
    if strace_usable():
        return None
    (tmp_path / "strace").mkdir()
    return tmp_path / "strace"


# -- the service, serving ------------------------------------------------------------------------


def write_config(directory: Path, fakes: Fakes, key: ApnsKey) -> Path:
    """The relay's config and secret files, as an operator would write them (by the test)."""
    files = {
        "AuthKey.p8": key.key_pem,
        "ca.pem": fakes.apns.ca_pem,
        "service-account.json": json.dumps(fakes.account.info).encode(),
        "vapid.pem": vapid_key_pem(),
        "hmac.key": HMAC_KEY,
    }
    for name, content in files.items():
        (directory / name).write_bytes(content)
    config = {
        "server": {
            "listen": "127.0.0.1:0",
            "http_listen": "127.0.0.1:0",
            "hmac_key_file": "hmac.key",
            "log_level": "debug",
            "shutdown_grace_seconds": 2,
        },
        "apps": [
            {
                "id": "chat-ios",
                "platform": "apns",
                "topic": TOPIC,
                "auth": {"key_file": "AuthKey.p8", "key_id": key.key_id, "team_id": key.team_id},
                "endpoint": fakes.apns.url,
                "ca_file": "ca.pem",
            },
            {
                "id": "chat-ios-voip",
                "platform": "apns",
                "topic": TOPIC,
                "voip": True,
                "auth": {"key_file": "AuthKey.p8", "key_id": key.key_id, "team_id": key.team_id},
                "endpoint": fakes.apns.url,
                "ca_file": "ca.pem",
            },
            {
                "id": "chat-android",
                "platform": "fcm",
                "service_account_file": "service-account.json",
                "endpoint": fakes.fcm.url,
                "ca_file": "ca.pem",
            },
            {
                "id": "chat-web",
                "platform": "webpush",
                "vapid": {"private_key_file": "vapid.pem", "subject": "mailto:ops@example.com"},
                "allowed_endpoints": ["127.0.0.1"],
                "ca_file": "ca.pem",
            },
        ],
    }
    path = directory / "relay.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def _hostile_env(tmp_path: Path) -> tuple[dict[str, str], dict[str, Path]]:
    """The environment of the service: every invitation to write, answered with a place to."""
    places = {
        "PYTHONPYCACHEPREFIX": tmp_path / "pycache",
        "PROMETHEUS_MULTIPROC_DIR": tmp_path / "prometheus",
        "HOME": tmp_path / "home",
        "TMPDIR": tmp_path / "tmp",
    }
    for directory in places.values():
        directory.mkdir()
    places["SSLKEYLOGFILE"] = tmp_path / "tls-keys.log"
    env = {**os.environ, **{name: str(path) for name, path in places.items()}}
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # as the image runs it; see the negative control
    return env, places


async def _ops_endpoints(port: int) -> None:
    async with httpx.AsyncClient(trust_env=False) as client:
        for path, status in (("/healthz", 200), ("/readyz", 200), ("/nowhere", 404)):
            assert (await client.get(f"http://127.0.0.1:{port}{path}")).status_code == status


async def _after_reload(
    run: Run, stub: relay_pb2_grpc.PushRelayStub, fakes: Fakes, mix: Mix
) -> None:
    """SIGHUP: re-read the config and its secrets, then serve every mode again."""
    run.signal(signal.SIGHUP)
    await run.line(lambda r: str(r.get("msg", "")).startswith("reload"))
    sender = Sender(stub, mix, prefix="reloaded")
    for mode in MODES:
        sent = await sender.send(ios(), android(), web(fakes.webpush.subscribe()), privacy=mode)
        assert not sent.error, sent.error


async def test_serving_writes_nothing(tmp_path: Path, pki: TestPKI, apns_key: ApnsKey) -> None:
    service_dir = tmp_path / "service"
    service_dir.mkdir()
    env, places = _hostile_env(tmp_path)
    async with running_fakes(pki, apns_key) as fakes:
        config = write_config(service_dir, fakes, apns_key)
        written = set(service_dir.iterdir())
        args = ["--", "serve", "--config", str(config)]
        async with audited(args, env=env, cwd=service_dir, strace_dir=_strace_dir(tmp_path)) as run:
            serving = await run.line(lambda r: r.get("msg") == "serving", timeout=60)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{serving['port']}") as channel:
                stub = relay_pb2_grpc.PushRelayStub(channel)
                mix = await send_mix(stub, fakes, raising=False)
                await _ops_endpoints(serving["http_port"])
                metrics = await fetch_metrics(serving["http_port"])
                reloads = hasattr(RelayServer, "reload")
                if reloads:
                    await _after_reload(run, stub, fakes, mix)
            run.signal(signal.SIGTERM)
            code, out, err, hook, traced = await run.finish()
        check_providers(fakes, mix, grouping_keys(HMAC_KEY))
        check_positive_controls(fakes, mix)

    assert code == 0, err
    assert err == "", "logs go to stdout, as JSON lines; nothing else is printed"
    assert hook == [], "the audit hook saw writes:\n" + "\n".join(hook)
    assert traced == [], "strace saw writes:\n" + "\n".join(traced)
    for name, place in places.items():
        contents = list(place.iterdir()) if place.is_dir() else [place] if place.exists() else []
        assert contents == [], f"${name} was written to"
    assert set(service_dir.iterdir()) == written, "files appeared beside the config"
    # The relay noticed the invitations to write, and declined.
    ignored = {r.get("variable") for r in json_lines(out) if "ignored" in str(r.get("msg"))}
    assert {"SSLKEYLOGFILE", "PROMETHEUS_MULTIPROC_DIR"} <= ignored
    # And the same run leaks nothing: every line of stdout is JSON, none holds a canary.
    assert mix.leaked(out) == [] and mix.leaked(err) == [], "canaries on stdout/stderr"
    assert mix.leaked(metrics) == [] and mix.leaked(answers_text(mix)) == []
    check_canonical_lines(out, mix)
    assert reloads == any(r.get("msg") == "reloaded" for r in json_lines(out))
    assert any(r.get("msg") == "stopping" for r in json_lines(out))


# -- the negative control ------------------------------------------------------------------------

WRITER = """
import os, shutil, sqlite3, ssl, subprocess, sys, tempfile
d = os.environ["SCRATCH"]
open(f"{d}/opened", "w").close()
os.mkdir(f"{d}/made")
os.rename(f"{d}/opened", f"{d}/renamed")
shutil.copyfile(f"{d}/renamed", f"{d}/copied")
os.remove(f"{d}/copied")
sqlite3.connect(f"{d}/database").execute("create table t (x)")
os.close(tempfile.mkstemp(dir=d)[0])
ssl.create_default_context()  # opens $SSLKEYLOGFILE for appending
subprocess.run([sys.executable, "-c", ""], check=True)
import relay  # caching on, no cache to find: its bytecode is written ...
import relay.server  # ... and nothing imported after it, since relay/__init__ turns caching off
"""
EXPECTED = ("opened", "made", "renamed", "copied", "database", "tmp", "tls-keys.log")


async def test_detectors_catch_every_kind_of_write(tmp_path: Path) -> None:
    scratch, pycache = tmp_path / "scratch", tmp_path / "pycache"
    scratch.mkdir()
    pycache.mkdir()
    env = {
        **os.environ,
        "SCRATCH": str(scratch),
        "PYTHONPYCACHEPREFIX": str(pycache),
        "SSLKEYLOGFILE": str(scratch / "tls-keys.log"),
    }
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    strace_dir = _strace_dir(tmp_path)
    async with audited(["-c", WRITER], env=env, cwd=scratch, strace_dir=strace_dir) as run:
        code, _, err, hook, traced = await run.finish()
    assert code == 0, err
    hook_text = "\n".join(hook)
    for name in EXPECTED:
        assert f"{scratch}/{name}" in hook_text, f"the hook missed {name}:\n{hook_text}"
    for event in ("os.mkdir", "os.rename", "shutil.copyfile", "os.remove", "sqlite3.connect"):
        assert event in hook_text
    assert "spawn subprocess.Popen" in hook_text
    # The finding: with caching on, importing relay writes its own bytecode (the interpreter
    # caches a module before running it), but nothing imported after it is cached.
    assert "relay/__init__.cpython" in hook_text
    last = max(i for i, finding in enumerate(hook) if "relay/__init__.cpython" in finding)
    assert not [finding for finding in hook[last + 1 :] if ".pyc" in finding]
    if strace_dir is None:
        return
    traced_text = "\n".join(traced)
    for name in EXPECTED:
        assert f"{scratch}/{name}" in traced_text, f"strace missed {name}:\n{traced_text}"
    assert "relay/__init__.cpython" in traced_text
    # What the hook cannot see: the interpreter caching its start-up modules before the hook.
    assert "encodings/__init__.cpython" in traced_text
    assert "encodings/__init__.cpython" not in hook_text
