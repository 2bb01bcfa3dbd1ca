"""What a synthetic subscriber measures, per stream it receives, and the results as JSON-able dataclasses.

Per packet (`Receiver.on_rtp`): the sequence number is unwrapped (loss = numbers never seen between the first
and the highest), the gap since the stream's previous packet is checked (a video gap over `FREEZE_GAP` is a
freeze), the packet is decrypted and its trailer read: which participant sent it, which simulcast layer (or
audio), and when. Receive time minus send time is the forwarding delay (one clock: sender and receiver share
the process), counted in a fixed histogram per subscriber. Nothing is allocated per packet beyond what the
socket and libsrtp return.

Counting happens inside a window (`start_window` .. `stop_window`): packets before it only set the stream's
starting point, so that joining and layer negotiation do not count as loss.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import asdict, dataclass, field
from typing import Any

from huddle.loadtest.media import LAYERS, TRAILER, TRAILER_MAGIC
from huddle.rtc.rtcp import ReportBlock, ntp_to_unix
from huddle.rtc.srtp import SrtpError, SrtpSession

__all__ = [
    "FREEZE_GAP_US",
    "LAYER_NAMES",
    "DelayHistogram",
    "ReceiveStream",
    "Receiver",
    "Reconnection",
    "Retired",
    "StreamResult",
    "SubscriberResult",
]

FREEZE_GAP_US = 500_000
LAYER_NAMES = (*(spec.rid for spec in LAYERS), "audio")
# Delay histogram: 20 µs buckets up to 20 ms, 1 ms buckets up to 1 s, 10 ms buckets up to 10 s (an
# overloaded server queues for seconds), then one bucket for the rest.
_FINE_US = 20
_FINE_END = 20_000
_COARSE_US = 1000
_COARSE_END = 1_000_000
_SLOW_US = 10_000
_SLOW_END = 10_000_000
_FINE_BUCKETS = _FINE_END // _FINE_US
_COARSE_BUCKETS = _FINE_BUCKETS + (_COARSE_END - _FINE_END) // _COARSE_US
_BUCKETS = _COARSE_BUCKETS + (_SLOW_END - _COARSE_END) // _SLOW_US + 1
_LAST = _BUCKETS - 1


def _bucket(us: int) -> int:
    if us < _FINE_END:
        return us // _FINE_US if us > 0 else 0
    if us < _COARSE_END:
        return _FINE_BUCKETS + (us - _FINE_END) // _COARSE_US
    if us < _SLOW_END:
        return _COARSE_BUCKETS + (us - _COARSE_END) // _SLOW_US
    return _LAST


def _bucket_upper_us(index: int) -> int:
    if index < _FINE_BUCKETS:
        return (index + 1) * _FINE_US
    if index < _COARSE_BUCKETS:
        return _FINE_END + (index - _FINE_BUCKETS + 1) * _COARSE_US
    if index < _LAST:
        return _COARSE_END + (index - _COARSE_BUCKETS + 1) * _SLOW_US
    return 1 << 62  # the overflow bucket: its percentiles report the largest delay seen


class DelayHistogram:
    """Counts of delays in µs, in fixed buckets (20 µs resolution below 20 ms, 1 ms below 1 s, 10 ms below
    10 s)."""

    __slots__ = ("counts", "max_us", "total", "total_us")

    def __init__(self) -> None:
        self.counts = [0] * _BUCKETS
        self.total = 0
        self.total_us = 0
        self.max_us = 0

    def add(self, us: int) -> None:
        self.counts[_bucket(us)] += 1
        self.total += 1
        self.total_us += us
        if us > self.max_us:
            self.max_us = us

    def merge(self, other: DelayHistogram) -> None:
        counts = self.counts
        for i, n in enumerate(other.counts):
            if n:
                counts[i] += n
        self.total += other.total
        self.total_us += other.total_us
        self.max_us = max(self.max_us, other.max_us)

    def percentile_ms(self, q: float) -> float | None:
        """The upper edge of the bucket holding the q-quantile (0 < q <= 1), in ms; None when empty."""
        if not self.total:
            return None
        rank = max(1, round(q * self.total))
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return min(_bucket_upper_us(i), max(self.max_us, 1)) / 1000
        return self.max_us / 1000

    def mean_ms(self) -> float | None:
        return self.total_us / self.total / 1000 if self.total else None


class ReceiveStream:
    """One SSRC the SFU sends this subscriber: whose it is (from the SDP) and what arrived of it."""

    __slots__ = (
        "auth_errors",
        "base",
        "bytes",
        "count",
        "delay_max",
        "delay_sum",
        "expected_layer",
        "first",
        "foreign",
        "freezes",
        "hi",
        "kind",
        "last_layer",
        "last_us",
        "layers",
        "max_gap",
        "prior_count",
        "prior_expected",
        "publisher",
        "publisher_index",
        "received",
        "reports",
        "sr_rtp",
        "sr_us",
        "ssrc",
        "sync_max",
        "top",
        "wrong_sender",
    )

    def __init__(self, ssrc: int, publisher: str = "?", kind: str = "?") -> None:
        self.ssrc = ssrc
        self.publisher = publisher
        self.kind = kind
        self.publisher_index = -1  # the sender index its trailers must carry, once known
        self.expected_layer: int | None = None  # video: the layer the layout asks for (None: not shown)
        self.hi = -1  # highest extended sequence number seen (-1: none yet)
        self.base = -1  # first extended sequence number inside the window
        self.last_us = 0
        # For receiver reports: every packet, window or not.
        self.first = -1
        self.count = 0
        self.prior_expected = self.prior_count = 0
        # The SFU's sender reports: how many, and the latest's mapping (RTP timestamp, publisher's µs).
        self.reports = 0
        self.sr_rtp = 0
        self.sr_us = 0
        self.reset()

    def reset(self) -> None:
        self.received = 0
        self.bytes = 0
        self.freezes = 0
        self.max_gap = 0
        self.layers = [0] * len(LAYER_NAMES)
        self.last_layer = -1
        self.delay_sum = 0
        self.delay_max = 0
        self.wrong_sender = 0
        self.foreign = 0
        self.auth_errors = 0
        # Lip sync: how far (µs) a packet's timestamp, read through the latest sender report, put it from
        # when its publisher stamped it (-1: no report to read it with yet).
        self.sync_max = -1
        self.base = self.hi + 1 if self.hi >= 0 else -1
        # The highest inside the window: what arrives after it closes (while leaving) is not loss.
        self.top = -1

    def report_block(self) -> ReportBlock | None:
        """An RTCP report block on this stream since the last one (RFC 3550 §6.4.1, A.3), as browsers send."""
        if self.first < 0:
            return None
        expected = self.hi - self.first + 1
        interval_expected = expected - self.prior_expected
        interval_lost = interval_expected - (self.count - self.prior_count)
        self.prior_expected, self.prior_count = expected, self.count
        fraction = (
            (interval_lost << 8) // interval_expected if interval_expected > 0 and interval_lost > 0 else 0
        )
        lost = max(-(1 << 23), min(expected - self.count, (1 << 23) - 1))
        return ReportBlock(self.ssrc, min(fraction, 255), lost, self.hi & 0xFFFFFFFF)

    @property
    def lost(self) -> int:
        if self.base < 0 or self.top < self.base:
            return 0
        return max(0, self.top - self.base + 1 - self.received)


@dataclass
class StreamResult:
    publisher: str
    kind: str
    ssrc: int
    packets: int
    bytes: int
    lost: int
    freezes: int
    max_gap_ms: float
    layers: dict[str, int]
    layer: str | None  # the layer of the last packet
    expected_layer: str | None  # video: what the layout asks for; None when not shown (or audio)
    delay_mean_ms: float | None
    delay_max_ms: float | None
    wrong_sender: int = 0
    errors: int = 0
    reports: int = 0  # sender reports the SFU sent for it
    sync_max_ms: float | None = None  # see ReceiveStream.sync_max; None: no report came in the window


@dataclass
class Reconnection:
    """One drop of a participant's signaling socket and its way back into the call."""

    dropped_us: int  # when the socket dropped (µs on the send and receive clock, `sender.now_us`)
    close_code: int | None = None  # the socket's close code (1006: it broke without one, e.g. the node died)
    attempts: int = 0  # joins sent (one per door tried; redirects followed within one)
    resumed_seconds: float | None = None  # drop to `joined` on a new socket (None: not resumed)
    restored: bool = False  # the node rebuilt us from the resume token: new SFU connections
    media_seconds: float | None = None  # drop to the first media packet received again (None: none yet)


