"""DTLS-SRTP (RFC 5764, RFC 8827) as a sans-I/O state machine over pyOpenSSL memory BIOs.

A `DtlsEndpoint` is fed datagrams and time, and hands back datagrams to send and events; it never
touches a socket or a clock. The SFU is normally the DTLS server (it answers `a=setup:passive`).

OpenSSL as linked here speaks DTLS 1.2 only. Browsers offering DTLS 1.3 (with a ClientHello that can
carry a post-quantum key share and span several datagrams) fall back to 1.2 with it: OpenSSL's normal
accept path reassembles handshake fragments, so every datagram goes into the BIO as it arrives and the
handshake is driven after each one. `DTLSv1_listen` (the stateless cookie exchange) is deliberately not
used: it cannot reassemble a fragmented ClientHello, and ICE connectivity checks already prove that the
peer owns its address.

Time: OpenSSL's DTLS retransmission timer runs on the wall clock, which cannot be injected. `now` only
maps OpenSSL's "seconds left" onto the caller's clock; `handle_timeout` then asks OpenSSL, which
retransmits once its own timer has run out (and otherwise we re-arm from what it reports).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto

from huddle.rtc.certificate import Certificate, fingerprint_sha256, normalize_fingerprint
from huddle.rtc.srtp import DEFAULT_PROFILES, SrtpKeys, SrtpProfile

__all__ = [
    "DEFAULT_MTU",
    "EXPORTER_LABEL",
    "ApplicationData",
    "Closed",
    "DtlsEndpoint",
    "DtlsEvent",
    "DtlsState",
    "Failed",
    "HandshakeComplete",
    "Role",
]

Role = Literal["client", "server"]

# RFC 5764 §4.2.
EXPORTER_LABEL = b"EXTRACTOR-dtls_srtp"
# Leaves room for IPv6 and TURN framing under a 1280-byte path MTU.
DEFAULT_MTU = 1200
# OpenSSL refuses to build handshake records below this ciphertext MTU.
MIN_MTU = 256
DEFAULT_HANDSHAKE_TIMEOUT = 30.0

# Our certificate is ECDSA, so as a server only the ECDSA suites can be chosen; the RSA ones let the
# client role talk to peers with RSA certificates. AEAD only: there is no reason to offer CBC in 2026.
CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES256-GCM-SHA384:"
    b"ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-CHACHA20-POLY1305:ECDHE-RSA-AES256-GCM-SHA384"
)

RECORD_HEADER_SIZE = 13
# change_cipher_spec, alert, handshake, application_data. DTLS 1.3 ciphertexts (unified header) are
# never valid here because we never negotiate 1.3.
_CONTENT_TYPES = frozenset((20, 21, 22, 23))
_READ_SIZE = 65536


class DtlsState(enum.Enum):
    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"
    FAILED = "failed"


@dataclass(frozen=True)
class HandshakeComplete:
    """The handshake finished and the peer's certificate matched its SDP fingerprint."""

    profile: SrtpProfile
    keys: SrtpKeys
    # The raw exporter output (RFC 5764 §4.2 layout), for `SrtpSession.from_keying`.
    key_material: bytes
    peer_fingerprint: str

    def __repr__(self) -> str:
        return f"HandshakeComplete({self.profile.name}, peer {self.peer_fingerprint})"


@dataclass(frozen=True)
class ApplicationData:
    """Data the peer sent over the established association (WebRTC data channels run SCTP here)."""

    data: bytes


@dataclass(frozen=True)
class Closed:
    reason: str


@dataclass(frozen=True)
class Failed:
    reason: str


DtlsEvent = HandshakeComplete | ApplicationData | Closed | Failed


class _FingerprintCheck:
    """The verify callback's state, kept apart from the endpoint so that the context holds no cycle."""

    __slots__ = ("expected", "failure")

    def __init__(self, expected: str) -> None:
        self.expected = expected
        self.failure: str | None = None

    def __call__(self, conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int) -> bool:
        # Chain certificates above the leaf mean nothing in WebRTC: only the leaf's fingerprint is
        # signed into the SDP. Self-signed leaves come in with ok=0, which is expected and ignored.
        if depth != 0:
            return True
        try:
            der = cert.to_cryptography().public_bytes(serialization.Encoding.DER)
        except Exception as exc:  # an exception escaping a pyOpenSSL callback resurfaces in do_handshake
            self.failure = f"cannot read the peer certificate: {exc}"
            return False
        got = fingerprint_sha256(der)
        if got != self.expected:
            self.failure = f"peer certificate fingerprint {got} does not match the SDP's {self.expected}"
            return False
        return True


