"""Per-subscriber stream rewriting: many sources in, one continuous stream out (pure, no I/O).

A Consumer forwards one track to one subscriber, but what it forwards comes from one of several *sources*
(a simulcast layer: an SSRC with its own sequence numbers, RTP timestamp base, VP8 picture ids and
TL0PICIDX), and it may skip packets on purpose (frames of a temporal layer above the target, everything
while paused). The subscriber must see one stream: a fixed SSRC, sequence numbers +1 per packet with gaps
only where packets were really lost upstream (so its NACKs ask for real losses and nothing else), timestamps
that keep time across a switch, and picture ids / TL0PICIDX without gaps. `StreamRewriter` is that mapping,
one per Consumer, patching each outgoing copy in place.

How it works
------------
Every counter is kept *extended* (an unbounded int, never wrapped inside) and mapped by an offset:
``out = in + offset``, wrapped to 16 bits (seq), 32 bits (timestamp), 15 or 7 bits (picture id) or 8 bits
(TL0PICIDX) only when written.

`switch(source)` to **another source** starts a new mapping at the next packet given to `rewrite()` (the
caller switches when the new source's keyframe starts): its sequence number becomes last output + 1, its
picture id last + 1, its TL0PICIDX last + 1, and its timestamp the last output timestamp plus the wall time
since the newest forwarded packet (at least 1 tick). "Last" is the newest packet/frame forwarded, so a
trailing loss on the old source leaves no gap.

`resume()` (= `switch()` to the **same source**, after `pause()` or after simply not calling `rewrite()`
for a while) keeps the mapping: everything between the newest packet seen before and the first one after
is dropped (sequence numbers and picture ids continue at last + 1), TL0PICIDX continues at last + 1 on the
next base-layer frame, and timestamps keep the source's own offset, so time passes as it really did. If the
source was gone for more than `SEQ_WINDOW` packets it is mapped afresh (as another source would be, but
still on its own clock); if its clock went back (an encoder restart) the wall time is used instead.

Rules
-----
- **Switch point.** After a switch to another source, packets of it older than the first one forwarded
  (the keyframe's first packet) are refused, and so are packets of any other source, the old one included.
- **Drops close the gap, losses do not.** `drop()` on the newest packet of the source (a sequence number
  above every one seen) takes no output number: the offset goes down by one, so the next packet gets the
  number the dropped one would have had. Numbers between the previous newest and the dropped packet (never
  seen: lost upstream or still on their way) keep theirs, so a loss still shows as a gap the subscriber
  NACKs, and a late arrival fills exactly its hole. Picture ids work the same way per frame: a dropped new
  frame takes no picture id, and the other packets of a dropped frame are dropped by `rewrite()` too.
- **Reordering.** A packet older than the newest (within `SEQ_WINDOW`) gets the offset that was in effect at
  its place in the sequence, so late packets and duplicates map to the output number reserved for them; a
  duplicate of a sent packet is sent again with the same number. Offsets are remembered per input sequence
  number in a ring (and per picture id in another), allocated on a stream's first drop: a stream that never
  drops (audio, all temporal layers) pays for neither.
- **Late drops.** `drop()` on a packet older than the newest gives its number back only if nothing after it
  has been sent yet (the reserved numbers above it move down one). Otherwise later packets already carry
  their numbers, so the subscriber sees that one number missing (it NACKs it once, in vain), and `drop()`
  returns False. Decide drops per frame, at frame starts: then this only happens to a frame you drop that
  was reordered behind a later frame already sent.
- **Temporal dropping keeps TL0PICIDX untouched**: only frames with TID > 0 may be dropped between
  switches (a dropped TID 0 frame breaks decoding anyway; pause instead and resume on a keyframe).
- **Window.** Packets more than `SEQ_WINDOW` behind the newest (or of frames more than `PICTURE_ID_WINDOW`
  behind) are refused: their place is forgotten.

Everything on the per-packet path is int arithmetic on a few slots; the only containers are the two rings,
allocated once.
"""

from __future__ import annotations

import secrets

from huddle.rtc.rtp import rewrite_header, ts_diff
from huddle.sfu.vp8 import Vp8Info

__all__ = ["PICTURE_ID_WINDOW", "SEQ_WINDOW", "StreamRewriter"]

