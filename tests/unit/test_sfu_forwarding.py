"""The SFU's forwarding path without sockets: header extension renaming, receive statistics for receiver
reports, Producer → Consumer rewriting (keyframe gate, continuous sequence numbers, NACK cache, SR
translation), and the subscribe offer every subscriber gets (stable payload types and extension ids)."""

from __future__ import annotations

import asyncio
import copy
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from huddle.rtc import rtp, sdp
from huddle.rtc.rtp import ONE_BYTE_PROFILE, RtpPacket
from huddle.sfu import offer
from huddle.sfu import producer as producer_module
from huddle.sfu import router as router_module
from huddle.sfu.consumer import CACHE_SIZE, Consumer
from huddle.sfu.offer import Section, build_subscribe_offer
from huddle.sfu.producer import UNUSED_EXTENSION_ID, Producer, ReceiveStats, remap_extension_ids

# --- fakes --------------------------------------------------------------------------------------------------


class FakeTransport:
    """Records what a Consumer sends, as the SRTP layer would receive it."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.rtcp: list[bytes] = []

    def send_rtp(self, packet: bytes | bytearray) -> bool:
        self.sent.append(bytes(packet))
        return True

    def send_rtcp(self, packet: bytes) -> bool:
        self.rtcp.append(packet)
        return True


class FakePeer:
    def __init__(self, participant_id: str, *, connected: bool = True) -> None:
        self.participant = SimpleNamespace(id=participant_id)
        self.connected = connected
        self.router = SimpleNamespace(layer_started=lambda producer: None)
        self.plis: list[int] = []

    def send_pli(self, media_ssrc: int) -> bool:
        if not self.connected:
            return False
        self.plis.append(media_ssrc)
        return True


PUBLISHER_SSRC = 0x0A0B0C0D
KEY_FRAME = bytes.fromhex("10 5002009d012a80024001") + b"key-data"  # S=1 PID=0, frame tag P=0
KEY_CONTINUATION = bytes.fromhex("00") + b"more key-frame data"  # S=0
DELTA_FRAME = bytes.fromhex("10 3102005a") + b"delta-data"  # S=1 PID=0, frame tag P=1
OPUS_FRAME = b"\xfc\xff\xfe opus"

# The ext table the Router builds for a publisher that negotiated audio-level as id 4: subscribers know it as
# id 1 (offer.AUDIO_LEVEL_ID), everything else becomes the unused id.
PUBLISHER_TABLE = bytes(offer.AUDIO_LEVEL_ID if i == 4 else UNUSED_EXTENSION_ID for i in range(16))


def packet(seq: int, ts: int, payload: bytes, *, pt: int = 96, marker: bool = False, **fields) -> bytes:
    return RtpPacket(
        payload_type=pt, seq=seq, timestamp=ts, ssrc=PUBLISHER_SSRC, payload=payload, marker=marker, **fields
    ).serialize()


def make_producer(kind: str = "video", *, connected: bool = True) -> Producer:
    pt_map = {100: offer.VP8_PT} if kind == "video" else {109: offer.OPUS_PT}
    producer = Producer(FakePeer("alice", connected=connected), kind, "0", pt_map, PUBLISHER_TABLE)
    producer.add_ssrc(PUBLISHER_SSRC, 0)
    return producer


def make_consumer(producer: Producer, *, ready: bool = True) -> tuple[Consumer, FakeTransport]:
    consumer = Consumer(producer, FakePeer("bob"))  # type: ignore[arg-type]
    transport = FakeTransport()
    consumer.transport = transport  # type: ignore[assignment]
    consumer.ready = ready
    producer.consumers.append(consumer)
    return consumer, transport


def video_stream(first_seq: int, first_ts: int, count: int) -> list[bytes]:
    """A keyframe (two packets) then delta frames, one packet each, 3000 ticks apart (30 fps)."""
    out = []
    for i in range(count):
        if i == 0:
            payload, ts = KEY_FRAME, first_ts
        elif i == 1:
            payload, ts = KEY_CONTINUATION, first_ts
        else:
            payload, ts = DELTA_FRAME, first_ts + 3000 * (i - 1)
        out.append(packet((first_seq + i) & 0xFFFF, ts & 0xFFFFFFFF, payload, pt=100))
    return out


# --- remap_extension_ids ------------------------------------------------------------------------------------

# V=2 X=1 | PT=96 | seq 1 | ts 10 | ssrc 0x11223344 | one-byte block of 3 words:
#   id 1 len 1 "0" | id 3 len 2 12 34 | a padding byte | id 4 len 1 9e | id 2 len 3 aa bb cc
ONE_BYTE = bytes.fromhex("90600001 0000000a 11223344 bede0003 1030 311234 00 409e 22aabbcc") + b"payload"


def table(**renames: int) -> bytes:
    """Identity table with some ids renamed: table(_1=14) renames id 1 to 14."""
    t = bytearray(range(16))
    for name, new in renames.items():
        t[int(name[1:])] = new
    return bytes(t)


def test_remap_renames_one_byte_elements_in_place():
    pkt = bytearray(ONE_BYTE)
    remap_extension_ids(pkt, table(_1=14, _3=14, _4=1, _2=7))
    assert (
        pkt == bytes.fromhex("90600001 0000000a 11223344 bede0003 e030 e11234 00 109e 72aabbcc") + b"payload"
    )
    assert len(pkt) == len(ONE_BYTE)
    parsed = RtpPacket.parse(bytes(pkt))
    assert parsed.extensions == {14: b"0", 1: b"\x9e", 7: b"\xaa\xbb\xcc"}
    assert parsed.payload == b"payload"
    assert (parsed.seq, parsed.timestamp, parsed.ssrc) == (1, 10, 0x11223344)


def test_remap_with_identity_table_changes_nothing():
    pkt = bytearray(ONE_BYTE)
    remap_extension_ids(pkt, table())
    assert pkt == ONE_BYTE


def test_remap_after_csrcs():
    # CC=2: the block starts after two CSRCs.
    src = bytes.fromhex("92600001 0000000a 11223344 00000001 00000002 bede0001 409e0000") + b"x"
    pkt = bytearray(src)
    remap_extension_ids(pkt, table(_4=1))
    assert pkt == src.replace(bytes.fromhex("409e"), bytes.fromhex("109e"))


def test_remap_stops_at_id_15():
    # id 1 | id 15 (ends the block, RFC 8285 §4.2) | what follows is not read as elements any more.
    src = bytes.fromhex("90600001 0000000a 11223344 bede0002 1030 f0 3112 34 0000") + b"payload"
    pkt = bytearray(src)
    remap_extension_ids(pkt, table(_1=9, _3=8))
    assert pkt == src.replace(bytes.fromhex("1030"), bytes.fromhex("9030"))


def test_remap_ignores_two_byte_form_and_packets_without_extension():
    two_byte = bytes.fromhex("90600001 0000000a 11223344 10000002 0101aa 04019e 0000") + b"payload"
    pkt = bytearray(two_byte)
    remap_extension_ids(pkt, table(_1=9, _4=1))
    assert pkt == two_byte
    plain = bytes.fromhex("80600001 0000000a 11223344") + bytes.fromhex("1030 409e")  # looks like elements
    pkt = bytearray(plain)
    remap_extension_ids(pkt, table(_1=9, _4=1))
    assert pkt == plain


def test_remap_with_the_routers_table_hides_publisher_only_extensions():
    pkt = bytearray(packet(1, 0, b"x", extension_profile=ONE_BYTE_PROFILE, extensions={1: b"0", 4: b"\x9e"}))
    remap_extension_ids(pkt, PUBLISHER_TABLE)
    assert rtp.extensions(pkt) == {UNUSED_EXTENSION_ID: b"0", offer.AUDIO_LEVEL_ID: b"\x9e"}


# --- ReceiveStats -------------------------------------------------------------------------------------------


def feed(stats: ReceiveStats, seqs) -> None:
    for s in seqs:
        stats.update(s & 0xFFFF)


def test_no_report_before_any_packet():
    assert ReceiveStats().report(1, now=0.0) is None


def test_loss_is_counted():
    stats = ReceiveStats()
    feed(stats, [s for s in range(1, 11) if s not in (4, 7)])
    block = stats.report(0x1234, now=0.0)
    assert block is not None
    assert block.ssrc == 0x1234
    assert block.packets_lost == 2
    assert block.highest_seq == 10
    assert block.fraction_lost == (2 << 8) // 10


def test_fraction_lost_is_per_interval():
    stats = ReceiveStats()
    feed(stats, range(100, 110))
    first = stats.report(1, now=0.0)
    assert (first.fraction_lost, first.packets_lost) == (0, 0)
    feed(stats, [s for s in range(110, 120) if s % 2])  # half of the next ten lost
    second = stats.report(1, now=1.0)
    assert second.fraction_lost == 128
    assert second.packets_lost == 5  # cumulative
    feed(stats, range(120, 130))  # a clean interval
    third = stats.report(1, now=2.0)
    assert third.fraction_lost == 0
    assert third.packets_lost == 5
    fourth = stats.report(1, now=3.0)  # nothing arrived at all
    assert fourth.fraction_lost == 0


def test_wraparound_is_not_loss():
    stats = ReceiveStats()
    feed(stats, range(65530, 65536 + 6))  # 65530..65535, 0..5
    block = stats.report(1, now=0.0)
    assert block.packets_lost == 0
    assert block.fraction_lost == 0
    assert block.highest_seq == (1 << 16) | 5  # one cycle, RFC 3550's extended highest sequence number


def test_loss_across_wraparound():
    stats = ReceiveStats()
    feed(stats, [65534, 65535, 1, 2])  # 0 lost
    block = stats.report(1, now=0.0)
    assert block.packets_lost == 1
    assert block.highest_seq == (1 << 16) | 2


def test_reordering_is_not_loss():
    stats = ReceiveStats()
    feed(stats, [1, 2, 4, 3, 5, 7, 6])
    block = stats.report(1, now=0.0)
    assert block.packets_lost == 0
    assert block.highest_seq == 7


def test_reordering_across_wraparound():
    stats = ReceiveStats()
    # 65534 arrives after the wrap: a late packet of the old cycle, not the start of a new one.
    feed(stats, [65533, 65535, 0, 65534, 1])
    block = stats.report(1, now=0.0)
    assert block.packets_lost == 0
    assert block.highest_seq == (1 << 16) | 1


def test_late_packet_is_counted_when_it_comes():
    stats = ReceiveStats()
    feed(stats, [1, 2, 4])
    assert stats.report(1, now=0.0).packets_lost == 1
    feed(stats, [3, 5])
    assert stats.report(1, now=1.0).packets_lost == 0


def test_many_cycles():
    stats = ReceiveStats()
    for s in range(3 * 65536 + 10):
        if s % 1000 == 0:
            continue
        stats.update(s & 0xFFFF)
    block = stats.report(1, now=0.0)
    assert block.highest_seq == 3 * 65536 + 9
    assert block.packets_lost == len(range(0, 3 * 65536 + 10, 1000)) - 1  # the first one was received


def test_lsr_and_dlsr_come_from_the_last_sender_report():
    stats = ReceiveStats()
    feed(stats, range(10))
    block = stats.report(1, now=5.0)
    assert (block.lsr, block.dlsr) == (0, 0)  # no SR yet
    # What the Router does on an SR: remember its NTP time and when it came.
    stats.sr_ntp = 0x1122334455667788
    stats.sr_at = 10.0
    block = stats.report(1, now=11.5)
    assert block.lsr == 0x33445566  # the middle 32 bits of the NTP timestamp
    assert block.dlsr == int(1.5 * 65536)  # units of 1/65536 s


# --- Producer.receive ---------------------------------------------------------------------------------------


def test_receive_rewrites_payload_type_and_extensions_once_for_every_consumer():
    producer = make_producer()
    consumers = [make_consumer(producer) for _ in range(3)]
    src = packet(
        500, 9000, KEY_FRAME, pt=100, marker=True, extension_profile=ONE_BYTE_PROFILE, extensions={4: b"\x9e"}
    )
    assert producer.receive(src, 0) == 3
    for consumer, transport in consumers:
        (out,) = transport.sent
        parsed = RtpPacket.parse(out)
        assert parsed.payload_type == offer.VP8_PT
        assert parsed.marker is True
        assert parsed.extensions == {offer.AUDIO_LEVEL_ID: b"\x9e"}
        assert parsed.payload == KEY_FRAME
        assert parsed.ssrc == consumer.ssrc
    assert len({c.ssrc for c, _ in consumers}) == 3


def test_receive_drops_unnegotiated_payload_types():
    producer = make_producer()
    _, transport = make_consumer(producer)
    assert producer.receive(packet(1, 0, KEY_FRAME, pt=101), 0) == 0
    assert transport.sent == []
    assert producer.stats[0].base is None


def test_receive_counts_only_the_copies_sent():
    producer = make_producer()
    _, ready = make_consumer(producer)
    _, not_ready = make_consumer(producer, ready=False)
    assert producer.receive(packet(1, 0, KEY_FRAME, pt=100), 0) == 1
    assert len(ready.sent) == 1 and not_ready.sent == []
    assert producer.stats[0].received == 1


def test_receive_feeds_receive_stats():
    producer = make_producer()
    for s in (10, 11, 13):
        producer.receive(packet(s, 0, DELTA_FRAME, pt=100), 0)
    assert producer.stats[0].report(PUBLISHER_SSRC, now=0.0).packets_lost == 1


# --- Producer.request_keyframe ------------------------------------------------------------------------------


async def test_keyframe_requests_are_throttled_but_not_lost(monkeypatch):
    monkeypatch.setattr(producer_module, "KEYFRAME_REQUEST_INTERVAL", 0.05)
    producer = make_producer()
    make_consumer(producer)
    assert producer.request_keyframe() is True
    assert producer.peer.plis == [PUBLISHER_SSRC]
    # Three more subscribers ask at once: one deferred request, not three PLIs.
    assert [producer.request_keyframe() for _ in range(3)] == [False, False, False]
    assert producer.peer.plis == [PUBLISHER_SSRC]
    await asyncio.sleep(0.12)
    assert producer.peer.plis == [PUBLISHER_SSRC] * 2
    producer.close()


async def test_deferred_keyframe_request_is_cancelled_on_close(monkeypatch):
    monkeypatch.setattr(producer_module, "KEYFRAME_REQUEST_INTERVAL", 0.05)
    producer = make_producer()
    make_consumer(producer)
    producer.request_keyframe()
    producer.request_keyframe()
    producer.close()
    await asyncio.sleep(0.1)
    assert producer.peer.plis == [PUBLISHER_SSRC]


def test_keyframe_request_only_for_known_video():
    audio = make_producer("audio")
    assert audio.request_keyframe() is False
    video = make_producer()
    video.ssrcs[0] = None  # SSRC not learnt yet
    assert video.request_keyframe() is False
    assert audio.peer.plis == [] and video.peer.plis == []


def test_keyframe_request_while_disconnected_is_retried_at_once():
    producer = make_producer(connected=False)
    assert producer.request_keyframe() is False
    producer.peer.connected = True
    assert producer.request_keyframe() is True  # not throttled by the attempt that could not be sent


# --- Consumer.forward ---------------------------------------------------------------------------------------


def seqs(sent: list[bytes]) -> list[int]:
    return [rtp.seq(p) for p in sent]


def test_nothing_is_sent_before_ready_or_without_transport():
    producer = make_producer()
    consumer, transport = make_consumer(producer, ready=False)
    assert producer.receive(packet(1, 0, KEY_FRAME, pt=100), 0) == 0
    consumer.ready, consumer.transport = True, None
    assert producer.receive(packet(2, 0, KEY_FRAME, pt=100), 0) == 0
    assert transport.sent == []
    assert consumer.current is None and consumer.packets == 0


def test_video_does_not_start_before_a_keyframe_start():
    producer = make_producer()
    consumer, transport = make_consumer(producer)
    for s, payload in enumerate([DELTA_FRAME, KEY_CONTINUATION, DELTA_FRAME]):
        producer.receive(packet(s, 0, payload, pt=100), 0)
    assert transport.sent == []
    assert consumer.packets == 0
    producer.receive(packet(3, 3000, KEY_FRAME, pt=100), 0)
    producer.receive(packet(4, 3000, KEY_CONTINUATION, pt=100), 0)
    producer.receive(packet(5, 6000, DELTA_FRAME, pt=100), 0)
    assert [RtpPacket.parse(p).payload for p in transport.sent] == [KEY_FRAME, KEY_CONTINUATION, DELTA_FRAME]


def test_late_joiner_waits_for_the_next_keyframe():
    producer = make_producer()
    _, early = make_consumer(producer)
    stream = video_stream(1000, 0, 6)
    for p in stream[:3]:
        producer.receive(p, 0)
    _, late = make_consumer(producer)
    producer.receive(stream[3], 0)  # delta: the late joiner could not decode it
    producer.receive(packet(1004, 90000, KEY_FRAME, pt=100), 0)
    assert len(early.sent) == 5
    assert len(late.sent) == 1 and RtpPacket.parse(late.sent[0]).payload == KEY_FRAME


def test_a_packet_with_impossible_padding_is_dropped_without_disturbing_the_fan_out():
    producer = make_producer()
    _, first = make_consumer(producer)
    _, second = make_consumer(producer)
    producer.receive(packet(1, 0, KEY_FRAME, pt=100), 0)
    _, waiting = make_consumer(producer)
    producer.consumers.insert(0, producer.consumers.pop())  # the new subscriber is served first
    bad = bytearray(packet(2, 3000, DELTA_FRAME, pt=100))
    bad[0] |= 0x20  # P=1, but the last byte (the padding count) is payload data, here 0
    bad[-1] = 0
    # Malformed (its padding count is impossible): dropped for everyone, once, without an exception;
    # a subscriber's own RTP stack would have refused it anyway.
    assert producer.receive(bytes(bad), 0) == 0
    assert waiting.sent == []
    assert len(first.sent) == len(second.sent) == 1


def test_audio_starts_at_once_and_keeps_no_cache():
    producer = make_producer("audio")
    consumer, transport = make_consumer(producer)
    assert consumer.cache is None
    for s in range(5):
        producer.receive(packet(200 + s, 960 * s, OPUS_FRAME, pt=109), 0)
    assert len(transport.sent) == 5
    parsed = [RtpPacket.parse(p) for p in transport.sent]
    assert all(p.payload_type == offer.OPUS_PT and p.payload == OPUS_FRAME for p in parsed)
    assert consumer.retransmit([rtp.seq(transport.sent[0])]) == 0


def test_rewritten_header_is_continuous_and_shifted():
    producer = make_producer()
    consumer, transport = make_consumer(producer)
    stream = video_stream(40000, 123456, 200)
    for p in stream:
        producer.receive(p, 0)
    assert len(transport.sent) == 200
    out_seqs = seqs(transport.sent)
    assert 0 <= out_seqs[0] < 0x8000  # a random start, far from a wrap
    assert out_seqs == [(out_seqs[0] + i) & 0xFFFF for i in range(200)]
    shifts = {
        (rtp.timestamp(o) - rtp.timestamp(i)) & 0xFFFFFFFF
        for i, o in zip(stream, transport.sent, strict=True)
    }
    assert len(shifts) == 1  # one constant shift: the subscriber's clock runs as the publisher's
    for src, out in zip(stream, transport.sent, strict=True):
        a, b = RtpPacket.parse(src), RtpPacket.parse(out)
        assert b.ssrc == consumer.ssrc != PUBLISHER_SSRC
        assert b.payload == a.payload
        assert b.marker == a.marker
        assert len(out) == len(src)
        assert out[12:] == src[12:]  # everything after the fixed header is untouched
    assert consumer.packets == 200


def test_starts_differ_between_consumers():
    producer = make_producer()
    consumers = [make_consumer(producer) for _ in range(8)]
    producer.receive(packet(7, 0, KEY_FRAME, pt=100), 0)
    starts = {rtp.seq(t.sent[0]) for _, t in consumers}
    offsets = {rtp.timestamp(t.sent[0]) for _, t in consumers}
    assert len(starts) > 1 and len(offsets) > 1  # 8 equal random draws: 2**-105 (15 bits) / 2**-224


def test_input_gap_is_kept_so_the_subscriber_can_nack():
    producer = make_producer()
    _, transport = make_consumer(producer)
    producer.receive(packet(10, 0, KEY_FRAME, pt=100), 0)
    producer.receive(packet(11, 0, KEY_CONTINUATION, pt=100), 0)
    producer.receive(packet(13, 3000, DELTA_FRAME, pt=100), 0)  # 12 was lost upstream
    a, b, c = seqs(transport.sent)
    assert (b - a) & 0xFFFF == 1 and (c - b) & 0xFFFF == 2


def test_input_wraparound_stays_continuous():
    producer = make_producer()
    _, transport = make_consumer(producer)
    stream = video_stream(65530, 0xFFFFF000, 12)  # input seq 65530..65535, 0..5; timestamps wrap too
    for p in stream:
        producer.receive(p, 0)
    out = seqs(transport.sent)
    assert len(out) == 12
    assert out == [(out[0] + i) & 0xFFFF for i in range(12)]


def test_retransmit_resends_exactly_the_cached_packets_asked_for():
    producer = make_producer()
    consumer, transport = make_consumer(producer)
    for p in video_stream(3000, 0, 20):
        producer.receive(p, 0)
    sent = dict(zip(seqs(transport.sent), transport.sent, strict=True))
    first = seqs(transport.sent)[0]
    transport.sent.clear()
    asked = [(first + 3) & 0xFFFF, (first + 17) & 0xFFFF, (first + 4) & 0xFFFF]
    assert consumer.retransmit(asked) == 3
    assert transport.sent == [sent[s] for s in asked]  # byte for byte, same sequence numbers
    assert consumer.retransmits == 3


def test_retransmit_skips_packets_never_sent():
    producer = make_producer()
    consumer, transport = make_consumer(producer)
    producer.receive(packet(50, 0, DELTA_FRAME, pt=100), 0)  # dropped: before the keyframe
    for p in video_stream(51, 0, 5):
        producer.receive(p, 0)
    first = seqs(transport.sent)[0]
    transport.sent.clear()
    never = [
        (first - 1) & 0xFFFF,
        (first + 5) & 0xFFFF,
        (first + 600) & 0xFFFF,
        (first + CACHE_SIZE) & 0xFFFF,
    ]
    assert consumer.retransmit(never) == 0
    assert transport.sent == []
    assert consumer.retransmits == 0


def test_retransmit_skips_packets_evicted_from_the_ring():
    producer = make_producer()
    consumer, transport = make_consumer(producer)
    total = CACHE_SIZE + 100
    for p in video_stream(60000, 0, total):  # wraps the input on the way
        producer.receive(p, 0)
    out = seqs(transport.sent)
    sent = dict(zip(out, transport.sent, strict=True))
    transport.sent.clear()
    evicted = out[:100]
    assert consumer.retransmit(evicted) == 0
    oldest_kept, newest = out[100], out[-1]
    assert consumer.retransmit([oldest_kept, newest]) == 2
    assert transport.sent == [sent[oldest_kept], sent[newest]]


def test_retransmit_without_transport_sends_nothing():
    producer = make_producer()
    consumer, transport = make_consumer(producer)
    producer.receive(packet(1, 0, KEY_FRAME, pt=100), 0)
    first = rtp.seq(transport.sent[0])
    consumer.transport = None
    assert consumer.retransmit([first]) == 0


def test_cached_packets_are_not_changed_by_later_forwarding():
    producer = make_producer()
    consumer, transport = make_consumer(producer)
    stream = video_stream(1, 0, 10)
    for p in stream:
        producer.receive(p, 0)
    snapshot = list(transport.sent)
    transport.sent.clear()
    assert consumer.retransmit(seqs(snapshot)) == 10
    assert transport.sent == snapshot


# --- Consumer.sender_report ---------------------------------------------------------------------------------


def test_sender_report_is_translated_to_the_consumer():
    producer = make_producer()
    consumer, transport = make_consumer(producer)
    stream = video_stream(10, 0xFFFFFF00, 30)
    for p in stream:
        producer.receive(p, 0)
    ntp = 0xE8F0123456789ABC
    report = consumer.sender_report(0, ntp, 0xFFFFFF00)
    assert report.ssrc == consumer.ssrc
    assert report.ntp_timestamp == ntp
    # The same media instant has the same timestamp in the SR as in the forwarded packets: lip sync.
    assert report.rtp_timestamp == rtp.timestamp(transport.sent[0])
    assert report.packet_count == 30
    assert report.octet_count == sum(len(RtpPacket.parse(p).payload) for p in stream)
    assert report.reports == []
    report.serialize()


def test_a_publishers_report_goes_on_once_and_only_while_packets_flow():
    producer = make_producer()
    consumer, transport = make_consumer(producer)
    stream = video_stream(10, 5000, 20)
    for p in stream[:10]:
        producer.receive(p, 0)
    assert consumer.report(1.0) is None  # no report from the publisher yet
    producer.on_sender_report(0, 1 << 40, 5000, now=1.0)
    consumer.on_sender_report(1, 1 << 40, 7777, 1.0)  # another layer's, as in the same compound packet
    assert transport.rtcp == []  # kept for the subscriber's next reports, not sent on its own
    report = consumer.report(1.0)
    assert report is not None and report.ssrc == consumer.ssrc
    assert report.rtp_timestamp == rtp.timestamp(transport.sent[0]) and report.packet_count == 10
    assert consumer.report(1.0) is None  # carried on once
    producer.on_sender_report(0, 2 << 40, 8000, now=2.0)
    assert consumer.report(2.0) is None  # nothing forwarded since the last one: nothing to report
    for p in stream[10:]:
        producer.receive(p, 0)
    # Sent 0.75 s after it came: both clocks moved on by that much, so that it reads as sent now.
    report = consumer.report(2.75)
    assert report is not None and report.packet_count == 20
    assert report.ntp_timestamp == (2 << 40) + 3 * (1 << 30)
    assert report.rtp_timestamp == (rtp.timestamp(transport.sent[0]) + 3000 + 67500) & 0xFFFFFFFF


def test_no_sender_report_before_the_first_packet():
    consumer, _ = make_consumer(make_producer())
    # Nothing sent yet: no timestamp mapping to translate the publisher's report with, so no report.
    assert consumer.sender_report(0, 1 << 32, 0) is None


def test_sender_report_octet_count_is_payload_only():
    producer = make_producer()
    consumer, _ = make_consumer(producer)
    src = packet(
        1, 0, KEY_FRAME, pt=100, extension_profile=ONE_BYTE_PROFILE, extensions={4: b"\x9e"}, padding=4
    )
    producer.receive(src, 0)
    assert consumer.sender_report(0, 0, 0).octet_count == len(KEY_FRAME)


# --- build_subscribe_offer ----------------------------------------------------------------------------------

FINGERPRINT = ":".join(f"{i:02X}" for i in range(32))
CANDIDATES = [sdp.Candidate.host("192.0.2.1", 40000), sdp.Candidate.host("192.0.2.1", 40000, transport="tcp")]


def build(sections: list[Section], version: int = 1) -> sdp.SessionDescription:
    text = build_subscribe_offer(
        sections,
        ice_ufrag="sfuu",
        ice_pwd="subscribepasswordsubscribe",
        fingerprint=FINGERPRINT,
        candidates=CANDIDATES,
        session_id=4242,
        version=version,
    )
    return sdp.parse(text)


FIRST = [
    Section("0", "audio", 1111, "alice", "alice-mic"),
    Section("1", "video", 2222, "alice", "alice-cam"),
    Section("2", "audio"),  # idle: its consumer left
    Section("3", "video", 3333, "carol", "carol-cam"),
]
# Renegotiation: alice left, her sections are reused by dave and erin's tracks; one section more.
SECOND = [
    Section("0", "audio", 4444, "dave", "dave-mic"),
    Section("1", "video"),
    Section("2", "audio", 5555, "erin", "erin-mic"),
    Section("3", "video", 3333, "carol", "carol-cam"),
    Section("4", "video", 6666, "erin", "erin-cam"),
]


def test_offer_sections_carry_their_tracks():
    desc = build(FIRST)
    assert [m.mid for m in desc.media] == ["0", "1", "2", "3"]
    assert [m.kind for m in desc.media] == ["audio", "video", "audio", "video"]
    for section, media in zip(FIRST, desc.media, strict=True):
        if section.ssrc is None:
            assert media.direction == "inactive"
            assert media.msids == [] and media.ssrcs == []
        else:
            assert media.direction == "sendonly"
            assert media.msids == [sdp.Msid(section.stream_id, section.track_id)]
            # The stream id is the publisher's participant id: the client groups tracks by person with it.
            assert media.msids[0].stream_id == section.stream_id
            assert [s.ssrc for s in media.ssrcs] == [section.ssrc]
            assert media.ssrcs[0].attributes["cname"] == section.stream_id


def test_offer_transport_is_bundled_ice_lite_actpass():
    desc = build(FIRST)
    assert desc.ice_lite is True
    assert [(g.semantics, g.mids) for g in desc.groups] == [("BUNDLE", ["0", "1", "2", "3"])]
    for media in desc.media:
        assert media.setup == "actpass"
        assert media.protocol == "UDP/TLS/RTP/SAVPF"
        assert (media.ice_ufrag, media.ice_pwd) == ("sfuu", "subscribepasswordsubscribe")
        assert media.fingerprints == [sdp.Fingerprint("sha-256", FINGERPRINT)]
        assert media.rtcp_mux
        assert media.port == 40000
        assert [c.transport for c in media.candidates] == ["udp", "tcp"]


def test_offer_codecs_are_opus_111_and_vp8_96_only():
    desc = build(FIRST)
    for media in desc.media:
        names = [(c.pt, c.name.lower(), c.clock_rate) for c in media.codecs]
        if media.kind == "audio":
            assert names == [(111, "opus", 48000)]
            assert media.codecs[0].channels == 2
        else:
            assert names == [(96, "vp8", 90000)]
            assert {"nack", "nack pli"} <= set(media.codecs[0].rtcp_fb)


def test_offer_extensions_audio_level_in_audio_and_send_time_everywhere():
    desc = build(FIRST)
    for media in desc.media:
        if media.kind == "audio":
            extmaps = [(e.id, e.uri) for e in media.extmaps]
            assert extmaps == [(1, sdp.URI_AUDIO_LEVEL), (2, sdp.URI_ABS_SEND_TIME)]
        else:
            assert [(e.id, e.uri) for e in media.extmaps] == [(2, sdp.URI_ABS_SEND_TIME)]
            assert "goog-remb" in media.codecs[0].rtcp_fb  # the subscriber reports its bandwidth estimate
    # No id names two extensions in the bundle.
    assert sdp.bundle_extmap(desc) == {1: sdp.URI_AUDIO_LEVEL, 2: sdp.URI_ABS_SEND_TIME}
    assert offer.SUBSCRIBER_EXT == {sdp.URI_AUDIO_LEVEL: 1, sdp.URI_ABS_SEND_TIME: 2}


def _negotiated(desc: sdp.SessionDescription) -> dict[str, set]:
    out: dict[str, set] = {"audio": set(), "video": set()}
    for media in desc.media:
        out[media.kind] |= {("pt", c.pt, c.name.lower()) for c in media.codecs}
        out[media.kind] |= {("ext", e.id, e.uri) for e in media.extmaps}
    return out


def test_payload_types_and_extension_ids_are_stable_across_renegotiation():
    first, second = build(FIRST, version=1), build(SECOND, version=2)
    assert _negotiated(first) == _negotiated(second)
    assert sdp.bundle_extmap(first) == sdp.bundle_extmap(second)
    assert [g.mids for g in second.groups] == [["0", "1", "2", "3", "4"]]
    assert (first.origin.session_id, first.origin.session_version) == (4242, 1)
    assert (second.origin.session_id, second.origin.session_version) == (4242, 2)
    # Mids keep their kind: a section is reused by the next track of its kind, never moved to the other.
    assert [(m.mid, m.kind) for m in first.media] == [(m.mid, m.kind) for m in second.media][:4]


def test_offer_without_udp_candidate_uses_the_discard_port():
    text = build_subscribe_offer(
        [Section("0", "audio", 1, "a", "t")],
        ice_ufrag="sfuu",
        ice_pwd="subscribepasswordsubscribe",
        fingerprint=FINGERPRINT,
        candidates=[],
        session_id=1,
        version=1,
    )
    (media,) = sdp.parse(text).media
    assert media.port == 9
    assert media.connection == "IN IP4 0.0.0.0"


def _vp8_temporal(seq: int, ts: int, tid: int, picture_id: int, key: bool = False) -> bytes:
    """One-packet frames with a full descriptor (X, I 15-bit, L, T), TL0PICIDX counting TID 0 frames."""
    header = bytes([0x90, 0xE0, 0x80 | (picture_id >> 8), picture_id & 0xFF, picture_id // 4, tid << 6])
    frame = bytes.fromhex("5002009d012a80024001") if key else bytes.fromhex("3102005a")
    return packet(seq, ts, header + frame, pt=100)


def test_a_thumbnail_skips_the_top_temporal_layer_without_gaps():
    producer = make_producer()
    consumer, transport = make_consumer(producer)
    consumer.max_tid = 1
    tids = [0, 2, 1, 2] * 10  # Chromium's 3-layer pattern
    for i, tid in enumerate(tids):
        producer.receive(_vp8_temporal(100 + i, 3000 * i, tid, 500 + i, key=i == 0), 0)
    sent = [RtpPacket.parse(p) for p in transport.sent]
    assert len(sent) == tids.count(0) + tids.count(1)  # half the frames
    out_seqs = [p.seq for p in sent]
    assert out_seqs == [(out_seqs[0] + i) & 0xFFFF for i in range(len(sent))]  # no gap to NACK
    pids = [((p.payload[2] & 0x7F) << 8) | p.payload[3] for p in sent]
    assert pids == [(pids[0] + i) & 0x7FFF for i in range(len(sent))]  # nor in picture ids
    consumer.max_tid = None
    for i, tid in enumerate(tids[:8], start=len(tids)):
        producer.receive(_vp8_temporal(100 + i, 3000 * i, tid, 500 + i), 0)
    assert len(transport.sent) == len(sent) + 8  # full rate again


# --- limits on a publish offer ------------------------------------------------------------------------------

FIXTURES = Path(__file__).parent / "sdp"


def chromium(name: str = "chromium_simulcast_offer.sdp") -> sdp.SessionDescription:
    return sdp.parse((FIXTURES / name).read_text())


def test_chromium_offers_are_within_the_publish_limits():
    for name in ("chromium_simulcast_offer.sdp", "chromium_offer.sdp", "chromium_datachannel_offer.sdp"):
        offer.check_publish_offer(chromium(name))


def test_camera_microphone_screen_and_its_audio_are_allowed_one_more_track_is_not():
    desc = chromium()
    audio, video = desc.media
    desc.media += [copy.deepcopy(audio), copy.deepcopy(video)]  # a screen share with its audio
    offer.check_publish_offer(desc)
    extra = copy.deepcopy(audio)
    desc.media.append(extra)
    with pytest.raises(sdp.SdpLimitError, match="3 audio m-sections sending; at most 2 are allowed"):
        offer.check_publish_offer(desc)
    for direction in ("inactive", "recvonly"):  # sections that send nothing cost no producer
        extra.direction = direction
        offer.check_publish_offer(desc)
    extra.direction, extra.port = "sendonly", 0  # nor does a stopped one
    offer.check_publish_offer(desc)
    desc.media.append(copy.deepcopy(video))
    with pytest.raises(sdp.SdpLimitError, match="3 video m-sections sending; at most 2 are allowed"):
        offer.check_publish_offer(desc)


def test_at_most_three_simulcast_layers():
    desc = chromium()
    video = desc.media[1]
    assert [r.id for r in video.rids] == ["q", "h", "f"]
    video.rids.append(sdp.Rid("x", "send"))
    with pytest.raises(sdp.SdpLimitError, match="m-section 1 offers 4 simulcast rids; at most 3 are allowed"):
        offer.check_publish_offer(desc)


def test_header_extensions_per_section_are_bounded():
    desc = chromium()
    video = desc.media[1]
    free = [i for i in range(1, 256) if i not in {e.id for e in video.extmaps}]
    video.extmaps += [sdp.Extmap(i, f"urn:x:{i}") for i in free[: offer.MAX_EXTENSIONS - len(video.extmaps)]]
    offer.check_publish_offer(desc)
    desc.extmaps.append(sdp.Extmap(free[-1], "urn:x:session"))  # session-level ones apply to every section
    with pytest.raises(sdp.SdpLimitError, match="offers 33 header extensions; at most 32 are allowed"):
        offer.check_publish_offer(desc)


def test_codecs_per_section_are_bounded():
    desc = chromium()
    audio = desc.media[0]
    taken = {c.pt for c in audio.codecs}
    audio.codecs += [sdp.Codec(pt) for pt in range(128) if pt not in taken][: offer.MAX_CODECS - len(taken)]
    offer.check_publish_offer(desc)
    audio.codecs.append(sdp.Codec(next(pt for pt in range(128) if audio.codec(pt) is None)))
    with pytest.raises(
        sdp.SdpLimitError, match="m-section 0 offers 65 payload types; at most 64 are allowed"
    ):
        offer.check_publish_offer(desc)


# --- batched work, spread over loop turns -------------------------------------------------------------------


async def test_batched_work_is_spread_over_loop_turns(monkeypatch):
    """An offer for each of 40 subscribers, 2 ms each: no single turn of the loop takes them all."""
    monkeypatch.setattr(router_module, "TURN_BUDGET", 0.005)
    done: list[str] = []
    finished: list[int] = []
    turns: list[int] = []

    def run(key: str) -> None:
        time.sleep(0.002)
        done.append(key)

    batch = router_module._Batch(run, lambda: finished.append(len(done)))
    for i in range(40):
        batch.add(f"p{i}")
    for _ in range(100):
        before = len(done)
        await asyncio.sleep(0)
        turns.append(len(done) - before)
        if finished:
            break
    assert sorted(done) == sorted(f"p{i}" for i in range(40))
    assert finished == [40]  # `done` once, after the last key
    assert max(turns) <= 3, turns  # 5 ms of 2 ms items: the one that crosses the budget is the last
    batch.add("again")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert done[-1] == "again" and finished == [40, 41]
