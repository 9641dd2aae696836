"""A small async client for push-relay, around the generated stub.

    async with RelayClient("127.0.0.1:50051") as client:
        response = await client.send(request, timeout=5)
        async for response in client.send_many(requests):
            ...

``send_many`` pipelines requests over one ``SendStream`` call; answers come back as they are
ready (match them by ``request_id``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from types import TracebackType

import grpc

from pushrelay.v1 import relay_pb2 as pb
from pushrelay.v1 import relay_pb2_grpc


class RelayClient:
    """A channel to one relay, with optional TLS (``ca_pem``, client cert) and bearer token."""

    def __init__(
        self,
        target: str,
        *,
        ca_pem: bytes | None = None,
        client_cert_pem: bytes | None = None,
        client_key_pem: bytes | None = None,
        token: str | None = None,
    ) -> None:
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        if ca_pem is None and client_cert_pem is None:
            self._channel = grpc.aio.insecure_channel(target)
        else:
            credentials = grpc.ssl_channel_credentials(ca_pem, client_key_pem, client_cert_pem)
            self._channel = grpc.aio.secure_channel(target, credentials)
        self._stub = relay_pb2_grpc.PushRelayStub(self._channel)

    async def send(
        self, request: pb.SendRequest, *, timeout: float | None = None
    ) -> pb.SendResponse:
        """One request; raises ``grpc.aio.AioRpcError`` on a whole-request error."""
        response: pb.SendResponse = await self._stub.Send(
            request, timeout=timeout, metadata=self._metadata
        )
        return response

    async def send_many(
        self, requests: Iterable[pb.SendRequest], *, timeout: float | None = None
    ) -> AsyncIterator[pb.SendResponse]:
        """Pipeline ``requests`` over one stream; yields answers as they arrive."""
        call = self._stub.SendStream(iter(requests), timeout=timeout, metadata=self._metadata)
        async for response in call:
            yield response

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> RelayClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
