"""huddle.rtc.sdp: parsing real offers, building the SFU's answers and offers, and aiortc accepting them.

The fixtures in tests/unit/sdp/ are real offers, captured inside a loopback-only network namespace:
- chromium_simulcast_offer.sdp / chromium_offer.sdp: Chromium 156 (Playwright, fake devices), a page on
  http://localhost/ served by Playwright's request interception (getUserMedia needs a secure context, which
  about:blank is not), one RTCPeerConnection, getUserMedia 1280x720, addTransceiver(audio, sendrecv) and
  addTransceiver(video, sendrecv, with or without rids q/h/f at scale 4/2/1), createOffer().
- chromium_datachannel_offer.sdp: the same with sendonly transceivers plus createDataChannel(), taken from
  localDescription after ICE gathering with --allow-loopback-in-peer-connection (so it has candidates).
- aiortc_offer.sdp: aiortc 1.16 with an AudioStreamTrack and a VideoStreamTrack, createOffer and
  setLocalDescription (aioice gathers no loopback candidate, so there is none).
The Chromium side of the acceptance tests is in test_sdp_chromium.py.
"""

from __future__ import annotations

import copy
import string
import time
from pathlib import Path

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from huddle.rtc import sdp
from huddle.rtc.sdp import (
    URI_ABS_SEND_TIME,
    URI_AUDIO_LEVEL,
    URI_MID,
    URI_REPAIRED_RID,
    URI_RID,
    URI_TRANSPORT_CC,
    Candidate,
    OutgoingTrack,
    SdpError,
)

FIXTURES = Path(__file__).parent / "sdp"
FINGERPRINT = ":".join(f"{b:02X}" for b in range(32))
ICE_UFRAG = "sfuA"
ICE_PWD = "0123456789abcdefghijkl+/"
CANDIDATES = [Candidate.host("127.0.0.1", 40000), Candidate.host("127.0.0.1", 40001, transport="tcp")]
HEAD = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def offer(name: str) -> sdp.SessionDescription:
    return sdp.parse(fixture(name))


def answer_to(desc: sdp.SessionDescription, **kwargs) -> sdp.SessionDescription:
    kwargs.setdefault("candidates", CANDIDATES)
    return sdp.build_answer(
        desc, ice_ufrag=ICE_UFRAG, ice_pwd=ICE_PWD, fingerprint_sha256=FINGERPRINT, **kwargs
    )


ALL_FIXTURES = sorted(p.name for p in FIXTURES.glob("*.sdp"))


# ---------------------------------------------------------------------------------------------------------
# Parsing the captured offers


def test_fixtures_are_all_there():
    assert set(ALL_FIXTURES) >= {
        "chromium_simulcast_offer.sdp",
        "chromium_offer.sdp",
        "aiortc_offer.sdp",
        "chromium_datachannel_offer.sdp",
    }


def test_chromium_simulcast_offer():
    desc = offer("chromium_simulcast_offer.sdp")
    assert desc.version == 0 and desc.origin.username == "-" and desc.timing == "0 0"
    assert desc.bundle == ["0", "1"]
    assert desc.extmap_allow_mixed
    assert [a.name for a in desc.attributes] == ["msid-semantic"]
    audio, video = desc.media
    assert (audio.kind, audio.port, audio.protocol, audio.mid) == ("audio", 9, "UDP/TLS/RTP/SAVPF", "0")
    assert audio.direction == "sendrecv" and video.direction == "sendrecv"
    assert audio.rtcp_mux and audio.rtcp_rsize
    assert audio.ice_ufrag and audio.ice_pwd and audio.ice_options == ["trickle"]
    assert audio.setup == "actpass"
    assert [f.algorithm for f in audio.fingerprints] == ["sha-256"]
    assert len(audio.fingerprints[0].value) == 95
    opus = audio.codec(111)
    assert opus is not None
    assert (opus.name, opus.clock_rate, opus.channels) == ("opus", 48000, 2)
    assert opus.fmtp == {"minptime": "10", "useinbandfec": "1"}
    assert opus.rtcp_fb == ["transport-cc"]
    assert audio.codec(63).fmtp == {"111/111": None}  # red's fmtp is not key=value
    assert audio.extension_id(URI_AUDIO_LEVEL) == 1
    assert audio.extension_id(URI_MID) == 4
    assert len(audio.msids) == 1 and audio.msids[0].track_id
    [ssrc] = audio.ssrcs
    assert ssrc.cname and ssrc.msid == f"{audio.msids[0].stream_id} {audio.msids[0].track_id}"
    # Unknown attributes are kept verbatim, in order.
    assert [(a.name, a.value) for a in audio.attributes] == [
        ("rtcp", "9 IN IP4 0.0.0.0"),
        ("rtcp-xr", "rcvr-rtt=all"),
    ]
    vp8 = video.codec(96)
    assert vp8.name == "VP8" and vp8.clock_rate == 90000 and vp8.channels is None
    assert vp8.rtcp_fb == ["goog-remb", "transport-cc", "ccm fir", "nack", "nack pli"]
    assert video.codec(97).is_rtx and video.codec(97).apt == 96
    assert video.codec(102).fmtp == {
        "level-asymmetry-allowed": "1",
        "packetization-mode": "1",
        "profile-level-id": "42001f",
    }
    assert video.extension_id(URI_RID) == 10 and video.extension_id(URI_REPAIRED_RID) == 11
    # rid-based simulcast: rids, no SSRCs.
    assert [(r.id, r.direction) for r in video.rids] == [("q", "send"), ("h", "send"), ("f", "send")]
    assert video.simulcast == sdp.Simulcast(
        send=[[sdp.RidChoice("q")], [sdp.RidChoice("h")], [sdp.RidChoice("f")]]
    )
    assert video.ssrcs == [] and video.ssrc_groups == []


def test_chromium_plain_offer_has_rtx_ssrc_group():
    video = offer("chromium_offer.sdp").media[1]
    assert video.rids == [] and video.simulcast is None
    [group] = video.ssrc_groups
    assert group.semantics == "FID" and len(group.ssrcs) == 2
    assert [s.ssrc for s in video.ssrcs] == group.ssrcs
    assert all(s.cname and s.msid for s in video.ssrcs)


def test_aiortc_offer():
    desc = offer("aiortc_offer.sdp")
    assert desc.bundle == ["0", "1"]
    audio, video = desc.media
    # aiortc gives every hash it can, per m-section, and signals end-of-candidates up front.
    assert [f.algorithm for f in audio.fingerprints] == ["sha-256", "sha-384", "sha-512"]
    assert audio.end_of_candidates and audio.candidates == []
    assert audio.codec(96).name == "opus" and audio.codec(96).fmtp == {}
    assert video.codec(97).name == "VP8" and video.codec(98).apt == 97
    assert [g.semantics for g in video.ssrc_groups] == ["FID"]


