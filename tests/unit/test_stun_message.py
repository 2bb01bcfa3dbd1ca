"""The STUN codec against RFC 5769's test vectors, hand-written edge cases, and generated input."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from huddle.stun.message import (
    BINDING,
    FINGERPRINT,
    ICE_CONTROLLED,
    MESSAGE_INTEGRITY,
    PRIORITY,
    SOFTWARE,
    USERNAME,
    XOR_MAPPED_ADDRESS,
    Attribute,
    MessageClass,
    StunError,
    StunMessage,
    decode_error_code,
    decode_mapped_address,
    decode_software,
    decode_unknown_attributes,
    decode_username,
    decode_xor_mapped_address,
    encode,
    encode_error_code,
    encode_mapped_address,
    encode_software,
    encode_unknown_attributes,
    encode_username,
    encode_xor_mapped_address,
    has_fingerprint,
    is_stun,
    parse,
    verify_fingerprint,
    verify_integrity,
)


def unhex(text: str) -> bytes:
    return bytes.fromhex(" ".join(text.split()))


# RFC 5769 §2.1-2.3, typed in from the RFC. Where a value needs padding the RFC pads with spaces
# (0x20), not zeros: USERNAME in the request, SOFTWARE in both responses.
PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"
TRANSACTION_ID = unhex("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae")

SAMPLE_REQUEST = unhex(
    """
    00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
    00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36
    00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
    00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04 e5 7a 3b cf
    """
)

SAMPLE_IPV4_RESPONSE = unhex(
    """
    01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96
    """
)

SAMPLE_IPV6_RESPONSE = unhex(
    """
    01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
    00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
    80 28 00 04 c8 fb 0b 4c
    """
)

VECTORS = pytest.mark.parametrize(
    "vector",
    [SAMPLE_REQUEST, SAMPLE_IPV4_RESPONSE, SAMPLE_IPV6_RESPONSE],
    ids=["request", "ipv4-response", "ipv6-response"],
)


# --- RFC 5769 -------------------------------------------------------------------------------------


def test_sample_request_fields() -> None:
    msg = parse(SAMPLE_REQUEST)
    assert (msg.method, msg.message_class) == (BINDING, MessageClass.REQUEST)
    assert msg.transaction_id == TRANSACTION_ID
    assert [a.type for a in msg.attributes] == [
        SOFTWARE,
        PRIORITY,
        ICE_CONTROLLED,
        USERNAME,
        MESSAGE_INTEGRITY,
        FINGERPRINT,
    ]
    assert decode_software(msg.get(SOFTWARE) or b"") == "STUN test client"
    assert msg.get(PRIORITY) == (0x6E0001FF).to_bytes(4, "big")
    assert msg.get(ICE_CONTROLLED) == (0x932FF9B151263B36).to_bytes(8, "big")
    # The value excludes the padding, whatever bytes the padding is made of.
    assert decode_username(msg.get(USERNAME) or b"") == "evtj:h6vY"


@pytest.mark.parametrize(
    ("vector", "address"),
    [(SAMPLE_IPV4_RESPONSE, "192.0.2.1"), (SAMPLE_IPV6_RESPONSE, "2001:db8:1234:5678:11:2233:4455:6677")],
    ids=["ipv4", "ipv6"],
)
def test_sample_responses_fields(vector: bytes, address: str) -> None:
    msg = parse(vector)
    assert (msg.method, msg.message_class) == (BINDING, MessageClass.SUCCESS)
    assert msg.transaction_id == TRANSACTION_ID
    assert [a.type for a in msg.attributes] == [SOFTWARE, XOR_MAPPED_ADDRESS, MESSAGE_INTEGRITY, FINGERPRINT]
    assert decode_software(msg.get(SOFTWARE) or b"") == "test vector"
    value = msg.get(XOR_MAPPED_ADDRESS) or b""
    assert decode_xor_mapped_address(value, msg.transaction_id) == (address, 32853)
    assert encode_xor_mapped_address(address, 32853, msg.transaction_id) == value


@VECTORS
def test_vectors_verify(vector: bytes) -> None:
    assert is_stun(vector)
    assert has_fingerprint(vector)
    assert verify_fingerprint(vector)
    assert verify_integrity(vector, PASSWORD)


@VECTORS
def test_vectors_reencode_to_the_same_bytes(vector: bytes) -> None:
    msg = parse(vector)
    assert encode(msg, integrity_key=PASSWORD, fingerprint=True, pad_byte=0x20) == vector


@VECTORS
def test_vectors_reencode_with_zero_padding(vector: bytes) -> None:
    # What we send on the wire: zero padding, so different HMAC and CRC, yet the same message.
    msg = parse(vector)
    ours = encode(msg, integrity_key=PASSWORD, fingerprint=True)
    assert len(ours) == len(vector)
    assert ours != vector
    assert verify_integrity(ours, PASSWORD)
    assert verify_fingerprint(ours)
    assert parse(ours).attributes[:-2] == msg.attributes[:-2]


@VECTORS
def test_wrong_key_fails_integrity(vector: bytes) -> None:
    assert not verify_integrity(vector, PASSWORD + b"x")
    assert not verify_integrity(vector, b"")


@VECTORS
def test_any_flipped_byte_fails_fingerprint(vector: bytes) -> None:
    # CRC-32 catches every error burst of up to 32 bits, so no single byte may slip through.
    for index in range(len(vector)):
        flipped = bytearray(vector)
        flipped[index] ^= 0x01
        assert not verify_fingerprint(bytes(flipped)), index


@VECTORS
def test_flipped_byte_before_integrity_fails_integrity(vector: bytes) -> None:
    mi_offset = len(vector) - 8 - 24
    for index in range(mi_offset + 24):
        flipped = bytearray(vector)
        flipped[index] ^= 0x80
        assert not verify_integrity(bytes(flipped), PASSWORD), index


# --- header ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message_class", "first_two_bytes"),
    [
        (MessageClass.REQUEST, b"\x00\x01"),
        (MessageClass.INDICATION, b"\x00\x11"),
        (MessageClass.SUCCESS, b"\x01\x01"),
        (MessageClass.ERROR, b"\x01\x11"),
    ],
)
def test_binding_message_types(message_class: MessageClass, first_two_bytes: bytes) -> None:
    data = encode(StunMessage(BINDING, message_class, TRANSACTION_ID))
    assert data[:2] == first_two_bytes
    assert parse(data).message_class == message_class


@pytest.mark.parametrize("method", [0x000, 0x001, 0x00F, 0x010, 0x070, 0x080, 0xF80, 0xFFF, 0xABC])
@pytest.mark.parametrize("message_class", list(MessageClass))
def test_method_and_class_bits_interleave(method: int, message_class: MessageClass) -> None:
    data = encode(StunMessage(method, message_class, TRANSACTION_ID))
    assert data[0] < 0x40
    msg = parse(data)
    assert (msg.method, msg.message_class) == (method, message_class)


def test_message_rejects_bad_fields() -> None:
    with pytest.raises(StunError):
        StunMessage(BINDING, MessageClass.REQUEST, b"short")
    with pytest.raises(StunError):
        StunMessage(0x1000, MessageClass.REQUEST, TRANSACTION_ID)
    with pytest.raises(StunError):
        StunMessage(BINDING, 4, TRANSACTION_ID)  # type: ignore[arg-type]


def test_encode_rejects_oversized_values() -> None:
    msg = StunMessage(BINDING, MessageClass.REQUEST, TRANSACTION_ID, [Attribute(0x8000, bytes(0x10000))])
    with pytest.raises(StunError):
        encode(msg)
    msg = StunMessage(BINDING, MessageClass.REQUEST, TRANSACTION_ID, [Attribute(0x8000, bytes(0x8000))] * 2)
    with pytest.raises(StunError):
        encode(msg)


def _header(length: int, message_type: int = 0x0001, cookie: bytes = b"\x21\x12\xa4\x42") -> bytes:
    return message_type.to_bytes(2, "big") + length.to_bytes(2, "big") + cookie + TRANSACTION_ID


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(SAMPLE_REQUEST[:19], id="short-header"),
        pytest.param(SAMPLE_REQUEST[:-4], id="truncated"),
        pytest.param(SAMPLE_REQUEST + b"\x00\x00\x00\x00", id="trailing-bytes"),
        pytest.param(_header(0, message_type=0x8001), id="first-bits-set"),
        pytest.param(_header(0, cookie=b"\x21\x12\xa4\x43"), id="bad-cookie"),
        pytest.param(_header(2) + b"\x00\x00", id="length-not-multiple-of-4"),
        pytest.param(_header(4) + b"\x80\x22\x00\x08", id="attribute-runs-past-end"),
        pytest.param(_header(8) + b"\x80\x22\x00\x05abcd", id="padding-missing"),
        pytest.param(_header(8) + b"\x00\x08\x00\x04abcd", id="short-message-integrity"),
        pytest.param(_header(12) + b"\x80\x28\x00\x08abcdefgh", id="long-fingerprint"),
        pytest.param(
            SAMPLE_REQUEST[:3] + b"\x60" + SAMPLE_REQUEST[4:] + b"\x80\x22\x00\x04abcd", id="after-fp"
        ),
    ],
)
def test_parse_rejects_malformed(data: bytes) -> None:
    with pytest.raises(StunError):
        parse(data)
    assert not has_fingerprint(data)
    assert not verify_fingerprint(data)
    assert not verify_integrity(data, PASSWORD)


def test_verify_without_the_attributes() -> None:
    data = encode(StunMessage(BINDING, MessageClass.REQUEST, TRANSACTION_ID, [Attribute(SOFTWARE, b"x")]))
    assert parse(data).get(SOFTWARE) == b"x"
    assert not has_fingerprint(data)
    assert not verify_fingerprint(data)
    assert not verify_integrity(data, PASSWORD)


def test_fingerprint_only_and_integrity_only() -> None:
    msg = StunMessage(BINDING, MessageClass.REQUEST, TRANSACTION_ID)
    assert verify_fingerprint(encode(msg, fingerprint=True))
    assert verify_integrity(encode(msg, integrity_key=b"k"), b"k")
    assert not has_fingerprint(encode(msg, integrity_key=b"k"))


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (SAMPLE_REQUEST, True),
        (SAMPLE_IPV6_RESPONSE, True),
        (SAMPLE_REQUEST[:19], False),
        # A DTLS 1.2 ClientHello record header, then filler: first byte 22 (RFC 7983: 20-63 is DTLS).
        (bytes.fromhex("16fefd0000000000000000") + bytes(40), False),
        # An RTP packet (first byte 128-191).
        (bytes.fromhex("80e0") + bytes(30), False),
        (_header(0, cookie=b"\x21\x12\xa4\x43"), False),
        (_header(2) + b"\x00\x00", False),
    ],
)
def test_is_stun(data: bytes, expected: bool) -> None:
    assert is_stun(data) is expected


# --- attribute values -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "address"),
    [
        (unhex("00 01 80 55 c0 00 02 01"), ("192.0.2.1", 32853)),
        (b"\x00\x02\x0d\x96" + ipaddress.IPv6Address("2001:db8::1").packed, ("2001:db8::1", 3478)),
    ],
)
def test_mapped_address(value: bytes, address: tuple[str, int]) -> None:
    assert decode_mapped_address(value) == address
    assert encode_mapped_address(*address) == value


@pytest.mark.parametrize(
    "value",
    [b"", b"\x00\x01\x00", unhex("00 03 00 01 01 02 03 04"), unhex("00 01 00 01 01 02 03"), bytes(20)],
)
def test_bad_addresses(value: bytes) -> None:
    with pytest.raises(StunError):
        decode_mapped_address(value)
    with pytest.raises(StunError):
        decode_xor_mapped_address(value, TRANSACTION_ID)


def test_address_encoding_rejects_bad_input() -> None:
    with pytest.raises(StunError):
        encode_xor_mapped_address("example.org", 1, TRANSACTION_ID)
    with pytest.raises(StunError):
        encode_xor_mapped_address("192.0.2.1", 65536, TRANSACTION_ID)
    with pytest.raises(StunError):
        encode_xor_mapped_address("192.0.2.1", 1, b"short")


def test_error_code() -> None:
    value = encode_error_code(420, "Unknown Attribute")
    assert value[:4] == b"\x00\x00\x04\x14"
    assert decode_error_code(value) == (420, "Unknown Attribute")
    assert decode_error_code(encode_error_code(300, "")) == (300, "")
    assert decode_error_code(encode_error_code(699, "é")) == (699, "é")


@pytest.mark.parametrize(
    "value", [b"\x00\x00\x04", b"\x00\x00\x02\x00", b"\x00\x00\x07\x00", b"\x00\x00\x04\x64"]
)
def test_bad_error_codes(value: bytes) -> None:
    with pytest.raises(StunError):
        decode_error_code(value)


def test_error_code_encoding_rejects_bad_input() -> None:
    with pytest.raises(StunError):
        encode_error_code(200, "OK")
    with pytest.raises(StunError):
        encode_error_code(400, "x" * 128)


def test_unknown_attributes() -> None:
    value = encode_unknown_attributes([0x0077, 0x1234, 0x0001])
    assert value == unhex("00 77 12 34 00 01")
    assert decode_unknown_attributes(value) == (0x0077, 0x1234, 0x0001)
    assert decode_unknown_attributes(b"") == ()
    with pytest.raises(StunError):
        decode_unknown_attributes(b"\x00\x01\x02")
    with pytest.raises(StunError):
        encode_unknown_attributes([0x10000])


def test_text_attributes() -> None:
    assert decode_username(encode_username("alice:bob")) == "alice:bob"
    assert decode_software(encode_software("huddle 0.1")) == "huddle 0.1"
    assert len(encode_software("é" * 127)) == 254
    with pytest.raises(StunError):
        encode_username("x" * 513)
    with pytest.raises(StunError):
        encode_software("x" * 128)
    with pytest.raises(StunError):
        decode_username(b"\xff\xfe")
    with pytest.raises(StunError):
        decode_username(b"x" * 513)


# --- generated input ------------------------------------------------------------------------------

attribute_types = st.integers(0, 0xFFFF).filter(lambda t: t not in (MESSAGE_INTEGRITY, FINGERPRINT))
attributes = st.builds(Attribute, attribute_types, st.binary(max_size=40))
messages = st.builds(
    StunMessage,
    method=st.integers(0, 0xFFF),
    message_class=st.sampled_from(MessageClass),
    transaction_id=st.binary(min_size=12, max_size=12),
    attributes=st.lists(attributes, max_size=8),
)
keys = st.none() | st.binary(max_size=64)


@st.composite
def stun_shaped(draw: st.DrawFn) -> bytes:
    """Bytes with a valid header and a body of plausible attribute headers, to get past the header checks."""
    body = bytearray()
    for _ in range(draw(st.integers(0, 6))):
        attr_type = draw(
            st.sampled_from([MESSAGE_INTEGRITY, FINGERPRINT, SOFTWARE, 0x0077]) | st.integers(0, 0xFFFF)
        )
        value = draw(st.binary(max_size=24))
        declared = draw(st.just(len(value)) | st.integers(0, 0xFFFF))
        body += attr_type.to_bytes(2, "big") + declared.to_bytes(2, "big") + value
        body += bytes(-len(value) & 3)
    body += draw(st.binary(max_size=3))
    length = draw(st.just(len(body)) | st.integers(0, 0xFFFF))
    message_type = draw(st.integers(0, 0x3FFF))
    return (
        message_type.to_bytes(2, "big") + length.to_bytes(2, "big") + b"\x21\x12\xa4\x42" + bytes(12) + body
    )


def _parse_or_stun_error(data: bytes) -> None:
    try:
        parse(data)
    except StunError:
        pass
    for check in (is_stun, has_fingerprint, verify_fingerprint):
        assert isinstance(check(data), bool)
    assert isinstance(verify_integrity(data, PASSWORD), bool)


@given(st.binary(max_size=200))
def test_parse_arbitrary_bytes(data: bytes) -> None:
    _parse_or_stun_error(data)


@given(stun_shaped())
def test_parse_stun_shaped_bytes(data: bytes) -> None:
    _parse_or_stun_error(data)


@given(messages, keys, st.data())
def test_parse_mutated_messages(msg: StunMessage, key: bytes | None, data: st.DataObject) -> None:
    original = encode(msg, integrity_key=key, fingerprint=True)
    mutated = bytearray(original)
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "length"]))
    if kind == "flip":
        index = data.draw(st.integers(0, len(mutated) - 1))
        mutated[index] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del mutated[data.draw(st.integers(0, len(mutated) - 1)) :]
    elif kind == "insert":
        index = data.draw(st.integers(0, len(mutated)))
        mutated[index:index] = data.draw(st.binary(min_size=1, max_size=8))
    else:
        mutated[2:4] = data.draw(st.integers(0, 0xFFFF)).to_bytes(2, "big")
    _parse_or_stun_error(bytes(mutated))
    if kind == "flip":
        assert not verify_fingerprint(bytes(mutated))


@given(messages, keys, st.booleans(), st.integers(0, 255))
def test_encode_parse_round_trip(
    msg: StunMessage, key: bytes | None, fingerprint: bool, pad_byte: int
) -> None:
    data = encode(msg, integrity_key=key, fingerprint=fingerprint, pad_byte=pad_byte)
    assert is_stun(data)
    parsed = parse(data)
    assert (parsed.method, parsed.message_class, parsed.transaction_id) == (
        msg.method,
        msg.message_class,
        msg.transaction_id,
    )
    computed = [a.type for a in parsed.attributes if a.type in (MESSAGE_INTEGRITY, FINGERPRINT)]
    assert computed == [MESSAGE_INTEGRITY] * (key is not None) + [FINGERPRINT] * fingerprint
    assert parsed.attributes[: len(msg.attributes)] == msg.attributes
    assert has_fingerprint(data) is fingerprint
    assert verify_fingerprint(data) is fingerprint
    if key is not None:
        assert verify_integrity(data, key)
        assert not verify_integrity(data, key + b"!")
    assert encode(parsed, integrity_key=key, fingerprint=fingerprint, pad_byte=pad_byte) == data


@given(st.ip_addresses(), st.integers(0, 0xFFFF), st.binary(min_size=12, max_size=12))
def test_xor_address_round_trip(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, transaction_id: bytes
) -> None:
    value = encode_xor_mapped_address(str(ip), port, transaction_id)
    assert len(value) == (8 if ip.version == 4 else 20)
    assert decode_xor_mapped_address(value, transaction_id) == (str(ip), port)
    assert decode_mapped_address(encode_mapped_address(str(ip), port)) == (str(ip), port)


@given(st.integers(300, 699), st.text(max_size=127))
def test_error_code_round_trip(code: int, reason: str) -> None:
    assert decode_error_code(encode_error_code(code, reason)) == (code, reason)


@given(st.binary(max_size=40), st.binary(min_size=12, max_size=12))
def test_attribute_decoders_raise_only_stun_error(value: bytes, transaction_id: bytes) -> None:
    decoders = [
        lambda v: decode_xor_mapped_address(v, transaction_id),
        decode_mapped_address,
        decode_error_code,
        decode_unknown_attributes,
        decode_username,
        decode_software,
    ]
    for decoder in decoders:
        try:
            decoder(value)
        except StunError:
            pass
