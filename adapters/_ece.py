"""RFC 8291 message encryption for Web Push: ``aes128gcm`` (RFC 8188), one record.

Written on ``cryptography`` primitives rather than ``http_ece``: http_ece 1.2 cannot pad an
``aes128gcm`` record and splits a long plaintext into several records, while RFC 8291 allows
exactly one record and the relay pads to size buckets. The whole scheme is the ~30 lines below,
checked against the RFC 8291 Appendix A test vector in ``tests/test_webpush_adapter.py``.

The body is ``salt(16) || rs(4) || idlen(1)=65 || as_public(65) || AES-128-GCM(plaintext ||
0x02 || 0x00*padding)``; :data:`Encrypt` is the signature the adapter calls, so a successor
scheme (e.g. HPKE-based Web Push) can be dropped in.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from adapters.base import DeviceKeys

__all__ = [
    "HEADER_BYTES",
    "MAX_BODY_BYTES",
    "MAX_PLAINTEXT_BYTES",
    "OVERHEAD_BYTES",
    "Encrypt",
    "encrypt",
]

HEADER_BYTES = 86  # salt 16 + rs 4 + idlen 1 + keyid 65
_TAG_BYTES = 16
_DELIMITER = b"\x02"  # RFC 8188: the last (here: only) record ends with 0x02
OVERHEAD_BYTES = HEADER_BYTES + len(_DELIMITER) + _TAG_BYTES  # 103
MAX_BODY_BYTES = 4096  # RFC 8030 §7.2: services must accept bodies up to here, need not beyond
MAX_PLAINTEXT_BYTES = MAX_BODY_BYTES - OVERHEAD_BYTES  # 3993, as RFC 8291 §4 says
_RECORD_SIZE = 4096  # the usual rs; raised only for a record that is bigger (a 413 is coming)


class Encrypt(Protocol):
    """The adapter's encryption step: plaintext and the device's keys in, request body out."""

    def __call__(self, plaintext: bytes, keys: DeviceKeys, *, pad_to: int = 0) -> bytes: ...


def encrypt(
    plaintext: bytes,
    keys: DeviceKeys,
    *,
    pad_to: int = 0,
    salt: bytes | None = None,
    sender_key: ec.EllipticCurvePrivateKey | None = None,
) -> bytes:
    """Encrypt ``plaintext`` to a Web Push subscription (RFC 8291, ``aes128gcm``).

    Args:
        plaintext: the push message.
        keys: the subscription's ``p256dh`` (65-byte uncompressed P-256 point) and ``auth``.
        pad_to: pad with zero octets until plaintext plus padding is at least this long (0 = no
            padding), so that lengths reveal only a size bucket.
        salt: 16 bytes; fresh random when None. Only tests pass one (RFC 8291 test vector).
        sender_key: the ephemeral ECDH key; a fresh one when None. Only tests pass one.

    Returns:
        The request body: the 86-byte header followed by the single encrypted record.

    Raises:
        ValueError: ``p256dh`` is not a point on P-256, ``auth`` is not 16 bytes, or ``salt``
            is not 16 bytes.
    """
    if len(keys.auth) != 16:
        raise ValueError("auth secret must be 16 bytes")
    salt = os.urandom(16) if salt is None else salt
    if len(salt) != 16:
        raise ValueError("salt must be 16 bytes")
    # from_encoded_point checks that the point lies on the curve, as RFC 8291 §3.1 requires.
    ua_public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), keys.p256dh)
    sender_key = sender_key or ec.generate_private_key(ec.SECP256R1())
    as_public = sender_key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    ecdh_secret = sender_key.exchange(ec.ECDH(), ua_public)
    cek, nonce = _derive(ecdh_secret, keys.auth, keys.p256dh, as_public, salt)
    record = plaintext + _DELIMITER + b"\x00" * max(0, pad_to - len(plaintext))
    record_size = max(_RECORD_SIZE, len(record) + _TAG_BYTES)
    header = salt + struct.pack("!IB", record_size, len(as_public)) + as_public
    return header + AESGCM(cek).encrypt(nonce, record, None)


def _derive(
    ecdh_secret: bytes, auth: bytes, ua_public: bytes, as_public: bytes, salt: bytes
) -> tuple[bytes, bytes]:
    """RFC 8291 §3.4 then RFC 8188 §2.2: the content-encryption key and the nonce."""
    # Every HKDF-Expand here needs one block (L <= 32), so it is HMAC(PRK, info || 0x01).
    prk_key = _hmac(auth, ecdh_secret)
    ikm = _hmac(prk_key, b"WebPush: info\x00" + ua_public + as_public + b"\x01")
    prk = _hmac(salt, ikm)
    cek = _hmac(prk, b"Content-Encoding: aes128gcm\x00\x01")[:16]
    nonce = _hmac(prk, b"Content-Encoding: nonce\x00\x01")[:12]
    return cek, nonce


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()
