"""The SFU: a Router per call, a Peer per participant with its two transports, Producers and Consumers.

Each participant has a `publish` transport (it offers, we answer; it sends its tracks) and a `subscribe`
transport (we offer, it answers; we send everyone else's tracks), as docs/protocol.md describes. Media is
never decoded: RTP is decrypted once, rewritten in place and encrypted once per subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from huddle import outgoing
from huddle.logs import event
from huddle.rtc import rtcp, rtp, sdp
from huddle.rtc.certificate import Certificate
from huddle.rtc.port import MediaPort
from huddle.rtc.transport import WebRtcTransport
from huddle.sfu import offer
from huddle.sfu.allocation import CONGESTION_LOSS, Budget, Request, allocate, rungs
from huddle.sfu.consumer import Consumer
from huddle.sfu.members import Call, Member
from huddle.sfu.pipe import Pipe, PipeIO
from huddle.sfu.producer import UNUSED_EXTENSION_ID, Producer, default_source, order_rids
from huddle.sfu.speaker import SpeakerDetector, SpeakerFollower

log = logging.getLogger("huddle.sfu")

THUMBNAIL_WIDTH = 360  # device pixels: a video shown this small gets half the frame rate
LOUDEST = 3  # audio streams each subscriber gets, besides anyone who just began to speak
TICK = 0.1  # transport-wide feedback cadence (Chromium's own receive side sends it about this often)
REPORT_EVERY = 10  # ticks between receiver reports and consent checks
# RTCP octets per compound packet of sender reports (36 of them), so that SRTCP's additions keep it under
# the ~1,200 bytes a browser's path is sure to carry.
REPORTS_SIZE = 1_008
COUNTS = (
    "rtp_in",
    "rtp_out",
    "bytes_in",
    "bytes_out",
    "nacks_in",
    "retransmits",
    "plis_out",
    "pipe_in",
    "pipe_out",
)
PUBLISH_EXTENSIONS = (sdp.URI_MID, sdp.URI_ABS_SEND_TIME, sdp.URI_AUDIO_LEVEL, sdp.URI_TRANSPORT_CC)
# Seconds of batched work (offers, allocations) one loop turn may take before the rest waits for the next
# turn: one publisher's new tracks in a large room mean an offer for every subscriber, and every other call
# on the node shares this loop.
TURN_BUDGET = 0.005


class _Batch:
    """Keys gathered during one loop turn and handed to `run` one by one from the next one on, for at most
    TURN_BUDGET per turn; `done` runs once none is left."""

    def __init__(self, run: Callable[[str], None], done: Callable[[], None] | None = None) -> None:
        self._run = run
        self._done = done
        self._keys: set[str] = set()
        self._scheduled = False

    def add(self, key: str) -> None:
        self._keys.add(key)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def discard(self, key: str) -> None:
        self._keys.discard(key)

    def _flush(self) -> None:
        self._scheduled = False
        deadline = time.perf_counter() + TURN_BUDGET
        while self._keys:
            self._run(self._keys.pop())
            if self._keys and time.perf_counter() >= deadline:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
                return
        if self._done is not None:
            self._done()


class Sfu:
    """What all Routers of a node share: the media port, the DTLS certificate, the timers and the totals."""

    def __init__(self, port: MediaPort, certificate: Certificate, candidates: list[sdp.Candidate]) -> None:
        self.port = port
        self.certificate = certificate
        self.candidates = candidates
        self.routers: set[Router] = set()
        # Counts of the Routers that are gone; live ones keep their own (Router.counts).
        self.retired = dict.fromkeys(COUNTS, 0)
        self._task: asyncio.Task[None] | None = None

    def router(self, room: Call, on_timeout: Callable[[str, str], None]) -> Router:
        router = Router(self, room, on_timeout)
        self.routers.add(router)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._tick())
        return router

    def sfu_totals(self) -> dict[str, int]:
        totals = dict(self.retired)
        for router in self.routers:
            for key, value in router.counts.items():
                totals[key] += value
        totals["producers"] = sum(len(p.producers) for r in self.routers for p in r.peers.values())
        totals["consumers"] = sum(len(p.consumers) for r in self.routers for p in r.peers.values())
        totals["transports"] = self.port.counts()["transports"]
        totals["pipe_layers"] = sum(
            len(c.layers)
            for r in self.routers
            for p in r.pipes.values()
            for c in p.out.values()
            if c.kind == "video"
        )
        return totals

    async def _tick(self) -> None:
        count = 0
        while True:
            await asyncio.sleep(TICK)
            count += 1
            now = time.monotonic()
            for router in list(self.routers):
                try:
                    router.tick(now, count)
                except Exception:  # one call's bug must not stop the others' feedback
                    log.exception("router tick failed", extra={"fields": {"room": router.room.name}})

    async def close(self) -> None:
        for router in list(self.routers):
            router.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class Sink(Protocol):
    """A subscriber inside this process (the recorder): it receives each Consumer's rewritten RTP and the
    translated sender reports as plain packets, with no ICE, DTLS or SRTP, through the same Consumers as a
    browser, so recording costs the publishers nothing extra."""

    def transport_for(self, consumer: Consumer) -> LocalTransport: ...

    def takes(self, producer: Producer) -> bool:
        """Whether it subscribes to this track at all."""
        ...

    def consumer_removed(self, consumer: Consumer) -> None: ...

    def active_speaker(self, participant_id: str | None) -> None: ...


class LocalTransport(Protocol):
    """What a Consumer sends through when its subscriber is a Sink."""

    def send_rtp(self, packet: bytes | bytearray) -> bool: ...

    def send_rtcp(self, packet: bytes) -> bool: ...


class Peer:
    """One participant's side of the SFU (or, with a `sink`, an in-process subscriber). A participant on
    another node of the call has a Peer too, with the `pipe` from there as the source of its tracks: it
    subscribes on its own node, so it has no consumers here."""

    def __init__(
        self, router: Router, participant: Member, sink: Sink | None = None, pipe: Pipe | None = None
    ) -> None:
        self.router = router
        self.participant = participant
        self.sink = sink
        self.pipe = pipe
        self.publish: WebRtcTransport | None = None
        self.subscribe: WebRtcTransport | None = None
        self.producers: dict[str, Producer] = {}  # by mid
        self.by_ssrc: dict[int, Producer] = {}
        self.rtx_ssrcs: set[int] = set()
        self.consumers: dict[str, Consumer] = {}  # by producer id
        self.sections: list[offer.Section] = []
        self.revision = 0
        self.awaiting: int | None = None
        self.offered: dict[str, Consumer] = {}  # mid → consumer, as in the offer awaiting its answer
        self.dirty = False
        self.publish_ufrag: str | None = None
        self.rtcp_ssrc = secrets.randbits(32) or 1
        self.slot = 0  # which tick of REPORT_EVERY does its once-a-second work (Router.add_peer)
        self.mid_ext: int | None = None
        self.rid_ext: int | None = None
        self.rrid_ext: int | None = None
        self.audio_level_ext: int | None = None
        self.twcc_ext: int | None = None
        # What this participant shows: participant id → (width, height) in device pixels; None until its
        # first video_sizes (then everyone's lowest layer). And its downlink estimate from REMB, in bit/s.
        self.sizes: dict[str, tuple[int, int]] | None = None
        self.estimate: float | None = None
        # What we send it (video payload bit/s, smoothed), and what its layers may use.
        self.sent_rate = 0.0
        self._sent_octets = 0
        self.budget = Budget()
        self.loss = 0.0  # fraction of our packets its last receiver report says were lost
        self.twcc: list[tuple[int, int]] = []
        self.twcc_count = 0
        self.session_id = secrets.randbits(62)
        self.restart_subscribe = False

    # -- Publishing -----------------------------------------------------------------------------------------

    def on_rtp(self, transport: WebRtcTransport, data: bytes) -> None:
        counts = self.router.counts
        counts["rtp_in"] += 1
        counts["bytes_in"] += len(data)
        ssrc = rtp.ssrc(data)
        producer = self.by_ssrc.get(ssrc)
        if self.twcc_ext is not None:
            value = rtp.extension(data, self.twcc_ext)
            if value is not None and len(value) == 2:
                self.twcc.append(((value[0] << 8) | value[1], self.router.sfu.port.arrival_us))
        if producer is None:
            producer = self._learn_ssrc(data, ssrc)
            if producer is None:
                self.router.sfu.port.drop("rtx_probe" if ssrc in self.rtx_ssrcs else "unknown_ssrc")
                return
        # The microphone alone says who speaks: a shared tab playing a video must not take the stage.
        if producer.track_source == "microphone" and self.audio_level_ext is not None:
            level = rtp.extension(data, self.audio_level_ext)
            if level is not None and len(level) >= 1:
                self.router.speaker.update(
                    self.participant.id, level[0] & 0x7F, bool(level[0] & 0x80), time.monotonic()
                )
        self.router.forward(producer, data, producer.layer_of[ssrc])

    def _learn_ssrc(self, data: bytes, ssrc: int) -> Producer | None:
        """Browsers that put no SSRC in their SDP (simulcast by rid) name the m-section and the layer in the
        MID and RID extensions of a stream's first packets; retransmission streams carry repaired-RID."""
        if self.mid_ext is None:
            return None
        try:
            mid = rtp.extension(data, self.mid_ext)
            rid = rtp.extension(data, self.rid_ext) if self.rid_ext is not None else None
            repaired = rtp.extension(data, self.rrid_ext) if self.rrid_ext is not None else None
        except rtp.RtpError:
            return None
        if mid is None:
            return None
        producer = self.producers.get(rtp.sdes_string(mid))
        if producer is None:
            return None
        if repaired is not None:
            # RTX of a layer: we never NACK publishers (subscribers' NACKs are answered from our cache), so
            # these carry only bandwidth probes. Remember them, so as not to look again.
            self.rtx_ssrcs.add(ssrc)
            return None
        layer = 0 if rid is None else producer.layer_for_rid(rtp.sdes_string(rid))
        if layer is None or producer.ssrcs[layer] is not None:
            return None
        producer.add_ssrc(ssrc, layer)
        self.by_ssrc[ssrc] = producer
        if any(c.wants_layer(layer) for c in producer.consumers):
            producer.request_keyframe(layer)
        return producer

    def on_publish_rtcp(self, transport: WebRtcTransport, data: bytes) -> None:
        try:
            packets = rtcp.parse_compound(data)
        except rtcp.RtcpError:
            self.router.sfu.port.drop("bad_rtcp")
            return
        for packet in packets:
            if isinstance(packet, rtcp.SenderReport):
                producer = self.by_ssrc.get(packet.ssrc)
                if producer is not None:
                    producer.on_sender_report(
                        producer.layer_of[packet.ssrc],
                        packet.ntp_timestamp,
                        packet.rtp_timestamp,
                        time.monotonic(),
                    )

    # -- As the source of its Producers (see producer.Source) -----------------------------------------------

    def send_pli(self, media_ssrc: int) -> bool:
        if self.publish is None or not self.publish.connected:
            return False
        self.router.counts["plis_out"] += 1
        return self.publish.send_rtcp(rtcp.Pli(self.rtcp_ssrc, media_ssrc).serialize())

    def set_layers(self, producer: Producer, layers: frozenset[int], max_tid: int | None) -> None:
        """Dynacast: the publisher pauses the simulcast layers nobody needs (without simulcast it sends its
        one layer regardless; a browser cannot be told to drop temporal layers)."""
        if len(producer.rids) < 2 or (producer.needed is not None and producer.needed[0] == layers):
            return
        active = [rid for i, rid in enumerate(producer.rids) if i in layers]
        self.participant.outbox.send(outgoing.publisher_layers(active))
        event(log, logging.DEBUG, "dynacast", participant=self.participant.id, active=active)

    def forget(self, producer: Producer) -> None:
        for ssrc in producer.ssrcs:
            if ssrc is not None and self.by_ssrc.get(ssrc) is producer:
                del self.by_ssrc[ssrc]

    # -- As a destination of Consumers ---------------------------------------------------------------------

    def consumer_removed(self, consumer: Consumer) -> None:
        """The track `consumer` carried here ended."""
        self.consumers.pop(consumer.producer.id, None)
        if self.sink is not None:
            self.sink.consumer_removed(consumer)
        else:
            self.router._renegotiate(self)

    # -- Subscribing ----------------------------------------------------------------------------------------

    def on_subscribe_rtcp(self, transport: WebRtcTransport, data: bytes) -> None:
        try:
            packets = rtcp.parse_compound(data)
        except rtcp.RtcpError:
            self.router.sfu.port.drop("bad_rtcp")
            return
        for packet in packets:
            if isinstance(packet, rtcp.GenericNack):
                consumer = self._consumer_by_ssrc(packet.media_ssrc)
                if consumer is not None:
                    lost = packet.lost
                    self.router.counts["nacks_in"] += len(lost)
                    self.router.counts["retransmits"] += consumer.retransmit(lost)
            elif isinstance(packet, rtcp.Pli):
                consumer = self._consumer_by_ssrc(packet.media_ssrc)
                if consumer is not None and consumer.current is not None:
                    consumer.producer.request_keyframe(consumer.current)
            elif isinstance(packet, rtcp.Fir):
                for target, _ in packet.entries:
                    consumer = self._consumer_by_ssrc(target)
                    if consumer is not None:
                        consumer.producer.request_keyframe(consumer.current)
            elif isinstance(packet, rtcp.ReceiverReport | rtcp.SenderReport):
                # Loss on the way to this subscriber, the surest sign that its downlink is full.
                video = {c.ssrc for c in self.consumers.values() if c.kind == "video"}
                losses = [b.fraction_lost / 256 for b in packet.reports if b.ssrc in video]
                if losses:
                    self.loss = max(losses)
                    if self.loss > CONGESTION_LOSS:
                        self.router.reallocate(self)
            elif isinstance(packet, rtcp.Remb):
                # The subscriber's own estimate of its downlink, from our abs-send-time on its packets.
                self.estimate = float(packet.bitrate)

    def _consumer_by_ssrc(self, ssrc: int) -> Consumer | None:
        for consumer in self.consumers.values():
            if consumer.ssrc == ssrc:
                return consumer
        return None

    def _on_publish_connected(self, transport: WebRtcTransport) -> None:
        # Subscribers that became ready before this transport was up asked for keyframes in vain.
        for producer in self.producers.values():
            for layer in range(producer.layers):
                if any(c.wants_layer(layer) for c in producer.consumers):
                    producer.request_keyframe(layer)

    def _on_subscribe_connected(self, transport: WebRtcTransport) -> None:
        for consumer in self.consumers.values():
            if consumer.ready and consumer.target is not None:
                consumer.producer.request_keyframe(consumer.target)

    # -- Periodic -------------------------------------------------------------------------------------------

    def tick(self, now: float, full: bool) -> None:
        publish = self.publish
        if publish is not None and publish.connected:
            if self.twcc:
                self._send_twcc(publish)
            if full:
                blocks = [
                    b
                    for p in self.producers.values()
                    for layer, ssrc in enumerate(p.ssrcs)
                    if ssrc is not None
                    for b in [p.stats[layer].report(ssrc, now)]
                    if b is not None
                ]
                if blocks:
                    publish.send_rtcp(rtcp.ReceiverReport(self.rtcp_ssrc, blocks[:31]).serialize())
        if full:
            self._send_sender_reports(now)

    def _send_sender_reports(self, now: float) -> None:
        """Our sender reports for what we forward it, from its publishers' latest, once a second: as few
        compound packets as hold them (a recorder's, one per track), not a datagram per publisher's report."""
        transport: WebRtcTransport | LocalTransport | None = None
        chunk = bytearray()
        for consumer in self.consumers.values():
            report = consumer.report(now)
            if report is None:
                continue
            data = report.serialize()
            if consumer.transport is not transport or len(chunk) + len(data) > REPORTS_SIZE:
                if transport is not None and chunk:
                    transport.send_rtcp(bytes(chunk))
                transport, chunk = consumer.transport, bytearray()
            chunk += data
        if transport is not None and chunk:
            transport.send_rtcp(bytes(chunk))

    def _send_twcc(self, transport: WebRtcTransport) -> None:
        arrivals, self.twcc = self.twcc, []
        media_ssrc = next((p.ssrc for p in self.producers.values() if p.ssrc is not None), 0)
        try:
            feedback = rtcp.TransportCC.from_arrivals(self.rtcp_ssrc, media_ssrc, self.twcc_count, arrivals)
        except rtcp.RtcpError:
            return  # a gap too large to describe: the next batch starts afresh
        self.twcc_count += 1
        # On its own, not in a compound packet: Chromium mishandled it inside one.
        transport.send_rtcp(feedback.serialize())

    def consent_expired(self, now: float) -> bool:
        return any(t is not None and t.consent_expired(now) for t in (self.publish, self.subscribe))

    def close(self) -> None:
        for transport in (self.publish, self.subscribe):
            if transport is not None:
                transport.close()
        # Producers, Consumers and transports point back at their Peer: cutting the ties frees a departed
        # participant's state (packet caches included) at once instead of at the next full collection, which
        # a busy node runs rarely (RSS grew 1.3 MB per departure in `make soak` before this).
        self.publish = self.subscribe = None
        for consumer in self.consumers.values():
            consumer.close()
        self.consumers.clear()
        self.producers.clear()
        self.by_ssrc.clear()
        self.sections.clear()
        self.offered.clear()


