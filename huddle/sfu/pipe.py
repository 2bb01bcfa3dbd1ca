"""A Router's end of a pipe to another node of the same call: tracks sent there once, and tracks received.

A call bigger than one node has a Router on each of its nodes. Every track crosses from the node of its
publisher to each other node of the call once, whatever the number of viewers there; each node then does its
own per-viewer work (layer choice, rewriting, NACK answers, bandwidth steps) on a Producer whose *source* is
the pipe, exactly as for a Producer whose source is a browser's transport.

Sending: a PipeConsumer per local track forwards the packets of the layers the other node asked for, each
under an SSRC of the pipe's own, and of those only the VP8 temporal layers some viewer there needs (a node
whose viewers all show a video as a thumbnail gets it at half the frame rate). A StreamRewriter per piped
layer keeps its sequence numbers, picture ids and timestamps continuous across what it skips, so the other
node sees whole streams (no holes to NACK) and its sender reports are translated like a viewer's. It keeps
recent video packets so that a NACK from the other node (a packet lost between the nodes) is answered here.

Receiving: packets on a pipe SSRC go to the Producer announced for it; a gap in a video stream is NACKed at
once, and keyframe requests and the layers wanted here go back to the sending node.

No I/O: the pipe sends through a `PipeIO` the calls layer ties to a link between the nodes (UDP datagrams
for RTP and RTCP, an ordered channel for the control messages), sealed there.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any, Protocol

from huddle.rtc import rtcp, rtp
from huddle.sfu.offer import AUDIO_LEVEL_ID, OPUS_PT, SOURCE_KINDS, VP8_PT
from huddle.sfu.producer import Producer, default_source
from huddle.sfu.rewrite import StreamRewriter
from huddle.sfu.vp8 import Vp8Info

if TYPE_CHECKING:
    from huddle.sfu.router import Peer, Router

# Recent video packets kept per piped layer for NACKs between nodes (the link is short: a few hundred ms of
# a 1.5 Mbit/s layer is plenty).
PIPE_CACHE = 256
# A gap in a piped stream larger than this is a restart or a loss burst that NACKs would not repair.
MAX_NACKED_GAP = 64
# Packets on a pipe arrive with the payload types and header extension ids every subscriber negotiated
# (the sending Producer rewrote them), so the receiving Producer keeps them as they are.
_IDENTITY_EXTENSIONS = bytes(range(16))
_IDENTITY_PTS = {OPUS_PT: OPUS_PT, VP8_PT: VP8_PT}


class PipeIO(Protocol):
    """Where a pipe's packets and messages go: the link between the two nodes (calls layer)."""

    def send_rtp(self, packet: bytes | bytearray) -> bool: ...

    def send_rtcp(self, packet: bytes) -> bool: ...

    def send(self, message: dict[str, Any]) -> None: ...


