"""Rendering: one :class:`~relay.model.Message` into one provider :class:`~adapters.base.Push`.

What each privacy mode lets the provider read is DESIGN §4. Every platform carries the same
custom data object, ``relay``::

    {"v": 1, "kind": "instant_message", "conversation_id": "…", "badge": 3}

``conversation_id`` is the raw id (the app needs it to open the conversation) and is left out
when empty; ``badge`` is there when a badge is set, except in ``ID_ONLY``, which carries kind and
conversation id only. Grouping keys that providers read are :class:`GroupingKeys` HMACs.

Payload shapes (``FULL``: title = sender, body = preview; ``REDACTED``: no title, body = the
English fallback, plus the localizable key; ``ID_ONLY``: no alert at all):

- APNs: ``{"aps": {"alert": {"title", "body", "loc-key", "loc-args"}, "sound": "default",
  "badge", "thread-id"}, "relay": {…}}``; ``ID_ONLY`` is ``{"aps": {"content-available": 1},
  "relay": {…}}`` with ``Push.background``.
- FCM (the v1 ``message`` without its target): ``{"notification": {"title", "body"},
  "android": {"priority", "ttl": "<n>s", "collapse_key", "notification": {"tag",
  "body_loc_key", "body_loc_args", "notification_count"}}, "data": {"relay": "<JSON>"}}``. FCM
  data values must be strings, so ``data.relay`` is the relay object as one compact JSON string:
  Android parses the same object iOS and the web get. ``ID_ONLY`` is data-only, at the
  kind's priority (``high``; ``normal`` for ``MESSAGE_WAITING``, as in every mode).
- Web Push: the bytes of ``{"relay": {…}, "title", "body", "loc_key", "loc_args"}`` (the service
  worker's document; ``ID_ONLY`` is ``{"relay": {…}}``); Urgency from ``Push.high_priority``,
  Topic from ``Push.collapse_key``.

A ``MESSAGE_WAITING`` count of 0 only clears the badge: no alert (an alert saying "0 new
voicemails" would be noise), so APNs gets a badge-only push and FCM and Web Push a data-only one.

``ENCRYPTED`` (the document, its buckets and sealing are in ``relay/_encrypted.py``): the
``relay`` object is ``{"v": 1, "enc": "<base64url aes128gcm body>"}`` and nothing else, so
neither the kind nor the raw conversation id nor the badge is in the clear; grouping keys stay.

- APNs: the kind's generic ``REDACTED`` alert as the fallback (shown if the Notification
  Service Extension does not replace it in time), ``"mutable-content": 1``, sound, ``thread-id``.
  A cleared ``MESSAGE_WAITING`` count is a badge-only push with ``"badge": 0``: the extension
  runs only for alerts, so that badge must be in the clear.
- FCM: data-only (``data.relay`` is the object above as a JSON string) at the kind's priority;
  the app's ``FirebaseMessagingService`` decrypts it and posts the notification itself.
- Web Push: the document itself is the body; the adapter encrypts every Web Push body to these
  same keys, padding it to the bucket (``Push.pad_to``), so it is not encrypted twice.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from adapters.base import DeviceKeys, Push, encode_json
from relay import _encrypted, _payloads
from relay._payloads import Alert, Envelope
from relay._truncate import fit_pair
from relay.model import Kind, Message, Privacy

EXPOSURE: Mapping[Privacy, int] = MappingProxyType(
    {Privacy.FULL: 3, Privacy.REDACTED: 2, Privacy.ENCRYPTED: 2, Privacy.ID_ONLY: 1}
)
"""How much each mode exposes to the provider; a ceiling caps by this order."""

LIMIT_BYTES: Mapping[str, int] = MappingProxyType(
    {
        "apns": 4096,
        "fcm": 4096,  # the whole message object, keys included
        # RFC 8291 allows 3993 bytes of plaintext; the margin leaves room for any later
        # envelope. ENCRYPTED documents are padded to at most _encrypted.MAX_DOCUMENT_BYTES.
        "webpush": 3000,
    }
)
"""Each platform's limit on the encoded payload, in bytes."""

MAX_TTL_SECONDS = 2_419_200  # FCM's maximum (4 weeks); APNs and Web Push accept more
GROUPING_KEY_CHARS = 32  # fits APNs collapse-id (64 bytes) and the Web Push Topic (32 chars)
_MIN_SECRET_BYTES = 16


