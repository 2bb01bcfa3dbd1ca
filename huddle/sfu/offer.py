"""The SFU's offers for a subscriber's `subscribe` connection, built afresh from its state each time.

Payload types and header extension ids are the SFU's own and never change, for every subscriber alike: that
keeps them stable across renegotiation (Chromium requires it) and lets a Producer rewrite each packet once
for all its Consumers. An m-section whose Consumer has gone stays, inactive, and is reused by the next track
of its kind, so the SDP does not grow with churn.
"""

from __future__ import annotations

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


@dataclass
class Section:
    """One m-section of a subscribe connection: a track (ssrc, stream id = the publisher's participant id)
    or, when `ssrc` is None, an idle section waiting to be reused."""

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