class PipeConsumer:
    """One local track sent down a pipe: the layers the other node wants, each under a pipe SSRC."""

    __slots__ = (
        "cache",
        "layers",
        "max_tid",
        "octets",
        "packets",
        "pipe",
        "producer",
        "ready",
        "rewriters",
        "ssrcs",
        "subscriber",
    )

    def __init__(self, producer: Producer, pipe: Pipe, ssrcs: list[int]) -> None:
        self.producer = producer
        self.pipe = pipe
        self.ssrcs = ssrcs
        # Audio always crosses (the other node's subscribers hear the loudest of everyone, chosen by the hub);
        # video only once the other node says which layers its viewers need.
        self.layers: frozenset[int] = frozenset({0}) if producer.kind == "audio" else frozenset()
        # The highest VP8 temporal layer a viewer there needs (None: all of them).
        self.max_tid: int | None = None
        self.rewriters = [StreamRewriter(ssrc) for ssrc in ssrcs] if producer.kind == "video" else None
        self.ready = True
        self.subscriber: Peer | None = None  # no viewer of this node: a node
        self.packets = 0
        self.octets = 0
        self.cache: list[list[bytearray | None]] | None = (
            [[None] * PIPE_CACHE for _ in ssrcs] if producer.kind == "video" else None
        )

    @property
    def kind(self) -> str:
        return self.producer.kind

    @property
    def destination(self) -> Pipe:
        return self.pipe

    def needed_layers(self) -> frozenset[int]:
        return self.layers

    def wants_layer(self, layer: int) -> bool:
        return layer in self.layers

    def set_layers(self, layers: frozenset[int], max_tid: int | None) -> None:
        started = layers - self.layers
        if self.rewriters is not None:
            for layer in self.layers - layers:
                self.rewriters[layer].pause()
            for layer in started:
                self.rewriters[layer].switch(layer)
        self.layers = layers
        self.max_tid = max_tid
        for layer in started:
            # The other node's viewers can decode nothing of a layer until its next keyframe.
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
        if layer not in self.layers:
            return False
        out = bytearray(packet)
        rewriters = self.rewriters
        if rewriters is None:  # audio: as it came, under the pipe's SSRC
            ssrc = self.ssrcs[layer]
            out[8] = ssrc >> 24
            out[9] = (ssrc >> 16) & 0xFF
            out[10] = (ssrc >> 8) & 0xFF
            out[11] = ssrc & 0xFF
        else:
            rewriter = rewriters[layer]
            max_tid = self.max_tid
            if max_tid is not None and info is not None and info.tid is not None and info.tid > max_tid:
                rewriter.drop(layer, seq, info)  # nobody there shows it at the full frame rate
                return False
            if not rewriter.rewrite(out, payload_offset, layer, seq, ts, 90000, now, info):
                return False
            self.cache[layer][((out[2] << 8) | out[3]) % PIPE_CACHE] = out  # type: ignore[index]
        self.packets += 1
        self.octets += size
        return self.pipe.send_rtp(out)

    def retransmit(self, layer: int, seqs: list[int]) -> int:
        if self.cache is None:
            return 0
        cache = self.cache[layer]
        sent = 0
        for s in seqs:
            pkt = cache[s % PIPE_CACHE]
            if pkt is not None and ((pkt[2] << 8) | pkt[3]) == s and self.pipe.send_rtp(pkt):
                sent += 1
        return sent

    def on_sender_report(self, layer: int, ntp: int, rtp_ts: int, at: float) -> None:
        """Sent down the pipe at once: the node at the other end keeps it for its own subscribers."""
        if layer not in self.layers:
            return
        if self.rewriters is not None:
            translated = self.rewriters[layer].timestamp_for(layer, rtp_ts)
            if translated is None:
                return  # nothing of this layer went down the pipe yet: no clock to map
            rtp_ts = translated
        report = rtcp.SenderReport(
            self.ssrcs[layer], ntp, rtp_ts, self.packets & 0xFFFFFFFF, self.octets & 0xFFFFFFFF
        )
        self.pipe.send_rtcp(report.serialize())

    def close(self) -> None:
        self.ready = False
        self.cache = None


