"""RTP to whole frames for the recorder: VP8 frames rebuilt from packets built by hand (every descriptor
layout, loss, reordering, duplicates, wrap-around), Opus one packet per frame, and each participant's RTP
timestamps carried onto the server clock through its sender reports."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from huddle.recording.depacketize import (
    AssembledFrame,
    OpusDepacketizer,
    ParticipantClock,
    TimestampUnwrapper,
    Vp8Assembler,
)
from huddle.rtc import rtcp
from huddle.rtc.rtp import RtpPacket

# First octet: |X|R|N|S|R| PID |
X, N, S = 0x80, 0x20, 0x10
# Extension octet: |I|L|T|K| RSV |
PIC, L, T, K = 0x80, 0x40, 0x20, 0x10

# VP8 payload header (RFC 6386 §9.1): the frame tag's low bit P is 0 for a keyframe.
KEY_HEADER = bytes.fromhex("5002009d012a80024001")  # P=0, 640x320
DELTA_HEADER = bytes.fromhex("3102005a")  # P=1

# (name, extension octets after the first octet, or None for no X bit)
LAYOUTS = [
    ("no-extension", None),
    ("extension-empty", bytes([0x00])),
    ("pid7", bytes([PIC, 0x05])),
    ("pid15", bytes([PIC, 0x80 | 0x12, 0x34])),
    ("tl0", bytes([L, 0x2A])),
    ("tid", bytes([T, 0b01_1_00000])),
    ("keyidx", bytes([K, 0b00_0_00111])),
    ("pid7-tl0-tid", bytes([PIC | L | T, 0x7F, 0x09, 0b10_0_00000])),
    ("pid15-tl0-tid-keyidx", bytes([PIC | L | T | K, 0xFF, 0xFF, 0x00, 0b11_1_11111])),  # Chromium's
]
IDS = [name for name, _ in LAYOUTS]
EXTS = [ext for _, ext in LAYOUTS]

MASK32 = 0xFFFFFFFF


def descriptor(ext: bytes | None, start: bool, partition: int = 0, non_reference: bool = False) -> bytes:
    first = (S if start else 0) | partition | (N if non_reference else 0)
    return bytes([first]) if ext is None else bytes([first | X]) + ext


def rtp(seq: int, ts: int, payload: bytes, marker: bool = False, **fields) -> bytes:
    return RtpPacket(
        payload_type=96,
        seq=seq & 0xFFFF,
        timestamp=ts & MASK32,
        ssrc=0x1234,
        payload=payload,
        marker=marker,
        **fields,
    ).serialize()


def frame_data(key: bool, size: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    return (KEY_HEADER if key else DELTA_HEADER) + rng.randbytes(size)


def packetize(
    data: bytes, seq: int, ts: int, cuts: list[int], ext: bytes | None = None, marker: bool = True
) -> list[bytes]:
    """One frame as RTP packets cut at offsets `cuts`; S=1 on the first, the marker on the last."""
    bounds = [0, *sorted(cuts), len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    return [
        rtp(seq + i, ts, descriptor(ext, i == 0) + chunk, marker and i == len(chunks) - 1)
        for i, chunk in enumerate(chunks)
    ]


def run(depacketizer: Vp8Assembler | OpusDepacketizer, packets: list[bytes]) -> list[AssembledFrame]:
    """Every frame out: push, then pop until empty, then flush at the end."""
    out = []
    for packet in packets:
        frame = depacketizer.push(packet)
        while frame is not None:
            out.append(frame)
            frame = depacketizer.pop()
    return out + depacketizer.flush()


def stream(
    kinds: str, *, seq: int = 100, ts: int = 9000, step: int = 3000, size: int = 2500, per_frame: int = 3
) -> tuple[list[list[bytes]], list[bytes]]:
    """Frames of `kinds` ("K" keyframe, "d" delta) as packets (grouped per frame), and their data."""
    groups, datas = [], []
    for i, kind in enumerate(kinds):
        data = frame_data(kind == "K", size, seed=i)
        cuts = [len(data) * j // per_frame for j in range(1, per_frame)]
        groups.append(packetize(data, seq, ts + i * step, cuts, EXTS[-1]))
        datas.append(data)
        seq += per_frame
    return groups, datas


def flat(groups: list[list[bytes]]) -> list[bytes]:
    return [p for g in groups for p in g]


# --- TimestampUnwrapper -------------------------------------------------------------------------------------


def test_unwrapper_counts_on_across_the_wrap():
    u = TimestampUnwrapper()
    assert u.unwrap(MASK32 - 2999) == MASK32 - 2999
    assert u.unwrap(1) == MASK32 + 2  # wrapped
    assert u.unwrap(MASK32 - 100) == MASK32 - 100  # late, from before the wrap: not a new cycle
    assert u.unwrap(3001) == MASK32 + 3002
    assert u.highest == MASK32 + 3002


def test_unwrapper_takes_reordering_as_reordering():
    u = TimestampUnwrapper()
    assert [u.unwrap(t) for t in (6000, 3000, 9000, 0)] == [6000, 3000, 9000, 0]
    u = TimestampUnwrapper()
    assert u.unwrap(100) == 100
    assert u.unwrap(MASK32 - 100) == -101  # just before the first value, across the wrap


# --- Vp8Assembler: frames whole -----------------------------------------------------------------------------


@pytest.mark.parametrize("ext", EXTS, ids=IDS)
def test_a_frame_split_over_packets_comes_back_byte_identical(ext):
    data = frame_data(True, 3000)
    asm = Vp8Assembler()
    packets = packetize(data, 65000, 123456, [1, 1000, 2999], ext)
    frames = run(asm, packets)
    assert frames == [AssembledFrame(123456, True, data)]
    assert not asm.needs_keyframe
    assert asm.dropped_frames == 0


@pytest.mark.parametrize("ext", EXTS, ids=IDS)
def test_single_packet_frames_in_each_layout(ext):
    asm = Vp8Assembler()
    frames = []
    for i, key in enumerate([True, False, False, True, False]):
        data = frame_data(key, 50, seed=i)
        (packet,) = packetize(data, i, 3000 * i, [], ext)
        frame = asm.push(packet)
        assert frame == AssembledFrame(3000 * i, key, data)
        frames.append(frame)
    assert asm.pop() is None


def test_the_frame_is_complete_when_pushing_its_last_packet():
    groups, datas = stream("Kd")
    asm = Vp8Assembler()
    for packet in groups[0][:-1]:
        assert asm.push(packet) is None
    assert asm.push(groups[0][-1]) == AssembledFrame(9000, True, datas[0])


def test_later_partitions_are_part_of_the_same_frame():
    data = frame_data(True, 900)
    parts = [data[:300], data[300:600], data[600:]]
    packets = [
        rtp(1, 90, descriptor(None, True, 0) + parts[0]),
        rtp(2, 90, descriptor(None, True, 1) + parts[1]),  # S=1 starts partition 1, not a new frame
        rtp(3, 90, descriptor(None, False, 1) + parts[2], marker=True),
    ]
    assert run(Vp8Assembler(), packets) == [AssembledFrame(90, True, data)]


def test_header_extensions_csrcs_and_padding_are_not_payload():
    data = frame_data(True, 400)
    first = RtpPacket(
        payload_type=96,
        seq=7,
        timestamp=1,
        ssrc=1,
        payload=descriptor(EXTS[-1], True) + data[:200],
        csrcs=[5, 6],
        extension_profile=0xBEDE,
        extensions={1: b"\x01\x02", 3: b"video"},
        padding=7,
    ).serialize()
    second = RtpPacket(
        payload_type=96,
        seq=8,
        timestamp=1,
        ssrc=1,
        payload=descriptor(EXTS[-1], False) + data[200:],
        marker=True,
    ).serialize()
    assert run(Vp8Assembler(), [first, second]) == [AssembledFrame(1, True, data)]


def test_every_buffer_type_is_accepted_and_reused_buffers_are_safe():
    groups, datas = stream("Kd")
    asm = Vp8Assembler()
    out = []
    buf = bytearray(2000)
    for kind, packet in zip([bytes, bytearray, memoryview] * 2, flat(groups), strict=True):
        if kind is bytearray:
            # The caller's receive buffer: overwritten after the call.
            buf[:] = packet
            frame = asm.push(buf)
            buf[:] = b"\xee" * len(buf)
        else:
            frame = asm.push(kind(packet))
        if frame:
            out.append(frame.data)
    assert out == datas


def test_a_missing_marker_ends_the_frame_when_the_timestamp_changes():
    key, delta = frame_data(True, 100), frame_data(False, 100)
    packets = [
        *packetize(key, 1, 3000, [50], marker=False),
        *packetize(delta, 3, 6000, [], marker=True),
    ]
    asm = Vp8Assembler()
    assert asm.push(packets[0]) is None
    assert asm.push(packets[1]) is None
    # The next frame's single packet ends the keyframe and is whole itself: two frames out of one push.
    assert asm.push(packets[2]) == AssembledFrame(3000, True, key)
    assert asm.pop() == AssembledFrame(6000, False, delta)
    assert asm.pop() is None


def test_padding_only_packets_take_a_sequence_number_without_breaking_the_chain():
    # Two packets between frame 0 (seqs 10-11) and frame 1 carry no payload: padding for bandwidth probing,
    # and an empty one.
    padding = RtpPacket(payload_type=96, seq=12, timestamp=9000, ssrc=0x1234, padding=224).serialize()
    empty = rtp(13, 9000, b"")
    groups, datas = stream("Kdd", per_frame=2, seq=10)
    groups[1:] = [[rtp_shift(p, 2) for p in g] for g in groups[1:]]  # from seq 14 on
    asm = Vp8Assembler(reorder_window=0)
    frames = run(asm, [*groups[0], padding, empty, *flat(groups[1:])])
    assert [f.data for f in frames] == datas
    assert asm.lost_packets == 0 and asm.dropped_frames == 0 and not asm.needs_keyframe


def rtp_shift(packet: bytes, by: int) -> bytes:
    parsed = RtpPacket.parse(packet)
    parsed.seq = (parsed.seq + by) & 0xFFFF
    return parsed.serialize()


# --- Vp8Assembler: starting, loss ---------------------------------------------------------------------------


def test_the_first_frame_delivered_is_a_keyframe():
    groups, datas = stream("ddKd")
    asm = Vp8Assembler()
    assert asm.needs_keyframe
    frames = run(asm, flat(groups))
    assert [f.data for f in frames] == datas[2:]
    assert frames[0].keyframe and not frames[1].keyframe
    assert asm.dropped_frames == 2
    assert not asm.needs_keyframe


def test_joining_in_the_middle_of_a_keyframe_waits_for_the_next():
    groups, datas = stream("KdKd")
    asm = Vp8Assembler()
    frames = run(asm, flat(groups)[1:])
    assert [f.data for f in frames] == datas[2:]
    assert asm.dropped_frames == 2


@pytest.mark.parametrize("window", [0, 4, 8])
def test_a_lost_middle_packet_drops_its_frame_and_the_deltas_until_the_next_keyframe(window):
    groups, datas = stream("KddddKd")
    packets = flat(groups)
    del packets[4]  # the middle packet of frame 1
    asm = Vp8Assembler(reorder_window=window)
    out: list[AssembledFrame] = []
    needs: list[bool] = []
    for packet in packets:
        frame = asm.push(packet)
        while frame is not None:
            out.append(frame)
            frame = asm.pop()
        needs.append(asm.needs_keyframe)
    assert [f.data for f in out] == [datas[0], datas[5], datas[6]]
    # The loss is declared once `window` later packets are in; from then until keyframe 5 is whole, the
    # caller is told to ask for a keyframe.
    declared = 4 + window
    assert needs[:declared] == [True] * 2 + [False] * (declared - 2)  # the first keyframe is whole at 2
    assert needs[declared:16] == [True] * (16 - declared)  # frame 5 (packets 15-17) ends at index 16
    assert needs[16:] == [False] * len(needs[16:])
    assert asm.dropped_frames == 4  # frame 1 in part, frames 2-4 whole
    assert asm.lost_packets == 1


def test_needs_keyframe_stays_until_a_keyframe_is_whole():
    groups, datas = stream("KdKKd")
    packets = flat(groups)
    del packets[4]  # frame 1
    del packets[6]  # the middle of keyframe 2 (index 7 before the first deletion)
    frames = run(Vp8Assembler(reorder_window=0), packets)
    assert [f.data for f in frames] == [datas[0], datas[3], datas[4]]


def test_a_lost_marker_packet_drops_that_frame():
    groups, datas = stream("KdK")
    packets = flat(groups)
    del packets[5]  # the last packet of frame 1
    asm = Vp8Assembler(reorder_window=0)
    assert [f.data for f in run(asm, packets)] == [datas[0], datas[2]]
    assert asm.dropped_frames == 1


def test_a_whole_lost_frame_still_breaks_the_chain():
    groups, datas = stream("KddK")
    asm = Vp8Assembler()
    frames = run(asm, flat([groups[0], groups[2], groups[3]]))
    assert [f.data for f in frames] == [datas[0], datas[3]]
    assert asm.lost_packets == 3


def test_a_damaged_descriptor_counts_as_loss():
    groups, datas = stream("KdK", per_frame=2)
    packets = flat(groups)
    packets[3] = rtp(103, 12000, bytes([X, PIC]))  # picture id announced, missing
    frames = run(Vp8Assembler(), packets)
    assert [f.data for f in frames] == [datas[0], datas[2]]


def test_unreadable_packets_are_ignored_and_their_holes_count_as_loss():
    groups, datas = stream("KdK", per_frame=2)
    packets = flat(groups)
    packets[2] = b"\x00" + packets[2][1:]  # RTP version 0
    asm = Vp8Assembler()
    assert [f.data for f in run(asm, packets)] == [datas[0], datas[2]]
    assert asm.lost_packets == 1


# --- Vp8Assembler: reordering, duplicates, wrap-around ------------------------------------------------------


def test_reordering_within_the_window_loses_nothing():
    groups, datas = stream("Kdddd")
    packets = flat(groups)
    # Frame 1's first packet arrives after all of frames 2 and 3 (8 later packets, the window): frames 1-3
    # come out of one push.
    late = packets.pop(3)
    packets.insert(11, late)
    asm = Vp8Assembler(reorder_window=8)
    pushed = [asm.push(p) for p in packets[:12]]
    assert [f.data for f in pushed if f] == [datas[0], datas[1]]
    assert pushed[-1] == AssembledFrame(9000 + 3000, False, datas[1])
    assert asm.pop() == AssembledFrame(9000 + 2 * 3000, False, datas[2])
    assert asm.pop() == AssembledFrame(9000 + 3 * 3000, False, datas[3])
    assert asm.pop() is None
    assert [f.data for f in run(asm, packets[12:])] == [datas[4]]
    assert asm.dropped_frames == 0 and asm.lost_packets == 0 and not asm.needs_keyframe


def test_a_packet_later_than_the_window_is_lost():
    groups, datas = stream("Kdd")
    packets = flat(groups)
    late = packets.pop(3)
    packets.append(late)
    asm = Vp8Assembler(reorder_window=2)
    assert [f.data for f in run(asm, packets)] == [datas[0]]
    assert asm.lost_packets == 1 and asm.late_packets == 1 and asm.needs_keyframe


def test_duplicates_are_ignored():
    groups, datas = stream("Kdd")
    packets = flat(groups)
    with_dups = [p for p in packets for _ in (0, 1)] + packets[:4]
    asm = Vp8Assembler()
    assert [f.data for f in run(asm, with_dups)] == datas
    assert asm.late_packets == len(packets) + 4
    assert asm.dropped_frames == 0


def test_sequence_numbers_wrap_at_65535():
    groups, datas = stream("Kdddd", seq=65530)
    asm = Vp8Assembler(reorder_window=0)
    assert [f.data for f in run(asm, flat(groups))] == datas
    assert asm.lost_packets == 0


def test_timestamps_wrap_and_come_out_unwrapped():
    start = MASK32 - 5000
    groups, _ = stream("Kdddd", ts=start)
    frames = run(Vp8Assembler(), flat(groups))
    assert [f.timestamp for f in frames] == [start + i * 3000 for i in range(5)]
    assert frames[-1].timestamp > MASK32


def test_flush_gives_up_on_holes_and_drops_an_unfinished_frame():
    groups, datas = stream("KdKd")
    packets = flat(groups)
    del packets[4]
    asm = Vp8Assembler(reorder_window=100)
    assert [f.data for f in run(asm, packets[:-1])] == [datas[0], datas[2]]  # frame 3 has no end
    assert asm.dropped_frames == 2
    assert asm.flush() == []


# --- OpusDepacketizer ---------------------------------------------------------------------------------------


def test_opus_one_packet_one_frame_with_wrapping_timestamps():
    d = OpusDepacketizer()
    start = MASK32 - 960
    for i in range(4):
        frame = d.push(rtp(65534 + i, start + 960 * i, b"\xfc" + bytes([i]) * 40, marker=i == 0))
        assert frame == AssembledFrame(start + 960 * i, True, b"\xfc" + bytes([i]) * 40)


def test_opus_drops_duplicates_and_empty_payloads_and_reorders():
    packets = [rtp(10 + i, 960 * i, bytes([0x78, i])) for i in range(6)]
    order = [packets[0], packets[0], packets[2], packets[1], packets[3], rtp(14, 3840, b""), packets[5]]
    d = OpusDepacketizer()
    frames = run(d, order)
    assert [f.data for f in frames] == [bytes([0x78, i]) for i in (0, 1, 2, 3, 5)]
    assert [f.timestamp for f in frames] == [0, 960, 1920, 2880, 4800]
    assert d.late_packets == 1 and d.lost_packets == 0


def test_opus_loss_is_skipped_after_the_window():
    packets = [rtp(i, 960 * i, bytes([1, i])) for i in range(20) if i != 5]
    d = OpusDepacketizer(reorder_window=3)
    frames = run(d, packets)
    assert [f.timestamp // 960 for f in frames] == [i for i in range(20) if i != 5]
    assert d.lost_packets == 1


def test_reorder_window_must_not_be_negative():
    with pytest.raises(ValueError):
        Vp8Assembler(reorder_window=-1)


# --- ParticipantClock ---------------------------------------------------------------------------------------

T0 = 1_700_000_000.0  # server Unix time when the senders start


class Sender:
    """A publisher whose NTP clock reads the server's time plus `skew`, with one RTP clock per track."""

    def __init__(self, skew: float, bases: dict[str, tuple[int, int]]) -> None:
        self.skew = skew
        self.bases = bases  # track -> (RTP timestamp at T0, clock rate)
        self.unwrappers = {track: TimestampUnwrapper() for track in bases}

    def rtp_at(self, track: str, t: float) -> int:
        base, rate = self.bases[track]
        return (base + round((t - T0) * rate)) & MASK32

    def sender_report(self, track: str, t: float) -> rtcp.SenderReport:
        # Through the wire format and back, as the recorder will see it.
        sr = rtcp.SenderReport(
            ssrc=1, ntp_timestamp=rtcp.ntp_from_unix(t + self.skew), rtp_timestamp=self.rtp_at(track, t)
        )
        (parsed,) = rtcp.parse_compound(sr.serialize())
        assert isinstance(parsed, rtcp.SenderReport)
        return parsed

    def report_to(self, clock: ParticipantClock, track: str, t: float, delay: float) -> None:
        sr = self.sender_report(track, t)
        clock.on_sender_report(track, sr.ntp_timestamp, sr.rtp_timestamp, self.bases[track][1], t + delay)

    def frame_ts(self, track: str, t: float) -> int:
        return self.unwrappers[track].unwrap(self.rtp_at(track, t))


