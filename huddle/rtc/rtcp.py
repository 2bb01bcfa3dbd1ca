"""RTCP (RFC 3550, RFC 4585, RFC 5104) as dataclasses: parse a compound packet, serialize a list of packets.

Known here: sender and receiver reports with their report blocks, SDES, BYE, generic NACK, transport-wide
congestion control feedback (draft-holmer-rmcat-transport-wide-cc-extensions-01), PLI, FIR and REMB
(draft-alvestrand-rmcat-remb). Any other packet, and a feedback message of another FMT, comes back as
`UnknownRtcp` holding its bytes, so a compound packet never fails on something new.

`parse_compound` raises `RtcpError` and nothing else; a known packet type whose body does not fit its layout
is malformed, not unknown. Chromium mishandled transport-cc feedback inside a compound packet in one report:
send `TransportCC` on its own.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

__all__ = [
    "BYE",
    "PSFB",
    "RR",
    "RTPFB",
    "SDES",
    "SR",
    "Bye",
    "Fir",
    "GenericNack",
    "Pli",
    "ReceiverReport",
    "Remb",
    "ReportBlock",
    "RtcpError",
    "RtcpPacket",
    "Sdes",
    "SdesChunk",
    "SenderReport",
    "TransportCC",
    "UnknownRtcp",
    "compact_from_seconds",
    "compact_to_seconds",
    "ntp_compact",
    "ntp_from_unix",
    "ntp_now",
    "ntp_to_unix",
    "parse_compound",
    "round_trip_time",
    "serialize",
]

SR = 200
RR = 201
SDES = 202
BYE = 203
RTPFB = 205  # transport-layer feedback (RFC 4585 §6.2)
PSFB = 206  # payload-specific feedback (RFC 4585 §6.3)

_NACK_FMT = 1
_TWCC_FMT = 15
_PLI_FMT = 1
_FIR_FMT = 4
_AFB_FMT = 15  # application-layer feedback; REMB is one, told apart by its identifier

_SDES_END = 0
_SDES_CNAME = 1

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_II = struct.Struct("!II")
_REPORT = struct.Struct("!IIIIII")
_SENDER_INFO = struct.Struct("!IQIII")


class RtcpError(ValueError):
    """Bytes that are not well-formed RTCP, or a packet whose fields do not fit the wire format."""


def _header(count: int, packet_type: int, body_len: int, padding: int = 0) -> bytes:
    """The 4-byte common header; `body_len` excludes the header and includes any padding."""
    if not 0 <= count <= 31:
        raise RtcpError(f"count {count} does not fit the 5-bit field")
    if body_len % 4:
        raise RtcpError("RTCP packets are whole 32-bit words")
    words = body_len // 4
    if words > 0xFFFF:
        raise RtcpError("RTCP packet too long")
    return bytes((0x80 | (0x20 if padding else 0) | count, packet_type)) + _U16.pack(words)


def _packing(method: Callable[..., bytes]) -> Callable[..., bytes]:
    """Turn struct's range errors from out-of-range fields into RtcpError."""

    def wrapper(self: object) -> bytes:
        try:
            return method(self)
        except (struct.error, OverflowError, UnicodeEncodeError) as exc:
            raise RtcpError(f"{type(self).__name__}: field out of range ({exc})") from None

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


# --- reports ------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class ReportBlock:
    """One reception report (RFC 3550 §6.4.1). `packets_lost` is signed (24 bits: duplicates make it < 0)."""

    ssrc: int
    fraction_lost: int = 0
    packets_lost: int = 0
    highest_seq: int = 0
    jitter: int = 0
    lsr: int = 0
    dlsr: int = 0

    SIZE: ClassVar[int] = 24

    @classmethod
    def _parse(cls, body: bytes, at: int) -> ReportBlock:
        source, loss, highest, jitter, lsr, dlsr = _REPORT.unpack_from(body, at)
        lost = loss & 0xFFFFFF
        if lost & 0x800000:
            lost -= 1 << 24
        return cls(source, loss >> 24, lost, highest, jitter, lsr, dlsr)

    def _pack(self) -> bytes:
        if not 0 <= self.fraction_lost <= 255 or not -(1 << 23) <= self.packets_lost < 1 << 23:
            raise RtcpError("fraction lost or cumulative packets lost out of range")
        loss = (self.fraction_lost << 24) | (self.packets_lost & 0xFFFFFF)
        return _REPORT.pack(self.ssrc, loss, self.highest_seq, self.jitter, self.lsr, self.dlsr)