def _describe(exc: SSL.Error) -> str:
    if isinstance(exc, SSL.SysCallError):
        return f"syscall error {exc.args}"
    reasons = [
        item[2] for item in (exc.args[0] if exc.args else []) if isinstance(item, tuple) and len(item) == 3
    ]
    return "; ".join(reasons) or repr(exc)


def check_framing(data: bytes) -> str | None:
    """Why `data` is not a datagram of whole DTLS 1.2 records, or None if it is.

    OpenSSL would drop such datagrams silently too; checking first keeps a reason, and stops a
    datagram whose last record claims more bytes than it has from swallowing the next datagram in
    the stream-like memory BIO.
    """
    if not data:
        return "empty datagram"
    if not 20 <= data[0] <= 63:
        return f"first byte {data[0]} is outside DTLS's range 20-63 (RFC 7983)"
    offset, size = 0, len(data)
    while offset < size:
        if size - offset < RECORD_HEADER_SIZE:
            return "truncated DTLS record header"
        content_type = data[offset]
        if content_type not in _CONTENT_TYPES:
            return f"DTLS content type {content_type} is not one DTLS 1.2 uses"
        if data[offset + 1] != 0xFE:
            return f"record version starts with {data[offset + 1]:#04x}, not DTLS's 0xfe"
        end = offset + RECORD_HEADER_SIZE + int.from_bytes(data[offset + 11 : offset + 13], "big")
        if end > size:
            return "DTLS record longer than its datagram (truncated)"
        offset = end
    return None


def pack_records(stream: bytes, mtu: int) -> list[bytes]:
    """Cut OpenSSL's output into datagrams of whole records, each at most `mtu` bytes when possible.

    The memory BIO is a byte stream: a flight comes out as several records run together, and reading
    it in fixed-size chunks would split records across datagrams. OpenSSL keeps each record within the
    MTU it was given, so records are packed back to back up to that size.
    """
    datagrams: list[bytes] = []
    current = bytearray()
    offset, size = 0, len(stream)
    while offset < size:
        end = offset + RECORD_HEADER_SIZE
        if end <= size:
            end += int.from_bytes(stream[offset + 11 : offset + 13], "big")
        end = min(end, size)
        record = stream[offset:end]
        if current and len(current) + len(record) > mtu:
            datagrams.append(bytes(current))
            current.clear()
        current += record
        offset = end
    if current:
        datagrams.append(bytes(current))
    return datagrams


