"""SDP (RFC 8866) as WebRTC uses it (JSEP, RFC 8829): parser, serialiser, and the SFU's offers and answers.

Everything here is pure: text in, dataclasses out, and back. `parse` is strict about the structure of the
lines it understands (a browser would refuse them too) and keeps every attribute it does not understand,
so `parse(serialize(x)) == x` for anything `parse` returned. `parse` raises `SdpError` and nothing else.

The SFU is ICE-lite on one UDP port (plus passive TCP), always the DTLS server, and bundles every m-section
of a participant onto one transport with RTCP multiplexed. Two flows share one RTCPeerConnection:

- the browser offers its own audio/video (video as rid-based simulcast) and `build_answer` answers it;
- the SFU offers other participants' tracks as sendonly m-sections with `build_offer`, the browser answers,
  and `check_answer` verifies the answer kept what must not change (mids, extension ids, DTLS role).
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace

__all__ = [
    "DEFAULT_CODECS",
    "DEFAULT_EXTENSIONS",
    "DIRECTIONS",
    "H264",
    "MAX_LINES",
    "MAX_MEDIA",
    "MAX_SECTION_LINES",
    "MAX_SIMULCAST_RIDS",
    "OPUS",
    "SUPPORTED_RTCP_FB",
    "URI_ABS_SEND_TIME",
    "URI_AUDIO_LEVEL",
    "URI_MID",
    "URI_REPAIRED_RID",
    "URI_RID",
    "URI_TRANSPORT_CC",
    "VP8",
    "Attribute",
    "Candidate",
    "Codec",
    "CodecSpec",
    "Extmap",
    "Fingerprint",
    "Group",
    "MediaDescription",
    "Msid",
    "Origin",
    "OutgoingTrack",
    "Rid",
    "RidChoice",
    "SdpError",
    "SdpLimitError",
    "SessionDescription",
    "Simulcast",
    "Ssrc",
    "SsrcGroup",
    "build_answer",
    "build_offer",
    "bundle_extmap",
    "candidate_priority",
    "check_answer",
    "choose_codecs",
    "outgoing_tracks",
    "parse",
    "parse_candidate",
    "serialize",
]


class SdpError(ValueError):
    """An SDP text or description that cannot be used; the only exception `parse` raises."""


class SdpLimitError(SdpError):
    """An SDP over one of the bounds that keep handling it cheap; the message names the bound."""


# What `parse` reads at most. Every lookup while parsing is by dict, so each line costs a constant, and
# these bound the lines: a real offer has a few dozen lines per m-section (Chromium's video section: 125,
# with 23 payload types and 13 extensions), and the largest description the SFU parses is a subscribe
# answer of a few hundred short sections.
MAX_LINES = 16_384
MAX_MEDIA = 512
MAX_SECTION_LINES = 256  # at session level, and in each m-section after its m= line
MAX_SIMULCAST_RIDS = 16  # in one a=simulcast line: browsers send 3 or 4, each costs an object


URI_MID = "urn:ietf:params:rtp-hdrext:sdes:mid"
URI_RID = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"
URI_REPAIRED_RID = "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id"
URI_ABS_SEND_TIME = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
URI_AUDIO_LEVEL = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"
URI_TRANSPORT_CC = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"

# What the SFU reads or rewrites: MID/RID/repaired-RID map rid-based simulcast SSRCs to layers, audio level
# drives the active speaker, abs-send-time and transport-cc feed bandwidth estimation.
DEFAULT_EXTENSIONS: tuple[str, ...] = (
    URI_MID,
    URI_RID,
    URI_REPAIRED_RID,
    URI_ABS_SEND_TIME,
    URI_AUDIO_LEVEL,
    URI_TRANSPORT_CC,
)

DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
SUPPORTED_RTCP_FB = frozenset({"nack", "nack pli", "ccm fir", "goog-remb", "transport-cc"})

_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")
# A field with no blank or control character: protocols (UDP/TLS/RTP/SAVPF), fingerprints, ICE passwords.
_WORD = re.compile(r"[^\x00-\x20\x7f]+")
_DIGITS = re.compile(r"[0-9]+")
_RID_ID = re.compile(r"[A-Za-z0-9_-]+")
_FINGERPRINT_HEX = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2})+")
_REVERSE = {"sendrecv": "sendrecv", "sendonly": "recvonly", "recvonly": "sendonly", "inactive": "inactive"}


# ---------------------------------------------------------------------------------------------------------
# The model


@dataclass
class Attribute:
    """An `a=` line this module does not interpret, kept verbatim (`value` is None for a flag)."""

    name: str
    value: str | None = None


@dataclass
class Origin:
    username: str = "-"
    session_id: int = 0
    session_version: int = 0
    nettype: str = "IN"
    addrtype: str = "IP4"
    address: str = "127.0.0.1"


@dataclass
class Fingerprint:
    algorithm: str
    value: str


@dataclass
class Extmap:
    """`a=extmap:<id>[/<direction>] <uri> [<attributes>]` (RFC 8285)."""

    id: int
    uri: str
    direction: str | None = None
    attributes: str | None = None


@dataclass
class Codec:
    """One payload type of an RTP m-section with its `rtpmap`, `fmtp` and `rtcp-fb` lines.

    `name` is empty when the payload type has no `a=rtpmap` (a static type such as 0 for PCMU).
    """

    pt: int
    name: str = ""
    clock_rate: int = 0
    channels: int | None = None
    fmtp: dict[str, str | None] = field(default_factory=dict)
    rtcp_fb: list[str] = field(default_factory=list)

    @property
    def is_rtx(self) -> bool:
        return self.name.lower() == "rtx"

    @property
    def apt(self) -> int | None:
        """The payload type an RTX codec repairs."""
        value = self.fmtp.get("apt")
        return int(value) if value is not None and _DIGITS.fullmatch(value) else None


@dataclass
class Msid:
    stream_id: str
    track_id: str | None = None


@dataclass
class Ssrc:
    """The `a=ssrc:<ssrc> <attribute>[:<value>]` lines of one SSRC (RFC 5576)."""

    ssrc: int
    attributes: dict[str, str | None] = field(default_factory=dict)

    @property
    def cname(self) -> str | None:
        return self.attributes.get("cname")

    @property
    def msid(self) -> str | None:
        return self.attributes.get("msid")


@dataclass
class SsrcGroup:
    semantics: str
    ssrcs: list[int]


@dataclass
class Rid:
    """`a=rid:<id> <send|recv> [pt=<pt>,...;<restriction>=<value>;...]` (RFC 8851)."""

    id: str
    direction: str
    payload_types: list[int] = field(default_factory=list)
    restrictions: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class RidChoice:
    rid: str
    paused: bool = False


@dataclass
class Simulcast:
    """`a=simulcast` (RFC 8853): per direction a list of streams, each a list of alternative rids."""

    send: list[list[RidChoice]] = field(default_factory=list)
    recv: list[list[RidChoice]] = field(default_factory=list)


@dataclass
class Group:
    semantics: str
    mids: list[str]


@dataclass
class Candidate:
    """An ICE candidate (RFC 8839 §5.1), as in `a=candidate:` lines and the JS API's `candidate` string."""

    foundation: str
    component: int
    transport: str
    priority: int
    address: str
    port: int
    type: str
    raddr: str | None = None
    rport: int | None = None
    tcptype: str | None = None
    generation: int | None = None
    ufrag: str | None = None
    extensions: dict[str, str] = field(default_factory=dict)

    def to_sdp(self) -> str:
        """The `candidate:...` string, as the JS API's `RTCIceCandidate.candidate` carries it."""
        parts = [
            f"candidate:{self.foundation}",
            str(self.component),
            self.transport,
            str(self.priority),
            self.address,
            str(self.port),
            "typ",
            self.type,
        ]
        if self.raddr is not None:
            parts += ["raddr", self.raddr]
        if self.rport is not None:
            parts += ["rport", str(self.rport)]
        if self.tcptype is not None:
            parts += ["tcptype", self.tcptype]
        if self.generation is not None:
            parts += ["generation", str(self.generation)]
        if self.ufrag is not None:
            parts += ["ufrag", self.ufrag]
        for key, value in self.extensions.items():
            parts += [key, value]
        return " ".join(parts)

    @classmethod
    def host(
        cls,
        address: str,
        port: int,
        *,
        transport: str = "udp",
        component: int = 1,
        local_preference: int = 65535,
    ) -> Candidate:
        """A host candidate of the SFU: UDP, or TCP with `tcptype passive` (we only ever accept connections).

        RFC 6544 §4.2 builds a TCP candidate's local preference from its direction (passive = 4), which
        keeps it below any UDP candidate, so browsers try UDP first and fall back to TCP.
        """
        transport = transport.lower()
        tcptype = None
        if transport == "tcp":
            tcptype = "passive"
            local_preference = min(local_preference, (4 << 13) | 0x1FFF)
        foundation = hashlib.sha256(f"host {address} {transport}".encode()).hexdigest()[:8]
        return cls(
            foundation=str(int(foundation, 16)),
            component=component,
            transport=transport,
            priority=candidate_priority(126, local_preference, component),
            address=address,
            port=port,
            type="host",
            tcptype=tcptype,
        )


