"""HTTPS and WSS on the node's HTTP port: the server's TLS context, loaded once at start with errors that say
what to do, and `--self-signed`, a certificate made for a try-out on a LAN.

Browsers give a page the camera and microphone only on a secure origin (https, or http on localhost), so a
call page reached at a LAN address needs TLS even for a try-out.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import os
import socket
import ssl
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from huddle.config import Settings
from huddle.logs import event

__all__ = [
    "ServerCertificate",
    "TlsError",
    "load",
    "self_signed",
    "self_signed_names",
    "with_self_signed",
]

log = logging.getLogger("huddle.tls")

SELF_SIGNED_DAYS: Final = 365
# Made anew at a start this close to expiry, so that a node started today does not lapse during a call.
RENEW_BEFORE: Final = datetime.timedelta(days=7)
# Under the recordings folder, beside the resume key; the store skips dot folders.
SELF_SIGNED_FILE: Final = Path(".tls") / "self-signed.pem"
_WILDCARDS: Final = ("", "0.0.0.0", "::")


class TlsError(Exception):
    """The certificate or key cannot serve; the message says what went wrong and what to do."""


@dataclass(frozen=True, slots=True)
class ServerCertificate:
    context: ssl.SSLContext
    fingerprint: str  # SHA-256 of the certificate (the first of the chain), as browsers show it
    names: tuple[str, ...]  # its subject alternative names
    not_after: datetime.datetime


def load(cert_path: str, key_path: str, now: datetime.datetime | None = None) -> ServerCertificate:
    """The server context for `cert_path` (PEM chain, the server's certificate first) and `key_path`."""
    now = now or datetime.datetime.now(datetime.UTC)
    chain_pem = _read("--tls-cert", cert_path)
    key_pem = _read("--tls-key", key_path)
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        raise TlsError(
            f"--tls-cert {cert_path}: no PEM certificate in it (PEM starts with "
            "'-----BEGIN CERTIFICATE-----'). Give the certificate chain in PEM (certbot's fullchain.pem); "
            "convert a DER file with "
            f"`openssl x509 -inform der -in {cert_path} -out cert.pem`"
        ) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise TlsError(
            f"--tls-key {key_path}: the key is protected by a passphrase, which a server cannot type in. "
            f"Store it decrypted and readable only by the server's user: "
            f"`openssl pkey -in {key_path} -out server.key && chmod 600 server.key`"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TlsError(
            f"--tls-key {key_path}: not a PEM private key ({exc}). Give the key the certificate was issued "
            "for (certbot's privkey.pem)"
        ) from None
    leaf = chain[0]
    if _public(leaf.public_key()) != _public(key.public_key()):
        raise TlsError(
            f"--tls-key {key_path} does not belong to the certificate in --tls-cert {cert_path} "
            f"({leaf.subject.rfc4514_string()}): give the key it was issued for, and the chain with the "
            "server's certificate first"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_path, key_path, password=_no_passphrase)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(
            f"--tls-cert {cert_path} / --tls-key {key_path}: OpenSSL refuses them: {exc}"
        ) from None
    certificate = ServerCertificate(context, fingerprint(leaf), _names(leaf), leaf.not_valid_after_utc)
    event(
        log,
        logging.INFO,
        "HTTPS certificate",
        names=",".join(certificate.names),
        fingerprint=certificate.fingerprint,
        not_after=leaf.not_valid_after_utc.isoformat(),
    )
    if leaf.not_valid_after_utc <= now or leaf.not_valid_before_utc > now:
        event(
            log,
            logging.WARNING,
            "the certificate is not valid now: browsers will refuse the page; renew it (certbot renew)",
            cert=cert_path,
            not_before=leaf.not_valid_before_utc.isoformat(),
            not_after=leaf.not_valid_after_utc.isoformat(),
        )
    return certificate


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the DER certificate as 'AB:CD:...', what a browser's certificate viewer shows."""
    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()


def with_self_signed(settings: Settings) -> Settings:
    """`settings` with --self-signed carried out: the certificate made or reused and given as --tls-cert and
    --tls-key (one file holds both), and its fingerprint logged."""
    path = Path(settings.recordings_dir) / SELF_SIGNED_FILE
    names = self_signed_names(settings)
    try:
        made = self_signed(path, names)
        leaf = x509.load_pem_x509_certificates(path.read_bytes())[0]
    except OSError as exc:
        raise TlsError(
            f"--self-signed: cannot keep the certificate in {path}: {exc.strerror or exc}. Give a "
            "--recordings-dir this user can write to"
        ) from None
    event(
        log,
        logging.INFO,
        "self-signed certificate: browsers warn about it; check that the SHA-256 fingerprint they show is "
        "this one before going on",
        fingerprint=fingerprint(leaf),
        names=",".join(names),
        file=str(path),
        made=made,
        not_after=leaf.not_valid_after_utc.isoformat(),
    )
    return replace(settings, self_signed=False, tls_cert=str(path), tls_key=str(path))


def self_signed_names(settings: Settings) -> tuple[str, ...]:
    """Every name and address a browser on the LAN may reach this node at."""
    names = ["localhost", "127.0.0.1", "::1"]
    hostname = socket.gethostname()
    names += [hostname, f"{hostname}.local"] if "." not in hostname else [hostname]
    for address in (settings.host, settings.announce_ip):
        if address and address not in _WILDCARDS:
            names.append(address)
    if settings.public_url:
        names.append(urlsplit(settings.public_url).hostname or "")
    if settings.host in _WILDCARDS and not settings.announce_ip:
        names.append(_outgoing_address())
    unique: dict[str, None] = {}
    for name in names:
        if name and name.isascii():
            unique.setdefault(_ip(name) or name.lower(), None)
    return tuple(unique)


def self_signed(path: Path, names: tuple[str, ...], now: datetime.datetime | None = None) -> bool:
    """Keep a self-signed certificate for `names` with its key in `path`: the one there if it still covers
    exactly these names and is not about to expire (the same certificate across restarts, so a browser that
    accepted it once accepts it again); else a new one. True when it made one."""
    now = now or datetime.datetime.now(datetime.UTC)
    with contextlib.suppress(OSError, ValueError, TypeError):
        data = path.read_bytes()
        leaf = x509.load_pem_x509_certificates(data)[0]
        key = serialization.load_pem_private_key(data, password=None)
        if (
            _public(leaf.public_key()) == _public(key.public_key())
            and set(_names(leaf)) == set(names)
            and leaf.not_valid_after_utc - RENEW_BEFORE > now
        ):
            return False
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Huddle on {socket.gethostname()}"[:64])])
    alternative: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address(n)) if _ip(n) else x509.DNSName(n) for n in names
    ]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # An hour back: a client whose clock runs a little behind still takes it.
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(alternative), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ) + certificate.public_bytes(serialization.Encoding.PEM)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written whole under another name, readable by this user only, then renamed: a node starting meanwhile
    # reads the old file or the new one, never half of one.
    draft = path.with_name(f"{path.name}.{os.getpid()}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.replace(draft, path)
    return True


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise TlsError(
            f"{flag} {path}: no such file. Give the path of a PEM file (certbot keeps them in "
            "/etc/letsencrypt/live/HOST/), or use --self-signed for a try-out"
        ) from None
    except PermissionError:
        raise TlsError(
            f"{flag} {path}: permission denied to the user running huddle (uid {os.getuid()}). Let it read "
            f"the file (e.g. `setfacl -m u:$(id -un):r {path}`, and x on the folders above), or copy it "
            "somewhere it can read, readable by it alone"
        ) from None
    except OSError as exc:
        raise TlsError(f"{flag} {path}: cannot read it: {exc.strerror or exc}") from None


def _no_passphrase() -> bytes:
    raise TlsError("the key is protected by a passphrase, which a server cannot type in: store it decrypted")


def _public(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _names(certificate: x509.Certificate) -> tuple[str, ...]:
    try:
        alternative = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    dns = alternative.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in alternative.get_values_for_type(x509.IPAddress)]
    return (*dns, *ips)


def _ip(name: str) -> str | None:
    """`name` as an address in its usual spelling, or None if it is not one."""
    try:
        return str(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        return None


def _outgoing_address() -> str:
    """The address this machine reaches others from (its LAN address, typically): what a browser on the LAN
    is told to open when the node listens on every address. Connecting a UDP socket sends nothing."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
            return str(probe.getsockname()[0])
        except OSError:
            return ""
