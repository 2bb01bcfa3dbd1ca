"""VP8 payload descriptors of published video (huddle/sfu/vp8.py), alone and inside an RTP packet.

Documented errors: none; every function returns (0, None or False for what it cannot read). Also checked:
`descriptor_size`, `parse_descriptor` and `is_keyframe_start` agree, since the SFU uses them side by side.
"""

from __future__ import annotations

from huddle.rtc import rtp
from huddle.sfu import vp8

MAX_LEN = 2048


def _check(payload: bytes) -> None:
    size = vp8.descriptor_size(payload)
    info = vp8.parse_descriptor(payload)
    if (info.size if info is not None else 0) != size:
        raise AssertionError(f"descriptor_size {size} but parse_descriptor {info}")
    if vp8.is_keyframe_start(payload) != (info is not None and info.is_keyframe):
        raise AssertionError("is_keyframe_start disagrees with parse_descriptor")
    if info is not None:
        vp8.keyframe_width(payload, info.size, len(payload))
    buf = bytearray(payload)
    vp8.set_picture_id(buf, 0, 0x7FFF)
    vp8.set_tl0picidx(buf, 0, 0xFF)
    if len(buf) != len(payload):
        raise AssertionError("a rewrite changed the payload's length")


def one_input(data: bytes) -> None:
    _check(data)
    try:
        start, end = rtp.payload_offset(data), rtp.payload_end(data)
    except rtp.RtpError:
        return
    info = vp8.parse_descriptor(data, start, end)
    if info != vp8.parse_descriptor(data[start:end]):
        raise AssertionError("parse_descriptor in place differs from parse_descriptor of the slice")
    buf = bytearray(data)
    vp8.set_picture_id(buf, start, 1)
    vp8.set_tl0picidx(buf, start, 1)
