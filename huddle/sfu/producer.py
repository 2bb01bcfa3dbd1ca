"""A Producer: one track a participant publishes, fanned out to its Consumers.

Work that is the same for every subscriber happens here, once per packet: the payload type and the header
extension ids are rewritten to the numbers every subscriber negotiated (the SFU's own, see offer.py), so a
Consumer only copies the packet and rewrites SSRC, sequence number and timestamp.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from huddle.rtc import rtp
from huddle.rtc.rtcp import ReportBlock
from huddle.sfu import vp8

if TYPE_CHECKING:
    from huddle.sfu.consumer import Consumer
    from huddle.sfu.router import Peer

# An extension id no subscriber negotiates: elements that only mean something between the publisher and
# us (mid, rid, transport-wide seq, abs-send-time) are renamed to it, so subscribers skip them unread.
UNUSED_EXTENSION_ID = 14
KEYFRAME_REQUEST_INTERVAL = 0.5  # seconds between PLIs to one publisher's track, however many ask


def remap_extension_ids(pkt: bytearray, table: bytes) -> None:
    """Rename header extension elements in place, `table[old id] = new id`, for the one-byte form."""
    if not pkt[0] & 0x10:
        return
    start = 12 + 4 * (pkt[0] & 0x0F)
    if pkt[start] != 0xBE or pkt[start + 1] != 0xDE:
        return  # two-byte form: browsers use it only with extmap-allow-mixed, which we never offer
    i = start + 4
    end = i + 4 * ((pkt[start + 2] << 8) | pkt[start + 3])
    while i < end:
        b = pkt[i]
        ext_id = b >> 4
        if ext_id == 0:
            i += 1  # padding
            continue
        if ext_id == 15:
            return
        pkt[i] = (table[ext_id] << 4) | (b & 0x0F)
        i += (b & 0x0F) + 2


class ReceiveStats:
    """What a receiver report says about one incoming stream (RFC 3550 §6.4.1, A.3)."""

    __slots__ = ("base", "expected_prior", "highest", "received", "received_prior", "sr_at", "sr_ntp")

    def __init__(self) -> None:
        self.base: int | None = None
        self.highest = 0  # extended (with 16-bit rollovers counted)
        self.received = 0
        self.expected_prior = 0
        self.received_prior = 0
        self.sr_ntp = 0
        self.sr_at = 0.0

    def update(self, seq: int) -> None:
        self.received += 1
        if self.base is None:
            self.base = self.highest = seq
            return
        # Extend the 16-bit number to the one nearest the highest seen, so reordering is not a rollover.
        extended = (self.highest & ~0xFFFF) | seq
        if extended - self.highest > 0x8000:
            extended -= 0x10000
        elif self.highest - extended > 0x8000:
            extended += 0x10000
        if extended > self.highest:
            self.highest = extended

    def report(self, ssrc: int, now: float) -> ReportBlock | None:
        if self.base is None:
            return None
        expected = self.highest - self.base + 1
        lost = max(0, expected - self.received)
        interval_expected = expected - self.expected_prior
        interval_lost = interval_expected - (self.received - self.received_prior)
        self.expected_prior, self.received_prior = expected, self.received
        fraction = (
            (interval_lost << 8) // interval_expected if interval_expected > 0 and interval_lost > 0 else 0
        )
        lsr = (self.sr_ntp >> 16) & 0xFFFFFFFF
        dlsr = int((now - self.sr_at) * 65536) if self.sr_ntp else 0
        return ReportBlock(
            ssrc, min(fraction, 255), min(lost, 0x7FFFFF), self.highest & 0xFFFFFFFF, 0, lsr, dlsr
        )


class Producer:
    __slots__ = (
        "consumers",
        "deferred_request",
        "ext_table",
        "id",
        "kind",
        "last_keyframe_request",
        "mid",
        "peer",
        "pt_map",
        "rtx_ssrc",
        "ssrc",
        "stats",
    )

    def __init__(self, peer: Peer, kind: str, mid: str, pt_map: dict[int, int], ext_table: bytes) -> None:
        self.peer = peer
        self.kind = kind
        self.mid = mid
        self.id = f"{peer.participant.id}:{mid}"
        self.pt_map = pt_map  # publisher's payload type → the subscribers' one
        self.ext_table = ext_table
        self.ssrc: int | None = None
        self.rtx_ssrc: int | None = None
        self.consumers: list[Consumer] = []
        self.stats = ReceiveStats()
        self.last_keyframe_request = 0.0
        self.deferred_request: asyncio.TimerHandle | None = None

    def receive(self, data: bytes) -> int:
        """Forward one decrypted packet to every Consumer; returns how many copies went out."""
        pt = self.pt_map.get(data[1] & 0x7F)
        if pt is None:
            return 0
        buf = bytearray(data)
        try:
            start = rtp.payload_offset(buf)
            end = rtp.payload_end(buf)
        except rtp.RtpError:
            return 0  # authentic but malformed (impossible padding, say): nobody could use it
        buf[1] = (buf[1] & 0x80) | pt
        remap_extension_ids(buf, self.ext_table)
        seq = (buf[2] << 8) | buf[3]
        self.stats.update(seq)
        ts = rtp.timestamp(buf)
        keyframe = self.kind == "video" and vp8.is_keyframe_start(memoryview(buf)[start:end])
        size = end - start
        sent = 0
        for consumer in self.consumers:
            if consumer.forward(buf, seq, ts, keyframe, size):
                sent += 1
        return sent

    def request_keyframe(self) -> bool:
        """Ask the publisher for a keyframe, at most every KEYFRAME_REQUEST_INTERVAL; True when sent now.

        A request inside the interval is not lost: it is sent when the interval is over, because the
        subscriber that asked (a new one, say) cannot decode anything until a keyframe comes.
        """
        if self.kind != "video" or self.ssrc is None:
            return False
        now = time.monotonic()
        wait = self.last_keyframe_request + KEYFRAME_REQUEST_INTERVAL - now
        if wait > 0:
            if self.deferred_request is None:
                loop = asyncio.get_running_loop()
                self.deferred_request = loop.call_later(wait, self._deferred_keyframe_request)
            return False
        if not self.peer.send_pli(self.ssrc):
            return False  # not connected yet: the publish transport asks once it is
        self.last_keyframe_request = now
        return True

    def _deferred_keyframe_request(self) -> None:
        self.deferred_request = None
        if self.consumers:
            self.request_keyframe()

    def close(self) -> None:
        if self.deferred_request is not None:
            self.deferred_request.cancel()
            self.deferred_request = None
