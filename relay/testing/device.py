"""A test device: a Web Push subscription's key pair and a reference RFC 8291 decryptor.

:class:`TestSubscription` plays the receiving side of RFC 8291 (the browser, a UnifiedPush app,
or a mobile app's notification extension in the relay's ``ENCRYPTED`` mode): it holds the P-256
key pair and auth secret a device would generate, hands out the public half as ``p256dh`` and
``auth``, and decrypts what the relay sent::

    device = TestSubscription.generate()
    body = ...  # an aes128gcm body encrypted to (device.p256dh, device.auth)
    assert device.decrypt(body) == b"hello"

For the relay's ``ENCRYPTED`` mode, :meth:`TestSubscription.decrypt_document` takes what a
provider delivered (the APNs payload, the FCM message, the Web Push body), finds the ciphertext
where the relay puts it on that platform (:func:`sealed_body`) and returns the JSON document.

It is written from RFC 8291 §3 and RFC 8188 §2 on ``cryptography`` primitives alone, independent
of the relay's own encryptor (``adapters/_ece.py``), so each checks the other; both are pinned to
the RFC 8291 Appendix A test vector. Decryption is strict where a receiver must be: one record,
``idlen`` 65, the sender key on the curve, the 0x02 delimiter, zero padding.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from adapters.base import DeviceKeys

__all__ = ["DecryptionError", "TestSubscription", "sealed_body"]

_HEADER_BYTES = 86  # salt 16, rs 4, idlen 1, keyid 65
_TAG_BYTES = 16
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


class DecryptionError(ValueError):
    """The body is not a valid RFC 8291 message for this subscription; says which rule failed."""


@dataclass(frozen=True)
class TestSubscription:
    """A device's Web Push keys: what a browser creates on ``PushManager.subscribe()``.

    Attributes:
        private_key: the device's P-256 private key (never leaves the device).
        auth: the 16-byte auth secret shared with the application server.
        p256dh: the public key as a 65-byte uncompressed point (``keys.p256dh``).
    """

    __test__ = False  # not a pytest test class, despite the name

    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    auth: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> TestSubscription:
        """A fresh key pair and a random auth secret."""
        return cls(ec.generate_private_key(ec.SECP256R1()), os.urandom(16))

    @classmethod
    def from_private_bytes(cls, private_value: bytes, auth: bytes) -> TestSubscription:
        """A subscription from a raw 32-byte private scalar (e.g. an RFC test vector).

        Raises:
            ValueError: the scalar or the auth secret has the wrong size.
        """
        if len(private_value) != 32 or len(auth) != 16:
            raise ValueError("need a 32-byte private scalar and a 16-byte auth secret")
        key = ec.derive_private_key(int.from_bytes(private_value, "big"), ec.SECP256R1())
        return cls(key, auth)

    @property
    def p256dh(self) -> bytes:
        """The public key, 65 bytes uncompressed (0x04 || X || Y)."""
        return self.private_key.public_key().public_bytes(
            Encoding.X962, PublicFormat.UncompressedPoint
        )

    @property
    def keys(self) -> DeviceKeys:
        """The public half as the relay receives it in ``Device.keys``."""
        return DeviceKeys(p256dh=self.p256dh, auth=self.auth)

    def decrypt(self, body: bytes) -> bytes:
        """Decrypt an ``aes128gcm`` push message body sent to this subscription.

        Args:
            body: the request body: 86-byte header, then exactly one record.

        Returns:
            The plaintext, padding removed.

        Raises:
            DecryptionError: the header, the sender key, the tag, the record count or the
                padding is wrong.
        """
        if len(body) < _HEADER_BYTES + _TAG_BYTES + 1:
            raise DecryptionError("body shorter than header, delimiter and tag")
        salt = body[:16]
        record_size, idlen = struct.unpack("!IB", body[16:21])
        if idlen != 65:
            raise DecryptionError(f"idlen is {idlen}, RFC 8291 requires 65")
        sender_public = body[21:_HEADER_BYTES]
        record = body[_HEADER_BYTES:]
        if len(record) > record_size:
            raise DecryptionError("more than one record (RFC 8291 allows one)")
        try:
            sender = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), sender_public)
        except ValueError:
            raise DecryptionError("sender key is not a P-256 point") from None
        secret = self.private_key.exchange(ec.ECDH(), sender)
        key, nonce = _content_key(secret, self.auth, self.p256dh, sender_public, salt)
        try:
            padded = AESGCM(key).decrypt(nonce, record, None)
        except InvalidTag:
            raise DecryptionError("authentication tag does not verify") from None
        return _unpad(padded)

    def decrypt_document(
        self, platform: str, received: Mapping[str, Any] | bytes
    ) -> dict[str, Any]:
        """The relay's ``ENCRYPTED`` document, from what the device got on ``platform``.

        Args:
            platform: ``apns``, ``fcm`` or ``webpush``.
            received: see :func:`sealed_body`.

        Returns:
            The decrypted JSON document (``{"v": 1, "kind": ..., ...}``).

        Raises:
            DecryptionError: the ciphertext is missing, malformed, or does not decrypt to a
                JSON object.
        """
        plaintext = self.decrypt(sealed_body(platform, received))
        try:
            document = json.loads(plaintext)
        except ValueError:
            raise DecryptionError("the plaintext is not JSON") from None
        if not isinstance(document, dict):
            raise DecryptionError("the plaintext is not a JSON object")
        return document


def sealed_body(platform: str, received: Mapping[str, Any] | bytes) -> bytes:
    """The ``aes128gcm`` body of an ``ENCRYPTED`` push, where the relay puts it on each platform.

    Args:
        platform: ``apns``, ``fcm`` or ``webpush``.
        received: APNs: the payload object, ciphertext in ``relay.enc``; FCM: the ``message``
            object, ciphertext in ``data.relay`` (a JSON string) ``.enc``; Web Push: the request
            body itself. ``enc`` is base64url without padding.

    Raises:
        DecryptionError: the ciphertext is not where it belongs or is not base64url.
    """
    if platform == "webpush":
        if not isinstance(received, bytes):
            raise DecryptionError("a Web Push body is bytes")
        return received
    if not isinstance(received, Mapping):
        raise DecryptionError(f"a {platform} push is a JSON object")
    try:
        relay = received["relay"] if platform == "apns" else json.loads(received["data"]["relay"])
        enc = relay["enc"]
    except (KeyError, TypeError, ValueError):
        raise DecryptionError(f"no relay.enc in the {platform} push") from None
    if not isinstance(enc, str) or not _BASE64URL.fullmatch(enc):
        raise DecryptionError("relay.enc is not an unpadded base64url string")
    try:
        return base64.b64decode(enc + "=" * (-len(enc) % 4), altchars=b"-_", validate=True)
    except binascii.Error:
        raise DecryptionError("relay.enc is not base64url") from None


def _content_key(
    ecdh_secret: bytes, auth: bytes, ua_public: bytes, as_public: bytes, salt: bytes
) -> tuple[bytes, bytes]:
    """RFC 8291 §3.3-3.4 (auth secret mixing), then RFC 8188 §2.2-2.3 (CEK and nonce)."""

    def hkdf(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
        prk = hmac.new(salt, ikm, hashlib.sha256).digest()
        return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()[:length]

    ikm = hkdf(auth, ecdh_secret, b"WebPush: info\x00" + ua_public + as_public, 32)
    key = hkdf(salt, ikm, b"Content-Encoding: aes128gcm\x00", 16)
    nonce = hkdf(salt, ikm, b"Content-Encoding: nonce\x00", 12)
    return key, nonce


def _unpad(padded: bytes) -> bytes:
    """Strip RFC 8188 padding: the last non-zero octet must be the final-record delimiter."""
    stripped = padded.rstrip(b"\x00")
    if not stripped or stripped[-1] != 0x02:
        raise DecryptionError("the last record's padding delimiter is not 0x02")
    return stripped[:-1]