AUDIO, VIDEO = "p1:0", "p1:1"


def test_no_time_before_a_sender_report():
    clock = ParticipantClock()
    assert clock.time_of(AUDIO, 0) is None
    sender = Sender(0.0, {AUDIO: (0, 48000), VIDEO: (0, 90000)})
    sender.report_to(clock, AUDIO, T0, 0.01)
    assert clock.time_of(VIDEO, 0) is None
    assert clock.time_of(AUDIO, 0) == pytest.approx(T0 + 0.01, abs=1e-6)
    assert clock.offset == pytest.approx(0.01, abs=1e-6)


@pytest.mark.parametrize("skew", [0.0, 3.7, -1000.0, 86400.0 * 365])
def test_audio_and_video_of_one_sender_stay_in_sync_with_jittery_reports(skew):
    rng = random.Random(int(skew))
    # Both RTP clocks wrap during the call.
    sender = Sender(skew, {AUDIO: (MASK32 - 48000 * 3, 48000), VIDEO: (MASK32 - 90000 * 7, 90000)})
    clock = ParticipantClock()
    min_delay = 0.030
    delays = []
    times: dict[str, list[tuple[float, float]]] = {AUDIO: [], VIDEO: []}
    for second in range(12):
        for track in (AUDIO, VIDEO):
            delay = min_delay + rng.uniform(0, 0.2)  # transit plus queueing jitter, never below the floor
            if second == 9 and track == VIDEO:
                delay = min_delay  # the quickest report comes late in the call
            delays.append(delay)
            sender.report_to(clock, track, T0 + second + rng.uniform(0, 0.9), delay)
        for k in range(50):  # a second of 20 ms audio frames
            t = T0 + second + k * 0.020
            times[AUDIO].append((t, clock.time_of(AUDIO, sender.frame_ts(AUDIO, t))))
        for k in range(30):
            t = T0 + second + k / 30
            times[VIDEO].append((t, clock.time_of(VIDEO, sender.frame_ts(VIDEO, t))))
    assert sender.unwrappers[AUDIO].highest > MASK32 and sender.unwrappers[VIDEO].highest > MASK32
    # Once every report is in, the same capture instant maps to the same server time on both tracks: the
    # instant plus the least transit delay seen.
    for t in (T0 + 0.5, T0 + 2.99, T0 + 3.01, T0 + 6.99, T0 + 7.01, T0 + 11.5):
        audio = clock.time_of(AUDIO, sender.unwrappers[AUDIO].extend(sender.rtp_at(AUDIO, t)))
        video = clock.time_of(VIDEO, sender.unwrappers[VIDEO].extend(sender.rtp_at(VIDEO, t)))
        assert audio is not None and video is not None
        assert abs(audio - video) < 0.001
        assert audio == pytest.approx(t + min(delays), abs=0.001)
    # Along the way, before the quickest report, the two tracks were still in sync with each other.
    for (ta, a), (tv, v) in zip(times[AUDIO][::5], times[VIDEO][::3], strict=True):
        assert ta == pytest.approx(tv, abs=1e-9)
        assert a is not None and v is not None
        assert abs(a - v) < 0.001


