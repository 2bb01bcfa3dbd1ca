"""RTP packets as they arrive decrypted from publishers (huddle/rtc/rtp.py), as bytes, bytearray and view.

Documented error: RtpError only, from every reader and writer. Also checked: the in-place walker
(`extension`, `extension_offset`) agrees with the validating one (`extensions`) on any packet both accept,
and `RtpPacket.parse` of a packet it serialized gives the same packet back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from huddle.rtc import rtp

MAX_LEN = 2048
# One-byte ids 1-14 (15 is the end marker), and two-byte ids up to 255.
_IDS = (0, 1, 2, 3, 4, 5, 14, 15, 16, 255)
_VALUES: tuple[Callable[[Any], Any], ...] = (
    rtp.sdes_string,
    rtp.audio_level,
    rtp.abs_send_time,
    rtp.transport_seq,
)


def _quiet(function: Callable[..., Any], *args: Any) -> Any:
    try:
        return function(*args)
    except rtp.RtpError:
        return None


def _read(pkt: bytes | bytearray | memoryview) -> None:
    rtp.is_rtp(pkt)
    rtp.is_rtcp(pkt)
    for accessor in (rtp.seq, rtp.timestamp, rtp.ssrc, rtp.payload_type, rtp.marker):
        _quiet(accessor, pkt)
    _quiet(rtp.payload, pkt)
    every = _quiet(rtp.extensions, pkt)
    for ext_id in _IDS:
        value = _quiet(rtp.extension, pkt, ext_id)
        offset = _quiet(rtp.extension_offset, pkt, ext_id)
        if value is not None:
            for read in _VALUES:
                _quiet(read, value)
            if offset is None or bytes(pkt[offset : offset + len(value)]) != bytes(value):
                raise AssertionError(f"extension and extension_offset disagree on id {ext_id}")
        if every is not None and value is not None and every.get(ext_id) != bytes(value):
            raise AssertionError(f"extension and extensions disagree on id {ext_id}")
    _quiet(rtp.rtx_unwrap, pkt, 96, 0x1234)
    _quiet(rtp.rtx_wrap, pkt, 0x5678, 7, 97)


def _write(pkt: bytearray) -> None:
    size = len(pkt)
    for writer, value in (
        (rtp.set_seq, 0xFFFF),
        (rtp.set_timestamp, 1 << 33),
        (rtp.set_ssrc, -1),
        (rtp.set_payload_type, 200),
        (rtp.set_marker, True),
    ):
        _quiet(writer, pkt, value)
    _quiet(rtp.rewrite_header, pkt, 1, 2, 3)
    for ext_id in _IDS:
        _quiet(rtp.set_transport_seq, pkt, ext_id, 0xABCD)
        _quiet(rtp.set_extension_value, pkt, ext_id, b"\x01")
    if len(pkt) != size:
        raise AssertionError("a writer changed the packet's length")


def one_input(data: bytes) -> None:
    with memoryview(data) as view:
        for pkt in (data, bytearray(data), view):
            _read(pkt)
    _write(bytearray(data))
    packet = _quiet(rtp.RtpPacket.parse, data)
    if packet is None:
        return
    wire = _quiet(packet.serialize)
    if wire is not None and rtp.RtpPacket.parse(wire) != packet:
        raise AssertionError("RtpPacket.parse(p.serialize()) differs from p")
