"""The load generator's pieces against the server's own codecs: no sockets, no media encoding."""

from __future__ import annotations

import itertools
import os

from huddle.loadtest.connection import binding_request
from huddle.loadtest.layout import STAGE, THUMBNAIL, expected_layer, video_sizes
from huddle.loadtest.media import (
    LAYERS,
    SINGLE_LAYER,
    TRAILER,
    TRAILER_MAGIC,
    MediaLibrary,
    VideoFrame,
    packetize_vp8,
)
from huddle.loadtest.negotiation import VIDEO_MID, publish_offer, read_publish_answer, subscribe_answer
from huddle.loadtest.sender import (
    MID_RID_PACKETS,
    ExtensionIds,
    RtpStream,
    TransportSeq,
    VideoSender,
    speech_level,
)
from huddle.loadtest.stats import DelayHistogram, Receiver
from huddle.rtc import rtp, sdp
from huddle.rtc.certificate import Certificate
from huddle.rtc.ice import IceLite
from huddle.rtc.srtp import SrtpKeys, SrtpProfile, SrtpSession
from huddle.sfu import offer, vp8
from huddle.sfu.router import PUBLISH_EXTENSIONS
from huddle.stun import message as stun

IDS = ExtensionIds(mid=4, rid=10, abs_send_time=2, transport_cc=3, audio_level=1)


def test_vp8_payloads_carry_a_descriptor_the_sfu_reads():
    frame = bytes([0x10, 0x02, 0x00, 0x9D, 0x01, 0x2A, 0x40, 0x01, 0xB4, 0x00]) + os.urandom(3000)
    payloads = packetize_vp8(frame, tid=0)
    assert len(payloads) == 3 and max(map(len, payloads)) - min(map(len, payloads)) <= 1
    assert b"".join(p[6:-8] for p in payloads) == frame
    stream = RtpStream(96, 1234, "1", "f", IDS, "video", 2)
    packets = [
        stream.build(p, n == len(payloads) - 1, 7 + n, 3, -1, 0x1234, 9) for n, p in enumerate(payloads)
    ]
    first = vp8.parse_descriptor(packets[0], rtp.payload_offset(packets[0]))
    assert first is not None and first.is_keyframe and first.start_of_partition
    assert (first.picture_id, first.picture_id_15bit, first.tl0picidx, first.tid) == (0x1234, True, 9, 0)
    assert vp8.keyframe_width(packets[0], rtp.payload_offset(packets[0]) + first.size, len(packets[0])) == 320
    later = vp8.parse_descriptor(packets[1], rtp.payload_offset(packets[1]))
    assert later is not None and not later.start_of_partition and later.picture_id == 0x1234
    assert [rtp.marker(p) for p in packets] == [False, False, True]
    assert [rtp.transport_seq(rtp.extension(p, 3)) for p in packets] == [7, 8, 9]


def test_rtp_streams_name_mid_and_rid_on_their_first_packets_only():
    stream = RtpStream(96, 0xCAFE, "1", "h", IDS, "video", 1)
    payload = bytes(20)
    packets = [stream.build(payload, False, n, 5) for n in range(MID_RID_PACKETS + 2)]
    seqs = [rtp.seq(p) for p in packets]
    assert all(rtp.seq_diff(b, a) == 1 for a, b in itertools.pairwise(seqs))
    assert {rtp.ssrc(p) for p in packets} == {0xCAFE}
    first, last = rtp.RtpPacket.parse(packets[0]), rtp.RtpPacket.parse(packets[-1])
    assert first.extensions[4] == b"1" and first.extensions[10] == b"h"
    assert 4 not in last.extensions and 10 not in last.extensions and 2 in last.extensions
    sender, layer, magic, sent = TRAILER.unpack_from(packets[-1], len(packets[-1]) - 8)
    assert (sender, layer, magic) == (5, 1, TRAILER_MAGIC) and sent > 0


