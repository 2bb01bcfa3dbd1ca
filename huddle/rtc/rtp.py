"""RTP packets (RFC 3550) read and patched where they lie, for the SFU's forwarding path.

The SFU forwards every packet it receives, so the functions here work on the datagram itself (`bytes`,
`bytearray` or `memoryview`): accessors read one field, writers patch one field of a `bytearray` in place, and
`extension()` walks the RFC 8285 header extension block to one element without building anything. A forwarded
packet therefore keeps every header extension Huddle does not understand, byte for byte.

`RtpPacket` is the readable form, for tests and code off the hot path. Also here: RTX (RFC 4588), the values
of the header extensions the SFU reads (MID, RID, repaired RID, RFC 6464 audio level, abs-send-time,
transport-wide sequence number), and wrap-around arithmetic on 16-bit sequence numbers and 32-bit timestamps.

Every function that reads untrusted bytes raises `RtpError` and nothing else. The accessors (`seq`, `ssrc`,
...) only check that their field is there: validate a packet once with `payload_offset()` (or `is_rtp()` and
`payload_offset()`) before trusting the rest of it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

__all__ = [
    "HEADER_SIZE",
    "ONE_BYTE_PROFILE",
    "TWO_BYTE_PROFILE",
    "ExtendedSeq",
    "ExtendedTimestamp",
    "RtpError",
    "RtpPacket",
    "abs_send_time",
    "audio_level",
    "extension",
    "extension_offset",
    "extensions",
    "is_rtcp",
    "is_rtp",
    "marker",
    "payload",
    "payload_end",
    "payload_offset",
    "payload_type",
    "rewrite_header",
    "rtx_unwrap",
    "rtx_wrap",
    "sdes_string",
    "seq",
    "seq_diff",
    "seq_newer",
    "set_extension_value",
    "set_marker",
    "set_payload_type",
    "set_seq",
    "set_ssrc",
    "set_timestamp",
    "set_transport_seq",
    "ssrc",
    "timestamp",
    "transport_seq",
    "ts_diff",
    "ts_newer",
]

HEADER_SIZE = 12
ONE_BYTE_PROFILE = 0xBEDE  # RFC 8285 §4.2
TWO_BYTE_PROFILE = 0x1000  # RFC 8285 §4.3: the low 4 bits ("appbits") are free for the application

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_HH = struct.Struct("!HH")
_SEQ_TS_SSRC = struct.Struct("!HII")
_FIXED = struct.Struct("!BBHII")

_Buffer = bytes | bytearray | memoryview


class RtpError(ValueError):
    """Bytes that are not a well-formed RTP packet, or a header extension value of the wrong shape."""


# --- demultiplexing -----------------------------------------------------------------------------------------


def is_rtcp(data: _Buffer) -> bool:
    """True for a datagram that is RTCP when RTP and RTCP share a port (RFC 5761 §4).

    RTCP packet types 192-223 sit where an RTP packet would carry marker=1 and a payload type of 64-95, which
    RFC 5761 keeps out of use for RTP for exactly this reason.
    """
    return len(data) >= 4 and data[0] >> 6 == 2 and 192 <= data[1] <= 223


def is_rtp(data: _Buffer) -> bool:
    """True for a datagram that looks like RTP: version 2, a full fixed header, and not RTCP."""
    return len(data) >= HEADER_SIZE and data[0] >> 6 == 2 and not 192 <= data[1] <= 223


# --- fixed-header accessors ---------------------------------------------------------------------------------


def seq(pkt: _Buffer) -> int:
    try:
        return pkt[2] << 8 | pkt[3]
    except IndexError:
        raise RtpError("too short for an RTP sequence number") from None


def timestamp(pkt: _Buffer) -> int:
    try:
        return _U32.unpack_from(pkt, 4)[0]
    except struct.error:
        raise RtpError("too short for an RTP timestamp") from None


def ssrc(pkt: _Buffer) -> int:
    try:
        return _U32.unpack_from(pkt, 8)[0]
    except struct.error:
        raise RtpError("too short for an RTP SSRC") from None


def payload_type(pkt: _Buffer) -> int:
    try:
        return pkt[1] & 0x7F
    except IndexError:
        raise RtpError("too short for an RTP payload type") from None


def marker(pkt: _Buffer) -> bool:
    try:
        return pkt[1] >= 0x80
    except IndexError:
        raise RtpError("too short for an RTP marker bit") from None


def payload_offset(pkt: _Buffer) -> int:
    """Where the payload starts (after the CSRCs and the header extension); validates the header."""
    n = len(pkt)
    if n < HEADER_SIZE:
        raise RtpError(f"{n} bytes is shorter than the RTP header")
    b0 = pkt[0]
    if b0 >> 6 != 2:
        raise RtpError(f"RTP version {b0 >> 6}, not 2")
    offset = HEADER_SIZE + (b0 & 0x0F) * 4
    if b0 & 0x10:
        if offset + 4 > n:
            raise RtpError("header extension runs past the end of the packet")
        offset += 4 + ((pkt[offset + 2] << 8) | pkt[offset + 3]) * 4
    if offset > n:
        raise RtpError("CSRC list or header extension runs past the end of the packet")
    return offset


def payload_end(pkt: _Buffer) -> int:
    """Where the payload ends: the packet's length less its RTP padding (the P bit); validates the header."""
    start = payload_offset(pkt)
    n = len(pkt)
    if not pkt[0] & 0x20:
        return n
    if n == start:
        raise RtpError("P bit set on a packet with no room for padding")
    count = pkt[n - 1]
    # The count includes itself (RFC 3550 §5.1), so 0 is not a count a sender can write.
    if count == 0 or count > n - start:
        raise RtpError(f"padding count {count} does not fit the {n - start} bytes after the header")
    return n - count


