"""The node's DTLS certificate: a self-signed ECDSA P-256 certificate, named in SDP by its fingerprint.

WebRTC authenticates DTLS peers by the certificate fingerprint carried in the signed-in signaling
(RFC 8827 §6.5), not by a certificate authority, so the certificate itself only has to be well-formed.
"""

from __future__ import annotations

import datetime
import hashlib
import secrets

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["Certificate", "fingerprint_sha256", "normalize_fingerprint"]

# Generous, because nothing checks the dates (peers compare fingerprints only) while an expired
# certificate could still trip a stricter stack; a node restarts long before this runs out.
DEFAULT_VALIDITY = datetime.timedelta(days=365)
# Covers peers whose clocks run behind ours.
CLOCK_SKEW = datetime.timedelta(days=1)


def fingerprint_sha256(der: bytes) -> str:
    """SHA-256 of a DER certificate in SDP's `a=fingerprint` form: upper-case hex pairs joined by colons."""
    return ":".join(f"{byte:02X}" for byte in hashlib.sha256(der).digest())


def normalize_fingerprint(value: str) -> str:
    """An SDP fingerprint value in canonical form, so that case and surrounding blanks never matter."""
    return value.strip().upper()


class Certificate:
    """One self-signed ECDSA P-256 certificate and its key.

    `certificate` and `private_key` are what `OpenSSL.SSL.Context.use_certificate` / `use_privatekey`
    take: pyOpenSSL 26 wants cryptography objects there and deprecates its own `crypto.X509`/`PKey`.
    """

    def __init__(self, private_key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        self.private_key = private_key
        self.certificate = certificate
        self.fingerprint_sha256 = fingerprint_sha256(certificate.public_bytes(serialization.Encoding.DER))

    @classmethod
    def generate(
        cls,
        *,
        validity: datetime.timedelta = DEFAULT_VALIDITY,
        now: datetime.datetime | None = None,
    ) -> Certificate:
        private_key = ec.generate_private_key(ec.SECP256R1())
        # A random name, as browsers do: a fixed one would tell an observer which software this is.
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, secrets.token_hex(8))])
        start = now or datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(private_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - CLOCK_SKEW)
            .not_valid_after(start + validity)
            .sign(private_key, hashes.SHA256())
        )
        return cls(private_key, certificate)

    @property
    def expires(self) -> datetime.datetime:
        return self.certificate.not_valid_after_utc

    def __repr__(self) -> str:
        return f"Certificate(sha-256 {self.fingerprint_sha256})"