def candidate_priority(type_preference: int, local_preference: int, component: int = 1) -> int:
    """RFC 8445 §5.1.2.1: 2^24 * type preference + 2^8 * local preference + (256 - component)."""
    return (type_preference << 24) | (local_preference << 8) | (256 - component)


@dataclass
class MediaDescription:
    """One m-section. For an RTP protocol `codecs` lists the m= line's payload types in order; for any other
    protocol (`UDP/DTLS/SCTP` for data channels) `formats` holds the m= line's format tokens instead."""

    kind: str
    port: int
    protocol: str
    codecs: list[Codec] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)
    port_count: int | None = None
    info: str | None = None
    connection: str | None = None
    bandwidths: list[str] = field(default_factory=list)
    mid: str | None = None
    direction: str | None = None
    ice_ufrag: str | None = None
    ice_pwd: str | None = None
    ice_options: list[str] | None = None
    fingerprints: list[Fingerprint] = field(default_factory=list)
    setup: str | None = None
    rtcp_mux: bool = False
    rtcp_rsize: bool = False
    bundle_only: bool = False
    extmap_allow_mixed: bool = False
    extmaps: list[Extmap] = field(default_factory=list)
    rtcp_fb_all: list[str] = field(default_factory=list)
    msids: list[Msid] = field(default_factory=list)
    ssrc_groups: list[SsrcGroup] = field(default_factory=list)
    ssrcs: list[Ssrc] = field(default_factory=list)
    rids: list[Rid] = field(default_factory=list)
    simulcast: Simulcast | None = None
    candidates: list[Candidate] = field(default_factory=list)
    end_of_candidates: bool = False
    attributes: list[Attribute] = field(default_factory=list)
    extra_lines: list[str] = field(default_factory=list)

    @property
    def is_rtp(self) -> bool:
        return _is_rtp(self.protocol)

    @property
    def rejected(self) -> bool:
        # A zero port with a=bundle-only means "bundle me", not "rejected" (RFC 8843 §6).
        return self.port == 0 and not self.bundle_only

    def codec(self, pt: int) -> Codec | None:
        return next((c for c in self.codecs if c.pt == pt), None)

    def extension_id(self, uri: str) -> int | None:
        return next((e.id for e in self.extmaps if e.uri == uri), None)

    def ssrc(self, ssrc: int) -> Ssrc | None:
        return next((s for s in self.ssrcs if s.ssrc == ssrc), None)


@dataclass
class SessionDescription:
    origin: Origin = field(default_factory=Origin)
    name: str = "-"
    version: int = 0
    info: str | None = None
    connection: str | None = None
    bandwidths: list[str] = field(default_factory=list)
    timing: str = "0 0"
    ice_lite: bool = False
    ice_ufrag: str | None = None
    ice_pwd: str | None = None
    ice_options: list[str] | None = None
    fingerprints: list[Fingerprint] = field(default_factory=list)
    setup: str | None = None
    groups: list[Group] = field(default_factory=list)
    extmap_allow_mixed: bool = False
    extmaps: list[Extmap] = field(default_factory=list)
    direction: str | None = None
    end_of_candidates: bool = False
    attributes: list[Attribute] = field(default_factory=list)
    # Lines of types u, e, p (before c=) and r, z, k or further t= (after the first t=), in order.
    extra_lines: list[str] = field(default_factory=list)
    media: list[MediaDescription] = field(default_factory=list)

    @property
    def bundle(self) -> list[str]:
        """The mids of the first BUNDLE group (its first mid is the BUNDLE tag), or none."""
        return next((list(g.mids) for g in self.groups if g.semantics == "BUNDLE"), [])

    def media_by_mid(self, mid: str) -> MediaDescription | None:
        return next((m for m in self.media if m.mid == mid), None)

    # Transport attributes may sit at session level and apply to every m-section that has none of its own.
    def ice_credentials(self, media: MediaDescription) -> tuple[str | None, str | None]:
        return (media.ice_ufrag or self.ice_ufrag, media.ice_pwd or self.ice_pwd)

    def fingerprints_for(self, media: MediaDescription) -> list[Fingerprint]:
        return media.fingerprints or self.fingerprints

    def setup_for(self, media: MediaDescription) -> str | None:
        return media.setup or self.setup

    def direction_for(self, media: MediaDescription) -> str:
        return media.direction or self.direction or "sendrecv"


def _is_rtp(protocol: str) -> bool:
    return "RTP" in protocol.upper().split("/")


# ---------------------------------------------------------------------------------------------------------
# Parsing


def _int(text: str, what: str, maximum: int) -> int:
    # str.isdigit and int() both accept non-ASCII digits; SDP numbers are ASCII only.
    if not _DIGITS.fullmatch(text) or len(text) > 20 or int(text) > maximum:
        raise SdpError(f"bad {what}: {text!r}")
    return int(text)


def _token(text: str, what: str) -> str:
    if not _TOKEN.fullmatch(text):
        raise SdpError(f"bad {what}: {text!r}")
    return text


def _word(text: str, what: str) -> str:
    if not _WORD.fullmatch(text):
        raise SdpError(f"bad {what}: {text!r}")
    return text


def _need(value: str | None, name: str) -> str:
    if value is None or value.strip() == "":
        raise SdpError(f"a={name} needs a value")
    return value.strip()


def _flag(value: str | None, name: str) -> bool:
    if value is not None:
        raise SdpError(f"a={name} takes no value")
    return True


def _parse_fmtp_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        params[key.strip()] = value.strip() if sep else None
    return params


def _format_params(params: Mapping[str, str | None]) -> str:
    return ";".join(key if value is None else f"{key}={value}" for key, value in params.items())


def _parse_fingerprint(value: str | None) -> Fingerprint:
    parts = _need(value, "fingerprint").split()
    if len(parts) != 2:
        raise SdpError(f"bad a=fingerprint: {value!r}")
    return Fingerprint(_word(parts[0], "fingerprint algorithm"), _word(parts[1], "fingerprint"))


def _parse_extmap(value: str | None) -> Extmap:
    parts = _need(value, "extmap").split(None, 2)
    if len(parts) < 2:
        raise SdpError(f"bad a=extmap: {value!r}")
    ident, _, direction = parts[0].partition("/")
    if direction and direction not in DIRECTIONS:
        raise SdpError(f"bad a=extmap direction: {value!r}")
    # One-byte headers carry ids 1-14, two-byte ones 1-255 (RFC 8285 §4); 0 and 15 are reserved.
    ext_id = _int(ident, "extmap id", 255)
    if ext_id == 0:
        raise SdpError("extmap id 0 is reserved")
    attributes = parts[2].strip() if len(parts) > 2 else None
    return Extmap(ext_id, parts[1], direction or None, attributes or None)