class DtlsEndpoint:
    """One DTLS-SRTP association with one peer, as a state machine with no I/O.

    Feed it `receive_datagram(data, now)` and `handle_timeout(now)` (when `next_timeout()` is due);
    send what `datagrams_to_send()` returns; read `next_event()` until None. Garbage never raises out of
    `receive_datagram`: a datagram that is not DTLS is ignored (counted, with the reason in
    `last_ignored_reason`), and one that OpenSSL rejects fatally ends the association with `Failed`.
    """

    def __init__(
        self,
        certificate: Certificate,
        remote_fingerprint: str,
        role: Role = "server",
        *,
        profiles: Sequence[SrtpProfile] = DEFAULT_PROFILES,
        mtu: int = DEFAULT_MTU,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ) -> None:
        if role not in ("client", "server"):
            raise ValueError(f"role must be 'client' or 'server', not {role!r}")
        if not profiles:
            raise ValueError("at least one SRTP profile is needed")
        if mtu < MIN_MTU:
            raise ValueError(f"mtu must be at least {MIN_MTU}")
        self.role: Role = role
        self.certificate = certificate
        self.remote_fingerprint = normalize_fingerprint(remote_fingerprint)
        self.profiles = tuple(profiles)
        self.mtu = mtu
        self.handshake_timeout = handshake_timeout
        self.ignored_datagrams = 0
        self.last_ignored_reason: str | None = None

        self._state = DtlsState.NEW
        self._events: deque[DtlsEvent] = deque()
        self._outgoing: list[bytes] = []
        self._retransmit_at: float | None = None
        self._handshake_deadline: float | None = None
        self._check = _FingerprintCheck(self.remote_fingerprint)
        self._profile: SrtpProfile | None = None

        context = SSL.Context(SSL.DTLS_METHOD)
        context.use_certificate(certificate.certificate)
        context.use_privatekey(certificate.private_key)
        context.check_privatekey()
        context.set_cipher_list(CIPHERS)
        # NO_QUERY_MTU: a memory BIO has no path MTU to ask, and the query would replace ours. No
        # tickets: resumption is useless for WebRTC (a new call gets a new association) and the
        # NewSessionTicket would add ~480 bytes to the server's last flight. No renegotiation: browsers
        # never renegotiate DTLS, so a peer that tries is misbehaving.
        context.set_options(
            SSL.OP_NO_QUERY_MTU
            | SSL.OP_NO_TICKET
            | SSL.OP_NO_RENEGOTIATION
            | SSL.OP_NO_COMPRESSION
            | SSL.OP_CIPHER_SERVER_PREFERENCE
        )
        # OpenSSL's server keeps its own order, so listing GCM first makes it win whenever offered.
        context.set_tlsext_use_srtp(b":".join(p.openssl_name.encode() for p in self.profiles))
        # Ask for the client's certificate (WebRTC is mutually authenticated) and judge it by fingerprint.
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._check)

        self._conn = SSL.Connection(context, None)
        self._conn.set_ciphertext_mtu(mtu)
        if role == "server":
            self._conn.set_accept_state()
        else:
            self._conn.set_connect_state()

    # -- state -------------------------------------------------------------------------------------

    @property
    def state(self) -> DtlsState:
        return self._state

    @property
    def profile(self) -> SrtpProfile | None:
        """The negotiated SRTP profile, once connected."""
        return self._profile

    @property
    def local_fingerprint(self) -> str:
        return self.certificate.fingerprint_sha256

    # -- inputs ------------------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Begin the handshake: the client sends its ClientHello; both sides start the handshake clock.

        A server need not call it: the first datagram starts it too.
        """
        if self._state is not DtlsState.NEW:
            return
        self._state = DtlsState.CONNECTING
        self._handshake_deadline = now + self.handshake_timeout
        if self.role == "client":
            self._drive_handshake(now)

    def receive_datagram(self, data: bytes, now: float) -> None:
        if self._state in (DtlsState.CLOSED, DtlsState.FAILED):
            self._ignore(f"association is {self._state.value}")
            return
        reason = check_framing(data)
        if reason is not None:
            self._ignore(reason)
            return
        if self._state is DtlsState.NEW:
            self.start(now)
            if self._state is not DtlsState.CONNECTING:
                return
        # One datagram at a time: OpenSSL reads the memory BIO as one packet, and treating two
        # datagrams as one would let a bad record in the first discard the second.
        try:
            self._conn.bio_write(data)
        except SSL.Error as exc:  # a memory BIO only fails to grow; keep the promise not to raise
            self._ignore(f"cannot buffer the datagram: {_describe(exc)}")
            return
        if self._state is DtlsState.CONNECTING:
            self._drive_handshake(now)
        else:
            self._read_records()

    def handle_timeout(self, now: float) -> None:
        if self._state is DtlsState.CONNECTING and self._handshake_deadline is not None:
            if now >= self._handshake_deadline:
                self._fail(f"handshake did not complete within {self.handshake_timeout:g} s")
                return
        if self._retransmit_at is None or now < self._retransmit_at:
            return
        try:
            self._conn.DTLSv1_handle_timeout()
        except SSL.Error as exc:
            self._flush()
            self._fail(f"gave up retransmitting: {_describe(exc)}")
            return
        self._flush()
        self._arm_timer(now)

    def send_application_data(self, data: bytes) -> None:
        if self._state is not DtlsState.CONNECTED:
            raise RuntimeError(f"cannot send application data: association is {self._state.value}")
        try:
            self._conn.send(data)
        except SSL.Error as exc:
            self._flush()
            self._fail(f"sending application data failed: {_describe(exc)}")
            return
        self._flush()

    def close(self) -> None:
        """Send close_notify (if the handshake finished) and stop; a no-op once closed or failed."""
        if self._state in (DtlsState.CLOSED, DtlsState.FAILED):
            return
        if self._state is DtlsState.CONNECTED:
            try:
                self._conn.shutdown()
            except SSL.Error:
                pass  # the peer learns either way; nothing else is to be done on our side
            self._flush()
        self._finish(DtlsState.CLOSED, Closed("closed locally"))

    # -- outputs -----------------------------------------------------------------------------------

    def datagrams_to_send(self) -> list[bytes]:
        datagrams, self._outgoing = self._outgoing, []
        return datagrams

    def next_timeout(self) -> float | None:
        """When `handle_timeout` should next be called, on the caller's clock, or None."""
        if self._state is not DtlsState.CONNECTING:
            return self._retransmit_at
        if self._retransmit_at is None:
            return self._handshake_deadline
        if self._handshake_deadline is None:
            return self._retransmit_at
        return min(self._retransmit_at, self._handshake_deadline)

    def next_event(self) -> DtlsEvent | None:
        return self._events.popleft() if self._events else None

    # -- internals ---------------------------------------------------------------------------------

    def _drive_handshake(self, now: float) -> None:
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            self._flush()
            self._arm_timer(now)
            return
        except SSL.Error as exc:
            # OpenSSL has queued an alert for the peer; send it before giving up.
            self._flush()
            self._fail(self._check.failure or f"handshake failed: {_describe(exc)}")
            return
        self._flush()
        self._handshake_complete(now)

    def _handshake_complete(self, now: float) -> None:
        name = self._conn.get_selected_srtp_profile()
        if not name:
            self._abort("peer did not negotiate an SRTP profile (no use_srtp in common)")
            return
        try:
            profile = SrtpProfile.from_openssl_name(name)
        except ValueError as exc:
            self._abort(str(exc))
            return
        # A second look at the leaf, in case OpenSSL ever completes without calling the verify callback
        # (it should not: there are no tickets and each endpoint has its own session cache).
        peer = self._conn.get_peer_certificate(as_cryptography=True)
        got = fingerprint_sha256(peer.public_bytes(serialization.Encoding.DER)) if peer else None
        if got is None or got != self.remote_fingerprint:
            self._abort(f"peer certificate fingerprint {got} does not match the SDP's {self._check.expected}")
            return
        try:
            material = self._conn.export_keying_material(EXPORTER_LABEL, profile.keying_material_length)
        except SSL.Error as exc:
            self._abort(f"exporting SRTP keys failed: {_describe(exc)}")
            return
        keys = SrtpKeys.from_keying_material(profile, material, is_server=self.role == "server")
        self._profile = profile
        self._state = DtlsState.CONNECTED
        self._handshake_deadline = None
        self._events.append(HandshakeComplete(profile, keys, material, got))
        self._arm_timer(now)
        # The datagram that completed the handshake may carry more records (application data).
        self._read_records()

    def _read_records(self) -> None:
        while True:
            try:
                data = self._conn.recv(_READ_SIZE)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                try:
                    self._conn.shutdown()
                except SSL.Error:
                    pass
                self._flush()
                self._finish(DtlsState.CLOSED, Closed("peer sent close_notify"))
                return
            except SSL.Error as exc:
                self._flush()
                self._fail(f"DTLS error after the handshake: {_describe(exc)}")
                return
            if data:
                self._events.append(ApplicationData(data))
        # A retransmitted client Finished makes OpenSSL resend our last flight from inside recv.
        self._flush()

    def _flush(self) -> None:
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self._conn.bio_read(_READ_SIZE)
            except SSL.WantReadError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        if chunks:
            self._outgoing.extend(pack_records(b"".join(chunks), self.mtu))

    def _arm_timer(self, now: float) -> None:
        remaining = self._conn.DTLSv1_get_timeout()
        self._retransmit_at = None if remaining is None else now + remaining

    def _ignore(self, reason: str) -> None:
        self.ignored_datagrams += 1
        self.last_ignored_reason = reason

    def _abort(self, reason: str) -> None:
        # OpenSSL considers the handshake done, so it sent no alert; close_notify stops the peer from
        # sending media we will never decrypt.
        try:
            self._conn.shutdown()
        except SSL.Error:
            pass
        self._flush()
        self._fail(reason)

    def _fail(self, reason: str) -> None:
        self._finish(DtlsState.FAILED, Failed(reason))

    def _finish(self, state: DtlsState, event: Closed | Failed) -> None:
        self._state = state
        self._retransmit_at = None
        self._handshake_deadline = None
        self._events.append(event)

    def __repr__(self) -> str:
        return f"DtlsEndpoint({self.role}, {self._state.value})"
