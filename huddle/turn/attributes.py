"""TURN (RFC 8656) on top of the STUN codec: methods, attributes, and ChannelData framing, with no I/O.

Values are read by `decode_*` helpers that raise `StunError` and nothing else, as `huddle.stun.message` does;
a value that is well formed but not one we serve (an unknown address family, a transport other than UDP) is
returned as read, for the server to answer with the error the RFC names.
"""

from __future__ import annotations

import socket
import struct
from typing import Final

from huddle.stun.message import (
    KNOWN_ATTRIBUTES,
    MAGIC_COOKIE,
    StunError,
)

__all__ = [
    "ADDITIONAL_ADDRESS_FAMILY",
    "ADDRESS_ERROR_CODE",
    "ALLOCATE",
    "CHANNEL_BIND",
    "CHANNEL_DATA_HEADER",
    "CHANNEL_MAX",
    "CHANNEL_MIN",
    "CHANNEL_NUMBER",
    "CREATE_PERMISSION",
    "DATA",
    "DATA_INDICATION",
    "DONT_FRAGMENT",
    "EVEN_PORT",
    "FAMILY_IPV4",
    "FAMILY_IPV6",
    "ICMP",
    "KNOWN_TURN_ATTRIBUTES",
    "LIFETIME",
    "REFRESH",
    "REQUESTED_ADDRESS_FAMILY",
    "REQUESTED_TRANSPORT",
    "RESERVATION_TOKEN",
    "SEND",
    "TRANSPORT_UDP",
    "TURN_METHODS",
    "XOR_PEER_ADDRESS",
    "XOR_RELAYED_ADDRESS",
    "channel_data_size",
    "decode_channel_number",
    "decode_even_port",
    "decode_lifetime",
    "decode_requested_address_family",
    "decode_requested_transport",
    "decode_xor_address",
    "encode_channel_data",
    "encode_channel_number",
    "encode_data_indication",
    "encode_even_port",
    "encode_lifetime",
    "encode_requested_address_family",
    "encode_requested_transport",
    "encode_xor_address",
    "is_channel_data",
    "parse_channel_data",
]

# Methods (RFC 8656 §18). Data is only ever an indication, Send too.
ALLOCATE: Final = 0x003
REFRESH: Final = 0x004
SEND: Final = 0x006
DATA_INDICATION: Final = 0x007
CREATE_PERMISSION: Final = 0x008
CHANNEL_BIND: Final = 0x009
TURN_METHODS: Final = frozenset({ALLOCATE, REFRESH, SEND, DATA_INDICATION, CREATE_PERMISSION, CHANNEL_BIND})

# Attributes (RFC 8656 §18). Below 0x8000: comprehension-required.
CHANNEL_NUMBER: Final = 0x000C
LIFETIME: Final = 0x000D
XOR_PEER_ADDRESS: Final = 0x0012
DATA: Final = 0x0013
XOR_RELAYED_ADDRESS: Final = 0x0016
REQUESTED_ADDRESS_FAMILY: Final = 0x0017
EVEN_PORT: Final = 0x0018
REQUESTED_TRANSPORT: Final = 0x0019
DONT_FRAGMENT: Final = 0x001A
RESERVATION_TOKEN: Final = 0x0022
ADDITIONAL_ADDRESS_FAMILY: Final = 0x8000
ADDRESS_ERROR_CODE: Final = 0x8001
ICMP: Final = 0x8004

KNOWN_TURN_ATTRIBUTES: Final = KNOWN_ATTRIBUTES | {
    CHANNEL_NUMBER,
    LIFETIME,
    XOR_PEER_ADDRESS,
    DATA,
    XOR_RELAYED_ADDRESS,
    REQUESTED_ADDRESS_FAMILY,
    EVEN_PORT,
    REQUESTED_TRANSPORT,
    DONT_FRAGMENT,
    RESERVATION_TOKEN,
    ADDITIONAL_ADDRESS_FAMILY,
    ADDRESS_ERROR_CODE,
    ICMP,
}

FAMILY_IPV4: Final = 0x01
FAMILY_IPV6: Final = 0x02
TRANSPORT_UDP: Final = 17  # an IANA protocol number

