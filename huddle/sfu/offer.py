"""The SFU's offers for a subscriber's `subscribe` connection, built afresh from its state each time.

Payload types and header extension ids are the SFU's own and never change, for every subscriber alike: that
keeps them stable across renegotiation (Chromium requires it) and lets a Producer rewrite each packet once
for all its Consumers. An m-section whose Consumer has gone stays, inactive, and is reused by the next track
of its kind, so the SDP does not grow with churn.

What one publisher may offer is bounded here too (`check_publish_offer`), and those bounds bound every
subscriber's offer: at most (room capacity - 1) x MAX_TRACKS sections, since idle sections are reused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from huddle.rtc import sdp

OPUS_PT = 111
VP8_PT = 96
# Subscriber-side header extension ids (one-byte form: 1-14).
AUDIO_LEVEL_ID = 1
# Our own send time on every forwarded packet: from it the subscriber's browser estimates its downlink and
# reports the estimate back in REMB, which drives layer choice (huddle.sfu.allocation).
ABS_SEND_TIME_ID = 2

CODECS = {
    "audio": [sdp.Codec(OPUS_PT, "opus", 48000, 2, {"minptime": "10", "useinbandfec": "1"}, [])],
    "video": [sdp.Codec(VP8_PT, "VP8", 90000, None, {}, ["goog-remb", "nack", "nack pli", "ccm fir"])],
}
EXTENSIONS = {
    "audio": [
        sdp.Extmap(AUDIO_LEVEL_ID, sdp.URI_AUDIO_LEVEL),
        sdp.Extmap(ABS_SEND_TIME_ID, sdp.URI_ABS_SEND_TIME),
    ],
    "video": [sdp.Extmap(ABS_SEND_TIME_ID, sdp.URI_ABS_SEND_TIME)],
}
# Codec name (lower case) → the subscribers' payload type, to map what publishers negotiated.
SUBSCRIBER_PT = {"opus": OPUS_PT, "vp8": VP8_PT}
# Header extension URI → the subscribers' id; every other extension is renamed to an unused id.
SUBSCRIBER_EXT = {sdp.URI_AUDIO_LEVEL: AUDIO_LEVEL_ID, sdp.URI_ABS_SEND_TIME: ABS_SEND_TIME_ID}


# Limits on a publish offer, checked before anything is built from it. A client publishes a microphone
# and a camera, and may add a screen share with its audio: two sending sections of each kind. Sections
# that send nothing (stopped, inactive, a data channel) cost no producer, but still cost parsing.
MAX_PUBLISH_SECTIONS = 16
MAX_TRACKS = {"audio": 2, "video": 2}
MAX_RIDS = 3  # simulcast layers of one video section (our client sends q, h, f)
MAX_EXTENSIONS = 32  # header extensions one section may offer (Chromium offers 13)
MAX_CODECS = 64  # payload types on one m= line (Chromium offers 23 for video)


def check_publish_offer(desc: sdp.SessionDescription) -> None:
    """Raise SdpLimitError naming the first limit a (parsed) publish offer is over."""
    sending = dict.fromkeys(MAX_TRACKS, 0)
    for media in desc.media:
        if len(media.codecs) > MAX_CODECS:
            raise sdp.SdpLimitError(
                f"m-section {media.mid} offers {len(media.codecs)} payload types; at most {MAX_CODECS} "
                "are allowed"
            )
        extensions = len(desc.extmaps) + len(media.extmaps)
        if extensions > MAX_EXTENSIONS:
            raise sdp.SdpLimitError(
                f"m-section {media.mid} offers {extensions} header extensions; at most {MAX_EXTENSIONS} "
                "are allowed"
            )
        if len(media.rids) > MAX_RIDS:
            raise sdp.SdpLimitError(
                f"m-section {media.mid} offers {len(media.rids)} simulcast rids; at most {MAX_RIDS} "
                "are allowed"
            )
        if (
            media.kind in sending
            and not media.rejected
            and desc.direction_for(media) in ("sendonly", "sendrecv")
        ):
            sending[media.kind] += 1
    for kind, count in sending.items():
        if count > MAX_TRACKS[kind]:
            raise sdp.SdpLimitError(
                f"publish offer has {count} {kind} m-sections sending; at most {MAX_TRACKS[kind]} are allowed"
            )


# What a published track carries (Producer.track_source), and the kind of m-section that carries it. A
# publish offer's `sources` names the screen share's sections; every other one is the camera or microphone.
SOURCE_KINDS = {"microphone": "audio", "camera": "video", "screen": "video", "screen_audio": "audio"}
SCREEN_SOURCES = ("screen", "screen_audio")


def check_sources(desc: sdp.SessionDescription, sources: Mapping[str, str]) -> None:
    """Raise SdpError unless every mid `sources` names (mid → "screen" | "screen_audio") is a sending
    m-section of this publish offer, of the source's kind, and each source is named once."""
    if len(set(sources.values())) != len(sources):
        raise sdp.SdpError("sources: at most one 'screen' and one 'screen_audio' section")
    for mid, source in sources.items():
        if source not in SCREEN_SOURCES:
            raise sdp.SdpError(f"sources: {source!r} is not 'screen' or 'screen_audio'")
        media = desc.media_by_mid(mid)
        if media is None or media.rejected or desc.direction_for(media) not in ("sendonly", "sendrecv"):
            raise sdp.SdpError(f"sources: mid {mid!r} is not a sending m-section of this offer")
        kind = SOURCE_KINDS[source]
        if media.kind != kind:
            raise sdp.SdpError(f"sources: mid {mid!r} is {media.kind}, and {source} must be {kind}")


