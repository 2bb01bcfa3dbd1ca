"""Sealed pipe datagrams: what opens, what is refused and why, and that no two links share a key stream."""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from huddle.rtc.pipe import (
    COUNTER_LIMIT,
    HEADER_SIZE,
    LINK_ID_SIZE,
    MIN_SIZE,
    REPLAY_WINDOW,
    TAG_SIZE,
    VERSION,
    Opener,
    PipeError,
    Sealer,
    derive_key,
    link_id_of,
    new_link_id,
)

CLUSTER_KEY = b"the cluster's resume secret"
REASONS = {"short", "version", "unknown_link", "integrity", "replay", "too_old"}


def link(key: bytes = CLUSTER_KEY) -> tuple[Sealer, Opener]:
    link_id = new_link_id()
    return Sealer(key, link_id), Opener(key, link_id)


def refused(opener: Opener, data: bytes) -> str:
    with pytest.raises(PipeError) as caught:
        opener.open(data)
    return caught.value.reason


@pytest.mark.parametrize(
    "payload", [b"", b"\x80\x60" + os.urandom(1198), bytearray(b"rtp"), memoryview(b"rtcp packet")]
)
def test_round_trip(payload: bytes | bytearray | memoryview) -> None:
    sealer, opener = link()
    sealed = sealer.seal(payload)
    assert len(sealed) == len(payload) + HEADER_SIZE + TAG_SIZE
    # Never mistaken for STUN, DTLS, TURN or RTP on a shared port (RFC 7983).
    assert sealed[0] == VERSION and not (sealed[0] <= 3 or 20 <= sealed[0] <= 79 or 128 <= sealed[0] <= 191)
    assert link_id_of(sealed) == sealer.link_id
    if len(payload) >= 8:
        assert bytes(payload) not in sealed  # encrypted, not merely signed
    assert opener.open(sealed) == bytes(payload)


def test_wire_format_is_as_documented() -> None:
    """Another implementation following the module's docstring interoperates, both ways."""
    link_id = bytes.fromhex("0102030405060708")
    key = hmac.new(CLUSTER_KEY, b"huddle pipe v1\0" + link_id, hashlib.sha256).digest()[:16]
    sealer, opener = Sealer(CLUSTER_KEY, link_id), Opener(CLUSTER_KEY, link_id)
    sealed = sealer.seal(b"payload")
    header = bytes([0xF1]) + link_id + (1).to_bytes(8, "big")
    assert sealed[:HEADER_SIZE] == header
    nonce = bytes(4) + (1).to_bytes(8, "big")
    assert AESGCM(key).decrypt(nonce, sealed[HEADER_SIZE:], header) == b"payload"
    header = bytes([0xF1]) + link_id + (7).to_bytes(8, "big")
    foreign = header + AESGCM(key).encrypt(bytes(4) + (7).to_bytes(8, "big"), b"from elsewhere", header)
    assert opener.open(foreign) == b"from elsewhere"


def test_counter_counts_from_one_and_every_datagram_opens_once() -> None:
    sealer, opener = link()
    sealed = [sealer.seal(b"%d" % i) for i in range(50)]
    assert [struct.unpack_from("!Q", s, 1 + LINK_ID_SIZE)[0] for s in sealed] == list(range(1, 51))
    assert [opener.open(s) for s in sealed] == [b"%d" % i for i in range(50)]
    assert {refused(opener, s) for s in sealed} == {"replay"}


def test_every_tampered_bit_is_refused_and_the_genuine_datagram_still_opens() -> None:
    sealer, opener = link()
    for _ in range(2):
        sealer.seal(b"skipped")
    # Counter 3 (two bits set): no single flip turns it into 0, which would read as a replay.
    genuine = sealer.seal(b"a small payload of an RTP packet")
    for index in range(len(genuine)):
        expected = "version" if index == 0 else "unknown_link" if index <= LINK_ID_SIZE else "integrity"
        for bit in range(8):
            tampered = bytearray(genuine)
            tampered[index] ^= 1 << bit
            assert refused(opener, bytes(tampered)) == expected, (index, bit)
    # A forged counter must not have moved the replay window: the real datagram opens afterwards.
    assert opener.open(genuine) == b"a small payload of an RTP packet"


def test_truncated_or_extended_datagrams_are_refused() -> None:
    sealer, opener = link()
    genuine = sealer.seal(b"payload")
    assert refused(opener, genuine[:-1]) == "integrity"
    assert refused(opener, genuine + b"\x00") == "integrity"
    assert refused(opener, genuine[: MIN_SIZE - 1]) == "short"
    assert opener.open(genuine) == b"payload"


def test_another_cluster_key_does_not_open() -> None:
    link_id = new_link_id()
    sealed = Sealer(b"another cluster", link_id).seal(b"payload")
    assert refused(Opener(CLUSTER_KEY, link_id), sealed) == "integrity"