class Pipe:
    """This Router's end of the pipe to node `node`: the Source of the Producers it brings, the destination
    of the PipeConsumers it takes."""

    def __init__(self, router: Router, node: str, io: PipeIO) -> None:
        self.router = router
        self.node = node
        self.io = io
        self.rtcp_ssrc = secrets.randbits(32) or 1
        # Sending: local track id -> its PipeConsumer; pipe SSRC -> (consumer, layer) for feedback.
        self.out: dict[str, PipeConsumer] = {}
        self._out_ssrcs: dict[int, tuple[PipeConsumer, int]] = {}
        self._next_ssrc = secrets.randbits(31) | 1
        # Receiving: track id -> Producer; pipe SSRC -> (producer, layer).
        self.producers: dict[str, Producer] = {}
        self._in_ssrcs: dict[int, tuple[Producer, int]] = {}
        self.packets_in = 0
        self.packets_out = 0
        self.dropped = 0
        self.closed = False

    # -- Sending -------------------------------------------------------------------------------------------

    def consume(self, producer: Producer) -> None:
        """Offer a track of this node to the other one (it asks for layers with `wants`)."""
        if producer.id in self.out or producer.source is self:
            return
        ssrcs = [self._new_ssrc() for _ in range(producer.layers)]
        consumer = PipeConsumer(producer, self, ssrcs)
        self.out[producer.id] = consumer
        for layer, ssrc in enumerate(ssrcs):
            self._out_ssrcs[ssrc] = (consumer, layer)
        producer.consumers.append(consumer)
        self.io.send(
            {
                "t": "track",
                "track": producer.id,
                "participant": producer.peer.participant.id,
                "kind": producer.kind,
                "source": producer.track_source,
                "rids": producer.rids,
                "ssrcs": ssrcs,
            }
        )

    def consumer_removed(self, consumer: PipeConsumer) -> None:
        """Its track ended here: the other node drops its Producer."""
        if self.out.get(consumer.producer.id) is consumer:
            del self.out[consumer.producer.id]
            for ssrc in consumer.ssrcs:
                self._out_ssrcs.pop(ssrc, None)
            if not self.closed:
                self.io.send({"t": "untrack", "track": consumer.producer.id})

    def _new_ssrc(self) -> int:
        ssrc = self._next_ssrc
        self._next_ssrc = (self._next_ssrc + 1) & 0xFFFFFFFF or 1
        return ssrc

    def send_rtp(self, packet: bytearray) -> bool:
        if self.io.send_rtp(packet):
            self.packets_out += 1
            self.router.counts["pipe_out"] += 1
            return True
        return False

    def send_rtcp(self, packet: bytes) -> bool:
        return self.io.send_rtcp(packet)

    # -- Source of the Producers it brings ------------------------------------------------------------------

    def send_pli(self, ssrc: int) -> bool:
        return self.io.send_rtcp(rtcp.Pli(self.rtcp_ssrc, ssrc).serialize())

    def set_layers(self, producer: Producer, layers: frozenset[int], max_tid: int | None) -> None:
        self.io.send({"t": "wants", "track": producer.id, "layers": sorted(layers), "tid": max_tid})

    def forget(self, producer: Producer) -> None:
        if self.producers.get(producer.id) is producer:
            del self.producers[producer.id]
        for ssrc in producer.ssrcs:
            if ssrc is not None:
                self._in_ssrcs.pop(ssrc, None)

    # -- From the other node --------------------------------------------------------------------------------

    def on_rtp(self, data: bytes) -> None:
        found = self._in_ssrcs.get(rtp.ssrc(data))
        if found is None:
            self.dropped += 1  # a track already dropped here, or packets ahead of its announcement
            return
        producer, layer = found
        self.packets_in += 1
        self.router.counts["pipe_in"] += 1
        seq = (data[2] << 8) | data[3]
        stats = producer.stats[layer]
        if producer.kind == "video" and stats.base is not None:
            gap = (seq - stats.highest) & 0xFFFF
            if 1 < gap <= MAX_NACKED_GAP:
                missing = [(stats.highest + i) & 0xFFFF for i in range(1, gap)]
                nack = rtcp.GenericNack.from_seqs(self.rtcp_ssrc, producer.ssrcs[layer] or 0, missing)
                self.io.send_rtcp(nack.serialize())
        elif producer.track_source == "microphone":
            level = rtp.extension(data, AUDIO_LEVEL_ID) if data[0] & 0x10 else None
            if level:
                self.router.speaker.update(
                    producer.peer.participant.id, level[0] & 0x7F, bool(level[0] & 0x80), time.monotonic()
                )
        self.router.forward(producer, data, layer)

    def on_rtcp(self, data: bytes) -> None:
        try:
            packets = rtcp.parse_compound(data)
        except rtcp.RtcpError:
            self.dropped += 1
            return
        for packet in packets:
            if isinstance(packet, rtcp.SenderReport):
                found = self._in_ssrcs.get(packet.ssrc)
                if found is not None:
                    found[0].on_sender_report(
                        found[1], packet.ntp_timestamp, packet.rtp_timestamp, time.monotonic()
                    )
            elif isinstance(packet, rtcp.Pli):
                sent = self._out_ssrcs.get(packet.media_ssrc)
                if sent is not None:
                    sent[0].producer.request_keyframe(sent[1])
            elif isinstance(packet, rtcp.GenericNack):
                sent = self._out_ssrcs.get(packet.media_ssrc)
                if sent is not None:
                    self.router.counts["retransmits"] += sent[0].retransmit(sent[1], packet.lost)

    def on_message(self, message: dict[str, Any]) -> None:
        """A control message of the SFU's from the other node (`track`, `untrack`, `wants`, `speaker`);
        raises ValueError (KeyError, TypeError) on one that makes no sense."""
        kind = message["t"]
        if kind == "track":
            self._add_track(message)
        elif kind == "untrack":
            producer = self.producers.get(str(message["track"]))
            if producer is not None:
                self.router.drop_producer(producer)
        elif kind == "wants":
            consumer = self.out.get(str(message["track"]))
            if consumer is not None:
                layers = frozenset(int(x) for x in message["layers"])
                if any(not 0 <= layer < consumer.producer.layers for layer in layers):
                    raise ValueError("a layer this track does not have")
                tid = message.get("tid")
                consumer.set_layers(layers, None if tid is None else max(0, int(tid)))
                self.router.dynacast_soon()
        elif kind == "speaker":
            self.router.follow_speaker(self, message)
        else:
            raise ValueError(f"unknown pipe message {kind!r}")

    def _add_track(self, message: dict[str, Any]) -> None:
        track = str(message["track"])
        peer = self.router.peers.get(str(message["participant"]))
        if peer is None or peer.pipe is not self or track in self.producers:
            raise ValueError(f"track {track} of a participant not announced on this pipe")
        kind = str(message["kind"])
        rids = [str(r) for r in message["rids"]]
        ssrcs = [int(s) for s in message["ssrcs"]]
        if kind not in ("audio", "video") or len(ssrcs) != max(1, len(rids)) or len(ssrcs) > 3:
            raise ValueError(f"track {track}: bad kind or layers")
        # Absent from a node that predates screen sharing: its tracks are cameras and microphones.
        source = str(message.get("source") or default_source(kind))
        if SOURCE_KINDS.get(source) != kind:
            raise ValueError(f"track {track}: a {kind} track cannot be a {source[:20]!r}")
        mid = track.partition(":")[2]
        producer = Producer(
            peer, kind, mid, _IDENTITY_PTS, _IDENTITY_EXTENSIONS, rids, source=self, track_source=source
        )
        if producer.id != track:
            raise ValueError(f"track {track} does not belong to its participant")
        for layer, ssrc in enumerate(ssrcs):
            if ssrc in self._in_ssrcs:
                raise ValueError(f"track {track}: SSRC {ssrc} in use")
            producer.add_ssrc(ssrc, layer)
            self._in_ssrcs[ssrc] = (producer, layer)
        self.producers[track] = producer
        self.router.add_producer(peer, producer)

    def describe(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "out_layers": {tid: sorted(c.layers) for tid, c in self.out.items() if c.kind == "video"},
            "out_max_tid": {tid: c.max_tid for tid, c in self.out.items() if c.kind == "video"},
            "out_track_packets": {tid: c.packets for tid, c in self.out.items()},
            "in_tracks": len(self.producers),
            "out_packets": self.packets_out,
            "in_packets": self.packets_in,
            # Packets from the other node that fit no track here (ended, or ahead of its announcement) or
            # RTCP that did not parse.
            "in_dropped": self.dropped,
        }

    def close(self) -> None:
        """The link is gone: the other node's tracks end here, this node's stop going there."""
        self.closed = True
        for consumer in list(self.out.values()):
            if consumer in consumer.producer.consumers:
                consumer.producer.consumers.remove(consumer)
            consumer.close()
        self.out.clear()
        self._out_ssrcs.clear()
        for producer in list(self.producers.values()):
            self.router.drop_producer(producer)
