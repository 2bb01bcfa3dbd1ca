"""The recording producer's on-disk buffer: Kafka messages waiting for Kafka, in order, within a bound.

When Kafka is slow or away, KafkaLog appends the messages it cannot hand to the producer here, and sends
them back, oldest first, when there is room again. The outbox survives the process: a new KafkaLog on the
same folder sends what the last one left before anything new.

On disk: append-only segment files `<seq>.seg` (seq a decimal number; files are read in seq order), each
a 4-byte header (b"HOB" + format version) followed by entries

    crc32 (4) | key length (2) | value length (4) | key | value        (big-endian; crc over the rest)

and a file `cursor` (seq and offset as text) that says up to where the segment `seq` is acknowledged, so
that a restart does not send that part again. A segment is deleted once every entry of it is acknowledged
(`done`). A kill -9 in the middle of a write leaves a torn last entry: its length runs past the end of the
file or its checksum fails; the scan at `open` cuts the file there, and the entry is lost (it was never
acknowledged to anyone). Writes are not fsynced one by one (a crashed process keeps what the kernel has;
a crashed machine may lose the last seconds): `close` fsyncs.

The file format is plain functions (`encode_entry`, `scan`) and the file operations a class of its own
(`Segments`, blocking), so that both are tested without Kafka and without an event loop. `Outbox` is the
asyncio face: `append` is cheap and synchronous (called per message from the event loop), all file I/O
happens on one thread of its own, in submission order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from huddle.logs import event

__all__ = ["ENTRY_OVERHEAD", "Entry", "Outbox", "Segments", "encode_entry", "scan"]

MAGIC = b"HOB\x01"
_HEAD = struct.Struct("!IHI")  # crc32, key length, value length
ENTRY_OVERHEAD = _HEAD.size
MAX_VALUE = 64 << 20  # a value longer than this is a corrupt length, not a message
SUFFIX = ".seg"
CURSOR = "cursor"
CURSOR_DELAY = 0.2  # seconds: the cursor file is rewritten at most this often

log = logging.getLogger("huddle.recording.outbox")
_T = TypeVar("_T")


def encode_entry(key: bytes, value: bytes) -> bytes:
    lengths = struct.pack("!HI", len(key), len(value))
    crc = zlib.crc32(value, zlib.crc32(key, zlib.crc32(lengths)))
    return struct.pack("!I", crc) + lengths + key + value


@dataclass(frozen=True, slots=True)
class Scanned:
    """What a segment holds: `ends` is the offset after each whole entry, `end` the end of the last one;
    `torn` says bytes followed that are not a whole, intact entry."""

    ends: list[int]
    end: int
    torn: bool


def scan(data: bytes) -> Scanned:
    """Check a segment's bytes entry by entry; stop at the first entry that is cut short or corrupt."""
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        return Scanned([], 0, torn=bool(data))
    offset = len(MAGIC)
    ends: list[int] = []
    view = memoryview(data)
    while offset < len(data):
        if offset + _HEAD.size > len(data):
            break
        crc, key_len, value_len = _HEAD.unpack_from(data, offset)
        end = offset + _HEAD.size + key_len + value_len
        if value_len > MAX_VALUE or end > len(data):
            break
        if zlib.crc32(view[offset + 4 : end]) != crc:
            break
        ends.append(end)
        offset = end
    return Scanned(ends, offset, torn=offset < len(data))


def segment_name(seq: int) -> str:
    return f"{seq:020d}{SUFFIX}"


@dataclass(frozen=True, slots=True)
class Recovered:
    """A segment found at open: its entries from `start` (after the cursor) to `end`."""

    seq: int
    start: int
    end: int
    entries: int
    bytes: int  # the entries' encoded size
    torn: bool