def _parse_ice_options(value: str | None) -> list[str]:
    return _need(value, "ice-options").split()


def _parse_rid(value: str | None) -> Rid:
    parts = _need(value, "rid").split(None, 2)
    if len(parts) < 2 or not _RID_ID.fullmatch(parts[0]) or parts[1] not in ("send", "recv"):
        raise SdpError(f"bad a=rid: {value!r}")
    rid = Rid(parts[0], parts[1])
    if len(parts) == 3:
        for key, param in _parse_fmtp_params(parts[2]).items():
            if key == "pt":
                if param is None:
                    raise SdpError(f"bad a=rid pt list: {value!r}")
                rid.payload_types = [_int(pt.strip(), "rid payload type", 127) for pt in param.split(",")]
            else:
                rid.restrictions[_token(key, "rid restriction")] = param
    return rid


def _parse_sc_list(text: str) -> list[list[RidChoice]]:
    if text.count(",") + text.count(";") >= MAX_SIMULCAST_RIDS:
        raise SdpLimitError(
            f"a=simulcast lists over {MAX_SIMULCAST_RIDS} rids; at most {MAX_SIMULCAST_RIDS} are allowed"
        )
    streams = []
    for stream in text.split(";"):
        choices = []
        for alternative in stream.split(","):
            paused = alternative.startswith("~")
            rid = alternative[1:] if paused else alternative
            if not _RID_ID.fullmatch(rid):
                raise SdpError(f"bad rid in a=simulcast: {alternative!r}")
            choices.append(RidChoice(rid, paused))
        streams.append(choices)
    return streams


def _parse_simulcast(value: str | None) -> Simulcast:
    parts = _need(value, "simulcast").split()
    if len(parts) not in (2, 4):
        raise SdpError(f"bad a=simulcast: {value!r}")
    simulcast = Simulcast()
    seen = set()
    for direction, lists in zip(parts[::2], parts[1::2], strict=True):
        if direction not in ("send", "recv") or direction in seen:
            raise SdpError(f"bad a=simulcast: {value!r}")
        seen.add(direction)
        setattr(simulcast, direction, _parse_sc_list(lists))
    return simulcast


def parse_candidate(text: str) -> Candidate:
    """Parse `candidate:...` (as trickled by the JS API) or `a=candidate:...`; raises SdpError."""
    body = text.strip()
    if body.startswith("a="):
        body = body[2:]
    if body.startswith("candidate:"):
        body = body[len("candidate:") :]
    parts = body.split()
    if len(parts) < 8 or parts[6] != "typ" or len(parts) % 2:
        raise SdpError(f"bad candidate: {text!r}")
    candidate = Candidate(
        foundation=_word(parts[0], "candidate foundation"),
        component=_int(parts[1], "candidate component", 256),
        transport=_word(parts[2], "candidate transport"),
        priority=_int(parts[3], "candidate priority", 2**32 - 1),
        address=_word(parts[4], "candidate address"),
        port=_int(parts[5], "candidate port", 65535),
        type=_word(parts[7], "candidate type"),
    )
    seen: set[str] = set()
    for key, value in zip(parts[8::2], parts[9::2], strict=True):
        if key in seen or key == "typ":
            raise SdpError(f"candidate extension {key!r} repeated")
        seen.add(key)
        if key == "raddr":
            candidate.raddr = _word(value, "raddr")
        elif key == "rport":
            candidate.rport = _int(value, "rport", 65535)
        elif key == "tcptype":
            candidate.tcptype = _word(value, "tcptype")
        elif key == "generation":
            candidate.generation = _int(value, "generation", 2**32 - 1)
        elif key == "ufrag":
            candidate.ufrag = _word(value, "ufrag")
        else:
            candidate.extensions[_word(key, "candidate extension")] = value
    return candidate


