"""An in-memory test PKI: one CA, a loopback server certificate, and client certificates.

Nothing here touches a disk. ``ssl.SSLContext.load_cert_chain`` only reads files, and trustme's
``configure_cert`` writes a temporary one, so certificates and keys are handed to OpenSSL through
pipes (``/dev/fd/N``) instead: the PEM bytes live only in kernel pipe buffers for the duration of
the call. That needs a POSIX system (Linux, macOS).
"""

from __future__ import annotations

import datetime
import os
import re
import ssl
import sys
from collections.abc import Sequence

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# A pipe holds at least 16 KiB on every POSIX system we support (Linux 64 KiB, macOS 16 KiB), so
# one write fills it without a writer thread; certificate chains are a few KiB.
_PIPE_SAFE_BYTES = 16 * 1024
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.DOTALL)


class TestPKI:
    """A throwaway certificate authority for one test or one demo run.

    Attributes:
        ca: the underlying ``trustme.CA``.
        ca_pem: the CA certificate (PEM): what clients must trust.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self) -> None:
        self.ca = trustme.CA()
        self.ca_pem: bytes = self.ca.cert_pem.bytes()
        self._server_cert = self.ca.issue_cert("127.0.0.1", "localhost", "::1")

    @property
    def server_cert_pem(self) -> bytes:
        """The loopback server certificate chain (PEM), e.g. for a gRPC server's TLS."""
        return b"".join(blob.bytes() for blob in self._server_cert.cert_chain_pems)

    @property
    def server_key_pem(self) -> bytes:
        """The loopback server certificate's private key (PEM)."""
        return self._server_cert.private_key_pem.bytes()

    def server_context(
        self, *, alpn: Sequence[str] = ("h2",), request_client_cert: bool = False
    ) -> ssl.SSLContext:
        """A server context presenting a certificate for 127.0.0.1, ::1 and localhost.

        Args:
            alpn: the ALPN protocols offered, in preference order.
            request_client_cert: ask clients for a certificate (``CERT_OPTIONAL``); one that is
                presented must be issued by this CA, and the server can then read it.
        """
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        load_cert_chain_pem(ctx, self._server_cert.private_key_and_cert_chain_pem.bytes())
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        if request_client_cert:
            ctx.verify_mode = ssl.CERT_OPTIONAL
            ctx.load_verify_locations(cadata=self.ca_pem.decode("ascii"))
        return ctx

    def client_context(
        self, *, alpn: Sequence[str] = ("h2",), cert_pem: bytes | None = None
    ) -> ssl.SSLContext:
        """A client context that trusts this CA, optionally presenting a client certificate.

        Args:
            alpn: the ALPN protocols offered.
            cert_pem: a certificate and its key in one PEM blob (see :meth:`client_cert_pem`).
        """
        ctx = ssl.create_default_context(cadata=self.ca_pem.decode("ascii"))
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        if cert_pem is not None:
            load_cert_chain_pem(ctx, cert_pem)
        return ctx

    def client_cert_pem(self, common_name: str, uid: str | None = None) -> bytes:
        """A client certificate and its private key in one PEM blob, signed by this CA.

        Shaped like Apple's APNs certificates: the subject carries the bundle id as ``UID``, so
        clients (aioapns) and the fake APNs read the default topic from it.

        Args:
            common_name: the subject CN, e.g. ``Apple Push Services: com.example.chat``.
            uid: the subject UID (the bundle id); omitted when None.
        """
        ca_key = serialization.load_pem_private_key(self.ca.private_key_pem.bytes(), None)
        ca_cert = x509.load_pem_x509_certificate(self.ca_pem)
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise TypeError("unsupported CA key type")
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _client_cert_builder(ca_cert, common_name, uid, key.public_key()).sign(
            ca_key, hashes.SHA256()
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cert.public_bytes(serialization.Encoding.PEM) + key_pem


def _client_cert_builder(
    ca_cert: x509.Certificate,
    common_name: str,
    uid: str | None,
    public_key: ec.EllipticCurvePublicKey,
) -> x509.CertificateBuilder:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if uid is not None:
        attributes.insert(0, x509.NameAttribute(NameOID.USER_ID, uid))
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )


def system_trust_with(ca_pem: bytes) -> bytes:
    """The system's trust store (as ``ssl`` finds it) plus ``ca_pem``: a bundle for a process
    given ``SSL_CERT_FILE``, which then trusts a local fake as it trusts Apple and Google
    (the benchmarks and the soak; an app's ``ca_file`` would give libcurl a copy of the whole
    blob per request in flight)."""
    system = ssl.get_default_verify_paths().openssl_cafile
    if system and os.path.exists(system):
        with open(system, "rb") as file:
            return file.read() + b"\n" + ca_pem
    return b"\n" + ca_pem


def certificate_uid(cert: x509.Certificate) -> str | None:
    """The subject UID of a certificate (an APNs certificate's bundle id), if any."""
    values = cert.subject.get_attributes_for_oid(NameOID.USER_ID)
    return str(values[0].value) if values else None


def load_cert_chain_pem(ctx: ssl.SSLContext, pem: bytes) -> None:
    """Load a certificate chain and its private key from PEM bytes, without any file.

    Args:
        ctx: the context to present the certificate.
        pem: the certificate(s) and one private key, in any order, in one PEM blob.

    Raises:
        ValueError: no private key or no certificate in ``pem``, or it is too large.
        NotImplementedError: on systems without ``/dev/fd`` (Windows).
    """
    certs, key = _split_pem(pem)
    if not certs or not key:
        raise ValueError("PEM blob needs a certificate and a private key")
    if sys.platform == "win32":
        raise NotImplementedError("in-memory certificate loading needs /dev/fd")
    cert_fd, key_fd = _filled_pipe(certs), _filled_pipe(key)
    try:
        ctx.load_cert_chain(f"/dev/fd/{cert_fd}", f"/dev/fd/{key_fd}")
    finally:
        os.close(cert_fd)
        os.close(key_fd)


def _split_pem(pem: bytes) -> tuple[bytes, bytes]:
    """Separate certificates from the private key; OpenSSL reads each from its own file."""
    certs, key = b"", b""
    for block in _PEM_BLOCK.finditer(pem):
        label = block.group(1)
        if label == b"CERTIFICATE":
            certs += block.group(0).rstrip() + b"\n"
        elif label.endswith(b"PRIVATE KEY"):
            key = block.group(0).rstrip() + b"\n"
    return certs, key


def _filled_pipe(data: bytes) -> int:
    """A pipe's read end, already holding ``data`` and closed for writing."""
    if len(data) > _PIPE_SAFE_BYTES:
        raise ValueError("PEM data too large for in-memory loading")
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, data)
    finally:
        os.close(write_fd)
    return read_fd
