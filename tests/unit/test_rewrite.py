"""StreamRewriter: simulcast sources with unrelated bases switched on keyframes, temporal layers dropped,
pauses, upstream loss and reordering, wrap-around of every counter, all as one continuous stream out.

Every test runs twice: on the pure-Python reference (huddle/sfu/rewrite.py) and on the compiled one
(huddle/sfu/_rewrite.c), which tests/unit/test_fastpath.py also holds byte for byte against the reference."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from huddle.rtc.rtp import ExtendedSeq, ExtendedTimestamp, RtpPacket, payload_offset
from huddle.sfu import _rewrite, rewrite
from huddle.sfu.rewrite import PICTURE_ID_WINDOW, SEQ_WINDOW, StreamRewriter
from huddle.sfu.vp8 import Vp8Info, parse_descriptor

IMPLEMENTATIONS = {"reference": rewrite.StreamRewriter, "compiled": _rewrite.StreamRewriter}


@pytest.fixture(autouse=True, params=list(IMPLEMENTATIONS))
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests below name `StreamRewriter`: this makes it one implementation, then the other."""
    monkeypatch.setitem(globals(), "StreamRewriter", IMPLEMENTATIONS[request.param])


CLOCK = 90_000
FPS = 30
OUT_SSRC = 0x5EED5EED
KEY_HEADER = bytes.fromhex("5002009d012a80024001")
DELTA_HEADER = bytes.fromhex("3102005a")


# --- a simulated publisher ------------------------------------------------------------------------------


@dataclass
class Pkt:
    source: int
    seq: int
    ts: int
    buf: bytes
    off: int
    info: Vp8Info | None
    tid: int
    key: bool  # first packet of a keyframe
    frame: int  # index of the frame on the shared timeline
    first: bool  # first packet of its frame
    pid: int | None