class _Once:
    """Per-level parsing state: rejects a second copy of an attribute that may appear once per level, counts
    the level's lines, and indexes what later lines refer to, so each line is parsed in constant time."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.lines = 0
        self.codecs: dict[int, Codec] = {}
        self.ssrcs: dict[int, Ssrc] = {}
        self.rids: set[str] = set()

    def __call__(self, name: str) -> None:
        if name in self.seen:
            raise SdpError(f"a={name} appears twice")
        self.seen.add(name)


def _common_attribute(
    target: SessionDescription | MediaDescription, name: str, value: str | None, once: _Once
) -> bool:
    """Attributes allowed at session and media level; returns False when `name` is none of them."""
    if name == "ice-ufrag":
        once(name)
        target.ice_ufrag = _word(_need(value, name), name)
    elif name == "ice-pwd":
        once(name)
        target.ice_pwd = _word(_need(value, name), name)
    elif name == "ice-options":
        once(name)
        target.ice_options = _parse_ice_options(value)
    elif name == "fingerprint":
        target.fingerprints.append(_parse_fingerprint(value))
    elif name == "setup":
        once(name)
        setup = _need(value, name)
        if setup not in ("actpass", "active", "passive", "holdconn"):
            raise SdpError(f"bad a=setup: {value!r}")
        target.setup = setup
    elif name in DIRECTIONS:
        once("direction")
        _flag(value, name)
        target.direction = name
    elif name == "extmap":
        target.extmaps.append(_parse_extmap(value))
    elif name == "extmap-allow-mixed":
        once(name)
        target.extmap_allow_mixed = _flag(value, name)
    elif name == "end-of-candidates":
        once(name)
        target.end_of_candidates = _flag(value, name)
    else:
        return False
    return True


def _session_attribute(session: SessionDescription, name: str, value: str | None, once: _Once) -> None:
    if _common_attribute(session, name, value, once):
        return
    if name == "ice-lite":
        once(name)
        session.ice_lite = _flag(value, name)
    elif name == "group":
        parts = _need(value, name).split()
        session.groups.append(Group(_word(parts[0], "group semantics"), [_word(m, "mid") for m in parts[1:]]))
    else:
        session.attributes.append(Attribute(name, value))


def _media_attribute(media: MediaDescription, name: str, value: str | None, once: _Once) -> None:
    if _common_attribute(media, name, value, once):
        return
    if name == "mid":
        once(name)
        media.mid = _word(_need(value, name), "mid")
    elif name in ("rtpmap", "fmtp", "rtcp-fb") and media.is_rtp:
        _codec_attribute(media, name, _need(value, name), once)
    elif name == "rtcp-mux":
        once(name)
        media.rtcp_mux = _flag(value, name)
    elif name == "rtcp-rsize":
        once(name)
        media.rtcp_rsize = _flag(value, name)
    elif name == "bundle-only":
        once(name)
        media.bundle_only = _flag(value, name)
    elif name == "msid":
        parts = _need(value, name).split()
        if len(parts) > 2:
            raise SdpError(f"bad a=msid: {value!r}")
        media.msids.append(Msid(parts[0], parts[1] if len(parts) > 1 else None))
    elif name == "ssrc":
        ident, _, rest = _need(value, name).partition(" ")
        ssrc = _int(ident, "ssrc", 2**32 - 1)
        key, sep, attr_value = rest.strip().partition(":")
        entry = once.ssrcs.get(ssrc)
        if entry is None:
            entry = once.ssrcs[ssrc] = Ssrc(ssrc)
            media.ssrcs.append(entry)
        if key:
            entry.attributes[_token(key, "ssrc attribute")] = attr_value if sep else None
    elif name == "ssrc-group":
        parts = _need(value, name).split()
        media.ssrc_groups.append(
            SsrcGroup(
                _word(parts[0], "ssrc-group semantics"), [_int(s, "ssrc", 2**32 - 1) for s in parts[1:]]
            )
        )
    elif name == "rid":
        rid = _parse_rid(value)
        if rid.id in once.rids:
            raise SdpError(f"a=rid:{rid.id} appears twice")
        once.rids.add(rid.id)
        media.rids.append(rid)
    elif name == "simulcast":
        once(name)
        media.simulcast = _parse_simulcast(value)
    elif name == "candidate":
        media.candidates.append(parse_candidate(_need(value, name)))
    else:
        media.attributes.append(Attribute(name, value))


def _codec_attribute(media: MediaDescription, name: str, value: str, once: _Once) -> None:
    ident, _, rest = value.partition(" ")
    rest = rest.strip()
    if name == "rtcp-fb" and ident == "*":
        media.rtcp_fb_all.append(_need(rest, name))
        return
    pt = _int(ident, f"a={name} payload type", 127)
    codec = once.codecs.get(pt)
    if codec is None:
        raise SdpError(f"a={name}:{pt} names a payload type missing from the m= line")
    if name == "rtpmap":
        once(f"rtpmap:{pt}")
        parts = rest.split("/")
        if len(parts) not in (2, 3) or not parts[0]:
            raise SdpError(f"bad a=rtpmap: {value!r}")
        codec.name = _word(parts[0], "codec name")
        codec.clock_rate = _int(parts[1], "clock rate", 2**32 - 1)
        codec.channels = _int(parts[2], "channels", 255) if len(parts) == 3 else None
    elif name == "fmtp":
        once(f"fmtp:{pt}")
        codec.fmtp = _parse_fmtp_params(rest)
    else:
        codec.rtcp_fb.append(_need(rest, name))


def _parse_media_line(value: str, once: _Once) -> MediaDescription:
    parts = value.split()
    if len(parts) < 3:
        raise SdpError(f"bad m= line: {value!r}")
    kind = _word(parts[0], "media kind")
    port_text, _, count = parts[1].partition("/")
    port = _int(port_text, "port", 65535)
    protocol = _word(parts[2], "protocol")
    media = MediaDescription(
        kind, port, protocol, port_count=_int(count, "port count", 65535) if count else None
    )
    if _is_rtp(protocol):
        for token in parts[3:]:
            pt = _int(token, "payload type", 127)
            if pt in once.codecs:
                raise SdpError(f"payload type {pt} appears twice on the m= line")
            codec = once.codecs[pt] = Codec(pt)
            media.codecs.append(codec)
    else:
        media.formats = [_word(f, "format") for f in parts[3:]]
    return media


# Line types in the order RFC 8866 §5 requires; r= may follow each t=, so both share a rank.
_SESSION_RANK = {"v": 0, "o": 1, "s": 2, "i": 3, "u": 4, "e": 5, "p": 6, "c": 7, "b": 8, "t": 9, "r": 9}
_SESSION_RANK |= {"z": 10, "k": 11, "a": 12}
_MEDIA_RANK = {"i": 1, "c": 2, "b": 3, "k": 4, "a": 5}
_REPEATABLE = set("ebtra")


def parse(text: str, *, max_media: int = MAX_MEDIA) -> SessionDescription:
    """Parse an SDP text (CRLF or LF line ends). Raises SdpError for anything it cannot represent, and
    SdpLimitError, before reading further, for a text over MAX_LINES lines, `max_media` m-sections or
    MAX_SECTION_LINES lines at one level."""
    if not isinstance(text, str):
        raise SdpError("SDP must be text")
    if text.count("\n", 0, len(text) - 1) >= MAX_LINES:
        raise SdpLimitError(f"the SDP has over {MAX_LINES} lines; at most {MAX_LINES} are allowed")
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    while lines and lines[-1] == "":
        lines.pop()
    if not lines or lines[0] != "v=0":
        raise SdpError("SDP must start with v=0")
    session = SessionDescription()
    session_once, media_once = _Once(), _Once()
    media: MediaDescription | None = None
    rank, seen_types, media_types = 0, {"v"}, set()
    for number, line in enumerate(lines[1:], start=2):
        if len(line) < 2 or line[1] != "=" or not ("a" <= line[0] <= "z"):
            raise SdpError(f"line {number} is not <type>=<value>: {line[:40]!r}")
        kind, value = line[0], line[2:]
        if kind == "m":
            for required in "ost":
                if required not in seen_types:
                    raise SdpError(f"the session has no {required}= line")
            if len(session.media) == max_media:
                raise SdpLimitError(
                    f"the SDP has over {max_media} m-sections; at most {max_media} are allowed"
                )
            media_once = _Once()
            media = _parse_media_line(value, media_once)
            session.media.append(media)
            media_types, rank = set(), 0
            continue
        level = session_once if media is None else media_once
        level.lines += 1
        if level.lines > MAX_SECTION_LINES:
            where = "at session level" if media is None else f"in m-section {len(session.media) - 1}"
            raise SdpLimitError(
                f"the SDP has over {MAX_SECTION_LINES} lines {where}; at most {MAX_SECTION_LINES} are allowed"
            )
        ranks = _SESSION_RANK if media is None else _MEDIA_RANK
        if kind not in ranks:
            raise SdpError(f"line {number}: unexpected {kind}= line")
        if ranks[kind] < rank or (
            kind not in _REPEATABLE and kind in (seen_types if media is None else media_types)
        ):
            raise SdpError(f"line {number}: {kind}= line out of order")
        rank = ranks[kind]
        (seen_types if media is None else media_types).add(kind)
        if kind == "a":
            name, sep, attr_value = value.partition(":")
            _token(name, "attribute name")
            if media is None:
                _session_attribute(session, name, attr_value if sep else None, session_once)
            else:
                _media_attribute(media, name, attr_value if sep else None, media_once)
        elif media is not None:
            if kind == "i":
                media.info = value
            elif kind == "c":
                media.connection = _need(value, "c")
            elif kind == "b":
                media.bandwidths.append(_need(value, "b"))
            else:
                media.extra_lines.append(line)
        elif kind == "o":
            session.origin = _parse_origin(value)
        elif kind == "s":
            session.name = value
        elif kind == "i":
            session.info = value
        elif kind == "c":
            session.connection = _need(value, "c")
        elif kind == "b":
            session.bandwidths.append(_need(value, "b"))
        elif kind == "t" and "t" not in session_once.seen:
            session_once("t")
            session.timing = _need(value, "t")
        else:
            session.extra_lines.append(line)
    if media is None:
        for required in "ost":
            if required not in seen_types:
                raise SdpError(f"the session has no {required}= line")
    return session


def _parse_origin(value: str) -> Origin:
    parts = value.split()
    if len(parts) != 6:
        raise SdpError(f"bad o= line: {value!r}")
    return Origin(
        _word(parts[0], "origin username"),
        _int(parts[1], "session id", 2**64 - 1),
        _int(parts[2], "session version", 2**64 - 1),
        _word(parts[3], "nettype"),
        _word(parts[4], "addrtype"),
        _word(parts[5], "origin address"),
    )


# ---------------------------------------------------------------------------------------------------------
# Serialising


def _attribute_line(name: str, value: str | None = None) -> str:
    return f"a={name}" if value is None else f"a={name}:{value}"


def _extmap_line(ext: Extmap) -> str:
    ident = f"{ext.id}/{ext.direction}" if ext.direction else str(ext.id)
    tail = f" {ext.attributes}" if ext.attributes else ""
    return f"a=extmap:{ident} {ext.uri}{tail}"


def _sc_list(streams: list[list[RidChoice]]) -> str:
    return ";".join(",".join(("~" if c.paused else "") + c.rid for c in stream) for stream in streams)


def _transport_lines(target: SessionDescription | MediaDescription) -> list[str]:
    lines = []
    if target.ice_ufrag is not None:
        lines.append(_attribute_line("ice-ufrag", target.ice_ufrag))
    if target.ice_pwd is not None:
        lines.append(_attribute_line("ice-pwd", target.ice_pwd))
    if target.ice_options is not None:
        lines.append(_attribute_line("ice-options", " ".join(target.ice_options)))
    lines += [_attribute_line("fingerprint", f"{f.algorithm} {f.value}") for f in target.fingerprints]
    if target.setup is not None:
        lines.append(_attribute_line("setup", target.setup))
    return lines


def serialize(desc: SessionDescription) -> str:
    """The SDP text of a description, CRLF line ends."""
    o = desc.origin
    lines = [
        f"v={desc.version}",
        f"o={o.username} {o.session_id} {o.session_version} {o.nettype} {o.addrtype} {o.address}",
        f"s={desc.name}",
    ]
    if desc.info is not None:
        lines.append(f"i={desc.info}")
    lines += [line for line in desc.extra_lines if line[0] in "uep"]
    if desc.connection is not None:
        lines.append(f"c={desc.connection}")
    lines += [f"b={b}" for b in desc.bandwidths]
    lines.append(f"t={desc.timing}")
    lines += [line for line in desc.extra_lines if line[0] not in "uep"]
    if desc.ice_lite:
        lines.append("a=ice-lite")
    lines += _transport_lines(desc)
    lines += [_attribute_line("group", " ".join([g.semantics, *g.mids])) for g in desc.groups]
    if desc.extmap_allow_mixed:
        lines.append("a=extmap-allow-mixed")
    lines += [_extmap_line(e) for e in desc.extmaps]
    if desc.direction is not None:
        lines.append(f"a={desc.direction}")
    lines += [_attribute_line(a.name, a.value) for a in desc.attributes]
    if desc.end_of_candidates:
        lines.append("a=end-of-candidates")
    for media in desc.media:
        lines += _media_lines(media)
    return "\r\n".join(lines) + "\r\n"


def _media_lines(media: MediaDescription) -> list[str]:
    port = str(media.port) if media.port_count is None else f"{media.port}/{media.port_count}"
    formats = [str(c.pt) for c in media.codecs] if media.is_rtp else media.formats
    lines = [" ".join([f"m={media.kind}", port, media.protocol, *formats])]
    if media.info is not None:
        lines.append(f"i={media.info}")
    if media.connection is not None:
        lines.append(f"c={media.connection}")
    lines += [f"b={b}" for b in media.bandwidths]
    lines += media.extra_lines
    lines += _transport_lines(media)
    if media.mid is not None:
        lines.append(_attribute_line("mid", media.mid))
    if media.bundle_only:
        lines.append("a=bundle-only")
    if media.extmap_allow_mixed:
        lines.append("a=extmap-allow-mixed")
    lines += [_extmap_line(e) for e in media.extmaps]
    if media.direction is not None:
        lines.append(f"a={media.direction}")
    lines += [_attribute_line("msid", m.stream_id if m.track_id is None else f"{m.stream_id} {m.track_id}")
              for m in media.msids]  # fmt: skip
    if media.rtcp_mux:
        lines.append("a=rtcp-mux")
    if media.rtcp_rsize:
        lines.append("a=rtcp-rsize")
    for codec in media.codecs:
        if codec.name:
            channels = f"/{codec.channels}" if codec.channels is not None else ""
            lines.append(f"a=rtpmap:{codec.pt} {codec.name}/{codec.clock_rate}{channels}")
        lines += [f"a=rtcp-fb:{codec.pt} {fb}" for fb in codec.rtcp_fb]
        if codec.fmtp:
            lines.append(f"a=fmtp:{codec.pt} {_format_params(codec.fmtp)}")
    lines += [f"a=rtcp-fb:* {fb}" for fb in media.rtcp_fb_all]
    for group in media.ssrc_groups:
        lines.append(_attribute_line("ssrc-group", " ".join([group.semantics, *map(str, group.ssrcs)])))
    for ssrc in media.ssrcs:
        if not ssrc.attributes:
            lines.append(f"a=ssrc:{ssrc.ssrc}")
        for key, value in ssrc.attributes.items():
            lines.append(f"a=ssrc:{ssrc.ssrc} {key}" + ("" if value is None else f":{value}"))
    for rid in media.rids:
        params = {"pt": ",".join(map(str, rid.payload_types))} if rid.payload_types else {}
        params |= rid.restrictions
        tail = f" {_format_params(params)}" if params else ""
        lines.append(f"a=rid:{rid.id} {rid.direction}{tail}")
    if media.simulcast is not None:
        sc = media.simulcast
        parts = ([f"send {_sc_list(sc.send)}"] if sc.send else []) + (
            [f"recv {_sc_list(sc.recv)}"] if sc.recv else []
        )
        lines.append(_attribute_line("simulcast", " ".join(parts)))
    lines += [f"a={c.to_sdp()}" for c in media.candidates]
    if media.end_of_candidates:
        lines.append("a=end-of-candidates")
    lines += [_attribute_line(a.name, a.value) for a in media.attributes]
    return lines


# ---------------------------------------------------------------------------------------------------------
# Codec choice


@dataclass(frozen=True)
class CodecSpec:
    """A codec the SFU accepts. `required` fmtp parameters must take one of the listed values (compared
    case-insensitively; a missing parameter never matches); `defaults` are added to the answer's fmtp when
    the offer lacks them; `rtx` keeps the offer's RTX payload type for this codec."""

    kind: str
    name: str
    clock_rate: int
    channels: int | None = None
    required: Mapping[str, frozenset[str]] = field(default_factory=dict)
    defaults: Mapping[str, str] = field(default_factory=dict)
    rtx: bool = False

    def matches(self, kind: str, codec: Codec) -> bool:
        if (
            kind != self.kind
            or codec.name.lower() != self.name.lower()
            or codec.clock_rate != self.clock_rate
        ):
            return False
        # An audio rtpmap without a channel count means one channel (RFC 8866 §6.6).
        channels = codec.channels if codec.channels is not None else (1 if kind == "audio" else None)
        if self.channels is not None and channels != self.channels:
            return False
        for key, accepted in self.required.items():
            value = codec.fmtp.get(key)
            if value is None or value.lower() not in accepted:
                return False
        return True


