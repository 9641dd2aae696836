"""Shared fixtures: a fake APNs on loopback TLS, and a real relay in front of it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from pushrelay.v1 import relay_pb2_grpc
from relay.config import Config
from relay.server import RelayServer
from relay.testing.configs import apns_app, local_config
from relay.testing.credentials import ApnsKey
from relay.testing.fake_apns import FakeAPNs
from relay.testing.tls import TestPKI
from tests.support import TOPIC


@pytest.fixture(scope="session")
def pki() -> TestPKI:
    return TestPKI()


@pytest.fixture(scope="session")
def apns_key() -> ApnsKey:
    return ApnsKey.generate()


@pytest.fixture
async def fake_apns(pki: TestPKI, apns_key: ApnsKey) -> AsyncIterator[FakeAPNs]:
    async with FakeAPNs(pki=pki, keys=[apns_key], topics=[TOPIC]) as fake:
        yield fake


@pytest.fixture
def relay_config(fake_apns: FakeAPNs, apns_key: ApnsKey) -> Config:
    return local_config([apns_app(fake_apns, apns_key)])


@pytest.fixture
async def start_relay() -> AsyncIterator[Callable[[Config], object]]:
    """Start relays on free ports; all are stopped at the end of the test."""
    servers: list[RelayServer] = []

    async def start(config: Config) -> RelayServer:
        server = RelayServer(config)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop(grace=0.5)


@pytest.fixture
async def relay(start_relay, relay_config: Config) -> RelayServer:  # type: ignore[no-untyped-def]
    server: RelayServer = await start_relay(relay_config)
    return server


@pytest.fixture
async def channel(relay: RelayServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{relay.port}") as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> relay_pb2_grpc.PushRelayStub:
    return relay_pb2_grpc.PushRelayStub(channel)