def test_chromium_gathered_offer_with_data_channel():
    desc = offer("chromium_datachannel_offer.sdp")
    assert desc.bundle == ["0", "1", "2"]
    audio, video, app = desc.media
    assert audio.direction == "sendonly" and video.direction == "sendonly"
    assert (app.kind, app.protocol, app.formats, app.codecs) == (
        "application",
        "UDP/DTLS/SCTP",
        ["webrtc-datachannel"],
        [],
    )
    assert [(a.name, a.value) for a in app.attributes] == [
        ("sctp-port", "5000"),
        ("max-message-size", "262144"),
    ]
    udp, tcp = audio.candidates
    assert (udp.transport, udp.type, udp.address, udp.port) == ("udp", "host", "127.0.0.1", audio.port)
    assert udp.generation == 0 and udp.extensions == {"network-id": "1", "network-cost": "50"}
    assert (tcp.transport, tcp.tcptype, tcp.port) == ("tcp", "active", 9)


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_round_trip(name):
    desc = offer(name)
    text = sdp.serialize(desc)
    assert text.endswith("\r\n") and "\n" not in text.replace("\r\n", "")
    assert sdp.parse(text) == desc
    assert sdp.serialize(sdp.parse(text)) == text


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_serialize_keeps_every_line(name):
    # Our attribute order differs from Chromium's, but no line is lost or invented.
    original = fixture(name).replace("\r\n", "\n").strip().split("\n")
    assert sorted(sdp.serialize(offer(name)).strip().split("\r\n")) == sorted(original)


def test_parse_accepts_lf_line_ends():
    text = fixture("chromium_offer.sdp")
    assert sdp.parse(text.replace("\r\n", "\n")) == sdp.parse(text)


def test_session_level_transport_applies_to_media():
    desc = sdp.parse(
        HEAD + "a=ice-ufrag:abcd\r\na=ice-pwd:0123456789012345678901\r\n"
        f"a=fingerprint:sha-256 {FINGERPRINT}\r\na=setup:active\r\na=recvonly\r\n"
        "m=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:a\r\n"
    )
    media = desc.media[0]
    assert media.ice_ufrag is None and desc.ice_credentials(media) == ("abcd", "0123456789012345678901")
    assert desc.setup_for(media) == "active" and desc.direction_for(media) == "recvonly"
    assert desc.fingerprints_for(media)[0].value == FINGERPRINT
    assert media.codec(0).name == ""  # static payload type without rtpmap


def test_rid_restrictions_and_simulcast_alternatives():
    desc = sdp.parse(
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96 98\r\n"
        "a=rtpmap:96 VP8/90000\r\na=rtpmap:98 VP9/90000\r\n"
        "a=rid:a send pt=96,98;max-width=1280;max-height=720\r\na=rid:b send max-fps=15\r\na=rid:c recv\r\n"
        "a=simulcast:send a,~b;c recv c\r\n"
    )
    a, b, c = desc.media[0].rids
    assert a.payload_types == [96, 98] and a.restrictions == {"max-width": "1280", "max-height": "720"}
    assert b.payload_types == [] and b.restrictions == {"max-fps": "15"}
    assert c.direction == "recv"
    sc = desc.media[0].simulcast
    assert sc.send == [[sdp.RidChoice("a"), sdp.RidChoice("b", paused=True)], [sdp.RidChoice("c")]]
    assert sc.recv == [[sdp.RidChoice("c")]]
    assert sdp.parse(sdp.serialize(desc)) == desc


def test_extmap_direction_and_attributes():
    desc = sdp.parse(
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
        f"a=extmap:3/sendonly {URI_AUDIO_LEVEL} vad=on\r\n"
    )
    [ext] = desc.media[0].extmaps
    assert (ext.id, ext.uri, ext.direction, ext.attributes) == (3, URI_AUDIO_LEVEL, "sendonly", "vad=on")
    assert sdp.parse(sdp.serialize(desc)) == desc


BAD_SDP = [
    "",
    "v=1\r\n",
    "hello",
    "v=0\r\ns=-\r\nt=0 0\r\n",  # no o=
    HEAD + "m=audio x UDP/TLS/RTP/SAVPF 111\r\n",
    HEAD + "m=audio 9 UDP/TLS/RTP/SAVPF 128\r\n",
    HEAD + "m=audio 9 UDP/TLS/RTP/SAVPF 111 111\r\n",
    HEAD + "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:112 opus/48000\r\n",
    HEAD + "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus\r\n",
    HEAD + "m=audio 9 RTP/AVP 0\r\na=mid:0\r\na=mid:1\r\n",
    HEAD + "m=audio 9 RTP/AVP 0\r\na=sendonly\r\na=recvonly\r\n",
    HEAD + "m=audio 9 RTP/AVP 0\r\na=extmap:0 urn:x\r\n",
    HEAD + "m=audio 9 RTP/AVP 0\r\na=extmap:256 urn:x\r\n",
    HEAD + "m=audio 9 RTP/AVP 0\r\na=setup:sometimes\r\n",
    HEAD + "m=video 9 RTP/AVP 96\r\na=rid:q sideways\r\n",
    HEAD + "m=video 9 RTP/AVP 96\r\na=simulcast:send q;;h\r\n",
    HEAD + "m=video 9 RTP/AVP 96\r\na=simulcast:send q send h\r\n",
    HEAD + "m=video 9 RTP/AVP 96\r\na=ssrc:4294967296 cname:x\r\n",
    HEAD + "m=video 9 RTP/AVP 96\r\na=candidate:1 1 udp 1 1.2.3.4 5 host\r\n",
    HEAD + "m=video 9 RTP/AVP 96\r\na=rtcp-mux:yes\r\n",
    HEAD + "m=video 9 RTP/AVP ٩٦\r\n",  # non-ASCII digits
    "v=0\r\nt=0 0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\n",  # out of order
    HEAD + "x=unknown\r\n",
    HEAD + "a=\r\n",
]


@pytest.mark.parametrize("text", BAD_SDP)
def test_parse_rejects(text):
    with pytest.raises(SdpError):
        sdp.parse(text)


def test_sdp_error_is_a_value_error():
    assert issubclass(SdpError, ValueError)


# ---------------------------------------------------------------------------------------------------------
# Bounded work: the parser stops at its limits, naming them, and no line costs more than a constant


def sections(count: int, kind: str = "audio") -> str:
    return "".join(f"m={kind} 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:{i}\r\n" for i in range(count))


def test_parse_stops_at_max_media_naming_it():
    assert len(sdp.parse(HEAD + sections(16), max_media=16).media) == 16
    with pytest.raises(sdp.SdpLimitError, match="over 16 m-sections; at most 16 are allowed"):
        sdp.parse(HEAD + sections(500), max_media=16)
    assert len(sdp.parse(HEAD + sections(sdp.MAX_MEDIA)).media) == sdp.MAX_MEDIA
    with pytest.raises(sdp.SdpLimitError, match=f"at most {sdp.MAX_MEDIA} are allowed"):
        sdp.parse(HEAD + sections(sdp.MAX_MEDIA + 1))