def effective_privacy(
    requested: Privacy | None,
    default: Privacy,
    maximum: Privacy,
    *,
    has_keys: bool,
) -> Privacy:
    """The privacy mode a device is served in: the one place that decides it.

    ``REDACTED`` and ``ENCRYPTED`` expose the same (:data:`EXPOSURE`), so either is served under
    a ceiling of the other: a request for ``ENCRYPTED`` under ``max: redacted`` is encrypted, and
    one for ``FULL`` under ``max: encrypted`` is served at the ceiling, ``ENCRYPTED``.

    Args:
        requested: the mode the request asked for; None for the app's default.
        default: the app's default mode.
        maximum: the app's ceiling: nothing more exposing (by :data:`EXPOSURE`) is served.
        has_keys: whether the device sent encryption keys.

    Returns:
        The requested (or default) mode, lowered to ``maximum`` when it exposes more;
        ``ENCRYPTED`` for a device without keys becomes ``REDACTED``, so plaintext never leaves.
    """
    mode = default if requested is None else requested
    if EXPOSURE[mode] > EXPOSURE[maximum]:
        mode = maximum
    if mode is Privacy.ENCRYPTED and not has_keys:
        mode = Privacy.REDACTED
    return mode


class GroupingKeys:
    """Keyed grouping keys, so providers group a conversation's pushes without learning its id.

    Each key is HMAC-SHA256(secret, purpose NUL conversation_id), cut to 24 bytes and written as
    32 characters of URL-safe base64 without padding. The same secret gives the same keys on
    every replica; a different purpose gives an unrelated key for the same conversation.
    """

    __slots__ = ("_mac",)

    def __init__(self, secret: bytes) -> None:
        """Use ``secret`` (at least 16 bytes, e.g. 32 random bytes) as the HMAC key."""
        if len(secret) < _MIN_SECRET_BYTES:
            raise ValueError(f"grouping secret: at least {_MIN_SECRET_BYTES} bytes")
        self._mac = hmac.new(secret, digestmod=hashlib.sha256)  # copied per key: keyed once

    def for_conversation(self, conversation_id: str, *, purpose: str = "thread") -> str:
        """The grouping key of ``conversation_id`` for ``purpose`` (thread, a kind's collapse)."""
        if "\x00" in purpose:  # NUL separates purpose from id; one inside would be ambiguous
            raise ValueError("purpose: must not contain NUL")
        data = purpose.encode() + b"\x00" + conversation_id.encode()
        mac = self._mac.copy()
        mac.update(data)
        digest = mac.digest()
        return base64.urlsafe_b64encode(digest[: GROUPING_KEY_CHARS * 3 // 4]).decode()

    def __repr__(self) -> str:
        return "GroupingKeys(<secret>)"


Collapse = Literal["never", "per_conversation", "always"]


Delivery = Literal["alert", "voip", "background"]


@dataclass(frozen=True, slots=True)
class _Policy:
    """One kind's rendering policy: the table README.md lists ("Per-kind policy")."""

    ttl_seconds: int  # the default time providers may hold it
    high_priority: bool
    collapse: Collapse
    generic: Alert | None  # the REDACTED alert; None: the kind never alerts
    delivery: Delivery = "alert"
    max_ttl_seconds: int = MAX_TTL_SECONDS  # a caller's ttl_seconds is cut to this


_CALL_SECONDS = 30  # how long a call rings: after that a late VoIP push would ring a dead call

_POLICIES: Mapping[Kind, _Policy] = {
    Kind.INSTANT_MESSAGE: _Policy(3600, True, "never", Alert("", "New message", "INSTANT_MESSAGE")),
    # An invitation is stale within minutes; a newer one for the same conversation replaces it.
    Kind.INVITATION: _Policy(
        120, True, "per_conversation", Alert("", "New invitation", "INVITATION")
    ),
    # An ordinary alert, never VoIP: iOS kills apps that get a VoIP push without ringing.
    Kind.MISSED_CALL: _Policy(86400, True, "never", Alert("", "Missed call", "MISSED_CALL")),
    # A count: only the newest matters, and it is not urgent.
    Kind.MESSAGE_WAITING: _Policy(
        86400, False, "always", Alert("", "New voicemail", "MESSAGE_WAITING")
    ),
    # Rings at once or never: a VoIP push on iOS (the app must report it to CallKit), a
    # high-priority data message elsewhere, held no longer than the call rings.
    Kind.INCOMING_CALL: _Policy(
        _CALL_SECONDS, True, "never", None, "voip", max_ttl_seconds=_CALL_SECONDS
    ),
    # Withdraws a conversation's notifications: never an alert or a sound, not urgent.
    Kind.CLEAR: _Policy(86400, False, "never", None, "background"),
}


def render(
    message: Message,
    platform: str,
    privacy: Privacy,
    *,
    token: str,
    keys: DeviceKeys | None,
    grouping: GroupingKeys,
    push_id: str = "",
    sent_at_ms: int | None = None,
) -> Push:
    """Render ``message`` for one device.

    Args:
        message: the notification.
        platform: ``apns``, ``fcm`` or ``webpush``.
        privacy: the effective mode (see :func:`effective_privacy`).
        token: the device address, passed through to the push.
        keys: the device's encryption keys, passed through to the push; ``ENCRYPTED`` encrypts
            to them.
        grouping: the grouping-key HMACs.
        push_id: a fresh id for this push, passed through.
        sent_at_ms: when the push was rendered (ms since the epoch; None = now): in the
            ``ENCRYPTED`` document, and in an ``INCOMING_CALL``'s ``relay`` object so the app
            can drop a call that arrives after it stopped ringing.

    Returns:
        The push, its payload within the platform's limit (:data:`LIMIT_BYTES`): the preview is
        cut first, then the sender, on grapheme-cluster boundaries, each ending in an ellipsis.
        In ``ENCRYPTED`` the same cut fits the document to the largest size bucket.

    Raises:
        ValueError: unknown platform; ``ENCRYPTED`` without usable keys; or a payload that cannot
            fit even with sender and preview cut (only a conversation id far over the API's 256
            bytes can cause that).
    """
    if platform not in _payloads.BUILDERS:
        raise ValueError(f"platform: unknown platform {platform!r}")
    sent_at = time.time_ns() // 1_000_000 if sent_at_ms is None else sent_at_ms
    env = _envelope(message, privacy, grouping, sent_at)
    pad_to, encoded = 0, b""
    if privacy is Privacy.ENCRYPTED:
        payload, background, pad_to = _sealed(message, platform, keys, env, sent_at)
    else:
        (payload, background), encoded = _fitted(message, privacy, platform, env)
        if platform == "webpush":
            payload, encoded = encoded, b""  # Web Push carries bytes: the adapter encrypts them
    return Push(
        token=token,
        payload=payload,
        encoded=encoded,
        background=background,
        high_priority=env.high_priority,
        ttl_seconds=env.ttl_seconds,
        collapse_key=env.collapse,
        keys=keys,
        push_id=push_id,
        pad_to=pad_to,
        voip=env.voip,
    )


def _fitted(
    message: Message, privacy: Privacy, platform: str, env: Envelope
) -> tuple[_payloads.Built, bytes]:
    """The payload with sender and preview cut to fit, and its encoding (done once)."""
    build, limit = _payloads.BUILDERS[platform], LIMIT_BYTES[platform]
    last: list[Any] = [None, None, b""]  # the texts last sized, what they built, its encoding

    def size_of(sender: str, preview: str) -> int:
        last[0] = (sender, preview)
        alert = _alert(message, privacy, sender, preview)
        last[1] = build(_with_caller(env, message, sender), alert)
        last[2] = encode_json(last[1][0])
        return len(last[2])

    # Only FULL shows sender and preview; other modes never see them, so they cannot leak.
    texts = (message.sender, message.preview) if privacy is Privacy.FULL else ("", "")
    fitted = fit_pair(size_of, *texts, limit)
    if fitted is None:
        raise ValueError(f"payload: over the {platform} limit of {limit} bytes")
    if last[0] != fitted:  # the search ended on a candidate that did not fit
        size_of(*fitted)
    return last[1], last[2]


def _with_caller(env: Envelope, message: Message, sender: str) -> Envelope:
    """An incoming call names its caller in ``relay.caller`` (FULL only: the sender is "" in
    the other modes), cut to fit like an alert's title."""
    if message.kind is not Kind.INCOMING_CALL or not sender:
        return env
    return dataclasses.replace(env, relay={**env.relay, "caller": sender})


def _sealed(
    message: Message, platform: str, keys: DeviceKeys | None, env: Envelope, sent_at_ms: int
) -> tuple[_payloads.Payload | bytes, bool, int]:
    """``ENCRYPTED``: the payload, whether it is silent, and the Web Push padding bucket."""
    if keys is None:  # effective_privacy never serves ENCRYPTED without keys
        raise ValueError("keys: ENCRYPTED needs the device's keys")
    # CLEAR: the thread key the notifications to remove carry travels inside too.
    thread = env.thread if message.kind is Kind.CLEAR else ""
    document = _encrypted.document(message, _badge(message), sent_at_ms, thread=thread)
    if platform == "webpush":
        # The adapter encrypts every Web Push body to these same keys: the document is the
        # body, padded to its bucket there (encrypting it here too would do it twice).
        return document, _cleared_count(message), _encrypted.bucket_for(len(document))
    sealed = dataclasses.replace(env, relay={"v": 1, "enc": _encrypted.seal(document, keys)})
    # FCM is data-only: the app posts the notification itself once it has decrypted it.
    alert = _alert(message, Privacy.ENCRYPTED, "", "") if platform == "apns" else None
    payload, background = _payloads.BUILDERS[platform](sealed, alert)
    if len(encode_json(payload)) > LIMIT_BYTES[platform]:  # the buckets are sized to fit
        raise ValueError(f"payload: over the {platform} limit of {LIMIT_BYTES[platform]} bytes")
    return payload, background, 0


def _envelope(
    message: Message, privacy: Privacy, grouping: GroupingKeys, sent_at_ms: int
) -> Envelope:
    policy = _POLICIES[message.kind]
    silent = privacy is Privacy.ID_ONLY or policy.delivery == "background"
    encrypted = privacy is Privacy.ENCRYPTED
    badge = None if silent else _badge(message)
    if encrypted:
        # The badge travels inside the ciphertext, except a cleared count (see the docstring).
        badge = 0 if _cleared_count(message) else None
    cid = message.conversation_id
    thread = grouping.for_conversation(cid) if cid else ""
    relay: dict[str, Any] = {}
    if not encrypted:
        relay = _relay_object(message, badge)
        relay.update(_kind_fields(message, thread, sent_at_ms))
    return Envelope(
        relay=relay,
        thread=thread,
        collapse=_collapse_key(message, policy.collapse, grouping),
        badge=None if policy.delivery == "background" else badge,
        ttl_seconds=_ttl(message, policy),
        high_priority=policy.high_priority,
        silent=silent,
        encrypted=encrypted,
        voip=policy.delivery == "voip",
    )


def _kind_fields(message: Message, thread: str, sent_at_ms: int) -> dict[str, Any]:
    """What the app needs beyond kind and conversation id to act on a call or a clear."""
    if message.kind is Kind.INCOMING_CALL:
        # When it rang, to drop a call that arrives late; the caller is added when fitting.
        return {"sent_at_ms": sent_at_ms}
    if message.kind is Kind.CLEAR:
        # The thread key the notifications to withdraw carry (thread-id, tag), and the badge.
        fields: dict[str, Any] = {"badge": _badge(message)}
        if thread:
            fields["thread"] = thread
        return fields
    return {}


def _cleared_count(message: Message) -> bool:
    return message.kind is Kind.MESSAGE_WAITING and message.waiting_count == 0


def _relay_object(message: Message, badge: int | None) -> dict[str, Any]:
    relay: dict[str, Any] = {"v": 1, "kind": message.kind.name.lower()}
    if message.conversation_id:
        relay["conversation_id"] = message.conversation_id
    if badge is not None:
        relay["badge"] = badge
    return relay


def _badge(message: Message) -> int | None:
    if message.kind is Kind.MESSAGE_WAITING:
        return message.waiting_count  # always set: 0 clears the badge
    if message.kind is Kind.CLEAR:
        return message.badge  # always set: the badge to show once the conversation is read
    return message.badge or None


def _collapse_key(message: Message, collapse: Collapse, grouping: GroupingKeys) -> str:
    # The purpose is the kind, so an invitation never replaces a message-waiting push (or the
    # reverse) under a shared Web Push Topic or FCM collapse key.
    purpose = message.kind.name.lower()
    if collapse == "always" or (collapse == "per_conversation" and message.conversation_id):
        return grouping.for_conversation(message.conversation_id, purpose=purpose)
    return ""


def _ttl(message: Message, policy: _Policy) -> int:
    if message.ttl_seconds > 0:
        return min(message.ttl_seconds, policy.max_ttl_seconds)
    return policy.ttl_seconds


def _alert(message: Message, privacy: Privacy, sender: str, preview: str) -> Alert | None:
    """What the user sees in ``privacy``, with ``sender`` and ``preview`` as fitted."""
    if privacy is Privacy.ID_ONLY or _POLICIES[message.kind].generic is None:
        return None  # silent, or a kind that never alerts (a call rings, a clear withdraws)
    if privacy is Privacy.ENCRYPTED:
        # The fallback, shown if the device cannot decrypt in time: no count, no names.
        return None if _cleared_count(message) else _POLICIES[message.kind].generic
    if message.kind is Kind.MESSAGE_WAITING:
        return _waiting_alert(message.waiting_count)
    full = _full_alert(message.kind, sender, preview) if privacy is Privacy.FULL else None
    # FULL with nothing to show (no sender, no preview) still needs a visible alert.
    return full or _POLICIES[message.kind].generic


def _full_alert(kind: Kind, sender: str, preview: str) -> Alert | None:
    if kind is Kind.MISSED_CALL:
        if not sender:
            return None
        return Alert("", f"Missed call from {sender}", "MISSED_CALL", (sender,))
    return Alert(sender, preview) if sender or preview else None


def _waiting_alert(count: int) -> Alert | None:
    if count == 0:
        return None
    noun = "voicemail" if count == 1 else "voicemails"
    return Alert("", f"{count} new {noun}", "MESSAGE_WAITING", (str(count),))
