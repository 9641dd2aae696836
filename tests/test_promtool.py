"""/metrics as Prometheus reads it: promtool-clean, pre-created, closed label sets.

A real relay (a token-auth and a certificate-auth APNs app) runs against the fake APNs, takes
traffic of every outcome, and its HTTP port is scraped; ``promtool check metrics`` (Debian
`prometheus`, installed by `make test`) must have nothing to say about the scrape.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from adapters.apns import ApnsSettings
from adapters.base import Verdict
from pushrelay.v1 import relay_pb2 as pb
from relay.breaker import State
from relay.client import RelayClient
from relay.config import AppConfig, PrivacyPolicy
from relay.metrics import LATENCY_BUCKETS, certificate_expiry
from relay.model import Kind
from relay.server import RelayServer
from relay.testing.configs import apns_app, local_config
from relay.testing.credentials import ApnsKey
from relay.testing.fake_apns import FakeAPNs
from relay.testing.tls import TestPKI
from tests.support import apns_token, request

LEGACY_TOPIC = "com.example.chat.legacy"
APPS = {"chat-ios", "chat-ios-legacy"}
CANARY = "canary-7d1e"


def require_tool(name: str, package: str) -> str:
    """The tool's path; a missing tool fails the test under CI=true and skips it elsewhere."""
    found = shutil.which(name)
    if found:
        return found
    why = f"{name} is not installed (Debian package {package}; `make test` installs it as root)"
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


