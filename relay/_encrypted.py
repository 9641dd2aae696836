"""The ``ENCRYPTED`` mode's document: what it holds, how it is cut to fit, padded and sealed.

The device receives one small JSON document, the same on every platform::

    {"v": 1, "kind": "instant_message", "sender": "…", "preview": "…",
     "conversation_id": "…", "badge": 2, "sent_at_ms": 1735689600000}

``sender``, ``preview`` and ``conversation_id`` are left out when empty; ``badge`` follows the
``relay`` object's rule (set for ``MESSAGE_WAITING``, where it is the count, else only when
positive); ``count`` is there for ``MESSAGE_WAITING`` only; ``sent_at_ms`` is the relay's clock
when it rendered the push, so the app can drop a stale one.

The document is encrypted to the device's ``keys`` with RFC 8291 ``aes128gcm``, the Web Push
construction, so one decryptor serves every platform. Its plaintext is padded to the smallest of
:data:`BUCKETS` that holds it, so the ciphertext's length reveals only the bucket; the preview
(then the sender) is cut on grapheme boundaries so that the document fits the largest bucket,
which in turn fits every platform's limit once sealed and base64url-encoded (APNs: a 2048-byte
document seals to 2151 bytes, 2868 base64url characters).
"""

from __future__ import annotations

import base64
from typing import Any

from adapters._ece import OVERHEAD_BYTES, encrypt
from adapters.base import DeviceKeys, encode_json
from relay._truncate import fit_pair
from relay.model import Kind, Message

__all__ = ["BUCKETS", "MAX_DOCUMENT_BYTES", "bucket_for", "document", "seal", "sealed_bytes"]

BUCKETS = (256, 512, 1024, 2048)
"""Plaintext size buckets, in bytes; the same on every platform."""
MAX_DOCUMENT_BYTES = BUCKETS[-1]


def document(message: Message, badge: int | None, sent_at_ms: int, *, thread: str = "") -> bytes:
    """The encoded document for ``message``, cut to fit :data:`MAX_DOCUMENT_BYTES`.

    Args:
        message: the notification.
        badge: the badge to set, as the ``relay`` object carries it (None: leave it alone).
        sent_at_ms: when the relay rendered the push, in milliseconds since the epoch.
        thread: ``CLEAR``: the thread key of the notifications to withdraw ("" = none).

    Raises:
        ValueError: the document cannot fit even with sender and preview cut to an ellipsis
            (only a conversation id far over the API's 256 bytes can cause that).
    """

    def build(sender: str, preview: str) -> dict[str, Any]:
        doc: dict[str, Any] = {"v": 1, "kind": message.kind.name.lower()}
        optional = (
            ("sender", sender),
            ("preview", preview),
            ("conversation_id", message.conversation_id),
        )
        doc.update((name, value) for name, value in optional if value)
        if badge is not None:
            doc["badge"] = badge
        if thread:
            doc["thread"] = thread
        if message.kind is Kind.MESSAGE_WAITING:
            doc["count"] = message.waiting_count
        doc["sent_at_ms"] = sent_at_ms
        return doc

    # A CLEAR names no one and says nothing, even inside the ciphertext.
    texts = ("", "") if message.kind is Kind.CLEAR else (message.sender, message.preview)
    fitted = fit_pair(
        lambda sender, preview: len(encode_json(build(sender, preview))),
        *texts,
        MAX_DOCUMENT_BYTES,
    )
    if fitted is None:
        raise ValueError(f"payload: encrypted document over {MAX_DOCUMENT_BYTES} bytes")
    return encode_json(build(*fitted))


def bucket_for(size: int) -> int:
    """The smallest bucket that holds a ``size``-byte plaintext.

    Raises:
        ValueError: ``size`` is over the largest bucket.
    """
    for bucket in BUCKETS:
        if size <= bucket:
            return bucket
    raise ValueError(f"payload: encrypted document over {MAX_DOCUMENT_BYTES} bytes")


def sealed_bytes(bucket: int) -> int:
    """The length of the ``aes128gcm`` body of a document padded to ``bucket``."""
    return bucket + OVERHEAD_BYTES


def seal(plaintext: bytes, keys: DeviceKeys) -> str:
    """Encrypt ``plaintext`` to ``keys``, padded to its bucket, as unpadded base64url.

    Raises:
        ValueError: the keys are unusable (``p256dh`` not on P-256) or the plaintext is over
            the largest bucket; the message names the field, never the value.
    """
    bucket = bucket_for(len(plaintext))
    try:
        body = encrypt(plaintext, keys, pad_to=bucket)
    except ValueError:
        raise ValueError("keys: not a usable P-256 public key and auth secret") from None
    return base64.urlsafe_b64encode(body).rstrip(b"=").decode("ascii")