def test_parse_bounds_the_lines_of_each_level():
    full = "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n" + "a=x\r\n" * sdp.MAX_SECTION_LINES
    assert len(sdp.parse(HEAD + full).media[0].attributes) == sdp.MAX_SECTION_LINES
    with pytest.raises(sdp.SdpLimitError, match=f"over {sdp.MAX_SECTION_LINES} lines in m-section 0"):
        sdp.parse(HEAD + full + "b=AS:1\r\n")
    with pytest.raises(sdp.SdpLimitError, match="at session level"):
        sdp.parse(HEAD + "t=0 0\r\n" * sdp.MAX_SECTION_LINES)


def test_parse_bounds_the_whole_text_before_reading_it():
    with pytest.raises(sdp.SdpLimitError, match=f"over {sdp.MAX_LINES} lines"):
        sdp.parse(HEAD + sections(sdp.MAX_LINES // 2 + 1))


def test_parse_bounds_simulcast_lists():
    rids = ";".join(f"r{i}" for i in range(sdp.MAX_SIMULCAST_RIDS))
    line = f"m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=simulcast:send {rids}\r\n"
    assert len(sdp.parse(HEAD + line).media[0].simulcast.send) == sdp.MAX_SIMULCAST_RIDS
    with pytest.raises(sdp.SdpLimitError, match="a=simulcast lists over"):
        sdp.parse(HEAD + line.replace(rids, rids + ",x"))


def test_limit_errors_are_sdp_errors():
    # Signaling answers any ValueError from the SFU with `bad_sdp` and its text, which names the limit.
    assert issubclass(sdp.SdpLimitError, SdpError)


def hostile_offers() -> dict[str, str]:
    """60,000 characters (the schema's limit for an offer) of what made the parser or the SFU work hardest."""

    def up_to_60k(text: str) -> str:
        return text[:60_000].rpartition("\r\n")[0] + "\r\n"

    section = HEAD + "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
    return {
        "500 audio sections": up_to_60k(HEAD + sections(2000)),
        "one section of distinct a=ssrc lines": up_to_60k(
            section + "".join(f"a=ssrc:{i} cname:x\r\n" for i in range(4000))
        ),
        "one section of a=rtcp-fb lines": up_to_60k(section + "a=rtcp-fb:111 nack\r\n" * 4000),
        "one section of a=rid lines": up_to_60k(
            section + "".join(f"a=rid:{i} send\r\n" for i in range(5000))
        ),
        "session-level t= lines": up_to_60k(HEAD + "t=0 0\r\n" * 9000),
    }


@pytest.mark.parametrize("name", sorted(hostile_offers()))
def test_hostile_offers_are_refused_after_reading_little(name):
    text = hostile_offers()[name]
    assert 50_000 < len(text) <= 60_000
    best = float("inf")
    for _ in range(5):  # CPU time, the best of five: the parser's own cost, not a busy machine's
        started = time.thread_time()
        with pytest.raises(sdp.SdpLimitError):
            sdp.parse(text, max_media=16)
        best = min(best, time.thread_time() - started)
    assert best < 0.005, f"{name}: {best * 1000:.1f} ms"


FIXTURE_LINES = sorted({line for name in ALL_FIXTURES for line in fixture(name).split("\r\n") if line})


@given(st.text())
def test_parse_arbitrary_text_raises_only_sdp_error(text):
    try:
        sdp.parse(text)
    except SdpError:
        pass


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(FIXTURE_LINES), max_size=40),
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 200), st.text(max_size=3)), max_size=4),
)
def test_parse_mutated_sdp_raises_only_sdp_error_and_round_trips(lines, edits):
    """SDP-shaped input reaches far deeper than random text: real lines, shuffled and corrupted."""
    head = ["v=0", "o=- 1 2 IN IP4 127.0.0.1", "s=-", "t=0 0"]
    body = list(lines)
    for index, position, insert in edits:
        if body:
            line = body[index % len(body)]
            body[index % len(body)] = line[:position] + insert + line[position:]
    text = "\r\n".join(head + body) + "\r\n"
    try:
        desc = sdp.parse(text)
    except SdpError:
        return
    assert sdp.parse(sdp.serialize(desc)) == desc


# Structured descriptions: whatever the model can hold in parseable form comes back equal.
tokens = st.text(string.ascii_letters + string.digits + "-_.", min_size=1, max_size=8)
rid_ids = st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=4)
# Attribute names the parser interprets: an attribute drawn as "unknown" must not take one of them, or it
# would be read back as that attribute (hypothesis found "rtcp-fb" in a CI run).
INTERPRETED = {
    "bundle-only",
    "candidate",
    "end-of-candidates",
    "extmap",
    "extmap-allow-mixed",
    "fingerprint",
    "fmtp",
    "group",
    "ice-lite",
    "ice-options",
    "ice-pwd",
    "ice-ufrag",
    "mid",
    "msid",
    "rid",
    "rtcp-fb",
    "rtcp-mux",
    "rtcp-rsize",
    "rtpmap",
    "setup",
    "simulcast",
    "ssrc",
    "ssrc-group",
    *sdp.DIRECTIONS,
}
unknown_names = tokens.filter(lambda name: name.lower() not in INTERPRETED)
words = st.text(string.ascii_letters + string.digits + "+/:.-_{}", min_size=1, max_size=12)


@st.composite
def codecs(draw):
    pts = draw(st.lists(st.integers(0, 127), unique=True, max_size=5))
    out = []
    for pt in pts:
        named = draw(st.booleans())
        out.append(
            sdp.Codec(
                pt,
                draw(st.sampled_from(["opus", "VP8", "H264", "rtx", "red"])) if named else "",
                draw(st.sampled_from([8000, 48000, 90000])) if named else 0,
                draw(st.sampled_from([None, 1, 2])) if named else None,
                draw(st.dictionaries(tokens, st.none() | tokens, max_size=3)),
                draw(st.lists(st.sampled_from(sorted(sdp.SUPPORTED_RTCP_FB)), max_size=3)),
            )
        )
    return out


