"""Provider-neutral types shared by every adapter, and the Adapter interface.

The relay renders a notification into one :class:`Push` per device (the provider-specific body
is already built by ``relay/render.py``); an adapter carries a push to its provider and returns an
:class:`Outcome`. Outcomes are return values, never exceptions: an adapter raises only when the
whole call is broken (a bug), and the relay turns that into ``UNAVAILABLE`` for that device.

Adapters import nothing from ``relay``: each module defines the settings dataclass it is built
from, and ``relay/config.py`` fills it from the YAML file and the secret files it names.
"""

from __future__ import annotations

import abc
import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar


class Verdict(enum.Enum):
    """The caller's verdict for one device; names match ``pushrelay.v1.Outcome``."""

    DELIVERED = "DELIVERED"  # accepted by the provider
    TOKEN_INVALID = "TOKEN_INVALID"  # remove this token
    REJECTED = "REJECTED"  # never accepted as it is (bad payload, bad config)
    RATE_LIMITED = "RATE_LIMITED"  # retry after retry_after_seconds
    UNAVAILABLE = "UNAVAILABLE"  # provider failing; may succeed later


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one push.

    ``reason`` is the provider's own word (``Unregistered``, ``QUOTA_EXCEEDED``) or ours
    (``DeadlineExceeded``); it never contains request content. ``retryable`` tells the relay's
    retry policy that sending the same push again may succeed (5xx, connection lost).
    """

    verdict: Verdict
    reason: str = ""
    provider_message_id: str = ""
    retry_after_seconds: int = 0
    token_invalid_since_ms: int = 0
    retryable: bool = False

    @classmethod
    def delivered(cls, provider_message_id: str = "") -> Outcome:
        return cls(Verdict.DELIVERED, provider_message_id=provider_message_id)

    @classmethod
    def unavailable(cls, reason: str, *, retryable: bool = True, retry_after: int = 0) -> Outcome:
        return cls(
            Verdict.UNAVAILABLE, reason, retryable=retryable, retry_after_seconds=retry_after
        )


@dataclass(frozen=True, slots=True)
class DeviceKeys:
    """A device's P-256 public key (65-byte uncompressed point) and 16-byte auth secret."""

    p256dh: bytes
    auth: bytes


@dataclass(frozen=True, slots=True)
class Push:
    """One rendered push for one device.

    Attributes:
        token: the device address: APNs hex token, FCM registration token (or ``fid:<id>``),
            or Web Push endpoint URL.
        payload: the provider body as rendered (APNs: the JSON object with ``aps``; FCM: the
            ``message`` object without its target; Web Push: the bytes to encrypt).
        background: a silent push (APNs ``background`` push type at priority 5, FCM data-only).
        high_priority: deliver at once (APNs priority 10, FCM ``high``, Web Push ``Urgency: high``).
            APNs background pushes always go at priority 5 whatever this says.
        ttl_seconds: how long the provider may hold the push; 0 = deliver now or never.
        collapse_key: a keyed grouping key (never raw content): APNs ``apns-collapse-id``,
            FCM ``collapse_key``, Web Push ``Topic``. Empty = none.
        keys: the device's encryption keys (Web Push subscription keys), when given.
        push_id: a fresh UUID for this push; adapters that can set the provider's message id
            (APNs ``apns-id``) use it, so concurrent pushes never share one.
        pad_to: Web Push: pad the plaintext with RFC 8188 padding to at least this many bytes
            before encrypting it, so the body's length reveals only a size bucket; 0 = none.
        voip: a ringing call (``INCOMING_CALL``): on APNs a PushKit push (``apns-push-type:
            voip``, topic ``<bundle>.voip``, priority 10) to an app configured for VoIP;
            elsewhere a high-priority data message.
        encoded: ``payload`` as :func:`encode_json` encodes it, when whoever built the push
            (render, which measures the encoding to fit the payload) has it already: adapters
            send these bytes (APNs as the body, FCM inside its ``message``) rather than encode
            the payload again. Empty = encode ``payload``.
    """

    token: str
    payload: Mapping[str, Any] | bytes
    background: bool = False
    high_priority: bool = True
    ttl_seconds: int = 0
    collapse_key: str = ""
    keys: DeviceKeys | None = None
    push_id: str = ""
    pad_to: int = 0
    voip: bool = False
    encoded: bytes = b""


def encode_json(payload: Mapping[str, Any]) -> bytes:
    """The one JSON encoding used both to size payloads (render) and to send them (adapters)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def payload_bytes(push: Push) -> bytes:
    """The push's payload as sent: render's encoding when it has one (``Push.encoded``), bytes
    as they are, a JSON object encoded."""
    if push.encoded:
        return push.encoded
    return push.payload if isinstance(push.payload, bytes) else encode_json(push.payload)


def json_object(body: bytes) -> dict[str, Any]:
    """A provider's answer body as a JSON object; {} when it is anything else."""
    try:
        document = json.loads(body)
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


SettingsT = TypeVar("SettingsT")


class Adapter(abc.ABC, Generic[SettingsT]):
    """A connection to one app's push provider.

    Lifecycle: ``adapter = await Cls.create(settings)`` inside the running event loop, then any
    number of concurrent ``await adapter.send(push)``, then ``await adapter.aclose()``. The relay
    wraps every adapter in one place for concurrency limits, deadlines, retries and metrics:
    adapters implement none of that themselves.
    """

    platform: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    async def create(cls, settings: SettingsT) -> Adapter[SettingsT]:
        """Build the adapter inside the running loop; raise on unusable settings."""

    @abc.abstractmethod
    async def send(self, push: Push) -> Outcome:
        """Deliver one push and return its outcome. May be cancelled at any await."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close provider connections; idempotent."""

    @property
    def ready(self) -> bool:
        """Whether the adapter can take sends (credentials loaded, not closed)."""
        return True
