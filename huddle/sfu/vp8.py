"""The VP8 RTP payload descriptor (RFC 7741 §4.2), read without decoding any video.

The SFU needs to know where a keyframe starts (a Consumer begins forwarding there, so the subscriber's
decoder never sees a frame it cannot decode); layer switching in a later step also reads the picture id,
TL0PICIDX and temporal layer index from here.
"""

from __future__ import annotations


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
