"""The fake FCM's send endpoint: how it validates a body and words its answers (§2.2, §2.5).

Choices where Google documents nothing: the 4096-byte limit (2048 for topics and conditions)
applies to the compact JSON of the message without its target, the definition
``relay/render.py`` sizes payloads by; unknown fields are rejected, as proto3 JSON parsing does,
in ``message``, ``notification``, ``android`` and ``android.notification``; an empty ``token``
is "not a valid FCM registration token". Field names are accepted in snake_case and
lowerCamelCase alike.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from adapters.base import encode_json

INVALID_TOKEN_MESSAGE = "The registration token is not a valid FCM registration token"
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
MAX_MESSAGE_BYTES = 4096
MAX_TOPIC_MESSAGE_BYTES = 2048
MAX_TTL_SECONDS = 2_419_200
TARGETS = ("token", "topic", "condition", "fid")

_RPC_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
_DEFAULT_MESSAGES = {
    "UNREGISTERED": "Requested entity was not found.",
    "SENDER_ID_MISMATCH": "SenderId mismatch",
    "QUOTA_EXCEEDED": "Quota exceeded for message sends.",
    "UNAVAILABLE": "The service is currently unavailable.",
    "INTERNAL": "Internal error encountered.",
    "THIRD_PARTY_AUTH_ERROR": "Auth error from APNS or Web Push Service",
    "INVALID_ARGUMENT": "Request contains an invalid argument.",
}
_TTL = re.compile(r"(\d+)(?:\.(\d{1,9}))?s")
_BODY_FIELDS = frozenset({"message", "validate_only"})
_MESSAGE_FIELDS = frozenset(
    {"name", "data", "notification", "android", "webpush", "apns", "fcm_options", *TARGETS}
)
_NOTIFICATION_FIELDS = frozenset({"title", "body", "image"})
_ANDROID_FIELDS = frozenset(
    {
        "collapse_key", "priority", "ttl", "restricted_package_name", "data", "notification",
        "fcm_options", "direct_boot_ok", "bandwidth_constrained_ok", "restricted_satellite_ok",
    }
)  # fmt: skip
_ANDROID_NOTIFICATION_FIELDS = frozenset(
    {
        "title", "body", "icon", "color", "sound", "tag", "click_action", "body_loc_key",
        "body_loc_args", "title_loc_key", "title_loc_args", "channel_id", "ticker", "sticky",
        "event_time", "local_only", "notification_priority", "default_sound",
        "default_vibrate_timings", "default_light_settings", "vibrate_timings", "visibility",
        "notification_count", "light_settings", "image", "bypass_proxy_notification", "proxy",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Answer:
    """An answer of the send endpoint: a status, an FCM code, the google.rpc message."""

    status: int
    error_code: str = ""
    message: str = ""
    retry_after: int | None = None
    violations: tuple[tuple[str, str], ...] = ()  # BadRequest fieldViolations (field, why)


class InvalidMessage(ValueError):
    """FCM would answer 400 ``INVALID_ARGUMENT``.

    Attributes:
        message: the google.rpc ``message`` (never a data value: test logs stay content-free).
        field: the ``google.rpc.BadRequest`` field violation's path.
    """

    def __init__(self, message: str, field: str = "message") -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def parse_body(body: bytes) -> dict[str, Any]:
    """The ``message`` object of a send request's body.

    Raises:
        InvalidMessage: the body is not ``{"message": {...}}`` (plus ``validate_only``).
    """
    try:
        document = json.loads(body)
    except ValueError:
        raise InvalidMessage("Invalid JSON payload received.") from None
    if not isinstance(document, dict) or not isinstance(document.get("message"), dict):
        raise InvalidMessage("Invalid JSON payload received: a message object is required.")
    _check_fields(document, _BODY_FIELDS, "")
    message: dict[str, Any] = document["message"]
    return message


def check_message(message: Mapping[str, Any]) -> None:
    """Validate an FCM v1 ``message`` object, target included.

    Raises:
        InvalidMessage: the first problem found.
    """
    _check_fields(message, _MESSAGE_FIELDS, "message")
    kind = _check_target(message)
    untargeted = {k: v for k, v in message.items() if k not in TARGETS}
    limit = MAX_MESSAGE_BYTES if kind in ("token", "fid") else MAX_TOPIC_MESSAGE_BYTES
    if len(encode_json(untargeted)) > limit:
        raise InvalidMessage(f"Message is too big: the limit is {limit} bytes.")
    _check_data(field_of(message, "data"), "message.data")
    _check_notification(field_of(message, "notification"))
    _check_android(field_of(message, "android"))
    for name in ("apns", "webpush", "fcm_options"):
        _check_object(field_of(message, name), f"message.{name}")


def target_of(message: Mapping[str, Any]) -> tuple[str, str]:
    """``(kind, value)`` of the message's one target; ``("", "")`` when not exactly one."""
    present = [name for name in TARGETS if name in message]
    if len(present) != 1 or not isinstance(message[present[0]], str):
        return "", ""
    return present[0], message[present[0]]


