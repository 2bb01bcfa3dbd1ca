"""The RTCP codec: hand-built packets from the RFC and draft layouts, compound packets with types nobody here
knows, NTP time, and generated packets (round trips; damaged bytes raise RtcpError and nothing else)."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from huddle.rtc import rtcp
from huddle.rtc.rtcp import (
    Bye,
    Fir,
    GenericNack,
    Pli,
    ReceiverReport,
    Remb,
    ReportBlock,
    RtcpError,
    Sdes,
    SdesChunk,
    SenderReport,
    TransportCC,
    UnknownRtcp,
    parse_compound,
    serialize,
)

# SR (RC=1, PT=200, 13 words): SSRC 0x12345678, NTP 0xe88f0a3b:80000000, RTP ts 90000, 100 packets,
# 64000 octets; one report block for 0x87654321: 25% lost (0x40), 5 in total, highest seq 0x00010010,
# jitter 32, LSR 0x0a3b8000, DLSR 1 s (0x00010000).
SR_BYTES = bytes.fromhex(
    "81c8000c 12345678 e88f0a3b 80000000 00015f90 00000064 0000fa00"
    "87654321 40000005 00010010 00000020 0a3b8000 00010000"
)
SR_PACKET = SenderReport(
    ssrc=0x12345678,
    ntp_timestamp=0xE88F0A3B80000000,
    rtp_timestamp=90000,
    packet_count=100,
    octet_count=64000,
    reports=[ReportBlock(0x87654321, 0x40, 5, 0x00010010, 32, 0x0A3B8000, 0x00010000)],
)

# Generic NACK (FMT 1, PT 205) for [100, 101, 105, 116]: PID 100, BLP bits 0 (101), 4 (105), 15 (116).
NACK_BYTES = bytes.fromhex("81cd0003 00000001 00000002 00648011")

# REMB (FMT 15, PT 206) of 1,000,000 bps for SSRC 0x05: 'REMB', 1 SSRC, exponent 2, mantissa 250000
# (2 << 18 | 0x3d090 = 0x0bd090).
REMB_BYTES = bytes.fromhex("8fce0005 00000001 00000000 52454d42 010bd090 00000005")

# Transport-cc (FMT 15, PT 205): base seq 10, 4 statuses, reference time 1 (64 ms), fb count 7; one 2-bit
# status vector (11 | 01 00 01 10 00 00 00 = 0xd180): received, lost, received, received with a large/negative
# delta; deltas 4 (1 ms), 8 (2 ms), -4 (-1 ms); 2 bytes of RTCP padding.
TWCC_BYTES = bytes.fromhex("afcd0006 00000001 00000002 000a0004 00000107 d180 04 08 fffc 0002")


# --- hand-built packets -------------------------------------------------------------------------------------


def test_sender_report_with_one_block():
    assert parse_compound(SR_BYTES) == [SR_PACKET]
    assert serialize([SR_PACKET]) == SR_BYTES


def test_receiver_report_with_negative_cumulative_loss():
    data = bytes.fromhex("81c90007 00000001 00000002 00ffffff 0000ffff 00000000 00000000 00000000")
    (report,) = parse_compound(data)
    assert report == ReceiverReport(1, [ReportBlock(2, 0, -1, 0xFFFF)])
    assert report.serialize() == data


def test_empty_receiver_report_and_profile_extension():
    data = bytes.fromhex("80c90002 00000001 cafebabe")
    (report,) = parse_compound(data)
    assert report == ReceiverReport(1, [], extension=bytes.fromhex("cafebabe"))
    assert report.serialize() == data


@pytest.mark.parametrize(
    ("cname", "data"),
    [
        # Each chunk ends with at least one null octet and is padded to 32 bits with more.
        ("ab", "81ca0003 00000009 01026162 00000000"),
        ("abc", "81ca0003 00000009 01036162 63000000"),
        ("abcd", "81ca0003 00000009 01046162 63640000"),
    ],
)
def test_sdes_cname(cname, data):
    data = bytes.fromhex(data)
    packet = Sdes.for_cname(9, cname)
    assert packet.serialize() == data
    (parsed,) = parse_compound(data)
    assert parsed == packet
    assert parsed.chunks[0].cname == cname


def test_sdes_with_two_chunks_and_other_items():
    packet = Sdes([SdesChunk(1, [(1, b"x"), (2, b"name")]), SdesChunk(2, [])])
    (parsed,) = parse_compound(packet.serialize())
    assert parsed == packet
    assert parsed.chunks[1].cname is None


def test_bye_with_and_without_reason():
    data = bytes.fromhex("82cb0004 00000001 00000002 0462796521000000")
    (bye,) = parse_compound(data)
    assert bye == Bye([1, 2], "bye!")
    assert bye.serialize() == data
    assert parse_compound(Bye([3]).serialize()) == [Bye([3])]


def test_generic_nack():
    packet = GenericNack.from_seqs(1, 2, [100, 101, 105, 116])
    assert packet.pairs == [(100, 0x8011)]
    assert packet.serialize() == NACK_BYTES
    (parsed,) = parse_compound(NACK_BYTES)
    assert parsed == packet
    assert parsed.lost == [100, 101, 105, 116]


def test_generic_nack_across_the_wrap_and_beyond_one_pair():
    packet = GenericNack.from_seqs(1, 2, [0, 65534, 3, 65535, 0, 20])
    # 65534 is the PID; 65535, 0 and 3 are 1, 2 and 5 after it; 20 needs a pair of its own.
    assert packet.pairs == [(65534, 0b10011), (20, 0)]
    assert packet.lost == [65534, 65535, 0, 3, 20]
    assert GenericNack.from_seqs(1, 2, []).pairs == []


def test_remb_of_one_megabit():
    packet = Remb(1, 1_000_000, [5])
    assert packet.serialize() == REMB_BYTES
    assert parse_compound(REMB_BYTES) == [packet]


def test_remb_rounds_down_to_what_18_bits_of_mantissa_can_say():
    exact = Remb(1, (1 << 18) - 1)
    assert parse_compound(exact.serialize())[0].bitrate == (1 << 18) - 1
    (rounded,) = parse_compound(Remb(1, 1_000_001, [1, 2]).serialize())
    assert rounded.bitrate == 1_000_000 and rounded.ssrcs == [1, 2]
    with pytest.raises(RtcpError):
        Remb(1, 1 << 82).serialize()
    with pytest.raises(RtcpError):
        Remb(1, -1).serialize()


def test_pli_and_fir():
    pli = bytes.fromhex("81ce0002 00000001 00000002")
    assert parse_compound(pli) == [Pli(1, 2)]
    assert Pli(1, 2).serialize() == pli
    fir = bytes.fromhex("84ce0004 00000001 00000000 0000000a 07000000")
    assert parse_compound(fir) == [Fir(1, [(10, 7)])]
    assert Fir(1, [(10, 7)]).serialize() == fir


def test_transport_cc_by_hand():
    packet = TransportCC(
        1, 2, base_seq=10, reference_time=1, fb_count=7, statuses=[1, 0, 1, 2], deltas=[4, 8, -4]
    )
    assert packet.serialize() == TWCC_BYTES
    (parsed,) = parse_compound(TWCC_BYTES)
    assert parsed == packet
    assert parsed.packet_status_count == 4
    assert parsed.arrivals() == [(10, 65_000), (11, None), (12, 67_000), (13, 66_000)]


def test_transport_cc_from_arrivals_builds_the_hand_built_bytes():
    packet = TransportCC.from_arrivals(1, 2, 7, [(10, 65_000), (11, None), (12, 67_000), (13, 66_000)])
    assert packet.serialize() == TWCC_BYTES
    # Missing sequence numbers count as lost, and the order given does not matter.
    shuffled = TransportCC.from_arrivals(1, 2, 7, [(13, 66_000), (10, 65_000), (12, 67_000)])
    assert shuffled == packet
    floats = TransportCC.from_arrivals(1, 2, 7, [(10, 65_000.4), (12, 67_249.9), (13, 66_000.0)])
    assert floats == packet


def test_transport_cc_run_length_and_one_bit_chunks():
    # A run of 20 small-delta packets: one run-length chunk (0 | 01 | 20).
    run = TransportCC(1, 2, base_seq=65530, statuses=[1] * 20, deltas=[1] * 20)
    data = run.serialize()
    assert data[20:22] == bytes.fromhex("2014")
    (parsed,) = parse_compound(data)
    assert parsed == run
    assert [s for s, _ in parsed.arrivals()][:7] == [65530, 65531, 65532, 65533, 65534, 65535, 0]
    # Received and lost alternating: a 1-bit vector of 14 symbols (1 | 0 | 10101010101010 = 0xaaaa).
    mixed = TransportCC(1, 2, statuses=[1, 0] * 7, deltas=[2] * 7)
    data = mixed.serialize()
    assert data[20:22] == bytes.fromhex("aaaa")
    assert parse_compound(data) == [mixed]


def test_transport_cc_parses_a_hand_built_one_bit_vector():
    # 3 statuses from a 14-symbol vector (1 0 | 1 1 0 ...) whose unused symbols are ignored, then 2 deltas.
    data = bytes.fromhex("8fcd0005 00000001 00000002 00050003 ffffff00 b000 0102")
    (parsed,) = parse_compound(data)
    assert parsed.statuses == [1, 1, 0]
    assert parsed.deltas == [1, 2]
    assert parsed.reference_time == -1  # 24 bits, signed
    assert parsed.arrivals() == [(5, -64_000 + 250), (6, -64_000 + 750), (7, None)]


def test_transport_cc_rejects_what_it_cannot_say():
    with pytest.raises(RtcpError):
        TransportCC.from_arrivals(1, 2, 0, [(1, 0), (2, 9_000_000)])  # 9 s apart
    with pytest.raises(RtcpError):
        TransportCC.from_arrivals(1, 2, 0, [])
    with pytest.raises(RtcpError):
        TransportCC(1, 2, statuses=[1], deltas=[]).serialize()
    with pytest.raises(RtcpError):
        TransportCC(1, 2, statuses=[1], deltas=[256]).serialize()
    with pytest.raises(RtcpError):
        TransportCC(1, 2, statuses=[3], deltas=[0]).serialize()
    # A reserved status symbol (3) on the wire.
    with pytest.raises(RtcpError):
        parse_compound(bytes.fromhex("8fcd0005 00000001 00000002 00050001 00000000 60010000"))


# --- compound packets ---------------------------------------------------------------------------------------


def test_compound_with_types_nobody_here_knows():
    app = bytes.fromhex("80cc0003 00000001 4e414d45 01020304")  # APP 'NAME'
    xr = bytes.fromhex("80cf0002 00000001 04000000")  # XR with an unknown block
    tmmbr = bytes.fromhex("83cd0004 00000001 00000000 00000002 00000000")  # RTPFB FMT 3
    afb = bytes.fromhex("8fce0003 00000001 00000000 41424344")  # PSFB FMT 15, not 'REMB'
    data = SR_BYTES + app + NACK_BYTES + xr + tmmbr + afb + REMB_BYTES
    packets = parse_compound(data)
    assert [type(p) for p in packets] == [
        SenderReport,
        UnknownRtcp,
        GenericNack,
        UnknownRtcp,
        UnknownRtcp,
        UnknownRtcp,
        Remb,
    ]
    assert packets[1].packet_type == 204 and packets[1].count == 0
    assert packets[4].packet_type == 205 and packets[4].count == 3
    assert serialize(packets) == data


def test_reduced_size_and_padding_anywhere():
    # A PLI on its own (RFC 5506), padded by 4 bytes, then a BYE.
    pli = bytes.fromhex("a1ce0003 00000001 00000002 00000004")
    packets = parse_compound(pli + Bye([1]).serialize())
    assert packets == [Pli(1, 2), Bye([1])]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes.fromhex("80c9"),  # short header
        bytes.fromhex("40c90001 00000001"),  # version 1
        bytes.fromhex("80c90002 00000001"),  # length past the end
        bytes.fromhex("80c90001 00000001 80"),  # trailing junk
        bytes.fromhex("a0c90001 00000000"),  # padding count 0
        bytes.fromhex("a0c90001 00000009"),  # padding count past the body
        bytes.fromhex("a0c90000"),  # padding without a body
        bytes.fromhex("81c90001 00000001"),  # RR announcing a block it does not carry
        bytes.fromhex("80c80001 00000001"),  # SR without sender info
        bytes.fromhex("81cd0001 00000001"),  # feedback without its media SSRC
        bytes.fromhex("a1cd0004 00000001 00000002 00640000 00000002"),  # NACK FCI cut short by padding
        bytes.fromhex("81ce0003 00000001 00000002 00000000"),  # PLI with an FCI
        bytes.fromhex("84ce0003 00000001 00000000 00000001"),  # FIR entry cut short
        bytes.fromhex("8fce0005 00000001 00000000 52454d42 020bd090 00000005"),  # REMB count 2, one SSRC
        bytes.fromhex("81ca0002 00000001 01050000"),  # SDES item past the packet
        bytes.fromhex("81ca0001 00000001"),  # SDES chunk without an end
        bytes.fromhex("82cb0001 00000001"),  # BYE with 2 SSRCs announced
        bytes.fromhex("81cb0002 00000001 05616263"),  # BYE reason past the packet
        bytes.fromhex("8fcd0004 00000001 00000002 00000010 00000000"),  # TWCC without chunks
        bytes.fromhex("8fcd0003 00000001 00000002 00000001"),  # TWCC without its reference time
        bytes.fromhex("8fce0003 00000001 00000000 52454d42"),  # REMB without its bitrate
        bytes.fromhex("8fcd0005 00000001 00000002 00000004 00000000 20040000"),  # TWCC deltas missing
        bytes.fromhex("8fcd0005 00000001 00000002 00000002 00000000 40020000"),  # large deltas missing
        # An SR whose padding leaves its body partway through a word.
        bytes.fromhex("a0c80007 00000001 00000000 00000000 00000000 00000000 00000000 00000001"),
    ],
)
def test_malformed_compounds_raise_rtcp_error(data):
    with pytest.raises(RtcpError):
        parse_compound(data)


@pytest.mark.parametrize(
    "packet",
    [
        ReceiverReport(1, [ReportBlock(2)] * 32),
        ReceiverReport(1, [ReportBlock(2, fraction_lost=256)]),
        ReceiverReport(1, [ReportBlock(2, packets_lost=1 << 23)]),
        ReceiverReport(1 << 32),
        ReceiverReport(1, extension=b"abc"),
        GenericNack(1, 2, [(65536, 0)]),
        Fir(1, [(1, 256)]),
        Bye([1], "x" * 256),
        Sdes([SdesChunk(1, [(0, b"x")])]),
        TransportCC(1, 2, fb_count=256),
        TransportCC(1, 2, reference_time=1 << 23),
    ],
)
def test_fields_out_of_range_raise_rtcp_error(packet):
    with pytest.raises(RtcpError):
        packet.serialize()


# --- NTP time -----------------------------------------------------------------------------------------------


def test_ntp_conversions():
    assert rtcp.ntp_from_unix(0) == 2_208_988_800 << 32
    assert rtcp.ntp_to_unix(rtcp.ntp_from_unix(1_700_000_000.25)) == 1_700_000_000.25
    assert rtcp.ntp_compact(0xE88F0A3B80000000) == 0x0A3B8000
    assert rtcp.compact_from_seconds(1.0) == 0x00010000
    assert rtcp.compact_from_seconds(5.25) == 0x00054000
    assert rtcp.compact_to_seconds(0x00018000) == 1.5
    assert abs(rtcp.ntp_to_unix(rtcp.ntp_now()) - time.time()) < 1


def test_round_trip_time_from_rfc_3550_example():
    # RFC 3550 §6.4.1: A = 0xb710:8000, LSR = 0xb705:2000, DLSR = 0x0005:4000 give 6.125 s.
    assert rtcp.round_trip_time(0xB7108000, 0xB7052000, 0x00054000) == 6.125
    assert rtcp.round_trip_time(0xB7108000, 0, 0) is None
    assert rtcp.round_trip_time(0x00000000, 0x00010000, 0) is None  # a negative result
    # Across the wrap of the 32-bit compact clock.
    assert rtcp.round_trip_time(0x00008000, 0xFFFF8000, 0) == 1.0


# --- generated packets --------------------------------------------------------------------------------------

u32 = st.integers(0, 0xFFFFFFFF)
report_blocks = st.builds(
    ReportBlock,
    u32,
    st.integers(0, 255),
    st.integers(-(1 << 23), (1 << 23) - 1),
    u32,
    u32,
    u32,
    u32,
)
words = st.binary(max_size=3).map(lambda b: b * 4)


@st.composite
def transport_ccs(draw) -> TransportCC:
    statuses = draw(
        st.one_of(
            st.lists(st.sampled_from([0, 1, 2]), max_size=40),
            st.lists(st.sampled_from([0, 1]), max_size=40),
            st.builds(lambda s, n: [s] * n, st.sampled_from([0, 1, 2]), st.integers(0, 9000)),
        )
    )
    deltas = [
        draw(st.integers(0, 255) if s == 1 else st.integers(-0x8000, 0x7FFF)) for s in statuses if s != 0
    ]
    return TransportCC(
        draw(u32),
        draw(u32),
        draw(st.integers(0, 0xFFFF)),
        draw(st.integers(-(1 << 23), (1 << 23) - 1)),
        draw(st.integers(0, 255)),
        statuses,
        deltas,
    )


rtcp_packets = st.one_of(
    st.builds(
        SenderReport,
        u32,
        st.integers(0, (1 << 64) - 1),
        u32,
        u32,
        u32,
        st.lists(report_blocks, max_size=3),
        words,
    ),
    st.builds(ReceiverReport, u32, st.lists(report_blocks, max_size=3), words),
    st.builds(
        Sdes,
        st.lists(
            st.builds(
                SdesChunk,
                u32,
                st.lists(st.tuples(st.integers(1, 255), st.binary(max_size=20)), max_size=3),
            ),
            max_size=3,
        ),
    ),
    st.builds(Bye, st.lists(u32, max_size=3), st.text(max_size=20).filter(lambda t: len(t.encode()) <= 255)),
    st.builds(
        GenericNack,
        u32,
        u32,
        st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)), max_size=4),
    ),
    transport_ccs(),
    st.builds(Pli, u32, u32),
    st.builds(Fir, u32, st.lists(st.tuples(u32, st.integers(0, 255)), max_size=3), u32),
    st.builds(Remb, u32, st.integers(0, (1 << 18) - 1).map(lambda m: m << 3), st.lists(u32, max_size=4), u32),
    st.builds(
        lambda pt, count, body: UnknownRtcp(bytes((0x80 | count, pt)) + (len(body) // 4).to_bytes(2) + body),
        st.sampled_from([204, 207, 195, 210]),
        st.integers(0, 31),
        words,
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(rtcp_packets, min_size=1, max_size=4))
def test_generated_compounds_round_trip(packets):
    data = serialize(packets)
    assert parse_compound(data) == packets
    assert parse_compound(bytearray(data)) == packets
    assert serialize(parse_compound(memoryview(data))) == data


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 0xFFFF), st.lists(st.one_of(st.none(), st.integers(0, 4000)), min_size=1, max_size=60))
def test_transport_cc_arrivals_round_trip(base, gaps):
    # Arrival times on 250 µs ticks, in sequence order, some packets lost (None), gaps up to 1 s.
    now = 1_000_000_000
    packets = []
    for i, gap in enumerate(gaps):
        if gap is not None:
            now += gap * 250
        packets.append(((base + i) & 0xFFFF, None if gap is None else now))
    feedback = TransportCC.from_arrivals(1, 2, 3, packets)
    (parsed,) = parse_compound(feedback.serialize())
    assert parsed == feedback
    assert parsed.base_seq == base
    assert parsed.arrivals() == packets


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 0xFFFF), st.sets(st.integers(0, 2000), min_size=1, max_size=60))
def test_nack_packs_and_unpacks_any_loss_pattern(base, offsets):
    seqs = [(base + o) & 0xFFFF for o in sorted(offsets)]
    packet = GenericNack.from_seqs(1, 2, seqs)
    assert packet.lost == seqs
    (parsed,) = parse_compound(packet.serialize())
    assert parsed.lost == seqs
    # Greedy packing: every pair but the last is followed by a PID more than 16 past it.
    for (pid, _), (next_pid, _) in zip(packet.pairs, packet.pairs[1:], strict=False):
        assert (next_pid - pid) & 0xFFFF > 16


def _parse(data) -> None:
    try:
        packets = parse_compound(data)
    except RtcpError:
        return
    # Whatever parses serializes again, and that parses to the same packets.
    again = serialize(packets)
    assert parse_compound(again) == packets


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=80))
def test_arbitrary_bytes_raise_only_rtcp_error(data):
    _parse(data)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([200, 201, 202, 203, 204, 205, 206, 207]), st.integers(0, 63), st.binary(max_size=72))
def test_arbitrary_bodies_of_every_type_raise_only_rtcp_error(packet_type, flags, body):
    # A valid header (V=2, right length) around random bytes reaches every type's body parser.
    padding = flags & 0x20
    body += bytes(-len(body) % 4)
    if padding and body:
        body = body[:-1] + bytes([body[-1] % (len(body) + 1)])
    header = bytes((0x80 | flags, packet_type)) + (len(body) // 4).to_bytes(2)
    _parse(header + body)


@settings(max_examples=300, deadline=None)
@given(st.lists(rtcp_packets, min_size=1, max_size=3), st.data())
def test_damaged_compounds_raise_only_rtcp_error(packets, data):
    raw = bytearray(serialize(packets))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] ^= data.draw(st.integers(1, 255))
    _parse(bytes(raw))
    _parse(bytes(raw[: data.draw(st.integers(0, len(raw)))]))
