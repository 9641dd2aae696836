"""Helpers shared by the tests: request builders and token generators."""

from __future__ import annotations

import secrets

from pushrelay.v1 import relay_pb2 as pb

TOPIC = "com.example.chat"


def apns_token() -> str:
    return secrets.token_hex(32)


def request(
    *tokens: str,
    app_id: str = "chat-ios",
    kind: int = pb.INSTANT_MESSAGE,
    privacy: int = pb.PRIVACY_UNSPECIFIED,
    request_id: str = "req-1",
    **notification: object,
) -> pb.SendRequest:
    fields: dict[str, object] = {
        "sender_display_name": "Alice Example",
        "preview": "Lunch at noon?",
        "conversation_id": "conv-42",
    }
    fields.update(notification)
    return pb.SendRequest(
        request_id=request_id,
        notification=pb.Notification(kind=kind, privacy=privacy, **fields),  # type: ignore[arg-type]
        devices=[pb.Device(app_id=app_id, token=t) for t in tokens],
    )


class FakeClock:
    """A clock the test moves by hand (``clock.advance(5)``): monotonic seconds by default, or
    epoch seconds when started at one (``FakeClock(1_900_000_000.0)``)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
