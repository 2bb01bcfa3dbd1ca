"""A Producer: one track a participant publishes, fanned out to its Consumers.

A video Producer may have several simulcast layers (rid q, h, f: one SSRC each); each packet is tagged with
its layer and each Consumer forwards the layer it is on. Work that is the same for every subscriber happens
here, once per packet: the payload type and header extension ids are rewritten to the numbers every
subscriber negotiated (offer.py), our send time is written into abs-send-time, and the VP8 payload
descriptor is read. A Consumer then only copies the packet and rewrites its own stream's numbers.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Protocol

from huddle.rtc import fastpath, rtp
from huddle.rtc.rtcp import ReportBlock
from huddle.sfu import vp8
from huddle.sfu.allocation import NOMINAL_WIDTHS
from huddle.sfu.offer import ABS_SEND_TIME_ID, SCREEN_SOURCES

try:
    from huddle.sfu import _rewrite
except ImportError:  # a checkout used without `pip install -e .`: the reference path
    _rewrite = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from huddle.sfu.consumer import Consumer
    from huddle.sfu.pipe import PipeConsumer
    from huddle.sfu.router import Peer

# An extension id no subscriber negotiates: elements that only mean something between the publisher and
# us (mid, rid, transport-wide seq) are renamed to it, so subscribers skip them unread.
UNUSED_EXTENSION_ID = 14
KEYFRAME_REQUEST_INTERVAL = 0.5  # seconds between PLIs to one layer of one track, however many ask
# Layer order by rid for the names our client uses; other names keep the order the offer lists them in.
RID_ORDER = {"q": 0, "h": 1, "f": 2}
BITRATE_SMOOTHING = 0.3  # weight of the newest one-second sample in a layer's bitrate
LAYER_IDLE = 1.0  # seconds without a packet after which a layer counts as stopped
# Chosen once, like huddle.sfu.consumer's: the compiled fan-out where the port's compiled path is in use.
COMPILED = fastpath.COMPILED and _rewrite is not None
# A screen share reaches subscribers as a stream of its own, `<participant id>~screen`, so that they show it
# apart from the camera and ask for its size under that key (docs/protocol.md).
SCREEN_STREAM_SUFFIX = "~screen"


class Source(Protocol):
    """Where a Producer's packets come from: its participant's publish transport (a Peer of this node) or a
    pipe from the node that participant is on (sfu/pipe.py). Both hear keyframe requests and which layers
    someone here needs (dynacast), and both learn when the Producer is gone."""

    def send_pli(self, ssrc: int) -> bool: ...

    def set_layers(self, producer: Producer, layers: frozenset[int], max_tid: int | None) -> None: ...

    def forget(self, producer: Producer) -> None: ...


def default_source(kind: str) -> str:
    """What a section carries that its publisher did not name: its microphone or its camera."""
    return "microphone" if kind == "audio" else "camera"


def order_rids(rids: list[str]) -> list[str]:
    """Simulcast rids from the lowest layer to the highest."""
    return sorted(rids, key=lambda r: (RID_ORDER.get(r, 99), rids.index(r)))


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


def abs_send_time(now: float) -> bytes:
    """abs-send-time's 24 bits: seconds in 6.18 fixed point, wrapping every 64 s."""
    value = int(now * (1 << 18)) & 0xFFFFFF
    return bytes(((value >> 16) & 0xFF, (value >> 8) & 0xFF, value & 0xFF))


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
        fraction = 0
        if interval_expected > 0 and interval_lost > 0:
            fraction = (interval_lost << 8) // interval_expected
        lsr = (self.sr_ntp >> 16) & 0xFFFFFFFF
        dlsr = int((now - self.sr_at) * 65536) if self.sr_ntp else 0
        highest = self.highest & 0xFFFFFFFF
        return ReportBlock(ssrc, min(fraction, 255), min(lost, 0x7FFFFF), highest, 0, lsr, dlsr)


