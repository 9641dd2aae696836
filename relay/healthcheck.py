"""A container health probe: asks the relay's gRPC health service, exits 0 when SERVING.

    python -m relay.healthcheck [HOST:PORT] [SERVICE]

It asks the plaintext health listener (``server.health_listen``, 127.0.0.1:50052 by default
here), which answers even when the API port requires TLS. Slim images have no curl or
grpc_health_probe; this needs only what the relay already has.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def probe(target: str, service: str = "", timeout: float = 2.0) -> bool:
    """True when the health service at ``target`` reports ``service`` as SERVING."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def main(argv: list[str]) -> int:
    target = argv[0] if argv else "127.0.0.1:50052"
    service = argv[1] if len(argv) > 1 else ""
    return 0 if probe(target, service) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
