"""Compound RTCP packets as they arrive decrypted (huddle/rtc/rtcp.py).

Documented error: RtcpError only. Also checked: every packet `parse_compound` returns serializes, and parsing
that again gives the same packets, except transport-cc feedback of over 4096 statuses: the server only parses
feedback, and re-encoding 65535 statuses under instrumentation passes the 1 s hang limit (20 ms without).
"""

from __future__ import annotations

from huddle.rtc import rtcp

MAX_LEN = 2048
_ROUND_TRIP_STATUSES = 4096


def one_input(data: bytes) -> None:
    try:
        packets = rtcp.parse_compound(data)
    except rtcp.RtcpError:
        return
    if any(isinstance(p, rtcp.TransportCC) and p.packet_status_count > _ROUND_TRIP_STATUSES for p in packets):
        return
    for packet in packets:
        if isinstance(packet, rtcp.GenericNack):
            packet.lost  # noqa: B018 - what the SFU reads to resend
        elif isinstance(packet, rtcp.TransportCC):
            packet.arrivals()
        elif isinstance(packet, rtcp.Sdes):
            for chunk in packet.chunks:
                chunk.cname  # noqa: B018
    if rtcp.parse_compound(rtcp.serialize(packets)) != packets:
        raise AssertionError("parse_compound(serialize(packets)) differs from packets")
