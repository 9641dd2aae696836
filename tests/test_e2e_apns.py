"""End to end: a generated stub, a real relay on 127.0.0.1:0, and the fake APNs over TLS."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from pushrelay.v1 import relay_pb2 as pb
from pushrelay.v1 import relay_pb2_grpc
from relay import service as relay_service
from relay.config import Limits
from relay.model import Privacy
from relay.render import render
from relay.testing.configs import apns_app, local_config
from relay.testing.device import TestSubscription
from tests.support import TOPIC, apns_token, request

KINDS = [pb.INSTANT_MESSAGE, pb.INVITATION, pb.MISSED_CALL, pb.MESSAGE_WAITING]
MODES = [pb.FULL, pb.REDACTED, pb.ID_ONLY]


@pytest.mark.parametrize("kind", KINDS, ids=pb.Kind.Name)
@pytest.mark.parametrize("privacy", MODES, ids=pb.Privacy.Name)
async def test_each_kind_and_mode_reaches_apns(stub, fake_apns, kind, privacy) -> None:
    token = apns_token()
    sent = request(token, kind=kind, privacy=privacy, badge=3, waiting_count=2)
    response = await stub.Send(sent, timeout=10)

    assert response.request_id == "req-1"
    (result,) = response.results
    assert pb.Outcome.Name(result.outcome) == "DELIVERED", result.reason
    assert result.privacy == privacy
    (got,) = fake_apns.received
    assert got.status == 200 and got.token == token
    assert result.provider_message_id == got.apns_id
    headers, payload = got.headers, got.payload
    assert headers["apns-topic"] == TOPIC
    assert payload["relay"]["v"] == 1
    assert payload["relay"]["kind"] == pb.Kind.Name(kind).lower()
    assert payload["relay"]["conversation_id"] == "conv-42"
    text = got.body.decode()
    if privacy == pb.ID_ONLY:
        assert headers["apns-push-type"] == "background"
        assert headers["apns-priority"] == "5"
        assert payload["aps"] == {"content-available": 1}
    else:
        assert headers["apns-push-type"] == "alert"
        assert "alert" in payload["aps"]
    if privacy != pb.FULL:
        assert "Alice Example" not in text and "Lunch at noon?" not in text
    # The conversation id reaches Apple only inside `relay`, never as a grouping key.
    assert "conv-42" not in json.dumps(payload["aps"])
    assert "conv-42" not in headers.get("apns-collapse-id", "")
    assert int(headers["apns-expiration"]) > 0


async def test_full_instant_message_shows_sender_and_preview(stub, fake_apns) -> None:
    await stub.Send(request(apns_token(), privacy=pb.FULL), timeout=10)
    (got,) = fake_apns.received
    alert = got.payload["aps"]["alert"]
    assert alert["title"] == "Alice Example"
    assert alert["body"] == "Lunch at noon?"
    assert got.headers["apns-priority"] == "10"
    assert "thread-id" in got.payload["aps"]


async def test_message_waiting_sets_badge_and_collapses(stub, fake_apns) -> None:
    for count in (2, 5):
        await stub.Send(request(apns_token(), kind=pb.MESSAGE_WAITING, waiting_count=count))
    first, second = fake_apns.received
    assert first.payload["aps"]["badge"] == 2 and second.payload["aps"]["badge"] == 5
    assert first.headers["apns-collapse-id"] == second.headers["apns-collapse-id"]


async def test_privacy_ceiling_serves_at_most_the_apps_max(start_relay, fake_apns, apns_key):
    app = apns_app(fake_apns, apns_key, default=Privacy.REDACTED, maximum=Privacy.REDACTED)
    relay = await start_relay(local_config([app]))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{relay.port}") as channel:
        stub = relay_pb2_grpc.PushRelayStub(channel)
        asked_full = await stub.Send(request(apns_token(), privacy=pb.FULL))
        asked_less = await stub.Send(request(apns_token(), privacy=pb.ID_ONLY))
        default = await stub.Send(request(apns_token()))
    assert asked_full.results[0].privacy == pb.REDACTED
    assert asked_less.results[0].privacy == pb.ID_ONLY
    assert default.results[0].privacy == pb.REDACTED
    assert all("Alice" not in got.body.decode() for got in fake_apns.received)


async def test_encrypted_without_support_yet_falls_back_to_redacted(stub, fake_apns) -> None:
    response = await stub.Send(request(apns_token(), privacy=pb.ENCRYPTED))
    assert response.results[0].privacy == pb.REDACTED
    assert "Lunch" not in fake_apns.received[0].body.decode()


async def test_results_follow_request_order_with_every_outcome(stub, fake_apns) -> None:
    good, dead, bad_topic, limited, failing = (apns_token() for _ in range(5))
    fake_apns.mark_dead(dead, timestamp_ms=1_700_000_000_000)
    fake_apns.script(bad_topic, 400, "DeviceTokenNotForTopic")
    fake_apns.script(limited, 429, "TooManyRequests")
    fake_apns.script(failing, 400, "BadCollapseId")
    response = await stub.Send(request(good, dead, bad_topic, limited, failing), timeout=10)
    outcomes = [(pb.Outcome.Name(r.outcome), r.reason) for r in response.results]
    assert outcomes == [
        ("DELIVERED", ""),
        ("TOKEN_INVALID", "Unregistered"),
        ("TOKEN_INVALID", "DeviceTokenNotForTopic"),
        ("RATE_LIMITED", "TooManyRequests"),
        ("REJECTED", "BadCollapseId"),
    ]
    assert response.results[1].token_invalid_since_ms == 1_700_000_000_000
    assert response.results[3].retry_after_seconds > 0


@pytest.mark.parametrize("privacy", [pb.FULL, pb.ID_ONLY])
async def test_a_requests_devices_share_one_rendering(stub, fake_apns, monkeypatch, privacy):
    """Rendered once per platform and mode; each device still gets its own token and id."""
    calls = []
    monkeypatch.setattr(relay_service, "render", lambda *a, **k: calls.append(1) or render(*a, **k))
    tokens = [apns_token() for _ in range(3)]
    response = await stub.Send(request(*tokens, privacy=privacy), timeout=10)
    assert [r.outcome for r in response.results] == [pb.DELIVERED] * 3
    assert len(calls) == 1
    received = sorted(fake_apns.received, key=lambda got: tokens.index(got.token))
    assert [got.token for got in received] == tokens
    assert len({got.headers["apns-id"] for got in received}) == 3
    assert len({got.body for got in received}) == 1


async def test_encrypted_is_rendered_for_each_device(start_relay, fake_apns, apns_key, monkeypatch):
    calls = []
    monkeypatch.setattr(relay_service, "render", lambda *a, **k: calls.append(1) or render(*a, **k))
    app = apns_app(fake_apns, apns_key, default=Privacy.ENCRYPTED, maximum=Privacy.ENCRYPTED)
    relay = await start_relay(local_config([app]))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{relay.port}") as channel:
        stub = relay_pb2_grpc.PushRelayStub(channel)
        device = TestSubscription.generate()
        keys = pb.DeviceKeys(p256dh=device.p256dh, auth=device.auth)
        devices = [pb.Device(app_id="chat-ios", token=apns_token(), keys=keys) for _ in range(2)]
        sent = request()
        sent.devices.extend(devices)
        response = await stub.Send(sent, timeout=10)
    assert [r.privacy for r in response.results] == [pb.ENCRYPTED] * 2
    assert len(calls) == 2
    first, second = fake_apns.received
    assert first.payload["relay"]["enc"] != second.payload["relay"]["enc"]


async def test_transient_provider_failure_is_retried(stub, fake_apns, relay) -> None:
    fake_apns.inject(503, "ServiceUnavailable", count=1)
    response = await stub.Send(request(apns_token()), timeout=10)
    assert pb.Outcome.Name(response.results[0].outcome) == "DELIVERED"
    assert [got.status for got in fake_apns.received] == [503, 200]
    retries = relay.metrics.provider_retries.labels(platform="apns")._value.get()
    assert retries == 1


async def test_persistent_provider_failure_ends_unavailable(stub, fake_apns) -> None:
    fake_apns.inject(500, "InternalServerError", count=10)
    response = await stub.Send(request(apns_token()), timeout=10)
    (result,) = response.results
    assert pb.Outcome.Name(result.outcome) == "UNAVAILABLE"
    assert result.reason == "InternalServerError"


async def test_caller_deadline_is_honoured_per_device(stub, fake_apns) -> None:
    slow, fast = apns_token(), apns_token()
    fake_apns.stall(slow)
    response = await stub.Send(request(fast, slow), timeout=1.5)
    (first, second) = response.results
    assert pb.Outcome.Name(first.outcome) == "DELIVERED"
    assert (pb.Outcome.Name(second.outcome), second.reason) == ("UNAVAILABLE", "DeadlineExceeded")


async def test_default_deadline_applies_without_a_caller_deadline(
    start_relay, fake_apns, apns_key
) -> None:
    config = local_config(
        [apns_app(fake_apns, apns_key)], limits=Limits(default_deadline_seconds=0.5)
    )
    relay = await start_relay(config)
    stalled = apns_token()
    fake_apns.stall(stalled)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{relay.port}") as channel:
        response = await relay_pb2_grpc.PushRelayStub(channel).Send(request(stalled))
    assert response.results[0].reason == "DeadlineExceeded"


async def test_stream_pipelines_and_a_slow_request_blocks_nobody(
    start_relay, fake_apns, apns_key
) -> None:
    # The slow device never answers, so its request can only end at the deadline: every
    # other request must have been answered before it, however fast the machine is.
    config = local_config(
        [apns_app(fake_apns, apns_key)], limits=Limits(default_deadline_seconds=6)
    )
    relay = await start_relay(config)
    slow = apns_token()
    fake_apns.stall(slow)
    requests = [request(slow, request_id="slow")]
    requests += [request(apns_token(), request_id=f"r{i}") for i in range(999)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{relay.port}") as channel:
        stream = relay_pb2_grpc.PushRelayStub(channel).SendStream(iter(requests))
        answers = [answer async for answer in stream]
    order = [answer.request_id for answer in answers]
    assert sorted(order) == sorted(r.request_id for r in requests)
    assert order[-1] == "slow"
    assert answers[-1].results[0].reason == "DeadlineExceeded"
    delivered = [a for a in answers[:-1] if a.results[0].outcome == pb.DELIVERED]
    assert len(delivered) == 999


async def test_stream_answers_an_invalid_request_without_failing_the_stream(stub) -> None:
    bad = request("not-hex", request_id="bad")
    good = request(apns_token(), request_id="good")
    answers = {a.request_id: a async for a in stub.SendStream(iter([bad, good]), timeout=10)}
    (rejected,) = answers["bad"].results
    assert pb.Outcome.Name(rejected.outcome) == "REJECTED"
    assert rejected.reason.startswith("InvalidArgument: devices[0].token")
    assert pb.Outcome.Name(answers["good"].results[0].outcome) == "DELIVERED"


async def test_health_and_reflection(channel) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "pushrelay.v1.PushRelay"):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    ask = reflection_pb2.ServerReflectionRequest(list_services="")
    async for answer in reflect.ServerReflectionInfo(iter([ask])):
        names = {s.name for s in answer.list_services_response.service}
    assert {"pushrelay.v1.PushRelay", "grpc.health.v1.Health"} <= names


CLIENT = """
import sys
import grpc
from pushrelay.v1 import relay_pb2, relay_pb2_grpc  # generated into this process's own path

