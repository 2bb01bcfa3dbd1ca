"""The envelope around records on the topic: whole or split by wrap, joined by Joiner, whatever arrives
between the parts, twice, or never; garbage and later versions refused with errors that say so."""

from __future__ import annotations

import os

import pytest

from huddle.recording.envelope import VERSION, EnvelopeError, Joiner, UnknownVersion, wrap


def test_a_record_that_fits_is_one_value_and_one_byte_more_makes_parts() -> None:
    fits = os.urandom(100 - 3)
    (value,) = wrap(fits, 100, 1)
    assert len(value) == 100 and Joiner().feed(b"k", value) == fits
    parts = wrap(fits + b"x", 100, 1)
    assert len(parts) == 2 and all(len(p) <= 100 for p in parts)
    assert len(parts[0]) == 100


def test_parts_join_back_to_the_exact_record() -> None:
    record = os.urandom(3 << 20)
    parts = wrap(record, 1_000_000, 7)
    assert len(parts) == 4 and all(len(p) <= 1_000_000 for p in parts)
    joiner = Joiner()
    assert [joiner.feed(b"room", p) for p in parts[:-1]] == [None, None, None]
    assert joiner.feed(b"room", parts[-1]) == record
    assert joiner.joined == 1 and joiner.pending == 0


def test_parts_of_records_from_two_nodes_interleaved_under_one_key_are_told_apart() -> None:
    a, b = os.urandom(5000), os.urandom(4500)
    parts_a, parts_b = wrap(a, 1000, 1), wrap(b, 1000, 2)
    joiner = Joiner()
    out = []
    for pa, pb in zip(parts_a, parts_b, strict=False):
        out += [joiner.feed(b"room", pa), joiner.feed(b"room", pb)]
    out += [joiner.feed(b"room", p) for p in parts_a[len(parts_b) :]]
    assert len(parts_b) < len(parts_a)
    assert [r for r in out if r is not None] == [b, a]  # b is complete first


def test_same_message_id_under_two_keys_does_not_mix() -> None:
    a, b = os.urandom(3000), os.urandom(3000)
    joiner = Joiner()
    for pa, pb in zip(wrap(a, 1000, 9), wrap(b, 1000, 9), strict=True):
        got_a, got_b = joiner.feed(b"room-a", pa), joiner.feed(b"room-b", pb)
    assert (got_a, got_b) == (a, b)


def test_a_redelivered_part_is_counted_and_does_not_corrupt_the_record() -> None:
    record = os.urandom(2500)
    p0, p1, p2 = wrap(record, 1000, 3)
    joiner = Joiner()
    assert joiner.feed(b"k", p0) is None
    assert joiner.feed(b"k", p0) is None
    assert joiner.feed(b"k", p1) is None
    assert joiner.feed(b"k", p2) == record
    assert joiner.duplicate_parts == 1


def test_records_whose_parts_never_all_come_are_abandoned_within_the_bound() -> None:
    joiner = Joiner(max_pending=3, max_bytes=1 << 20)
    for message_id in range(10):
        first, *_ = wrap(os.urandom(2500), 1000, message_id)  # the producer died after the first part
        joiner.feed(b"k", first)
    assert joiner.pending == 3 and joiner.abandoned == 7
    record = os.urandom(2500)
    assert [joiner.feed(b"k", p) for p in wrap(record, 1000, 99)][-1] == record


def test_the_byte_bound_abandons_the_oldest() -> None:
    joiner = Joiner(max_pending=100, max_bytes=5000)
    for message_id in range(5):
        joiner.feed(b"k", wrap(os.urandom(4000), 2000, message_id)[0])
    assert joiner.abandoned >= 3 and joiner.pending <= 2


@pytest.mark.parametrize("garbage", [b"", b"H", b"X\x01\x00abc", b"H\x01\x07abc", b"H\x01\x01short"])
def test_garbage_is_an_envelope_error(garbage: bytes) -> None:
    with pytest.raises(EnvelopeError):
        Joiner().feed(b"k", garbage)


def test_a_later_version_says_which() -> None:
    (value,) = wrap(b"record", 100, 1)
    later = value[:1] + bytes([VERSION + 1]) + value[2:]
    with pytest.raises(UnknownVersion) as caught:
        Joiner().feed(b"k", later)
    assert caught.value.version == VERSION + 1


def test_parts_that_disagree_on_their_count_are_refused_and_forgotten() -> None:
    joiner = Joiner()
    joiner.feed(b"k", wrap(os.urandom(2500), 1000, 5)[0])  # 1 of 3
    with pytest.raises(EnvelopeError):
        joiner.feed(b"k", wrap(os.urandom(1500), 1000, 5)[1])  # 2 of 2, same id
    assert joiner.pending == 0


def test_a_max_value_too_small_for_a_part_is_refused() -> None:
    with pytest.raises(ValueError):
        wrap(os.urandom(100), 15, 1)