@st.composite
def media_descriptions(draw):
    rtp = draw(st.booleans())
    streams = st.lists(
        st.lists(st.builds(sdp.RidChoice, rid_ids, st.booleans()), min_size=1, max_size=2), max_size=3
    )
    simulcast = draw(st.none() | st.builds(sdp.Simulcast, streams, streams))
    if simulcast is not None and not simulcast.send and not simulcast.recv:
        simulcast = None
    candidate = st.builds(
        Candidate,
        foundation=tokens,
        component=st.integers(1, 2),
        transport=st.sampled_from(["udp", "tcp"]),
        priority=st.integers(0, 2**32 - 1),
        address=st.sampled_from(["127.0.0.1", "::1", "abc.local"]),
        port=st.integers(0, 65535),
        type=st.sampled_from(["host", "srflx", "relay"]),
        raddr=st.none() | st.just("0.0.0.0"),
        rport=st.none() | st.integers(0, 65535),
        tcptype=st.none() | st.sampled_from(["active", "passive"]),
        generation=st.none() | st.integers(0, 10),
        ufrag=st.none() | tokens,
        extensions=st.dictionaries(st.sampled_from(["network-id", "network-cost"]), tokens, max_size=2),
    )
    return sdp.MediaDescription(
        kind=draw(st.sampled_from(["audio", "video", "application"])),
        port=draw(st.integers(0, 65535)),
        protocol="UDP/TLS/RTP/SAVPF" if rtp else "UDP/DTLS/SCTP",
        codecs=draw(codecs()) if rtp else [],
        formats=[] if rtp else draw(st.lists(tokens, max_size=2)),
        connection=draw(st.none() | st.just("IN IP4 0.0.0.0")),
        mid=draw(st.none() | tokens),
        direction=draw(st.none() | st.sampled_from(sdp.DIRECTIONS)),
        ice_ufrag=draw(st.none() | words),
        ice_pwd=draw(st.none() | words),
        fingerprints=draw(st.lists(st.builds(sdp.Fingerprint, tokens, words), max_size=2)),
        setup=draw(st.none() | st.sampled_from(["actpass", "active", "passive"])),
        rtcp_mux=draw(st.booleans()),
        rtcp_rsize=draw(st.booleans()),
        extmaps=[
            sdp.Extmap(i, uri, direction, attrs)
            for i, uri, direction, attrs in draw(
                st.lists(
                    st.tuples(
                        st.integers(1, 255),
                        st.sampled_from(list(sdp.DEFAULT_EXTENSIONS)),
                        st.none() | st.sampled_from(sdp.DIRECTIONS),
                        st.none() | tokens,
                    ),
                    max_size=4,
                )
            )
        ],
        msids=draw(st.lists(st.builds(sdp.Msid, tokens, st.none() | tokens), max_size=2)),
        ssrc_groups=draw(
            st.lists(
                st.builds(sdp.SsrcGroup, st.just("FID"), st.lists(st.integers(0, 2**32 - 1), max_size=2)),
                max_size=1,
            )
        ),
        ssrcs=[
            sdp.Ssrc(s, attrs)
            for s, attrs in draw(
                st.dictionaries(
                    st.integers(0, 2**32 - 1),
                    st.dictionaries(
                        st.sampled_from(["cname", "msid", "label"]), st.none() | tokens, max_size=2
                    ),
                    max_size=2,
                )
            ).items()
        ],
        rids=[
            sdp.Rid(rid, direction, pts, restrictions)
            for rid, (direction, pts, restrictions) in draw(
                st.dictionaries(
                    rid_ids,
                    st.tuples(
                        st.sampled_from(["send", "recv"]),
                        st.lists(st.integers(0, 127), max_size=2),
                        st.dictionaries(
                            st.sampled_from(["max-width", "max-fps"]), st.none() | tokens, max_size=2
                        ),
                    ),
                    max_size=3,
                )
            ).items()
        ],
        simulcast=simulcast,
        candidates=draw(st.lists(candidate, max_size=2)),
        end_of_candidates=draw(st.booleans()),
        attributes=draw(st.lists(st.builds(sdp.Attribute, unknown_names, st.none() | words), max_size=2)),
    )


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    st.builds(
        sdp.SessionDescription,
        origin=st.builds(sdp.Origin, st.just("-"), st.integers(0, 2**63), st.integers(0, 2**63)),
        ice_lite=st.booleans(),
        groups=st.lists(st.builds(sdp.Group, st.just("BUNDLE"), st.lists(tokens, max_size=3)), max_size=1),
        extmap_allow_mixed=st.booleans(),
        attributes=st.lists(st.builds(sdp.Attribute, unknown_names, st.none() | words), max_size=2),
        media=st.lists(media_descriptions(), max_size=3),
    )
)
def test_structured_round_trip(desc):
    assert sdp.parse(sdp.serialize(desc)) == desc


# ---------------------------------------------------------------------------------------------------------
# Candidates


@pytest.mark.parametrize(
    "line",
    [
        "candidate:2928939480 1 udp 2122260223 127.0.0.1 50905 typ host generation 0 network-id 1 "
        "network-cost 50",
        "candidate:1346291020 1 tcp 1518280447 127.0.0.1 9 typ host tcptype active generation 0 network-id 1",
        "candidate:842163049 1 udp 1677729535 203.0.113.7 40021 typ srflx raddr 10.0.0.2 rport 40021 "
        "generation 0 ufrag Xy12 network-cost 999",
        "candidate:1 1 UDP 2130706431 2001:db8::1 5000 typ host",
        "candidate:3 1 udp 2113937151 0e5bd1c5-3c5a-4e0c-9b5c-7d1c3d0e0d70.local 51000 typ host generation 0",
        "candidate:4 2 udp 41885439 198.51.100.1 3478 typ relay raddr 203.0.113.7 rport 40021",
    ],
)
def test_candidate_round_trip(line):
    candidate = sdp.parse_candidate(line)
    assert candidate.to_sdp() == line
    assert sdp.parse_candidate("a=" + line) == candidate
    assert sdp.parse_candidate(line.removeprefix("candidate:")) == candidate


def test_candidate_fields():
    c = sdp.parse_candidate(
        "candidate:842163049 1 udp 1677729535 203.0.113.7 40021 typ srflx raddr 10.0.0.2 rport 40021 "
        "generation 0 ufrag Xy12 network-cost 999"
    )
    assert (c.foundation, c.component, c.transport, c.priority) == ("842163049", 1, "udp", 1677729535)
    assert (c.address, c.port, c.type, c.raddr, c.rport) == ("203.0.113.7", 40021, "srflx", "10.0.0.2", 40021)
    assert (c.generation, c.ufrag, c.extensions) == (0, "Xy12", {"network-cost": "999"})


@pytest.mark.parametrize(
    "line",
    [
        "candidate:1 1 udp 1 1.2.3.4 5",
        "candidate:1 1 udp 1 1.2.3.4 5 type host",
        "candidate:1 1 udp x 1.2.3.4 5 typ host",
        "candidate:1 1 udp 1 1.2.3.4 70000 typ host",
        "candidate:1 1 udp 1 1.2.3.4 5 typ host generation",
        "candidate:1 1 udp 1 1.2.3.4 5 typ host generation 0 generation 1",
        "candidate:1 0x1 udp 1 1.2.3.4 5 typ host",
    ],
)
def test_candidate_rejects(line):
    with pytest.raises(SdpError):
        sdp.parse_candidate(line)