class Router:
    """One call on this node: who publishes what, and who receives it."""

    def __init__(self, sfu: Sfu, room: Call, on_timeout: Callable[[str, str], None]) -> None:
        self.sfu = sfu
        self.room = room
        self.on_timeout = on_timeout
        self.peers: dict[str, Peer] = {}
        self.counts = dict.fromkeys(COUNTS, 0)
        self.speaker = SpeakerDetector(loudest=LOUDEST)
        self._audio_key: object = None  # what the audio selection was last computed from
        self._allocations = _Batch(self._apply_allocation, self._dynacast)
        self._offers = _Batch(self._send_offer)
        # Pipes to the other nodes of this call, by node id (sfu/pipe.py); with them, whether this node
        # decides the speaker (the hub, or a call on one node) or follows the hub's decision.
        self.pipes: dict[str, Pipe] = {}
        self._speaker_pipe: Pipe | None = None
        self._speaker_sent: object = None
        self._dynacast_scheduled = False
        self.closed = False
        # Each peer does its once-a-second work (reports, rates, allocation, consent) at its own one of the
        # REPORT_EVERY ticks: done for everyone at once, it holds up every packet behind it in a large call.
        self._next_slot = 0

    # -- Membership (called by calls.registry) --------------------------------------------------------------

    def add_peer(self, participant: Member, sink: Sink | None = None, pipe: Pipe | None = None) -> None:
        """A participant of this node (or the recorder, a `sink`), or one of the node at the other end of
        `pipe`, whose tracks come from there."""
        if participant.id in self.peers:
            return
        peer = self.peers[participant.id] = Peer(self, participant, sink, pipe)
        peer.slot = self._next_slot
        self._next_slot = (self._next_slot + 1) % REPORT_EVERY
        for other in self.peers.values():
            if other is not peer:
                for producer in other.producers.values():
                    self._consume(producer, peer)

    def remove_peer(self, participant: Member) -> None:
        peer = self.peers.pop(participant.id, None)
        if peer is None:
            return
        for producer in list(peer.producers.values()):
            self.drop_producer(producer)
        for consumer in list(peer.consumers.values()):
            consumer.producer.consumers.remove(consumer)
            if peer.sink is not None:
                peer.sink.consumer_removed(consumer)
        peer.close()
        self._offers.discard(participant.id)
        self._allocations.discard(participant.id)
        self.speaker.remove(participant.id)

    def restart_ice(self, participant: Member) -> None:
        """The participant came back after losing its network: its next subscribe offer restarts ICE."""
        peer = self.peers.get(participant.id)
        if peer is None:
            return
        # An offer sent while the signaling was down is lost: forget it and send a fresh one.
        peer.awaiting = None
        peer.dirty = False
        peer.restart_subscribe = peer.subscribe is not None
        self._renegotiate(peer)

    # -- What each subscriber gets -------------------------------------------------------------------------

    def set_video_sizes(self, participant: Member, sizes: dict[str, list[int]]) -> None:
        peer = self.peers.get(participant.id)
        if peer is None:
            return
        peer.sizes = {pid: (size[0], size[1]) for pid, size in sizes.items()}
        self.reallocate(peer)

    def reallocate(self, peer: Peer) -> None:
        """Choose `peer`'s layers again, soon (several changes in one loop turn become one pass)."""
        self._allocations.add(peer.participant.id)

    def _apply_allocation(self, pid: str) -> None:
        peer = self.peers.get(pid)
        if peer is not None:
            self._allocate(peer)

    def _allocate(self, peer: Peer) -> None:
        requests: list[Request] = []
        for consumer in peer.consumers.values():
            if consumer.kind != "video":
                continue
            producer = consumer.producer
            if peer.sink is not None:
                width, height = 1280, 720  # a recording keeps the best layer of every video
            elif peer.sizes is None:
                width, height = 320, 180  # not told yet: thumbnails for all
            else:
                width, height = peer.sizes.get(producer.stream_id, (0, 0))
            # Every layer the publisher declared counts, sent or paused: dynacast turns on what is wanted.
            bitrates = [int(b) for b in producer.bitrates]
            requests.append(Request(consumer, width, height, producer.widths, bitrates))
        now = time.monotonic()
        chosen = allocate(requests, self._budget(peer, requests, now))
        for request in requests:
            consumer = request.key
            assert isinstance(consumer, Consumer)
            consumer.wanted = chosen[consumer]
            consumer.set_target(_flowing(consumer.producer, consumer.wanted, now))
            # A thumbnail moves little and is looked at less: half the frame rate (VP8 temporal layers
            # 0 and 1 of 0-2) saves a third of its packets.
            # Only when the subscriber said what it shows: one that never does is not showing thumbnails.
            thumbnail = peer.sizes is not None and 0 < request.width <= THUMBNAIL_WIDTH
            consumer.max_tid = 1 if thumbnail else None

    def _budget(self, peer: Peer, requests: list[Request], now: float) -> float | None:
        """The bit rate `peer`'s layers may use, from the loss in its latest receiver report (see Budget)."""
        before = peer.budget.level
        budget = peer.budget.update(now, peer.sent_rate, peer.estimate, peer.loss, rungs(requests))
        if peer.budget.level != before:
            # Why a viewer's layers went down or came back: one line per step, at most every few seconds.
            event(
                log,
                logging.DEBUG,
                "downlink budget",
                participant=peer.participant.id,
                rungs=peer.budget.level,
                rate=budget,
                loss=round(peer.loss, 3),
                sent=round(peer.sent_rate),
                estimate=peer.estimate,
            )
        peer.loss = 0.0  # acted on; the next report says whether the new layers fit
        return budget

    def _measure(self, peer: Peer, interval: float) -> None:
        octets = sum(c.octets for c in peer.consumers.values() if c.kind == "video")
        sample = max(0, octets - peer._sent_octets) * 8 / interval
        peer._sent_octets = octets
        peer.sent_rate = sample if peer.sent_rate == 0 else peer.sent_rate + 0.5 * (sample - peer.sent_rate)

    def layer_started(self, producer: Producer) -> None:
        """Choose again, at once, for everyone who watches `producer`: a layer they may want just began."""
        for subscriber in {c.subscriber for c in producer.consumers}:
            if subscriber is not None:  # a pipe: the other node's own Producer sees the layer start
                self._allocate(subscriber)

    def _dynacast(self) -> None:
        """Tell the source of each video (its publisher, or the pipe it comes through) which of its layers
        someone here needs, when that changes: viewers of this node and the nodes this one pipes it to."""
        self._dynacast_scheduled = False
        for peer in self.peers.values():
            for producer in peer.producers.values():
                if producer.kind != "video":
                    continue
                # What viewers want (even a layer the publisher has stopped sending for lack of bandwidth: it
                # comes back when it can), what they get meanwhile, and what they get until the switch.
                layers = frozenset(
                    layer
                    for c in producer.consumers
                    for layer in c.needed_layers()
                    if layer is not None and layer < producer.layers
                )
                # The highest temporal layer anyone watching needs (a pipe takes only that much from here).
                tids = [
                    c.max_tid for c in producer.consumers if any(x is not None for x in c.needed_layers())
                ]
                max_tid = None if not tids or None in tids else max(t for t in tids if t is not None)
                if (layers, max_tid) != producer.needed:
                    producer.source.set_layers(producer, layers, max_tid)
                    producer.needed = (layers, max_tid)

    def dynacast_soon(self) -> None:
        """What another node needs changed: tell the sources at the end of this loop turn."""
        if not self._dynacast_scheduled:
            self._dynacast_scheduled = True
            asyncio.get_running_loop().call_soon(self._dynacast)

    def _select_audio(self) -> None:
        """Each subscriber hears the LOUDEST others by score (filled up with quiet ones, so small calls
        lose nothing), plus whoever just began to speak."""
        detector = self.speaker
        speakers = [p for p in self.peers.values() if any(pr.kind == "audio" for pr in p.producers.values())]
        speakers.sort(key=lambda p: (-round(detector.score(p.participant.id)), p.participant.joined_at))
        top = [p.participant.id for p in speakers[: LOUDEST + 1]]
        key = (tuple(top), detector.audible)
        if key == self._audio_key:
            return
        self._audio_key = key
        for peer in self.peers.values():
            own = peer.participant.id
            hears = set([pid for pid in top if pid != own][:LOUDEST]) | (detector.audible - {own})
            for consumer in peer.consumers.values():
                if consumer.kind == "audio":
                    # A recording keeps everyone's audio: its mix and its per-track files need all of it.
                    # A shared screen's sound is for everyone, like its picture.
                    producer = consumer.producer
                    consumer.audible = (
                        peer.sink is not None
                        or producer.track_source == "screen_audio"
                        or producer.peer.participant.id in hears
                    )

    # -- Negotiation (called by signaling) ------------------------------------------------------------------

    def on_publish_offer(
        self, participant: Member, text: str, sources: Mapping[str, str] | None = None
    ) -> str:
        """Answer a publish offer. `sources` names the sections (by mid) that carry a screen share ("screen",
        "screen_audio"); the others are the camera and the microphone."""
        sources = sources or {}
        peer = self.peers.get(participant.id)
        if peer is None:  # an offer that crossed its sender's departure
            raise sdp.SdpError("you are no longer in this call")
        # Limits first: a refused offer changes nothing and builds nothing.
        desc = sdp.parse(text, max_media=offer.MAX_PUBLISH_SECTIONS)
        offer.check_publish_offer(desc)
        offer.check_sources(desc, sources)
        media = next((m for m in desc.media if not m.rejected and m.kind in ("audio", "video")), None)
        if media is None:
            raise sdp.SdpError("the offer has no audio or video m-section")
        ufrag, _ = desc.ice_credentials(media)
        fingerprints = [f for f in desc.fingerprints_for(media) if f.algorithm.lower() == "sha-256"]
        if not fingerprints:
            raise sdp.SdpError("the offer has no sha-256 DTLS fingerprint")
        if peer.publish is None:
            peer.publish = WebRtcTransport(
                self.sfu.port,
                self.sfu.certificate,
                label=f"{participant.id}/publish",
                on_rtp=peer.on_rtp,
                on_rtcp=peer.on_publish_rtcp,
                on_connected=peer._on_publish_connected,
            )
        elif ufrag != peer.publish_ufrag:
            peer.publish.restart_ice()  # the browser restarts ICE: the answer needs new credentials too
        peer.publish_ufrag = ufrag
        peer.publish.set_remote(ufrag, fingerprints[0].value)
        answer = sdp.build_answer(
            desc,
            ice_ufrag=peer.publish.ice.ufrag,
            ice_pwd=peer.publish.ice.pwd,
            fingerprint_sha256=self.sfu.certificate.fingerprint_sha256,
            candidates=self.sfu.candidates,
            supported_extensions=PUBLISH_EXTENSIONS,
            session_id=peer.session_id,
        )
        self._update_producers(peer, desc, answer, sources)
        return sdp.serialize(answer)

    def _update_producers(
        self,
        peer: Peer,
        offer_desc: sdp.SessionDescription,
        answer: sdp.SessionDescription,
        sources: Mapping[str, str],
    ) -> None:
        extmap = sdp.bundle_extmap(answer)
        ids = {uri: ext_id for ext_id, uri in extmap.items()}
        peer.mid_ext = ids.get(sdp.URI_MID)
        peer.rid_ext = ids.get(sdp.URI_RID)
        peer.rrid_ext = ids.get(sdp.URI_REPAIRED_RID)
        peer.audio_level_ext = ids.get(sdp.URI_AUDIO_LEVEL)
        peer.twcc_ext = ids.get(sdp.URI_TRANSPORT_CC)
        table = bytearray([UNUSED_EXTENSION_ID] * 16)
        for ext_id, uri in extmap.items():
            if uri in offer.SUBSCRIBER_EXT:
                table[ext_id] = offer.SUBSCRIBER_EXT[uri]
        sending: set[str] = set()
        for media in answer.media:
            if media.rejected or media.mid is None or media.direction not in ("recvonly", "sendrecv"):
                continue
            if not self._may_publish(peer):
                continue
            pt_map = {
                c.pt: offer.SUBSCRIBER_PT[c.name.lower()]
                for c in media.codecs
                if c.name.lower() in offer.SUBSCRIBER_PT
            }
            if not pt_map:
                continue
            sending.add(media.mid)
            producer = peer.producers.get(media.mid)
            rids = order_rids([r.id for r in media.rids if r.direction == "recv"])
            source = sources.get(media.mid) or default_source(media.kind)
            if (
                producer is None
                or producer.kind != media.kind
                or producer.rids != rids
                or producer.track_source != source
            ):
                # A section that now carries something else is a new track for subscribers (another
                # stream id): the old one ends.
                if producer is not None:
                    self.drop_producer(producer)
                producer = Producer(
                    peer, media.kind, media.mid, pt_map, bytes(table), rids, track_source=source
                )
                self._learn_ssrcs(producer, offer_desc.media_by_mid(media.mid))
                self.add_producer(peer, producer)
            else:
                producer.pt_map, producer.ext_table = pt_map, bytes(table)
        for mid in [m for m in peer.producers if m not in sending]:
            self.drop_producer(peer.producers[mid])

    @staticmethod
    def _may_publish(peer: Peer) -> bool:
        return peer.participant.permissions.publish

    def _learn_ssrcs(self, producer: Producer, media: sdp.MediaDescription | None) -> None:
        if media is None or not media.ssrcs:
            return
        fid = next((g.ssrcs for g in media.ssrc_groups if g.semantics == "FID" and len(g.ssrcs) == 2), None)
        primary = fid[0] if fid else media.ssrcs[0].ssrc
        producer.add_ssrc(primary, 0)
        producer.peer.by_ssrc[primary] = producer
        if fid:
            producer.peer.rtx_ssrcs.add(fid[1])

    def add_producer(self, peer: Peer, producer: Producer) -> None:
        """A new track of `peer`'s: everyone here who may see it consumes it, and it goes down every pipe
        but the one it came through."""
        peer.producers[producer.mid] = producer
        for other in self.peers.values():
            if other is not peer:
                self._consume(producer, other)
        for pipe in self.pipes.values():
            pipe.consume(producer)

    def drop_producer(self, producer: Producer) -> None:
        producer.close()
        peer = producer.peer
        if peer.producers.get(producer.mid) is producer:
            del peer.producers[producer.mid]
        producer.source.forget(producer)
        for consumer in list(producer.consumers):
            consumer.destination.consumer_removed(consumer)  # type: ignore[arg-type]
            consumer.close()
        producer.consumers.clear()

    def forward(self, producer: Producer, data: bytes, layer: int) -> None:
        """One packet of `producer`'s, from whichever source, to its consumers."""
        sent = producer.receive(data, layer)
        self.counts["rtp_out"] += sent
        self.counts["bytes_out"] += sent * len(data)

    def _consume(self, producer: Producer, subscriber: Peer) -> None:
        if (
            producer.id in subscriber.consumers
            or subscriber.pipe is not None  # it subscribes on its own node
            or not subscriber.participant.permissions.subscribe
            or (subscriber.sink is not None and not subscriber.sink.takes(producer))
        ):
            return
        consumer = Consumer(producer, subscriber)
        subscriber.consumers[producer.id] = consumer
        producer.consumers.append(consumer)
        self._audio_key = None  # a new listener or speaker: choose again at the next tick
        if subscriber.sink is not None:
            # Nothing to negotiate in-process: it takes packets from now on.
            consumer.transport = subscriber.sink.transport_for(consumer)  # type: ignore[assignment]
            consumer.ready = True
        else:
            self._renegotiate(subscriber)
        self.reallocate(subscriber)

    def _renegotiate(self, peer: Peer) -> None:
        # Deferred to a later loop turn: several changes become one offer, and a newcomer's `joined` reply
        # always goes out before its first offer.
        self._offers.add(peer.participant.id)

    def _send_offer(self, pid: str) -> None:
        peer = self.peers.get(pid)
        if peer is not None and not self.closed:
            self._send_subscribe_offer(peer)

    def _send_subscribe_offer(self, peer: Peer) -> None:
        if peer.awaiting is not None:
            peer.dirty = True
            return
        # By SSRC and by kind, so that an offer of n sections costs O(n): rooms can be large.
        by_ssrc = {c.ssrc: c for c in peer.consumers.values()}
        placed: set[str] = set()
        idle: dict[str, list[offer.Section]] = {}
        for section in peer.sections:
            consumer = by_ssrc.get(section.ssrc) if section.ssrc is not None else None
            if consumer is None:
                section.ssrc = None  # its track is gone: idle until reused
                idle.setdefault(section.kind, []).append(section)
            else:
                placed.add(consumer.producer.id)
        for idle_sections in idle.values():
            idle_sections.reverse()  # popped from the end: the lowest mid first
        for pid, consumer in peer.consumers.items():
            if pid in placed:
                continue
            free = idle.get(consumer.kind)
            if free:
                section = free.pop()
            else:
                section = offer.Section(str(len(peer.sections)), consumer.kind)
                peer.sections.append(section)
            section.ssrc = consumer.ssrc
            section.stream_id = consumer.producer.stream_id
            section.track_id = consumer.producer.id
            consumer.mid = section.mid
        if not peer.sections:
            return
        if peer.subscribe is None:
            peer.subscribe = WebRtcTransport(
                self.sfu.port,
                self.sfu.certificate,
                label=f"{peer.participant.id}/subscribe",
                on_rtp=lambda t, d: self.sfu.port.drop("rtp_on_subscribe"),
                on_rtcp=peer.on_subscribe_rtcp,
                on_connected=peer._on_subscribe_connected,
            )
        elif peer.restart_subscribe:
            peer.subscribe.restart_ice()
        peer.restart_subscribe = False
        peer.revision += 1
        peer.awaiting = peer.revision
        peer.offered = {s.mid: by_ssrc[s.ssrc] for s in peer.sections if s.ssrc is not None}
        text = offer.build_subscribe_offer(
            peer.sections,
            ice_ufrag=peer.subscribe.ice.ufrag,
            ice_pwd=peer.subscribe.ice.pwd,
            fingerprint=self.sfu.certificate.fingerprint_sha256,
            candidates=self.sfu.candidates,
            session_id=peer.session_id,
            version=peer.revision,
        )
        peer.participant.outbox.send(outgoing.sfu_offer(text, peer.revision))

    def on_subscribe_answer(self, participant: Member, text: str, revision: int) -> None:
        peer = self.peers.get(participant.id)
        if peer is None:  # an answer that crossed its sender's departure
            raise sdp.SdpError("you are no longer in this call")
        if peer.awaiting != revision:
            raise sdp.SdpError(f"revision {revision} is not the offer awaiting an answer ({peer.awaiting})")
        # An answer has exactly the offer's sections: reading past that many is wasted work.
        desc = sdp.parse(text, max_media=len(peer.sections))
        media = next((m for m in desc.media if not m.rejected), None)
        if media is None or peer.subscribe is None:
            raise sdp.SdpError("the answer accepts no m-section")
        ufrag, _ = desc.ice_credentials(media)
        fingerprints = [f for f in desc.fingerprints_for(media) if f.algorithm.lower() == "sha-256"]
        if not fingerprints:
            raise sdp.SdpError("the answer has no sha-256 DTLS fingerprint")
        if (desc.setup_for(media) or "active") != "active":
            raise sdp.SdpError("the answer must take a=setup:active: the SFU stays the DTLS server")
        peer.subscribe.set_remote(ufrag, fingerprints[0].value)
        peer.awaiting = None
        answered_by_mid = {m.mid: m for m in desc.media}
        for mid, consumer in peer.offered.items():
            answered = answered_by_mid.get(mid)
            if (
                answered is None
                or answered.rejected
                or peer.consumers.get(consumer.producer.id) is not consumer
            ):
                continue
            consumer.transport = peer.subscribe
            if not consumer.ready:
                consumer.ready = True
                if consumer.target is not None:
                    consumer.producer.request_keyframe(consumer.target)
        if peer.dirty:
            peer.dirty = False
            self._renegotiate(peer)

    # -- Pipes to the other nodes of the call (the calls layer opens and closes them) ---------------------

    def add_pipe(self, node: str, io: PipeIO) -> Pipe:
        """A pipe to node `node`: every track of this Router but those from there goes down it, at the layers
        the other node asks for."""
        pipe = self.pipes.get(node)
        if pipe is not None:
            return pipe
        pipe = self.pipes[node] = Pipe(self, node, io)
        for peer in list(self.peers.values()):
            for producer in list(peer.producers.values()):
                pipe.consume(producer)
        self._speaker_sent = None  # the new node hears the speaker at the next tick
        return pipe

    def remove_pipe(self, node: str) -> None:
        pipe = self.pipes.pop(node, None)
        if pipe is None:
            return
        pipe.close()
        if self._speaker_pipe is pipe:
            # The hub is gone: this node decides for its own participants until a hub leads again.
            self._speaker_pipe = None
            self.speaker = SpeakerDetector(loudest=LOUDEST)
            self._audio_key = None

    def follow_speaker(self, pipe: Pipe, message: dict[str, Any]) -> None:
        """The hub's speaker and loudest voices (a `speaker` message down `pipe`)."""
        active = message.get("active")
        ranked = [str(p) for p in message["ranked"]]
        audible = [str(p) for p in message["audible"]]
        if (active is not None and not isinstance(active, str)) or len(ranked) > 64 or len(audible) > 64:
            raise ValueError("bad speaker message")
        if not isinstance(self.speaker, SpeakerFollower) or self._speaker_pipe is not pipe:
            self.speaker = SpeakerFollower()
            self._speaker_pipe = pipe
        self.speaker.set(active, ranked, audible)
        self._audio_key = None

    def _lead_speaker(self) -> None:
        """As the hub, tell every other node of the call who speaks and who is heard, when that changes."""
        if not self.pipes or self._speaker_pipe is not None or not isinstance(self._audio_key, tuple):
            return
        top, audible = self._audio_key
        key = (self.speaker.active_speaker, top, audible)
        if key == self._speaker_sent:
            return
        self._speaker_sent = key
        message = {"t": "speaker", "active": key[0], "ranked": list(top), "audible": sorted(audible)}
        for pipe in self.pipes.values():
            pipe.io.send(message)

    # -- Time -----------------------------------------------------------------------------------------------

    def tick(self, now: float, count: int) -> None:
        """Every TICK (`count` of them so far): feedback, the speaker, the audio selection; and for the
        peers whose slot this is, the once-a-second work."""
        if self.speaker.tick(now):
            self.room.broadcast(outgoing.active_speaker(self.speaker.active_speaker))
            for peer in self.peers.values():
                if peer.sink is not None:
                    peer.sink.active_speaker(self.speaker.active_speaker)
        self._select_audio()
        self._lead_speaker()
        slot = count % REPORT_EVERY
        for peer in self.peers.values():
            if peer.slot == slot:
                for producer in peer.producers.values():
                    producer.tick(REPORT_EVERY * TICK)
                # Layer bitrates moved and publishers start or stop layers: what fits and flows may differ.
                self._measure(peer, REPORT_EVERY * TICK)
                self.reallocate(peer)
        for peer in list(self.peers.values()):
            full = peer.slot == slot
            peer.tick(now, full)
            if full and peer.consent_expired(now):
                event(
                    log,
                    logging.INFO,
                    "media consent lost",
                    room=self.room.name,
                    participant=peer.participant.id,
                )
                self.on_timeout(peer.participant.id, "timeout")

    def stats(self) -> dict[str, Any]:
        return {
            "pipes": [pipe.describe() for pipe in self.pipes.values()],
            "peers": len(self.peers),
            "producers": sum(len(p.producers) for p in self.peers.values()),
            "consumers": sum(len(p.consumers) for p in self.peers.values()),
            **self.counts,
        }

    def close(self) -> None:
        self.closed = True
        for node in list(self.pipes):
            self.remove_pipe(node)
        for peer in list(self.peers.values()):
            self.remove_peer(peer.participant)
        if self in self.sfu.routers:
            self.sfu.routers.discard(self)
            for key, value in self.counts.items():
                self.sfu.retired[key] += value


def _flowing(producer: Producer, wanted: int | None, now: float) -> int | None:
    """The layer to forward for `wanted`: the highest one at or below it that packets arrive on, since a
    publisher short of bandwidth stops its top layers by itself; the lowest flowing one when none below
    is; `wanted` itself before anything flows (a new publisher)."""
    if wanted is None:
        return None
    flowing = [layer for layer in range(producer.layers) if producer.active(layer, now)]
    if not flowing:
        return wanted
    below = [layer for layer in flowing if layer <= wanted]
    return below[-1] if below else flowing[0]