class Producer:
    __slots__ = (
        "bitrates",
        "clock_rate",
        "consumers",
        "deferred_requests",
        "ext_table",
        "id",
        "kind",
        "last_keyframe_request",
        "last_seen",
        "layer_bytes",
        "layer_of",
        "mid",
        "needed",
        "peer",
        "pt_map",
        "rids",
        "source",
        "ssrcs",
        "stats",
        "track_source",
        "widths",
    )

    def __init__(
        self,
        peer: Peer,
        kind: str,
        mid: str,
        pt_map: dict[int, int],
        ext_table: bytes,
        rids: list[str] | None = None,
        source: Source | None = None,
        track_source: str | None = None,
    ) -> None:
        self.peer = peer
        self.source: Source = source if source is not None else peer
        self.kind = kind
        self.track_source = track_source or default_source(kind)
        self.mid = mid
        self.id = f"{peer.participant.id}:{mid}"
        self.pt_map = pt_map  # publisher's payload type → the subscribers' one
        self.ext_table = ext_table
        self.clock_rate = 90000 if kind == "video" else 48000
        # Simulcast layers from low to high; a track without simulcast has one layer.
        self.rids = order_rids(rids or [])
        layers = max(1, len(self.rids))
        self.ssrcs: list[int | None] = [None] * layers
        self.layer_of: dict[int, int] = {}
        self.stats = [ReceiveStats() for _ in range(layers)]
        self.layer_bytes = [0] * layers
        self.bitrates = [0.0] * layers
        self.last_seen = [0.0] * layers
        self.widths = list(NOMINAL_WIDTHS[-layers:]) if layers <= len(NOMINAL_WIDTHS) else [0] * layers
        self.consumers: list[Consumer | PipeConsumer] = []
        self.last_keyframe_request = [0.0] * layers
        self.deferred_requests: list[asyncio.TimerHandle | None] = [None] * layers
        # Video: the layers (and highest temporal layer, None: all) the source was last told someone here
        # needs (dynacast); None until told anything.
        self.needed: tuple[frozenset[int], int | None] | None = None

    @property
    def layers(self) -> int:
        return len(self.ssrcs)

    @property
    def stream_id(self) -> str:
        """The stream subscribers receive this track in (and name in `video_sizes`)."""
        participant_id = self.peer.participant.id
        if self.track_source in SCREEN_SOURCES:
            return participant_id + SCREEN_STREAM_SUFFIX
        return participant_id

    @property
    def ssrc(self) -> int | None:
        """The lowest known layer's SSRC (the only one without simulcast)."""
        return next((s for s in self.ssrcs if s is not None), None)

    def add_ssrc(self, ssrc: int, layer: int) -> None:
        self.ssrcs[layer] = ssrc
        self.layer_of[ssrc] = layer

    def layer_for_rid(self, rid: str) -> int | None:
        try:
            return self.rids.index(rid)
        except ValueError:
            return None

    def receive(self, data: bytes, layer: int) -> int:
        """Forward one decrypted packet of `layer` to every Consumer; returns how many copies went out."""
        pt = self.pt_map.get(data[1] & 0x7F)
        if pt is None:
            return 0
        try:
            start = rtp.payload_offset(data)
            end = rtp.payload_end(data)
        except rtp.RtpError:
            return 0  # authentic but malformed (impossible padding, say): nobody could use it
        now = time.monotonic()
        seq = (data[2] << 8) | data[3]
        self.stats[layer].update(seq)
        self.layer_bytes[layer] += len(data)
        started = now - self.last_seen[layer] >= LAYER_IDLE
        self.last_seen[layer] = now
        if started and self.consumers:
            # A layer (re)starts (dynacast turned it on, or the publisher's bandwidth allows it again),
            # and begins with a keyframe: let viewers aim at it before this very packet goes out.
            self.peer.router.layer_started(self)
        if COMPILED and self.kind == "audio" and not _rewrite.taken(self.consumers, layer, False):  # type: ignore[union-attr]
            # A voice not among anyone's loudest (7 of 10 in call-100): nothing to copy or rewrite.
            return 0
        buf = bytearray(data)
        buf[1] = (buf[1] & 0x80) | pt
        remap_extension_ids(buf, self.ext_table)
        at = rtp.extension_offset(buf, ABS_SEND_TIME_ID) if buf[0] & 0x10 else -1
        if at >= 0:
            buf[at : at + 3] = abs_send_time(time.time())
        ts = rtp.timestamp(buf)
        info = None
        if self.kind == "video":
            info = vp8.parse_descriptor(buf, start, end)
            if info is not None and info.is_keyframe:
                width = vp8.keyframe_width(buf, start + info.size, end)
                if width:
                    self.widths[layer] = width
        size = end - start
        if COMPILED:
            # Every consumer in one call: huddle/sfu/_rewrite.c's fanout(), Consumer.forward line for line.
            return _rewrite.fanout(  # type: ignore[union-attr, no-any-return]
                self.consumers, buf, start, layer, seq, ts, self.clock_rate, now, info, size
            )
        sent = 0
        for consumer in self.consumers:
            if consumer.forward(buf, layer, seq, ts, start, info, size, now):
                sent += 1
        return sent

    def tick(self, interval: float) -> None:
        """Once a second: each layer's bitrate, smoothed."""
        for layer in range(self.layers):
            sample = self.layer_bytes[layer] * 8 / interval
            self.layer_bytes[layer] = 0
            old = self.bitrates[layer]
            self.bitrates[layer] = sample if old == 0 else old + BITRATE_SMOOTHING * (sample - old)

    def active(self, layer: int, now: float) -> bool:
        """Packets of this layer arrived lately (it is neither paused nor dropped by the publisher)."""
        return now - self.last_seen[layer] < LAYER_IDLE

    def request_keyframe(self, layer: int | None = None) -> bool:
        """Ask the publisher for a keyframe of `layer` (all layers when None), at most every
        KEYFRAME_REQUEST_INTERVAL per layer; True when one was sent now.

        A request inside the interval is not lost: it is sent when the interval is over, because the
        subscriber that asked (a new one, say) cannot decode anything until a keyframe comes.
        """
        if self.kind != "video":
            return False
        if layer is None:
            return any([self.request_keyframe(i) for i in range(self.layers)])
        ssrc = self.ssrcs[layer]
        if ssrc is None:
            return False
        now = time.monotonic()
        wait = self.last_keyframe_request[layer] + KEYFRAME_REQUEST_INTERVAL - now
        if wait > 0:
            if self.deferred_requests[layer] is None:
                loop = asyncio.get_running_loop()
                self.deferred_requests[layer] = loop.call_later(wait, self._deferred_keyframe_request, layer)
            return False
        if not self.source.send_pli(ssrc):
            return False  # not connected yet: the publish transport asks once it is
        self.last_keyframe_request[layer] = now
        return True

    def on_sender_report(self, layer: int, ntp: int, rtp_ts: int, now: float) -> None:
        """The source's sender report for `layer`: kept for our receiver reports, and passed on to every
        Consumer, which reports it in its own numbers, so that lip sync survives the trip."""
        stats = self.stats[layer]
        stats.sr_ntp = ntp
        stats.sr_at = now
        for consumer in self.consumers:
            consumer.on_sender_report(layer, ntp, rtp_ts, now)

    def _deferred_keyframe_request(self, layer: int) -> None:
        self.deferred_requests[layer] = None
        if self.consumers:
            self.request_keyframe(layer)

    def close(self) -> None:
        for i, handle in enumerate(self.deferred_requests):
            if handle is not None:
                handle.cancel()
                self.deferred_requests[i] = None