def test_host_candidates_prefer_udp_and_offer_passive_tcp():
    udp = Candidate.host("192.0.2.1", 40000)
    tcp = Candidate.host("192.0.2.1", 40000, transport="tcp")
    assert udp.priority == (126 << 24) | (65535 << 8) | 255 == 2130706431
    assert tcp.tcptype == "passive" and udp.tcptype is None
    assert tcp.priority < udp.priority
    assert tcp.foundation != udp.foundation  # different transports never share a foundation
    assert Candidate.host("192.0.2.1", 1).foundation == udp.foundation
    assert sdp.parse_candidate(tcp.to_sdp()) == tcp


# ---------------------------------------------------------------------------------------------------------
# Codec choice


def test_choose_codecs_for_chromium_video():
    video = offer("chromium_simulcast_offer.sdp").media[1]
    chosen = sdp.choose_codecs(video)
    # VP8 first (our preference), each kept codec followed by its RTX; H.264 only constrained baseline with
    # packetization-mode=1; no VP9, AV1, red, ulpfec, or H.264 main/pm=0.
    assert [(c.pt, c.name) for c in chosen] == [
        (96, "VP8"),
        (97, "rtx"),
        (102, "H264"),
        (103, "rtx"),
        (108, "H264"),
        (109, "rtx"),
    ]
    assert chosen[0].rtcp_fb == ["goog-remb", "transport-cc", "ccm fir", "nack", "nack pli"]
    assert chosen[1].fmtp == {"apt": "96"} and chosen[1].rtcp_fb == []
    assert chosen[4].fmtp["profile-level-id"] == "42e01f"


def test_choose_codecs_for_audio_keeps_opus_fmtp_and_filters_feedback():
    audio = offer("chromium_offer.sdp").media[0]
    audio.codecs[0].rtcp_fb.append("unknown-fb")
    [opus] = sdp.choose_codecs(audio)
    assert (opus.pt, opus.name, opus.channels) == (111, "opus", 2)
    assert opus.fmtp == {"minptime": "10", "useinbandfec": "1"}
    assert opus.rtcp_fb == ["transport-cc"]


def test_choose_codecs_adds_opus_defaults_to_a_bare_offer():
    [opus] = sdp.choose_codecs(offer("aiortc_offer.sdp").media[0])
    assert opus.pt == 96 and opus.fmtp == {"minptime": "10", "useinbandfec": "1"}


def test_choose_codecs_without_h264():
    video = offer("chromium_offer.sdp").media[1]
    assert [c.name for c in sdp.choose_codecs(video, [sdp.VP8])] == ["VP8", "rtx"]
    assert sdp.choose_codecs(video, [sdp.OPUS]) == []


def test_choose_codecs_does_not_mutate_the_offer():
    desc = offer("chromium_offer.sdp")
    before = copy.deepcopy(desc)
    answer_to(desc)
    assert desc == before


# ---------------------------------------------------------------------------------------------------------
# Answers


def test_answer_to_chromium_simulcast_offer():
    desc = offer("chromium_simulcast_offer.sdp")
    answer = answer_to(desc)
    assert answer.ice_lite
    assert (answer.ice_ufrag, answer.ice_pwd, answer.setup) == (ICE_UFRAG, ICE_PWD, "passive")
    assert answer.fingerprints == [sdp.Fingerprint("sha-256", FINGERPRINT)]
    assert answer.bundle == ["0", "1"]
    assert [m.mid for m in answer.media] == ["0", "1"]
    for media in answer.media:
        assert media.direction == "recvonly" and media.rtcp_mux and media.rtcp_rsize
        assert media.candidates == CANDIDATES and media.end_of_candidates
        assert (media.port, media.connection) == (40000, "IN IP4 127.0.0.1")
        offered = desc.media_by_mid(media.mid)
        # Only extensions we support, each under the OFFER's id.
        for ext in media.extmaps:
            assert ext.uri in sdp.DEFAULT_EXTENSIONS
            assert offered.extension_id(ext.uri) == ext.id
    audio, video = answer.media
    assert {e.uri for e in audio.extmaps} == {URI_AUDIO_LEVEL, URI_ABS_SEND_TIME, URI_TRANSPORT_CC, URI_MID}
    assert {e.uri for e in video.extmaps} == {
        URI_ABS_SEND_TIME,
        URI_TRANSPORT_CC,
        URI_MID,
        URI_RID,
        URI_REPAIRED_RID,
    }
    assert [(r.id, r.direction) for r in video.rids] == [("q", "recv"), ("h", "recv"), ("f", "recv")]
    assert video.simulcast == sdp.Simulcast(
        recv=[[sdp.RidChoice("q")], [sdp.RidChoice("h")], [sdp.RidChoice("f")]]
    )
    assert video.ssrcs == [] and video.msids == []
    assert sdp.parse(sdp.serialize(answer)) == answer
    assert "a=simulcast:recv q;h;f\r\n" in sdp.serialize(answer)


def test_simulcast_answer_keeps_rid_extension_even_when_not_asked_for():
    answer = answer_to(offer("chromium_simulcast_offer.sdp"), supported_extensions=[URI_MID])
    video = answer.media[1]
    assert {e.uri for e in video.extmaps} == {URI_MID, URI_RID, URI_REPAIRED_RID}
    assert video.simulcast is not None


def test_simulcast_offer_without_rid_extension_is_declined_not_half_answered():
    desc = offer("chromium_simulcast_offer.sdp")
    desc.media[1].extmaps = [e for e in desc.media[1].extmaps if e.uri != URI_RID]
    video = answer_to(desc).media[1]
    assert video.simulcast is None and video.rids == []


def test_answer_keeps_paused_and_alternative_rids():
    desc = offer("chromium_simulcast_offer.sdp")
    desc.media[1].simulcast = sdp.Simulcast(
        send=[[sdp.RidChoice("q"), sdp.RidChoice("h")], [sdp.RidChoice("f", True)]]
    )
    assert answer_to(desc).media[1].simulcast.recv == desc.media[1].simulcast.send


def test_answer_rejects_data_channel_and_keeps_its_mid():
    desc = offer("chromium_datachannel_offer.sdp")
    answer = answer_to(desc)
    audio, video, app = answer.media
    assert (app.kind, app.port, app.mid, app.protocol, app.formats) == (
        "application",
        0,
        "2",
        "UDP/DTLS/SCTP",
        ["webrtc-datachannel"],
    )
    assert app.rejected and app.candidates == []
    assert answer.bundle == ["0", "1"]
    assert audio.direction == "recvonly" and video.direction == "recvonly" and video.simulcast is not None
    assert sdp.parse(sdp.serialize(answer)) == answer