def _parse_blocks(body: bytes, at: int, count: int) -> list[ReportBlock]:
    if at + count * ReportBlock.SIZE > len(body):
        raise RtcpError(f"{count} report blocks do not fit the packet")
    return [ReportBlock._parse(body, at + i * ReportBlock.SIZE) for i in range(count)]


def _extension(body: bytes, count: int, at: int) -> bytes:
    """The profile-specific extension after the report blocks; whole words, like everything in a report."""
    extension = body[at + count * ReportBlock.SIZE :]
    if len(extension) % 4:
        raise RtcpError("report ends partway through a 32-bit word")
    return extension


@dataclass(slots=True)
class SenderReport:
    """SR (RFC 3550 §6.4.1). `ntp_timestamp` is the full 64-bit NTP time; `extension` is profile-specific."""

    ssrc: int
    ntp_timestamp: int = 0
    rtp_timestamp: int = 0
    packet_count: int = 0
    octet_count: int = 0
    reports: list[ReportBlock] = field(default_factory=list)
    extension: bytes = b""

    @classmethod
    def _parse(cls, count: int, body: bytes) -> SenderReport:
        if len(body) < _SENDER_INFO.size:
            raise RtcpError("SR shorter than its sender info")
        source, ntp, rtp_ts, packets, octets = _SENDER_INFO.unpack_from(body, 0)
        reports = _parse_blocks(body, _SENDER_INFO.size, count)
        return cls(source, ntp, rtp_ts, packets, octets, reports, _extension(body, count, _SENDER_INFO.size))

    @_packing
    def serialize(self) -> bytes:
        body = _SENDER_INFO.pack(
            self.ssrc, self.ntp_timestamp, self.rtp_timestamp, self.packet_count, self.octet_count
        )
        body += b"".join(block._pack() for block in self.reports) + self.extension
        return _header(len(self.reports), SR, len(body)) + body


@dataclass(slots=True)
class ReceiverReport:
    """RR (RFC 3550 §6.4.2)."""

    ssrc: int
    reports: list[ReportBlock] = field(default_factory=list)
    extension: bytes = b""

    @classmethod
    def _parse(cls, count: int, body: bytes) -> ReceiverReport:
        if len(body) < 4:
            raise RtcpError("RR shorter than its SSRC")
        reports = _parse_blocks(body, 4, count)
        return cls(_U32.unpack_from(body, 0)[0], reports, _extension(body, count, 4))

    @_packing
    def serialize(self) -> bytes:
        body = _U32.pack(self.ssrc) + b"".join(block._pack() for block in self.reports) + self.extension
        return _header(len(self.reports), RR, len(body)) + body


# --- SDES and BYE -------------------------------------------------------------------------------------------


@dataclass(slots=True)
class SdesChunk:
    """One SSRC's items, as (item type, value) pairs in wire order."""

    ssrc: int
    items: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def cname(self) -> str | None:
        for kind, value in self.items:
            if kind == _SDES_CNAME:
                return value.decode("utf-8", "replace")
        return None


@dataclass(slots=True)
class Sdes:
    """SDES (RFC 3550 §6.5)."""

    chunks: list[SdesChunk] = field(default_factory=list)

    @classmethod
    def for_cname(cls, ssrc: int, cname: str) -> Sdes:
        return cls([SdesChunk(ssrc, [(_SDES_CNAME, cname.encode())])])

    @classmethod
    def _parse(cls, count: int, body: bytes) -> Sdes:
        chunks = []
        at = 0
        n = len(body)
        for _ in range(count):
            if at + 4 > n:
                raise RtcpError("SDES chunk runs past the packet")
            chunk = SdesChunk(_U32.unpack_from(body, at)[0])
            at += 4
            while True:
                if at >= n:
                    raise RtcpError("SDES chunk without its end item")
                kind = body[at]
                if kind == _SDES_END:
                    # The end item's null octet plus nulls up to the next 32-bit boundary.
                    at = (at + 4) & ~3
                    break
                if at + 2 > n or at + 2 + body[at + 1] > n:
                    raise RtcpError("SDES item runs past the packet")
                size = body[at + 1]
                chunk.items.append((kind, body[at + 2 : at + 2 + size]))
                at += 2 + size
            chunks.append(chunk)
        return cls(chunks)

    @_packing
    def serialize(self) -> bytes:
        body = bytearray()
        for chunk in self.chunks:
            body += _U32.pack(chunk.ssrc)
            for kind, value in chunk.items:
                if not 1 <= kind <= 255 or len(value) > 255:
                    raise RtcpError("SDES item type must be 1-255 and its value at most 255 bytes")
                body.append(kind)
                body.append(len(value))
                body += value
            body += bytes(4 - len(body) % 4)  # at least one null octet ends the item list
        return _header(len(self.chunks), SDES, len(body)) + bytes(body)