def test_two_participants_with_different_clocks_land_on_the_server_clock():
    alice = Sender(0.25, {"a:0": (1000, 48000), "a:1": (5, 90000)})
    bob = Sender(-1000.0, {"b:0": (MASK32, 48000), "b:1": (77777, 90000)})
    clocks = {alice: ParticipantClock(), bob: ParticipantClock()}
    for sender, clock in clocks.items():
        for track in sender.bases:
            sender.report_to(clock, track, T0 + 1, 0.040)
            sender.report_to(clock, track, T0 + 2, 0.025)
    t = T0 + 3.5
    landed = [clocks[s].time_of(track, s.frame_ts(track, t)) for s in (alice, bob) for track in s.bases]
    assert landed == pytest.approx([t + 0.025] * 4, abs=0.001)


def test_time_of_follows_the_latest_report_of_the_track():
    # The sender's audio clock runs 1000 ppm fast against its NTP clock: each report re-anchors it.
    clock = ParticipantClock()
    ntp0 = rtcp.ntp_from_unix(T0)
    clock.on_sender_report(AUDIO, ntp0, 0, 48000, T0)
    ts = 10 * 48048  # captured at T0 + 10 by the sender's NTP clock
    assert clock.time_of(AUDIO, ts) == pytest.approx(T0 + 10.01, abs=1e-4)  # extrapolated: 10 ms off
    clock.on_sender_report(AUDIO, rtcp.ntp_from_unix(T0 + 9), 9 * 48048, 48000, T0 + 9.5)
    assert clock.time_of(AUDIO, ts) == pytest.approx(T0 + 10.001, abs=1e-4)
    assert clock.offset == pytest.approx(0.0, abs=1e-6)  # the slower report did not move it


