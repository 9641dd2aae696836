"""The push-relay command as a user runs it: real subprocesses, real files, real signals."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from pushrelay.v1 import relay_pb2 as pb
from relay.client import RelayClient
from relay.testing.configs import vapid_key_pem
from relay.testing.credentials import ApnsKey
from relay.testing.fake_apns import FakeAPNs
from relay.testing.fake_fcm import FakeFCM
from relay.testing.fake_webpush import FakeWebPush
from tests.support import TOPIC, apns_token, request

ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


async def _run(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=ENV,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def write_config(tmp_path: Path, fake: FakeAPNs, key: ApnsKey, **server: object) -> Path:
    (tmp_path / "AuthKey.p8").write_bytes(key.key_pem)
    (tmp_path / "apns-ca.pem").write_bytes(fake.ca_pem)
    config = {
        "server": {"listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0", **server},
        "apps": [
            {
                "id": "chat-ios",
                "platform": "apns",
                "topic": TOPIC,
                "auth": {"key_file": "AuthKey.p8", "key_id": key.key_id, "team_id": key.team_id},
                "endpoint": fake.url,
                "ca_file": "apns-ca.pem",
            }
        ],
    }
    path = tmp_path / "relay.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


async def test_check_config_lists_every_problem_and_fails(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("server: {listen: nowhere}\napps:\n  - {id: x, platform: carrier-pigeon}\n")
    code, _, err = await _run("check-config", str(path))
    assert code == 2
    assert "server.listen" in err and "apps[0].platform" in err


async def test_check_config_accepts_a_good_file(tmp_path: Path, fake_apns, apns_key) -> None:
    path = write_config(tmp_path, fake_apns, apns_key)
    code, out, _ = await _run("check-config", str(path))
    assert code == 0, out
    assert "ok (1 apps: apns)" in out


async def test_serve_answers_and_stops_cleanly_on_sigterm(
    tmp_path: Path, fake_apns, apns_key
) -> None:
    path = write_config(tmp_path, fake_apns, apns_key)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay.cli",
        "serve",
        "--config",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=ENV,
    )
    try:
        port = await _serving_port(proc)
        async with RelayClient(f"127.0.0.1:{port}") as client:
            response = await client.send(request(apns_token()), timeout=10)
        assert response.results[0].outcome == pb.DELIVERED
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    lines = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    assert any(line["msg"] == "stopping" for line in lines)
    assert "Lunch at noon?" not in out.decode() and "Alice" not in out.decode()


async def _serving_port(proc: asyncio.subprocess.Process) -> int:
    assert proc.stdout is not None
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if not line:
            pytest.fail("serve exited before serving")
        record = json.loads(line)
        if record.get("msg") == "serving":
            return int(record["port"])


async def test_send_prints_the_outcome(tmp_path: Path, fake_apns, apns_key) -> None:
    path = write_config(tmp_path, fake_apns, apns_key)
    dead = apns_token()
    fake_apns.mark_dead(dead)
    code, out, _ = await _run(
        "send",
        "--config",
        str(path),
        "--app",
        "chat-ios",
        "--token",
        apns_token(),
        "--kind",
        "missed_call",
    )
    assert code == 0 and "outcome=DELIVERED" in out
    code, out, _ = await _run("send", "--config", str(path), "--app", "chat-ios", "--token", dead)
    assert code == 1 and "outcome=TOKEN_INVALID" in out and "reason=Unregistered" in out


async def test_send_works_on_a_config_with_callers(tmp_path: Path, fake_apns, apns_key) -> None:
    # The configured service requires a bearer token; send's own throwaway relay must not.
    path = write_config(tmp_path, fake_apns, apns_key)
    (tmp_path / "chat-eu.token").write_text("s3cret-token-for-chat-eu\n")
    data = json.loads(path.read_text())
    data["clients"] = [{"name": "chat-eu", "token_file": "chat-eu.token", "apps": ["chat-ios"]}]
    path.write_text(json.dumps(data))
    code, out, err = await _run(
        "send", "--config", str(path), "--app", "chat-ios", "--token", apns_token()
    )
    assert code == 0 and "outcome=DELIVERED" in out, out + err
    assert out.strip().count("\n") == 0, "send prints one result line, no log noise"


async def test_demo_runs_every_kind_and_mode_and_exits_zero() -> None:
    code, out, err = await _run("demo", timeout=120)
    assert code == 0, out + err
    assert out.count("DELIVERED") == 72  # 3 platforms × 6 kinds × 4 modes
    assert out.count("[voip p10 com.example.chat.voip]") == 4  # INCOMING_CALL on iOS, each mode
    assert out.count("[background p5]") >= 4  # CLEAR on iOS, each mode
    assert "TOKEN_INVALID (Unregistered)" in out and "TOKEN_INVALID (UNREGISTERED)" in out
    assert out.count("TOKEN_INVALID") == 3
    assert "REJECTED (TopicDisallowed)" in out


async def test_send_works_for_fcm_and_web_push(tmp_path: Path, pki) -> None:
    async with FakeFCM(pki=pki) as fcm, FakeWebPush(pki=pki) as webpush:
        (tmp_path / "sa.json").write_text(fcm.service_account().to_json())
        (tmp_path / "vapid.pem").write_bytes(vapid_key_pem())
        (tmp_path / "ca.pem").write_bytes(pki.ca_pem)
        common = {"endpoint": fcm.url, "ca_file": "ca.pem"}
        config = {
            "server": {"listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0"},
            "apps": [
                {"id": "chat-android", "platform": "fcm", "service_account_file": "sa.json",
                 **common},
                {"id": "chat-web", "platform": "webpush", "ca_file": "ca.pem",
                 "vapid": {"private_key_file": "vapid.pem", "subject": "mailto:ops@example.com"},
                 "allowed_endpoints": ["127.0.0.1"]},
            ],
        }  # fmt: skip
        path = tmp_path / "relay.yaml"
        path.write_text(json.dumps(config))
        code, out, err = await _run(
            "send",
            "--config",
            str(path),
            "--app",
            "chat-android",
            "--token",
            "fcm-registration-token-123",
            "--kind",
            "invitation",
        )
        assert code == 0 and "outcome=DELIVERED" in out, out + err
        assert fcm.received[0].target == "fcm-registration-token-123"
        sub = webpush.subscribe()
        b64 = base64.urlsafe_b64encode
        code, out, err = await _run(
            "send", "--config", str(path), "--app", "chat-web", "--token", sub.endpoint,
            # key=value: a base64url key may start with "-", which argparse would take for an option
            "--p256dh=" + b64(sub.keys.p256dh).decode().rstrip("="),
            "--auth=" + b64(sub.keys.auth).decode().rstrip("="), "--preview", "hello from send",
        )  # fmt: skip
        assert code == 0 and "outcome=DELIVERED" in out, out + err
        assert b"hello from send" in (webpush.received[0].plaintext or b"")
