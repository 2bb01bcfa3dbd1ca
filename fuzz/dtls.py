"""DTLS datagrams on the media port (huddle/rtc/dtls.py), fed to a fresh server-side endpoint.

The input is a run of datagrams framed as ICE-TCP frames them (RFC 4571: a 2-byte length before each); a
frame cut short is sent as what is left. Documented errors: none. `check_framing` and `pack_records` return,
and garbage never raises out of `receive_datagram` or `handle_timeout` (it is ignored and counted, or ends the
association with Failed). Also checked: `pack_records` never loses or reorders a byte.
"""

from __future__ import annotations

from huddle.rtc.certificate import Certificate
from huddle.rtc.dtls import DtlsEndpoint, check_framing, pack_records

MAX_LEN = 4096
_CERTIFICATE = Certificate.generate()
_PEER_FINGERPRINT = ":".join(["AB"] * 32)


def _datagrams(data: bytes) -> list[bytes]:
    out = []
    at = 0
    while at < len(data):
        size = int.from_bytes(data[at : at + 2], "big")
        out.append(data[at + 2 : at + 2 + size])
        at += 2 + size
    return out


def one_input(data: bytes) -> None:
    endpoint = DtlsEndpoint(_CERTIFICATE, _PEER_FINGERPRINT, role="server")
    now = 0.0
    for datagram in _datagrams(data):
        check_framing(datagram)
        if b"".join(pack_records(datagram, 256)) != datagram:
            raise AssertionError("pack_records lost or reordered bytes")
        endpoint.receive_datagram(datagram, now)
        endpoint.datagrams_to_send()
        while endpoint.next_event() is not None:
            pass
        now += 0.1
    endpoint.handle_timeout(now + 1.0)
    endpoint.handle_timeout(now + 60.0)
    endpoint.close()