@dataclass(slots=True)
class Bye:
    """BYE (RFC 3550 §6.6)."""

    ssrcs: list[int] = field(default_factory=list)
    reason: str = ""

    @classmethod
    def _parse(cls, count: int, body: bytes) -> Bye:
        end = count * 4
        if end > len(body):
            raise RtcpError(f"{count} SSRCs do not fit the BYE")
        ssrcs = list(struct.unpack_from(f"!{count}I", body, 0))
        reason = ""
        if end < len(body):
            size = body[end]
            if end + 1 + size > len(body):
                raise RtcpError("BYE reason runs past the packet")
            # surrogateescape: a reason that is not UTF-8 still serializes back to the bytes it came as.
            reason = body[end + 1 : end + 1 + size].decode("utf-8", "surrogateescape")
        return cls(ssrcs, reason)

    @_packing
    def serialize(self) -> bytes:
        body = bytearray(struct.pack(f"!{len(self.ssrcs)}I", *self.ssrcs))
        if self.reason:
            text = self.reason.encode("utf-8", "surrogateescape")
            if len(text) > 255:
                raise RtcpError("BYE reason longer than 255 bytes")
            body.append(len(text))
            body += text
            body += bytes(-len(body) % 4)
        return _header(len(self.ssrcs), BYE, len(body)) + bytes(body)


# --- transport-layer feedback -------------------------------------------------------------------------------


def _fb_header(fmt: int, packet_type: int, sender_ssrc: int, media_ssrc: int, fci_len: int) -> bytes:
    return _header(fmt, packet_type, 8 + fci_len) + _II.pack(sender_ssrc, media_ssrc)


@dataclass(slots=True)
class GenericNack:
    """Generic NACK (RFC 4585 §6.2.1) as its (PID, BLP) pairs; `lost` lists the sequence numbers they name."""

    sender_ssrc: int
    media_ssrc: int
    pairs: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def from_seqs(cls, sender_ssrc: int, media_ssrc: int, seqs: Iterable[int]) -> GenericNack:
        """Pack lost sequence numbers into as few (PID, BLP) pairs as a greedy pass allows, across 65535→0."""
        unique = list(dict.fromkeys(s & 0xFFFF for s in seqs))
        if not unique:
            return cls(sender_ssrc, media_ssrc, [])
        ref = unique[0]
        # Order by distance from the first, so a list that crosses the wrap stays in sending order.
        unique.sort(key=lambda s: ((s - ref + 0x8000) & 0xFFFF) - 0x8000)
        pairs: list[tuple[int, int]] = []
        pid = unique[0]
        blp = 0
        for s in unique[1:]:
            distance = (s - pid) & 0xFFFF
            if distance <= 16:
                blp |= 1 << (distance - 1)
            else:
                pairs.append((pid, blp))
                pid, blp = s, 0
        pairs.append((pid, blp))
        return cls(sender_ssrc, media_ssrc, pairs)

    @property
    def lost(self) -> list[int]:
        seqs: dict[int, None] = {}
        for pid, blp in self.pairs:
            seqs[pid] = None
            for bit in range(16):
                if blp >> bit & 1:
                    seqs[(pid + bit + 1) & 0xFFFF] = None
        return list(seqs)

    @classmethod
    def _parse(cls, body: bytes) -> GenericNack:
        if len(body) % 4:
            raise RtcpError("generic NACK FCI is not whole (PID, BLP) pairs")
        sender, media = _II.unpack_from(body, 0)
        pairs = [(body[i] << 8 | body[i + 1], body[i + 2] << 8 | body[i + 3]) for i in range(8, len(body), 4)]
        return cls(sender, media, pairs)

    @_packing
    def serialize(self) -> bytes:
        fci = b"".join(struct.pack("!HH", pid, blp) for pid, blp in self.pairs)
        return _fb_header(_NACK_FMT, RTPFB, self.sender_ssrc, self.media_ssrc, len(fci)) + fci