def payload(pkt: _Buffer) -> _Buffer:
    """The payload without padding, as a slice of the same type as `pkt`."""
    return pkt[payload_offset(pkt) : payload_end(pkt)]


# --- in-place writers ---------------------------------------------------------------------------------------
# Values wrap rather than fail: the SFU writes `seq + offset` and `timestamp + offset` and means modulo 2**n.


def set_seq(pkt: bytearray, value: int) -> None:
    try:
        pkt[2] = (value >> 8) & 0xFF
        pkt[3] = value & 0xFF
    except IndexError:
        raise RtpError("too short for an RTP sequence number") from None


def set_timestamp(pkt: bytearray, value: int) -> None:
    try:
        _U32.pack_into(pkt, 4, value & 0xFFFFFFFF)
    except struct.error:
        raise RtpError("too short for an RTP timestamp") from None


def set_ssrc(pkt: bytearray, value: int) -> None:
    try:
        _U32.pack_into(pkt, 8, value & 0xFFFFFFFF)
    except struct.error:
        raise RtpError("too short for an RTP SSRC") from None


def rewrite_header(pkt: bytearray, ssrc: int, seq: int, timestamp: int) -> None:
    """The SFU's per-subscriber rewrite in one write: SSRC, sequence number and timestamp (wrapping)."""
    try:
        _SEQ_TS_SSRC.pack_into(pkt, 2, seq & 0xFFFF, timestamp & 0xFFFFFFFF, ssrc & 0xFFFFFFFF)
    except struct.error:
        raise RtpError("too short for an RTP header") from None


def set_payload_type(pkt: bytearray, value: int) -> None:
    """Set the 7-bit payload type, keeping the marker bit."""
    try:
        pkt[1] = (pkt[1] & 0x80) | (value & 0x7F)
    except IndexError:
        raise RtpError("too short for an RTP payload type") from None


def set_marker(pkt: bytearray, value: bool) -> None:
    try:
        pkt[1] = (pkt[1] | 0x80) if value else (pkt[1] & 0x7F)
    except IndexError:
        raise RtpError("too short for an RTP marker bit") from None


# --- header extensions (RFC 8285) ---------------------------------------------------------------------------
# The block is walked afresh on every lookup: a packet carries a handful of elements, and walking them costs
# less than building anything to remember them in.


