"""The VP8 RTP payload descriptor (RFC 7741 §4.2), read without decoding any video.

The SFU needs to know where a keyframe starts (a Consumer begins forwarding there, so the subscriber's
decoder never sees a frame it cannot decode). Layer switching reads the picture id, TL0PICIDX and temporal
layer index with `parse_descriptor()`, and the per-subscriber rewrite (rewrite.py) patches the picture id and
TL0PICIDX in place with `set_picture_id()` / `set_tl0picidx()`.
"""

from __future__ import annotations

from dataclasses import dataclass


def descriptor_size(payload: bytes | bytearray | memoryview) -> int:
    """Bytes of payload descriptor before the VP8 payload; 0 when the payload is too short to hold one."""
    n = len(payload)
    if n < 1:
        return 0
    size = 1
    if payload[0] & 0x80:  # X: extension byte follows
        if n < 2:
            return 0
        ext = payload[1]
        size = 2
        if ext & 0x80:  # I: picture id, 7 or 15 bits
            if n <= size:
                return 0
            size += 2 if payload[size] & 0x80 else 1
        if ext & 0x40:  # L: TL0PICIDX
            size += 1
        if ext & 0x30:  # T or K: TID/Y/KEYIDX
            size += 1
    return size if size < n else 0


def is_keyframe_start(payload: bytes | bytearray | memoryview) -> bool:
    """True for the first packet of a keyframe: S set, partition 0, and the VP8 header's P bit clear."""
    # S set and partition index (the low 3 bits; 0x08 is reserved and ignored) zero.
    if not payload or not payload[0] & 0x10 or payload[0] & 0x07:
        return False
    size = descriptor_size(payload)
    return size > 0 and not payload[size] & 0x01


@dataclass(slots=True)
class Vp8Info:
    """The payload descriptor fields the SFU reads, from one packet (RFC 7741 §4.2).

    `picture_id`, `tl0picidx`, `tid` and `keyidx` are None when the descriptor does not carry them (`tid` and
    `layer_sync` come with the T bit, `keyidx` with the K bit). `size` is the descriptor's length: the VP8
    payload header starts `size` bytes into the payload.
    """

    start_of_partition: bool
    partition_index: int
    non_reference: bool
    picture_id: int | None
    picture_id_15bit: bool
    tl0picidx: int | None
    tid: int | None
    layer_sync: bool
    keyidx: int | None
    size: int
    is_keyframe: bool


def parse_descriptor(
    payload: bytes | bytearray | memoryview, start: int = 0, end: int | None = None
) -> Vp8Info | None:
    """The descriptor of the payload `payload[start:end]`; None when it is too short to hold one and a byte
    of VP8 payload (where `descriptor_size()` says 0).

    `start`/`end` let the caller parse the RTP packet itself (start = the RTP payload offset) without slicing.
    """
    if end is None:
        end = len(payload)
    if end - start < 2:
        return None
    b0 = payload[start]
    i = start + 1
    picture_id = tl0picidx = tid = keyidx = None
    m = False
    y = False
    if b0 & 0x80:  # X
        ext = payload[i]
        i += 1
        if ext & 0x80:  # I
            if i >= end:
                return None
            p = payload[i]
            if p & 0x80:  # M: 15-bit picture id
                if i + 1 >= end:
                    return None
                picture_id = ((p & 0x7F) << 8) | payload[i + 1]
                m = True
                i += 2
            else:
                picture_id = p
                i += 1
        if ext & 0x40:  # L
            if i >= end:
                return None
            tl0picidx = payload[i]
            i += 1
        if ext & 0x30:  # T or K: one shared octet |TID|Y|KEYIDX|
            if i >= end:
                return None
            b = payload[i]
            i += 1
            if ext & 0x20:
                tid = b >> 6
                y = b & 0x20 != 0
            if ext & 0x10:
                keyidx = b & 0x1F
    if i >= end:
        return None
    s = b0 & 0x10 != 0
    part = b0 & 0x07
    return Vp8Info(
        s,
        part,
        b0 & 0x20 != 0,
        picture_id,
        m,
        tl0picidx,
        tid,
        y,
        keyidx,
        i - start,
        s and part == 0 and not payload[i] & 0x01,
    )


def set_picture_id(buf: bytearray, offset: int, value: int) -> bool:
    """Overwrite the picture id of the descriptor at `buf[offset]` in place, in the width it already has
    (15 bits, or `value & 0x7F` for the 7-bit form); False when the descriptor carries none."""
    n = len(buf)
    if offset + 2 >= n or not buf[offset] & 0x80 or not buf[offset + 1] & 0x80:
        return False
    i = offset + 2
    if buf[i] & 0x80:
        if i + 1 >= n:
            return False
        buf[i] = 0x80 | ((value >> 8) & 0x7F)
        buf[i + 1] = value & 0xFF
    else:
        buf[i] = value & 0x7F
    return True


def set_tl0picidx(buf: bytearray, offset: int, value: int) -> bool:
    """Overwrite the TL0PICIDX of the descriptor at `buf[offset]` in place (8 bits, wrapping); False when the
    descriptor carries none."""
    n = len(buf)
    if offset + 1 >= n or not buf[offset] & 0x80:
        return False
    ext = buf[offset + 1]
    if not ext & 0x40:
        return False
    i = offset + 2
    if ext & 0x80:
        if i >= n:
            return False
        i += 2 if buf[i] & 0x80 else 1
    if i >= n:
        return False
    buf[i] = value & 0xFF
    return True


def keyframe_width(buf: bytes | bytearray | memoryview, start: int, end: int) -> int:
    """The frame width from a keyframe's VP8 payload header (RFC 6386 §9.1) at `buf[start:end]`, or 0.

    After the 3-byte frame tag a keyframe carries the start code 9d 01 2a and then 14 bits of width (little
    endian, 2 bits of scaling above them). The SFU reads it to know each simulcast layer's real size.
    """
    if end - start < 10 or buf[start] & 0x01 or buf[start + 3 : start + 6] != b"\x9d\x01\x2a":
        return 0
    return (buf[start + 6] | (buf[start + 7] << 8)) & 0x3FFF