class Source:
    """One simulcast layer: its own SSRC, sequence numbers, timestamp base, picture ids and TL0PICIDX."""

    def __init__(self, sid, rng, *, seq=None, ts=None, pid=None, tl0=None, pid15=True, per_frame=3, vp8=True):
        self.sid = sid
        self.seq = rng.randrange(1 << 16) if seq is None else seq
        self.ts0 = rng.randrange(1 << 32) if ts is None else ts
        self.pid = rng.randrange(1 << 15) if pid is None else pid
        self.tl0 = rng.randrange(256) if tl0 is None else tl0
        self.pid15 = pid15
        self.per_frame = per_frame
        self.vp8 = vp8

    def frame(self, n: int, *, key=False, tid=None, packets=None) -> list[Pkt]:
        """Frame `n` of the shared 30 fps timeline (T0 on even frames, T1 on odd ones unless `tid`)."""
        tid = (0 if key else n % 2) if tid is None else tid
        ts = (self.ts0 + n * CLOCK // FPS) & 0xFFFFFFFF
        if tid == 0:
            self.tl0 = (self.tl0 + 1) & 0xFF
        out = []
        count = self.per_frame if packets is None else packets
        for i in range(count):
            if self.vp8:
                desc = bytearray([0x80 | (0x10 if i == 0 else 0), 0xE0])
                if self.pid15:
                    desc += bytes([0x80 | (self.pid >> 8), self.pid & 0xFF])
                else:
                    desc.append(self.pid & 0x7F)
                desc += bytes([self.tl0, (tid << 6) | (0x20 if key else 0)])
                body = (KEY_HEADER if key else DELTA_HEADER) if i == 0 else b"\x00\x01\x02"
                payload = bytes(desc) + body + bytes([self.sid, i])
            else:
                payload = b"\xfc" + bytes([self.sid, i])
            raw = RtpPacket(
                payload_type=96,
                seq=self.seq,
                timestamp=ts,
                ssrc=0x1000 + self.sid,
                payload=payload,
                marker=i == count - 1,
                extensions={3: bytes([self.sid])},
            ).serialize()
            off = payload_offset(raw)
            info = parse_descriptor(raw, off) if self.vp8 else None
            out.append(
                Pkt(
                    self.sid,
                    self.seq,
                    ts,
                    raw,
                    off,
                    info,
                    tid,
                    key and i == 0,
                    n,
                    i == 0,
                    self.pid if self.vp8 else None,
                )
            )
            self.seq = (self.seq + 1) & 0xFFFF
        self.pid = (self.pid + 1) & (0x7FFF if self.pid15 else 0x7F)
        return out


@dataclass
class Out:
    seq: int
    ts: int
    pid: int | None
    pid15: bool
    tl0: int | None
    pkt: Pkt


class Sink:
    """Feeds a StreamRewriter like a Consumer would and records what the subscriber receives."""

    def __init__(self, rw: StreamRewriter, clock=CLOCK) -> None:
        self.rw = rw
        self.clock = clock
        self.out: list[Out] = []

    def send(self, pkt: Pkt, now: float) -> bool:
        buf = bytearray(pkt.buf)
        ok = self.rw.rewrite(buf, pkt.off, pkt.source, pkt.seq, pkt.ts, self.clock, now, pkt.info)
        if not ok:
            assert buf == pkt.buf, "a refused packet must be left as it was"
            return False
        parsed = RtpPacket.parse(buf)
        assert parsed.ssrc == self.rw.ssrc
        assert parsed.payload_type == 96 and parsed.extensions == {3: bytes([pkt.source])}
        info = parse_descriptor(parsed.payload) if pkt.info is not None else None
        if info is not None:
            # Only picture id and TL0PICIDX may change in the payload.
            assert info.tid == pkt.info.tid and info.size == pkt.info.size
            assert info.is_keyframe == pkt.info.is_keyframe
            assert parsed.payload[info.size :] == pkt.buf[pkt.off + info.size :]
        self.out.append(
            Out(
                parsed.seq,
                parsed.timestamp,
                None if info is None else info.picture_id,
                info is not None and info.picture_id_15bit,
                None if info is None else info.tl0picidx,
                pkt,
            )
        )
        return True

    def seqs(self) -> list[int]:
        ext = ExtendedSeq()
        return [ext.update(o.seq) for o in self.out]

    def timestamps(self) -> list[int]:
        ext = ExtendedTimestamp()
        return [ext.update(o.ts) for o in self.out]

    def frames(self) -> list[Out]:
        """The first output packet of each frame."""
        return [o for o in self.out if o.pkt.first]


def diffs(values: list[int]) -> list[int]:
    return [b - a for a, b in itertools.pairwise(values)]


def pid_diffs(frames: list[Out]) -> list[int]:
    return [(b.pid - a.pid) & (0x7FFF if b.pid15 else 0x7F) for a, b in itertools.pairwise(frames)]


def tl0_diffs(frames: list[Out]) -> list[int]:
    tl0 = [f for f in frames if f.pkt.tid == 0]
    return [(b.tl0 - a.tl0) & 0xFF for a, b in itertools.pairwise(tl0)]


def frame_time(n: int, i: int = 0) -> float:
    return n / FPS + i * 0.001


def new_rewriter(**starts) -> StreamRewriter:
    return StreamRewriter(OUT_SSRC, **starts)


# --- one source -----------------------------------------------------------------------------------------


def test_nothing_before_the_first_switch():
    rw = new_rewriter()
    sink = Sink(rw)
    src = Source(1, random.Random(1))
    (pkt,) = src.frame(0, key=True, packets=1)
    assert not sink.send(pkt, 0.0)
    assert rw.paused and rw.source is None
    assert not rw.drop(1, pkt.seq, pkt.info)


def test_single_source_starts_where_asked_and_stays_continuous():
    rw = new_rewriter(seq_start=1000, ts_start=5000, picture_id_start=300, tl0picidx_start=7)
    sink = Sink(rw)
    src = Source(1, random.Random(2))
    rw.switch(1)
    for n in range(20):
        for i, pkt in enumerate(src.frame(n, key=n == 0)):
            assert sink.send(pkt, frame_time(n, i))
    first = sink.out[0]
    assert (first.seq, first.ts, first.pid, first.tl0) == (1000, 5000, 300, 7)
    assert diffs(sink.seqs()) == [1] * 59
    assert set(diffs([f.ts for f in sink.frames()])) == {3000}
    assert pid_diffs(sink.frames()) == [1] * 19
    assert tl0_diffs(sink.frames()) == [1] * 9
    # T1 frames carry the TL0PICIDX of the T0 frame before them.
    frames = sink.frames()
    assert all(frames[k].tl0 == frames[k - 1].tl0 for k in range(1, 20, 2))
    assert rw.timestamp_for(1, src.ts0 + 3000) == 8000
    assert rw.timestamp_for(2, src.ts0) is None


def test_packets_of_other_sources_are_refused_untouched():
    rw = new_rewriter()
    sink = Sink(rw)
    a, b = Source(1, random.Random(3)), Source(2, random.Random(4))
    rw.switch(1)
    for n in range(4):
        for pkt in a.frame(n, key=n == 0):
            assert sink.send(pkt, frame_time(n))
        for pkt in b.frame(n, key=True):
            assert not sink.send(pkt, frame_time(n))
            assert not rw.drop(2, pkt.seq, pkt.info)
    assert len(sink.out) == 12


# --- simulcast switching --------------------------------------------------------------------------------


def run_simulcast(rng: random.Random, frames: int, want: dict[int, int], keys: dict[int, set[int]]):
    """Two (or more) sources send every frame; the Consumer wants `want[n]` from frame n on and switches on
    that source's next keyframe, as the caller of StreamRewriter does."""
    sources = {sid: Source(sid, rng, per_frame=rng.randint(1, 4)) for sid in keys}
    rw = new_rewriter()
    sink = Sink(rw)
    wanted = None
    switches = []
    for n in range(frames):
        wanted = want.get(n, wanted)
        for sid, src in sources.items():
            for i, pkt in enumerate(src.frame(n, key=n in keys[sid])):
                now = frame_time(n, i)
                if pkt.source == wanted and rw.source != wanted and pkt.key:
                    rw.switch(wanted)
                    switches.append(n)
                sent = sink.send(pkt, now)
                assert sent == (pkt.source == rw.source)
    return sink, switches


def assert_continuous(sink: Sink, *, frame_ticks: int = 3000) -> None:
    assert diffs(sink.seqs()) == [1] * (len(sink.out) - 1)
    ts = sink.timestamps()
    assert min(diffs(ts)) >= 0
    frames = sink.frames()
    for a, b in itertools.pairwise(frames):
        step = ExtendedTimestamp()
        step.update(a.ts)
        delta = step.update(b.ts) - a.ts
        if a.pkt.source == b.pkt.source:
            assert delta == frame_ticks * (b.pkt.frame - a.pkt.frame)
        else:  # across a switch: wall time, the last packet of the old frame to the keyframe
            assert b.pkt.key
            assert abs(delta - frame_ticks * (b.pkt.frame - a.pkt.frame)) <= 400
    assert pid_diffs(frames) == [1] * (len(frames) - 1)
    assert tl0_diffs(frames) == [1] * (len([f for f in frames if f.pkt.tid == 0]) - 1)


def test_simulcast_switches_back_and_forth_on_keyframes():
    sink, switches = run_simulcast(
        random.Random(5),
        90,
        want={0: 1, 5: 2, 15: 1, 43: 2, 52: 1, 70: 2},
        keys={1: {0, 20, 40, 56, 80}, 2: {10, 30, 50, 74}},
    )
    assert switches == [0, 10, 20, 50, 56, 74]
    assert_continuous(sink)
    sources = [o.pkt.source for o in sink.out]
    assert sources[0] == 1 and sources[-1] == 2
    # Every change of source starts on a keyframe.
    assert all(
        o.pkt.key for prev, o in zip(sink.out, sink.out[1:], strict=False) if prev.pkt.source != o.pkt.source
    )


@pytest.mark.parametrize("seed", range(10))
def test_simulcast_random_bases(seed):
    rng = random.Random(seed)
    keys = {sid: {0, *rng.sample(range(1, 120), 12)} for sid in (1, 2, 3)}
    want = {n: rng.choice([1, 2, 3]) for n in rng.sample(range(120), 15)}
    want[0] = 1
    sink, switches = run_simulcast(rng, 120, want, keys)
    assert len(switches) >= 2
    assert_continuous(sink)


def test_switch_timestamp_follows_wall_time_and_at_least_one_tick():
    rw = new_rewriter(ts_start=0)
    sink = Sink(rw)
    a, b = Source(1, random.Random(6)), Source(2, random.Random(7))
    rw.switch(1)
    sink.send(a.frame(0, key=True, packets=1)[0], 10.0)
    rw.switch(2)
    sink.send(b.frame(0, key=True, packets=1)[0], 10.5)  # half a second later
    assert sink.out[-1].ts == 45_000
    rw.switch(1)
    sink.send(a.frame(1, key=True, packets=1)[0], 10.5)  # no time at all: still forward by one tick
    assert sink.out[-1].ts == 45_001
    rw.switch(2)
    sink.send(b.frame(1, key=True, packets=1)[0], 10.4)  # a clock that went back: still forward
    assert sink.out[-1].ts == 45_002
    assert diffs(sink.seqs()) == [1, 1, 1]


def test_old_source_packets_after_the_switch_are_refused():
    rw = new_rewriter()
    sink = Sink(rw)
    a, b = Source(1, random.Random(8)), Source(2, random.Random(9))
    rw.switch(1)
    fa = a.frame(0, key=True, packets=4)
    for pkt in fa[:2]:
        assert sink.send(pkt, 0.0)
    rw.switch(2)
    assert not sink.send(fa[2], 0.001)  # still switching: the old layer's rest does not go
    for pkt in b.frame(0, key=True):
        assert sink.send(pkt, 0.002)
    assert not sink.send(fa[3], 0.003)
    assert diffs(sink.seqs()) == [1] * 4


def test_packets_before_the_switch_point_are_refused():
    rw = new_rewriter()
    sink = Sink(rw)
    a = Source(1, random.Random(10))
    early = a.frame(0)
    key = a.frame(1, key=True)
    rw.switch(1)
    assert sink.send(key[0], 0.0)
    for pkt in early:  # reordered behind the keyframe, but from before it
        assert not sink.send(pkt, 0.0)
    for pkt in key[1:]:
        assert sink.send(pkt, 0.0)
    assert diffs(sink.seqs()) == [1, 1]


# --- drops: temporal layers -----------------------------------------------------------------------------


def test_temporal_layer_dropping_leaves_no_gaps():
    rw = new_rewriter(seq_start=65530, picture_id_start=0x7FFD, tl0picidx_start=254)
    sink = Sink(rw)
    src = Source(1, random.Random(11), per_frame=3)
    rw.switch(1)
    target = 0
    for n in range(40):
        if n == 20:
            target = 1  # all layers from here
        for i, pkt in enumerate(src.frame(n, key=n == 0)):
            if pkt.tid > target:
                assert rw.drop(1, pkt.seq, pkt.info)
            else:
                assert sink.send(pkt, frame_time(n, i))
    assert len(sink.out) == 3 * (10 + 20)
    assert diffs(sink.seqs()) == [1] * (len(sink.out) - 1)
    assert pid_diffs(sink.frames()) == [1] * 29
    assert tl0_diffs(sink.frames()) == [1] * 19
    ts = [f.ts for f in sink.frames()]
    assert set(diffs(ts[:10])) == {6000} and set(diffs(ts[10:])) == {3000}


def test_temporal_dropping_across_simulcast_switches():
    rng = random.Random(12)
    a, b = Source(1, rng, per_frame=2), Source(2, rng, per_frame=4)
    rw = new_rewriter()
    sink = Sink(rw)
    keys = {1: {0, 30}, 2: {14}}
    want = {0: 1, 10: 2, 25: 1}
    wanted = None
    for n in range(50):
        wanted = want.get(n, wanted)
        target = 0 if n < 20 or n >= 40 else 1
        for src in (a, b):
            for i, pkt in enumerate(src.frame(n, key=n in keys[src.sid])):
                if pkt.source == wanted and rw.source != wanted and pkt.key:
                    rw.switch(wanted)
                if pkt.source != rw.source:
                    continue
                if pkt.tid > target:
                    assert rw.drop(pkt.source, pkt.seq, pkt.info)
                else:
                    assert sink.send(pkt, frame_time(n, i))
    assert diffs(sink.seqs()) == [1] * (len(sink.out) - 1)
    frames = sink.frames()
    assert pid_diffs(frames) == [1] * (len(frames) - 1)
    assert tl0_diffs(frames) == [1] * (len([f for f in frames if f.pkt.tid == 0]) - 1)
    assert min(diffs(sink.timestamps())) >= 0


# --- loss, reordering, duplicates -----------------------------------------------------------------------


def linear(rw: StreamRewriter, frames: int, per_frame=3, seed=13, **kw):
    src = Source(1, random.Random(seed), per_frame=per_frame, **kw)
    rw.switch(1)
    return [p for n in range(frames) for p in src.frame(n, key=n == 0)]


def test_upstream_loss_shows_as_a_gap_and_a_late_arrival_fills_it():
    rw = new_rewriter(seq_start=100)
    sink = Sink(rw)
    pkts = linear(rw, 6)
    lost = pkts[7]
    for pkt in pkts:
        if pkt is not lost:
            assert sink.send(pkt, 0.0)
    seqs = sink.seqs()
    assert 107 not in seqs and diffs(seqs).count(2) == 1 and diffs(seqs).count(1) == len(seqs) - 2
    assert sink.send(lost, 0.1)  # the publisher's retransmission, late
    assert sink.out[-1].seq == 107
    assert sink.out[-1].pid == sink.frames()[2].pid


def test_upstream_loss_before_a_dropped_frame_keeps_its_gap():
    rw = new_rewriter(seq_start=0)
    sink = Sink(rw)
    pkts = linear(rw, 4)  # frames: T0 key (0-2), T1 (3-5), T0 (6-8), T1 (9-11)
    for pkt in pkts:
        if pkt.seq == pkts[1].seq:
            continue  # lost upstream
        if pkt.tid == 1:
            assert rw.drop(1, pkt.seq, pkt.info)
        else:
            sink.send(pkt, 0.0)
    assert sink.seqs() == [0, 2, 3, 4, 5]  # 1 is still missing: the subscriber NACKs it
    assert sink.send(pkts[1], 0.0) and sink.out[-1].seq == 1


def test_reordering_around_a_drop():
    rw = new_rewriter(seq_start=0, picture_id_start=0)
    sink = Sink(rw)
    pkts = linear(rw, 3)  # T0 (0,1,2) T1 (3,4,5) T0 (6,7,8)
    order = [0, 1, 3, 2, 5, 4, 6, 8, 7]
    for k in order:
        pkt = pkts[k]
        if pkt.tid == 1:
            rw.drop(1, pkt.seq, pkt.info)
        else:
            assert sink.send(pkt, 0.0)
    by_input = {o.pkt.seq - pkts[0].seq: o.seq for o in sink.out}
    assert by_input == {0: 0, 1: 1, 2: 2, 6: 3, 7: 4, 8: 5}
    assert [o.pid for o in sink.out] == [0, 0, 0, 1, 1, 1]


def test_late_drop_inside_an_unsent_tail_gives_its_number_back():
    # Packets of a dropped frame arrive in reverse: nothing after them was sent, so no hole.
    rw = new_rewriter(seq_start=0)
    sink = Sink(rw)
    pkts = linear(rw, 3)
    for k in [0, 1, 2, 5, 4, 3, 6, 7, 8]:
        pkt = pkts[k]
        if pkt.tid == 1:
            assert rw.drop(1, pkt.seq, pkt.info)
        else:
            assert sink.send(pkt, 0.0)
    assert sink.seqs() == [0, 1, 2, 3, 4, 5]


def test_late_drop_after_later_packets_went_out_leaves_a_hole():
    rw = new_rewriter(seq_start=0, picture_id_start=0)
    sink = Sink(rw)
    pkts = linear(rw, 3)
    for k in [0, 1, 2, 3, 4, 6, 7, 8]:
        pkt = pkts[k]
        if pkt.tid == 1:
            assert rw.drop(1, pkt.seq, pkt.info)
        else:
            assert sink.send(pkt, 0.0)
    # 5 (T1) was still on its way when 6 went out: its number is taken, the subscriber sees a hole.
    assert sink.seqs() == [0, 1, 2, 4, 5, 6]
    assert not rw.drop(1, pkts[5].seq, pkts[5].info)
    assert not sink.send(pkts[5], 0.0)  # and were it offered, it is not sent either
    assert [o.pid for o in sink.out] == [0, 0, 0, 1, 1, 1]


def test_late_packet_of_a_dropped_frame_is_refused():
    rw = new_rewriter(seq_start=0)
    sink = Sink(rw)
    pkts = linear(rw, 3)
    for k in [0, 1, 2, 3, 4, 6]:
        pkt = pkts[k]
        if pkt.tid == 1:
            rw.drop(1, pkt.seq, pkt.info)
        else:
            sink.send(pkt, 0.0)
    # The caller changed its mind about T1 just now: the rest of a dropped frame still stays out.
    assert not sink.send(pkts[5], 0.0)
    for pkt in pkts[7:]:
        assert sink.send(pkt, 0.0)
    assert sink.seqs() == [0, 1, 2, 4, 5, 6]


def test_a_dropped_frame_takes_its_later_packets_with_it():
    rw = new_rewriter(seq_start=0)
    sink = Sink(rw)
    pkts = linear(rw, 3)
    for pkt in pkts[:3]:
        sink.send(pkt, 0.0)
    assert rw.drop(1, pkts[3].seq, pkts[3].info)  # the first packet of the T1 frame
    assert not sink.send(pkts[4], 0.0)  # the rest of that frame: dropped with it, numbers given back
    assert not sink.send(pkts[5], 0.0)
    for pkt in pkts[6:]:
        assert sink.send(pkt, 0.0)
    assert sink.seqs() == [0, 1, 2, 3, 4, 5]
    assert pid_diffs(sink.frames()) == [1]


def test_duplicates_go_again_with_the_same_numbers():
    rw = new_rewriter(seq_start=0)
    sink = Sink(rw)
    pkts = linear(rw, 3)
    for pkt in pkts:
        sink.send(pkt, 0.0)
    first = {o.pkt.seq: (o.seq, o.pid, o.tl0, o.ts) for o in sink.out}
    sink.out.clear()
    for pkt in reversed(pkts):
        assert sink.send(pkt, 1.0)
    assert {o.pkt.seq: (o.seq, o.pid, o.tl0, o.ts) for o in sink.out} == first


def test_packets_beyond_the_window_are_refused():
    rw = new_rewriter()
    sink = Sink(rw)
    src = Source(1, random.Random(14), per_frame=8)
    rw.switch(1)
    pkts = [p for n in range(SEQ_WINDOW // 8 + 2) for p in src.frame(n, key=n == 0)]
    for pkt in pkts[1:]:  # the first packet never came: the keyframe's second one is the switch point
        assert sink.send(pkt, 0.0)
    assert not sink.send(pkts[0], 0.0)  # before the switch point
    assert not sink.send(pkts[5], 0.0)  # more than SEQ_WINDOW behind the newest
    assert sink.send(pkts[-SEQ_WINDOW], 0.0)  # just inside: a retransmission goes again


def test_frames_beyond_the_picture_id_window_are_refused():
    rw = new_rewriter()
    sink = Sink(rw)
    src = Source(1, random.Random(14), per_frame=1)
    rw.switch(1)
    pkts = [src.frame(n, key=n == 0)[0] for n in range(PICTURE_ID_WINDOW + 2)]
    for pkt in pkts:
        assert sink.send(pkt, 0.0)
    assert not sink.send(pkts[1], 0.0)
    assert sink.send(pkts[3], 0.0)


# --- wrap-around ----------------------------------------------------------------------------------------


def test_input_wraps():
    """Input seq 65535 → 0, timestamp 2**32 → 0, picture id 0x7FFF → 0 and TL0PICIDX 255 → 0."""
    rw = new_rewriter(seq_start=10, ts_start=10, picture_id_start=10, tl0picidx_start=10)
    sink = Sink(rw)
    src = Source(1, random.Random(15), seq=65530, ts=(1 << 32) - 4000, pid=0x7FFD, tl0=253)
    rw.switch(1)
    for n in range(8):
        for pkt in src.frame(n, key=n == 0):
            if pkt.tid:
                rw.drop(1, pkt.seq, pkt.info)
            else:
                assert sink.send(pkt, n / FPS)
    assert sink.seqs() == list(range(10, 22))
    assert [f.ts for f in sink.frames()] == [10, 6010, 12010, 18010]
    assert [f.pid for f in sink.frames()] == [10, 11, 12, 13]
    assert [f.tl0 for f in sink.frames()] == [10, 11, 12, 13]


def test_output_wraps():
    rw = new_rewriter(
        seq_start=65534, ts_start=(1 << 32) - 3000, picture_id_start=0x7FFE, tl0picidx_start=254
    )
    sink = Sink(rw)
    src = Source(1, random.Random(16), per_frame=2)
    rw.switch(1)
    for n in range(4):
        for pkt in src.frame(n, key=n == 0, tid=0):
            sink.send(pkt, 0.0)
    assert [o.seq for o in sink.out] == [65534, 65535, 0, 1, 2, 3, 4, 5]
    assert [f.ts for f in sink.frames()] == [(1 << 32) - 3000, 0, 3000, 6000]
    assert [f.pid for f in sink.frames()] == [0x7FFE, 0x7FFF, 0, 1]
    assert [f.tl0 for f in sink.frames()] == [254, 255, 0, 1]


def test_wrap_across_a_switch():
    rw = new_rewriter(seq_start=65535, picture_id_start=0x7FFF, tl0picidx_start=255)
    sink = Sink(rw)
    a = Source(1, random.Random(17), seq=65535, pid=0x7FFF, tl0=254, per_frame=1)
    b = Source(2, random.Random(18), seq=0, pid=0, tl0=0, per_frame=1)
    rw.switch(1)
    sink.send(a.frame(0, key=True)[0], 0.0)
    b.frame(0)
    rw.switch(2)
    sink.send(b.frame(1, key=True)[0], 1 / FPS)
    assert [o.seq for o in sink.out] == [65535, 0]
    assert [o.pid for o in sink.out] == [0x7FFF, 0]
    assert [o.tl0 for o in sink.out] == [255, 0]


def test_seven_bit_picture_ids():
    rw = new_rewriter(picture_id_start=0x7E)
    sink = Sink(rw)
    src = Source(1, random.Random(19), pid=0x7D, pid15=False, per_frame=2)
    rw.switch(1)
    for n in range(200):
        for pkt in src.frame(n, key=n == 0):
            if pkt.tid:
                assert rw.drop(1, pkt.seq, pkt.info)
            else:
                sink.send(pkt, 0.0)
    frames = sink.frames()
    assert not any(f.pid15 for f in frames)
    assert frames[0].pid == 0x7E and frames[1].pid == 0x7F and frames[2].pid == 0
    assert pid_diffs(frames) == [1] * 99


# --- pause, resume, audio -------------------------------------------------------------------------------


def test_audio_pause_and_resume_on_the_same_source():
    """Top-N gating of audio: the same source, no VP8; time passes during the pause."""
    rw = new_rewriter(seq_start=500, ts_start=0)
    sink = Sink(rw, clock=48_000)
    src = Source(1, random.Random(20), vp8=False, per_frame=1)
    rw.switch(1)
    for n in range(100):
        (pkt,) = src.frame(n)
        if n == 30:
            rw.pause()
            assert rw.paused
        if n == 70:
            rw.resume()
        sent = sink.send(pkt, n * 0.02)
        assert sent == (n < 30 or n >= 70)
    assert sink.seqs() == list(range(500, 560))
    # The source's own clock kept its offset: output minus input timestamp never changed.
    assert {(o.ts - o.pkt.ts) & 0xFFFFFFFF for o in sink.out} == {(-src.ts0) & 0xFFFFFFFF}
    assert diffs(sink.timestamps())[29] == 41 * 3000  # Source's clock: 3000 per "frame" (1 in 30 s)


def test_video_pause_and_resume_on_a_keyframe():
    rw = new_rewriter(picture_id_start=0, tl0picidx_start=0)
    sink = Sink(rw)
    src = Source(1, random.Random(21))
    rw.switch(1)
    for n in range(60):
        if n == 10:
            rw.pause()
        resumed = False
        for i, pkt in enumerate(src.frame(n, key=n in (0, 40))):
            if n >= 30 and rw.paused and pkt.key:
                rw.switch(1)  # resume where the keyframe starts
                resumed = True
            sink.send(pkt, frame_time(n, i))
        assert not resumed or n == 40
    assert_continuous(sink)
    frames = sink.frames()
    gap = [b.ts - a.ts for a, b in itertools.pairwise(frames) if b.pkt.frame - a.pkt.frame > 1]
    assert gap == [31 * 3000]  # frame 9 → frame 40: its own clock


def test_resume_on_a_source_whose_clock_went_back_uses_wall_time():
    rw = new_rewriter(ts_start=1000)
    sink = Sink(rw)
    src = Source(1, random.Random(22), ts=50_000, per_frame=1)
    rw.switch(1)
    sink.send(src.frame(0, key=True)[0], 0.0)
    rw.pause()
    src.ts0 = 10_000  # the publisher restarted its encoder under the same source id
    rw.resume()
    sink.send(src.frame(0, key=True)[0], 2.0)
    assert [o.ts for o in sink.out] == [1000, 1000 + 2 * CLOCK]


def test_switch_to_the_current_source_closes_the_pause_gap_without_pause():
    """A Consumer that simply stopped calling rewrite (not pause()) and then resumes."""
    rw = new_rewriter(seq_start=0, picture_id_start=0)
    sink = Sink(rw)
    pkts = linear(rw, 10)
    for pkt in pkts[:6]:
        sink.send(pkt, 0.0)
    rw.resume()
    for pkt in pkts[24:]:
        sink.send(pkt, 0.0)
    assert sink.seqs() == list(range(12))
    assert pid_diffs(sink.frames()) == [1, 1, 1]


def test_resume_keeps_the_mapping_for_packets_reordered_around_it():
    rw = new_rewriter(seq_start=0, picture_id_start=0)
    sink = Sink(rw)
    pkts = linear(rw, 8, per_frame=2)  # frames of 2 packets; frame k = pkts[2k], pkts[2k + 1]
    for k in [0, 1, 2, 4, 3]:  # 3 is late
        assert sink.send(pkts[k], 0.0)
    rw.pause()
    for k in [5, 6]:
        assert not sink.send(pkts[k], 0.0)
    rw.resume()  # (the caller would wait for a keyframe; the rewriter does not care)
    for k in [7, 8, 9]:  # 7 belongs to frame 3, like 6: the frame was cut by the pause
        assert sink.send(pkts[k], 0.0)
    assert [o.seq for o in sink.out] == [0, 1, 2, 4, 3, 5, 6, 7]
    assert [o.pid for o in sink.out] == [0, 0, 1, 2, 1, 3, 4, 4]
    assert not sink.send(pkts[5], 0.0)  # skipped while paused: its number went to the next one
    assert sink.send(pkts[3], 0.0) and sink.out[-1].seq == 3  # a duplicate from before: same number


def test_resume_reordered_behind_the_newest_fills_its_reserved_number():
    rw = new_rewriter(seq_start=0)
    sink = Sink(rw)
    pkts = linear(rw, 4)
    for k in [0, 1, 2, 3, 5]:
        assert sink.send(pkts[k], 0.0)
    rw.pause()
    rw.resume()
    for k in [4, 6, 7]:  # the first packet after the resume is older than the newest: it has its number
        assert sink.send(pkts[k], 0.0)
    assert sink.seqs() == [0, 1, 2, 3, 5, 4, 6, 7]


def test_switch_to_the_same_source_with_nothing_skipped_changes_nothing():
    a = new_rewriter(seq_start=9, ts_start=9, picture_id_start=9, tl0picidx_start=9)
    b = new_rewriter(seq_start=9, ts_start=9, picture_id_start=9, tl0picidx_start=9)
    sa, sb = Sink(a), Sink(b)
    pa, pb = linear(a, 10), linear(b, 10)
    for k, (x, y) in enumerate(zip(pa, pb, strict=True)):
        if k % 4 == 3:
            a.switch(1)
        assert sa.send(x, k * 0.01) and sb.send(y, k * 0.01)
    assert [(o.seq, o.ts, o.pid, o.tl0) for o in sa.out] == [(o.seq, o.ts, o.pid, o.tl0) for o in sb.out]


def test_resume_after_a_long_absence_maps_afresh_on_its_own_clock():
    rw = new_rewriter(seq_start=0, ts_start=0, picture_id_start=0)
    sink = Sink(rw)
    src = Source(1, random.Random(23), per_frame=1)
    rw.switch(1)
    sink.send(src.frame(0, key=True)[0], 0.0)
    rw.pause()
    for n in range(1, SEQ_WINDOW + 50):
        src.frame(n)  # unseen: the Consumer was paused and did not even call rewrite()
    rw.resume()
    n = SEQ_WINDOW + 50
    sink.send(src.frame(n, key=True)[0], 40.0)
    assert [o.seq for o in sink.out] == [0, 1]
    assert [o.pid for o in sink.out] == [0, 1]
    assert [o.ts for o in sink.out] == [0, n * 3000]


def test_resume_on_a_delta_frame_keeps_tl0picidx():
    rw = new_rewriter(tl0picidx_start=50)
    sink = Sink(rw)
    pkts = linear(rw, 6, per_frame=1)  # T0 T1 T0 T1 T0 T1
    sink.send(pkts[0], 0.0)
    rw.pause()
    rw.resume()
    for pkt in pkts[3:]:  # T1 (of the skipped T0 frame 2), T0, T1
        sink.send(pkt, 0.0)
    assert [o.tl0 for o in sink.out] == [50, 50, 51, 51]
    assert pid_diffs(sink.frames()) == [1, 1, 1]


def test_drop_while_paused_or_switching_does_nothing():
    rw = new_rewriter(seq_start=0)
    sink = Sink(rw)
    pkts = linear(rw, 3)
    sink.send(pkts[0], 0.0)
    rw.pause()
    assert not rw.drop(1, pkts[1].seq)
    rw.switch(1)
    assert not rw.drop(1, pkts[1].seq)  # the switch point is the next packet given to rewrite()
    assert sink.send(pkts[2], 0.0)
    assert sink.seqs() == [0, 1]


# --- generated operation sequences ----------------------------------------------------------------------


@st.composite
def scenarios(draw):
    n_sources = draw(st.integers(1, 3))
    frames = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    return {
        "n_sources": n_sources,
        "frames": frames,
        "seed": seed,
        "keys": draw(st.lists(st.booleans(), min_size=frames * n_sources, max_size=frames * n_sources)),
        "loss": draw(st.floats(0, 0.3)),
        "window": draw(st.integers(0, 6)),
        "dup": draw(st.floats(0, 0.1)),
        "events": draw(
            st.lists(
                st.tuples(
                    st.integers(0, max(0, frames - 1)), st.sampled_from(["want", "target", "pause", "resume"])
                ),
                max_size=8,
            )
        ),
        "pid15": draw(st.booleans()),
        "starts": draw(
            st.fixed_dictionaries(
                {
                    "seq_start": st.integers(0, 65535),
                    "ts_start": st.integers(0, 2**32 - 1),
                    "picture_id_start": st.integers(0, 0x7FFF),
                    "tl0picidx_start": st.integers(0, 255),
                }
            )
        ),
    }


def simulate(sc):
    rng = random.Random(sc["seed"])
    sources = [
        Source(
            sid,
            rng,
            seq=rng.choice([None, 65534]),
            ts=rng.choice([None, 2**32 - 5000]),
            pid=rng.choice([None, 0x7FFE]),
            tl0=rng.choice([None, 254]),
            pid15=sc["pid15"],
            per_frame=rng.randint(1, 4),
        )
        for sid in range(sc["n_sources"])
    ]
    # Generate every packet of every source, frame by frame, with its send time.
    timeline = []
    for n in range(sc["frames"]):
        for src in sources:
            key = sc["keys"][n * len(sources) + src.sid] or n == 0
            for i, pkt in enumerate(src.frame(n, key=key)):
                timeline.append((frame_time(n, i), pkt))
    arrived = [(t, p) for t, p in timeline if rng.random() >= sc["loss"]]
    lost = len(timeline) - len(arrived)
    # Reorder within a window, and duplicate a few.
    keyed = sorted(
        ((k + rng.uniform(0, sc["window"]), t, p) for k, (t, p) in enumerate(arrived)), key=lambda x: x[0]
    )
    order = []
    for _, t, p in keyed:
        order.append((t, p))
        if rng.random() < sc["dup"]:
            order.append((t, p))
    events = {}
    for n, what in sc["events"]:
        events.setdefault(n, []).append(what)

    rw = StreamRewriter(OUT_SSRC, **sc["starts"])
    sink = Sink(rw)
    wanted, target, paused = 0, 1, False
    seen_frames = set()
    segment_hi: dict = {}  # per switch: the newest input seq (extended) offered so far
    segment = 0
    newest_flags = []
    late_drops = 0
    refused_by_source = Counter()
    forwarded_sources = set()
    for t, pkt in order:
        if pkt.frame not in seen_frames:
            seen_frames.add(pkt.frame)
            for what in events.get(pkt.frame, []):
                if what == "want":
                    wanted = rng.randrange(len(sources))
                elif what == "target":
                    target = rng.choice([0, 1])
                elif what == "pause" and not paused:
                    rw.pause()
                    paused = True
                elif what == "resume":
                    paused = False  # resume on the next keyframe of the wanted source
        if not paused and pkt.key and pkt.source == wanted and (rw.source != wanted or rw.paused):
            if rw.source != wanted:  # another source: a new stretch; the same one resumed goes on
                segment += 1
                segment_hi[segment] = ExtendedSeq()
            rw.switch(wanted)
            forwarded_sources.add(wanted)
        if pkt.source != rw.source or rw.paused:
            assert not sink.send(pkt, t)
            # A late packet of a source forwarded before (or a packet reordered ahead of the keyframe that
            # starts its source) may have had a number reserved.
            refused_by_source[pkt.source] += 1
            continue
        hi = segment_hi[segment]
        before = hi.highest
        ext = hi.update(pkt.seq)
        is_newest = before is None or ext > before
        if pkt.tid > target:
            if not rw.drop(pkt.source, pkt.seq, pkt.info):
                late_drops += 1
        elif sink.send(pkt, t):
            newest_flags.append(is_newest)
        else:
            refused_by_source[pkt.source] += 1
    refused = sum(refused_by_source[s] for s in forwarded_sources)
    return sink, lost, late_drops, refused, newest_flags


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sc=scenarios())
def test_generated_operations(sc):
    sink, lost, late_drops, refused, newest_flags = simulate(sc)
    out = sink.out
    seqs = sink.seqs()
    # One output number, one input packet (duplicates of it aside).
    owner = {}
    for s, o in zip(seqs, out, strict=True):
        ident = (o.pkt.source, o.pkt.seq)
        assert owner.setdefault(s, ident) == ident
    # In-order input goes out in order: every packet that was the newest of its stretch gets a number above
    # every number before it; only late packets (reordered, retransmitted) fill in below.
    top = None
    for s, newest in zip(seqs, newest_flags, strict=True):
        if newest:
            assert top is None or s > top
        top = s if top is None else max(top, s)
    # Gaps only where something real is missing: a loss, a late drop, a packet refused as late.
    if seqs:
        missing = (max(seqs) - min(seqs) + 1) - len(set(seqs))
        assert missing <= lost + late_drops + refused
    # Picture ids: one per frame identity, never reused by another frame.
    pid_owner = {}
    for o in out:
        if o.pid is not None:
            ident = (o.pkt.source, o.pkt.pid)
            assert pid_owner.setdefault(o.pid, ident) == ident
    # Timestamps of in-order packets never go back.
    ts = sink.timestamps()
    in_order = [v for v, newest in zip(ts, newest_flags, strict=True) if newest]
    assert all(b >= a for a, b in itertools.pairwise(in_order))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sc=scenarios())
def test_generated_without_loss_or_reordering_is_gapless(sc):
    sc = {**sc, "loss": 0.0, "window": 0, "dup": 0.0}
    sink, lost, late_drops, _refused, newest_flags = simulate(sc)
    assert lost == late_drops == 0 and all(newest_flags)
    assert diffs(sink.seqs()) == [1] * (len(sink.out) - 1)
    frames = sink.frames()
    assert pid_diffs(frames) == [1] * (len(frames) - 1)
    assert tl0_diffs(frames) == [1] * (len([f for f in frames if f.pkt.tid == 0]) - 1)
    assert min(diffs(sink.timestamps()), default=0) >= 0