def test_time_of_picks_the_report_timestamp_nearest_the_frame_across_the_wrap():
    clock = ParticipantClock()
    clock.on_sender_report(VIDEO, rtcp.ntp_from_unix(T0), 900, 90000, T0)  # taken just after the wrap
    u = TimestampUnwrapper()
    before = u.unwrap(MASK32 - 89999)  # 1.01 s earlier, before the wrap
    after = u.unwrap(900 + 90000)
    assert clock.time_of(VIDEO, before) == pytest.approx(T0 - 1.01, abs=1e-6)
    assert clock.time_of(VIDEO, after) == pytest.approx(T0 + 1.0, abs=1e-6)
    clock.on_sender_report(VIDEO, rtcp.ntp_from_unix(T0 - 2), MASK32 - 180000 + 901, 90000, T0 + 5)
    assert clock.time_of(VIDEO, after) == pytest.approx(T0 + 1.0, abs=1e-6)


# --- generated streams --------------------------------------------------------------------------------------


@st.composite
def _streams(draw) -> tuple[list[tuple[bool, int, bytes]], list[list[bytes]]]:
    """Frames (keyframe, 32-bit timestamp, data) and their packets, grouped per frame, with random splits,
    descriptor layouts and padding-only packets (counted with the frame after them)."""
    count = draw(st.integers(1, 8))
    seq = draw(st.integers(0, 0xFFFF))
    ts = draw(st.integers(0, MASK32))
    frames, groups = [], []
    for i in range(count):
        key = i == 0 or draw(st.booleans())
        data = (KEY_HEADER if key else DELTA_HEADER) + draw(st.binary(max_size=200))
        cuts = sorted(set(draw(st.lists(st.integers(1, len(data) - 1), max_size=5))))
        group = []
        if draw(st.booleans()):
            group.append(
                RtpPacket(
                    payload_type=96, seq=seq & 0xFFFF, timestamp=ts, ssrc=0x1234, padding=100
                ).serialize()
            )
            seq += 1
        frame_packets = packetize(data, seq, ts, cuts, draw(st.sampled_from(EXTS)))
        seq += len(frame_packets)
        group += frame_packets
        frames.append((key, ts, data))
        groups.append(group)
        ts = (ts + draw(st.integers(1, 90000))) & MASK32
    return frames, groups


