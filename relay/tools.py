"""``push-relay send``: one notification through a throwaway relay, for checking a config.

It starts the configured apps' adapters behind a relay on a loopback port and sends through the
real gRPC API, so what it prints is exactly what a chat server would get back.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses

import grpc

from pushrelay.v1 import relay_pb2 as pb
from relay.client import RelayClient
from relay.config import Config
from relay.server import RelayServer


def build_request(args: argparse.Namespace) -> pb.SendRequest:
    privacy = pb.Privacy.Value(args.privacy.upper()) if args.privacy else pb.PRIVACY_UNSPECIFIED
    return pb.SendRequest(
        request_id="push-relay-send",
        notification=pb.Notification(
            kind=pb.Kind.Value(args.kind.upper()),
            sender_display_name=args.sender,
            preview=args.preview,
            conversation_id=args.conversation,
            badge=args.badge,
            privacy=privacy,
        ),
        devices=[pb.Device(app_id=args.app, token=args.token, keys=_keys(args))],
    )


def _keys(args: argparse.Namespace) -> pb.DeviceKeys | None:
    if not (args.p256dh or args.auth):
        return None
    return pb.DeviceKeys(p256dh=_b64url(args.p256dh or ""), auth=_b64url(args.auth or ""))


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def send_one(config: Config, args: argparse.Namespace) -> int:
    """Send one notification; 0 when delivered, 1 otherwise."""
    # A throwaway relay on loopback for this one call: no callers but us, no listeners of the
    # configured service's own (its ports may be taken by the running relay).
    server_config = dataclasses.replace(
        config.server, listen="127.0.0.1:0", http_listen="127.0.0.1:0", health_listen="", tls=None
    )
    local = dataclasses.replace(config, clients=(), server=server_config)
    server = RelayServer(local)
    await server.start()
    try:
        async with RelayClient(f"127.0.0.1:{server.port}") as client:
            try:
                response = await client.send(build_request(args), timeout=args.timeout)
            except grpc.aio.AioRpcError as error:
                print(f"error: {error.code().name}: {error.details()}")
                return 1
    finally:
        await server.stop(grace=1)
    result = response.results[0]
    print(format_result(result))
    return 0 if result.outcome == pb.DELIVERED else 1


def format_result(result: pb.DeviceResult) -> str:
    fields = [
        f"outcome={pb.Outcome.Name(result.outcome)}",
        f"privacy={pb.Privacy.Name(result.privacy)}",
    ]
    if result.reason:
        fields.append(f"reason={result.reason}")
    if result.provider_message_id:
        fields.append(f"provider_message_id={result.provider_message_id}")
    if result.retry_after_seconds:
        fields.append(f"retry_after_seconds={result.retry_after_seconds}")
    if result.token_invalid_since_ms:
        fields.append(f"token_invalid_since_ms={result.token_invalid_since_ms}")
    return " ".join(fields)