def _find(pkt: _Buffer, ext_id: int) -> int:
    """`offset << 8 | length` of element `ext_id`'s value, or -1 (one int: no tuple to allocate).

    Checks what it walks over and no more; raises IndexError or struct.error for the callers to translate.
    """
    b0 = pkt[0]
    if not b0 & 0x10:
        return -1
    i = HEADER_SIZE + ((b0 & 0x0F) << 2)
    profile, words = _HH.unpack_from(pkt, i)
    i += 4
    end = i + (words << 2)
    if end > len(pkt):
        raise RtpError("header extension runs past the end of the packet")
    if profile == ONE_BYTE_PROFILE:
        if not 0 < ext_id < 15:
            return -1
        while i < end:
            b = pkt[i]
            eid = b >> 4
            if eid == ext_id:
                size = (b & 0x0F) + 1
                if i + 1 + size > end:
                    raise RtpError(f"header extension element {eid} runs past the extension block")
                return (i + 1) << 8 | size
            if b == 0:  # a padding byte
                i += 1
            elif eid == 15 or eid == 0:
                # ID 15 ends the block (RFC 8285 §4.2); ID 0 with a length is not padding, and no element
                # boundary after it can be trusted either.
                return -1
            else:
                i += (b & 0x0F) + 2
        return -1
    if profile & 0xFFF0 == TWO_BYTE_PROFILE:
        if not 0 < ext_id < 256:
            return -1
        while i < end:
            eid = pkt[i]
            if eid == 0:  # a padding byte
                i += 1
                continue
            if i + 2 > end:
                raise RtpError("header extension element header runs past the extension block")
            size = pkt[i + 1]
            i += 2
            if eid == ext_id:
                if i + size > end:
                    raise RtpError(f"header extension element {eid} runs past the extension block")
                return i << 8 | size
            i += size
        return -1
    return -1


def extension(pkt: _Buffer, ext_id: int) -> memoryview | bytes | None:
    """The value of header extension element `ext_id` (the first, if repeated), or None when absent.

    A `memoryview` for a `memoryview` packet, otherwise `bytes`. A `bytearray` packet gets a copy, not a view:
    a live view of a `bytearray` stops it from being resized, which would surprise code that later grows it.
    """
    # The one-byte walk is `_find` inlined: the call and the packed result cost a quarter of the lookup.
    try:
        b0 = pkt[0]
        if not b0 & 0x10:
            return None
        i = HEADER_SIZE + ((b0 & 0x0F) << 2)
        profile, words = _HH.unpack_from(pkt, i)
        if profile == ONE_BYTE_PROFILE:
            i += 4
            end = i + (words << 2)
            if end > len(pkt):
                raise RtpError("header extension runs past the end of the packet")
            if not 0 < ext_id < 15:
                return None
            while i < end:
                b = pkt[i]
                eid = b >> 4
                if eid == ext_id:
                    i += 1
                    size = (b & 0x0F) + 1
                    if i + size > end:
                        raise RtpError(f"header extension element {eid} runs past the extension block")
                    break
                if b == 0:
                    i += 1
                elif eid == 15 or eid == 0:
                    return None
                else:
                    i += (b & 0x0F) + 2
            else:
                return None
        else:
            found = _find(pkt, ext_id)
            if found < 0:
                return None
            i = found >> 8
            size = found & 0xFF
    except (IndexError, struct.error):
        raise RtpError("header extension runs past the end of the packet") from None
    if type(pkt) is bytearray:
        return bytes(pkt[i : i + size])
    return pkt[i : i + size]


def extension_offset(pkt: _Buffer, ext_id: int) -> int:
    """Where element `ext_id`'s value starts, or -1 when absent.

    Every subscriber's copy of a packet has its elements at the same offsets: find one once per incoming
    packet and patch the copies there (e.g. the transport-wide sequence number, 2 bytes).
    """
    try:
        found = _find(pkt, ext_id)
    except (IndexError, struct.error):
        raise RtpError("header extension runs past the end of the packet") from None
    return found >> 8 if found >= 0 else -1


def _block_bounds(pkt: _Buffer) -> tuple[int, int, int] | None:
    """(profile, start, end) of the extension block's elements, or None without the X bit; validates."""
    offset = payload_offset(pkt)
    b0 = pkt[0]
    if not b0 & 0x10:
        return None
    start = HEADER_SIZE + (b0 & 0x0F) * 4
    return (pkt[start] << 8) | pkt[start + 1], start + 4, offset