@settings(max_examples=150, deadline=None)
@given(_streams(), st.data())
def test_generated_streams_come_back_whole_through_reordering_and_duplicates(generated, data):
    frames, groups = generated
    window = data.draw(st.integers(0, 8))
    packets = flat(groups)
    # Each packet overtaken by at most `window` later ones.
    delays = data.draw(st.lists(st.integers(0, window), min_size=len(packets), max_size=len(packets)))
    delays[0] = 0  # the first packet pushed is where the stream starts: anything before it is late
    order = sorted(range(len(packets)), key=lambda i: i + delays[i])
    arrivals = [packets[i] for i in order]
    for i in data.draw(st.lists(st.integers(0, len(packets) - 1), max_size=4)):
        after = arrivals.index(packets[i]) + 1  # a copy, after the original
        arrivals.insert(data.draw(st.integers(after, len(arrivals))), packets[i])
    asm = Vp8Assembler(reorder_window=window)
    out = run(asm, arrivals)
    assert [(f.keyframe, f.timestamp & MASK32, f.data) for f in out] == frames
    assert all(b.timestamp > a.timestamp for a, b in itertools.pairwise(out))
    assert out[0].timestamp == frames[0][1]
    assert asm.dropped_frames == 0 and asm.lost_packets == 0 and not asm.needs_keyframe


