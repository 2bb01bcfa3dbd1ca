"""The RTP codec: hand-built packets from RFC 3550 / RFC 8285 layouts, in-place rewrites, RTX, wrap-around
arithmetic, and generated packets (round trips; damaged bytes raise RtpError and nothing else)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from huddle.rtc import rtp
from huddle.rtc.rtp import (
    ONE_BYTE_PROFILE,
    TWO_BYTE_PROFILE,
    ExtendedSeq,
    ExtendedTimestamp,
    RtpError,
    RtpPacket,
)

# V=2 X=0 CC=0 | M=0 PT=96 | seq 1 | ts 10 | ssrc 0x11223344 | payload "hi"
PLAIN = bytes.fromhex("80600001 0000000a 11223344") + b"hi"

# V=2 X=1 | M=1 PT=96 | seq 65535 | ts 0xdeadbeef | ssrc 0x01020304, then a one-byte (0xBEDE) block of 2
# words: id 1 (MID) "0", id 3 (transport-wide seq) 0x1234, a padding byte, id 4 (audio level) V=1 level 30.
ONE_BYTE = bytes.fromhex("90e0ffff deadbeef 01020304 bede0002 1030 311234 00 409e") + b"payload"

# V=2 X=1 CC=0 | PT=111 | seq 7 | ts 0 | ssrc 5, then a two-byte (0x100X, appbits 0) block of 3 words:
#   id 1 empty, id 17 "abc", id 200 aa bb, one padding byte.
TWO_BYTE = bytes.fromhex("906f0007 00000000 00000005 10000003 0100 1103616263 c802aabb 00") + b"\x01\x02"

# V=2 P=1 CC=2 | PT=0 | seq 9 | ts 0 | ssrc 7 | CSRCs 1, 2 | payload "abc" | 4 bytes of padding.
PADDED = bytes.fromhex("a2000009 00000000 00000007 00000001 00000002") + b"abc" + bytes.fromhex("00000004")


# --- demultiplexing and accessors ---------------------------------------------------------------------------


def test_rtcp_and_rtp_are_told_apart_by_the_second_byte():
    receiver_report = bytes.fromhex("80c90001 00000001")
    assert rtp.is_rtcp(receiver_report) and not rtp.is_rtp(receiver_report)
    assert rtp.is_rtp(PLAIN) and not rtp.is_rtcp(PLAIN)
    # marker=1 with PT 96 is 0xE0: above the RTCP range, still RTP.
    assert rtp.is_rtp(ONE_BYTE) and not rtp.is_rtcp(ONE_BYTE)
    assert not rtp.is_rtp(b"\x80\x60") and not rtp.is_rtcp(b"")
    assert not rtp.is_rtp(b"\x00" * 12)  # version 0


def test_accessors_read_the_fixed_header():
    assert rtp.seq(PLAIN) == 1
    assert rtp.timestamp(PLAIN) == 10
    assert rtp.ssrc(PLAIN) == 0x11223344
    assert rtp.payload_type(PLAIN) == 96
    assert rtp.marker(PLAIN) is False
    assert rtp.payload_offset(PLAIN) == 12
    assert rtp.payload_end(PLAIN) == len(PLAIN)
    assert rtp.payload(PLAIN) == b"hi"

    assert rtp.seq(ONE_BYTE) == 65535
    assert rtp.timestamp(ONE_BYTE) == 0xDEADBEEF
    assert rtp.marker(ONE_BYTE) is True
    assert rtp.payload_type(ONE_BYTE) == 96
    assert rtp.payload_offset(ONE_BYTE) == 12 + 4 + 8
    assert rtp.payload(ONE_BYTE) == b"payload"


def test_accessors_work_on_every_buffer_type():
    for buf in (ONE_BYTE, bytearray(ONE_BYTE), memoryview(ONE_BYTE)):
        assert rtp.seq(buf) == 65535
        assert rtp.ssrc(buf) == 0x01020304
        assert rtp.payload_offset(buf) == 24
        assert bytes(rtp.extension(buf, 3)) == b"\x12\x34"
        assert rtp.extensions(buf)[4] == b"\x9e"


def test_padding_and_csrcs():
    assert rtp.payload_offset(PADDED) == 12 + 8
    assert rtp.payload_end(PADDED) == len(PADDED) - 4
    assert rtp.payload(PADDED) == b"abc"
    packet = RtpPacket.parse(PADDED)
    assert packet.csrcs == [1, 2]
    assert packet.padding == 4
    assert packet.payload == b"abc"
    assert packet.serialize() == PADDED


@pytest.mark.parametrize(
    "data",
    [
        b"",
        PLAIN[:11],
        b"\x40" + PLAIN[1:],  # version 1
        bytes.fromhex("83600001 0000000a 11223344 00000001"),  # 3 CSRCs announced, 1 present
        bytes.fromhex("90600001 0000000a 11223344 bede"),  # extension header cut short
        bytes.fromhex("90600001 0000000a 11223344 bede0002 10300000"),  # block longer than the packet
        bytes.fromhex("a0600001 0000000a 11223344 00"),  # padding count 0
        bytes.fromhex("a0600001 0000000a 11223344 0105"),  # padding count 5 > 2 bytes
        bytes.fromhex("a0600001 0000000a 11223344"),  # P bit, no bytes at all after the header
    ],
)
def test_malformed_packets_raise_rtp_error(data):
    with pytest.raises(RtpError):
        rtp.payload_end(data)
    with pytest.raises(RtpError):
        RtpPacket.parse(data)


def test_short_buffers_raise_rtp_error_from_accessors_and_writers():
    for read in (rtp.seq, rtp.timestamp, rtp.ssrc, rtp.payload_type, rtp.marker):
        with pytest.raises(RtpError):
            read(b"\x80")
    for write in (rtp.set_seq, rtp.set_timestamp, rtp.set_ssrc, rtp.set_payload_type, rtp.set_marker):
        with pytest.raises(RtpError):
            write(bytearray(1), 1)
    with pytest.raises(RtpError):
        rtp.rewrite_header(bytearray(8), 1, 2, 3)


# --- in-place writers ---------------------------------------------------------------------------------------


def test_writers_patch_only_their_field_and_wrap():
    pkt = bytearray(ONE_BYTE)
    rtp.set_seq(pkt, 65536 + 5)
    rtp.set_timestamp(pkt, 0xFFFFFFFF + 11)
    rtp.set_ssrc(pkt, 0xCAFEBABE)
    rtp.set_payload_type(pkt, 100)
    assert rtp.seq(pkt) == 5
    assert rtp.timestamp(pkt) == 10
    assert rtp.ssrc(pkt) == 0xCAFEBABE
    assert rtp.payload_type(pkt) == 100
    assert rtp.marker(pkt) is True  # kept by set_payload_type
    assert pkt[0] == ONE_BYTE[0]
    assert pkt[12:] == ONE_BYTE[12:]  # the extension block and payload are untouched
    rtp.set_marker(pkt, False)
    assert rtp.marker(pkt) is False and rtp.payload_type(pkt) == 100
    rtp.set_marker(pkt, True)
    assert pkt[1] == 0x80 | 100


def test_rewrite_header_writes_ssrc_seq_and_timestamp_at_once():
    pkt = bytearray(ONE_BYTE)
    rtp.rewrite_header(pkt, ssrc=0xAABBCCDD, seq=-1, timestamp=1 << 32)
    assert (rtp.ssrc(pkt), rtp.seq(pkt), rtp.timestamp(pkt)) == (0xAABBCCDD, 65535, 0)
    assert pkt[:2] == ONE_BYTE[:2] and pkt[12:] == ONE_BYTE[12:]


# --- header extensions --------------------------------------------------------------------------------------


def test_one_byte_extensions():
    assert rtp.extensions(ONE_BYTE) == {1: b"0", 3: b"\x12\x34", 4: b"\x9e"}
    assert rtp.extension(ONE_BYTE, 1) == b"0"
    assert rtp.extension(ONE_BYTE, 3) == b"\x12\x34"
    assert rtp.extension(ONE_BYTE, 4) == b"\x9e"
    assert rtp.extension(ONE_BYTE, 2) is None
    assert rtp.extension(ONE_BYTE, 0) is None  # 0 is padding, never an element
    assert rtp.extension(ONE_BYTE, 15) is None
    assert rtp.extension(PLAIN, 1) is None  # no X bit
    assert rtp.extension_offset(ONE_BYTE, 3) == 12 + 4 + 2 + 1
    assert rtp.extension_offset(ONE_BYTE, 9) == -1
    packet = RtpPacket.parse(ONE_BYTE)
    assert packet.extension_profile == ONE_BYTE_PROFILE
    assert packet.extensions == {1: b"0", 3: b"\x12\x34", 4: b"\x9e"}


def test_two_byte_extensions():
    assert rtp.extensions(TWO_BYTE) == {1: b"", 17: b"abc", 200: b"\xaa\xbb"}
    assert rtp.extension(TWO_BYTE, 1) == b""
    assert rtp.extension(TWO_BYTE, 17) == b"abc"
    assert rtp.extension(TWO_BYTE, 200) == b"\xaa\xbb"
    assert rtp.extension(TWO_BYTE, 2) is None
    assert rtp.payload(TWO_BYTE) == b"\x01\x02"
    packet = RtpPacket.parse(TWO_BYTE)
    assert packet.extension_profile == TWO_BYTE_PROFILE
    assert packet.serialize() == TWO_BYTE


def test_two_byte_profile_keeps_its_appbits():
    data = bytearray(TWO_BYTE)
    data[13] = 0x05  # profile 0x1005
    assert rtp.extension(data, 17) == b"abc"
    packet = RtpPacket.parse(data)
    assert packet.extension_profile == 0x1005
    assert packet.serialize() == bytes(data)


def test_one_byte_id_15_ends_the_block():
    # id 2 "x", then id 15 (length ignored), then what would be id 3.
    data = bytes.fromhex("90600001 00000000 00000001 bede0002 2078 f0 3001 000000") + b"p"
    assert rtp.extensions(data) == {2: b"x"}
    assert rtp.extension(data, 2) == b"x"
    assert rtp.extension(data, 3) is None


def test_one_byte_id_0_with_a_length_ends_the_block():
    data = bytes.fromhex("90600001 00000000 00000001 bede0001 05 2061 00") + b"p"
    assert rtp.extensions(data) == {}
    assert rtp.extension(data, 2) is None


def test_other_extension_profiles_are_kept_raw():
    data = bytes.fromhex("90600001 00000000 00000001 abcd0001 01020304") + b"p"
    assert rtp.extensions(data) == {}
    assert rtp.extension(data, 1) is None
    packet = RtpPacket.parse(data)
    assert packet.extension_profile == 0xABCD
    assert packet.extension_data == bytes.fromhex("01020304")
    assert packet.serialize() == data


def test_element_running_past_the_block_raises():
    # id 2 claims 4 bytes; the block holds 3 after it.
    data = bytes.fromhex("90600001 00000000 00000001 bede0001 23616263") + b"p"
    with pytest.raises(RtpError):
        rtp.extensions(data)
    with pytest.raises(RtpError):
        rtp.extension(data, 2)
    with pytest.raises(RtpError):
        rtp.extension_offset(data, 2)
    with pytest.raises(RtpError):
        rtp.set_extension_value(bytearray(data), 2, b"abcd")
    assert rtp.extension(data, 1) is None  # the walk never needs to go past the element it cannot find


@pytest.mark.parametrize(
    ("block", "ext_id"),
    [
        ("10000001 00000007", 7),  # three padding bytes, then an element id with no length byte
        ("10000001 01036100", 1),  # element 1 claims 3 bytes; the block holds 2 after its header
    ],
)
def test_two_byte_element_running_past_the_block_raises(block, ext_id):
    data = bytes.fromhex("90600001 00000000 00000001" + block) + b"p"
    with pytest.raises(RtpError):
        rtp.extensions(data)
    with pytest.raises(RtpError):
        rtp.extension(data, ext_id)
    with pytest.raises(RtpError):
        rtp.set_transport_seq(bytearray(data), ext_id, 1)


def test_extension_lookup_on_a_bytearray_returns_a_copy():
    pkt = bytearray(ONE_BYTE)
    value = rtp.extension(pkt, 3)
    assert type(value) is bytes
    pkt += b"grows"  # would raise BufferError if a view were still alive
    assert type(rtp.extension(memoryview(ONE_BYTE), 3)) is memoryview


def test_set_extension_value_in_place():
    pkt = bytearray(ONE_BYTE)
    assert rtp.set_extension_value(pkt, 3, b"\xbe\xef") is True
    assert rtp.extension(pkt, 3) == b"\xbe\xef"
    assert rtp.extensions(pkt) == {1: b"0", 3: b"\xbe\xef", 4: b"\x9e"}
    assert len(pkt) == len(ONE_BYTE)
    assert rtp.set_extension_value(pkt, 7, b"\x00") is False
    with pytest.raises(RtpError):
        rtp.set_extension_value(pkt, 3, b"\x00\x00\x00")


def test_set_transport_seq():
    pkt = bytearray(ONE_BYTE)
    assert rtp.set_transport_seq(pkt, 3, 65536 + 0x4321) is True
    assert rtp.transport_seq(rtp.extension(pkt, 3)) == 0x4321
    assert rtp.set_transport_seq(pkt, 9, 1) is False
    with pytest.raises(RtpError):
        rtp.set_transport_seq(pkt, 4, 1)  # the audio level element is 1 byte
    two = bytearray(TWO_BYTE)
    assert rtp.set_transport_seq(two, 200, 0x0102) is True
    assert rtp.extension(two, 200) == b"\x01\x02"


def test_extension_values():
    assert rtp.sdes_string(rtp.extension(ONE_BYTE, 1)) == "0"
    assert rtp.sdes_string(memoryview(b"hi-res_1")) == "hi-res_1"
    with pytest.raises(RtpError):
        rtp.sdes_string(b"\xff")
    assert rtp.audio_level(b"\x9e") == (True, -30)
    assert rtp.audio_level(b"\x7f") == (False, -127)
    assert rtp.audio_level(b"\x80") == (True, 0)
    with pytest.raises(RtpError):
        rtp.audio_level(b"")
    # abs-send-time 6.18 fixed point: 1.5 s is 0x060000.
    assert rtp.abs_send_time(b"\x06\x00\x00") == 0x060000
    with pytest.raises(RtpError):
        rtp.abs_send_time(b"\x00\x00")
    assert rtp.transport_seq(b"\x12\x34") == 0x1234
    assert rtp.transport_seq(b"\x12\x34\x00\x01") == 0x1234
    with pytest.raises(RtpError):
        rtp.transport_seq(b"\x12")


# --- RtpPacket ----------------------------------------------------------------------------------------------


def test_packet_serialize_matches_the_hand_built_bytes():
    packet = RtpPacket(
        payload_type=96,
        seq=65535,
        timestamp=0xDEADBEEF,
        ssrc=0x01020304,
        marker=True,
        extension_profile=ONE_BYTE_PROFILE,
        extensions={1: b"0", 3: b"\x12\x34", 4: b"\x9e"},
        payload=b"payload",
    )
    # No padding byte between elements, so the block differs from ONE_BYTE only in where its zero byte sits.
    assert packet.serialize() == bytes.fromhex("90e0ffff deadbeef 01020304 bede0002 1030 311234 409e 00") + (
        b"payload"
    )
    assert RtpPacket.parse(ONE_BYTE) == packet
    assert RtpPacket.parse(PLAIN).serialize() == PLAIN


def test_packet_picks_the_extension_form_when_no_profile_is_given():
    one = RtpPacket(extensions={1: b"a"}).serialize()
    assert RtpPacket.parse(one).extension_profile == ONE_BYTE_PROFILE
    for extensions in ({15: b"a"}, {1: b""}, {1: bytes(17)}):
        data = RtpPacket(extensions=extensions).serialize()
        assert RtpPacket.parse(data).extension_profile == TWO_BYTE_PROFILE
        assert RtpPacket.parse(data).extensions == extensions


@pytest.mark.parametrize(
    "packet",
    [
        RtpPacket(payload_type=128),
        RtpPacket(seq=65536),
        RtpPacket(ssrc=-1),
        RtpPacket(csrcs=list(range(16))),
        RtpPacket(padding=256),
        RtpPacket(extension_profile=ONE_BYTE_PROFILE, extensions={15: b"x"}),
        RtpPacket(extension_profile=ONE_BYTE_PROFILE, extensions={1: b""}),
        RtpPacket(extension_profile=TWO_BYTE_PROFILE, extensions={256: b"x"}),
        RtpPacket(extension_profile=0xABCD, extensions={1: b"x"}),
    ],
)
def test_packet_fields_out_of_range_raise(packet):
    with pytest.raises(RtpError):
        packet.serialize()


# --- RTX ----------------------------------------------------------------------------------------------------


def test_rtx_wrap_by_hand():
    media = RtpPacket(payload_type=96, seq=1000, timestamp=3000, ssrc=0xA, marker=True, payload=b"frame")
    media.padding = 3
    wrapped = rtp.rtx_wrap(media.serialize(), rtx_ssrc=0xB, rtx_seq=7, rtx_pt=97)
    # Same timestamp and marker; RTX ssrc, seq and PT; original seq (1000 = 0x03e8) ahead of the payload;
    # the original padding dropped.
    assert bytes(wrapped) == bytes.fromhex("80e10007 00000bb8 0000000b 03e8") + b"frame"


def test_rtx_round_trip_keeps_csrcs_and_extensions():
    original = RtpPacket.parse(ONE_BYTE).serialize()
    wrapped = rtp.rtx_wrap(original, rtx_ssrc=0x99, rtx_seq=12, rtx_pt=97)
    assert rtp.extensions(wrapped) == rtp.extensions(original)
    assert (rtp.ssrc(wrapped), rtp.seq(wrapped), rtp.payload_type(wrapped)) == (0x99, 12, 97)
    unwrapped = rtp.rtx_unwrap(wrapped, original_pt=96, original_ssrc=0x01020304)
    assert bytes(unwrapped) == original
    assert rtp.ssrc(rtp.rtx_unwrap(wrapped, 96)) == 0x99  # the caller maps the SSRC when it wants to


def test_rtx_unwrap_drops_rtx_padding_and_rejects_padding_only_probes():
    wrapped = RtpPacket(payload_type=97, seq=5, ssrc=9, payload=b"\x00\x2aabc", padding=4).serialize()
    unwrapped = rtp.rtx_unwrap(wrapped, original_pt=96)
    assert RtpPacket.parse(unwrapped) == RtpPacket(payload_type=96, seq=42, ssrc=9, payload=b"abc")
    probe = RtpPacket(payload_type=97, seq=6, ssrc=9, padding=255).serialize()
    with pytest.raises(RtpError):
        rtp.rtx_unwrap(probe, original_pt=96)


# --- wrap-around arithmetic ---------------------------------------------------------------------------------


def test_seq_arithmetic_across_the_wrap():
    assert rtp.seq_newer(0, 65535)
    assert not rtp.seq_newer(65535, 0)
    assert rtp.seq_diff(0, 65535) == 1
    assert rtp.seq_diff(65535, 0) == -1
    assert rtp.seq_diff(5, 5) == 0 and not rtp.seq_newer(5, 5)
    # Half the space apart: neither is newer, and the difference reads as -32768 both ways.
    assert not rtp.seq_newer(0x8000, 0) and not rtp.seq_newer(0, 0x8000)
    assert rtp.seq_diff(0x8000, 0) == rtp.seq_diff(0, 0x8000) == -0x8000
    assert rtp.ts_newer(0, 0xFFFFFFFF)
    assert rtp.ts_diff(0, 0xFFFFFFFF) == 1
    assert rtp.ts_diff(0xFFFFFFF0, 0x10) == -0x20


def test_extended_seq_rolls_over_and_handles_reordering():
    unwrap = ExtendedSeq()
    assert unwrap.highest is None
    assert unwrap.extend(65533) == 65533 and unwrap.highest is None
    seen = [unwrap.update(s) for s in (65533, 65535, 0, 65534, 1, 65535, 2)]
    assert seen == [65533, 65535, 65536, 65534, 65537, 65535, 65538]
    assert unwrap.highest == 65538
    assert unwrap.extend(65535) == 65535 and unwrap.highest == 65538
    for s in range(3, 65536, 1000):
        unwrap.update(s)
    assert unwrap.update(0) == 2 * 65536  # a second rollover
    assert unwrap.update(65000) == 65536 + 65000  # a late one from the previous cycle


def test_extended_seq_before_the_first_packet_can_go_negative():
    unwrap = ExtendedSeq()
    assert unwrap.update(0) == 0
    assert unwrap.update(65535) == -1
    assert unwrap.highest == 0


def test_extended_timestamp_rolls_over():
    unwrap = ExtendedTimestamp()
    assert unwrap.update(0xFFFFFF00) == 0xFFFFFF00
    assert unwrap.update(0x00000100) == (1 << 32) + 0x100
    assert unwrap.update(0xFFFFFFF0) == 0xFFFFFFF0  # reordered, from before the wrap
    assert unwrap.update(0x80000000) == (1 << 32) + 0x80000000
    assert unwrap.update(0xC0000000) == (1 << 32) + 0xC0000000
    assert unwrap.update(0x00000010) == (2 << 32) + 0x10


# --- generated packets --------------------------------------------------------------------------------------


@st.composite
def packets(draw) -> RtpPacket:
    form = draw(st.sampled_from(["none", "one", "two", "other"]))
    profile = None
    elements: dict[int, bytes] = {}
    raw = b""
    if form == "one":
        profile = ONE_BYTE_PROFILE
        elements = draw(st.dictionaries(st.integers(1, 14), st.binary(min_size=1, max_size=16), max_size=5))
    elif form == "two":
        profile = TWO_BYTE_PROFILE | draw(st.integers(0, 15))
        elements = draw(st.dictionaries(st.integers(1, 255), st.binary(max_size=40), max_size=5))
    elif form == "other":
        profile = draw(st.integers(0, 0xFFFF).filter(lambda p: p != ONE_BYTE_PROFILE and p >> 4 != 0x100))
        raw = draw(st.binary(max_size=5).map(lambda b: b * 4))
    return RtpPacket(
        payload_type=draw(st.integers(0, 127)),
        seq=draw(st.integers(0, 0xFFFF)),
        timestamp=draw(st.integers(0, 0xFFFFFFFF)),
        ssrc=draw(st.integers(0, 0xFFFFFFFF)),
        payload=draw(st.binary(max_size=64)),
        marker=draw(st.booleans()),
        csrcs=draw(st.lists(st.integers(0, 0xFFFFFFFF), max_size=3)),
        extension_profile=profile,
        extensions=elements,
        extension_data=raw,
        padding=draw(st.sampled_from([0, 0, 1, 3, 255])),
    )


@settings(max_examples=300, deadline=None)
@given(packets())
def test_generated_packets_round_trip(packet):
    data = packet.serialize()
    assert RtpPacket.parse(data) == packet
    assert RtpPacket.parse(bytearray(data)) == packet
    assert RtpPacket.parse(memoryview(data)) == packet
    assert rtp.payload(data) == packet.payload
    assert (rtp.seq(data), rtp.timestamp(data), rtp.ssrc(data)) == (packet.seq, packet.timestamp, packet.ssrc)
    assert rtp.extensions(data) == packet.extensions
    for ext_id in {0, 1, 14, 15, 255, *packet.extensions}:
        assert rtp.extension(data, ext_id) == packet.extensions.get(ext_id)
        assert rtp.extension(memoryview(data), ext_id) == packet.extensions.get(ext_id)
        offset = rtp.extension_offset(data, ext_id)
        if ext_id in packet.extensions:
            assert data[offset : offset + len(packet.extensions[ext_id])] == packet.extensions[ext_id]
        else:
            assert offset == -1


@settings(max_examples=150, deadline=None)
@given(packets(), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0x7F))
def test_generated_packets_survive_rtx(packet, rtx_seq, rtx_ssrc, rtx_pt):
    data = packet.serialize()
    wrapped = rtp.rtx_wrap(data, rtx_ssrc, rtx_seq, rtx_pt)
    unwrapped = rtp.rtx_unwrap(wrapped, packet.payload_type, packet.ssrc)
    assert RtpPacket.parse(unwrapped) == dataclasses.replace(packet, padding=0)


@settings(max_examples=150, deadline=None)
@given(packets(), st.binary(min_size=2, max_size=2))
def test_rewriting_an_element_touches_nothing_else(packet, value):
    data = bytearray(packet.serialize())
    sized = [k for k, v in packet.extensions.items() if len(v) == 2]
    for ext_id in sized:
        assert rtp.set_extension_value(data, ext_id, value)
    expected = {**packet.extensions, **dict.fromkeys(sized, value)}
    assert rtp.extensions(data) == expected
    assert rtp.payload(data) == packet.payload


def _reads(data) -> None:
    """Everything that reads untrusted bytes, each on its own; only RtpError may escape."""
    calls = [
        rtp.payload_offset,
        rtp.payload_end,
        rtp.payload,
        rtp.extensions,
        RtpPacket.parse,
        lambda d: rtp.rtx_unwrap(d, 96),
        lambda d: rtp.rtx_wrap(d, 1, 2, 97),
        rtp.seq,
        rtp.ssrc,
        rtp.timestamp,
    ]
    for ext_id in (1, 3, 17):
        calls.append(lambda d, i=ext_id: rtp.extension_offset(d, i))
        calls.append(lambda d, i=ext_id: rtp.set_transport_seq(bytearray(d), i, 1))
        calls.append(lambda d, i=ext_id: rtp.set_extension_value(bytearray(d), i, b"\x00"))
    for call in calls:
        try:
            call(data)
        except RtpError:
            pass
    whole = None
    try:
        whole = rtp.extensions(data)
    except RtpError:
        pass
    for ext_id in (0, 1, 2, 3, 14, 15, 17, 255):
        try:
            value = rtp.extension(data, ext_id)
            offset = rtp.extension_offset(data, ext_id)
        except RtpError:
            assert whole is None  # a block extensions() accepts never makes a lookup fail
            continue
        if whole is not None:
            assert value == whole.get(ext_id)
            assert (offset >= 0) == (ext_id in whole)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=80))
def test_arbitrary_bytes_raise_only_rtp_error(data):
    _reads(data)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([0x80, 0x90, 0xA0, 0xB0, 0x91, 0xB2]), st.binary(max_size=60))
def test_arbitrary_bytes_behind_a_plausible_first_byte_raise_only_rtp_error(b0, rest):
    _reads(bytes([b0]) + rest)


@settings(max_examples=400, deadline=None)
@given(packets(), st.data())
def test_damaged_packets_raise_only_rtp_error(packet, data):
    raw = bytearray(packet.serialize())
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(raw)))
    _reads(bytes(raw))
    _reads(bytes(raw[:cut]))
    _reads(memoryview(bytes(raw[:cut])))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(-0x8000, 0x7FFF))
def test_seq_diff_inverts_addition(base, delta):
    assert rtp.seq_diff((base + delta) & 0xFFFF, base) == delta
    assert rtp.seq_newer((base + delta) & 0xFFFF, base) == (delta > 0)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 1 << 20), st.lists(st.integers(-3000, 30000), max_size=200))
def test_extended_seq_recovers_a_walk_with_jitter(start, steps):
    # Each value stays within half the space of the highest so far, so unwrapping is unambiguous.
    unwrap = ExtendedSeq()
    first = unwrap.update(start & 0xFFFF)
    highest = start
    for step in steps:
        value = highest + step
        assert unwrap.update(value & 0xFFFF) == value - start + first
        highest = max(highest, value)
    assert unwrap.highest == highest - start + first