OPUS = CodecSpec("audio", "opus", 48000, 2, defaults={"minptime": "10", "useinbandfec": "1"})
VP8 = CodecSpec("video", "VP8", 90000, rtx=True)
# Constrained baseline with one NAL unit per packet or FU-A (packetization-mode=1): what every browser can
# decode; the SFU forwards H.264 without looking inside, so accepting it costs only the payload type.
H264 = CodecSpec(
    "video",
    "H264",
    90000,
    required={"packetization-mode": frozenset({"1"}), "profile-level-id": frozenset({"42e01f", "42001f"})},
    rtx=True,
)
DEFAULT_CODECS: tuple[CodecSpec, ...] = (OPUS, VP8, H264)


def choose_codecs(
    offer_media: MediaDescription, supported: Sequence[CodecSpec] = DEFAULT_CODECS
) -> list[Codec]:
    """The codecs to answer `offer_media` with, in our order of preference, keeping the offer's payload types.

    Each kept codec keeps the offered rtcp-fb values the SFU implements, and, for video, its RTX payload type
    (the `apt=` that points at it). Red, ulpfec, CN and telephone-event are left out: the SFU forwards
    packets as they are, and a subscriber that never negotiated them could not decode them.
    """
    chosen: list[Codec] = []
    for spec in supported:
        for offered in offer_media.codecs:
            if not spec.matches(offer_media.kind, offered) or any(c.pt == offered.pt for c in chosen):
                continue
            fmtp = dict(offered.fmtp)
            for key, value in spec.defaults.items():
                fmtp.setdefault(key, value)
            rtcp_fb = [fb for fb in offered.rtcp_fb if fb in SUPPORTED_RTCP_FB]
            chosen.append(replace(offered, fmtp=fmtp, rtcp_fb=rtcp_fb))
            if spec.rtx:
                rtx = next((c for c in offer_media.codecs if c.is_rtx and c.apt == offered.pt), None)
                if rtx is not None:
                    chosen.append(replace(rtx, fmtp=dict(rtx.fmtp), rtcp_fb=[]))
    return chosen


