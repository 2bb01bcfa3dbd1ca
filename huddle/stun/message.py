"""STUN messages (RFC 8489), as a codec with no I/O.

`parse` turns bytes into a `StunMessage` and `encode` turns one back into bytes, adding
MESSAGE-INTEGRITY and FINGERPRINT when asked. `parse` checks structure only (header, attribute
framing, the fixed sizes of MESSAGE-INTEGRITY and FINGERPRINT); attribute values are read by the
`decode_*` helpers, so a message with an attribute nobody looks at costs nothing to accept.

Every function here that reads untrusted bytes raises `StunError` and nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import NamedTuple

__all__ = [
    "ALTERNATE_SERVER",
    "BINDING",
    "ERROR_CODE",
    "FINGERPRINT",
    "HEADER_SIZE",
    "ICE_CONTROLLED",
    "ICE_CONTROLLING",
    "KNOWN_ATTRIBUTES",
    "MAGIC_COOKIE",
    "MAPPED_ADDRESS",
    "MESSAGE_INTEGRITY",
    "MESSAGE_INTEGRITY_SHA256",
    "NONCE",
    "PRIORITY",
    "REALM",
    "SOFTWARE",
    "UNKNOWN_ATTRIBUTES",
    "USERNAME",
    "USE_CANDIDATE",
    "XOR_MAPPED_ADDRESS",
    "Attribute",
    "MessageClass",
    "StunError",
    "StunMessage",
    "decode_error_code",
    "decode_mapped_address",
    "decode_software",
    "decode_unknown_attributes",
    "decode_username",
    "decode_xor_mapped_address",
    "encode",
    "encode_error_code",
    "encode_mapped_address",
    "encode_software",
    "encode_unknown_attributes",
    "encode_username",
    "encode_xor_mapped_address",
    "has_fingerprint",
    "is_stun",
    "parse",
    "verify_fingerprint",
    "verify_integrity",
]

HEADER_SIZE = 20
MAGIC_COOKIE = 0x2112A442
_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")
_FINGERPRINT_XOR = 0x5354554E
_INTEGRITY_SIZE = 20  # HMAC-SHA1
_MAX_LENGTH = 0xFFFF  # the header's 16-bit length field

BINDING = 0x001

# Attribute types (RFC 8489 §18.3, RFC 8445 §16.1). Below 0x8000: comprehension-required.
MAPPED_ADDRESS = 0x0001
USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
ERROR_CODE = 0x0009
UNKNOWN_ATTRIBUTES = 0x000A
REALM = 0x0014
NONCE = 0x0015
MESSAGE_INTEGRITY_SHA256 = 0x001C
XOR_MAPPED_ADDRESS = 0x0020
PRIORITY = 0x0024
USE_CANDIDATE = 0x0025
SOFTWARE = 0x8022
ALTERNATE_SERVER = 0x8023
FINGERPRINT = 0x8028
ICE_CONTROLLED = 0x8029
ICE_CONTROLLING = 0x802A

KNOWN_ATTRIBUTES = frozenset(
    {
        MAPPED_ADDRESS,
        USERNAME,
        MESSAGE_INTEGRITY,
        ERROR_CODE,
        UNKNOWN_ATTRIBUTES,
        REALM,
        NONCE,
        MESSAGE_INTEGRITY_SHA256,
        XOR_MAPPED_ADDRESS,
        PRIORITY,
        USE_CANDIDATE,
        SOFTWARE,
        ALTERNATE_SERVER,
        FINGERPRINT,
        ICE_CONTROLLED,
        ICE_CONTROLLING,
    }
)

# Computed from the bytes around them, so a stored value would be stale after any change.
_COMPUTED = frozenset({MESSAGE_INTEGRITY, FINGERPRINT})

_HEADER = struct.Struct(">HHI12s")
_ATTR_HEADER = struct.Struct(">HH")
_FINGERPRINT_ATTR = struct.Struct(">HHI")


class StunError(ValueError):
    """Bytes that are not a well-formed STUN message, or a value that cannot be encoded."""


class MessageClass(IntEnum):
    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


class Attribute(NamedTuple):
    type: int
    value: bytes


@dataclass(slots=True)
class StunMessage:
    method: int
    message_class: MessageClass
    transaction_id: bytes
    attributes: list[Attribute] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0 <= self.method <= 0xFFF:
            raise StunError(f"method {self.method:#x} does not fit in 12 bits")
        if len(self.transaction_id) != 12:
            raise StunError("transaction id must be 12 bytes")
        self.transaction_id = bytes(self.transaction_id)
        try:
            self.message_class = MessageClass(self.message_class)
        except ValueError as e:
            raise StunError(f"bad message class {self.message_class!r}") from e

    def get(self, attr_type: int) -> bytes | None:
        """The value of the first attribute of this type (RFC 8489 §14: later ones may be ignored)."""
        for attr in self.attributes:
            if attr.type == attr_type:
                return attr.value
        return None

    def add(self, attr_type: int, value: bytes) -> None:
        self.attributes.append(Attribute(attr_type, bytes(value)))


def _message_type(method: int, message_class: int) -> int:
    # The class bits are interleaved with the method bits (RFC 8489 §5, figure 3).
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((message_class & 0b01) << 4)
        | ((message_class & 0b10) << 7)
    )


def _split_type(message_type: int) -> tuple[int, MessageClass]:
    method = (message_type & 0x000F) | ((message_type >> 1) & 0x0070) | ((message_type >> 2) & 0x0F80)
    message_class = ((message_type >> 4) & 0b01) | ((message_type >> 7) & 0b10)
    return method, MessageClass(message_class)


def is_stun(data: bytes) -> bool:
    """Cheap demultiplexing test (RFC 7983): could this datagram be STUN rather than DTLS or RTP?"""
    return len(data) >= HEADER_SIZE and data[0] < 0x40 and data[3] & 3 == 0 and data[4:8] == _COOKIE_BYTES


def _walk(data: bytes) -> list[tuple[int, int, int]]:
    """Check the header and framing; return (type, offset of attribute header, value length) each."""
    size = len(data)
    if size < HEADER_SIZE:
        raise StunError("shorter than a STUN header")
    message_type, length, cookie, _ = _HEADER.unpack_from(data)
    if message_type & 0xC000:
        raise StunError("first two bits are not zero")
    if cookie != MAGIC_COOKIE:
        raise StunError("no magic cookie")
    if length & 3:
        raise StunError("length is not a multiple of 4")
    if size != HEADER_SIZE + length:
        raise StunError(f"length field says {length} bytes of attributes, {size - HEADER_SIZE} present")
    found: list[tuple[int, int, int]] = []
    offset = HEADER_SIZE
    while offset < size:
        if size - offset < 4:
            raise StunError("attribute header runs past the end")
        attr_type, attr_len = _ATTR_HEADER.unpack_from(data, offset)
        end = offset + 4 + attr_len + (-attr_len & 3)
        if end > size:
            raise StunError(f"attribute {attr_type:#06x} runs past the end")
        if found and found[-1][0] == FINGERPRINT:
            raise StunError("attribute after FINGERPRINT")
        if attr_type == MESSAGE_INTEGRITY and attr_len != _INTEGRITY_SIZE:
            raise StunError("MESSAGE-INTEGRITY must be 20 bytes")
        if attr_type == FINGERPRINT and attr_len != 4:
            raise StunError("FINGERPRINT must be 4 bytes")
        found.append((attr_type, offset, attr_len))
        offset = end
    return found


def parse(data: bytes) -> StunMessage:
    """Parse one whole STUN message. Raises `StunError` (only) if it is not one."""
    data = bytes(data)
    walked = _walk(data)
    message_type, _, _, transaction_id = _HEADER.unpack_from(data)
    method, message_class = _split_type(message_type)
    attributes = [Attribute(kind, data[offset + 4 : offset + 4 + size]) for kind, offset, size in walked]
    return StunMessage(method, message_class, transaction_id, attributes)


def encode(
    msg: StunMessage,
    *,
    integrity_key: bytes | None = None,
    fingerprint: bool = False,
    pad_byte: int = 0,
) -> bytes:
    """Serialise `msg`, then append MESSAGE-INTEGRITY (if `integrity_key`) and FINGERPRINT.

    MESSAGE-INTEGRITY and FINGERPRINT attributes in `msg.attributes` (as `parse` returns them) are
    left out and computed afresh, so a parsed message re-encodes with the same key to the same bytes.
    `pad_byte` fills attribute padding: RFC 8489 §14 says send zeros, but RFC 5769's vectors pad with
    spaces to prove that receivers ignore padding, and reproducing them needs the same bytes.
    """
    buf = bytearray(HEADER_SIZE)
    for attr_type, value in msg.attributes:
        if attr_type in _COMPUTED:
            continue
        if not 0 <= attr_type <= 0xFFFF:
            raise StunError(f"attribute type {attr_type:#x} does not fit in 16 bits")
        if len(value) > _MAX_LENGTH:
            raise StunError(f"attribute {attr_type:#06x} is too long")
        buf += _ATTR_HEADER.pack(attr_type, len(value))
        buf += value
        buf += bytes((pad_byte,)) * (-len(value) & 3)
    message_type = _message_type(msg.method, msg.message_class)
    if integrity_key is not None:
        # The HMAC covers the header with a length that already counts MESSAGE-INTEGRITY (§14.5).
        _HEADER.pack_into(buf, 0, message_type, len(buf) - HEADER_SIZE + 24, MAGIC_COOKIE, msg.transaction_id)
        mac = hmac.digest(integrity_key, buf, hashlib.sha1)
        buf += _ATTR_HEADER.pack(MESSAGE_INTEGRITY, _INTEGRITY_SIZE)
        buf += mac
    if fingerprint:
        _HEADER.pack_into(buf, 0, message_type, len(buf) - HEADER_SIZE + 8, MAGIC_COOKIE, msg.transaction_id)
        crc = zlib.crc32(buf) ^ _FINGERPRINT_XOR
        buf += _FINGERPRINT_ATTR.pack(FINGERPRINT, 4, crc)
    length = len(buf) - HEADER_SIZE
    if length > _MAX_LENGTH:
        raise StunError("message is too long for the 16-bit length field")
    _HEADER.pack_into(buf, 0, message_type, length, MAGIC_COOKIE, msg.transaction_id)
    return bytes(buf)


def verify_integrity(data: bytes, key: bytes) -> bool:
    """True if `data` carries a MESSAGE-INTEGRITY (HMAC-SHA1) made with `key`."""
    try:
        walked = _walk(data)
    except StunError:
        return False
    for attr_type, offset, _ in walked:
        if attr_type == MESSAGE_INTEGRITY:
            covered = bytearray(data[:offset])
            # Attributes after MESSAGE-INTEGRITY (FINGERPRINT) are not counted in the hashed length.
            struct.pack_into(">H", covered, 2, offset - HEADER_SIZE + 24)
            mac = hmac.digest(key, covered, hashlib.sha1)
            return hmac.compare_digest(mac, data[offset + 4 : offset + 4 + _INTEGRITY_SIZE])
    return False


def has_fingerprint(data: bytes) -> bool:
    """True if `data` is a well-formed STUN message whose last attribute is FINGERPRINT."""
    try:
        walked = _walk(data)
    except StunError:
        return False
    return bool(walked) and walked[-1][0] == FINGERPRINT


def verify_fingerprint(data: bytes) -> bool:
    """True if `data` ends with a FINGERPRINT that matches its CRC-32 (RFC 8489 §14.7)."""
    if not has_fingerprint(data):
        return False
    offset = len(data) - 8
    (expected,) = struct.unpack_from(">I", data, offset + 4)
    return zlib.crc32(data[:offset]) ^ _FINGERPRINT_XOR == expected


# --- attribute values ---------------------------------------------------------------------------


def _encode_address(host: str, port: int, mask: bytes) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as e:
        raise StunError(f"not an IP address: {host!r}") from e
    if not 0 <= port <= 0xFFFF:
        raise StunError(f"port {port} out of range")
    packed = ip.packed
    family = 0x01 if ip.version == 4 else 0x02
    port ^= int.from_bytes(mask[:2], "big")
    address = bytes(a ^ b for a, b in zip(packed, mask, strict=False))
    return struct.pack(">BBH", 0, family, port) + address


def _decode_address(value: bytes, mask: bytes) -> tuple[str, int]:
    if len(value) < 4:
        raise StunError("address attribute is too short")
    family = value[1]
    if (family, len(value)) not in ((0x01, 8), (0x02, 20)):
        raise StunError(f"bad address family {family:#x} or length {len(value)}")
    (port,) = struct.unpack_from(">H", value, 2)
    port ^= int.from_bytes(mask[:2], "big")
    address = bytes(a ^ b for a, b in zip(value[4:], mask, strict=False))
    return str(ipaddress.ip_address(address)), port


_NO_MASK = bytes(16)


def _xor_mask(transaction_id: bytes) -> bytes:
    if len(transaction_id) != 12:
        raise StunError("transaction id must be 12 bytes")
    return _COOKIE_BYTES + transaction_id


def encode_xor_mapped_address(host: str, port: int, transaction_id: bytes) -> bytes:
    """XOR-MAPPED-ADDRESS value (RFC 8489 §14.2), IPv4 or IPv6."""
    return _encode_address(host, port, _xor_mask(transaction_id))


def decode_xor_mapped_address(value: bytes, transaction_id: bytes) -> tuple[str, int]:
    return _decode_address(value, _xor_mask(transaction_id))


def encode_mapped_address(host: str, port: int) -> bytes:
    """MAPPED-ADDRESS value (RFC 8489 §14.1): only for talking to RFC 3489 clients."""
    return _encode_address(host, port, _NO_MASK)


def decode_mapped_address(value: bytes) -> tuple[str, int]:
    return _decode_address(value, _NO_MASK)


def _encode_text(text: str, max_chars: int, max_bytes: int, name: str) -> bytes:
    encoded = text.encode()
    if len(text) > max_chars or len(encoded) > max_bytes:
        raise StunError(f"{name} is too long")
    return encoded


def _decode_text(value: bytes, max_bytes: int, name: str) -> str:
    if len(value) > max_bytes:
        raise StunError(f"{name} is too long")
    try:
        return value.decode()
    except UnicodeDecodeError as e:
        raise StunError(f"{name} is not UTF-8") from e


def encode_username(username: str) -> bytes:
    """USERNAME value (RFC 8489 §14.3): fewer than 513 bytes of UTF-8."""
    return _encode_text(username, 512, 512, "USERNAME")


def decode_username(value: bytes) -> str:
    return _decode_text(value, 512, "USERNAME")


def encode_software(software: str) -> bytes:
    """SOFTWARE value (RFC 8489 §14.14): fewer than 128 characters."""
    return _encode_text(software, 127, 763, "SOFTWARE")


def decode_software(value: bytes) -> str:
    return _decode_text(value, 763, "SOFTWARE")


def encode_error_code(code: int, reason: str) -> bytes:
    """ERROR-CODE value (RFC 8489 §14.8): a code from 300 to 699 and a short reason phrase."""
    if not 300 <= code <= 699:
        raise StunError(f"error code {code} out of range")
    phrase = _encode_text(reason, 127, 763, "reason phrase")
    return struct.pack(">HBB", 0, code // 100, code % 100) + phrase


def decode_error_code(value: bytes) -> tuple[int, str]:
    if len(value) < 4:
        raise StunError("ERROR-CODE is too short")
    error_class = value[2] & 0x07
    number = value[3]
    if not 3 <= error_class <= 6 or number > 99:
        raise StunError(f"bad error code class {error_class} number {number}")
    return error_class * 100 + number, _decode_text(value[4:], 763, "reason phrase")


def encode_unknown_attributes(types: Iterable[int]) -> bytes:
    """UNKNOWN-ATTRIBUTES value (RFC 8489 §14.9): the 16-bit types, in order."""
    types = list(types)
    if any(not 0 <= t <= 0xFFFF for t in types):
        raise StunError("attribute type does not fit in 16 bits")
    return struct.pack(f">{len(types)}H", *types)


def decode_unknown_attributes(value: bytes) -> tuple[int, ...]:
    if len(value) % 2:
        raise StunError("UNKNOWN-ATTRIBUTES length is odd")
    return struct.unpack(f">{len(value) // 2}H", value)