def test_audio_carries_the_speakers_level_pattern():
    stream = RtpStream(111, 77, "0", None, IDS, "audio", 3)
    levels = []
    for n in range(40):
        packet = stream.build(bytes(80), n == 0, n, 0, speech_level(n))
        levels.append(rtp.audio_level(rtp.extension(packet, 1)))
    assert any(voice and level > -40 for voice, level in levels)  # loud talk ...
    assert any(level == -127 for _, level in levels)  # ... with pauses, or it reads as a steady hum


def test_checks_are_what_an_ice_lite_server_accepts():
    server = IceLite("srvu", "serverpassword0123456789", remote_ufrag="mine")
    _, datagram = binding_request("srvu:mine", b"serverpassword0123456789", os.urandom(8), nominate=True)
    result = server.check(datagram, stun.parse(datagram), ("127.0.0.1", 5000), 1.0)
    assert result.error is None and result.nominated and server.selected == ("127.0.0.1", 5000)
    assert stun.verify_integrity(result.response, b"serverpassword0123456789")


def test_publish_offer_is_answered_with_simulcast_and_the_extensions_the_sfu_reads():
    certificate = Certificate.generate()
    text = publish_offer(
        ufrag="abcd",
        pwd="p" * 24,
        fingerprint=certificate.fingerprint_sha256,
        host=("127.0.0.1", 40000),
        session_id=1,
        stream_id="p_1",
        audio_ssrc=42,
    )
    offered = sdp.parse(text)
    assert [m.kind for m in offered.media] == ["audio", "video"]
    assert not offered.media[1].ssrcs and [r.id for r in offered.media[1].rids] == ["q", "h", "f"]
    answer = sdp.build_answer(
        offered,
        ice_ufrag="srvu",
        ice_pwd="s" * 24,
        fingerprint_sha256=certificate.fingerprint_sha256,
        candidates=[sdp.Candidate.host("127.0.0.1", 50000)],
        supported_extensions=PUBLISH_EXTENSIONS,
    )
    read = read_publish_answer(sdp.serialize(answer))
    assert read.transport.address == ("127.0.0.1", 50000) and read.transport.ufrag == "srvu"
    assert read.video is not None and read.video.rids == ["q", "h", "f"] and read.video.pt == 96
    assert read.audio is not None and read.audio.pt == 111
    ids = read.video.ids
    assert (ids.mid, ids.rid, ids.abs_send_time, ids.transport_cc, ids.audio_level) == (4, 10, 2, 3, 1)


VIDEO_SSRC = 0x5EED


def _sfu_answer(offer_text: str, fingerprint: str) -> sdp.SessionDescription:
    """What the SFU checks of a publish offer and answers to it (huddle.sfu.router.on_publish_offer)."""
    offered = sdp.parse(offer_text, max_media=offer.MAX_PUBLISH_SECTIONS)
    offer.check_publish_offer(offered)
    return sdp.build_answer(
        offered,
        ice_ufrag="srvu",
        ice_pwd="s" * 24,
        fingerprint_sha256=fingerprint,
        candidates=[sdp.Candidate.host("127.0.0.1", 50000)],
        supported_extensions=PUBLISH_EXTENSIONS,
    )


def _offer_without_simulcast_or_audio(fingerprint: str) -> str:
    return publish_offer(
        ufrag="abcd",
        pwd="p" * 24,
        fingerprint=fingerprint,
        host=("127.0.0.1", 40000),
        session_id=1,
        stream_id="p_1",
        audio_ssrc=42,
        audio=False,
        video_ssrc=VIDEO_SSRC,
    )


def test_publish_offer_without_simulcast_names_its_ssrc_and_no_rids_and_the_sfu_answers_it():
    certificate = Certificate.generate()
    text = _offer_without_simulcast_or_audio(certificate.fingerprint_sha256)
    lines = text.splitlines()
    assert f"a=ssrc:{VIDEO_SSRC} cname:p_1" in lines and f"a=ssrc:{VIDEO_SSRC} msid:p_1 p_1-video" in lines
    assert not [line for line in lines if line.startswith(("a=rid", "a=simulcast", "m=audio"))]
    (video,) = sdp.parse(text).media
    assert video.kind == "video" and [s.ssrc for s in video.ssrcs] == [VIDEO_SSRC]
    assert not video.rids and video.simulcast is None
    answer = _sfu_answer(text, certificate.fingerprint_sha256)
    read = read_publish_answer(sdp.serialize(answer))
    assert read.audio is None and read.video is not None and read.video.rids == []


