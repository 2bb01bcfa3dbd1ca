"""A Consumer: one Producer's track sent to one subscriber, under an SSRC and sequence of its own.

For video it forwards one simulcast layer at a time: the `target` layer (chosen by huddle.sfu.allocation
from the size the subscriber shows the video at and its bandwidth) takes over at its next keyframe, asked
for when needed; until then the current layer goes on. A StreamRewriter keeps sequence numbers, timestamps,
VP8 picture ids and TL0PICIDX continuous across layer switches and pauses, since the subscriber's SRTP replay
window, jitter buffer and decoder depend on it. Sent video packets stay in a ring buffer so that a NACK is
answered without asking the publisher.

Forwarding a packet is the SFU's innermost loop (once per packet per subscriber), so it has a compiled path:
huddle/sfu/_rewrite.c's fanout() does a publisher's packet for all its consumers in one call (Consumer.forward
line for line, reading the fields of ConsumerFields, the C base of Consumer, as a struct), and copies,
rewrites, caches, protects (with a libsrtp session of the consumer's SSRC alone) and queues each copy. It
is in use whenever the media port's compiled path is (huddle.rtc.fastpath.COMPILED); the pure-Python
StreamRewriter, Consumer.forward and send path stay the reference it is tested against, byte for byte
(tests/unit/test_fastpath.py).
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from huddle.rtc import fastpath
from huddle.rtc.rtcp import SenderReport
from huddle.rtc.transport import WebRtcTransport
from huddle.sfu.rewrite import StreamRewriter
from huddle.sfu.vp8 import Vp8Info

try:
    from huddle.sfu import _rewrite
except ImportError:  # a checkout used without `pip install -e .`: the reference path
    _rewrite = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from huddle.sfu.producer import Producer
    from huddle.sfu.router import Peer

# Packets kept per video consumer: 1.7 s of a 1.5 Mbit/s layer, ample for NACKs. Each consumer keeps its own
# rewritten copies, so this bounds memory: a 100-person call has about 1,000 video consumers.
CACHE_SIZE = 256
NTP_UNITS = 1 << 32  # an NTP timestamp's units per second
# Chosen once, like the port's path: the compiled rewriter queues into the compiled batch, so both or neither.
COMPILED = fastpath.COMPILED and _rewrite is not None
Rewriter = _rewrite.StreamRewriter if COMPILED else StreamRewriter  # type: ignore[union-attr]


if _rewrite is not None:
    # The fields read for every packet, in a C struct that the compiled fan-out reads directly.
    _Fields = _rewrite.ConsumerFields
else:

    class _Fields:  # type: ignore[no-redef]
        __slots__ = (
            "_route",
            "audible",
            "cache",
            "current",
            "max_tid",
            "octets",
            "packets",
            "ready",
            "rewriter",
            "target",
        )


class Consumer(_Fields):
    __slots__ = (
        "_transport",
        "mid",
        "producer",
        "reported",
        "retransmits",
        "source_report",
        "ssrc",
        "subscriber",
        "wanted",
    )

    def __init__(self, producer: Producer, subscriber: Peer) -> None:
        self.producer = producer
        self.subscriber = subscriber
        self.ssrc = secrets.randbits(32) or 1
        self.rewriter = Rewriter(self.ssrc)
        self.mid: str | None = None
        # Forwarding starts once the subscriber has accepted the offer that announces this SSRC.
        self.ready = False
        self.transport = None
        # The layer wanted (None: not shown, send nothing) and the one being sent (None: none yet/paused).
        # Until the subscriber says what it shows, it gets the lowest layer: cheap, and never blank.
        self.target: int | None = 0
        self.current: int | None = None
        # The layer the viewer's size and bandwidth call for; `target` is the best of it that flows.
        self.wanted: int | None = 0
        # Highest VP8 temporal layer forwarded (None: all): thumbnails get half the frame rate.
        self.max_tid: int | None = None
        # Audio: whether this subscriber hears this publisher now (one of the loudest few, see Router).
        self.audible = True
        self.packets = 0
        self.octets = 0
        self.retransmits = 0
        # The publisher's latest sender report for a layer, (layer, NTP time, RTP timestamp, when it came),
        # until the subscriber's next reports carry it on; and `packets` as of the last one sent.
        self.source_report: tuple[int, int, int, float] | None = None
        self.reported = 0
        # Sent packets by output sequence number (video only): the rewritten copy (reference path), or
        # (publisher's packet, rewritten head) from the compiled forward; `cached()` reads either.
        self.cache: list[bytearray | tuple[bytearray, bytes] | None] | None = (
            [None] * CACHE_SIZE if producer.kind == "video" else None
        )

    @property
    def transport(self) -> WebRtcTransport | None:
        """Where its packets go: a subscriber's WebRtcTransport, or whatever else takes `send_rtp` (a
        recorder's tap, say)."""
        return self._transport

    @transport.setter
    def transport(self, transport: WebRtcTransport | None) -> None:
        self._transport = transport
        # The compiled forward sends along a WebRtcTransport's route, nothing else.
        self._route = transport.route if COMPILED and isinstance(transport, WebRtcTransport) else None

    @property
    def kind(self) -> str:
        return self.producer.kind

    @property
    def cname(self) -> str:
        return self.producer.peer.participant.id

    @property
    def destination(self) -> Peer:
        return self.subscriber

    def needed_layers(self) -> tuple[int | None, ...]:
        """The layers its viewer wants, gets meanwhile and gets until the switch (dynacast keeps them on)."""
        return (self.wanted, self.target, self.current)

    def wants_layer(self, layer: int) -> bool:
        return self.ready and self.target == layer

    def set_target(self, layer: int | None) -> None:
        """Aim at another layer (None: stop sending). The switch happens at that layer's next keyframe."""
        if layer == self.target:
            return
        self.target = layer
        if layer is None:
            self.rewriter.pause()
            self.current = None
        elif layer != self.current and self.ready:
            self.producer.request_keyframe(layer)

    def forward(
        self,
        packet: bytearray,
        layer: int,
        seq: int,
        ts: int,
        payload_offset: int,
        info: Vp8Info | None,
        size: int,
        now: float,
    ) -> bool:
        """Send one packet of `layer` if this Consumer forwards it (`size`: payload octets, for SRs). The
        reference path; the compiled fanout() follows it line for line."""
        transport = self._transport
        if not self.ready or transport is None:
            return False
        if self.cache is not None:  # video
            if layer != self.current:
                if layer != self.target or info is None or not info.is_keyframe:
                    return False
                # The target layer's keyframe: switch here, so the decoder never sees a broken frame.
                self.rewriter.switch(layer)
                self.current = layer
            elif (
                info is not None
                and info.tid is not None
                and self.max_tid is not None
                and info.tid > self.max_tid
            ):
                # A frame nothing depends on below max_tid: skipped without a gap the subscriber would NACK.
                self.rewriter.drop(layer, seq, info)
                return False
        elif not self.audible:
            if not self.rewriter.paused:
                self.rewriter.pause()
            return False
        elif self.rewriter.paused:
            self.rewriter.switch(layer)  # audio: first packet, or back among the loudest
        out = bytearray(packet)
        if not self.rewriter.rewrite(
            out, payload_offset, layer, seq, ts, self.producer.clock_rate, now, info
        ):
            return False
        if self.cache is not None:
            self.cache[((out[2] << 8) | out[3]) % CACHE_SIZE] = out
        self.packets += 1
        self.octets += size
        return transport.send_rtp(out)

    def close(self) -> None:
        """Its producer or its subscriber is gone: let go of the cached packets and the transport now."""
        self.ready = False
        self.cache = None
        self.transport = None

    def retransmit(self, seqs: list[int]) -> int:
        """Answer a NACK from the cache; returns how many of the asked-for packets were re-sent."""
        if self.cache is None or self.transport is None:
            return 0
        sent = 0
        for s in seqs:
            pkt = self.cached(s)
            if pkt is not None and self.transport.send_rtp(pkt):
                sent += 1
        self.retransmits += sent
        return sent

    def cached(self, seq: int) -> bytes | bytearray | None:
        """The packet sent with output sequence number `seq`, as it was before SRTP, if still cached."""
        if self.cache is None:
            return None
        entry = self.cache[seq % CACHE_SIZE]
        if isinstance(entry, tuple):
            packet, head = entry
            entry = head + packet[len(head) :]
        if entry is None or ((entry[2] << 8) | entry[3]) != seq:
            return None
        return entry

    def on_sender_report(self, layer: int, ntp: int, rtp_ts: int, at: float) -> None:
        """Kept for the subscriber's next reports (`report`), not sent at once: a publisher's report would
        otherwise become a datagram to each of its viewers, 99 in a 100-person call. Video: the layer
        being forwarded only (a publisher reports all its layers at once). `at`: when it came (monotonic)."""
        if self.cache is None or layer == self.current:
            self.source_report = (layer, ntp, rtp_ts, at)

    def report(self, now: float) -> SenderReport | None:
        """Our sender report, from the publisher's latest, when packets went out since the last one. Moved
        on to `now` along both of its clocks, as if the publisher had sent it now: a receiver may take an
        SR's arrival for its sending (the recorder lines tracks up by that), and it came up to 1 s ago."""
        source = self.source_report
        if source is None or not self.ready or self.packets == self.reported:
            return None
        self.source_report = None
        layer, ntp, rtp_ts, at = source
        elapsed = max(0.0, now - at)
        ntp += round(elapsed * NTP_UNITS)
        rtp_ts = (rtp_ts + round(elapsed * self.producer.clock_rate)) & 0xFFFFFFFF
        report = self.sender_report(layer, ntp & 0xFFFFFFFFFFFFFFFF, rtp_ts)
        if report is not None:
            self.reported = self.packets
        return report

    def sender_report(self, layer: int, ntp: int, rtp_ts: int) -> SenderReport | None:
        """The publisher's SR for `layer`, in this Consumer's SSRC and timestamps, so that lip sync
        survives; None when another layer is being forwarded (its clock maps differently)."""
        out_ts = self.rewriter.timestamp_for(layer, rtp_ts)
        if out_ts is None:
            return None
        return SenderReport(self.ssrc, ntp, out_ts, self.packets & 0xFFFFFFFF, self.octets & 0xFFFFFFFF)
