"""Provider payload shapes, built from a provider-neutral alert and envelope.

``relay/render.py`` decides *what* a push says (per kind and privacy mode); this module only
decides *how* each provider spells it. The shapes are documented in ``relay/render.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from adapters.base import encode_json

Payload = dict[str, Any]
# A built payload and whether it is a silent push (Push.background).
Built = tuple[Payload, bool]


@dataclass(frozen=True, slots=True)
class Alert:
    """What the user sees: title and body, or a localizable key with arguments and the body
    as its English fallback."""

    title: str
    body: str
    loc_key: str = ""
    loc_args: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Envelope:
    """Everything about a push but its alert, worked out once per render.

    ``thread`` and ``collapse`` are keyed grouping keys (never the raw conversation id); empty
    means none. ``badge`` None leaves the badge alone. ``silent`` is the ID_ONLY mode;
    ``encrypted`` the ENCRYPTED one (``relay`` then holds the ciphertext).
    """

    relay: Mapping[str, Any]
    thread: str
    collapse: str
    badge: int | None
    ttl_seconds: int
    high_priority: bool
    silent: bool
    encrypted: bool = False
    voip: bool = False  # a ringing call: APNs PushKit payload, data-only elsewhere


def apns(env: Envelope, alert: Alert | None) -> Built:
    """The APNs JSON payload: ``aps`` plus the ``relay`` custom key."""
    if env.voip:
        # PushKit hands the whole dictionary to the app, which reports the call to CallKit:
        # no alert, badge or sound, so aps stays empty.
        return {"aps": {}, "relay": env.relay}, False
    if env.silent:
        # Background pushes carry content-available alone: alert, sound or badge would make
        # them alert pushes, which ID_ONLY must never be.
        return {"aps": {"content-available": 1}, "relay": env.relay}, True
    aps: Payload = {}
    if alert is not None:
        aps["alert"] = _apns_alert(alert)
        if env.encrypted:
            # Lets the Notification Service Extension replace the fallback alert with what it
            # decrypts from relay.enc; iOS runs it only for pushes with an alert.
            aps["mutable-content"] = 1
        aps["sound"] = "default"
    if env.badge is not None:
        aps["badge"] = env.badge
    if env.thread:
        aps["thread-id"] = env.thread
    # A badge-only push (a cleared count) is still an alert-type push: a background push
    # cannot set the badge.
    return {"aps": aps, "relay": env.relay}, False


def _title_body(alert: Alert) -> Payload:
    fields: Payload = {"title": alert.title} if alert.title else {}
    fields["body"] = alert.body
    return fields


def _apns_alert(alert: Alert) -> Payload:
    fields = _title_body(alert)
    if alert.loc_key:
        fields["loc-key"] = alert.loc_key
        if alert.loc_args:
            fields["loc-args"] = list(alert.loc_args)
    return fields


def fcm(env: Envelope, alert: Alert | None) -> Built:
    """The FCM v1 ``message`` object without its target (the adapter adds ``token``/``fid``)."""
    android: Payload = {
        "priority": "high" if env.high_priority else "normal",
        "ttl": f"{env.ttl_seconds}s",
    }
    if env.collapse:
        android["collapse_key"] = env.collapse
    message: Payload = {}
    if alert is not None:
        message["notification"] = _title_body(alert)
        android["notification"] = _android_notification(env, alert)
    message["android"] = android
    # FCM data values must be strings: the relay object travels as one compact JSON string, so
    # the app parses the same object on every platform.
    message["data"] = {"relay": encode_json(env.relay).decode()}
    return message, alert is None


def _android_notification(env: Envelope, alert: Alert) -> Payload:
    fields: Payload = {}
    # The tag replaces a shown notification with the same tag: collapsing kinds replace their
    # previous push, the others keep one drawer entry per conversation.
    tag = env.collapse or env.thread
    if tag:
        fields["tag"] = tag
    if alert.loc_key:
        fields["body_loc_key"] = alert.loc_key
        if alert.loc_args:
            fields["body_loc_args"] = list(alert.loc_args)
    if env.badge:
        fields["notification_count"] = env.badge
    return fields


def webpush(env: Envelope, alert: Alert | None) -> Built:
    """The JSON document the service worker receives (encrypted later by the adapter)."""
    doc: Payload = {"relay": env.relay}
    if alert is None:
        return doc, True
    doc.update(_title_body(alert))
    if alert.loc_key:
        # The service worker has no platform localization: it may look the key up itself.
        doc["loc_key"] = alert.loc_key
        doc["loc_args"] = list(alert.loc_args)
    return doc, False


BUILDERS: Mapping[str, Callable[[Envelope, Alert | None], Built]] = {
    "apns": apns,
    "fcm": fcm,
    "webpush": webpush,
}