class _Connection:
    """What a VideoSender needs of a MediaConnection: keys (any), and where its packets go."""

    srtp = object()
    closed = False

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send_rtp(self, packet: bytes) -> None:
        self.sent.append(packet)


def test_a_camera_without_simulcast_sends_its_offered_ssrc_without_rid_and_names_the_middle_layer():
    frames = tuple(VideoFrame(n == 0, 0, packetize_vp8(bytes(50), 0)) for n in range(4))
    library = MediaLibrary(video=(frames,) * len(LAYERS), audio_loud=(), audio_quiet=())
    connection = _Connection()
    sender = VideoSender(
        connection,  # type: ignore[arg-type]
        library,
        index=7,
        pt=96,
        mid=VIDEO_MID,
        rids=[],
        ids=IDS,  # the RID extension agreed (our SFU does not agree it without simulcast; others may)
        tseq=TransportSeq(),
        ssrc=VIDEO_SSRC,
    )
    for _ in range(MID_RID_PACKETS + 2):
        sender.fire()
    assert sender.rids == ["h"] and len(sender.streams) == 1
    assert {rtp.ssrc(p) for p in connection.sent} == {VIDEO_SSRC}
    first, last = rtp.RtpPacket.parse(connection.sent[0]), rtp.RtpPacket.parse(connection.sent[-1])
    assert first.extensions[4] == VIDEO_MID.encode() and 10 not in first.extensions
    assert 4 not in last.extensions
    sender_index, layer, magic, _ = TRAILER.unpack_from(connection.sent[-1], len(connection.sent[-1]) - 8)
    assert (sender_index, layer, magic) == (7, SINGLE_LAYER, TRAILER_MAGIC) and LAYERS[layer].rid == "h"


def test_publishers_started_together_send_keyframes_at_phases_of_their_own_and_one_period_each():
    clip = 60  # frames: a 2-second clip at 30 fps, a keyframe first
    frames = tuple(VideoFrame(n == 0, 0, packetize_vp8(bytes([n > 0]) + bytes(49), 0)) for n in range(clip))
    library = MediaLibrary(video=(frames,) * len(LAYERS), audio_loud=(), audio_quiet=())
    phases = set()
    for index in range(8):
        connection = _Connection()
        sender = VideoSender(
            connection,  # type: ignore[arg-type]
            library,
            index=index,
            pt=96,
            mid=VIDEO_MID,
            rids=["q", "h", "f"],
            ids=IDS,
            tseq=TransportSeq(),
        )
        keyframes: dict[int, list[int]] = {}
        for tick in range(3 * clip):
            before = len(connection.sent)
            sender.fire()
            for packet in connection.sent[before:]:
                if rtp.RtpPacket.parse(packet).payload[6] & 0x01 == 0:  # VP8 P bit clear: a keyframe
                    keyframes.setdefault(rtp.ssrc(packet), []).append(tick)
        # Each layer starts with a keyframe; its layers keep one phase, a clip apart after the first wrap.
        ticks = list(keyframes.values())
        assert len(ticks) == 3 and all(t == ticks[0] for t in ticks), keyframes
        first, *wraps = ticks[0]
        assert first == 0 and all(b - a == clip for a, b in itertools.pairwise(wraps)), ticks[0]
        phases.add(ticks[0][1] % clip)
    assert len(phases) >= 4, phases  # 8 publishers: the same phase for all is what this guards against


