"""The producer's on-disk buffer: order, the byte bound, segments deleted once acknowledged, a restart that
resends only what was not acknowledged, and a torn last entry (kill -9 mid-write) cut off, not fatal."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from huddle.recording.outbox import MAGIC, SUFFIX, Entry, Outbox, encode_entry, scan


def _segments(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(SUFFIX))


def _value(i: int) -> bytes:
    return f"value {i} ".encode() * (1 + i % 7)


async def _read_all(outbox: Outbox, batch: int = 7) -> list[Entry]:
    got: list[Entry] = []
    for _ in range(10_000):
        if not outbox.unread:
            break
        got.extend(await outbox.read(batch, 1 << 20))
    return got


def test_scan_finds_every_whole_entry_and_cuts_a_torn_one_at_any_byte() -> None:
    entries = [(b"room-%d" % i, _value(i)) for i in range(5)]
    data = MAGIC + b"".join(encode_entry(k, v) for k, v in entries)
    whole = scan(data)
    assert not whole.torn and whole.end == len(data) and len(whole.ends) == 5
    last_start = whole.ends[3]
    for cut in range(last_start + 1, len(data)):  # the last entry torn after every one of its bytes
        torn = scan(data[:cut])
        assert torn.torn and torn.end == last_start and torn.ends == whole.ends[:4]


def test_scan_stops_at_a_corrupt_entry() -> None:
    data = bytearray(MAGIC + encode_entry(b"k", b"first") + encode_entry(b"k", b"second"))
    data[-2] ^= 0xFF  # a flipped bit in the second value: the checksum says so
    scanned = scan(bytes(data))
    assert scanned.torn and len(scanned.ends) == 1


async def test_entries_come_back_in_order_across_segments(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, 1 << 20, segment_bytes=1024)
    await outbox.open()
    sent = [(f"room-{i % 3}".encode(), _value(i)) for i in range(500)]
    for key, value in sent:
        assert outbox.append(key, value)
    got = await _read_all(outbox)
    assert [(e.key, e.value) for e in got] == sent
    assert len(_segments(tmp_path)) > 10  # it did roll over: the order held across files
    await outbox.close()


async def test_a_segment_is_deleted_only_when_all_of_it_is_acknowledged(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, 1 << 20, segment_bytes=512)
    await outbox.open()
    for i in range(100):
        outbox.append(b"k", _value(i))
    got = await _read_all(outbox)
    first_seq = got[0].seq
    in_first = [e for e in got if e.seq == first_seq]
    later = [e for e in got if e.seq != first_seq]
    first_file = tmp_path / f"{first_seq:020d}{SUFFIX}"
    # Acknowledgements arrive out of order (several partitions): later segments first.
    for entry in later:
        outbox.done(entry)
    for entry in in_first[:-1]:
        outbox.done(entry)
    await outbox.read(1, 1)  # a round trip through the outbox's thread: deletions submitted are done
    assert first_file.exists()
    assert outbox.bytes > 0
    outbox.done(in_first[-1])
    outbox.seal()  # the last segment is the one being written: sealing lets it go too
    await outbox.close()
    assert _segments(tmp_path) == []
    assert outbox.bytes == 0 and outbox.entries == 0


async def test_append_refuses_beyond_the_bound_and_takes_again_when_space_frees(tmp_path: Path) -> None:
    bound = 10_000
    outbox = Outbox(tmp_path, bound, segment_bytes=2000)
    await outbox.open()
    accepted = 0
    for _ in range(100):
        if outbox.append(b"k", bytes(500)):
            accepted += 1
        assert outbox.bytes <= bound
    assert 15 <= accepted < 100
    assert not outbox.append(b"k", bytes(500))
    for entry in await _read_all(outbox):
        outbox.done(entry)
    outbox.seal()
    assert outbox.bytes == 0
    assert outbox.append(b"k", bytes(500))
    await outbox.close()
    on_disk = sum(p.stat().st_size for p in _segments(tmp_path))
    assert on_disk <= bound + len(MAGIC) * 2


async def test_a_new_outbox_on_the_folder_resends_only_what_was_not_acknowledged(tmp_path: Path) -> None:
    first = Outbox(tmp_path, 1 << 20, segment_bytes=100_000)
    await first.open()
    for i in range(50):
        first.append(b"k", _value(i))
    got = await first.read(20, 1 << 20)
    for entry in got[:10]:
        first.done(entry)
    first.done(got[15])  # acknowledged, but after a gap: it is sent again (at least once)
    await first.close()

    second = Outbox(tmp_path, 1 << 20)
    await second.open()
    assert second.unread == 40
    again = await _read_all(second)
    assert [e.value for e in again] == [_value(i) for i in range(10, 50)]
    for entry in again:
        second.done(entry)
    await second.close()
    assert _segments(tmp_path) == []


async def test_a_torn_last_entry_is_dropped_and_the_rest_is_sent(tmp_path: Path) -> None:
    first = Outbox(tmp_path, 1 << 20)
    await first.open()
    for i in range(20):
        first.append(b"k", _value(i))
    await first.close()
    (segment,) = _segments(tmp_path)
    size = segment.stat().st_size
    with segment.open("r+b") as file:  # kill -9 in the middle of writing the last entry
        file.truncate(size - 3)

    second = Outbox(tmp_path, 1 << 20)
    await second.open()
    assert second.torn == 1 and second.unread == 19
    second.append(b"k", b"after the restart")
    got = await _read_all(second)
    assert [e.value for e in got] == [_value(i) for i in range(19)] + [b"after the restart"]
    await second.close()


async def test_garbage_in_the_folder_is_not_fatal(tmp_path: Path) -> None:
    (tmp_path / f"{3:020d}{SUFFIX}").write_bytes(os.urandom(100))
    (tmp_path / "cursor").write_text("not a cursor")
    outbox = Outbox(tmp_path, 1 << 20)
    await outbox.open()
    assert outbox.unread == 0
    outbox.append(b"k", b"v")
    (entry,) = await outbox.read(10, 1 << 20)
    assert entry.seq > 3  # numbering goes on after what was there
    await outbox.close()


async def test_a_reserved_slot_is_read_before_what_was_appended_after_it(tmp_path: Path) -> None:
    first = Outbox(tmp_path, 1 << 20)
    await first.open()
    first.append(b"k", b"a")
    slot = first.reserve()
    first.append(b"k", b"c")
    await first.insert(slot, [(b"k", b"b1"), (b"k", b"b2")])
    await first.close()

    second = Outbox(tmp_path, 1 << 20)
    await second.open()
    assert [e.value for e in await _read_all(second)] == [b"a", b"b1", b"b2", b"c"]
    await second.close()


@pytest.mark.parametrize("batch", [1, 1000])
async def test_entries_appended_while_reading_keep_their_place(tmp_path: Path, batch: int) -> None:
    outbox = Outbox(tmp_path, 1 << 20, segment_bytes=300)
    await outbox.open()
    got: list[bytes] = []
    for i in range(200):
        outbox.append(b"k", b"%d" % i)
        if i % 3 == 0:
            got.extend(e.value for e in await outbox.read(batch, 1 << 20))
    got.extend(e.value for e in await _read_all(outbox))
    assert got == [b"%d" % i for i in range(200)]
    await outbox.close()
