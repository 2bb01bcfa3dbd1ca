"""One synthetic peer connection with the SFU: ICE as a controlling full agent, DTLS as client, SRTP.

The SFU is ICE-lite, so this side does the checking: STUN Binding requests with USERNAME, PRIORITY,
ICE-CONTROLLING, USE-CANDIDATE and MESSAGE-INTEGRITY (keyed with the server's password) go to the server's
UDP candidate every `CHECK_INTERVAL` until one is answered, and then every `CONSENT_INTERVAL` (consent
freshness, RFC 7675, which the server watches). Then the DTLS handshake (huddle.rtc.dtls as client) gives
the SRTP keys. One UDP socket per connection, connected to the server's address, read by the event loop;
datagrams are demultiplexed by their first byte (RFC 7983) and RTP goes to `on_rtp` still protected, with
the kernel's receive time, so that the receiver decides what it decrypts.

Timers (check retransmission, consent, DTLS retransmission) are not per connection: the owner calls
`tick()` a few times a second for every connection. Reading need not be per connection either: with a
`ReceivePoller`, all the process's sockets are polled together every few milliseconds and drained, rather
than the event loop waking up once per datagram (at a hundred participants, most datagrams would arrive
alone and each would cost a whole turn of the loop). The kernel's receive timestamps keep the measured delay
exact regardless.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import select
import socket
import struct
import time
from collections.abc import Callable

from huddle.rtc.certificate import Certificate
from huddle.rtc.dtls import Closed, DtlsEndpoint, DtlsState, Failed, HandshakeComplete
from huddle.rtc.sdp import candidate_priority
from huddle.rtc.srtp import SrtpError, SrtpSession
from huddle.stun import message as stun

__all__ = ["CHECK_INTERVAL", "CONSENT_INTERVAL", "MediaConnection", "ReceivePoller", "binding_request"]

CHECK_INTERVAL = 0.1  # seconds between checks until one is answered, growing by half each time ...
CHECK_INTERVAL_MAX = 1.0  # ... up to this: an overloaded server is checked gently, and never given up on
CONSENT_INTERVAL = 5.0  # seconds between consent checks once connected (browsers: ~5 s)
RECV_SIZE = 2048
RECV_BATCH = 256  # datagrams read per readiness event before the loop gets a turn
RECEIVE_BUFFER = 2 * 1024 * 1024  # bytes: a keyframe burst of every video a subscriber shows fits
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux's value; Python's socket module lacks it
_TIMESPEC = struct.Struct("@qq")
ANCILLARY_SIZE = socket.CMSG_SPACE(_TIMESPEC.size)
HOST_PRIORITY = candidate_priority(126, 65535, 1)
POLL_INTERVAL = 0.004  # seconds between the ReceivePoller's passes


class ReceivePoller:
    """Reads the sockets of many connections in batches: one epoll of its own, polled every `interval`."""

    def __init__(self, interval: float = POLL_INTERVAL) -> None:
        self.interval = interval
        self._epoll = select.epoll()
        self._readers: dict[int, Callable[[], None]] = {}
        self.passes = 0
        self.wakeups = 0  # socket drains: datagrams / wakeups is the batching achieved

    def add(self, fd: int, reader: Callable[[], None]) -> None:
        self._epoll.register(fd, select.EPOLLIN)
        self._readers[fd] = reader

    def remove(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    async def run(self) -> None:
        poll, readers = self._epoll.poll, self._readers
        try:
            while True:
                self.passes += 1
                for fd, _ in poll(0):
                    reader = readers.get(fd)
                    if reader is not None:
                        self.wakeups += 1
                        reader()
                await asyncio.sleep(self.interval)
        finally:
            self._epoll.close()


def binding_request(
    username: str, key: bytes, tiebreaker: bytes, *, nominate: bool, priority: int = HOST_PRIORITY
) -> tuple[bytes, bytes]:
    """A connectivity check from a controlling agent: (transaction id, the datagram)."""
    transaction = secrets.token_bytes(12)
    attributes = [
        stun.Attribute(stun.USERNAME, stun.encode_username(username)),
        stun.Attribute(stun.PRIORITY, priority.to_bytes(4, "big")),
        stun.Attribute(stun.ICE_CONTROLLING, tiebreaker),
    ]
    if nominate:
        attributes.append(stun.Attribute(stun.USE_CANDIDATE, b""))
    message = stun.StunMessage(stun.BINDING, stun.MessageClass.REQUEST, transaction, attributes)
    return transaction, stun.encode(message, integrity_key=key, fingerprint=True)


class MediaConnection:
    """A `publish` or `subscribe` connection of one synthetic participant."""

    def __init__(
        self,
        certificate: Certificate,
        *,
        label: str,
        on_rtp: Callable[[bytes, int], None] | None = None,
        on_rtcp: Callable[[bytes], None] | None = None,
        on_connected: Callable[[MediaConnection], None] | None = None,
        poller: ReceivePoller | None = None,
    ) -> None:
        self.certificate = certificate
        self.poller = poller  # None: the event loop reads the socket (add_reader)
        self.label = label
        self.on_rtp = on_rtp
        self.on_rtcp = on_rtcp
        self.on_connected = on_connected
        # Our ICE credentials (the server never checks us, but they go into our SDP and its USERNAMEs).
        self.ufrag = secrets.token_hex(4)
        self.pwd = secrets.token_hex(12)
        self._tiebreaker = secrets.token_bytes(8)
        self.remote_ufrag: str | None = None
        self._key = b""
        self.address: tuple[str, int] | None = None
        self.sock: socket.socket | None = None
        self.dtls: DtlsEndpoint | None = None
        self.srtp: SrtpSession | None = None
        self.ice_connected = False
        self.failed: str | None = None
        self.closed = False
        self.started_at = 0.0
        self.connected_at: float | None = None
        self._transactions: set[bytes] = set()
        self._next_check = 0.0
        self._check_interval = CHECK_INTERVAL
        # Counters, for the results.
        self.sent = self.sent_bytes = 0
        self.received = self.received_bytes = 0
        self.send_errors = 0
        self.srtcp_errors = 0
        self.checks_sent = 0

    # -- life -----------------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.srtp is not None and not self.closed

    @property
    def local_port(self) -> int:
        """Our socket's port (for the host candidate in our SDP); 9 (discard) before it exists."""
        return self.sock.getsockname()[1] if self.sock is not None else 9

    def open(self, family: int = socket.AF_INET) -> None:
        """Create the socket (bound to a free port of every address, like a browser's host candidate)."""
        if self.sock is not None:
            return
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        self.sock = sock
        if self.poller is not None:
            self.poller.add(sock.fileno(), self._on_readable)
        else:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._on_readable)

    def start(
        self, remote_ufrag: str, remote_pwd: str, remote_fingerprint: str, address: tuple[str, int]
    ) -> None:
        """The server's ICE credentials, fingerprint and candidate are known: begin checking."""
        if self.closed:
            return
        if self.sock is None:
            self.open(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
        if address != self.address:
            assert self.sock is not None
            # Connected: the kernel routes, and only the server's datagrams reach us.
            self.sock.connect(address)
            self.address = address
        if self.remote_ufrag is not None and remote_ufrag != self.remote_ufrag:
            # An ICE restart by the server: check again with the new credentials; DTLS and SRTP carry on.
            self.ice_connected = False
            self._check_interval = CHECK_INTERVAL
        self.remote_ufrag = remote_ufrag
        self._key = remote_pwd.encode()
        if self.dtls is None:
            self.dtls = DtlsEndpoint(self.certificate, remote_fingerprint, role="client")
        now = time.monotonic()
        if not self.started_at:
            self.started_at = now
        self._next_check = now
        self._check(now)

    def close(self, *, notify: bool = True) -> None:
        """Close the socket; with `notify`, after telling the server (DTLS close_notify)."""
        if self.closed:
            return
        self.closed = True
        if notify and self.dtls is not None and self.dtls.state is DtlsState.CONNECTED:
            self.dtls.close()
            for datagram in self.dtls.datagrams_to_send():
                self._send(datagram)
        if self.sock is not None:
            if self.poller is not None:
                self.poller.remove(self.sock.fileno())
            else:
                with contextlib.suppress(Exception):
                    asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        self.srtp = None

    # -- timers ---------------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Check retransmission and consent, DTLS retransmission: call a few times a second."""
        if self.closed or self.failed is not None or self.remote_ufrag is None:
            return
        if now >= self._next_check:
            self._check(now)
        dtls = self.dtls
        if dtls is not None and dtls.state is DtlsState.CONNECTING:
            due = dtls.next_timeout()
            if due is not None and now >= due:
                dtls.handle_timeout(now)
                self._after_dtls()

    def _check(self, now: float) -> None:
        assert self.remote_ufrag is not None
        transaction, datagram = binding_request(
            f"{self.remote_ufrag}:{self.ufrag}", self._key, self._tiebreaker, nominate=True
        )
        if len(self._transactions) > 64:
            self._transactions.clear()
        self._transactions.add(transaction)
        self.checks_sent += 1
        self._send(datagram)
        if self.ice_connected:
            self._next_check = now + CONSENT_INTERVAL
        else:
            self._next_check = now + self._check_interval
            self._check_interval = min(CHECK_INTERVAL_MAX, self._check_interval * 1.5)

    def _fail(self, reason: str) -> None:
        if self.failed is None:
            self.failed = reason

    # -- sending --------------------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            sock.send(data)
        except OSError:  # a full buffer (loss, as on the wire) or ICMP unreachable from a closed server port
            self.send_errors += 1

    def send_rtp(self, packet: bytes) -> None:
        """Protect and send one RTP packet (bytes: pylibsrtp takes nothing else)."""
        srtp, sock = self.srtp, self.sock
        if srtp is None or sock is None:
            return
        try:
            data = srtp.protect(packet)
            sock.send(data)
        except (OSError, SrtpError):
            self.send_errors += 1
            return
        self.sent += 1
        self.sent_bytes += len(data)

    def send_rtcp(self, packet: bytes) -> None:
        srtp = self.srtp
        if srtp is None:
            return
        try:
            data = srtp.protect_rtcp(packet)
        except SrtpError:
            self.send_errors += 1
            return
        self._send(data)

    # -- receiving ------------------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        sock = self.sock
        on_rtp = self.on_rtp
        unpack = _TIMESPEC.unpack_from
        for _ in range(RECV_BATCH):
            if sock is None:
                return
            try:
                data, ancillary, _flags, _addr = sock.recvmsg(RECV_SIZE, ANCILLARY_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # ICMP port unreachable: the server is gone; consent will tell
            if not data:
                continue
            first = data[0]
            if 127 < first < 192 and not 191 < data[1] < 224:
                if ancillary:
                    seconds, nanoseconds = unpack(ancillary[0][2])
                    arrival = seconds * 1_000_000 + nanoseconds // 1000
                else:
                    arrival = time.time_ns() // 1000
                self.received += 1
                self.received_bytes += len(data)
                if on_rtp is not None:
                    on_rtp(data, arrival)
            else:
                self._receive_other(data, first)
            sock = self.sock

    def _receive_other(self, data: bytes, first: int) -> None:
        if 127 < first < 192:  # RTCP
            srtp = self.srtp
            if srtp is None:
                return
            try:
                plain = srtp.unprotect_rtcp(data)
            except SrtpError:
                self.srtcp_errors += 1
                return
            if self.on_rtcp is not None:
                self.on_rtcp(plain)
        elif first < 4:
            self._receive_stun(data)
        elif 19 < first < 64 and self.dtls is not None:
            self.dtls.receive_datagram(data, time.monotonic())
            self._after_dtls()

    def _receive_stun(self, data: bytes) -> None:
        try:
            message = stun.parse(data)
        except stun.StunError:
            return
        if message.transaction_id not in self._transactions:
            return
        self._transactions.discard(message.transaction_id)
        if message.message_class != stun.MessageClass.SUCCESS or not stun.verify_integrity(data, self._key):
            return
        if not self.ice_connected:
            self.ice_connected = True
            now = time.monotonic()
            self._next_check = now + CONSENT_INTERVAL
            dtls = self.dtls
            if dtls is not None and dtls.state is DtlsState.NEW:
                dtls.start(now)
                self._after_dtls()

    def _after_dtls(self) -> None:
        dtls = self.dtls
        assert dtls is not None
        for datagram in dtls.datagrams_to_send():
            self._send(datagram)
        while (ev := dtls.next_event()) is not None:
            if isinstance(ev, HandshakeComplete):
                try:
                    self.srtp = SrtpSession(ev.keys)
                except SrtpError as exc:
                    self._fail(str(exc))
                    continue
                self.connected_at = time.monotonic()
                if self.on_connected is not None:
                    self.on_connected(self)
            elif isinstance(ev, Failed):
                self._fail(f"DTLS: {ev.reason}")
            elif isinstance(ev, Closed) and not self.closed:
                self._fail(f"DTLS closed: {ev.reason}")
