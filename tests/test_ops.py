"""The operator's HTTP port: /metrics with the exact names, /healthz, /readyz."""

from __future__ import annotations

import re

import httpx

from pushrelay.v1 import relay_pb2 as pb
from tests.support import apns_token, request

NAMES = (
    "pushrelay_requests_total",
    "pushrelay_notifications_total",
    "pushrelay_request_duration_seconds_bucket",
    "pushrelay_provider_request_duration_seconds_bucket",
    "pushrelay_provider_retries_total",
    "pushrelay_inflight_notifications",
    "pushrelay_build_info",
)
CLOSED = {
    "method": {"Send", "SendStream"},
    "kind": {
        "instant_message",
        "invitation",
        "missed_call",
        "message_waiting",
        "incoming_call",
        "clear",
    },
    "platform": {"apns", "fcm", "webpush"},
    "outcome": {"DELIVERED", "TOKEN_INVALID", "REJECTED", "RATE_LIMITED", "UNAVAILABLE"},
}


async def _get(relay, path: str) -> httpx.Response:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient() as client:
        return await client.get(f"http://127.0.0.1:{relay.http_port}{path}")


async def test_metrics_have_exact_names_and_count_requests(relay, stub) -> None:
    await stub.Send(request(apns_token(), request_id="r-1"))
    text = (await _get(relay, "/metrics")).text
    for name in NAMES:
        assert re.search(rf"^{name}[{{ ]", text, re.M), name
    assert 'pushrelay_requests_total{code="OK",method="Send"} 1.0' in text
    assert (
        'pushrelay_notifications_total{kind="instant_message",outcome="DELIVERED",'
        'platform="apns"} 1.0'
    ) in text
    assert "_created" not in text
    assert "process_resident_memory_bytes" in text


async def test_metric_labels_come_from_closed_sets(relay, stub) -> None:
    canary = "canary-" + apns_token()
    await stub.Send(request(apns_token(), request_id=canary, sender_display_name=canary))
    text = (await _get(relay, "/metrics")).text
    assert canary not in text
    for label, value in re.findall(r'(\w+)="([^"]*)"', text):
        if label in CLOSED:
            assert value in CLOSED[label], (label, value)


async def test_health_and_readiness(relay) -> None:
    assert (await _get(relay, "/healthz")).status_code == 200
    assert (await _get(relay, "/readyz")).status_code == 200
    assert (await _get(relay, "/nope")).status_code == 404
    relay.draining = True
    assert (await _get(relay, "/readyz")).status_code == 503
    relay.draining = False


async def test_request_metric_counts_invalid_argument(relay, stub) -> None:
    import grpc
    import pytest

    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Send(request("nothex"))
    text = (await _get(relay, "/metrics")).text
    assert 'pushrelay_requests_total{code="INVALID_ARGUMENT",method="Send"} 1.0' in text
    assert pb.Outcome.Name(pb.DELIVERED) in text
