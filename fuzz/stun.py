"""STUN messages on the STUN server's port and the media port (huddle/stun/message.py and its callers).

Documented errors: `parse`, the `decode_*` helpers and `encode` raise StunError only; the server's `handle`,
`verify_*`, `has_fingerprint`, `username_ufrag` and an ICE check raise nothing. A message carrying
MESSAGE-INTEGRITY is also re-signed with the ICE password, so the check gets past integrity with fuzzed
attributes. Also checked: `parse(encode(m))` keeps every attribute of `m`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from huddle.rtc.ice import IceLite, username_ufrag
from huddle.stun import message as stun
from huddle.stun import server

MAX_LEN = 4096
_PWD = "0123456789abcdefghijklmn"
_ADDRESS = ("192.0.2.1", 50000)
_DECODERS: dict[int, Callable[[bytes], Any]] = {
    stun.MAPPED_ADDRESS: stun.decode_mapped_address,
    stun.ALTERNATE_SERVER: stun.decode_mapped_address,
    stun.USERNAME: stun.decode_username,
    stun.SOFTWARE: stun.decode_software,
    stun.ERROR_CODE: stun.decode_error_code,
    stun.UNKNOWN_ATTRIBUTES: stun.decode_unknown_attributes,
}


def one_input(data: bytes) -> None:
    server.handle(data, _ADDRESS, software="huddle")
    server.handle(data, ("::ffff:192.0.2.1", 50000), software="huddle")
    stun.is_stun(data)
    stun.verify_fingerprint(data)
    stun.verify_integrity(data, _PWD.encode())
    try:
        msg = stun.parse(data)
    except stun.StunError:
        return
    for attr in msg.attributes:
        try:
            if attr.type == stun.XOR_MAPPED_ADDRESS:
                stun.decode_xor_mapped_address(attr.value, msg.transaction_id)
            elif attr.type in _DECODERS:
                _DECODERS[attr.type](attr.value)
        except stun.StunError:
            pass
    kept = [a for a in msg.attributes if a.type not in (stun.MESSAGE_INTEGRITY, stun.FINGERPRINT)]
    if stun.parse(stun.encode(msg)).attributes != kept:
        raise AssertionError("parse(encode(m)) lost or changed attributes")
    ufrag = username_ufrag(msg) or "fuzz"
    ice = IceLite(ufrag, _PWD)
    ice.check(data, msg, _ADDRESS, 0.0)
    if msg.get(stun.MESSAGE_INTEGRITY) is not None:
        signed = stun.encode(msg, integrity_key=_PWD.encode(), fingerprint=stun.has_fingerprint(data))
        ice.check(signed, stun.parse(signed), _ADDRESS, 1.0)