def test_rejected_rtp_section_keeps_what_aiortc_needs():
    desc = offer("chromium_offer.sdp")
    desc.media[1].rtcp_mux = False  # we only run RTP and RTCP on one port
    video = answer_to(desc).media[1]
    assert video.port == 0 and video.mid == "1" and video.rejected
    assert [(c.pt, c.name) for c in video.codecs] == [(96, "VP8")] and video.codecs[0].rtcp_fb == []
    assert video.rtcp_mux and video.direction == "inactive"


def test_bundle_tag_we_cannot_use_is_answered_inactive_not_rejected():
    desc = offer("chromium_offer.sdp")
    answer = answer_to(desc, supported_codecs=[sdp.VP8])
    audio, video = answer.media
    assert audio.port != 0 and audio.direction == "inactive" and [c.name for c in audio.codecs] == ["opus"]
    assert video.direction == "recvonly"
    assert answer.bundle == ["0", "1"]


def test_sections_outside_the_bundle_group_are_rejected():
    desc = offer("chromium_offer.sdp")
    desc.groups[0].mids = ["0"]
    answer = answer_to(desc)
    assert answer.media[1].rejected and answer.bundle == ["0"]


@pytest.mark.parametrize(
    ("offered", "sending", "expected"),
    [
        ("sendrecv", False, "recvonly"),
        ("sendrecv", True, "sendrecv"),
        ("sendonly", False, "recvonly"),
        ("sendonly", True, "recvonly"),
        ("recvonly", True, "sendonly"),
        ("recvonly", False, "inactive"),
        ("inactive", True, "inactive"),
    ],
)
def test_answer_direction(offered, sending, expected):
    desc = offer("chromium_offer.sdp")
    desc.media[1].direction = offered
    track = OutgoingTrack("video", 1234, "peer-b", "streamB", "videoB", rtx_ssrc=1235)
    video = answer_to(desc, outgoing={"1": track} if sending else None).media[1]
    assert video.direction == expected
    if expected in ("sendrecv", "sendonly"):
        assert video.msids == [sdp.Msid("streamB", "videoB")]
        assert video.ssrc_groups == [sdp.SsrcGroup("FID", [1234, 1235])]
        assert [(s.ssrc, s.cname, s.msid) for s in video.ssrcs] == [
            (1234, "peer-b", "streamB videoB"),
            (1235, "peer-b", "streamB videoB"),
        ]
    else:
        assert video.ssrcs == [] and video.msids == []


def test_answer_keeps_our_dtls_role_whatever_the_offer_proposes():
    for their_setup in ("actpass", "active", None):
        desc = offer("chromium_offer.sdp")
        for media in desc.media:
            media.setup = their_setup
        assert answer_to(desc).setup == "passive"


def test_answer_refuses_an_offer_that_wants_our_role():
    desc = offer("chromium_offer.sdp")
    for media in desc.media:
        media.setup = "passive"
    with pytest.raises(SdpError, match="DTLS role"):
        answer_to(desc)


def test_answer_refuses_an_offer_without_credentials():
    desc = offer("chromium_offer.sdp")
    desc.media[0].ice_pwd = None
    with pytest.raises(SdpError):
        answer_to(desc)
    desc = offer("chromium_offer.sdp")
    for media in desc.media:
        media.fingerprints = []
    with pytest.raises(SdpError):
        answer_to(desc)


def test_answer_checks_its_own_arguments():
    desc = offer("chromium_offer.sdp")
    with pytest.raises(ValueError):
        sdp.build_answer(desc, ice_ufrag="sfuA", ice_pwd="short", fingerprint_sha256=FINGERPRINT)
    with pytest.raises(ValueError):
        sdp.build_answer(desc, ice_ufrag="sfuA", ice_pwd=ICE_PWD, fingerprint_sha256="AB:CD")
    with pytest.raises(ValueError):
        sdp.build_answer(
            desc, ice_ufrag="sfuA", ice_pwd=ICE_PWD, fingerprint_sha256=FINGERPRINT, setup="actpass"
        )
    with pytest.raises(ValueError):
        answer_to(desc, outgoing={"1": OutgoingTrack("audio", 1, "c", "s", "t")})


def test_answer_refuses_an_offer_with_clashing_extension_ids():
    desc = offer("chromium_offer.sdp")
    desc.media[1].extmaps.append(sdp.Extmap(1, URI_TRANSPORT_CC))  # id 1 is audio level in the audio section
    desc.media[1].extmaps = [e for e in desc.media[1].extmaps if e.id != 3]
    with pytest.raises(SdpError, match="id 1"):
        answer_to(desc)


def test_answer_without_candidates_uses_the_discard_port():
    media = answer_to(offer("chromium_offer.sdp"), candidates=[]).media[0]
    assert (media.port, media.connection, media.candidates) == (9, "IN IP4 0.0.0.0", [])


def test_answer_session_version_and_id():
    desc = offer("chromium_offer.sdp")
    first, second = answer_to(desc), answer_to(desc, session_version=2)
    assert first.origin.session_id == second.origin.session_id > 0
    assert (first.origin.session_version, second.origin.session_version) == (1, 2)
    assert answer_to(desc, session_id=42).origin.session_id == 42


# ---------------------------------------------------------------------------------------------------------
# SFU offers (renegotiation)

TRACK_B_AUDIO = OutgoingTrack("audio", 1111, "peer-b", "streamB", "audioB")
TRACK_B_VIDEO = OutgoingTrack("video", 2222, "peer-b", "streamB", "videoB", rtx_ssrc=2223)
TRACK_C_VIDEO = OutgoingTrack("video", 3333, "peer-c", "streamC", "videoC", rtx_ssrc=3334)


def negotiated() -> sdp.SessionDescription:
    return answer_to(offer("chromium_simulcast_offer.sdp"))


def ext_ids(desc: sdp.SessionDescription) -> dict[str, set[int]]:
    ids: dict[str, set[int]] = {}
    for media in desc.media:
        for ext in media.extmaps:
            ids.setdefault(ext.uri, set()).add(ext.id)
    return ids