def field_of(obj: Mapping[str, Any], snake: str) -> Any:
    """A field by its snake_case name or its lowerCamelCase spelling (proto3 JSON takes both)."""
    if snake in obj:
        return obj[snake]
    head, *rest = snake.split("_")
    return obj.get(head + "".join(part.title() for part in rest))


def _check_target(message: Mapping[str, Any]) -> str:
    present = [name for name in TARGETS if name in message]
    if len(present) != 1:
        raise InvalidMessage("Exactly one of token, topic, condition or fid must be set.")
    kind = present[0]
    if not isinstance(message[kind], str):
        raise InvalidMessage(f"Invalid value at 'message.{kind}' (TYPE_STRING)", f"message.{kind}")
    if kind == "token" and not message[kind]:
        raise InvalidMessage(INVALID_TOKEN_MESSAGE, "message.token")
    return kind


def _check_fields(obj: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    for name in obj:
        if _snake(name) not in known:
            raise InvalidMessage(
                f"Invalid JSON payload received. Unknown name \"{name}\" at '{where}': "
                "Cannot find field.",
                where,
            )


def _check_object(value: object, where: str) -> None:
    if value is not None and not isinstance(value, dict):
        raise InvalidMessage(f"Invalid value at '{where}'", where)


def _check_data(data: object, where: str) -> None:
    _check_object(data, where)
    if not isinstance(data, dict):
        return
    for index, (key, value) in enumerate(data.items()):
        if not isinstance(value, str):
            # FCM echoes the value here; the fake does not.
            raise InvalidMessage(f"Invalid value at '{where}[{index}].value' (TYPE_STRING)", where)
        if key in ("from", "message_type") or key.startswith(("google", "gcm")):
            raise InvalidMessage(f"Invalid data payload key at '{where}[{index}].key'", where)


def _check_notification(notification: object) -> None:
    _check_object(notification, "message.notification")
    if not isinstance(notification, dict):
        return
    _check_fields(notification, _NOTIFICATION_FIELDS, "message.notification")
    for name, value in notification.items():
        if not isinstance(value, str):
            where = f"message.notification.{_snake(name)}"
            raise InvalidMessage(f"Invalid value at '{where}' (TYPE_STRING)", where)


def _check_android(android: object) -> None:
    _check_object(android, "message.android")
    if not isinstance(android, dict):
        return
    _check_fields(android, _ANDROID_FIELDS, "message.android")
    ttl = field_of(android, "ttl")
    if ttl is not None and not _valid_ttl(ttl):
        raise InvalidMessage("Invalid value at 'message.android.ttl'", "message.android.ttl")
    priority = field_of(android, "priority")
    if priority is not None and str(priority).lower() not in ("high", "normal"):
        where = "message.android.priority"
        raise InvalidMessage(f"Invalid value at '{where}'", where)
    if not isinstance(field_of(android, "collapse_key") or "", str):
        where = "message.android.collapse_key"
        raise InvalidMessage(f"Invalid value at '{where}' (TYPE_STRING)", where)
    _check_data(field_of(android, "data"), "message.android.data")
    notification = field_of(android, "notification")
    _check_object(notification, "message.android.notification")
    if isinstance(notification, dict):
        _check_fields(notification, _ANDROID_NOTIFICATION_FIELDS, "message.android.notification")


def _valid_ttl(ttl: object) -> bool:
    """A Duration string (``"3s"``, ``"3.000000001s"``) of at most four weeks."""
    match = _TTL.fullmatch(ttl) if isinstance(ttl, str) else None
    if match is None:
        return False
    seconds, fraction = int(match.group(1)), int(match.group(2) or 0)
    return seconds < MAX_TTL_SECONDS or (seconds == MAX_TTL_SECONDS and fraction == 0)


def _snake(name: str) -> str:
    return re.sub(r"[A-Z]", lambda m: "_" + m.group(0).lower(), name)


def error_answer(
    status: int, error_code: str, message: str | None = None, retry_after: int | None = None
) -> Answer:
    """An error answer; ``message`` defaults to FCM's usual words for ``error_code``."""
    text = message if message is not None else _DEFAULT_MESSAGES.get(error_code, "Error.")
    return Answer(status, error_code, text, retry_after)


def rpc_error_body(answer: Answer) -> bytes:
    """The google.rpc ``Status`` body of an error answer."""
    details: list[dict[str, Any]] = []
    if answer.error_code:
        details.append({"@type": FCM_ERROR_TYPE, "errorCode": answer.error_code})
    if answer.violations:
        violations = [{"field": f, "description": why} for f, why in answer.violations]
        details.append({"@type": BAD_REQUEST_TYPE, "fieldViolations": violations})
    error: dict[str, Any] = {
        "code": answer.status,
        "message": answer.message,
        "status": _RPC_STATUS.get(answer.status, "UNKNOWN"),
    }
    if details:
        error["details"] = details
    return json.dumps({"error": error}).encode()
