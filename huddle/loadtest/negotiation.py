"""SDP for synthetic participants, built and read with huddle.rtc.sdp.

- `publish_offer`: what Chromium offers for a microphone and a simulcast camera: audio (Opus) with an SSRC
  line, video (VP8 + RTX) with rids q, h, f and `a=simulcast:send q;h;f` and no SSRC lines, the MID, RID,
  repaired-RID, abs-send-time, audio level and transport-cc extensions under Chromium's ids, and
  `a=setup:actpass`. Either kind may be left out, and the camera offered without simulcast (one SSRC line,
  no rids), as a browser without simulcast offers it.
- `read_publish_answer`: the server's transport (ICE credentials, fingerprint, UDP candidate), and per kind
  the mid, payload type, agreed extension ids and accepted rids.
- `subscribe_answer`: the answer to the server's subscribe offer: every m-section mirrored in order,
  `recvonly` for the ones the server sends on, `a=setup:active` (the SFU stays the DTLS server), and which
  SSRC carries whose track (the stream id of `a=msid` names the publishing participant).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from huddle.loadtest.sender import ExtensionIds
from huddle.rtc import sdp

__all__ = [
    "AUDIO_PT",
    "RTX_PT",
    "VP8_PT",
    "OfferedTrack",
    "PublishAnswer",
    "ServerTransport",
    "publish_offer",
    "read_publish_answer",
    "server_transport",
    "subscribe_answer",
]

AUDIO_PT = 111
VP8_PT = 96
RTX_PT = 97
# Chromium's header extension ids.
AUDIO_EXTENSIONS = (
    sdp.Extmap(1, sdp.URI_AUDIO_LEVEL),
    sdp.Extmap(2, sdp.URI_ABS_SEND_TIME),
    sdp.Extmap(3, sdp.URI_TRANSPORT_CC),
    sdp.Extmap(4, sdp.URI_MID),
)
VIDEO_EXTENSIONS = (
    sdp.Extmap(2, sdp.URI_ABS_SEND_TIME),
    sdp.Extmap(3, sdp.URI_TRANSPORT_CC),
    sdp.Extmap(4, sdp.URI_MID),
    sdp.Extmap(10, sdp.URI_RID),
    sdp.Extmap(11, sdp.URI_REPAIRED_RID),
)
AUDIO_MID = "0"
VIDEO_MID = "1"


@dataclass(frozen=True)
class ServerTransport:
    ufrag: str
    pwd: str
    fingerprint: str
    address: tuple[str, int]


def server_transport(desc: sdp.SessionDescription) -> ServerTransport:
    """ICE credentials, sha-256 fingerprint and UDP host candidate of the server's description."""
    media = next((m for m in desc.media if not m.rejected), None)
    if media is None:
        raise sdp.SdpError("no accepted m-section")
    ufrag, pwd = desc.ice_credentials(media)
    fingerprint = next(
        (f.value for f in desc.fingerprints_for(media) if f.algorithm.lower() == "sha-256"), None
    )
    candidate = next(
        (c for m in desc.media for c in m.candidates if c.transport.lower() == "udp" and c.component == 1),
        None,
    )
    if not ufrag or not pwd or fingerprint is None or candidate is None:
        raise sdp.SdpError("no ICE credentials, sha-256 fingerprint or UDP candidate")
    return ServerTransport(ufrag, pwd, fingerprint, (candidate.address, candidate.port))


def _common(media: sdp.MediaDescription, ufrag: str, pwd: str, fingerprint: str, setup: str) -> None:
    media.ice_ufrag = ufrag
    media.ice_pwd = pwd
    media.ice_options = ["trickle"]
    media.fingerprints = [sdp.Fingerprint("sha-256", fingerprint)]
    media.setup = setup
    media.rtcp_mux = True
    media.rtcp_rsize = True


def publish_offer(
    *,
    ufrag: str,
    pwd: str,
    fingerprint: str,
    host: tuple[str, int],
    session_id: int,
    stream_id: str,
    audio_ssrc: int,
    audio: bool = True,
    video: bool = True,
    rids: tuple[str, ...] = ("q", "h", "f"),
    video_ssrc: int | None = None,
) -> str:
    """`video_ssrc`: offer the camera without simulcast, as one stream named by an SSRC line (as a browser
    without simulcast does: Firefox, aiortc); `rids` are then not offered."""
    desc = sdp.SessionDescription(
        origin=sdp.Origin("-", session_id, 2, "IN", "IP4", "127.0.0.1"),
        attributes=[sdp.Attribute("msid-semantic", f"WMS {stream_id}")],
    )
    candidate = sdp.Candidate.host(host[0], host[1])
    connection = f"IN {'IP6' if ':' in host[0] else 'IP4'} {host[0]}"
    if audio:
        media = sdp.MediaDescription(
            "audio",
            host[1],
            "UDP/TLS/RTP/SAVPF",
            codecs=[
                sdp.Codec(
                    AUDIO_PT, "opus", 48000, 2, {"minptime": "10", "useinbandfec": "1"}, ["transport-cc"]
                )
            ],
            connection=connection,
            mid=AUDIO_MID,
            direction="sendonly",
            extmaps=list(AUDIO_EXTENSIONS),
            msids=[sdp.Msid(stream_id, f"{stream_id}-audio")],
            ssrcs=[sdp.Ssrc(audio_ssrc, {"cname": stream_id, "msid": f"{stream_id} {stream_id}-audio"})],
            candidates=[candidate],
        )
        _common(media, ufrag, pwd, fingerprint, "actpass")
        desc.media.append(media)
    if video:
        media = sdp.MediaDescription(
            "video",
            host[1],
            "UDP/TLS/RTP/SAVPF",
            codecs=[
                sdp.Codec(
                    VP8_PT,
                    "VP8",
                    90000,
                    None,
                    {},
                    ["goog-remb", "transport-cc", "ccm fir", "nack", "nack pli"],
                ),
                sdp.Codec(RTX_PT, "rtx", 90000, None, {"apt": str(VP8_PT)}),
            ],
            connection=connection,
            mid=VIDEO_MID,
            direction="sendonly",
            extmaps=list(VIDEO_EXTENSIONS),
            msids=[sdp.Msid(stream_id, f"{stream_id}-video")],
            candidates=[candidate],
        )
        if video_ssrc is None:
            media.rids = [sdp.Rid(rid, "send") for rid in rids]
            media.simulcast = sdp.Simulcast(send=[[sdp.RidChoice(rid)] for rid in rids])
        else:
            media.ssrcs = [
                sdp.Ssrc(video_ssrc, {"cname": stream_id, "msid": f"{stream_id} {stream_id}-video"})
            ]
        _common(media, ufrag, pwd, fingerprint, "actpass")
        desc.media.append(media)
    desc.groups = [sdp.Group("BUNDLE", [m.mid for m in desc.media if m.mid is not None])]
    return sdp.serialize(desc)


