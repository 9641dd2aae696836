"""The fake APNs, driven over real HTTP/2 + TLS: httpx for ordinary requests, a raw h2 client for
what httpx cannot do (hold back WINDOW_UPDATE, reset streams, read SETTINGS and GOAWAY)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from relay.testing.credentials import ApnsKey
from relay.testing.fake_apns import FakeAPNs
from relay.testing.h2server import H2Server, Request, Response
from relay.testing.tls import TestPKI

TOPIC = "com.example.chat"
TOKEN = "a1" * 32
OTHER = "b2" * 32
PAYLOAD = b'{"aps":{"alert":"hi"}}'
SHORT = 0.15  # long enough to tell "answered" from "stalled" on loopback


# -- a raw HTTP/2 client ---------------------------------------------------------------------


@dataclass(eq=False)
class RawStream:
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: bool = False


class RawClient:
    """h2 over TLS with manual flow control: ``auto_ack=False`` never returns DATA credit."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, auto_ack: bool
    ) -> None:
        self.reader, self.writer, self.auto_ack = reader, writer, auto_ack
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.streams: dict[int, RawStream] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.eof = False
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls,
        apns: FakeAPNs | H2Server,
        ctx: ssl.SSLContext,
        *,
        auto_ack: bool = True,
        window: int = 65535,
    ) -> RawClient:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", apns.port, ssl=ctx, server_hostname="127.0.0.1"
        )
        client = cls(reader, writer, auto_ack=auto_ack)
        client.conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        client.conn.initiate_connection()
        client.flush()
        client._task = asyncio.create_task(client._read_loop())
        return client

    def send(
        self,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes = b"",
        *,
        method: str = "POST",
        chunks: int = 1,
    ) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        pseudo = [(":method", method), (":scheme", "https"), (":authority", "127.0.0.1")]
        self.conn.send_headers(stream_id, [*pseudo, (":path", path), *headers], not body)
        step = max(1, -(-len(body) // chunks))
        for start in range(0, len(body), step):
            last = start + step >= len(body)
            self.conn.send_data(stream_id, body[start : start + step], end_stream=last)
        self.streams[stream_id] = RawStream()
        self.flush()
        return stream_id

    async def wait_for(self, condition: Callable[[], bool], seconds: float = 5.0) -> bool:
        """Wait until ``condition()`` holds; False after ``seconds``."""
        deadline = time.monotonic() + seconds
        while not condition():
            changed = self._changed
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                return False
        return True

    async def response(self, stream_id: int) -> RawStream:
        stream = self.streams[stream_id]
        assert await self.wait_for(lambda: stream.ended or stream.reset)
        return stream

    def window_update(self, stream_id: int, increment: int) -> None:
        self.conn.increment_flow_control_window(increment, stream_id)
        self.conn.increment_flow_control_window(increment)
        self.flush()

    def reset(self, stream_id: int) -> None:
        self.conn.reset_stream(stream_id)
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def close(self, *, abort: bool = False) -> None:
        if abort:
            self.writer.transport.abort()
        else:
            if not self.eof and not self.goaway:
                self.conn.close_connection()
                self.flush()
            self.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self.writer.wait_closed()
        if self._task is not None:
            await self._task

    async def _read_loop(self) -> None:
        try:
            while data := await self.reader.read(65536):
                for event in self.conn.receive_data(data):
                    self._on_event(event)
                self.flush()
                self._notify()
        except (OSError, ssl.SSLError):
            pass
        finally:
            self.eof = True
            self._notify()

    def _on_event(self, event: h2.events.Event) -> None:
        stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.ResponseReceived) and stream is not None:
            stream.headers = {str(k): str(v) for k, v in event.headers or []}
        elif isinstance(event, h2.events.DataReceived) and stream is not None:
            stream.body += event.data or b""
            if self.auto_ack:
                self.conn.acknowledge_received_data(
                    event.flow_controlled_length or 0, event.stream_id
                )
        elif isinstance(event, h2.events.StreamEnded) and stream is not None:
            stream.ended = True
        elif isinstance(event, h2.events.StreamReset) and stream is not None:
            stream.reset = True
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


# -- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki() -> TestPKI:
    return TestPKI()


@pytest.fixture(scope="module")
def key() -> ApnsKey:
    return ApnsKey.generate()


@pytest.fixture
async def apns(pki: TestPKI, key: ApnsKey) -> AsyncIterator[FakeAPNs]:
    async with FakeAPNs(pki=pki, keys=[key], topics=[TOPIC]) as fake:
        yield fake


@pytest.fixture
async def client(apns: FakeAPNs) -> AsyncIterator[httpx.AsyncClient]:
    ctx = apns.pki.client_context()
    async with httpx.AsyncClient(http2=True, verify=ctx, base_url=apns.url) as http:
        yield http


@functools.cache
def provider_token(key: ApnsKey) -> str:
    # One JWT per key for the whole module: a second one on a connection would be refused.
    return key.provider_token()


def apns_headers(key: ApnsKey, **changes: str | None) -> dict[str, str]:
    """Valid token-auth headers; ``apns_x_y="v"`` sets ``apns-x-y``, None removes it."""
    headers = {
        "authorization": f"bearer {provider_token(key)}",
        "apns-topic": TOPIC,
        "apns-push-type": "alert",
        "apns-priority": "10",
    }
    for name, value in changes.items():
        header = name.replace("_", "-")
        if value is None:
            headers.pop(header, None)
        else:
            headers[header] = value
    return headers


async def push(
    client: httpx.AsyncClient,
    key: ApnsKey,
    token: str = TOKEN,
    body: bytes = PAYLOAD,
    **changes: str | None,
) -> httpx.Response:
    return await client.post(
        f"/3/device/{token}", content=body, headers=apns_headers(key, **changes)
    )


async def eventually(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    """Poll a server-side condition (no client event announces it)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


def reason(response: httpx.Response) -> str:
    return str(response.json()["reason"])


# -- accepted pushes and what is recorded ------------------------------------------------------


async def test_valid_push_is_accepted_and_recorded(
    apns: FakeAPNs, client: httpx.AsyncClient, key: ApnsKey
) -> None:
    apns_id = str(uuid.uuid4())
    response = await push(client, key, apns_id=apns_id, apns_collapse_id="c" * 64)

    assert response.http_version == "HTTP/2"
    assert (response.status_code, response.content) == (200, b"")
    assert response.headers["apns-id"] == apns_id
    (got,) = apns.received
    assert (got.token, got.status, got.reason, got.apns_id) == (TOKEN, 200, "", apns_id)
    assert got.payload == {"aps": {"alert": "hi"}} and got.body == PAYLOAD
    assert got.headers[":path"] == f"/3/device/{TOKEN}"
    assert got.headers["apns-collapse-id"] == "c" * 64
    assert got.connection == 1 and apns.connections_opened == 1


async def test_apns_id_generated_when_absent(
    apns: FakeAPNs, client: httpx.AsyncClient, key: ApnsKey
) -> None:
    response = await push(client, key, content_type="text/plain")  # content-type is ignored

    assert response.status_code == 200
    generated = response.headers["apns-id"]
    assert str(uuid.UUID(generated)) == generated
    assert apns.received[0].apns_id == generated


@pytest.mark.parametrize(
    ("push_type", "topic", "priority", "size"),
    [
        ("background", TOPIC, "5", 4096),
        ("voip", f"{TOPIC}.voip", "10", 5120),
        ("liveactivity", f"{TOPIC}.push-type.liveactivity", "5", 100),
        ("alert", TOPIC, "1", 100),
    ],
)
async def test_push_types_with_their_topic_and_limit(
    client: httpx.AsyncClient, key: ApnsKey, push_type: str, topic: str, priority: str, size: int
) -> None:
    body = b'{"aps":{},"pad":"' + b"x" * (size - 19) + b'"}'
    assert len(body) == size
    response = await push(
        client, key, body=body, apns_push_type=push_type, apns_topic=topic, apns_priority=priority
    )
    assert response.status_code == 200, response.text


# -- validation, in providers.md §1.2 / §1.10 terms ---------------------------------------------


@pytest.mark.parametrize(
    ("changes", "body", "status", "expected"),
    [
        ({"apns_push_type": "banner"}, PAYLOAD, 400, "InvalidPushType"),
        ({"apns_push_type": "background", "apns_priority": "10"}, PAYLOAD, 400, "BadPriority"),
        ({"apns_push_type": "background", "apns_priority": None}, PAYLOAD, 400, "BadPriority"),
        ({"apns_priority": "7"}, PAYLOAD, 400, "BadPriority"),
        ({"apns_collapse_id": "c" * 65}, PAYLOAD, 400, "BadCollapseId"),
        ({"apns_expiration": "tomorrow"}, PAYLOAD, 400, "BadExpirationDate"),
        ({"apns_expiration": "-1"}, PAYLOAD, 400, "BadExpirationDate"),
        ({"apns_id": str(uuid.uuid4()).upper()}, PAYLOAD, 400, "BadMessageId"),
        ({"apns_id": "not-a-uuid"}, PAYLOAD, 400, "BadMessageId"),
        ({"apns_topic": None}, PAYLOAD, 400, "MissingTopic"),
        ({"apns_topic": "com.example.other"}, PAYLOAD, 400, "TopicDisallowed"),
        ({"apns_topic": f"{TOPIC}.voip"}, PAYLOAD, 400, "BadTopic"),
        ({"apns_push_type": "voip"}, PAYLOAD, 400, "BadTopic"),
        ({}, b"", 400, "PayloadEmpty"),
        ({}, b"{not json", 400, "BadPayload"),
        ({}, b"[1, 2]", 400, "BadPayload"),
        ({}, b'{"p":"' + b"x" * 4091 + b'"}', 413, "PayloadTooLarge"),
        (
            {"apns_push_type": "voip", "apns_topic": f"{TOPIC}.voip"},
            b'{"p":"' + b"x" * 5115 + b'"}',
            413,
            "PayloadTooLarge",
        ),
    ],
)
async def test_request_validation(
    apns: FakeAPNs,
    client: httpx.AsyncClient,
    key: ApnsKey,
    changes: Mapping[str, str | None],
    body: bytes,
    status: int,
    expected: str,
) -> None:
    response = await push(client, key, TOKEN, body, **changes)

    assert (response.status_code, reason(response)) == (status, expected)
    assert response.headers["content-type"] == "application/json"
    assert response.headers["apns-id"] == apns.received[0].apns_id
    assert (apns.received[0].status, apns.received[0].reason) == (status, expected)


@pytest.mark.parametrize(
    ("method", "path", "status", "expected"),
    [
        ("GET", f"/3/device/{TOKEN}", 405, "MethodNotAllowed"),
        ("PUT", f"/3/device/{TOKEN}", 405, "MethodNotAllowed"),
        ("POST", "/3/device/", 400, "MissingDeviceToken"),
        ("POST", "/3/device/xyz", 404, "BadPath"),
        ("POST", f"/3/device/{TOKEN}/x", 404, "BadPath"),
        ("POST", f"/2/device/{TOKEN}", 404, "BadPath"),
    ],
)
async def test_method_and_path(
    client: httpx.AsyncClient, key: ApnsKey, method: str, path: str, status: int, expected: str
) -> None:
    response = await client.request(method, path, content=PAYLOAD, headers=apns_headers(key))
    assert (response.status_code, reason(response)) == (status, expected)


async def test_collapse_id_is_measured_in_bytes(apns: FakeAPNs, pki: TestPKI, key: ApnsKey) -> None:
    raw = await RawClient.connect(apns, pki.client_context())
    headers = list(apns_headers(key).items())
    fits = raw.send(f"/3/device/{TOKEN}", [*headers, ("apns-collapse-id", "é" * 32)], PAYLOAD)
    assert (await raw.response(fits)).headers[":status"] == "200"
    too_long = raw.send(f"/3/device/{TOKEN}", [*headers, ("apns-collapse-id", "é" * 33)], PAYLOAD)
    answer = await raw.response(too_long)
    assert json.loads(answer.body) == {"reason": "BadCollapseId"}  # 66 bytes, 33 characters
    assert apns.received[0].headers["apns-collapse-id"] == "é" * 32
    await raw.close()


async def test_duplicate_headers(apns: FakeAPNs, client: httpx.AsyncClient, key: ApnsKey) -> None:
    headers = [*apns_headers(key).items(), ("apns-topic", TOPIC)]
    response = await client.post(f"/3/device/{TOKEN}", content=PAYLOAD, headers=headers)
    assert (response.status_code, reason(response)) == (400, "DuplicateHeaders")


# -- provider tokens ---------------------------------------------------------------------------


def forged_token(key: ApnsKey, signer: ApnsKey, **claims: object) -> str:
    """A JWT naming ``key`` but signed with ``signer``'s private key."""
    body = {"iss": key.team_id, "iat": int(time.time()), **claims}
    private = load_pem_private_key(signer.key_pem, None)
    return jwt.encode(body, private, algorithm="ES256", headers={"kid": key.key_id})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make_authorization", "status", "expected"),
    [
        (lambda key, other: None, 403, "MissingProviderToken"),
        (lambda key, other: f"bearer {other.provider_token()}", 403, "InvalidProviderToken"),
        (lambda key, other: f"bearer {forged_token(key, other)}", 403, "InvalidProviderToken"),
        (
            lambda key, other: f"bearer {forged_token(key, key, iss='X')}",
            403,
            "InvalidProviderToken",
        ),
        (lambda key, other: f"basic {key.provider_token()}", 403, "InvalidProviderToken"),
        (lambda key, other: "bearer not.a.jwt", 403, "InvalidProviderToken"),
        (
            lambda key, other: f"bearer {key.provider_token(int(time.time()) - 3601)}",
            403,
            "ExpiredProviderToken",
        ),
    ],
)
async def test_provider_token_checks(
    client: httpx.AsyncClient,
    key: ApnsKey,
    make_authorization: Callable[[ApnsKey, ApnsKey], str | None],
    status: int,
    expected: str,
) -> None:
    other = ApnsKey.generate(team_id=key.team_id)
    response = await push(client, key, authorization=make_authorization(key, other))
    assert (response.status_code, reason(response)) == (status, expected)


async def test_token_without_typ_header_and_rotated_key(
    apns: FakeAPNs, client: httpx.AsyncClient, key: ApnsKey
) -> None:
    claims = {"iss": key.team_id, "iat": int(time.time())}
    no_typ = jwt.encode(
        claims, key.key_pem, algorithm="ES256", headers={"kid": key.key_id, "typ": None}
    )
    assert "typ" not in jwt.get_unverified_header(no_typ)
    assert (await push(client, key, authorization=f"bearer {no_typ}")).status_code == 200

    rotated = ApnsKey.generate(team_id=key.team_id)
    apns.add_key(rotated)
    ctx = apns.pki.client_context()
    async with httpx.AsyncClient(http2=True, verify=ctx, base_url=apns.url) as fresh:
        assert (await push(fresh, rotated)).status_code == 200


async def test_new_token_within_the_update_interval_is_refused(pki: TestPKI, key: ApnsKey) -> None:
    async with FakeAPNs(pki=pki, keys=[key], token_update_min_seconds=0.3) as apns:
        ctx = pki.client_context()
        async with httpx.AsyncClient(http2=True, verify=ctx, base_url=apns.url) as client:
            first = f"bearer {key.provider_token(int(time.time()) - 10)}"
            second = f"bearer {key.provider_token()}"
            assert (await push(client, key, authorization=first)).status_code == 200
            refused = await push(client, key, authorization=second)
            assert (refused.status_code, reason(refused)) == (429, "TooManyProviderTokenUpdates")
            assert (await push(client, key, authorization=first)).status_code == 200
            await asyncio.sleep(0.3)
            assert (await push(client, key, authorization=second)).status_code == 200
        assert apns.connections_opened == 1


async def test_one_stream_until_the_first_valid_token(pki: TestPKI, key: ApnsKey) -> None:
    async with FakeAPNs(pki=pki, keys=[key], max_concurrent_streams=7) as apns:
        raw = await RawClient.connect(apns, pki.client_context())
        max_streams = h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
        assert await raw.wait_for(lambda: raw.conn.remote_settings.max_concurrent_streams == 1)

        bad = raw.send(f"/3/device/{TOKEN}", [("apns-topic", TOPIC)], PAYLOAD)
        assert (await raw.response(bad)).headers[":status"] == "403"
        assert raw.conn.remote_settings[max_streams] == 1

        good = raw.send(f"/3/device/{TOKEN}", list(apns_headers(key).items()), PAYLOAD)
        assert (await raw.response(good)).headers[":status"] == "200"
        assert await raw.wait_for(lambda: raw.conn.remote_settings.max_concurrent_streams == 7)
        await raw.close()


# -- certificate authentication ----------------------------------------------------------------


async def test_certificate_connection_needs_no_token_and_defaults_the_topic(
    apns: FakeAPNs, pki: TestPKI
) -> None:
    cert = pki.client_cert_pem(f"Apple Push Services: {TOPIC}", uid=TOPIC)
    ctx = pki.client_context(cert_pem=cert)
    async with httpx.AsyncClient(http2=True, verify=ctx, base_url=apns.url) as client:
        ok = await client.post(f"/3/device/{TOKEN}", content=PAYLOAD)
        voip = await client.post(
            f"/3/device/{TOKEN}",
            content=PAYLOAD,
            headers={"apns-push-type": "voip", "apns-topic": f"{TOPIC}.voip"},
        )
        other = await client.post(
            f"/3/device/{TOKEN}", content=PAYLOAD, headers={"apns-topic": "com.other"}
        )
    assert (ok.status_code, voip.status_code) == (200, 200)
    assert (other.status_code, reason(other)) == (400, "TopicDisallowed")
    assert "apns-topic" not in apns.received[0].headers


async def test_certificate_connection_may_open_many_streams_at_once(
    apns: FakeAPNs, pki: TestPKI
) -> None:
    cert = pki.client_cert_pem("Apple Push Services: x", uid=TOPIC)
    raw = await RawClient.connect(apns, pki.client_context(cert_pem=cert))
    assert await raw.wait_for(lambda: raw.conn.remote_settings.max_concurrent_streams == 1000)
    await raw.close()


# -- scripted answers --------------------------------------------------------------------------


async def test_dead_and_scripted_tokens(
    apns: FakeAPNs, client: httpx.AsyncClient, key: ApnsKey
) -> None:
    apns.mark_dead(TOKEN, timestamp_ms=1_700_000_000_000)
    apns.script(OTHER, 400, "BadDeviceToken")

    dead = await push(client, key, TOKEN)
    bad = await push(client, key, OTHER)
    invalid_for_dead = await push(client, key, TOKEN, apns_priority="3")

    assert dead.status_code == 410
    assert dead.json() == {"reason": "Unregistered", "timestamp": 1_700_000_000_000}
    assert (bad.status_code, bad.json()) == (400, {"reason": "BadDeviceToken"})
    assert reason(invalid_for_dead) == "BadPriority"  # validation comes before scripts

    before = int(time.time() * 1000)
    apns.mark_dead(OTHER.upper())  # tokens match case-insensitively
    after = int(time.time() * 1000)
    now_dead = (await push(client, key, OTHER)).json()
    assert now_dead["reason"] == "Unregistered" and before <= now_dead["timestamp"] <= after


async def test_injected_failures_hit_the_next_valid_requests(
    apns: FakeAPNs, client: httpx.AsyncClient, key: ApnsKey
) -> None:
    apns.inject(503, "ServiceUnavailable", count=2, retry_after=7)
    invalid = await push(client, key, body=b"")
    first, second, third = [await push(client, key) for _ in range(3)]

    assert reason(invalid) == "PayloadEmpty"  # not counted
    assert (first.status_code, reason(first), first.headers["retry-after"]) == (
        503,
        "ServiceUnavailable",
        "7",
    )
    assert second.status_code == 503 and third.status_code == 200
    assert [r.status for r in apns.received] == [400, 503, 503, 200]

    apns.inject(429, "TooManyRequests")
    limited = await push(client, key)
    assert (limited.status_code, reason(limited)) == (429, "TooManyRequests")
    assert "retry-after" not in limited.headers


async def test_clear_forgets_everything(
    apns: FakeAPNs, client: httpx.AsyncClient, key: ApnsKey
) -> None:
    apns.mark_dead(TOKEN)
    apns.inject(500, "InternalServerError", count=5)
    apns.delay(10)
    apns.drop_next(3)
    apns.clear()

    assert apns.received == [] and apns.requests_seen == 0
    assert (await push(client, key)).status_code == 200


async def test_recording_can_be_turned_off(pki: TestPKI, key: ApnsKey) -> None:
    async with FakeAPNs(pki=pki, keys=[key], record=False) as apns:
        ctx = pki.client_context()
        async with httpx.AsyncClient(http2=True, verify=ctx, base_url=apns.url) as client:
            assert (await push(client, key)).status_code == 200
        assert (apns.received, apns.requests_seen) == ([], 1)


# -- faults: latency, stalls, drops, GOAWAY -----------------------------------------------------


async def test_delay_for_one_token_leaves_others_fast(
    apns: FakeAPNs, client: httpx.AsyncClient, key: ApnsKey
) -> None:
    await push(client, key, OTHER)  # lift the one-stream limit first
    apns.delay(2 * SHORT, TOKEN)
    started = time.monotonic()
    slow = asyncio.create_task(push(client, key, TOKEN))
    assert await eventually(lambda: len(apns.received) == 2)
    assert (await push(client, key, OTHER)).status_code == 200
    assert not slow.done()
    assert (await slow).status_code == 200
    assert time.monotonic() - started >= 2 * SHORT


async def test_stalled_token_never_answered_until_cleared(
    apns: FakeAPNs, client: httpx.AsyncClient, key: ApnsKey
) -> None:
    await push(client, key, OTHER)
    apns.stall(TOKEN)
    stalled = asyncio.create_task(push(client, key, TOKEN))
    assert await eventually(lambda: len(apns.received) == 2)
    assert (await push(client, key, OTHER)).status_code == 200  # the connection still serves
    done, _ = await asyncio.wait([stalled], timeout=SHORT)
    assert not done
    assert [(r.token, r.status) for r in apns.received] == [(OTHER, 200), (TOKEN, 0), (OTHER, 200)]
    assert apns.connections_opened == 1

    apns.clear()
    assert (await stalled).status_code == 200


async def test_drop_cuts_the_connection_without_answering(
    apns: FakeAPNs, client: httpx.AsyncClient, key: ApnsKey
) -> None:
    apns.drop_next()
    with pytest.raises(httpx.TransportError):
        await push(client, key)
    assert (await push(client, key)).status_code == 200
    assert apns.connections_opened == 2
    assert [(r.status, r.connection) for r in apns.received] == [(0, 1), (200, 2)]


async def test_goaway_carries_the_reason_and_ends_in_flight_requests(
    apns: FakeAPNs, pki: TestPKI, key: ApnsKey
) -> None:
    apns.stall(TOKEN)
    raw = await RawClient.connect(apns, pki.client_context())
    stream = raw.send(f"/3/device/{TOKEN}", list(apns_headers(key).items()), PAYLOAD)
    assert await eventually(lambda: len(apns.received) == 1)

    await apns.goaway()

    assert await raw.wait_for(lambda: raw.eof)
    assert raw.goaway is not None
    assert json.loads(raw.goaway.additional_data or b"") == {"reason": "Shutdown"}
    assert raw.goaway.last_stream_id == stream
    assert not raw.streams[stream].ended
    assert apns.server.connections == []
    await raw.close()

    async with httpx.AsyncClient(http2=True, verify=pki.client_context()) as client:
        again = await client.post(
            f"{apns.url}/3/device/{OTHER}", content=PAYLOAD, headers=apns_headers(key)
        )
    assert again.status_code == 200 and apns.connections_opened == 2


# -- HTTP/2 mechanics --------------------------------------------------------------------------


async def test_many_concurrent_streams_and_connections(apns: FakeAPNs, key: ApnsKey) -> None:
    ctx = apns.pki.client_context()
    async with (
        httpx.AsyncClient(http2=True, verify=ctx, base_url=apns.url) as one,
        httpx.AsyncClient(http2=True, verify=ctx, base_url=apns.url) as two,
    ):
        await push(one, key)  # lift the one-stream limit before the burst
        await push(two, key)
        responses = await asyncio.gather(
            *(push(client, key, f"{n:064x}") for n in range(150) for client in (one, two))
        )
    assert all(r.status_code == 200 for r in responses)
    assert len(apns.received) == 302
    assert {r.connection for r in apns.received} == {1, 2}
    assert len({r.apns_id for r in apns.received}) == 302


async def test_body_in_several_data_frames(apns: FakeAPNs, pki: TestPKI, key: ApnsKey) -> None:
    raw = await RawClient.connect(apns, pki.client_context())
    body = json.dumps({"aps": {"alert": "x" * 3000}}).encode()
    stream = raw.send(f"/3/device/{TOKEN}", list(apns_headers(key).items()), body, chunks=4)
    assert (await raw.response(stream)).headers[":status"] == "200"
    assert apns.received[0].body == body
    await raw.close()


async def test_client_reset_and_disconnect_end_server_work(
    apns: FakeAPNs, pki: TestPKI, key: ApnsKey
) -> None:
    apns.stall(TOKEN)
    raw = await RawClient.connect(apns, pki.client_context())
    first = raw.send(f"/3/device/{TOKEN}", list(apns_headers(key).items()), PAYLOAD)
    assert await eventually(lambda: apns.server.active_requests == 1)
    raw.reset(first)
    assert await eventually(lambda: apns.server.active_requests == 0)

    raw.send(f"/3/device/{TOKEN}", list(apns_headers(key).items()), PAYLOAD)
    assert await eventually(lambda: apns.server.active_requests == 1)
    await raw.close(abort=True)
    assert await eventually(lambda: not apns.server.connections)
    assert apns.server.active_requests == 0
    assert [r.status for r in apns.received] == [0, 0]


async def test_stop_closes_open_connections(pki: TestPKI, key: ApnsKey) -> None:
    apns = FakeAPNs(pki=pki, keys=[key])
    await apns.start()
    apns.stall(TOKEN)
    raw = await RawClient.connect(apns, pki.client_context())
    raw.send(f"/3/device/{TOKEN}", list(apns_headers(key).items()), PAYLOAD)
    assert await eventually(lambda: len(apns.received) == 1)

    await apns.stop()
    assert await raw.wait_for(lambda: raw.eof)
    assert raw.goaway is not None
    await raw.close()


# -- flow control ------------------------------------------------------------------------------


async def test_error_body_waits_for_the_clients_window(
    apns: FakeAPNs, pki: TestPKI, key: ApnsKey
) -> None:
    apns.mark_dead(TOKEN, timestamp_ms=1)
    raw = await RawClient.connect(apns, pki.client_context(), auto_ack=False, window=10)
    stream = raw.send(f"/3/device/{TOKEN}", list(apns_headers(key).items()), PAYLOAD)

    assert await raw.wait_for(lambda: len(raw.streams[stream].body) == 10)
    assert not await raw.wait_for(lambda: raw.streams[stream].ended, SHORT)
    assert raw.streams[stream].headers[":status"] == "410"

    raw.window_update(stream, 1000)
    answer = await raw.response(stream)
    assert json.loads(answer.body) == {"reason": "Unregistered", "timestamp": 1}
    await raw.close()


async def test_client_that_never_acknowledges_stalls_after_its_connection_window(
    apns: FakeAPNs, pki: TestPKI, key: ApnsKey
) -> None:
    # aioapns's defect: error bodies are never acknowledged, so ~64 KiB of them (about 1,200
    # answers for dead tokens) spend the connection window and the next answers stall.
    apns.mark_dead(TOKEN, timestamp_ms=1_700_000_000_000)
    body = b'{"reason": "Unregistered", "timestamp": 1700000000000}'
    raw = await RawClient.connect(apns, pki.client_context(), auto_ack=False)
    headers = list(apns_headers(key).items())

    def window_spent() -> bool:
        received = sum(len(stream.body) for stream in raw.streams.values())
        return 65535 - received < len(body)

    async def send_batch() -> list[int]:
        """Send 500 pushes; return those left unanswered once the window is spent."""
        batch = [raw.send(f"/3/device/{TOKEN}", headers, PAYLOAD) for _ in range(500)]
        assert await raw.wait_for(
            lambda: window_spent() or all(raw.streams[n].ended for n in batch)
        )
        return [n for n in batch if not raw.streams[n].ended]

    stalled: list[int] = []
    while not stalled:
        stalled = await send_batch()
    assert not await raw.wait_for(lambda: raw.streams[stalled[0]].ended, SHORT)

    answered = [stream for stream in raw.streams.values() if stream.ended]
    assert len(answered) == 65535 // len(body)
    assert all(stream.body == body for stream in answered)
    # Headers arrive, the body waits whole for a WINDOW_UPDATE that never comes.
    assert await raw.wait_for(lambda: all(raw.streams[s].headers for s in stalled))
    assert all(raw.streams[s].headers[":status"] == "410" for s in stalled)
    assert all(raw.streams[s].body == b"" for s in stalled)
    await raw.close()


@pytest.mark.parametrize(("fill_window", "sent"), [(False, 3 * 16384), (True, 65535)])
async def test_large_body_goes_as_far_as_the_window(
    pki: TestPKI, fill_window: bool, sent: int
) -> None:
    big = bytes(range(256)) * 1024  # 256 KiB: four times the initial windows

    async def handler(request: Request) -> Response:
        return Response(200, [("content-length", str(len(big)))], big)

    async with H2Server(handler, pki.server_context(), fill_window=fill_window) as server:
        stingy = await RawClient.connect(server, pki.client_context(), auto_ack=False)
        stalled = stingy.streams[stingy.send("/", [], method="GET")]
        assert await stingy.wait_for(lambda: len(stalled.body) == sent)
        assert not await stingy.wait_for(lambda: stalled.ended, SHORT)
        await stingy.close()

        polite = await RawClient.connect(server, pki.client_context())
        answer = await polite.response(polite.send("/", [], method="GET"))
        assert bytes(answer.body) == big
        await polite.close()


async def test_fill_window_splits_short_bodies(pki: TestPKI, key: ApnsKey) -> None:
    async with FakeAPNs(pki=pki, keys=[key], fill_window=True) as apns:
        apns.script(TOKEN, 400, "BadDeviceToken")
        raw = await RawClient.connect(apns, pki.client_context(), auto_ack=False, window=8)
        stream = raw.send(f"/3/device/{TOKEN}", list(apns_headers(key).items()), PAYLOAD)
        assert await raw.wait_for(lambda: len(raw.streams[stream].body) == 8)
        raw.window_update(stream, 100)
        answer = await raw.response(stream)
        assert json.loads(answer.body) == {"reason": "BadDeviceToken"}
        await raw.close()


# -- credentials -------------------------------------------------------------------------------


def test_generated_key_looks_like_apples() -> None:
    key = ApnsKey.generate(team_id="TEAM123456")
    assert key.team_id == "TEAM123456"
    assert re.fullmatch("[A-Z0-9]{10}", key.key_id)
    assert key.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, like a .p8
    claims = jwt.decode(key.provider_token(), key.public_key_pem, algorithms=["ES256"])
    assert claims["iss"] == "TEAM123456"
    assert jwt.get_unverified_header(key.provider_token())["kid"] == key.key_id