def promtool_complaints(exposition: str) -> str:
    """What ``promtool check metrics`` says about ``exposition``: empty when it is clean."""
    result = subprocess.run(
        [require_tool("promtool", "prometheus"), "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    said = (result.stdout + result.stderr).strip()
    if result.returncode != 0 and not said:
        said = f"promtool exited {result.returncode}"
    return said


def cert_app(fake: FakeAPNs, pki: TestPKI, path: Path) -> AppConfig:
    """An APNs app with certificate auth; the fake lets it push to its certificate's UID."""
    path.write_bytes(pki.client_cert_pem(f"Apple Push Services: {LEGACY_TOPIC}", uid=LEGACY_TOPIC))
    return AppConfig(
        id="chat-ios-legacy",
        platform="apns",
        privacy=PrivacyPolicy(),
        max_concurrency=10,
        settings=ApnsSettings(
            app_id="chat-ios-legacy",
            topic=LEGACY_TOPIC,
            cert_file=str(path),
            endpoint=fake.url,
            ca_pem=fake.ca_pem,
        ),
    )


@pytest.fixture
async def two_app_relay(  # type: ignore[no-untyped-def]
    start_relay, fake_apns: FakeAPNs, apns_key: ApnsKey, pki: TestPKI, tmp_path: Path
) -> RelayServer:
    config = local_config(
        [apns_app(fake_apns, apns_key), cert_app(fake_apns, pki, tmp_path / "legacy.pem")]
    )
    server: RelayServer = await start_relay(config)
    # Idempotent: also called by RelayServer once it wires credential expiry at start.
    server.metrics.track_credential_expiry(config.apps.values())
    return server


async def scrape(relay: RelayServer) -> str:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{relay.http_port}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return response.text


async def send_every_outcome(relay: RelayServer, fake: FakeAPNs) -> None:
    dead, limited, flaky = apns_token(), apns_token(), apns_token()
    fake.mark_dead(dead)
    fake.script(limited, 429, "TooManyRequests")
    fake.inject(503, "ServiceUnavailable")  # one retry, then delivered
    async with RelayClient(f"127.0.0.1:{relay.port}") as client:
        for kind in (pb.INSTANT_MESSAGE, pb.MISSED_CALL):
            await client.send(request(flaky, apns_token(), kind=kind, request_id=CANARY), timeout=5)
        await client.send(request(dead, limited), timeout=5)
        await client.send(request(apns_token(), app_id="chat-ios-legacy"), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError):
            await client.send(request("not-hex", sender_display_name=CANARY), timeout=5)
        stream = [request(apns_token(), kind=pb.INVITATION, request_id=f"s-{i}") for i in range(3)]
        answers = [answer async for answer in client.send_many(stream, timeout=5)]
        assert len(answers) == 3


def series(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_promtool_finds_nothing_to_complain_about(two_app_relay, fake_apns) -> None:  # type: ignore[no-untyped-def]
    before = await scrape(two_app_relay)
    await send_every_outcome(two_app_relay, fake_apns)
    after = await scrape(two_app_relay)
    assert 'outcome="TOKEN_INVALID",platform="apns"} 1.0' in after, "traffic reached the metrics"
    assert 'pushrelay_provider_retries_total{platform="apns"} 1.0' in after
    for text in (before, after):
        assert promtool_complaints(text) == ""


async def test_every_series_exists_before_any_request(two_app_relay, fake_apns) -> None:  # type: ignore[no-untyped-def]
    before = series(await scrape(two_app_relay))
    await send_every_outcome(two_app_relay, fake_apns)
    after = series(await scrape(two_app_relay))
    assert after == before, "traffic created series that were not pre-created at start"
    assert not [name for name, _ in before if name.endswith("_created")]


async def test_every_label_name_and_value_is_from_a_closed_set(two_app_relay, fake_apns) -> None:  # type: ignore[no-untyped-def]
    await send_every_outcome(two_app_relay, fake_apns)
    text = await scrape(two_app_relay)
    assert CANARY not in text
    closed = {
        "method": {"Send", "SendStream"},
        "code": {code.name for code in grpc.StatusCode},
        "kind": {kind.name.lower() for kind in Kind},
        "platform": {"apns", "fcm", "webpush"},
        "outcome": {v.name for v in Verdict},
        "app": APPS,
        "client": {client.name for client in two_app_relay.config.clients},
        "version": {"0.1.0"},
        "state": {state.name.lower() for state in State},
        "le": {f"{bound:g}" for bound in LATENCY_BUCKETS} | {"+Inf"},
    }
    for name, labels in series(text):
        for label, value in labels:
            assert label in closed, f"{name}: label {label!r} is not in a closed set"
            normalized = f"{float(value):g}" if label == "le" and value != "+Inf" else value
            assert normalized in closed[label], f"{name}: {label}={value!r}"


async def test_histograms_span_a_millisecond_to_ten_seconds(two_app_relay) -> None:  # type: ignore[no-untyped-def]
    text = await scrape(two_app_relay)
    for family in text_string_to_metric_families(text):
        if family.type == "histogram":
            bounds = sorted(
                float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")
            )
            assert bounds[0] <= 0.001 and 10.0 in bounds and bounds[-1] == float("inf")


async def test_certificate_apps_export_their_expiry(two_app_relay, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cert = x509.load_pem_x509_certificates((tmp_path / "legacy.pem").read_bytes())[0]
    families = {f.name: f for f in text_string_to_metric_families(await scrape(two_app_relay))}
    samples = families["pushrelay_credential_expiry_timestamp_seconds"].samples
    # Only the certificate app: a .p8 provider-token key has no expiry.
    assert [(s.labels, s.value) for s in samples] == [
        ({"app": "chat-ios-legacy"}, cert.not_valid_after_utc.timestamp())
    ]


def test_certificate_expiry_reads_key_first_files_and_survives_bad_ones(
    pki: TestPKI, tmp_path: Path
) -> None:
    pem = pki.client_cert_pem("Apple Push Services: x", uid="x")
    cert = x509.load_pem_x509_certificates(pem)[0]
    key_start = pem.index(b"-----BEGIN", pem.index(b"-----END") + 1)
    assert pem[key_start:].startswith(b"-----BEGIN PRIVATE KEY")
    (tmp_path / "key-first.pem").write_bytes(pem[key_start:] + pem[:key_start])
    (tmp_path / "junk.pem").write_bytes(b"not a certificate")
    assert certificate_expiry(str(tmp_path / "key-first.pem")) == (
        cert.not_valid_after_utc.timestamp()
    )
    assert certificate_expiry(str(tmp_path / "junk.pem")) is None
    assert certificate_expiry(str(tmp_path / "missing.pem")) is None


def test_promtool_does_complain_about_a_bad_exposition() -> None:
    # Guards the check above from passing vacuously (a promtool that says nothing at all).
    bad = "# HELP pushrelay_requests gRPC calls.\n# TYPE pushrelay_requests counter\n"
    bad += 'pushrelay_requests{method="Send"} 1\n'
    assert "_total" in promtool_complaints(bad)