# RFC 8656 §12 narrowed channels to 0x4000-0x4FFF so that ChannelData stays apart from DTLS and RTP on a
# shared port; RFC 5766 clients (coturn's own, older pjnath) still pick up to 0x7FFF. Nothing but STUN and
# TURN arrives on the STUN port, so the old range is taken as well.
CHANNEL_MIN: Final = 0x4000
CHANNEL_MAX: Final = 0x7FFF
CHANNEL_DATA_HEADER: Final = 4

_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")
_U32 = struct.Struct(">I")
_CHANNEL_HEADER = struct.Struct(">HH")
_ADDRESS_HEADER = struct.Struct(">BBH")
_STUN_HEADER = struct.Struct(">HHI12s")
_ATTR_HEADER = struct.Struct(">HH")
# Method 0x007 with the indication class bit interleaved into the type (RFC 8489 §5).
_DATA_INDICATION_TYPE = 0x0017


# --- addresses ------------------------------------------------------------------------------------


def decode_xor_address(value: bytes, transaction_id: bytes) -> tuple[int, str, int]:
    """An XOR-PEER-ADDRESS or XOR-RELAYED-ADDRESS value as (socket family, host, port).

    The host is written as the kernel writes addresses (`inet_ntop`), so that it compares equal to the
    source address of a datagram from that peer."""
    size = len(value)
    if size == 8 and value[1] == FAMILY_IPV4:
        family, mask = socket.AF_INET, _COOKIE_BYTES
    elif size == 20 and value[1] == FAMILY_IPV6:
        if len(transaction_id) != 12:
            raise StunError("transaction id must be 12 bytes")
        family, mask = socket.AF_INET6, _COOKIE_BYTES + transaction_id
    else:
        raise StunError(f"bad address attribute: {size} bytes, family {value[1] if size > 1 else None}")
    port = int.from_bytes(value[2:4], "big") ^ (MAGIC_COOKIE >> 16)
    raw = (int.from_bytes(value[4:], "big") ^ int.from_bytes(mask, "big")).to_bytes(size - 4, "big")
    return family, socket.inet_ntop(family, raw), port


def encode_xor_address(host: str, port: int, transaction_id: bytes) -> bytes:
    """XOR-PEER-ADDRESS / XOR-RELAYED-ADDRESS value (the XOR-MAPPED-ADDRESS layout, RFC 8489 §14.2)."""
    if not 0 <= port <= 0xFFFF:
        raise StunError(f"port {port} out of range")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        raw = socket.inet_pton(family, host)
    except OSError as e:
        raise StunError(f"not an IP address: {host!r}") from e
    if family == socket.AF_INET:
        code, mask = FAMILY_IPV4, _COOKIE_BYTES
    else:
        if len(transaction_id) != 12:
            raise StunError("transaction id must be 12 bytes")
        code, mask = FAMILY_IPV6, _COOKIE_BYTES + transaction_id
    xored = (int.from_bytes(raw, "big") ^ int.from_bytes(mask, "big")).to_bytes(len(raw), "big")
    return _ADDRESS_HEADER.pack(0, code, port ^ (MAGIC_COOKIE >> 16)) + xored


# --- small values ---------------------------------------------------------------------------------


def _u32(value: bytes, name: str) -> int:
    if len(value) != 4:
        raise StunError(f"{name} must be 4 bytes")
    return _U32.unpack(value)[0]


def encode_channel_number(number: int) -> bytes:
    """CHANNEL-NUMBER value: the number, then 16 bits reserved for future use (RFFU)."""
    if not 0 <= number <= 0xFFFF:
        raise StunError(f"channel number {number} does not fit in 16 bits")
    return _CHANNEL_HEADER.pack(number, 0)


def decode_channel_number(value: bytes) -> int:
    """The number as sent; whether it lies in CHANNEL_MIN-CHANNEL_MAX is the server's question (400)."""
    return _u32(value, "CHANNEL-NUMBER") >> 16


def encode_lifetime(seconds: int) -> bytes:
    if not 0 <= seconds <= 0xFFFFFFFF:
        raise StunError(f"lifetime {seconds} does not fit in 32 bits")
    return _U32.pack(seconds)


def decode_lifetime(value: bytes) -> int:
    return _u32(value, "LIFETIME")


def encode_requested_transport(protocol: int) -> bytes:
    if not 0 <= protocol <= 0xFF:
        raise StunError(f"protocol {protocol} does not fit in 8 bits")
    return bytes((protocol, 0, 0, 0))


