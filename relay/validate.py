"""Request validation: every problem found, each named by its field, values never echoed.

A request is checked whole before anything is sent, so a bad request costs no provider call and
nothing is half-done. Device checks are per platform (``DEVICE_CHECKS``): a new provider adds its
token rule here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

from cryptography.hazmat.primitives.asymmetric import ec

from adapters.apns import ApnsSettings
from adapters.base import DeviceKeys
from adapters.webpush import WebPushSettings, check_endpoint
from pushrelay.v1 import relay_pb2 as pb
from relay.config import AppConfig, Limits
from relay.errors import InvalidArgument
from relay.model import Kind, Message, Privacy

SENDER_MAX_CHARS = 256
PREVIEW_MAX_CHARS = 4000
CONVERSATION_ID_MAX_BYTES = 256
REQUEST_ID_MAX_CHARS = 128
TTL_MAX_SECONDS = 2_419_200  # four weeks, the longest any provider holds a push

_APNS_TOKEN = re.compile(r"[0-9a-fA-F]{64,200}")
# FCM registration tokens are opaque but drawn from this alphabet; `fid:<id>` names a Firebase
# installation id instead.
_FCM_TOKEN = re.compile(r"(?:fid:)?[A-Za-z0-9_\-:.]{1,4096}")

DeviceCheck = Callable[[pb.Device, AppConfig], str | None]


def _check_apns(device: pb.Device, app: AppConfig) -> str | None:
    if not _APNS_TOKEN.fullmatch(device.token):
        return "token: not a hex APNs token (64 to 200 hex characters)"
    return None


def _check_fcm(device: pb.Device, app: AppConfig) -> str | None:
    if not _FCM_TOKEN.fullmatch(device.token) or device.token == "fid:":
        return "token: not an FCM registration token or fid:<installation id>"
    return None


def _check_webpush(device: pb.Device, app: AppConfig) -> str | None:
    if not device.HasField("keys"):
        return "keys: required for Web Push (the subscription's p256dh and auth)"
    assert isinstance(app.settings, WebPushSettings)
    return check_endpoint(app.settings, device.token)


DEVICE_CHECKS: dict[str, DeviceCheck] = {
    "apns": _check_apns,
    "fcm": _check_fcm,
    "webpush": _check_webpush,
}


def check_request(
    request: pb.SendRequest, apps: Mapping[str, AppConfig], limits: Limits
) -> list[str]:
    """Every problem with ``request``, each as ``field: rule``; empty when it is valid."""
    problems = _check_header(request)
    problems += _check_notification(request.notification)
    problems += _check_devices(request.devices, apps, limits, request.notification.kind)
    return problems


def _check_header(request: pb.SendRequest) -> list[str]:
    rid = request.request_id
    if len(rid) > REQUEST_ID_MAX_CHARS or not rid.isprintable():
        return [f"request_id: at most {REQUEST_ID_MAX_CHARS} printable characters"]
    return []


def _check_notification(n: pb.Notification) -> list[str]:
    problems = []
    if n.kind == pb.KIND_UNSPECIFIED:
        problems.append("notification.kind: required (KIND_UNSPECIFIED)")
    elif n.kind not in Kind._value2member_map_:
        problems.append("notification.kind: not a known kind")
    if n.privacy != pb.PRIVACY_UNSPECIFIED and n.privacy not in Privacy._value2member_map_:
        problems.append("notification.privacy: not a known privacy mode")
    if len(n.sender_display_name) > SENDER_MAX_CHARS:
        problems.append(f"notification.sender_display_name: over {SENDER_MAX_CHARS} characters")
    if len(n.preview) > PREVIEW_MAX_CHARS:
        problems.append(f"notification.preview: over {PREVIEW_MAX_CHARS} characters")
    if len(n.conversation_id.encode()) > CONVERSATION_ID_MAX_BYTES:
        problems.append(f"notification.conversation_id: over {CONVERSATION_ID_MAX_BYTES} bytes")
    if n.ttl_seconds > TTL_MAX_SECONDS:
        problems.append(f"notification.ttl_seconds: over {TTL_MAX_SECONDS}")
    return problems


def _check_devices(
    devices: Sequence[pb.Device], apps: Mapping[str, AppConfig], limits: Limits, kind: int
) -> list[str]:
    if not devices:
        return ["devices: at least one device is required"]
    if len(devices) > limits.max_devices:
        return [f"devices: more than {limits.max_devices} devices (limits.max_devices)"]
    problems = []
    for i, device in enumerate(devices):
        problem = _check_device(device, apps, kind)
        if problem:
            problems.append(f"devices[{i}].{problem}")
    return problems


def _check_device(device: pb.Device, apps: Mapping[str, AppConfig], kind: int) -> str | None:
    if not device.app_id:
        return "app_id: required"
    app = apps.get(device.app_id)
    if app is None:
        return "app_id: not a configured app"
    problem = _check_voip(app, kind)
    if problem:
        return problem
    if not device.token:
        return "token: required"
    if device.HasField("keys"):
        problem = _check_keys(device.keys)
        if problem:
            return problem
    check = DEVICE_CHECKS.get(app.platform)
    return check(device, app) if check else None


def _check_voip(app: AppConfig, kind: int) -> str | None:
    """On APNs a ringing call needs a VoIP app (a PushKit token), and a VoIP app takes nothing
    else: iOS terminates an app whose VoIP push does not report a call."""
    voip = isinstance(app.settings, ApnsSettings) and app.settings.voip
    if kind == pb.INCOMING_CALL and app.platform == "apns" and not voip:
        return "app_id: INCOMING_CALL needs an APNs app with voip: true (its PushKit token)"
    if voip and kind != pb.INCOMING_CALL:
        return "app_id: a voip app takes only INCOMING_CALL (use the app's alert entry)"
    return None


def _check_keys(keys: pb.DeviceKeys) -> str | None:
    if len(keys.p256dh) != 65 or keys.p256dh[0] != 4 or not _on_curve(keys.p256dh):
        return "keys.p256dh: must be a 65-byte uncompressed P-256 point"
    if len(keys.auth) != 16:
        return "keys.auth: must be 16 bytes"
    return None


def _on_curve(point: bytes) -> bool:
    # A point off the curve would fail at encryption time (and invite invalid-curve attacks
    # on the ephemeral key): refuse it here, as a malformed request.
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError:
        return False
    return True


def to_message(n: pb.Notification) -> Message:
    """The domain message of a validated notification."""
    return Message(
        kind=Kind(n.kind),
        sender=n.sender_display_name,
        preview=n.preview,
        conversation_id=n.conversation_id,
        badge=n.badge,
        waiting_count=n.waiting_count,
        ttl_seconds=n.ttl_seconds,
    )


def requested_privacy(n: pb.Notification) -> Privacy | None:
    """The mode the caller asked for, or None for the app's default."""
    return None if n.privacy == pb.PRIVACY_UNSPECIFIED else Privacy(n.privacy)


def device_keys(device: pb.Device) -> DeviceKeys | None:
    if not device.HasField("keys"):
        return None
    return DeviceKeys(p256dh=device.keys.p256dh, auth=device.keys.auth)


def validated(request: pb.SendRequest, apps: Mapping[str, AppConfig], limits: Limits) -> Message:
    """The request's message, or InvalidArgument listing every problem."""
    problems = check_request(request, apps, limits)
    if problems:
        raise InvalidArgument(problems)
    return to_message(request.notification)
