"""RTP packets to whole encoded frames, and RTP timestamps to the server's clock, for the recorder.

The recorder subscribes inside the SFU and sees each publisher's packets decrypted, in arrival order. Here,
without any I/O, `Vp8Assembler` and `OpusDepacketizer` turn them into `AssembledFrame`s (a VP8 frame without
its RTP payload descriptors, or one Opus packet) and `ParticipantClock` says when each frame was captured.

Both depacketizers put packets back in sequence order first, waiting for a missing packet until
`reorder_window` later ones have arrived; then it counts as lost. The SFU never NACKs publishers, so a hole is
only ever filled by network reordering, which is shallow: a small window is enough. Filling a hole can
complete several frames at once, so `push()` returns the oldest ready frame and `pop()` gives the rest:

    frame = assembler.push(packet)
    while frame is not None:
        publish(frame)
        frame = assembler.pop()

and `flush()` at the end of the track returns what is still held.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from huddle.rtc import rtp
from huddle.rtc.rtcp import ntp_to_unix
from huddle.rtc.rtp import ExtendedSeq, ExtendedTimestamp, RtpError
from huddle.sfu.vp8 import parse_descriptor

__all__ = [
    "AssembledFrame",
    "OpusDepacketizer",
    "ParticipantClock",
    "TimestampUnwrapper",
    "Vp8Assembler",
]

_Buffer = bytes | bytearray | memoryview

DEFAULT_REORDER_WINDOW = 8
# No real VP8 frame comes near this; it bounds what a broken or hostile sender can make us hold.
MAX_FRAME_SIZE = 4 << 20


class TimestampUnwrapper(ExtendedTimestamp):
    """32-bit RTP timestamps to 64-bit ones: each value is taken as the nearest to the highest seen, so a late
    packet from before a wrap comes back just below it rather than 2**32 ahead. The first value is kept as is;
    one reordered before it can come back negative."""

    __slots__ = ()

    unwrap = ExtendedTimestamp.update


@dataclass(frozen=True, slots=True)
class AssembledFrame:
    timestamp: int  # RTP timestamp, unwrapped
    keyframe: bool  # always True for audio
    data: bytes


class _Depacketizer:
    """Sequence-order delivery to `_packet()`, with holes reported to `_gap()` once given up on."""

    __slots__ = (
        "_next",
        "_pending",
        "_ready",
        "_seqs",
        "_unwrap",
        "late_packets",
        "lost_packets",
        "reorder_window",
    )

    def __init__(self, reorder_window: int = DEFAULT_REORDER_WINDOW) -> None:
        if reorder_window < 0:
            raise ValueError("reorder_window must be >= 0")
        self.reorder_window = reorder_window
        self.lost_packets = 0
        self.late_packets = 0  # duplicates, and packets that came after their place was given up
        self._seqs = ExtendedSeq()
        self._unwrap = TimestampUnwrapper()
        self._next: int | None = None  # the extended sequence number to deliver next
        self._pending: dict[int, tuple[_Buffer, int, int]] = {}
        self._ready: deque[AssembledFrame] = deque()

    def push(self, packet: _Buffer) -> AssembledFrame | None:
        """Take one RTP packet; the oldest frame ready, if any (then call `pop()` for more)."""
        try:
            start = rtp.payload_offset(packet)
            end = rtp.payload_end(packet)
        except RtpError:
            return self.pop()  # a packet we cannot read is as good as lost: its hole says so later
        ext = self._seqs.update(packet[2] << 8 | packet[3])
        nxt = self._next
        if nxt is None or (ext == nxt and not self._pending):
            self._next = ext + 1
            self._packet(packet, start, end)
        elif ext < nxt or ext in self._pending:
            self.late_packets += 1
        else:
            # Held across calls, so copied: the caller may reuse its buffer.
            self._pending[ext] = (bytes(packet), start, end)
            self._drain(ext)
        return self._ready.popleft() if self._ready else None

    def pop(self) -> AssembledFrame | None:
        """The next frame ready, or None."""
        return self._ready.popleft() if self._ready else None

    def flush(self) -> list[AssembledFrame]:
        """At the end of the track: give up on every hole, and return all frames that are ready."""
        if self._pending:
            self._drain(max(self._pending) + self.reorder_window + 1)
        self._end()
        frames = list(self._ready)
        self._ready.clear()
        return frames

    def _drain(self, newest: int) -> None:
        pending = self._pending
        nxt = self._next
        assert nxt is not None
        while pending:
            held = pending.pop(nxt, None)
            if held is not None:
                nxt += 1
                self._next = nxt
                self._packet(*held)
            elif newest - nxt > self.reorder_window:
                first = min(pending)
                self.lost_packets += first - nxt
                nxt = self._next = first
                self._gap()
            else:
                break

    def _packet(self, pkt: _Buffer, start: int, end: int) -> None:
        raise NotImplementedError

    def _gap(self) -> None:
        pass

    def _end(self) -> None:
        pass


class Vp8Assembler(_Depacketizer):
    """Whole VP8 frames from RTP packets (RFC 7741), payload descriptors removed.

    A frame begins at S=1 with partition index 0 and ends at the marker bit, or where the timestamp changes.
    After a lost packet no frame is delivered until the next whole keyframe (a decoder could not use them);
    `needs_keyframe` says so (the caller may send a PLI), from the start too, since the first frame must be a
    keyframe. `dropped_frames` counts the frames seen in part or whole and not delivered; frames lost whole
    in a hole are not counted, as nothing tells how many there were.
    """

    __slots__ = ("_buf", "_key", "_skipped_ts", "_ts", "dropped_frames", "needs_keyframe")

    def __init__(self, reorder_window: int = DEFAULT_REORDER_WINDOW) -> None:
        super().__init__(reorder_window)
        self.needs_keyframe = True
        self.dropped_frames = 0
        self._buf: bytearray | None = None  # the frame being assembled
        self._ts = 0  # its RTP timestamp
        self._key = False
        self._skipped_ts: int | None = None  # the last frame refused, so its other packets count it once

    def _packet(self, pkt: _Buffer, start: int, end: int) -> None:
        if start == end:
            return  # padding only (bandwidth probing): it takes a sequence number but is no part of a frame
        info = parse_descriptor(pkt, start, end)
        if info is None:
            self._gap()
            return
        ts = rtp.timestamp(pkt)
        buf = self._buf
        if buf is not None and ts != self._ts:
            # The marker went missing, not a packet (the sequence is unbroken): that frame is whole.
            self._emit()
            buf = None
        if info.start_of_partition and info.partition_index == 0:
            if buf is not None:
                self._gap()  # a second start of the same picture: what came before cannot be trusted
            if not info.is_keyframe and self.needs_keyframe:
                self._skip(ts)
                return
            buf = self._buf = bytearray(memoryview(pkt)[start + info.size : end])
            self._ts = ts
            self._key = info.is_keyframe
        elif buf is None:
            self._skip(ts)  # the rest of a frame whose start we lost or refused
            return
        else:
            buf += memoryview(pkt)[start + info.size : end]
            if len(buf) > MAX_FRAME_SIZE:
                self._gap()
                return
        if pkt[1] & 0x80:
            self._emit()

    def _emit(self) -> None:
        buf = self._buf
        assert buf is not None
        self._buf = None
        if self._key:
            self.needs_keyframe = False
        self._ready.append(AssembledFrame(self._unwrap.update(self._ts), self._key, bytes(buf)))

    def _skip(self, ts: int) -> None:
        if ts != self._skipped_ts:
            self._skipped_ts = ts
            self.dropped_frames += 1
        self.needs_keyframe = True

    def _gap(self) -> None:
        if self._buf is not None:
            self._buf = None
            self._skipped_ts = self._ts
            self.dropped_frames += 1
        self.needs_keyframe = True

    def _end(self) -> None:
        # Without its marker a frame cannot be known to be whole.
        if self._buf is not None:
            self._buf = None
            self.dropped_frames += 1


class OpusDepacketizer(_Depacketizer):
    """One Opus packet per frame (RFC 7587), in sequence order; empty payloads are dropped."""

    __slots__ = ()

    def _packet(self, pkt: _Buffer, start: int, end: int) -> None:
        if start < end:
            self._ready.append(
                AssembledFrame(self._unwrap.update(rtp.timestamp(pkt)), True, bytes(pkt[start:end]))
            )


@dataclass(slots=True)
class _Report:
    ntp_time: float  # the sender's wall clock, Unix seconds
    rtp_ts: int  # 32 bits
    clock_rate: int


class ParticipantClock:
    """One participant's RTP timestamps on the server's wall clock (Unix seconds).

    Each track's latest RTCP sender report ties its RTP timestamps to the sender's NTP clock, which all of the
    participant's tracks share. One offset, per participant, carries that clock onto the server's: the least
    (arrival - NTP time) seen in any of its reports, which is the sender's clock offset plus the smallest
    transit delay. So audio and video keep the timing the sender gave them (lip sync), and different
    participants line up on the server clock to within their least transit delays.

    The offset only moves down, when a report arrives quicker than any before: times then step back by that
    much, for every track of the participant at once. Clock drift between sender and server is not followed.
    """

    __slots__ = ("_offset", "_reports")

    def __init__(self) -> None:
        self._reports: dict[str, _Report] = {}
        self._offset: float | None = None

    @property
    def offset(self) -> float | None:
        """Server time minus the sender's NTP time, or None before any sender report."""
        return self._offset

    def on_sender_report(self, track: str, ntp: int, rtp_ts: int, clock_rate: int, arrival: float) -> None:
        """A sender report for `track`: its 64-bit NTP timestamp and 32-bit RTP timestamp, the track's clock
        rate, and the server's Unix time when it arrived."""
        if clock_rate <= 0:
            raise ValueError("clock_rate must be positive")
        ntp_time = ntp_to_unix(ntp)
        self._reports[track] = _Report(ntp_time, rtp_ts & 0xFFFFFFFF, clock_rate)
        offset = arrival - ntp_time
        if self._offset is None or offset < self._offset:
            self._offset = offset

    def time_of(self, track: str, unwrapped_ts: int) -> float | None:
        """Server Unix time at which the sample with RTP timestamp `unwrapped_ts` (as `TimestampUnwrapper`
        gives it) was captured; None until `track` has had a sender report."""
        report = self._reports.get(track)
        if report is None or self._offset is None:
            return None
        # The report's timestamp is 32 bits: take the unwrapped value nearest the frame's.
        since = -rtp.ts_diff(report.rtp_ts, unwrapped_ts & 0xFFFFFFFF)
        return report.ntp_time + self._offset + since / report.clock_rate
