"""The VP8 payload descriptor read field by field (RFC 7741 §4.2) from hand-built bytes, and the in-place
writers for picture id and TL0PICIDX that the per-subscriber rewrite uses."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from huddle.rtc.rtp import RtpPacket, payload_offset
from huddle.sfu.vp8 import (
    Vp8Info,
    descriptor_size,
    is_keyframe_start,
    parse_descriptor,
    set_picture_id,
    set_tl0picidx,
)

# First octet: |X|R|N|S|R| PID |
X, N, S = 0x80, 0x20, 0x10
# Extension octet: |I|L|T|K| RSV |  (I is spelt PIC here)
PIC, L, T, K = 0x80, 0x40, 0x20, 0x10

KEY_HEADER = bytes.fromhex("5002009d012a80024001")  # VP8 frame tag with P=0, start code, 640x320
DELTA_HEADER = bytes.fromhex("3102005a")  # P=1


def info(size, **fields) -> Vp8Info:
    base = dict(
        start_of_partition=True,
        partition_index=0,
        non_reference=False,
        picture_id=None,
        picture_id_15bit=False,
        tl0picidx=None,
        tid=None,
        layer_sync=False,
        keyidx=None,
        size=size,
        is_keyframe=False,
    )
    base.update(fields)
    return Vp8Info(**base)


# (name, descriptor, expected fields) for a delta frame; every layout of the optional octets.
LAYOUTS = [
    ("no-extension", bytes([S]), info(1)),
    ("extension-empty", bytes([X | S, 0x00]), info(2)),
    ("pid7", bytes([X | S, PIC, 0x05]), info(3, picture_id=5)),
    ("pid7-max", bytes([X | S, PIC, 0x7F]), info(3, picture_id=0x7F)),
    ("pid15", bytes([X | S, PIC, 0x80 | 0x12, 0x34]), info(4, picture_id=0x1234, picture_id_15bit=True)),
    ("pid15-zero", bytes([X | S, PIC, 0x80, 0x00]), info(4, picture_id=0, picture_id_15bit=True)),
    ("tl0", bytes([X | S, L, 0x2A]), info(3, tl0picidx=42)),
    ("tid-y", bytes([X | S, T, 0b01_1_00000]), info(3, tid=1, layer_sync=True)),
    ("tid-keyidx-bits-ignored", bytes([X | S, T, 0b10_0_10101]), info(3, tid=2)),
    ("keyidx", bytes([X | S, K, 0b11_1_00111]), info(3, keyidx=7)),  # TID/Y ignored without T
    (
        "pid7-tl0-tid",
        bytes([X | S, PIC | L | T, 0x7F, 0x09, 0b10_0_00000]),
        info(5, picture_id=0x7F, tl0picidx=9, tid=2),
    ),
    (
        "pid15-tl0-tid-keyidx",
        bytes([X | S, PIC | L | T | K, 0xFF, 0xFF, 0x00, 0b11_1_11111]),
        info(
            6,
            picture_id=0x7FFF,
            picture_id_15bit=True,
            tl0picidx=0,
            tid=3,
            layer_sync=True,
            keyidx=31,
        ),
    ),
    (
        "pid15-tl0-tid (Chromium)",
        bytes([X | S, PIC | L | T, 0x81, 0x00, 0xFF, 0b00_1_00000]),
        info(6, picture_id=0x100, picture_id_15bit=True, tl0picidx=255, tid=0, layer_sync=True),
    ),
    (
        "pid15-tid",
        bytes([X | S, PIC | T, 0x80, 0x00, 0x40]),
        info(5, picture_id=0, picture_id_15bit=True, tid=1),
    ),
    ("pid7-keyidx", bytes([X | S, PIC | K, 0x01, 0x03]), info(4, picture_id=1, keyidx=3)),
    ("tl0-keyidx", bytes([X | S, L | K, 0x10, 0x1F]), info(4, tl0picidx=16, keyidx=31)),
    ("non-reference", bytes([X | N | S, PIC, 0x05]), info(3, picture_id=5, non_reference=True)),
]
IDS = [name for name, _, _ in LAYOUTS]


@pytest.mark.parametrize(("desc", "expected"), [(d, e) for _, d, e in LAYOUTS], ids=IDS)
def test_parse_each_layout(desc, expected):
    got = parse_descriptor(desc + DELTA_HEADER)
    assert got == expected
    assert got.size == descriptor_size(desc + DELTA_HEADER) == len(desc)


@pytest.mark.parametrize(("desc", "expected"), [(d, e) for _, d, e in LAYOUTS], ids=IDS)
def test_keyframe_needs_s_pid0_and_p_clear(desc, expected):
    key = parse_descriptor(desc + KEY_HEADER)
    assert key.is_keyframe and is_keyframe_start(desc + KEY_HEADER)
    assert not parse_descriptor(desc + DELTA_HEADER).is_keyframe
    # S clear: a continuation of the keyframe, not its start.
    cont = bytes([desc[0] & ~S]) + desc[1:] + KEY_HEADER
    assert not parse_descriptor(cont).is_keyframe
    assert not parse_descriptor(cont).start_of_partition
    # S set but partition 2: the P bit there is no frame tag.
    part2 = bytes([desc[0] | 0x02]) + desc[1:] + KEY_HEADER
    parsed = parse_descriptor(part2)
    assert parsed.partition_index == 2 and not parsed.is_keyframe


def test_reserved_bit_after_s_is_not_partition_index():
    parsed = parse_descriptor(bytes([S | 0x08]) + KEY_HEADER)
    assert parsed.partition_index == 0 and parsed.is_keyframe


@pytest.mark.parametrize("desc", [d for _, d, _ in LAYOUTS], ids=IDS)
def test_truncated_descriptor_is_none(desc):
    # A descriptor with no VP8 byte after it, or cut inside: nothing to read.
    for cut in range(len(desc) + 1):
        assert parse_descriptor(desc[:cut]) is None


def test_parse_inside_a_packet_without_slicing():
    desc = bytes([X | S, PIC | L | T, 0x80 | 0x01, 0x02, 0x03, 0x40])
    pkt = RtpPacket(
        payload_type=96, seq=1, timestamp=2, ssrc=3, payload=desc + KEY_HEADER, extensions={1: b"\x05"}
    )
    buf = pkt.serialize()
    off = payload_offset(buf)
    assert off == 20
    got = parse_descriptor(buf, off)
    assert got == parse_descriptor(desc + KEY_HEADER)
    assert got.picture_id == 0x102 and got.tl0picidx == 3 and got.tid == 1 and got.is_keyframe
    # `end` bounds the payload: with the descriptor alone in [start, end) there is no VP8 byte.
    assert parse_descriptor(buf, off, off + len(desc)) is None
    assert parse_descriptor(buf, off, off + len(desc) + 1) is not None


# --- writers ---------------------------------------------------------------------------------------------


def packet_with(desc: bytes) -> tuple[bytearray, int]:
    buf = bytearray(
        RtpPacket(payload_type=96, seq=7, timestamp=9, ssrc=5, payload=desc + DELTA_HEADER).serialize()
    )
    return buf, payload_offset(buf)


def test_set_picture_id_15bit_in_place():
    buf, off = packet_with(bytes([X | S, PIC | L | T, 0x80 | 0x12, 0x34, 0x56, 0x40]))
    before = bytes(buf)
    assert set_picture_id(buf, off, 0x7ABC)
    assert buf[off + 2 : off + 4] == bytes([0xFA, 0xBC])
    got = parse_descriptor(buf, off)
    assert got.picture_id == 0x7ABC and got.picture_id_15bit and got.tl0picidx == 0x56 and got.tid == 1
    changed = [i for i in range(len(buf)) if buf[i] != before[i]]
    assert changed == [off + 2, off + 3]
    assert set_picture_id(buf, off, 0x8001)  # 15 bits kept
    assert parse_descriptor(buf, off).picture_id == 1


def test_set_picture_id_7bit_keeps_the_width():
    buf, off = packet_with(bytes([X | S, PIC | L, 0x05, 0x77]))
    assert set_picture_id(buf, off, 0x1234)
    got = parse_descriptor(buf, off)
    assert got.picture_id == 0x34 and not got.picture_id_15bit and got.tl0picidx == 0x77
    assert len(buf) == len(packet_with(bytes([X | S, PIC | L, 0x05, 0x77]))[0])


@pytest.mark.parametrize("desc", [bytes([S]), bytes([X | S, L, 0x01]), bytes([X | S, 0x00])])
def test_set_picture_id_without_one(desc):
    buf, off = packet_with(desc)
    before = bytes(buf)
    assert not set_picture_id(buf, off, 5)
    assert buf == before


@pytest.mark.parametrize(
    ("desc", "at"),
    [
        (bytes([X | S, L, 0x01]), 2),
        (bytes([X | S, PIC | L, 0x05, 0x01]), 3),
        (bytes([X | S, PIC | L | T | K, 0x85, 0x00, 0x01, 0x00]), 4),
    ],
)
def test_set_tl0picidx_in_place(desc, at):
    buf, off = packet_with(desc)
    before = bytes(buf)
    assert set_tl0picidx(buf, off, 0x1FE)
    assert buf[off + at] == 0xFE
    assert parse_descriptor(buf, off).tl0picidx == 0xFE
    assert [i for i in range(len(buf)) if buf[i] != before[i]] == [off + at]


@pytest.mark.parametrize("desc", [bytes([S]), bytes([X | S, PIC, 0x05]), bytes([X | S, T, 0x40])])
def test_set_tl0picidx_without_one(desc):
    buf, off = packet_with(desc)
    before = bytes(buf)
    assert not set_tl0picidx(buf, off, 5)
    assert buf == before


def test_writers_on_truncated_buffers_do_not_raise():
    assert not set_picture_id(bytearray([X | S, PIC]), 0, 1)
    assert not set_picture_id(bytearray([X | S, PIC, 0x80]), 0, 1)
    assert not set_tl0picidx(bytearray([X | S, L]), 0, 1)
    assert not set_tl0picidx(bytearray([X | S, PIC | L, 0x80, 0x01]), 0, 1)
    assert not set_tl0picidx(bytearray([X | S]), 0, 1)


# --- generated --------------------------------------------------------------------------------------------


@st.composite
def descriptors(draw):
    flags = draw(st.integers(0, 0xF0))
    out = bytearray(
        [X | draw(st.sampled_from([0, N])) | draw(st.sampled_from([0, S])) | draw(st.integers(0, 7))]
    )
    out.append(flags & 0xF0)
    if flags & PIC:
        pid = draw(st.integers(0, 0x7FFF))
        if draw(st.booleans()):
            out += bytes([0x80 | pid >> 8, pid & 0xFF])
        else:
            out.append(pid & 0x7F)
    if flags & L:
        out.append(draw(st.integers(0, 255)))
    if flags & (T | K):
        out.append(draw(st.integers(0, 255)))
    return bytes(out)


@settings(max_examples=300, deadline=None)
@given(
    desc=descriptors(), tail=st.binary(min_size=0, max_size=4), pid=st.integers(0, 0xFFFF), tl0=st.integers()
)
def test_generated_descriptors(desc, tail, pid, tl0):
    payload = desc + tail
    got = parse_descriptor(payload)
    size = descriptor_size(payload)
    assert (got is None) == (size == 0)
    if got is None:
        return
    assert got.size == size == len(desc)
    assert got.is_keyframe == is_keyframe_start(payload)
    buf = bytearray(b"\x00" * 3 + payload)
    had_pid = got.picture_id is not None
    assert set_picture_id(buf, 3, pid) == had_pid
    assert set_tl0picidx(buf, 3, tl0) == (got.tl0picidx is not None)
    again = parse_descriptor(buf, 3)
    assert again.size == got.size and again.tid == got.tid and again.keyidx == got.keyidx
    assert again.picture_id_15bit == got.picture_id_15bit
    if had_pid:
        assert again.picture_id == pid & (0x7FFF if got.picture_id_15bit else 0x7F)
    if got.tl0picidx is not None:
        assert again.tl0picidx == tl0 & 0xFF
    assert buf[3 + got.size :] == tail


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=12))
def test_arbitrary_bytes_never_raise(data):
    got = parse_descriptor(data)
    assert (got is None) == (descriptor_size(data) == 0)
    buf = bytearray(data)
    set_picture_id(buf, 0, 123)
    set_tl0picidx(buf, 0, 45)
    assert len(buf) == len(data)