def test_another_link_is_refused() -> None:
    (sealer, _), (_, opener) = link(), link()
    sealed = sealer.seal(b"payload")
    assert refused(opener, sealed) == "unknown_link"
    # Relabelled with the opener's link id, it still does not open: the key follows the link id.
    relabelled = sealed[:1] + opener.link_id + sealed[1 + LINK_ID_SIZE :]
    assert refused(opener, relabelled) == "integrity"


def test_replay_is_refused_even_after_later_datagrams() -> None:
    sealer, opener = link()
    first = sealer.seal(b"first")
    assert opener.open(first) == b"first"
    assert refused(opener, first) == "replay"
    for _ in range(100):
        opener.open(sealer.seal(b"later"))
    assert refused(opener, first) == "replay"


def test_reordering_within_the_window_is_accepted_and_older_is_too_old() -> None:
    sealer, opener = link()
    sealed = [sealer.seal(i.to_bytes(2, "big")) for i in range(REPLAY_WINDOW + 10)]  # counters 1..1034
    assert opener.open(sealed[-1]) == (REPLAY_WINDOW + 9).to_bytes(2, "big")
    # The window holds the newest counter and the REPLAY_WINDOW - 1 before it: 11..1034.
    inside = list(range(10, REPLAY_WINDOW + 9))
    random.Random(7).shuffle(inside)
    for i in inside:
        assert opener.open(sealed[i]) == i.to_bytes(2, "big")
    for i in range(10):
        assert refused(opener, sealed[i]) == "too_old"
    assert {refused(opener, sealed[i]) for i in inside} == {"replay"}


def test_a_long_gap_moves_the_window_past_everything_before_it() -> None:
    sealer, opener = link()
    before = [sealer.seal(b"before") for _ in range(5)]
    opener.open(before[0])
    sealer.counter += 10 * REPLAY_WINDOW  # datagrams lost in an outage
    assert opener.open(sealer.seal(b"after")) == b"after"
    assert {refused(opener, d) for d in before} == {"too_old"}
    assert opener.open(sealer.seal(b"next")) == b"next"


def test_links_never_share_a_key_and_nonce() -> None:
    """A restarted node draws a new link id, so its counter restarting at 1 never repeats a key stream."""
    one, two = Sealer(CLUSTER_KEY, new_link_id()), Sealer(CLUSTER_KEY, new_link_id())
    payload = bytes(1200)
    a, b = one.seal(payload), two.seal(payload)
    assert a[1 + LINK_ID_SIZE : HEADER_SIZE] == b[1 + LINK_ID_SIZE : HEADER_SIZE]  # same counter
    assert derive_key(CLUSTER_KEY, one.link_id) != derive_key(CLUSTER_KEY, two.link_id)
    assert a[HEADER_SIZE:-TAG_SIZE] != b[HEADER_SIZE:-TAG_SIZE]
    # Same link id and counter under another cluster key: another key stream too.
    other = Sealer(b"another cluster", one.link_id).seal(payload)
    assert other[HEADER_SIZE:-TAG_SIZE] != a[HEADER_SIZE:-TAG_SIZE]


def test_new_link_ids_are_random() -> None:
    ids = {new_link_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == LINK_ID_SIZE for i in ids)


def test_a_sealer_stops_before_its_counter_runs_out() -> None:
    sealer, opener = link()
    sealer.counter = COUNTER_LIMIT - 2
    last = sealer.seal(b"last")
    with pytest.raises(PipeError) as caught:
        sealer.seal(b"one too many")
    assert caught.value.reason == "exhausted"
    assert opener.open(last) == b"last"


def test_bad_keys_are_refused_at_construction() -> None:
    with pytest.raises(ValueError):
        Sealer(CLUSTER_KEY, b"short")
    with pytest.raises(ValueError):
        Opener(b"", new_link_id())


def test_garbage_of_every_length_is_a_pipe_error() -> None:
    _, opener = link()
    rng = random.Random(1)
    for length in range(41):
        noise = rng.randbytes(length)
        # Also with a valid version and link id, so that the longer ones reach the tag check.
        framed = (bytes([VERSION]) + opener.link_id + noise)[:length]
        for data in (noise, framed, bytes(length)):
            reason = refused(opener, data)
            assert reason in REASONS
            if length < MIN_SIZE:
                assert reason == "short" and link_id_of(data) is None
        if length >= MIN_SIZE:
            assert refused(opener, framed) == "integrity"
            assert link_id_of(framed) == opener.link_id
            assert link_id_of(bytes(length)) is None


@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_raise_anything_but_pipe_error(data: bytes) -> None:
    _, opener = link()
    for candidate in (data, bytes([VERSION]) + opener.link_id + data):
        with pytest.raises(PipeError) as caught:
            opener.open(candidate)
        assert caught.value.reason in REASONS
        found = link_id_of(candidate)
        assert found is None or len(found) == LINK_ID_SIZE