@dataclass
class AnsweredKind:
    mid: str
    pt: int
    ids: ExtensionIds
    rids: list[str] = field(default_factory=list)  # video: the rids the server receives, in offer order


@dataclass
class PublishAnswer:
    transport: ServerTransport
    audio: AnsweredKind | None
    video: AnsweredKind | None


def read_publish_answer(text: str) -> PublishAnswer:
    desc = sdp.parse(text)
    transport = server_transport(desc)
    extmap = {uri: ext_id for ext_id, uri in sdp.bundle_extmap(desc).items()}
    ids = ExtensionIds(
        mid=extmap.get(sdp.URI_MID),
        rid=extmap.get(sdp.URI_RID),
        abs_send_time=extmap.get(sdp.URI_ABS_SEND_TIME),
        transport_cc=extmap.get(sdp.URI_TRANSPORT_CC),
        audio_level=extmap.get(sdp.URI_AUDIO_LEVEL),
    )
    kinds: dict[str, AnsweredKind] = {}
    for media in desc.media:
        if media.rejected or media.mid is None or desc.direction_for(media) not in ("recvonly", "sendrecv"):
            continue
        codec = next((c for c in media.codecs if not c.is_rtx), None)
        if codec is None:
            continue
        rids = [r.id for r in media.rids if r.direction == "recv"]
        kinds[media.kind] = AnsweredKind(media.mid, codec.pt, ids, rids)
    return PublishAnswer(transport, kinds.get("audio"), kinds.get("video"))


@dataclass(frozen=True)
class OfferedTrack:
    mid: str
    kind: str
    ssrc: int
    publisher: str  # the stream id of a=msid: the publishing participant's id


def subscribe_answer(
    offer_text: str, *, ufrag: str, pwd: str, fingerprint: str, session_id: int
) -> tuple[str, ServerTransport, list[OfferedTrack]]:
    """Answer the server's subscribe offer: (the answer, the server's transport, the tracks it sends)."""
    offer = sdp.parse(offer_text)
    transport = server_transport(offer)
    answer = sdp.SessionDescription(
        origin=sdp.Origin("-", session_id, offer.origin.session_version, "IN", "IP4", "127.0.0.1"),
        attributes=[sdp.Attribute("msid-semantic", "WMS")],
    )
    tracks: list[OfferedTrack] = []
    accepted: list[str] = []
    for offered in offer.media:
        direction = offer.direction_for(offered)
        rejected = offered.rejected
        codecs = [copy.deepcopy(c) for c in offered.codecs]
        media = sdp.MediaDescription(
            offered.kind,
            0 if rejected else 9,
            offered.protocol,
            codecs=codecs[:1] if rejected else codecs,
            connection="IN IP4 0.0.0.0",
            mid=offered.mid,
            direction={"sendonly": "recvonly", "sendrecv": "recvonly"}.get(direction, "inactive"),
        )
        if not rejected:
            _common(media, ufrag, pwd, fingerprint, "active")
            media.extmaps = [sdp.Extmap(e.id, e.uri) for e in [*offer.extmaps, *offered.extmaps]]
            if offered.mid is not None:
                accepted.append(offered.mid)
        else:
            media.rtcp_mux = True
        answer.media.append(media)
        if rejected or direction not in ("sendonly", "sendrecv") or offered.mid is None:
            continue
        publisher = offered.msids[0].stream_id if offered.msids else "?"
        fid = next((g.ssrcs for g in offered.ssrc_groups if g.semantics == "FID"), None)
        ssrc = fid[0] if fid else (offered.ssrcs[0].ssrc if offered.ssrcs else None)
        if ssrc is not None:
            tracks.append(OfferedTrack(offered.mid, offered.kind, ssrc, publisher))
    if accepted:
        answer.groups = [sdp.Group("BUNDLE", accepted)]
    return sdp.serialize(answer), transport, tracks