def _elements(pkt: _Buffer, profile: int, i: int, end: int) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    if profile == ONE_BYTE_PROFILE:
        while i < end:
            b = pkt[i]
            if b == 0:
                i += 1
                continue
            eid = b >> 4
            if eid == 15 or eid == 0:
                break
            size = (b & 0x0F) + 1
            i += 1
            if i + size > end:
                raise RtpError(f"header extension element {eid} runs past the extension block")
            found.setdefault(eid, bytes(pkt[i : i + size]))
            i += size
    elif profile & 0xFFF0 == TWO_BYTE_PROFILE:
        while i < end:
            eid = pkt[i]
            if eid == 0:
                i += 1
                continue
            if i + 2 > end:
                raise RtpError("header extension element header runs past the extension block")
            size = pkt[i + 1]
            i += 2
            if i + size > end:
                raise RtpError(f"header extension element {eid} runs past the extension block")
            found.setdefault(eid, bytes(pkt[i : i + size]))
            i += size
    return found


def extensions(pkt: _Buffer) -> dict[int, bytes]:
    """All RFC 8285 header extension elements by id (the first of a repeated id); {} without any.

    {} also for a header extension of another profile than RFC 8285's. Unlike `extension()`, validates the
    whole header and every element.
    """
    block = _block_bounds(pkt)
    if block is None:
        return {}
    return _elements(pkt, *block)


def set_extension_value(pkt: bytearray, ext_id: int, value: bytes) -> bool:
    """Overwrite the value of element `ext_id` in place; False when the packet has no such element.

    The new value must have the old one's length: the SFU rewrites, it never re-lays out a header.
    """
    try:
        found = _find(pkt, ext_id)
    except (IndexError, struct.error):
        raise RtpError("header extension runs past the end of the packet") from None
    if found < 0:
        return False
    start = found >> 8
    size = found & 0xFF
    if len(value) != size:
        raise RtpError(f"element {ext_id} holds {size} bytes, not {len(value)}")
    pkt[start : start + size] = value
    return True


def set_transport_seq(pkt: bytearray, ext_id: int, value: int) -> bool:
    """Rewrite the transport-wide sequence number (16 bits, wrapping); False when the packet has none."""
    try:
        found = _find(pkt, ext_id)
    except (IndexError, struct.error):
        raise RtpError("header extension runs past the end of the packet") from None
    if found < 0:
        return False
    if found & 0xFF < 2:
        raise RtpError(f"transport-wide sequence number element holds {found & 0xFF} bytes, not 2")
    start = found >> 8
    pkt[start] = (value >> 8) & 0xFF
    pkt[start + 1] = value & 0xFF
    return True


# --- header extension values --------------------------------------------------------------------------------


def sdes_string(value: _Buffer) -> str:
    """MID (RFC 8843), RtpStreamId and RepairedRtpStreamId (RFC 8852): SDES items carried as text."""
    try:
        return bytes(value).decode("ascii")
    except UnicodeDecodeError:
        raise RtpError("identifier is not ASCII") from None


def audio_level(value: _Buffer) -> tuple[bool, int]:
    """RFC 6464 client-to-mixer audio level: (voice activity, dBov from 0 (loudest) down to -127)."""
    if len(value) < 1:
        raise RtpError("audio level element is empty")
    b = value[0]
    return b >= 0x80, -(b & 0x7F)


def abs_send_time(value: _Buffer) -> int:
    """abs-send-time: 24 bits, 6.18 fixed-point seconds (wraps every 64 s)."""
    if len(value) != 3:
        raise RtpError(f"abs-send-time is 3 bytes, not {len(value)}")
    return (value[0] << 16) | (value[1] << 8) | value[2]


def transport_seq(value: _Buffer) -> int:
    """Transport-wide sequence number (draft-holmer-rmcat-transport-wide-cc-extensions-01 §2)."""
    # A later revision of the extension appends 2 bytes of feedback request; the number stays in front.
    if len(value) < 2:
        raise RtpError(f"transport-wide sequence number is 2 bytes, not {len(value)}")
    return (value[0] << 8) | value[1]


# --- RTX (RFC 4588) -----------------------------------------------------------------------------------------