class Segments:
    """The segment files of one folder. Blocking: the Outbox calls it from its own thread only."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._writing: tuple[int, BinaryIO] | None = None
        self._reading: tuple[int, BinaryIO] | None = None

    def path(self, seq: int) -> Path:
        return self.directory / segment_name(seq)

    def recover(self) -> tuple[list[Recovered], int]:
        """The segments left by an earlier run, torn tails cut off, in order; and the first free seq."""
        self.directory.mkdir(parents=True, exist_ok=True)
        cursor = self._load_cursor()
        seqs = sorted(
            int(p.name.removesuffix(SUFFIX))
            for p in self.directory.iterdir()
            if p.name.endswith(SUFFIX) and p.name.removesuffix(SUFFIX).isdigit()
        )
        found: list[Recovered] = []
        for seq in seqs:
            path = self.path(seq)
            data = path.read_bytes()
            scanned = scan(data)
            if scanned.torn:
                with path.open("r+b") as file:
                    file.truncate(scanned.end)
            start = len(MAGIC)
            if cursor is not None and cursor[0] == seq and cursor[1] in scanned.ends:
                start = cursor[1]
            ends = [end for end in scanned.ends if end > start]
            if not ends:
                path.unlink()
                continue
            found.append(Recovered(seq, start, ends[-1], len(ends), ends[-1] - start, scanned.torn))
        next_seq = max([*seqs, cursor[0] if cursor else -1]) + 1
        return found, next_seq

    def _load_cursor(self) -> tuple[int, int] | None:
        try:
            seq, offset = (self.directory / CURSOR).read_text().split()
            return int(seq), int(offset)
        except (OSError, ValueError):
            return None

    def save_cursor(self, seq: int, offset: int) -> None:
        tmp = self.directory / (CURSOR + ".tmp")
        tmp.write_text(f"{seq} {offset}\n")
        tmp.replace(self.directory / CURSOR)

    def write(self, batch: list[tuple[int, bytes, bytes]]) -> None:
        """Append (seq, key, value) entries, each to its segment, in order."""
        for seq, chunk in _by_segment(batch):
            self._file_for(seq).write(chunk)

    def _file_for(self, seq: int) -> BinaryIO:
        if self._writing is not None:
            if self._writing[0] == seq:
                return self._writing[1]
            self._writing[1].close()
        path = self.path(seq)
        fresh = not path.exists()
        file = path.open("ab", buffering=0)  # unbuffered: a reader on the same file sees every write
        if fresh:
            file.write(MAGIC)
        self._writing = (seq, file)
        return file

    def read(self, seq: int, offset: int, count: int) -> list[tuple[bytes, bytes, int]]:
        """`count` entries of segment `seq` from `offset`, as (key, value, offset after it)."""
        if self._reading is None or self._reading[0] != seq:
            self._close_reader()
            self._reading = (seq, self.path(seq).open("rb"))
        file = self._reading[1]
        file.seek(offset)
        out: list[tuple[bytes, bytes, int]] = []
        for _ in range(count):
            head = file.read(_HEAD.size)
            if len(head) < _HEAD.size:
                raise OSError(f"outbox segment {seq} ends before its entry at {offset}")
            _, key_len, value_len = _HEAD.unpack(head)
            body = file.read(key_len + value_len)
            offset += _HEAD.size + len(body)
            out.append((body[:key_len], body[key_len:], offset))
        return out

    def delete(self, seq: int) -> None:
        if self._writing is not None and self._writing[0] == seq:
            self._writing[1].close()
            self._writing = None
        if self._reading is not None and self._reading[0] == seq:
            self._close_reader()
        with contextlib.suppress(FileNotFoundError):
            self.path(seq).unlink()

    def _close_reader(self) -> None:
        if self._reading is not None:
            self._reading[1].close()
            self._reading = None

    def close(self) -> None:
        if self._writing is not None:
            os.fsync(self._writing[1].fileno())
            self._writing[1].close()
            self._writing = None
        self._close_reader()
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _by_segment(batch: list[tuple[int, bytes, bytes]]) -> Iterator[tuple[int, bytes]]:
    """Consecutive entries of one segment joined into one write."""
    i = 0
    while i < len(batch):
        seq = batch[i][0]
        j = i
        while j < len(batch) and batch[j][0] == seq:
            j += 1
        yield seq, b"".join(encode_entry(key, value) for _, key, value in batch[i:j])
        i = j


class Entry:
    """A message read back from the outbox; `Outbox.done(entry)` once Kafka has acknowledged it."""

    __slots__ = ("done", "end", "key", "seq", "value")

    def __init__(self, key: bytes, value: bytes, seq: int, end: int) -> None:
        self.key = key
        self.value = value
        self.seq = seq
        self.end = end
        self.done = False


class _Segment:
    __slots__ = ("bytes", "done", "entries", "lost", "read", "read_offset", "sealed")

    def __init__(self, read_offset: int, entries: int = 0, size: int = 0, sealed: bool = False) -> None:
        self.entries = entries  # appended (written, or queued for writing)
        self.bytes = size
        self.read = 0  # entries handed out by read()
        self.read_offset = read_offset
        self.done = 0  # entries acknowledged, counted in order (the acknowledged prefix)
        self.lost = 0  # entries that could not be read back (a disk error)
        self.sealed = sealed  # no more appends: deleted once all its entries are done


class Outbox:
    """Messages waiting for Kafka, on disk, in order, within `max_bytes`.

    `append` (synchronous, cheap) refuses a message that would take the outbox over `max_bytes`, or the
    backlog not yet written over `max_backlog` bytes (the disk cannot keep up); the caller drops and counts
    it. `read` hands out the oldest messages not yet handed out; `done` acknowledges one; a segment is
    deleted when all of it is acknowledged. A message handed out but never acknowledged in this run is
    sent again by the next one (at least once).
    """

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        *,
        segment_bytes: int = 16 << 20,
        max_backlog: int = 32 << 20,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.max_backlog = max_backlog
        self._files = Segments(directory)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="huddle-outbox")
        self._segments: dict[int, _Segment] = {}  # in seq order
        self._next_seq = 0
        self._write_seq: int | None = None  # the segment appends go to
        self._pending: list[tuple[int, bytes, bytes]] = []  # appended, not yet given to the thread
        self._backlog = 0  # bytes appended and not yet written
        self._writes: set[asyncio.Future[None]] = set()
        self._handed_out: deque[Entry] = deque()
        self._bytes = 0
        self._unread = 0
        self._cursor: tuple[int, int] | None = None
        self._cursor_timer: asyncio.TimerHandle | None = None
        self.recovered_entries = 0
        self.torn = 0  # segments found with a torn or corrupt tail at open
        self.lost = 0  # entries lost to disk errors (writing or reading back)

    @property
    def bytes(self) -> int:
        """Encoded size of the entries not yet acknowledged (counted against `max_bytes`)."""
        return self._bytes

    @property
    def entries(self) -> int:
        return sum(s.entries - s.done for s in self._segments.values())

    @property
    def unread(self) -> int:
        """Entries not yet handed out by `read`."""
        return self._unread

    async def open(self) -> None:
        found, self._next_seq = await self._run(self._files.recover)
        for seg in found:
            self._segments[seg.seq] = _Segment(seg.start, seg.entries, seg.bytes, sealed=True)
            self._bytes += seg.bytes
            self._unread += seg.entries
            self.recovered_entries += seg.entries
            self.torn += seg.torn

    def append(self, key: bytes, value: bytes) -> bool:
        size = ENTRY_OVERHEAD + len(key) + len(value)
        if self._bytes + size > self.max_bytes or self._backlog + size > self.max_backlog:
            return False
        seg = self._segments.get(self._write_seq) if self._write_seq is not None else None
        if seg is None or seg.sealed or seg.bytes >= self.segment_bytes:
            if seg is not None:
                self._seal(seg, self._write_seq)  # type: ignore[arg-type]
            self._write_seq = self._next_seq
            self._next_seq += 1
            seg = self._segments[self._write_seq] = _Segment(len(MAGIC))
        seg.entries += 1
        seg.bytes += size
        self._bytes += size
        self._backlog += size
        self._unread += 1
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._submit_writes)
        self._pending.append((self._write_seq, key, value))
        return True

    def reserve(self) -> int:
        """A seq for `insert` later: it sorts after every segment so far and before every later one."""
        self.seal()
        seq = self._next_seq
        self._next_seq += 1
        return seq

    async def insert(self, seq: int, entries: list[tuple[bytes, bytes]]) -> None:
        """Write entries into the reserved segment `seq`, for the next run: this run reads no further."""
        if entries:
            await self._run(self._files.write, [(seq, key, value) for key, value in entries])

    def seal(self) -> None:
        """Later appends start a new segment, so that this one is deleted once all of it is done."""
        if self._write_seq is not None:
            seg = self._segments.get(self._write_seq)
            if seg is not None:
                self._seal(seg, self._write_seq)
            self._write_seq = None

    def _seal(self, seg: _Segment, seq: int) -> None:
        seg.sealed = True
        if seg.done + seg.lost == seg.entries:
            self._delete(seq)

    def _submit_writes(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        size = sum(ENTRY_OVERHEAD + len(key) + len(value) for _, key, value in batch)
        future = self._run(self._files.write, batch)
        self._writes.add(future)

        def written(f: asyncio.Future[None]) -> None:
            self._writes.discard(f)
            self._backlog -= size
            if not f.cancelled() and f.exception() is not None:
                # Reading these back fails too, and counts them as lost there.
                event(log, logging.ERROR, "outbox write failed", error=str(f.exception()), entries=len(batch))

        future.add_done_callback(written)

    async def read(self, max_entries: int, max_bytes: int) -> list[Entry]:
        """The oldest entries not yet handed out (at least one when `unread`), in order."""
        out: list[Entry] = []
        size = 0
        for seq, seg in list(self._segments.items()):
            if len(out) >= max_entries or size >= max_bytes:
                break
            want = min(seg.entries - seg.read, max_entries - len(out))
            if want <= 0:
                continue
            self._submit_writes()  # what is read must be written first (the thread runs jobs in order)
            seg.read += want
            self._unread -= want
            try:
                got = await self._run(self._files.read, seq, seg.read_offset, want)
            except OSError as exc:
                self._lose(seq, seg, exc)
                continue
            for key, value, end in got:
                out.append(Entry(key, value, seq, end))
                size += len(value)
            seg.read_offset = got[-1][2]
            self._handed_out.extend(out[-len(got) :])
        return out

    def _lose(self, seq: int, seg: _Segment, exc: OSError) -> None:
        """A segment that cannot be read back: the rest of it is lost (counted), the outbox goes on."""
        handed_out = seg.done + sum(entry.seq == seq for entry in self._handed_out)
        lost = seg.entries - handed_out
        self._unread -= seg.entries - seg.read
        seg.read = seg.entries
        seg.lost = lost
        self.lost += lost
        event(
            log,
            logging.ERROR,
            "outbox segment unreadable: its unsent entries are lost",
            seq=seq,
            lost=lost,
            error=str(exc),
        )
        if seq == self._write_seq:
            self._write_seq = None
        self._seal(seg, seq)

    def done(self, entry: Entry) -> None:
        entry.done = True
        handed_out = self._handed_out
        while handed_out and handed_out[0].done:
            first = handed_out.popleft()
            seg = self._segments[first.seq]
            seg.done += 1
            self._cursor = (first.seq, first.end)
            if seg.sealed and seg.done + seg.lost == seg.entries:
                self._delete(first.seq)
        if self._cursor_timer is None and self._cursor is not None:
            self._cursor_timer = asyncio.get_running_loop().call_later(CURSOR_DELAY, self._save_cursor)

    def _delete(self, seq: int) -> None:
        seg = self._segments.pop(seq)
        self._bytes -= seg.bytes
        self._spawn(self._run(self._files.delete, seq))

    def _save_cursor(self) -> None:
        self._cursor_timer = None
        if self._cursor is not None:
            self._spawn(self._run(self._files.save_cursor, *self._cursor))

    def _spawn(self, future: asyncio.Future[None]) -> None:
        self._writes.add(future)

        def finished(f: asyncio.Future[None]) -> None:
            self._writes.discard(f)
            if not f.cancelled() and f.exception() is not None:
                event(log, logging.WARNING, "outbox file operation failed", error=str(f.exception()))

        future.add_done_callback(finished)

    async def close(self) -> None:
        """Write everything appended, save the cursor, fsync. Entries not done stay for the next run."""
        if self._cursor_timer is not None:
            self._cursor_timer.cancel()
            self._cursor_timer = None
        self._save_cursor()
        self._submit_writes()
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)  # each logged its own failure
        await self._run(self._files.close)
        self._thread.shutdown(wait=True)

    def _run(self, fn: Callable[..., _T], /, *args: Any) -> asyncio.Future[_T]:
        """Submits at once (not when awaited): the thread runs jobs in the order they are asked for."""
        return asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)