@dataclass(slots=True)
class TransportCC:
    """Transport-wide congestion control feedback (draft-holmer-rmcat-transport-wide-cc-extensions-01 §3.1).

    `statuses` holds one symbol per packet from `base_seq` on (NOT_RECEIVED, SMALL_DELTA, LARGE_DELTA);
    `deltas` one receive delta in 250 µs ticks per received packet, the first relative to `reference_time`
    (signed 24 bits, in 64 ms units). Build one with `from_arrivals`, read it with `arrivals`.
    """

    sender_ssrc: int
    media_ssrc: int
    base_seq: int = 0
    reference_time: int = 0
    fb_count: int = 0
    statuses: list[int] = field(default_factory=list)
    deltas: list[int] = field(default_factory=list)

    NOT_RECEIVED: ClassVar[int] = 0
    SMALL_DELTA: ClassVar[int] = 1
    LARGE_DELTA: ClassVar[int] = 2
    TICK_US: ClassVar[int] = 250
    REFERENCE_US: ClassVar[int] = 64_000

    @property
    def packet_status_count(self) -> int:
        return len(self.statuses)

    @classmethod
    def from_arrivals(
        cls,
        sender_ssrc: int,
        media_ssrc: int,
        fb_count: int,
        packets: Iterable[tuple[int, int | None]],
    ) -> TransportCC:
        """Feedback for (transport-wide seq, arrival time in µs or None for lost) pairs.

        Sequence numbers missing from a run count as not received. Arrival times are floored to 250 µs ticks
        of one clock, so rounding never accumulates. Raises RtcpError when the packets span more than half the
        sequence space or two consecutive arrivals are more than 8 s apart (start a new feedback then).
        """
        arrivals: dict[int, int | None] = {}
        for s, at in packets:
            arrivals[s & 0xFFFF] = at
        if not arrivals:
            raise RtcpError("transport-cc feedback needs at least one packet")
        ref = next(iter(arrivals))
        offsets = {((s - ref + 0x8000) & 0xFFFF) - 0x8000: at for s, at in arrivals.items()}
        low, high = min(offsets), max(offsets)
        base = (ref + low) & 0xFFFF
        received = [offsets.get(o) for o in range(low, high + 1)]
        first = next((at for at in received if at is not None), 0)
        reference = int(first // cls.REFERENCE_US)
        ticks = reference * (cls.REFERENCE_US // cls.TICK_US)
        statuses: list[int] = []
        deltas: list[int] = []
        for at in received:
            if at is None:
                statuses.append(cls.NOT_RECEIVED)
                continue
            now = int(at // cls.TICK_US)  # float clocks welcome; the wire takes whole ticks
            delta = now - ticks
            ticks = now
            if 0 <= delta <= 0xFF:
                statuses.append(cls.SMALL_DELTA)
            elif -0x8000 <= delta <= 0x7FFF:
                statuses.append(cls.LARGE_DELTA)
            else:
                raise RtcpError(f"receive delta of {delta * cls.TICK_US} µs does not fit 16 bits")
            deltas.append(delta)
        reference = ((reference + 0x800000) & 0xFFFFFF) - 0x800000
        return cls(sender_ssrc, media_ssrc, base, reference, fb_count & 0xFF, statuses, deltas)

    def arrivals(self) -> list[tuple[int, int | None]]:
        """(transport-wide seq, arrival time in µs or None) per packet, in the feedback's own time base."""
        ticks = self.reference_time * (self.REFERENCE_US // self.TICK_US)
        out: list[tuple[int, int | None]] = []
        deltas = iter(self.deltas)
        for i, status in enumerate(self.statuses):
            s = (self.base_seq + i) & 0xFFFF
            if status == self.NOT_RECEIVED:
                out.append((s, None))
            else:
                ticks += next(deltas)
                out.append((s, ticks * self.TICK_US))
        return out

    @classmethod
    def _parse(cls, body: bytes) -> TransportCC:
        n = len(body)
        if n < 16:
            raise RtcpError("transport-cc feedback shorter than its fixed fields")
        sender, media, base, count, word = struct.unpack_from("!IIHHI", body, 0)
        reference = word >> 8
        if reference & 0x800000:
            reference -= 1 << 24
        statuses: list[int] = []
        at = 16
        while len(statuses) < count:
            if at + 2 > n:
                raise RtcpError("transport-cc packet chunks end before the packet status count")
            chunk = body[at] << 8 | body[at + 1]
            at += 2
            if chunk < 0x8000:  # run length: symbol in bits 13-14, run in bits 0-12
                statuses.extend([(chunk >> 13) & 0x3] * min(chunk & 0x1FFF, count - len(statuses)))
            elif chunk < 0xC000:  # fourteen 1-bit symbols
                statuses.extend((chunk >> shift) & 1 for shift in range(13, -1, -1))
            else:  # seven 2-bit symbols
                statuses.extend((chunk >> shift) & 3 for shift in range(12, -1, -2))
        del statuses[count:]
        deltas: list[int] = []
        # 40 bytes can report 65535 packets not received: skip those in C, or each such packet costs ms.
        for status in filter(None, statuses):
            if status == cls.SMALL_DELTA:
                if at + 1 > n:
                    raise RtcpError("transport-cc receive deltas end early")
                deltas.append(body[at])
                at += 1
            elif status == cls.LARGE_DELTA:
                if at + 2 > n:
                    raise RtcpError("transport-cc receive deltas end early")
                delta = body[at] << 8 | body[at + 1]
                deltas.append(delta - 0x10000 if delta & 0x8000 else delta)
                at += 2
            else:
                raise RtcpError("transport-cc status symbol 3 is reserved")
        return cls(sender, media, base, reference, word & 0xFF, statuses, deltas)

    def _chunks(self) -> bytearray:
        out = bytearray()
        symbols = self.statuses
        n = len(symbols)
        i = 0
        while i < n:
            first = symbols[i]
            run = 1
            while i + run < n and run < 0x1FFF and symbols[i + run] == first:
                run += 1
            if run >= 14 or i + run == n:
                out += _U16.pack((first << 13) | run)
                i += run
                continue
            window = symbols[i : i + 14]
            if max(window) <= 1:
                chunk = 0x8000
                for k, symbol in enumerate(window):
                    chunk |= symbol << (13 - k)
                i += len(window)
            else:
                window = symbols[i : i + 7]
                chunk = 0xC000
                for k, symbol in enumerate(window):
                    chunk |= symbol << (12 - 2 * k)
                i += len(window)
            out += _U16.pack(chunk)
        return out

    @_packing
    def serialize(self) -> bytes:
        if len(self.statuses) > 0xFFFF:
            raise RtcpError("more than 65535 packet statuses")
        received = [s for s in self.statuses if s != self.NOT_RECEIVED]
        if len(received) != len(self.deltas):
            raise RtcpError(f"{len(received)} received packets but {len(self.deltas)} receive deltas")
        if not -0x800000 <= self.reference_time <= 0x7FFFFF:
            raise RtcpError("reference time does not fit 24 bits")
        if not 0 <= self.fb_count <= 255:
            raise RtcpError("feedback packet count does not fit 8 bits")
        fci = bytearray(
            struct.pack(
                "!HHI",
                self.base_seq,
                len(self.statuses),
                ((self.reference_time & 0xFFFFFF) << 8) | self.fb_count,
            )
        )
        fci += self._chunks()
        for status, delta in zip(received, self.deltas, strict=True):
            if status == self.SMALL_DELTA:
                if not 0 <= delta <= 0xFF:
                    raise RtcpError(f"small delta {delta} out of 0-255")
                fci.append(delta)
            elif status == self.LARGE_DELTA:
                fci += struct.pack("!h", delta)
            else:
                raise RtcpError(f"status symbol {status} is not one transport-cc defines")
        # RFC 3550 padding (P bit, count in the last byte), which any RTCP parser strips before the FCI.
        pad = -(8 + len(fci)) % 4
        if pad:
            fci += bytes(pad - 1)
            fci.append(pad)
        head = _header(_TWCC_FMT, RTPFB, 8 + len(fci), padding=pad)
        return head + _II.pack(self.sender_ssrc, self.media_ssrc) + bytes(fci)


# --- payload-specific feedback ------------------------------------------------------------------------------


@dataclass(slots=True)
class Pli:
    """Picture loss indication (RFC 4585 §6.3.1): asks the sender of `media_ssrc` for a keyframe."""

    sender_ssrc: int
    media_ssrc: int

    @classmethod
    def _parse(cls, body: bytes) -> Pli:
        if len(body) != 8:
            raise RtcpError("PLI carries no FCI")
        return cls(*_II.unpack(body))

    @_packing
    def serialize(self) -> bytes:
        return _fb_header(_PLI_FMT, PSFB, self.sender_ssrc, self.media_ssrc, 0)


@dataclass(slots=True)
class Fir:
    """Full intra request (RFC 5104 §4.3.1): (media SSRC, command sequence number) entries."""

    sender_ssrc: int
    entries: list[tuple[int, int]] = field(default_factory=list)
    media_ssrc: int = 0  # RFC 5104 says 0; the targets are in the entries

    @classmethod
    def _parse(cls, body: bytes) -> Fir:
        if len(body) % 8:
            raise RtcpError("FIR FCI is not whole 8-byte entries")
        sender, media = _II.unpack_from(body, 0)
        entries = [(_U32.unpack_from(body, i)[0], body[i + 4]) for i in range(8, len(body), 8)]
        return cls(sender, entries, media)

    @_packing
    def serialize(self) -> bytes:
        fci = b"".join(struct.pack("!IB3x", target, seq_nr) for target, seq_nr in self.entries)
        return _fb_header(_FIR_FMT, PSFB, self.sender_ssrc, self.media_ssrc, len(fci)) + fci


@dataclass(slots=True)
class Remb:
    """Receiver estimated maximum bitrate (draft-alvestrand-rmcat-remb), in bits per second.

    The wire carries an 18-bit mantissa and a 6-bit exponent, so a bitrate past 2**18 is rounded down to what
    they can say; `serialize(parse(b))` can differ from a `b` that spelled its bitrate with a larger exponent.
    """

    sender_ssrc: int
    bitrate: int
    ssrcs: list[int] = field(default_factory=list)
    media_ssrc: int = 0  # the draft says 0; the streams are in `ssrcs`

    IDENTIFIER: ClassVar[bytes] = b"REMB"

    @classmethod
    def _parse(cls, body: bytes) -> Remb:
        if len(body) < 16:
            raise RtcpError("REMB shorter than its fixed fields")
        sender, media, _, word = struct.unpack_from("!II4sI", body, 0)
        count = word >> 24
        if len(body) != 16 + 4 * count:
            raise RtcpError(f"REMB says {count} SSRCs but carries {(len(body) - 16) // 4}")
        exponent = (word >> 18) & 0x3F
        mantissa = word & 0x3FFFF
        ssrcs = list(struct.unpack_from(f"!{count}I", body, 16))
        return cls(sender, mantissa << exponent, ssrcs, media)

    @_packing
    def serialize(self) -> bytes:
        if self.bitrate < 0:
            raise RtcpError("negative bitrate")
        if len(self.ssrcs) > 255:
            raise RtcpError("REMB carries at most 255 SSRCs")
        exponent = max(0, self.bitrate.bit_length() - 18)
        if exponent > 0x3F:
            raise RtcpError("bitrate beyond what REMB can express")
        word = (len(self.ssrcs) << 24) | (exponent << 18) | (self.bitrate >> exponent)
        fci = self.IDENTIFIER + _U32.pack(word) + struct.pack(f"!{len(self.ssrcs)}I", *self.ssrcs)
        return _fb_header(_AFB_FMT, PSFB, self.sender_ssrc, self.media_ssrc, len(fci)) + fci


# --- everything else ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class UnknownRtcp:
    """A packet this module does not decode, kept whole (header and padding included) and sent back as is."""

    data: bytes

    @property
    def packet_type(self) -> int:
        return self.data[1]

    @property
    def count(self) -> int:
        """The 5-bit count field; the FMT for feedback messages."""
        return self.data[0] & 0x1F

    def serialize(self) -> bytes:
        return self.data


RtcpPacket = (
    SenderReport | ReceiverReport | Sdes | Bye | GenericNack | TransportCC | Pli | Fir | Remb | UnknownRtcp
)


def _parse_one(packet_type: int, count: int, body: bytes) -> RtcpPacket | None:
    """The decoded packet, or None when this module does not know it."""
    if packet_type == RTPFB or packet_type == PSFB:
        if len(body) < 8:
            raise RtcpError("feedback message shorter than its two SSRCs")
        if packet_type == RTPFB:
            if count == _NACK_FMT:
                return GenericNack._parse(body)
            if count == _TWCC_FMT:
                return TransportCC._parse(body)
            return None
        if count == _PLI_FMT:
            return Pli._parse(body)
        if count == _FIR_FMT:
            return Fir._parse(body)
        if count == _AFB_FMT and body[8:12] == Remb.IDENTIFIER:
            return Remb._parse(body)
        return None
    if packet_type == SR:
        return SenderReport._parse(count, body)
    if packet_type == RR:
        return ReceiverReport._parse(count, body)
    if packet_type == SDES:
        return Sdes._parse(count, body)
    if packet_type == BYE:
        return Bye._parse(count, body)
    return None


def parse_compound(data: bytes | bytearray | memoryview) -> list[RtcpPacket]:
    """Every packet of a compound RTCP packet, in order.

    Reduced-size RTCP (RFC 5506) is accepted: the first packet need not be a report. Padding is honoured on
    any packet, not only the last, since SRTCP does not care where it sits.
    """
    data = bytes(data)
    n = len(data)
    if n == 0:
        raise RtcpError("empty RTCP packet")
    packets: list[RtcpPacket] = []
    at = 0
    while at < n:
        if at + 4 > n:
            raise RtcpError("trailing bytes shorter than an RTCP header")
        b0 = data[at]
        if b0 >> 6 != 2:
            raise RtcpError(f"RTCP version {b0 >> 6}, not 2")
        packet_type = data[at + 1]
        end = at + 4 + (data[at + 2] << 8 | data[at + 3]) * 4
        if end > n:
            raise RtcpError("RTCP packet runs past the end of the datagram")
        body_end = end
        if b0 & 0x20:
            pad = data[end - 1] if end > at + 4 else 0
            if pad == 0 or pad > end - at - 4:
                raise RtcpError("RTCP padding count does not fit the packet")
            body_end -= pad
        try:
            packet = _parse_one(packet_type, b0 & 0x1F, data[at + 4 : body_end])
        except (struct.error, IndexError) as exc:
            raise RtcpError(f"malformed RTCP packet type {packet_type}: {exc}") from None
        packets.append(packet if packet is not None else UnknownRtcp(data[at:end]))
        at = end
    return packets


def serialize(packets: Sequence[RtcpPacket]) -> bytes:
    """A compound packet from the given packets, in order."""
    return b"".join(packet.serialize() for packet in packets)


# --- NTP time (RFC 3550 §4) ---------------------------------------------------------------------------------

_NTP_UNIX_OFFSET = 2_208_988_800  # seconds from 1900-01-01 (NTP's epoch) to 1970-01-01
_NS = 1_000_000_000


def ntp_now() -> int:
    """The current time as a 64-bit NTP timestamp (32.32 fixed-point seconds since 1900)."""
    seconds, ns = divmod(time.time_ns(), _NS)
    return (((seconds + _NTP_UNIX_OFFSET) & 0xFFFFFFFF) << 32) | ((ns << 32) // _NS)


def ntp_from_unix(seconds: float) -> int:
    return round((seconds + _NTP_UNIX_OFFSET) * (1 << 32)) & 0xFFFFFFFFFFFFFFFF


def ntp_to_unix(ntp: int) -> float:
    return ntp / (1 << 32) - _NTP_UNIX_OFFSET


def ntp_compact(ntp: int) -> int:
    """The middle 32 bits of an NTP timestamp (16.16 seconds): what a report block's LSR holds."""
    return (ntp >> 16) & 0xFFFFFFFF


def compact_from_seconds(seconds: float) -> int:
    """A duration in the 16.16 compact form: what a report block's DLSR holds."""
    return round(seconds * 65536) & 0xFFFFFFFF


def compact_to_seconds(compact: int) -> float:
    return compact / 65536


def round_trip_time(arrival_compact: int, lsr: int, dlsr: int) -> float | None:
    """RTT in seconds from a report block that arrived at `arrival_compact` (RFC 3550 §6.4.1: A - LSR - DLSR).

    None when the remote has not seen a sender report yet (LSR 0) or the clocks make the result negative.
    """
    if lsr == 0:
        return None
    rtt = (arrival_compact - lsr - dlsr) & 0xFFFFFFFF
    if rtt >= 0x80000000:
        return None
    return rtt / 65536