@settings(max_examples=150, deadline=None)
@given(_streams(), st.data())
def test_generated_losses_deliver_exactly_the_decodable_frames(generated, data):
    frames, groups = generated
    lost = [data.draw(st.lists(st.booleans(), min_size=len(g), max_size=len(g))) for g in groups]
    # The model: a frame is delivered when all its packets are in and it is a keyframe, or follows an unbroken
    # chain of delivered frames back to one. Any missing packet breaks the chain, padding too, but a loss is
    # only seen after a packet that came.
    expected = []
    chain = False
    seen = False
    for frame, group, losses in zip(frames, groups, lost, strict=True):
        whole = True
        for packet, gone in zip(group, losses, strict=True):
            if gone and seen:
                chain = False
            if gone and RtpPacket.parse(packet).payload:
                whole = False
            seen |= not gone
        if not whole:
            chain = False
        elif frame[0] or chain:
            chain = True
            expected.append(frame)
    arrivals = [
        p
        for g, losses in zip(groups, lost, strict=True)
        for p, gone in zip(g, losses, strict=True)
        if not gone
    ]
    for window in (0, 8):
        out = run(Vp8Assembler(reorder_window=window), arrivals)
        assert [(f.keyframe, f.timestamp & MASK32, f.data) for f in out] == expected