def rtx_wrap(pkt: _Buffer, rtx_ssrc: int, rtx_seq: int, rtx_pt: int) -> bytearray:
    """The retransmission of `pkt` on an RTX stream: original sequence number in front of the payload.

    CSRCs and header extensions carry over as they are; the original padding does not (it is not payload).
    """
    start = payload_offset(pkt)
    end = payload_end(pkt)
    with memoryview(pkt) as view:
        out = bytearray(view[:start])
        out += view[2:4]
        out += view[start:end]
    out[0] &= 0xDF
    out[1] = (out[1] & 0x80) | (rtx_pt & 0x7F)
    _U16.pack_into(out, 2, rtx_seq & 0xFFFF)
    _U32.pack_into(out, 8, rtx_ssrc & 0xFFFFFFFF)
    return out


def rtx_unwrap(pkt: _Buffer, original_pt: int, original_ssrc: int | None = None) -> bytearray:
    """The original packet inside an RTX packet; the SSRC stays the RTX one unless `original_ssrc` is given.

    Raises RtpError for an RTX packet with no original sequence number, which is what padding-only bandwidth
    probes on the RTX stream look like.
    """
    start = payload_offset(pkt)
    end = payload_end(pkt)
    if end - start < 2:
        raise RtpError("RTX packet without an original sequence number")
    with memoryview(pkt) as view:
        out = bytearray(view[:start])
        out += view[start + 2 : end]
        out[2:4] = view[start : start + 2]
    out[0] &= 0xDF
    out[1] = (out[1] & 0x80) | (original_pt & 0x7F)
    if original_ssrc is not None:
        _U32.pack_into(out, 8, original_ssrc & 0xFFFFFFFF)
    return out


# --- wrap-around arithmetic ---------------------------------------------------------------------------------


def seq_diff(a: int, b: int) -> int:
    """a - b for 16-bit sequence numbers, in [-32768, 32767]."""
    return ((a - b + 0x8000) & 0xFFFF) - 0x8000


def seq_newer(a: int, b: int) -> bool:
    """True when a comes after b; of two numbers exactly half the space apart, neither is newer."""
    return 0 < ((a - b) & 0xFFFF) < 0x8000


def ts_diff(a: int, b: int) -> int:
    """a - b for 32-bit RTP timestamps, in [-2**31, 2**31 - 1]."""
    return ((a - b + 0x80000000) & 0xFFFFFFFF) - 0x80000000


def ts_newer(a: int, b: int) -> bool:
    return 0 < ((a - b) & 0xFFFFFFFF) < 0x80000000


class _Unwrapper:
    """Extends wrapping counters to unbounded ones, taking each new value as the nearest to the highest seen.

    A late packet from before a wrap comes back below the highest (reordering is not a new cycle); one from
    before the very first value can come back negative.
    """

    __slots__ = ("_highest",)
    _MASK = 0
    _HALF = 0

    def __init__(self) -> None:
        self._highest: int | None = None

    @property
    def highest(self) -> int | None:
        """The highest extended value seen so far."""
        return self._highest

    def extend(self, value: int) -> int:
        """The extended value of `value`, without remembering it."""
        h = self._highest
        if h is None:
            return value
        return h + (((value - h + self._HALF) & self._MASK) - self._HALF)

    def update(self, value: int) -> int:
        """The extended value of `value`; moves the highest forward when it is newer."""
        h = self._highest
        if h is None:
            self._highest = value
            return value
        ext = h + (((value - h + self._HALF) & self._MASK) - self._HALF)
        if ext > h:
            self._highest = ext
        return ext


class ExtendedSeq(_Unwrapper):
    """16-bit RTP sequence numbers to an unbounded count (RFC 3550's cycles * 65536 + seq)."""

    __slots__ = ()
    _MASK = 0xFFFF
    _HALF = 0x8000


class ExtendedTimestamp(_Unwrapper):
    """32-bit RTP timestamps to an unbounded count."""

    __slots__ = ()
    _MASK = 0xFFFFFFFF
    _HALF = 0x80000000


# --- the readable form --------------------------------------------------------------------------------------