def test_offer_adds_sendonly_sections_with_negotiated_ids_and_payload_types():
    current = negotiated()
    offer_, mids = sdp.build_offer(current, add=[TRACK_B_AUDIO, TRACK_B_VIDEO, TRACK_C_VIDEO])
    assert mids == ["2", "3", "4"]
    assert [m.mid for m in offer_.media] == ["0", "1", "2", "3", "4"]
    assert offer_.bundle == ["0", "1", "2", "3", "4"]
    # JSEP wants actpass in an offer; the transport stays as it was.
    assert offer_.setup == "actpass"
    assert (offer_.ice_ufrag, offer_.ice_pwd, offer_.fingerprints) == (
        current.ice_ufrag,
        current.ice_pwd,
        current.fingerprints,
    )
    assert offer_.ice_lite
    assert offer_.origin.session_id == current.origin.session_id
    assert offer_.origin.session_version == current.origin.session_version + 1
    # Existing sections unchanged but for the role.
    assert offer_.media[:2] == current.media[:2]
    audio, video_b, video_c = offer_.media[2:]
    for media, track in ((audio, TRACK_B_AUDIO), (video_b, TRACK_B_VIDEO), (video_c, TRACK_C_VIDEO)):
        assert media.direction == "sendonly" and media.rtcp_mux
        assert media.msids == [sdp.Msid(track.stream_id, track.track_id)]
        assert media.ssrcs[0].ssrc == track.ssrc and media.ssrcs[0].cname == track.cname
        assert media.candidates == current.media[0].candidates
        assert media.simulcast is None and media.rids == []
        template = current.media[0 if media.kind == "audio" else 1]
        assert [c.pt for c in media.codecs] == [c.pt for c in template.codecs]
        assert {e.uri: e.id for e in media.extmaps}.items() <= {e.uri: e.id for e in template.extmaps}.items()
    assert video_b.ssrc_groups == [sdp.SsrcGroup("FID", [2222, 2223])]
    assert URI_AUDIO_LEVEL in {e.uri for e in audio.extmaps}
    assert URI_RID not in {e.uri for e in video_b.extmaps}
    # Header extension ids equal the ones negotiated before, and no id names two URIs.
    assert all(len(ids) == 1 for ids in ext_ids(offer_).values())
    before = {e.uri: e.id for m in current.media for e in m.extmaps}
    assert all(before[uri] == next(iter(ids)) for uri, ids in ext_ids(offer_).items())
    sdp.bundle_extmap(offer_)
    assert sdp.parse(sdp.serialize(offer_)) == offer_
    assert sdp.outgoing_tracks(offer_) == {"2": TRACK_B_AUDIO, "3": TRACK_B_VIDEO, "4": TRACK_C_VIDEO}


def test_offer_remove_stop_and_reuse():
    current, _ = sdp.build_offer(negotiated(), add=[TRACK_B_AUDIO, TRACK_B_VIDEO, TRACK_C_VIDEO])
    removed, _ = sdp.build_offer(current, remove=["3"], stop=["2"])
    stopped, inactive = removed.media[2], removed.media[3]
    assert (stopped.port, stopped.mid, stopped.rejected) == (0, "2", True)
    assert stopped.candidates == [] and stopped.extmaps == []
    assert (inactive.direction, inactive.mid, inactive.ssrcs, inactive.msids) == ("inactive", "3", [], [])
    assert removed.bundle == ["0", "1", "3", "4"]
    assert sdp.outgoing_tracks(removed) == {"4": TRACK_C_VIDEO}

    track_d = OutgoingTrack("video", 4444, "peer-d", "streamD", "videoD", rtx_ssrc=4445)
    track_e = OutgoingTrack("audio", 5555, "peer-e", "streamE", "audioE")
    track_f = OutgoingTrack("audio", 6666, "peer-f", "streamF", "audioF")
    reused, new_mids = sdp.build_offer(removed, add=[track_d, track_e, track_f], reusable=["3"])
    # video D takes the inactive section we freed (same mid); audio E the stopped slot under a NEW mid (JSEP
    # §5.2.2); audio F a new section at the end; no mid ever comes back with another meaning.
    assert new_mids == ["3", "5", "6"]
    assert [m.mid for m in reused.media] == ["0", "1", "5", "3", "4", "6"]
    assert [m.direction for m in reused.media[2:]] == ["sendonly"] * 4
    assert sdp.outgoing_tracks(reused) == {"5": track_e, "3": track_d, "4": TRACK_C_VIDEO, "6": track_f}
    assert all(len(ids) == 1 for ids in ext_ids(reused).values())


def test_offer_does_not_reuse_inactive_sections_it_was_not_told_about():
    current, _ = sdp.build_offer(negotiated(), add=[TRACK_B_VIDEO])
    current.media[1].direction = "inactive"  # the browser paused its own camera section
    _, mids = sdp.build_offer(current, add=[TRACK_C_VIDEO])
    assert mids == ["3"]


def test_offer_replaces_a_track_in_place():
    current, _ = sdp.build_offer(negotiated(), add=[TRACK_B_VIDEO])
    replaced, mids = sdp.build_offer(current, remove=["2"], add=[TRACK_C_VIDEO])
    assert mids == ["2"] and sdp.outgoing_tracks(replaced) == {"2": TRACK_C_VIDEO}


def test_offer_marks_sections_the_remote_rejected():
    current, _ = sdp.build_offer(negotiated(), add=[TRACK_B_VIDEO])
    remote = copy.deepcopy(current)
    remote.media[2].port = 0
    again, _ = sdp.build_offer(current, remote=remote)
    assert again.media[2].rejected and again.media[2].mid == "2"


def test_offer_for_a_kind_never_negotiated_picks_free_ids_and_payload_types():
    audio_only = offer("chromium_offer.sdp")
    audio_only.media = audio_only.media[:1]
    audio_only.groups[0].mids = ["0"]
    current = answer_to(audio_only)
    offer_, _ = sdp.build_offer(current, add=[TRACK_B_VIDEO])
    video = offer_.media[1]
    assert [(c.pt, c.name) for c in video.codecs] == [(96, "VP8"), (97, "rtx")]
    audio_ids = {e.uri: e.id for e in current.media[0].extmaps}
    for ext in video.extmaps:
        # Known URIs keep their id; a new one takes an id no section uses.
        assert audio_ids.get(ext.uri, ext.id) == ext.id
        assert ext.uri in audio_ids or ext.id not in audio_ids.values()
    sdp.bundle_extmap(offer_)