@dataclass
class SubscriberResult:
    participant: str
    index: int
    streams: list[StreamResult] = field(default_factory=list)
    packets: int = 0
    lost: int = 0
    freezes: int = 0
    videos_expected: int = 0
    videos_received: int = 0  # of the expected ones, with packets
    videos_at_layer: int = 0  # of the expected ones, last packet at the expected layer
    videos_unexpected: int = 0  # videos not shown that packets arrived for anyway
    audio_expected: int = 0  # per the top-3 rule
    audio_received: int = 0
    delay_p50_ms: float | None = None
    delay_p99_ms: float | None = None
    delay_max_ms: float | None = None
    layers_sent: list[str] = field(default_factory=list)  # as a publisher, at the end: rids and "audio"
    reconnections: list[Reconnection] = field(default_factory=list)
    rtcp_datagrams: int = 0  # what the SFU sent its subscribe connection, from the start

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Retired:
    """What arrived, inside the window, on streams a subscriber no longer receives (their publisher left)."""

    packets: int = 0
    bytes: int = 0
    lost: int = 0
    freezes: int = 0


class Receiver:
    """Per-subscriber accounting of everything the subscribe connection receives."""

    def __init__(self, decrypt_every: int = 1) -> None:
        self.streams: dict[int, ReceiveStream] = {}
        self.histogram = DelayHistogram()
        self.srtp: SrtpSession | None = None
        self.measuring = False
        self.window_start_us = 0
        self.window_end_us = 0
        # Decrypt (and read the trailer of) one packet in this many per stream: 1 checks every packet;
        # more saves CPU at scale (loss and freezes still count every packet, from the clear header).
        self.decrypt_every = max(1, decrypt_every)
        self.unknown = 0
        self.retired = Retired()  # streams of publishers who left, summed

    def stream(self, ssrc: int) -> ReceiveStream:
        stream = self.streams.get(ssrc)
        if stream is None:
            stream = self.streams[ssrc] = ReceiveStream(ssrc)
        return stream

    def retire(self, keep: Container[int]) -> None:
        """Forget the streams whose SSRC is not in `keep` (their publisher left), adding their figures to
        `retired`: a long call with people coming and going neither grows nor reports on the departed."""
        for ssrc in [ssrc for ssrc in self.streams if ssrc not in keep]:
            stream = self.streams.pop(ssrc)
            retired = self.retired
            retired.packets += stream.received
            retired.bytes += stream.bytes
            retired.lost += stream.lost
            retired.freezes += stream.freezes

    def start_window(self, now_us: int) -> None:
        self.measuring = True
        self.window_start_us = now_us
        self.histogram = DelayHistogram()
        self.retired = Retired()
        for stream in self.streams.values():
            stream.reset()
            # A stream that should flow and does not in the first FREEZE_GAP of the window has frozen.
            stream.last_us = now_us

    def stop_window(self, now_us: int) -> None:
        if not self.measuring:
            return
        self.measuring = False
        self.window_end_us = now_us
        for stream in self.streams.values():
            if stream.kind == "video" and stream.expected_layer is not None and stream.last_us:
                gap = now_us - stream.last_us  # stopped before the end: a freeze that did not end
                if gap > FREEZE_GAP_US:
                    stream.freezes += 1
                if gap > stream.max_gap:
                    stream.max_gap = gap

    def on_rtp(self, data: bytes, arrival_us: int) -> None:
        """One SRTP packet from the subscribe connection, still protected, and its kernel receive time."""
        ssrc = (data[8] << 24) | (data[9] << 16) | (data[10] << 8) | data[11]
        stream = self.streams.get(ssrc)
        if stream is None:
            self.unknown += 1
            stream = self.stream(ssrc)
        seq = (data[2] << 8) | data[3]
        stream.count += 1
        hi = stream.hi
        if hi < 0:
            ext = seq
            stream.hi = stream.first = ext
        else:
            ext = hi + (((seq - hi + 0x8000) & 0xFFFF) - 0x8000)
            if ext > hi:
                stream.hi = ext
        if not self.measuring:
            stream.last_us = arrival_us
            return
        if stream.base < 0:
            stream.base = ext
        if ext > stream.top:
            stream.top = ext
        received = stream.received = stream.received + 1
        stream.bytes += len(data)
        if stream.kind == "video" and stream.last_us:
            gap = arrival_us - stream.last_us
            if gap > stream.max_gap:
                stream.max_gap = gap
            if gap > FREEZE_GAP_US and stream.expected_layer is not None:
                stream.freezes += 1
        stream.last_us = arrival_us
        srtp = self.srtp
        if srtp is None or received % self.decrypt_every:
            return
        try:
            plain = srtp.unprotect(data)
        except SrtpError:
            stream.auth_errors += 1
            return
        end = len(plain)
        if plain[0] & 0x20:  # RTP padding: the trailer sits before it
            end -= plain[-1]
        if end < 20:
            stream.foreign += 1
            return
        sender, layer, magic, sent = TRAILER.unpack_from(plain, end - 8)
        if magic != TRAILER_MAGIC or layer >= len(LAYER_NAMES):
            stream.foreign += 1
            return
        if sender != stream.publisher_index and stream.publisher_index >= 0:
            stream.wrong_sender += 1
        stream.layers[layer] += 1
        stream.last_layer = layer
        delay = (arrival_us - sent) & 0xFFFFFFFF
        if delay >= 0x80000000:  # the receive stamp came before the send stamp (clock granularity)
            delay = 0
        if stream.reports:
            # 90 or 48 ticks per ms; the trailer's stamp is in µs modulo 2**32, as is the reading.
            ticks = (
                ((plain[4] << 24) | (plain[5] << 16) | (plain[6] << 8) | plain[7]) - stream.sr_rtp
            ) & 0xFFFFFFFF
            ticks -= (ticks & 0x80000000) << 1
            at = stream.sr_us + ticks * 1000 // (90 if stream.kind == "video" else 48)
            off = (at - sent) & 0xFFFFFFFF
            off = min(off, 0x100000000 - off)
            if off > stream.sync_max:
                stream.sync_max = off
        stream.delay_sum += delay
        if delay > stream.delay_max:
            stream.delay_max = delay
        histogram = self.histogram
        if delay < _FINE_END:
            histogram.counts[delay // _FINE_US] += 1
        else:
            histogram.counts[_bucket(delay)] += 1
        histogram.total += 1
        histogram.total_us += delay
        if delay > histogram.max_us:
            histogram.max_us = delay

    def on_sender_report(self, ssrc: int, ntp: int, rtp_ts: int) -> None:
        stream = self.streams.get(ssrc)
        if stream is not None:
            stream.reports += 1
            stream.sr_rtp = rtp_ts
            stream.sr_us = round(ntp_to_unix(ntp) * 1e6)

    def results(self, participant: str, index: int, audio_expected: int) -> SubscriberResult:
        result = SubscriberResult(participant, index, audio_expected=audio_expected)
        for stream in self.streams.values():
            decrypted = sum(stream.layers)
            layers = {name: n for name, n in zip(LAYER_NAMES, stream.layers, strict=True) if n}
            expected = None
            if stream.kind == "video" and stream.expected_layer is not None:
                expected = LAYER_NAMES[stream.expected_layer]
            result.streams.append(
                StreamResult(
                    publisher=stream.publisher,
                    kind=stream.kind,
                    ssrc=stream.ssrc,
                    packets=stream.received,
                    bytes=stream.bytes,
                    lost=stream.lost,
                    freezes=stream.freezes,
                    max_gap_ms=round(stream.max_gap / 1000, 1),
                    layers=layers,
                    layer=LAYER_NAMES[stream.last_layer] if stream.last_layer >= 0 else None,
                    expected_layer=expected,
                    delay_mean_ms=round(stream.delay_sum / decrypted / 1000, 3) if decrypted else None,
                    delay_max_ms=round(stream.delay_max / 1000, 3) if decrypted else None,
                    wrong_sender=stream.wrong_sender,
                    errors=stream.auth_errors + stream.foreign,
                    reports=stream.reports,
                    sync_max_ms=round(stream.sync_max / 1000, 1) if stream.sync_max >= 0 else None,
                )
            )
            result.packets += stream.received
            result.lost += stream.lost
            result.freezes += stream.freezes
            if stream.kind == "video" and expected is not None:
                result.videos_expected += 1
                if stream.received:
                    result.videos_received += 1
                    if result.streams[-1].layer == expected:
                        result.videos_at_layer += 1
            elif stream.kind == "video" and stream.received:
                result.videos_unexpected += 1
            elif stream.kind == "audio" and stream.received:
                result.audio_received += 1
        result.packets += self.retired.packets
        result.lost += self.retired.lost
        result.freezes += self.retired.freezes
        result.streams.sort(key=lambda s: (s.publisher, s.kind))
        result.delay_p50_ms = self.histogram.percentile_ms(0.5)
        result.delay_p99_ms = self.histogram.percentile_ms(0.99)
        result.delay_max_ms = self.histogram.max_us / 1000 if self.histogram.total else None
        return result