# ---------------------------------------------------------------------------------------------------------
# Answers and offers


@dataclass
class OutgoingTrack:
    """A track the SFU sends to this participant: another participant's audio or video, under our own SSRC."""

    kind: str
    ssrc: int
    cname: str
    stream_id: str
    track_id: str
    rtx_ssrc: int | None = None


def bundle_extmap(desc: SessionDescription) -> dict[int, str]:
    """The extension id → URI map shared by the bundled m-sections; SdpError if one id names two URIs.

    Bundled sections share one RTP session, so a receiver could not tell which extension an id means
    (RFC 8843); Chromium refuses such an offer. One URI under two ids is legal, though browsers never do it.
    """
    bundled = set(desc.bundle)
    ids: dict[int, str] = {}
    for media in desc.media:
        if media.rejected or (bundled and media.mid not in bundled):
            continue
        for ext in [*desc.extmaps, *media.extmaps]:
            if ids.setdefault(ext.id, ext.uri) != ext.uri:
                raise SdpError(f"extension id {ext.id} names both {ids[ext.id]} and {ext.uri}")
    return ids


def _origin(session_id: int | None, seed: str, version: int) -> Origin:
    if session_id is None:
        # Deterministic, so that equal inputs give equal SDP; 62 bits keeps it a positive 64-bit integer.
        session_id = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big") >> 2
    return Origin("-", session_id, version, "IN", "IP4", "0.0.0.0")


def _connection_for(candidates: Sequence[Candidate]) -> tuple[int, str]:
    # JSEP §5.3.1 puts the default candidate (ours: the first UDP one) on the m= and c= lines; with no
    # candidate, port 9 and 0.0.0.0 say "nothing here yet".
    default = next((c for c in candidates if c.transport.lower() == "udp"), None)
    if default is None:
        return 9, "IN IP4 0.0.0.0"
    family = "IP6" if ":" in default.address else "IP4"
    return default.port, f"IN {family} {default.address}"


_ICE_CHARS = re.compile(r"[A-Za-z0-9+/]+")


def _check_ice_credentials(ufrag: str, pwd: str) -> None:
    # RFC 8839 §5.4: 4-256 and 22-256 ice-chars; browsers refuse a description that breaks it.
    if not (_ICE_CHARS.fullmatch(ufrag) and 4 <= len(ufrag) <= 256):
        raise ValueError(f"bad ICE username fragment: {ufrag!r}")
    if not (_ICE_CHARS.fullmatch(pwd) and 22 <= len(pwd) <= 256):
        raise ValueError("bad ICE password: 22 to 256 characters of A-Z a-z 0-9 + /")


def _check_fingerprint(value: str) -> str:
    if not _FINGERPRINT_HEX.fullmatch(value) or len(value) != 95:
        raise ValueError(f"not a SHA-256 fingerprint: {value!r}")
    return value.upper()


def _sending_lines(media: MediaDescription, track: OutgoingTrack) -> None:
    media.msids = [Msid(track.stream_id, track.track_id)]
    msid = f"{track.stream_id} {track.track_id}"
    ssrcs = [track.ssrc] if track.rtx_ssrc is None else [track.ssrc, track.rtx_ssrc]
    media.ssrc_groups = [SsrcGroup("FID", ssrcs)] if track.rtx_ssrc is not None else []
    media.ssrcs = [Ssrc(s, {"cname": track.cname, "msid": msid}) for s in ssrcs]


def _rejected(media: MediaDescription) -> MediaDescription:
    # A rejected m-section keeps its kind, protocol and mid (JSEP §5.3.1); SDP needs at least one format
    # on the m= line, and the offer's first one is as good as any. aiortc refuses an audio or video section
    # without a=rtcp-mux or without a codec it knows (rtpmap included) even at port 0, so both stay, and its
    # createAnswer fails on an m-section with no direction attribute, hence a=inactive.
    formats = media.formats[:1] if not media.is_rtp else []
    first = media.codecs[0] if media.is_rtp and media.codecs else None
    codecs = [Codec(first.pt, first.name, first.clock_rate, first.channels)] if first else []
    return MediaDescription(
        media.kind,
        0,
        media.protocol,
        codecs=codecs,
        formats=formats,
        connection="IN IP4 0.0.0.0",
        mid=media.mid,
        direction="inactive",
        rtcp_mux=media.is_rtp and media.kind in ("audio", "video"),
    )


def _answer_direction(offered: str, sending: bool) -> str:
    receive = offered in ("sendrecv", "sendonly")
    send = sending and offered in ("sendrecv", "recvonly")
    return {(True, True): "sendrecv", (True, False): "recvonly", (False, True): "sendonly"}.get(
        (receive, send), "inactive"
    )


def _answer_simulcast(offer_media: MediaDescription, answer: MediaDescription) -> None:
    """Mirror a simulcast send offer: `a=rid:<id> recv` per offered rid, `a=simulcast:recv` of the same list.

    Chromium (156) refuses an answer with these lines but without the rid extmap. An answer without any of
    them declines simulcast (RFC 8853): Chromium accepts it but then sends only the first rid, the
    lowest layer, so a simulcast offer without the rid extmap is the one case where we decline.
    """
    sc = offer_media.simulcast
    if sc is None or not sc.send or answer.direction not in ("recvonly", "sendrecv"):
        return
    if answer.extension_id(URI_RID) is None:
        return
    accepted_pts = {c.pt for c in answer.codecs}
    rids = []
    for rid in offer_media.rids:
        if rid.direction != "send":
            continue
        pts = [pt for pt in rid.payload_types if pt in accepted_pts]
        if rid.payload_types and not pts:
            continue
        rids.append(Rid(rid.id, "recv", pts, dict(rid.restrictions)))
    known = {r.id for r in rids}
    streams = [[c for c in stream if c.rid in known] for stream in sc.send]
    streams = [s for s in streams if s]
    if streams:
        answer.rids = [r for r in rids if any(c.rid == r.id for s in streams for c in s)]
        answer.simulcast = Simulcast(recv=streams)