def test_offer_moves_default_payload_types_out_of_the_way():
    current = answer_to(offer("chromium_offer.sdp"))
    current.media = current.media[:1]
    current.media[0].codecs[0].pt = 96  # audio already uses 96
    offer_, _ = sdp.build_offer(current, add=[TRACK_B_VIDEO])
    vp8, rtx = offer_.media[1].codecs
    assert vp8.pt not in (96,) and rtx.apt == vp8.pt and rtx.pt != vp8.pt
    assert vp8.pt not in range(64, 96) and rtx.pt not in range(64, 96)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add-audio", "add-video", "remove", "stop"]),
            st.integers(0, 20),
        ),
        max_size=12,
    )
)
def test_renegotiation_keeps_ids_unique_and_stable(steps):
    # A re-offer with nothing to change is the first step: the SFU's offers are what we check.
    current, _ = sdp.build_offer(negotiated())
    first_ids = {e.uri: e.id for m in current.media for e in m.extmaps}
    ssrc = 10_000
    seen_mids: dict[str, str] = {m.mid: m.kind for m in current.media}
    own: list[str] = []
    for action, pick in steps:
        if action.startswith("add"):
            kind = action.removeprefix("add-")
            ssrc += 2
            track = OutgoingTrack(
                kind, ssrc, "c", f"s{ssrc}", f"t{ssrc}", ssrc + 1 if kind == "video" else None
            )
            current, [mid] = sdp.build_offer(current, add=[track], reusable=own)
            own = [m for m in own if m != mid]
            # A mid never names a section of another kind.
            assert seen_mids.setdefault(mid, kind) == kind
        else:
            mids = sorted(sdp.outgoing_tracks(current)) + ([] if action == "remove" else own)
            if not mids:
                continue
            mid = mids[pick % len(mids)]
            if action == "remove":
                current, _ = sdp.build_offer(current, remove=[mid])
                own.append(mid)
            else:
                current, _ = sdp.build_offer(current, stop=[mid])
                own = [m for m in own if m != mid]
        ids = sdp.bundle_extmap(current)  # raises if an id names two URIs
        for uri, ext_id in first_ids.items():
            assert ids.get(ext_id, uri) == uri
        assert all(len(v) == 1 for v in ext_ids(current).values())
        assert current.setup == "actpass"
        assert [m.mid for m in current.media[:2]] == ["0", "1"]
        assert sdp.parse(sdp.serialize(current)) == current


# ---------------------------------------------------------------------------------------------------------
# Checking the participant's answer


def test_check_answer_accepts_a_faithful_answer():
    offer_, _ = sdp.build_offer(negotiated(), add=[TRACK_B_VIDEO])
    answer = copy.deepcopy(offer_)
    answer.setup = "active"
    sdp.check_answer(offer_, answer)


@pytest.mark.parametrize(
    "spoil",
    [
        lambda a: setattr(a, "setup", "passive"),
        lambda a: a.media.pop(),
        lambda a: setattr(a.media[2], "mid", "9"),
        lambda a: setattr(a.media[2].extmaps[0], "id", 14),
        lambda a: a.media[2].codecs.append(sdp.Codec(125, "VP9", 90000)),
    ],
)
def test_check_answer_rejects(spoil):
    offer_, _ = sdp.build_offer(negotiated(), add=[TRACK_B_VIDEO])
    answer = copy.deepcopy(offer_)
    answer.setup = "active"
    spoil(answer)
    with pytest.raises(SdpError):
        sdp.check_answer(offer_, answer)


# ---------------------------------------------------------------------------------------------------------
# aiortc accepts what we build (the Chromium side is in test_sdp_chromium.py)


def aiortc_peer() -> RTCPeerConnection:
    # No ICE servers: aiortc's default is a public STUN server, and tests reach nothing off this machine.
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


async def aiortc_offer(data_channel: bool = False) -> tuple[RTCPeerConnection, sdp.SessionDescription]:
    pc = aiortc_peer()
    pc.addTrack(AudioStreamTrack())
    pc.addTrack(VideoStreamTrack())
    if data_channel:
        pc.createDataChannel("chat")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, sdp.parse(pc.localDescription.sdp)


def shape(desc: sdp.SessionDescription) -> list[tuple]:
    return [(m.kind, m.mid, m.direction, [c.name for c in m.codecs], len(m.fingerprints)) for m in desc.media]


async def answer_with_aiortc(pc: RTCPeerConnection, offer_: sdp.SessionDescription) -> sdp.SessionDescription:
    await pc.setRemoteDescription(RTCSessionDescription(sdp.serialize(offer_), "offer"))
    await pc.setLocalDescription(await pc.createAnswer())
    answer = sdp.parse(pc.localDescription.sdp)
    sdp.check_answer(offer_, answer)
    return answer


async def test_aiortc_live_offer_matches_fixture():
    pc, live = await aiortc_offer()
    try:
        assert shape(live) == shape(offer("aiortc_offer.sdp"))
    finally:
        await pc.close()


@pytest.mark.parametrize("data_channel", [False, True])
async def test_aiortc_accepts_our_answer(data_channel):
    pc, offered = await aiortc_offer(data_channel)
    try:
        answer = answer_to(offered)
        if data_channel:
            assert answer.media[2].rejected and answer.media[2].mid == offered.media[2].mid
        await pc.setRemoteDescription(RTCSessionDescription(sdp.serialize(answer), "answer"))
        assert pc.signalingState == "stable"
        assert [t.currentDirection for t in pc.getTransceivers()] == ["sendonly", "sendonly"]
    finally:
        await pc.close()


async def test_aiortc_renegotiation():
    pc, offered = await aiortc_offer()
    received: list[str] = []
    pc.on("track", lambda track: received.append(track.id))
    try:
        current = answer_to(offered)
        await pc.setRemoteDescription(RTCSessionDescription(sdp.serialize(current), "answer"))

        current, mids = sdp.build_offer(current, add=[TRACK_B_AUDIO, TRACK_B_VIDEO])
        answer = await answer_with_aiortc(pc, current)
        assert [m.direction for m in answer.media[2:]] == ["recvonly", "recvonly"]
        assert answer.setup_for(answer.media[2]) == "active"  # the SFU stays DTLS server
        # aiortc names remote tracks by the msid track id (it needs a=msid-semantic to do so).
        assert received == ["audioB", "videoB"]

        # aiortc answers a stopped section with a live port and a=inactive rather than port 0 (which
        # check_answer tolerates).
        current, _ = sdp.build_offer(current, remove=[mids[1]], stop=[mids[0]], remote=answer)
        answer = await answer_with_aiortc(pc, current)
        assert [m.direction for m in answer.media[2:]] == ["inactive", "inactive"]

        track_d = OutgoingTrack("video", 4444, "peer-d", "streamD", "videoD", rtx_ssrc=4445)
        track_e = OutgoingTrack("audio", 5555, "peer-e", "streamE", "audioE")
        current, new_mids = sdp.build_offer(current, add=[track_d, track_e], reusable=[mids[1]])
        assert new_mids == ["3", "4"]
        answer = await answer_with_aiortc(pc, current)
        assert {m.mid: m.direction for m in answer.media}["3"] == "recvonly"

        # aiortc offers again; our answer keeps sending on our sections and stays DTLS server.
        await pc.setLocalDescription(await pc.createOffer())
        reoffer = sdp.parse(pc.localDescription.sdp)
        assert [m.mid for m in reoffer.media] == [m.mid for m in current.media]
        reanswer = answer_to(reoffer, outgoing=sdp.outgoing_tracks(current), session_version=3)
        assert sdp.outgoing_tracks(reanswer) == sdp.outgoing_tracks(current)
        assert reanswer.setup == "passive"
        await pc.setRemoteDescription(RTCSessionDescription(sdp.serialize(reanswer), "answer"))
        assert pc.signalingState == "stable"
    finally:
        await pc.close()