def decode_requested_transport(value: bytes) -> int:
    """The IANA protocol number asked for (17 for UDP: anything else is 442)."""
    return _u32(value, "REQUESTED-TRANSPORT") >> 24


def encode_requested_address_family(code: int) -> bytes:
    if not 0 <= code <= 0xFF:
        raise StunError(f"address family {code} does not fit in 8 bits")
    return bytes((code, 0, 0, 0))


def decode_requested_address_family(value: bytes) -> int:
    """FAMILY_IPV4, FAMILY_IPV6, or another code (440)."""
    return _u32(value, "REQUESTED-ADDRESS-FAMILY") >> 24


def encode_even_port(reserve: bool) -> bytes:
    return bytes((0x80 if reserve else 0,))


def decode_even_port(value: bytes) -> bool:
    """Whether the R bit asks the server to keep the next port too."""
    if len(value) != 1:
        raise StunError("EVEN-PORT must be 1 byte")
    return bool(value[0] & 0x80)


# --- ChannelData (RFC 8656 §12.4) ----------------------------------------------------------------


def is_channel_data(data: bytes) -> bool:
    """First byte 0x40-0x7F: ChannelData (STUN starts with 0-3; RFC 7983)."""
    return bool(data) and 0x40 <= data[0] <= 0x7F


def channel_data_size(header: bytes, *, stream: bool) -> int:
    """How many bytes the ChannelData message starting with this 4-byte header takes: over TCP and TLS
    each message is padded to a multiple of 4 (RFC 8656 §12.5), over UDP it is not."""
    if len(header) < CHANNEL_DATA_HEADER:
        raise StunError("shorter than a ChannelData header")
    length = (header[2] << 8) | header[3]
    return CHANNEL_DATA_HEADER + length + ((-length & 3) if stream else 0)


def parse_channel_data(data: bytes) -> tuple[int, bytes]:
    """(channel number, application data). Bytes after the data (padding) are ignored, as the RFC asks."""
    if len(data) < CHANNEL_DATA_HEADER:
        raise StunError("shorter than a ChannelData header")
    number, length = _CHANNEL_HEADER.unpack_from(data)
    if not CHANNEL_MIN <= number <= CHANNEL_MAX:
        raise StunError(f"channel number {number:#06x} outside {CHANNEL_MIN:#06x}-{CHANNEL_MAX:#06x}")
    if len(data) < CHANNEL_DATA_HEADER + length:
        raise StunError(f"ChannelData says {length} bytes, {len(data) - CHANNEL_DATA_HEADER} present")
    return number, bytes(data[CHANNEL_DATA_HEADER : CHANNEL_DATA_HEADER + length])


def encode_channel_data(number: int, data: bytes, *, stream: bool = False) -> bytes:
    if not CHANNEL_MIN <= number <= CHANNEL_MAX:
        raise StunError(f"channel number {number:#06x} outside {CHANNEL_MIN:#06x}-{CHANNEL_MAX:#06x}")
    if len(data) > 0xFFFF:
        raise StunError("ChannelData is too long")
    frame = _CHANNEL_HEADER.pack(number, len(data)) + data
    return frame + bytes(-len(data) & 3) if stream else frame


# --- Data indication ------------------------------------------------------------------------------


def encode_data_indication(transaction_id: bytes, peer: bytes, data: bytes) -> bytes:
    """A Data indication (RFC 8656 §11.3) carrying `data` from the peer whose XOR-PEER-ADDRESS value
    (made with this `transaction_id`) is `peer`. Written out by hand: it is sent once per packet to clients
    that use no channels, where building a `StunMessage` would cost more than the send itself."""
    if len(transaction_id) != 12:
        raise StunError("transaction id must be 12 bytes")
    size = len(data)
    length = 4 + len(peer) + 4 + size + (-size & 3)
    if length > 0xFFFF:
        raise StunError("Data indication is too long")
    return b"".join(
        (
            _STUN_HEADER.pack(_DATA_INDICATION_TYPE, length, MAGIC_COOKIE, transaction_id),
            _ATTR_HEADER.pack(XOR_PEER_ADDRESS, len(peer)),
            peer,
            _ATTR_HEADER.pack(DATA, size),
            data,
            bytes(-size & 3),
        )
    )