assert "/proto/" not in relay_pb2.__file__, relay_pb2.__file__
with grpc.insecure_channel(sys.argv[1]) as channel:
    stub = relay_pb2_grpc.PushRelayStub(channel)
    request = relay_pb2.SendRequest(
        request_id="independent",
        notification=relay_pb2.Notification(
            kind=relay_pb2.MISSED_CALL, sender_display_name="Bob", conversation_id="c-1"
        ),
        devices=[relay_pb2.Device(app_id="chat-ios", token=sys.argv[2])],
    )
    answer = stub.Send(request, timeout=10)
    streamed = list(stub.SendStream(iter([request, request]), timeout=10))
print(relay_pb2.Outcome.Name(answer.results[0].outcome), len(streamed))
"""


def _generate_client(directory: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    protoc = [sys.executable, "-m", "grpc_tools.protoc", f"-I{root / 'proto'}",
              f"--python_out={directory}", f"--grpc_python_out={directory}",
              str(root / "proto/pushrelay/v1/relay.proto")]  # fmt: skip
    subprocess.run(protoc, check=True, capture_output=True)
    (directory / "client.py").write_text(CLIENT)


async def test_a_client_generated_elsewhere_from_the_proto(tmp_path, relay, fake_apns) -> None:
    # What an integrator does: run protoc on proto/ alone, in a fresh directory, and call the
    # relay from a process that imports that generated code, not this repository's.
    await asyncio.to_thread(_generate_client, tmp_path)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(tmp_path / "client.py"), f"127.0.0.1:{relay.port}", apns_token(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=tmp_path,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().split() == ["DELIVERED", "2"]
    assert fake_apns.received[0].payload["aps"]["alert"]["loc-key"] == "MISSED_CALL"
