"""One WebRTC transport: ICE-lite, DTLS and SRTP for one peer connection of one participant.

The media port hands it the datagrams (or ICE-TCP frames) that belong to it; it hands decrypted RTP and
RTCP to its owner through callbacks, and encrypts and sends what the owner gives it. Demultiplexing by first
byte follows RFC 7983: 0-3 STUN, 20-63 DTLS, 128-191 RTP/RTCP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from huddle.rtc import fastpath, rtp
from huddle.rtc.certificate import Certificate
from huddle.rtc.dtls import Closed, DtlsEndpoint, DtlsState, Failed, HandshakeComplete
from huddle.rtc.ice import Address, IceLite, new_credentials
from huddle.rtc.srtp import SrtpError, SrtpSession
from huddle.stun import message as stun

if TYPE_CHECKING:
    from huddle.rtc.port import MediaPort

log = logging.getLogger("huddle.rtc")

# DTLS records that arrive before we know the peer's fingerprint (its answer is still on its way over
# signaling while its ClientHello already came over UDP) wait here; a handful is a whole flight.
EARLY_DTLS_LIMIT = 8
APPLICATION_DATA = 23  # DTLS record content type


class WebRtcTransport:
    def __init__(
        self,
        port: MediaPort,
        certificate: Certificate,
        *,
        label: str,
        on_rtp: Callable[[WebRtcTransport, bytes], None],
        on_rtcp: Callable[[WebRtcTransport, bytes], None],
        on_connected: Callable[[WebRtcTransport], None] = lambda t: None,
    ) -> None:
        self.port = port
        self.certificate = certificate
        self.label = label  # e.g. "p_1234abcd/publish", for logs
        self.on_rtp = on_rtp
        self.on_rtcp = on_rtcp
        self.on_connected = on_connected
        ufrag, pwd = new_credentials()
        self.ice = IceLite(ufrag, pwd)
        self.dtls: DtlsEndpoint | None = None
        # Where the compiled forward sends this transport's RTP (huddle.rtc._fastpath.Route; None on the
        # reference path): kept up to date whenever the SRTP session or the ICE pair changes.
        self.route = fastpath.new_route()
        self._srtp: SrtpSession | None = None
        self.created = time.monotonic()
        self.closed = False
        self._early_dtls: list[tuple[bytes, Address]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._addresses: set[Address] = set()
        port.register(self)

    # -- Negotiation ----------------------------------------------------------------------------------------

    @property
    def srtp(self) -> SrtpSession | None:
        return self._srtp

    @srtp.setter
    def srtp(self, session: SrtpSession | None) -> None:
        self._srtp = session
        self.update_route()

    def update_route(self) -> None:
        """Point the compiled forward's route at the port's batch, the SRTP session and the selected ICE
        pair as they are now (off while any is missing, or for ICE-TCP)."""
        if self.route is not None:
            self.route.set(self.port.batch, self._srtp, self.ice.selected)

    @property
    def connected(self) -> bool:
        return self._srtp is not None and not self.closed

    def set_remote(self, ufrag: str | None, fingerprint: str) -> None:
        """The peer's ICE ufrag and DTLS fingerprint, from its SDP."""
        self.ice.remote_ufrag = ufrag
        if self.dtls is None:
            self.dtls = DtlsEndpoint(self.certificate, fingerprint, role="server")
            early, self._early_dtls = self._early_dtls, []
            for data, addr in early:
                self._receive_dtls(data, addr)

    def restart_ice(self) -> None:
        """New local credentials (an ICE restart); DTLS and SRTP carry on over whatever path wins."""
        old = self.ice.ufrag
        ufrag, pwd = new_credentials()
        self.ice.restart(ufrag, pwd, None)
        self.port.rekey(self, old)

    # -- Receiving ------------------------------------------------------------------------------------------

    def receive_stun(self, data: bytes, request: stun.StunMessage, addr: Address) -> str | None:
        """A connectivity check for us; returns the reason when it is refused."""
        selected = self.ice.selected
        result = self.ice.check(data, request, addr, time.monotonic())
        if result.error is not None:
            return result.error
        if self.ice.selected != selected:
            self.update_route()
        if addr not in self._addresses:
            self._addresses.add(addr)
            self.port.bind(addr, self)
        assert result.response is not None
        self.port.send_to(result.response, addr)
        return None

    def receive(self, data: bytes, addr: Address) -> str | None:
        """A datagram from an address that passed ICE; returns the reason when it is dropped."""
        first = data[0]
        if 127 < first < 192:
            if self._srtp is None:
                return "srtp_not_ready"
            if rtp.is_rtcp(data):
                try:
                    plain = self._srtp.unprotect_rtcp(data)
                except SrtpError:
                    return "srtcp_auth"
                self.on_rtcp(self, plain)
            else:
                try:
                    plain = self._srtp.unprotect(data)
                except SrtpError:
                    return "srtp_auth"
                self.on_rtp(self, plain)
            return None
        if 19 < first < 64:
            return self._receive_dtls(data, addr)
        return "unknown_protocol"

    def _receive_dtls(self, data: bytes, addr: Address) -> str | None:
        if self.dtls is None:
            if len(self._early_dtls) >= EARLY_DTLS_LIMIT:
                return "dtls_early"
            self._early_dtls.append((data, addr))
            return None
        ignored = self.dtls.ignored_datagrams
        connected = self.dtls.state is DtlsState.CONNECTED
        self.dtls.receive_datagram(data, time.monotonic())
        if self._after_dtls(addr):
            return None
        if self.dtls.ignored_datagrams != ignored:
            return "dtls_garbage"
        # Well framed, yet OpenSSL took nothing from it: after the handshake a peer sends only records that
        # decrypt (application data, alerts, a retransmitted flight that we answer), and before it never
        # application data. OpenSSL drops such records silently (RFC 6347 §4.1.2.7); count them here.
        if connected or data[0] == APPLICATION_DATA:
            return "dtls_rejected"
        return None

    def _after_dtls(self, addr: Address | None = None) -> bool:
        """Send what DTLS wants sent and act on its events; whether there was anything of either."""
        dtls = self.dtls
        assert dtls is not None
        target = addr if addr is not None else self.ice.selected
        produced = False
        for datagram in dtls.datagrams_to_send():
            produced = True
            if target is not None:
                self.port.send_to(datagram, target)
        while (ev := dtls.next_event()) is not None:
            produced = True
            if isinstance(ev, HandshakeComplete):
                self.srtp = SrtpSession(ev.keys)
                log.debug(
                    "dtls connected", extra={"fields": {"transport": self.label, "profile": ev.profile.name}}
                )
                self.on_connected(self)
            elif isinstance(ev, Failed | Closed):
                log.info("dtls ended", extra={"fields": {"transport": self.label, "reason": ev.reason}})
        self._arm_timer()
        return produced

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.dtls is None or self.dtls.state is not DtlsState.CONNECTING or self.closed:
            return
        due = self.dtls.next_timeout()
        if due is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, due - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.dtls is not None and not self.closed:
            self.dtls.handle_timeout(time.monotonic())
            self._after_dtls()

    # -- Sending --------------------------------------------------------------------------------------------

    def send_rtp(self, packet: bytes | bytearray) -> bool:
        srtp, addr = self._srtp, self.ice.selected
        if srtp is None or addr is None:
            return False
        try:
            self.port.send_to(srtp.protect_view(packet), addr)
        except SrtpError:
            return False
        return True

    def send_rtcp(self, packet: bytes) -> bool:
        srtp, addr = self._srtp, self.ice.selected
        if srtp is None or addr is None:
            return False
        try:
            self.port.send_to(srtp.protect_rtcp(packet), addr)
        except SrtpError:
            return False
        return True

    # -- Life -----------------------------------------------------------------------------------------------

    def consent_expired(self, now: float) -> bool:
        return self.ice.consent_expired(now, self.created)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.dtls is not None:
            self.dtls.close()
            if self.ice.selected is not None:
                for datagram in self.dtls.datagrams_to_send():
                    self.port.send_to(datagram, self.ice.selected)
        self.port.unregister(self, self._addresses)
        # The callbacks are the owner's bound methods and the owner holds this transport: without this, a
        # closed call's state (and its OpenSSL objects) would wait for a full garbage collection.
        self.on_rtp = self.on_rtcp = _ignore
        self.on_connected = _ignore
        self.dtls = None
        self.srtp = None


def _ignore(*args: object) -> None:
    pass