@dataclass
class Section:
    """One m-section of a subscribe connection: a track (ssrc, stream id = the publisher's participant id, or
    `<participant id>~screen` for its screen share) or, when `ssrc` is None, an idle section waiting to be
    reused."""

    mid: str
    kind: str
    ssrc: int | None = None
    stream_id: str = ""
    track_id: str = ""


def build_subscribe_offer(
    sections: list[Section],
    *,
    ice_ufrag: str,
    ice_pwd: str,
    fingerprint: str,
    candidates: list[sdp.Candidate],
    session_id: int,
    version: int,
) -> str:
    port = next((c.port for c in candidates if c.transport == "udp"), 9)
    address = next((c.address for c in candidates if c.transport == "udp"), "0.0.0.0")
    connection = f"IN {'IP6' if ':' in address else 'IP4'} {address}"
    desc = sdp.SessionDescription(
        origin=sdp.Origin("-", session_id, version, "IN", "IP4", "0.0.0.0"),
        ice_lite=True,
        groups=[sdp.Group("BUNDLE", [s.mid for s in sections])],
        attributes=[sdp.Attribute("msid-semantic", "WMS *")],
    )
    for s in sections:
        media = sdp.MediaDescription(
            s.kind,
            port,
            "UDP/TLS/RTP/SAVPF",
            codecs=[
                sdp.Codec(c.pt, c.name, c.clock_rate, c.channels, dict(c.fmtp), list(c.rtcp_fb))
                for c in CODECS[s.kind]
            ],
            connection=connection,
            mid=s.mid,
            direction="sendonly" if s.ssrc is not None else "inactive",
            # Transport attributes in every section, as browsers write them: aiortc mishandles a bundle
            # of several same-kind sections that inherit them from session level.
            ice_ufrag=ice_ufrag,
            ice_pwd=ice_pwd,
            fingerprints=[sdp.Fingerprint("sha-256", fingerprint)],
            # JSEP requires actpass in an offer; browsers answer active, keeping the SFU the DTLS server.
            setup="actpass",
            rtcp_mux=True,
            rtcp_rsize=True,
            extmaps=list(EXTENSIONS[s.kind]),
            candidates=list(candidates),
            end_of_candidates=True,
        )
        if s.ssrc is not None:
            media.msids = [sdp.Msid(s.stream_id, s.track_id)]
            media.ssrcs = [sdp.Ssrc(s.ssrc, {"cname": s.stream_id, "msid": f"{s.stream_id} {s.track_id}"})]
        desc.media.append(media)
    return sdp.serialize(desc)
