"""A Consumer: one Producer's track sent to one subscriber, under an SSRC and sequence of its own.

Sequence numbers start at a random point and stay continuous for the Consumer's whole life, since the
subscriber's SRTP replay window and jitter buffer depend on it. Sent video packets stay in a ring buffer so
that a NACK is answered without asking the publisher.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from huddle.rtc import rtp
from huddle.rtc.rtcp import SenderReport

if TYPE_CHECKING:
    from huddle.rtc.transport import WebRtcTransport
    from huddle.sfu.producer import Producer
    from huddle.sfu.router import Peer

CACHE_SIZE = 1024  # packets; at 1,000 video packets a second, a second of history for NACKs


class Consumer:
    __slots__ = (
        "cache",
        "mid",
        "octets",
        "packets",
        "producer",
        "ready",
        "retransmits",
        "seq_offset",
        "ssrc",
        "subscriber",
        "transport",
        "ts_offset",
    )

    def __init__(self, producer: Producer, subscriber: Peer) -> None:
        self.producer = producer
        self.subscriber = subscriber
        self.ssrc = secrets.randbits(32) or 1
        self.mid: str | None = None
        # Forwarding starts once the subscriber has accepted the offer that announces this SSRC.
        self.ready = False
        self.transport: WebRtcTransport | None = None
        self.seq_offset: int | None = None
        self.ts_offset = secrets.randbits(32)
        self.packets = 0
        self.octets = 0
        self.retransmits = 0
        self.cache: list[bytearray | None] | None = [None] * CACHE_SIZE if producer.kind == "video" else None

    @property
    def kind(self) -> str:
        return self.producer.kind

    @property
    def cname(self) -> str:
        return self.producer.peer.participant.id

    def forward(self, packet: bytearray, seq: int, ts: int, keyframe: bool, size: int) -> bool:
        """Send one packet (`keyframe`: it starts a keyframe; `size`: its payload octets, for SRs)."""
        transport = self.transport
        if not self.ready or transport is None:
            return False
        if self.seq_offset is None:
            # Video starts at a keyframe: anything before it would only make the decoder fail and ask again.
            if self.cache is not None and not keyframe:
                return False
            self.seq_offset = (secrets.randbits(15) - seq) & 0xFFFF
        out = bytearray(packet)
        out_seq = (seq + self.seq_offset) & 0xFFFF
        rtp.rewrite_header(out, self.ssrc, out_seq, ts + self.ts_offset)
        if self.cache is not None:
            self.cache[out_seq % CACHE_SIZE] = out
        self.packets += 1
        self.octets += size
        return transport.send_rtp(out)

    def retransmit(self, seqs: list[int]) -> int:
        """Answer a NACK from the cache; returns how many of the asked-for packets were re-sent."""
        if self.cache is None or self.transport is None:
            return 0
        sent = 0
        for s in seqs:
            pkt = self.cache[s % CACHE_SIZE]
            if pkt is not None and ((pkt[2] << 8) | pkt[3]) == s and self.transport.send_rtp(pkt):
                sent += 1
        self.retransmits += sent
        return sent

    def sender_report(self, ntp: int, rtp_ts: int) -> SenderReport:
        """The publisher's SR, translated to this Consumer's SSRC and timestamps: lip sync survives."""
        return SenderReport(
            self.ssrc,
            ntp,
            (rtp_ts + self.ts_offset) & 0xFFFFFFFF,
            self.packets & 0xFFFFFFFF,
            self.octets & 0xFFFFFFFF,
        )
