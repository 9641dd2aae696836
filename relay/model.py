"""The domain types the service builds from the protobuf request; rendering never sees protobuf.

Enum values equal those of ``pushrelay.v1.Kind`` and ``pushrelay.v1.Privacy``, so conversion is
``Kind(n.kind)``; the ``*_UNSPECIFIED`` zero values have no member here (the service rejects or
resolves them first).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Kind(enum.IntEnum):
    """What a notification is about; each kind has its own rendering policy."""

    INSTANT_MESSAGE = 1
    INVITATION = 2
    MISSED_CALL = 3
    MESSAGE_WAITING = 4
    INCOMING_CALL = 5  # a ringing call: a VoIP push on iOS
    CLEAR = 6  # read, answered or ended elsewhere: withdraw the conversation's notifications


class Privacy(enum.IntEnum):
    """How much the push provider may read (DESIGN §4)."""

    FULL = 1  # sender and preview in the alert
    REDACTED = 2  # a generic alert, kind and conversation id
    ID_ONLY = 3  # a silent push with kind and conversation id only
    ENCRYPTED = 4  # ciphertext to the device's keys plus a generic fallback alert


@dataclass(frozen=True, slots=True)
class Message:
    """One notification, as validated, before it is rendered for each device.

    Attributes:
        kind: what the notification is about.
        sender: the sender's display name (shown only in ``FULL``).
        preview: the message text (shown only in ``FULL``); truncated to fit each provider.
        conversation_id: the app's own conversation id; empty when there is none.
        badge: the app badge to set; 0 leaves it alone (``MESSAGE_WAITING`` uses
            ``waiting_count`` instead).
        waiting_count: ``MESSAGE_WAITING``: how many messages wait (0 clears the badge).
        ttl_seconds: how long providers may hold the push; 0 = the kind's default.
    """

    kind: Kind
    sender: str
    preview: str
    conversation_id: str
    badge: int = 0
    waiting_count: int = 0
    ttl_seconds: int = 0