SEQ_WINDOW = 1024  # input packets behind the newest whose output number is remembered (power of two)
PICTURE_ID_WINDOW = 256  # frames likewise (power of two)
_SEQ_MASK = SEQ_WINDOW - 1
_PID_MASK = PICTURE_ID_WINDOW - 1
_NOT_YET = 1 << 62  # "no ring yet": above every extended number
_REBASE = 1  # picture ids start a new mapping at the next packet that carries one
_CONTINUE = 2  # ... or go on, dropping the frames skipped while paused


class StreamRewriter:
    """One Consumer's outgoing stream: maps (source, seq, timestamp, picture id, TL0PICIDX) to its own.

    `ssrc` is the output SSRC; `seq_start`, `ts_start`, `picture_id_start` and `tl0picidx_start` are where
    the output begins (random when not given). Nothing is forwarded before the first `switch()`.
    """

    __slots__ = (
        "_in_base",
        "_in_hi",
        "_last_now",
        "_live",
        "_pid_base",
        "_pid_from",
        "_pid_hi",
        "_pid_off",
        "_pid_off0",
        "_pid_pending",
        "_pid_ring",
        "_pid_ringed",
        "_pid_sent_hi",
        "_rebase",
        "_ring",
        "_ring_from",
        "_ringed",
        "_sent_hi",
        "_seq_off",
        "_seq_off0",
        "_tl0_last",
        "_tl0_off",
        "_tl0_pending",
        "_ts_last",
        "_ts_off",
        "_ts_source",
        "source",
        "ssrc",
    )

    def __init__(
        self,
        ssrc: int,
        *,
        seq_start: int | None = None,
        ts_start: int | None = None,
        picture_id_start: int | None = None,
        tl0picidx_start: int | None = None,
    ) -> None:
        self.ssrc = ssrc
        self.source: int | None = None  # the source being forwarded (or waited for, or paused)
        self._live: int | None = None  # == source, or None while paused / before the first switch
        self._rebase = False  # the next packet of `source` starts (or continues) a mapping

        # Sequence numbers: out = in + _seq_off for the newest; the next output number is
        # _in_hi + _seq_off + 1 (so before the first packet, _in_hi = -1 and _seq_off = the start).
        self._in_hi = -1
        self._sent_hi = -1  # the highest input number forwarded: numbers above it are promised to no one yet
        self._seq_off = secrets.randbits(15) if seq_start is None else seq_start & 0xFFFF
        self._seq_off0 = self._seq_off  # the offset of every packet below _ring_from
        self._in_base = 0  # first input packet of this mapping; older ones are refused
        self._ring: list[int | None] | None = None  # out - in per input seq (None: dropped), lazily
        self._ringed = False
        self._ring_from = _NOT_YET

        # Timestamps: out = in + _ts_off (mod 2**32).
        self._ts_off = 0
        ts0 = secrets.randbits(32) if ts_start is None else ts_start
        self._ts_last = (ts0 - 1) & 0xFFFFFFFF  # output timestamp of the newest forwarded packet
        self._last_now: float | None = None  # wall time of the newest forwarded packet
        self._ts_source: int | None = None  # the source whose clock _ts_off maps

        # Picture ids, per frame, like sequence numbers.
        self._pid_pending = _REBASE
        self._pid_hi = -1
        self._pid_sent_hi = -1
        self._pid_off = secrets.randbits(15) if picture_id_start is None else picture_id_start & 0x7FFF
        self._pid_off0 = self._pid_off
        self._pid_base = 0
        self._pid_ring: list[int | None] | None = None
        self._pid_ringed = False
        self._pid_from = _NOT_YET

        # TL0PICIDX: one offset per mapping, set again on the first new packet after switch()/resume().
        self._tl0_pending = True
        self._tl0_off = 0
        self._tl0_last = (secrets.randbits(8) if tl0picidx_start is None else tl0picidx_start) - 1

    # --- control ------------------------------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        """True while nothing is forwarded: after `pause()`, and before the first `switch()`."""
        return self._live is None

    def switch(self, source: int) -> None:
        """Forward `source` from its next packet given to `rewrite()` on (for video: a keyframe's first).

        Also resumes after `pause()`. For another source than the one mapped, a new mapping starts there
        (last + 1 for every counter, timestamps by wall time). For the same source (a resume), the mapping
        goes on and whatever was skipped meanwhile is dropped -- unless it was gone for more than
        SEQ_WINDOW packets, when it starts afresh like another source but keeps its own clock.
        """
        self.source = source
        self._live = source
        self._rebase = True

    def pause(self) -> None:
        """Forward nothing until `switch()` or `resume()`; the output numbers carry on from where they are."""
        self._live = None

    def resume(self) -> None:
        """`switch()` back to the current source (for video, call it when a keyframe starts)."""
        if self.source is not None:
            self.switch(self.source)

    def timestamp_for(self, source: int, ts: int) -> int | None:
        """The output timestamp for the source's `ts` (to translate a sender report); None when `source` is
        not the one mapped."""
        if source != self._ts_source or source != self.source:
            return None
        return (ts + self._ts_off) & 0xFFFFFFFF

    # --- per packet ---------------------------------------------------------------------------------------

    def rewrite(
        self,
        buf: bytearray,
        payload_offset: int,
        source: int,
        seq: int,
        ts: int,
        clock_rate: int,
        now: float,
        info: Vp8Info | None,
    ) -> bool:
        """Patch the packet in `buf` for the subscriber; False (and `buf` untouched) when it must not go.

        `buf` is the Consumer's own copy of the RTP packet; `payload_offset` where its payload (the VP8
        payload descriptor) starts; `source`, `seq`, `ts` the source's id and the packet's own sequence
        number and timestamp; `clock_rate` the RTP clock (90000 for video, 48000 for Opus); `now` a monotonic
        time in seconds; `info` the parsed VP8 descriptor (None for audio or a payload without one).
        """
        if source != self._live:
            return False
        if self._rebase:
            self._start(seq, ts, clock_rate, now)
        hi = self._in_hi
        ext = hi + (((seq - hi + 0x8000) & 0xFFFF) - 0x8000)
        newest = ext > hi
        if newest:
            seq_off = self._seq_off
        else:
            if ext < self._in_base or hi - ext >= SEQ_WINDOW:
                return False  # before the switch point, or forgotten
            if ext < self._ring_from:
                seq_off = self._seq_off0
            else:
                seq_off = self._ring[ext & _SEQ_MASK]  # type: ignore[index]
                if seq_off is None:
                    return False  # dropped on purpose: its number went to another packet

        pid = None if info is None else info.picture_id
        new_frame = False
        if pid is not None:
            m15 = info.picture_id_15bit  # type: ignore[union-attr]
            pending = self._pid_pending
            if pending:
                if pending == _REBASE or not m15:  # (7-bit ids cannot tell a long pause from a short one)
                    nxt = self._pid_hi + self._pid_off + 1
                    self._pid_hi = self._pid_sent_hi = pid - 1
                    self._pid_base = pid
                    self._pid_off = self._pid_off0 = nxt - pid
                    self._pid_ringed = False
                    self._pid_from = _NOT_YET
                    self._pid_pending = pending = 0
            phi = self._pid_hi
            if m15:
                pext = phi + (((pid - phi + 0x4000) & 0x7FFF) - 0x4000)
            else:
                pext = phi + (((pid - phi + 0x40) & 0x7F) - 0x40)
            if pext > phi:
                new_frame = True
                if pending:  # resumed: the frames skipped meanwhile take no picture ids
                    self._pid_pending = 0
                    if pext - phi > 1:
                        self._skip_pids(phi, pext)
                        phi = pext - 1
                pid_off = self._pid_off
                if self._pid_ringed:
                    self._fill_pids(phi, pext, pid_off)
                self._pid_hi = self._pid_sent_hi = pext
            else:
                if pext < self._pid_base or phi - pext >= PICTURE_ID_WINDOW:
                    pid_off = None
                elif pext < self._pid_from:
                    pid_off = self._pid_off0
                else:
                    pid_off = self._pid_ring[pext & _PID_MASK]  # type: ignore[index]
                if pid_off is None:  # a frame dropped (or forgotten): so is this packet of it
                    self._drop_seq(hi, ext)
                    return False
                if pext > self._pid_sent_hi:
                    self._pid_sent_hi = pext

        if newest:
            if self._ringed:
                if ext - hi == 1:
                    self._ring[ext & _SEQ_MASK] = seq_off  # type: ignore[index]
                else:
                    self._fill_seqs(hi, ext, seq_off)
            self._in_hi = self._sent_hi = ext
        elif ext > self._sent_hi:
            self._sent_hi = ext
        out_ts = ts + self._ts_off
        rewrite_header(buf, self.ssrc, ext + seq_off, out_ts)
        if newest:
            self._ts_last = out_ts & 0xFFFFFFFF
            self._last_now = now
        i = payload_offset + 2
        if pid is not None:
            out = pext + pid_off
            if m15:
                buf[i] = 0x80 | ((out >> 8) & 0x7F)
                buf[i + 1] = out & 0xFF
                i += 2
            else:
                buf[i] = out & 0x7F
                i += 1
        tl0 = None if info is None else info.tl0picidx
        if tl0 is not None:
            if self._tl0_pending and newest:
                self._tl0_pending = False
                if pid is None:
                    new_frame = info.start_of_partition and not info.partition_index  # type: ignore[union-attr]
                # A new frame of the base layer starts a new TL0 picture; anything else shares the last one.
                step = 1 if new_frame and not info.tid else 0  # type: ignore[union-attr]
                self._tl0_off = self._tl0_last + step - tl0
            out = (tl0 + self._tl0_off) & 0xFF
            buf[i] = out
            if newest:
                self._tl0_last = out
        return True

    def drop(self, source: int, seq: int, info: Vp8Info | None = None) -> bool:
        """Skip a packet on purpose (a temporal layer above the target, say); True when its number was given
        back (later packets close the gap), False when it keeps a hole (a late drop) or is not this stream's.

        Give `info` for VP8, so that a dropped frame takes no picture id either. Nothing to call while
        paused: `pause()` already drops everything.
        """
        if source != self._live or self._rebase:
            return False
        hi = self._in_hi
        ext = hi + (((seq - hi + 0x8000) & 0xFFFF) - 0x8000)
        freed = ext >= self._in_base and hi - ext < SEQ_WINDOW and self._drop_seq(hi, ext)
        pid = None if info is None else info.picture_id
        if pid is not None and not self._pid_pending:
            phi = self._pid_hi
            if info.picture_id_15bit:  # type: ignore[union-attr]
                pext = phi + (((pid - phi + 0x4000) & 0x7FFF) - 0x4000)
            else:
                pext = phi + (((pid - phi + 0x40) & 0x7F) - 0x40)
            if pext > phi:
                self._cover_pids(phi + 1)
                self._fill_pids(phi, pext, self._pid_off)
                self._pid_ring[pext & _PID_MASK] = None  # type: ignore[index]
                self._pid_off -= 1
                self._pid_hi = pext
            elif pext >= self._pid_base and phi - pext < PICTURE_ID_WINDOW:
                self._cover_pids(pext)
                ring = self._pid_ring
                if ring[pext & _PID_MASK] is not None and pext > self._pid_sent_hi:  # type: ignore[index]
                    # No frame after it was sent yet: give its picture id back.
                    for e in range(pext + 1, phi + 1):
                        off = ring[e & _PID_MASK]  # type: ignore[index]
                        if off is not None:
                            ring[e & _PID_MASK] = off - 1  # type: ignore[index]
                    self._pid_off -= 1
                ring[pext & _PID_MASK] = None  # type: ignore[index]
        return freed

    # --- off the common path ------------------------------------------------------------------------------

    def _start(self, seq: int, ts: int, clock_rate: int, now: float) -> None:
        """The first packet after switch()/resume(): continue the mapping or start a new one."""
        self._rebase = False
        source = self.source
        last_now = self._last_now
        last_ts = self._ts_last
        hi = self._in_hi
        self._tl0_pending = True
        if source == self._ts_source:
            ext = hi + (((seq - hi + 0x8000) & 0xFFFF) - 0x8000)
            if hi - SEQ_WINDOW < ext <= hi + SEQ_WINDOW:
                # The same source, back soon: its mapping goes on, what was skipped meanwhile is dropped.
                if ext - hi > 1:
                    self._skip_seqs(hi, ext)
                if ext > hi and ts_diff(ts + self._ts_off, last_ts) < 0:  # its clock went back: restarted
                    self._ts_off = (last_ts + self._wall_ticks(clock_rate, now) - ts) & 0xFFFFFFFF
                if not self._pid_pending:
                    self._pid_pending = _CONTINUE
                return
        # A new mapping: this packet is the switch point; every counter goes on at last + 1.
        nxt = hi + self._seq_off + 1
        self._in_base = seq
        self._in_hi = self._sent_hi = seq - 1
        self._seq_off = self._seq_off0 = nxt - seq
        self._ringed = False
        self._ring_from = _NOT_YET
        if source == self._ts_source and ts_diff(ts + self._ts_off, last_ts) >= 0:
            off = self._ts_off  # the same clock, after a long pause: time passed as it did
        elif last_now is None:
            off = last_ts + 1 - ts  # the very first packet: the start asked for
        else:
            off = last_ts + self._wall_ticks(clock_rate, now) - ts
        self._ts_off = off & 0xFFFFFFFF
        self._ts_source = source
        self._pid_pending = _REBASE

    def _wall_ticks(self, clock_rate: int, now: float) -> int:
        """Clock ticks since the newest forwarded packet, at least one."""
        last_now = self._last_now
        if last_now is None:
            return 1
        return max(1, round((now - last_now) * clock_rate))

    def _skip_seqs(self, hi: int, ext: int) -> None:
        """Input numbers between the newest `hi` and `ext`, skipped while paused, take no output numbers."""
        self._cover_seqs(hi + 1)
        ring = self._ring
        for e in range(max(hi + 1, ext - SEQ_WINDOW), ext):
            ring[e & _SEQ_MASK] = None  # type: ignore[index]
        self._seq_off -= ext - hi - 1
        self._in_hi = ext - 1

    def _skip_pids(self, hi: int, ext: int) -> None:
        self._cover_pids(hi + 1)
        ring = self._pid_ring
        for e in range(max(hi + 1, ext - PICTURE_ID_WINDOW), ext):
            ring[e & _PID_MASK] = None  # type: ignore[index]
        self._pid_off -= ext - hi - 1
        self._pid_hi = ext - 1

    def _drop_seq(self, hi: int, ext: int) -> bool:
        """Drop input number `ext` (in the window); True when its output number is given back."""
        if ext > hi:  # the newest: simply takes no number
            self._cover_seqs(hi + 1)
            self._fill_seqs(hi, ext, self._seq_off)
            self._ring[ext & _SEQ_MASK] = None  # type: ignore[index]
            self._seq_off -= 1
            self._in_hi = ext
            return True
        self._cover_seqs(ext)
        ring = self._ring
        slot = ext & _SEQ_MASK
        if ring[slot] is None:  # type: ignore[index]
            return False  # dropped already
        ring[slot] = None  # type: ignore[index]
        if ext <= self._sent_hi:
            return False  # later packets went out already: its number stays a hole
        # Nothing after it went out yet: everything above it moves down one.
        for e in range(ext + 1, hi + 1):
            off = ring[e & _SEQ_MASK]  # type: ignore[index]
            if off is not None:
                ring[e & _SEQ_MASK] = off - 1  # type: ignore[index]
        self._seq_off -= 1
        return True

    def _cover_seqs(self, lo: int) -> None:
        """Make the ring authoritative for input numbers from `lo` (≤ newest + 1) up."""
        ring = self._ring
        if ring is None:
            ring = self._ring = [None] * SEQ_WINDOW
        if not self._ringed:
            self._ringed = True
            self._ring_from = self._in_hi + 1
        start = self._ring_from
        if lo < start:
            off0 = self._seq_off0
            for e in range(max(lo, self._in_hi - SEQ_WINDOW + 1), start):
                ring[e & _SEQ_MASK] = off0
            self._ring_from = lo

    def _fill_seqs(self, hi: int, ext: int, off: int) -> None:
        """Numbers skipped between the newest `hi` and `ext` (lost or late) keep the current offset."""
        ring = self._ring
        for e in range(max(hi + 1, ext - SEQ_WINDOW), ext):
            ring[e & _SEQ_MASK] = off  # type: ignore[index]
        ring[ext & _SEQ_MASK] = off  # type: ignore[index]

    def _cover_pids(self, lo: int) -> None:
        ring = self._pid_ring
        if ring is None:
            ring = self._pid_ring = [None] * PICTURE_ID_WINDOW
        if not self._pid_ringed:
            self._pid_ringed = True
            self._pid_from = self._pid_hi + 1
        start = self._pid_from
        if lo < start:
            off0 = self._pid_off0
            for e in range(max(lo, self._pid_hi - PICTURE_ID_WINDOW + 1), start):
                ring[e & _PID_MASK] = off0
            self._pid_from = lo

    def _fill_pids(self, hi: int, ext: int, off: int) -> None:
        ring = self._pid_ring
        for e in range(max(hi + 1, ext - PICTURE_ID_WINDOW), ext + 1):
            ring[e & _PID_MASK] = off  # type: ignore[index]