@dataclass(slots=True)
class RtpPacket:
    """An RTP packet as fields, for tests and code off the forwarding path.

    `extension_profile` is None for no header extension (X bit clear). For the RFC 8285 profiles the elements
    live in `extensions`; for any other profile the raw block lives in `extension_data`. `padding` counts the
    padding bytes (0 for none). `serialize(parse(b))` may differ from `b` (padding inside the extension block,
    duplicate ids, non-zero padding bytes), but `parse(p.serialize()) == p` for packets this class writes.
    """

    payload_type: int = 0
    seq: int = 0
    timestamp: int = 0
    ssrc: int = 0
    payload: bytes = b""
    marker: bool = False
    csrcs: list[int] = field(default_factory=list)
    extension_profile: int | None = None
    extensions: dict[int, bytes] = field(default_factory=dict)
    extension_data: bytes = b""
    padding: int = 0
    version: int = 2

    @classmethod
    def parse(cls, data: _Buffer) -> RtpPacket:
        start = payload_offset(data)
        end = payload_end(data)
        b0, b1, sequence, ts, source = _FIXED.unpack_from(data, 0)
        cc = b0 & 0x0F
        csrcs = list(struct.unpack_from(f"!{cc}I", data, HEADER_SIZE)) if cc else []
        profile = None
        elements: dict[int, bytes] = {}
        raw = b""
        if b0 & 0x10:
            at = HEADER_SIZE + cc * 4
            profile = (data[at] << 8) | data[at + 1]
            if profile == ONE_BYTE_PROFILE or profile & 0xFFF0 == TWO_BYTE_PROFILE:
                elements = _elements(data, profile, at + 4, start)
            else:
                raw = bytes(data[at + 4 : start])
        return cls(
            payload_type=b1 & 0x7F,
            seq=sequence,
            timestamp=ts,
            ssrc=source,
            payload=bytes(data[start:end]),
            marker=bool(b1 & 0x80),
            csrcs=csrcs,
            extension_profile=profile,
            extensions=elements,
            extension_data=raw,
            padding=len(data) - end,
            version=b0 >> 6,
        )

    def _extension_block(self) -> bytes | None:
        profile = self.extension_profile
        if profile is None:
            if not self.extensions:
                return None
            fits_one_byte = all(1 <= k <= 14 and 1 <= len(v) <= 16 for k, v in self.extensions.items())
            profile = ONE_BYTE_PROFILE if fits_one_byte else TWO_BYTE_PROFILE
        body = bytearray()
        if profile == ONE_BYTE_PROFILE:
            for eid, value in self.extensions.items():
                if not 1 <= eid <= 14 or not 1 <= len(value) <= 16:
                    raise RtpError(f"one-byte header extensions take ids 1-14 and 1-16 bytes, not {eid}")
                body.append((eid << 4) | (len(value) - 1))
                body += value
        elif profile & 0xFFF0 == TWO_BYTE_PROFILE:
            for eid, value in self.extensions.items():
                if not 1 <= eid <= 255 or len(value) > 255:
                    raise RtpError(f"two-byte header extensions take ids 1-255 and 0-255 bytes, not {eid}")
                body.append(eid)
                body.append(len(value))
                body += value
        else:
            if self.extensions:
                raise RtpError(f"profile {profile:#06x} is not RFC 8285's: put the block in extension_data")
            body += self.extension_data
        body += bytes(-len(body) % 4)
        if len(body) > 0xFFFF * 4:
            raise RtpError("header extension block too long")
        return _U16.pack(profile) + _U16.pack(len(body) // 4) + bytes(body)

    def serialize(self) -> bytes:
        if not 0 <= self.version <= 3 or len(self.csrcs) > 15 or not 0 <= self.padding <= 255:
            raise RtpError("version, CSRC count or padding out of range")
        if not 0 <= self.payload_type <= 127:
            raise RtpError(f"payload type {self.payload_type} out of range")
        block = self._extension_block()
        b0 = (self.version << 6) | len(self.csrcs)
        if self.padding:
            b0 |= 0x20
        if block is not None:
            b0 |= 0x10
        try:
            out = bytearray(
                _FIXED.pack(
                    b0,
                    (0x80 if self.marker else 0) | self.payload_type,
                    self.seq,
                    self.timestamp,
                    self.ssrc,
                )
            )
            for csrc in self.csrcs:
                out += _U32.pack(csrc)
        except struct.error as exc:
            raise RtpError(f"field out of range: {exc}") from None
        if block is not None:
            out += block
        out += self.payload
        if self.padding:
            out += bytes(self.padding - 1)
            out.append(self.padding)
        return bytes(out)
