"""TURN attributes and ChannelData framing: values round-trip, and random bytes raise only StunError."""

from __future__ import annotations

import os
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from huddle.stun.message import MessageClass, StunError, parse
from huddle.turn import attributes as a

TID = bytes(range(12))


@pytest.mark.parametrize(
    ("host", "family"),
    [
        ("192.0.2.1", socket.AF_INET),
        ("8.8.8.8", socket.AF_INET),
        ("2001:db8::1", socket.AF_INET6),
        # Written as the kernel writes a datagram's source, so that it compares equal to one.
        ("::ffff:1.2.3.4", socket.AF_INET6),
    ],
)
def test_xor_address_round_trips_in_kernel_notation(host: str, family: int) -> None:
    value = a.encode_xor_address(host, 40000, TID)
    assert a.decode_xor_address(value, TID) == (family, host, 40000)
    # XORed: the address's own bytes never appear in clear.
    assert socket.inet_pton(family, host) not in value


def test_xor_address_matches_rfc5769_ipv6_vector() -> None:
    # RFC 5769 §2.3: XOR-MAPPED-ADDRESS 2001:db8:1234:5678:11:2233:4455:6677 port 32853.
    tid = bytes.fromhex("b7e7a701bc34d686fa87dfae")
    value = bytes.fromhex("0002a1470113a9faa5d3f179bc25f4b5bed2b9d9")
    assert a.decode_xor_address(value, tid) == (
        socket.AF_INET6,
        "2001:db8:1234:5678:11:2233:4455:6677",
        32853,
    )
    assert a.encode_xor_address("2001:db8:1234:5678:11:2233:4455:6677", 32853, tid) == value


@pytest.mark.parametrize("bad", [b"", b"\x00\x01\x00\x00", b"\x00\x03" + bytes(6), b"\x00\x01" + bytes(18)])
def test_bad_addresses_raise_stun_error(bad: bytes) -> None:
    with pytest.raises(StunError):
        a.decode_xor_address(bad, TID)


def test_small_values_round_trip() -> None:
    assert a.decode_channel_number(a.encode_channel_number(0x4001)) == 0x4001
    assert a.decode_lifetime(a.encode_lifetime(3600)) == 3600
    assert a.decode_requested_transport(a.encode_requested_transport(a.TRANSPORT_UDP)) == 17
    assert a.decode_requested_address_family(a.encode_requested_address_family(a.FAMILY_IPV6)) == 2
    assert a.decode_even_port(a.encode_even_port(True)) is True
    assert a.decode_even_port(a.encode_even_port(False)) is False


def test_channel_data_framing() -> None:
    frame = a.encode_channel_data(0x4000, b"hello")
    assert frame == b"\x40\x00\x00\x05hello"
    assert a.parse_channel_data(frame) == (0x4000, b"hello")
    assert a.channel_data_size(frame[:4], stream=False) == 9
    # Over TCP and TLS, each message is padded to a multiple of 4 bytes (RFC 8656 §12.5).
    padded = a.encode_channel_data(0x4000, b"hello", stream=True)
    assert padded == frame + b"\x00\x00\x00"
    assert a.channel_data_size(padded[:4], stream=True) == 12
    assert a.parse_channel_data(padded) == (0x4000, b"hello")
    assert a.is_channel_data(frame) and not a.is_channel_data(b"\x00\x01") and not a.is_channel_data(b"")


@pytest.mark.parametrize(
    "bad",
    [b"\x40\x00\x00", b"\x40\x00\x00\x09hello", b"\x3f\xff\x00\x00", b"\x80\x00\x00\x00"],
    ids=["short-header", "short-data", "below-range", "above-range"],
)
def test_bad_channel_data_raises_stun_error(bad: bytes) -> None:
    with pytest.raises(StunError):
        a.parse_channel_data(bad)


@pytest.mark.parametrize("host", ["203.0.113.5", "2001:db8::7"])
def test_data_indication_is_a_stun_indication_with_peer_and_data(host: str) -> None:
    tid = os.urandom(12)
    payload = os.urandom(1001)
    data = a.encode_data_indication(tid, a.encode_xor_address(host, 5000, tid), payload)
    message = parse(data)
    assert (message.method, message.message_class) == (a.DATA_INDICATION, MessageClass.INDICATION)
    assert message.transaction_id == tid
    peer = message.get(a.XOR_PEER_ADDRESS)
    assert peer is not None
    assert a.decode_xor_address(peer, tid)[1:] == (host, 5000)
    assert message.get(a.DATA) == payload


_DECODERS = [
    lambda v: a.decode_xor_address(v, TID),
    lambda v: a.decode_xor_address(v, v[:12]),
    a.decode_channel_number,
    a.decode_lifetime,
    a.decode_requested_transport,
    a.decode_requested_address_family,
    a.decode_even_port,
    a.parse_channel_data,
    lambda v: a.channel_data_size(v, stream=True),
]


@given(st.binary(max_size=64), st.integers(0, len(_DECODERS) - 1))
def test_decoders_raise_only_their_own_error(value: bytes, index: int) -> None:
    try:
        _DECODERS[index](value)
    except StunError:
        pass


@given(st.integers(0x4000, 0x7FFF), st.binary(max_size=300), st.booleans())
def test_channel_data_round_trips(number: int, payload: bytes, stream: bool) -> None:
    frame = a.encode_channel_data(number, payload, stream=stream)
    assert len(frame) == a.channel_data_size(frame, stream=stream)
    assert a.parse_channel_data(frame) == (number, payload)