def test_subscribe_answer_mirrors_the_servers_offer_and_names_each_track():
    sections = [
        offer.Section("0", "audio", 111, "p_a", "p_a:0"),
        offer.Section("1", "video", 222, "p_a", "p_a:1"),
        offer.Section("2", "video"),  # idle, waiting for reuse
    ]
    certificate = Certificate.generate()
    text = offer.build_subscribe_offer(
        sections,
        ice_ufrag="srvu",
        ice_pwd="s" * 24,
        fingerprint=certificate.fingerprint_sha256,
        candidates=[sdp.Candidate.host("127.0.0.1", 50000)],
        session_id=5,
        version=3,
    )
    answer, transport, tracks = subscribe_answer(
        text, ufrag="mine", pwd="m" * 24, fingerprint=certificate.fingerprint_sha256, session_id=9
    )
    sdp.check_answer(sdp.parse(text), sdp.parse(answer))
    desc = sdp.parse(answer)
    assert [desc.direction_for(m) for m in desc.media] == ["recvonly", "recvonly", "inactive"]
    assert transport.address == ("127.0.0.1", 50000)
    assert [(t.kind, t.ssrc, t.publisher) for t in tracks] == [("audio", 111, "p_a"), ("video", 222, "p_a")]


def _srtp_pair() -> tuple[SrtpSession, SrtpSession]:
    key, salt = os.urandom(16), os.urandom(12)
    keys = SrtpKeys(SrtpProfile.AEAD_AES_128_GCM, key, salt, key, salt)
    return SrtpSession(keys), SrtpSession(keys)


def test_receiver_counts_loss_across_wraparound_freezes_layers_and_delay():
    tx, rx = _srtp_pair()
    receiver = Receiver()
    receiver.srtp = rx
    stream = receiver.stream(99)
    stream.kind, stream.publisher, stream.publisher_index, stream.expected_layer = "video", "p_x", 4, 0
    sender = RtpStream(96, 99, "1", "q", IDS, "video", 0)
    sender.seq = 0xFFF0
    packets = [tx.protect(sender.build(bytes(100), False, n, 4)) for n in range(40)]
    receiver.on_rtp(packets[0], 1_000_000)  # before the window: only a starting point
    receiver.start_window(1_000_000)
    clock = 1_000_000
    for n, packet in enumerate(packets[1:], start=1):
        if n in (5, 30):  # lost across the 16-bit wrap
            continue
        clock += 600_000 if n == 20 else 30_000  # one gap that freezes the picture
        receiver.on_rtp(packet, clock)
    receiver.stop_window(clock + 10_000)
    result = receiver.results("p_me", 1, 0)
    (video,) = result.streams
    assert (video.packets, video.lost, video.freezes) == (37, 2, 1)
    assert video.layers == {"q": 37} and video.layer == video.expected_layer == "q"
    assert video.wrong_sender == 0 and video.errors == 0
    assert result.delay_p50_ms is not None and result.videos_at_layer == 1


def test_delay_histogram_percentiles():
    histogram = DelayHistogram()
    for us in [100] * 98 + [5_000, 300_000]:
        histogram.add(us)
    assert histogram.percentile_ms(0.5) == 0.12  # the 20 µs bucket holding 100 µs
    assert histogram.percentile_ms(0.99) == 5.02
    assert histogram.percentile_ms(1.0) == 300.0 and histogram.max_us == 300_000
    for us in (2_500_000, 40_000_000):  # an overloaded server queues for seconds
        histogram.add(us)
    assert histogram.percentile_ms(0.995) == 2510.0 and histogram.percentile_ms(1.0) == 40_000.0


def test_layouts():
    others = [f"p_{i}" for i in range(30)]
    sizes = video_sizes("speaker", others, "p_7")
    assert sizes["p_7"] == STAGE and len(sizes) == 25 and list(sizes.values()).count(THUMBNAIL) == 24
    assert expected_layer(STAGE) == 2 and expected_layer(THUMBNAIL) == 0 and expected_layer(None) is None
    assert video_sizes("speaker", others[:3], "gone") == {"p_0": STAGE, "p_1": THUMBNAIL, "p_2": THUMBNAIL}
    gallery = video_sizes("gallery", others[:9], None)
    assert len(gallery) == 9 and set(gallery.values()) == {(640, 360)} and expected_layer((640, 360)) == 1
    assert len(video_sizes("gallery", others, None)) == 25
    # A publisher without simulcast sends its one layer to every tile, whatever its size.
    sizes_shown = (THUMBNAIL, (640, 360), STAGE, None)
    assert [expected_layer(s, simulcast=False) for s in sizes_shown] == [SINGLE_LAYER] * 3 + [None]