def build_answer(
    offer: SessionDescription,
    *,
    ice_ufrag: str,
    ice_pwd: str,
    fingerprint_sha256: str,
    setup: str = "passive",
    candidates: Sequence[Candidate] = (),
    supported_extensions: Collection[str] = DEFAULT_EXTENSIONS,
    supported_codecs: Sequence[CodecSpec] = DEFAULT_CODECS,
    outgoing: Mapping[str, OutgoingTrack] | None = None,
    session_id: int | None = None,
    session_version: int = 1,
) -> SessionDescription:
    """The SFU's answer to a participant's offer (initial or renegotiation).

    Every offered m-section is answered in order with its mid. Audio and video sections over DTLS-SRTP with
    rtcp-mux, in the BUNDLE group if the offer has one, and with at least one codec we support are accepted:
    receiving what the participant sends (simulcast included) and sending `outgoing[mid]` where the offer lets
    us. Anything else (a data channel, a section outside the BUNDLE group) is rejected with port 0.
    Extension ids and payload types are the offer's, as JSEP requires.

    `setup` is our DTLS role: the SFU is always the DTLS server ("passive"), in every answer and for the life
    of the connection, because Chromium refuses a DTLS role change on renegotiation. Raises SdpError for an
    offer that cannot be answered (missing ICE credentials or fingerprint, or an offerer that insists on the
    same DTLS role as ours).
    """
    if setup not in ("active", "passive"):
        raise ValueError("an answer's a=setup is active or passive")
    _check_ice_credentials(ice_ufrag, ice_pwd)
    fingerprint = _check_fingerprint(fingerprint_sha256)
    outgoing = outgoing or {}
    bundle = offer.bundle
    port, connection = _connection_for(candidates)
    # ICE and DTLS attributes sit at session level, so that they also cover rejected m-sections: aiortc
    # refuses any m-section, port 0 or not, without ICE credentials and a DTLS role to inherit.
    answer = SessionDescription(
        origin=_origin(session_id, ice_ufrag, session_version),
        ice_lite=True,
        ice_ufrag=ice_ufrag,
        ice_pwd=ice_pwd,
        fingerprints=[Fingerprint("sha-256", fingerprint)],
        setup=setup,
        attributes=[Attribute("msid-semantic", "WMS *")],
    )
    accepting = [_acceptable(offered, bundle, supported_codecs) for offered in offer.media]
    # Chromium with bundlePolicy max-bundle refuses an answer that rejects the offerer's BUNDLE-tag section
    # while accepting others (only the tag has a transport), so a tag we cannot use is answered inactive.
    tag_index = next((i for i, m in enumerate(offer.media) if bundle and m.mid == bundle[0]), None)
    placeholder = (
        tag_index is not None
        and not accepting[tag_index]
        and any(accepting)
        and _could_hold_transport(offer.media[tag_index])
    )
    accepted: list[str] = []
    for index, offered in enumerate(offer.media):
        if not accepting[index] and not (placeholder and index == tag_index):
            answer.media.append(_rejected(offered))
            continue
        if offered.mid is None:
            raise SdpError("an accepted m-section needs a=mid (JSEP)")
        ufrag, pwd = offer.ice_credentials(offered)
        if not ufrag or not pwd or not offer.fingerprints_for(offered):
            raise SdpError(f"m-section {offered.mid} has no ICE credentials or no DTLS fingerprint")
        their_setup = offer.setup_for(offered) or "actpass"
        if their_setup == setup or their_setup == "holdconn":
            raise SdpError(
                f"m-section {offered.mid}: the offer's a=setup:{their_setup} leaves us no DTLS role"
            )
        track = outgoing.get(offered.mid) if accepting[index] else None
        if track is not None and track.kind != offered.kind:
            raise ValueError(f"outgoing {track.kind} track for {offered.kind} m-section {offered.mid}")
        if accepting[index]:
            codecs = choose_codecs(offered, supported_codecs)
            direction = _answer_direction(offer.direction_for(offered), track is not None)
        else:
            first = next(c for c in offered.codecs if not c.is_rtx)
            codecs, direction = [replace(first, fmtp=dict(first.fmtp), rtcp_fb=[])], "inactive"
        media = MediaDescription(
            offered.kind,
            port,
            offered.protocol,
            codecs=codecs,
            connection=connection,
            mid=offered.mid,
            direction=direction,
            rtcp_mux=True,
            rtcp_rsize=offered.rtcp_rsize,
            candidates=list(candidates),
            # ICE-lite gathers nothing later: every candidate we have is already here.
            end_of_candidates=True,
        )
        wanted = set(supported_extensions)
        if offered.simulcast is not None:
            wanted |= {URI_RID, URI_REPAIRED_RID}
        media.extmaps = [
            Extmap(e.id, e.uri, _REVERSE[e.direction] if e.direction else None, e.attributes)
            for e in [*offer.extmaps, *offered.extmaps]
            if e.uri in wanted
        ]
        if track is not None and media.direction in ("sendrecv", "sendonly"):
            _sending_lines(media, track)
        _answer_simulcast(offered, media)
        answer.media.append(media)
        accepted.append(offered.mid)
    if bundle and accepted:
        answer.groups.append(Group("BUNDLE", accepted))
    bundle_extmap(answer)
    return answer


def _could_hold_transport(media: MediaDescription) -> bool:
    return (
        media.kind in ("audio", "video")
        and media.is_rtp
        and media.rtcp_mux
        and not media.rejected
        and any(not c.is_rtx for c in media.codecs)
    )


def _acceptable(media: MediaDescription, bundle: list[str], supported: Sequence[CodecSpec]) -> bool:
    if media.kind not in ("audio", "video") or media.rejected:
        return False
    # DTLS-SRTP only (RFC 8827): plain RTP/AVP or SDES-keyed RTP/SAVPF is not WebRTC.
    if media.protocol.upper() not in ("UDP/TLS/RTP/SAVPF", "TCP/DTLS/RTP/SAVPF", "UDP/TLS/RTP/SAVP"):
        return False
    # The SFU runs one transport per participant with RTP and RTCP on one port (RFC 5761, RFC 8843).
    if not media.rtcp_mux or (bundle and media.mid not in bundle):
        return False
    return any(not c.is_rtx for c in choose_codecs(media, supported))


def outgoing_tracks(desc: SessionDescription) -> dict[str, OutgoingTrack]:
    """The tracks a local description sends, by mid, read back from its msid and ssrc lines."""
    tracks: dict[str, OutgoingTrack] = {}
    for media in desc.media:
        if media.rejected or media.mid is None or desc.direction_for(media) not in ("sendonly", "sendrecv"):
            continue
        if not media.ssrcs or not media.msids or media.msids[0].track_id is None:
            continue
        fid = next((g.ssrcs for g in media.ssrc_groups if g.semantics == "FID" and len(g.ssrcs) == 2), None)
        primary = media.ssrcs[0] if fid is None else media.ssrc(fid[0]) or media.ssrcs[0]
        tracks[media.mid] = OutgoingTrack(
            media.kind,
            primary.ssrc,
            primary.cname or "",
            media.msids[0].stream_id,
            media.msids[0].track_id,
            rtx_ssrc=fid[1] if fid is not None else None,
        )
    return tracks


# Payload types for a kind no m-section has negotiated yet: the numbers Chromium itself offers.
_DEFAULT_PAYLOADS: dict[str, list[Codec]] = {
    "audio": [Codec(111, "opus", 48000, 2, {"minptime": "10", "useinbandfec": "1"}, ["transport-cc"])],
    "video": [
        Codec(96, "VP8", 90000, None, {}, ["goog-remb", "transport-cc", "ccm fir", "nack", "nack pli"]),
        Codec(97, "rtx", 90000, None, {"apt": "96"}),
    ],
}
_SEND_EXTENSIONS = {
    "audio": (URI_MID, URI_ABS_SEND_TIME, URI_TRANSPORT_CC, URI_AUDIO_LEVEL),
    "video": (URI_MID, URI_ABS_SEND_TIME, URI_TRANSPORT_CC),
}


def _template_codecs(current: SessionDescription, kind: str) -> list[Codec]:
    """Codecs for a new section of `kind`: those already agreed for that kind on this connection.

    Bundled sections share one payload type space, so reusing the agreed numbers keeps every PT meaning one
    codec; only when nothing of this kind was negotiated yet do we pick numbers, avoiding taken ones.
    """
    for media in current.media:
        if media.kind == kind and not media.rejected and media.codecs:
            return copy.deepcopy(media.codecs)
    taken = {c.pt for m in current.media if m.kind != kind for c in m.codecs}
    codecs = copy.deepcopy(_DEFAULT_PAYLOADS.get(kind, []))
    renumber: dict[int, int] = {}
    for codec in codecs:
        if codec.pt in taken:
            # 96-127 then 35-63: dynamic numbers clear of 64-95, which rtcp-mux leaves to RTCP (RFC 5761 §4).
            new = next(pt for pt in [*range(96, 128), *range(35, 64)] if pt not in taken)
            renumber[codec.pt] = codec.pt = new
        taken.add(codec.pt)
    for codec in codecs:
        if codec.apt in renumber:
            codec.fmtp["apt"] = str(renumber[codec.apt])  # type: ignore[index]
    return codecs


def _template_extmaps(sections: Sequence[MediaDescription], kind: str) -> list[Extmap]:
    """Header extensions for a new sendonly section, under the ids this connection already uses.

    Ids must never change across renegotiation, and in a BUNDLE no id may name two URIs, so a URI already
    negotiated keeps its id and a new one takes an id no section uses (1-14, the one-byte header range).
    """
    by_uri: dict[str, int] = {}
    used: set[int] = set()
    for media in sections:
        for ext in media.extmaps:
            by_uri.setdefault(ext.uri, ext.id)
            used.add(ext.id)
    extmaps = []
    for uri in _SEND_EXTENSIONS.get(kind, ()):
        ext_id = by_uri.get(uri)
        if ext_id is None:
            ext_id = next((i for i in range(1, 15) if i not in used), None)
            if ext_id is None:
                continue
            used.add(ext_id)
        extmaps.append(Extmap(ext_id, uri))
    return extmaps


def _next_mid(current: SessionDescription, extra: Collection[str]) -> str:
    # Numeric like the browsers' own mids, and above every mid seen so far so that a retired mid (a stopped
    # section recycled under a new one, JSEP §5.2.2) never comes back with another meaning.
    numbers = [
        int(m) for m in [*(x.mid for x in current.media if x.mid), *extra] if m.isascii() and m.isdigit()
    ]
    return str(max(numbers, default=-1) + 1)


def build_offer(
    current: SessionDescription,
    *,
    add: Sequence[OutgoingTrack] = (),
    remove: Collection[str] = (),
    stop: Collection[str] = (),
    reusable: Collection[str] = (),
    remote: SessionDescription | None = None,
) -> tuple[SessionDescription, list[str]]:
    """A renegotiation offer from the SFU, built on `current`, its local description as last agreed.

    Every m-section of `current` stays, in order, with its mid, codecs (payload types) and header extension
    ids. `remove` stops sending on those mids (sendonly becomes inactive, sendrecv recvonly); `stop` rejects
    them with port 0. Each track in `add` gets a sendonly section: first an inactive section of its kind named
    in `remove` or `reusable` (same mid), then a stopped (port 0) section, recycled under a new mid as JSEP
    §5.2.2 requires, then a new section at the end. Returns the offer and the mids given to `add`, in order.
    `remote`, the participant's last description, marks the sections its answer rejected.

    Only the SFU knows which inactive sections are its own: an inactive section the browser created for its
    own camera would answer our sendonly with inactive, so such sections are reused only when named.
    """
    stopped_now = set(stop)
    if remote is not None:
        # A section either side rejected stays rejected (RFC 3264 §6): the answer may refuse one we offered.
        stopped_now |= {m.mid for m in remote.media if m.rejected and m.mid is not None}
    offer = SessionDescription(
        origin=replace(current.origin, session_version=current.origin.session_version + 1),
        name=current.name,
        ice_lite=current.ice_lite,
        ice_ufrag=current.ice_ufrag,
        ice_pwd=current.ice_pwd,
        ice_options=copy.deepcopy(current.ice_options),
        fingerprints=copy.deepcopy(current.fingerprints),
        # JSEP §5.2.1 requires actpass in every offer. The SFU nonetheless stays DTLS server: the browser
        # has an established DTLS association as client and keeps that role in its answer (Chromium refuses
        # to change it, and answered active even to a passive offer), and `check_answer` rejects an answer
        # that would make us the client.
        setup="actpass" if current.setup is not None else None,
        attributes=copy.deepcopy(current.attributes),
    )
    transport = next((m for m in current.media if not m.rejected), None)
    for media in current.media:
        if media.mid in stopped_now or media.rejected:
            offer.media.append(_rejected(media))
            continue
        section = _copy_media(media)
        direction = current.direction_for(media)
        if media.mid in remove:
            direction = {"sendrecv": "recvonly", "sendonly": "inactive"}.get(direction, direction)
        section.direction = direction
        if direction not in ("sendrecv", "sendonly"):
            section.msids, section.ssrcs, section.ssrc_groups = [], [], []
        offer.media.append(section)
    free_mids = [*remove, *reusable]
    mids: list[str] = []
    for track in add:
        index = _free_section(offer, track.kind, free_mids)
        if index is not None and not offer.media[index].rejected:
            section = offer.media[index]
            free_mids.remove(section.mid)  # type: ignore[arg-type]
            section.direction = "sendonly"
        else:
            section = _new_section(current, offer, track.kind, transport)
            section.mid = _next_mid(offer, mids + [m.mid for m in current.media if m.mid])
            if index is not None:
                offer.media[index] = section
            else:
                offer.media.append(section)
        _sending_lines(section, track)
        mids.append(section.mid)  # type: ignore[arg-type]
    accepted = [m.mid for m in offer.media if not m.rejected and m.mid is not None]
    if accepted:
        offer.groups = [Group("BUNDLE", accepted)]
    bundle_extmap(offer)
    return offer, mids


def _free_section(offer: SessionDescription, kind: str, free_mids: list[str]) -> int | None:
    for index, media in enumerate(offer.media):
        if (
            media.kind == kind
            and not media.rejected
            and media.mid in free_mids
            and media.direction == "inactive"
        ):
            return index
    return next((i for i, m in enumerate(offer.media) if m.rejected), None)


def _copy_media(media: MediaDescription) -> MediaDescription:
    section = copy.deepcopy(media)
    if section.setup is not None:
        section.setup = "actpass"
    return section


def _new_section(
    current: SessionDescription, offer: SessionDescription, kind: str, transport: MediaDescription | None
) -> MediaDescription:
    if transport is None:
        raise ValueError("the current description has no accepted m-section to take the transport from")
    return MediaDescription(
        kind,
        transport.port,
        "UDP/TLS/RTP/SAVPF",
        codecs=_template_codecs(current, kind),
        connection=transport.connection,
        direction="sendonly",
        ice_ufrag=transport.ice_ufrag,
        ice_pwd=transport.ice_pwd,
        ice_options=transport.ice_options,
        fingerprints=copy.deepcopy(transport.fingerprints),
        setup="actpass" if transport.setup is not None else None,
        rtcp_mux=True,
        rtcp_rsize=True,
        extmaps=_template_extmaps([*current.media, *offer.media], kind),
        candidates=copy.deepcopy(transport.candidates),
        end_of_candidates=transport.end_of_candidates,
    )


def check_answer(offer: SessionDescription, answer: SessionDescription) -> None:
    """Check a participant's answer to an SFU offer; raises SdpError naming the first problem.

    The answer must list the offer's m-sections in order with the same mids, take the DTLS client role
    (we stay server), reuse the offered header extension ids, choose only offered payload types, and keep
    bundled extension ids unambiguous.
    """
    if len(answer.media) != len(offer.media):
        raise SdpError(f"the answer has {len(answer.media)} m-sections for {len(offer.media)} offered")
    for offered, answered in zip(offer.media, answer.media, strict=True):
        if (answered.kind, answered.mid) != (offered.kind, offered.mid):
            raise SdpError(
                f"answer m-section {answered.kind}/{answered.mid} for {offered.kind}/{offered.mid}"
            )
        if answered.rejected:
            continue
        if offered.rejected:
            # aiortc answers a stopped section with a live port and a=inactive instead of port 0: no media
            # flows either way, so only a section that would carry media is an error.
            if answer.direction_for(answered) != "inactive":
                raise SdpError(
                    f"m-section {offered.mid} was rejected in the offer but accepted in the answer"
                )
            continue
        role = answer.setup_for(answered)
        if role != "active":
            raise SdpError(f"m-section {offered.mid}: a=setup:{role} would make the SFU the DTLS client")
        ids = {e.uri: e.id for e in [*offer.extmaps, *offered.extmaps]}
        for ext in answered.extmaps:
            if ids.get(ext.uri) != ext.id:
                raise SdpError(f"m-section {offered.mid}: extension {ext.uri} answered with id {ext.id}")
        offered_pts = {c.pt for c in offered.codecs}
        stray = [c.pt for c in answered.codecs if c.pt not in offered_pts]
        if stray:
            raise SdpError(f"m-section {offered.mid}: payload types {stray} were not offered")
    bundle_extmap(answer)
