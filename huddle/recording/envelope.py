"""How a record travels as Kafka message values: versioned, and split when it is larger than a message may be.

A Kafka message is at most `message.max.bytes` (1 MiB by default, on the broker and in the clients); a VP8
keyframe at 1080p can be larger. So each value is an envelope around an encoded record
(huddle.recording.records):

    b"H" | version (1) | kind | ...
    kind 0, whole:  the record
    kind 1, a part: message id (8, unique per producer run), index (2), count (2), then a slice of the record

The parts of one record are published under the same key, so they stay in order in one partition, next to
each other unless another node's records of the same call interleave; the consumer (`Joiner`) puts them
back together. A part whose siblings never come (the producer died between them) is dropped after a bound
on memory and on count, and counted.

No I/O here: bytes in, bytes out (sans-I/O), as every codec of this project.
"""

from __future__ import annotations

import struct
from collections import OrderedDict

__all__ = ["VERSION", "EnvelopeError", "Joiner", "UnknownVersion", "wrap"]

MAGIC = 0x48  # "H"
VERSION = 1
WHOLE = 0
PART = 1
_HEAD = struct.Struct("!BBB")
_PART = struct.Struct("!BBBQHH")
MAX_PARTS = 1024  # a record of more than 1024 parts (1 GiB at 1 MiB) is not one we make


class EnvelopeError(ValueError):
    """Bytes that are not an envelope (garbage on the topic)."""


class UnknownVersion(EnvelopeError):
    """An envelope of a later version than this code reads: skip it, and say which version it was."""

    def __init__(self, version: int) -> None:
        super().__init__(f"recording envelope version {version}; this consumer reads version {VERSION}")
        self.version = version


def wrap(record: bytes, max_value: int, message_id: int) -> list[bytes]:
    """The values to publish for one encoded record: one when it fits in `max_value` bytes, else parts
    (all but the last exactly `max_value` long). `message_id` tells one record's parts from another's."""
    if len(record) + _HEAD.size <= max_value:
        return [_HEAD.pack(MAGIC, VERSION, WHOLE) + record]
    room = max_value - _PART.size
    if room < 1:
        raise ValueError(f"max_value {max_value} is too small for a part")
    count = -(-len(record) // room)
    if count > MAX_PARTS:
        raise ValueError(f"a record of {len(record)} bytes would need {count} parts (at most {MAX_PARTS})")
    view = memoryview(record)
    return [
        _PART.pack(MAGIC, VERSION, PART, message_id & 0xFFFF_FFFF_FFFF_FFFF, index, count)
        + view[index * room : (index + 1) * room]
        for index in range(count)
    ]


class Joiner:
    """Unwraps values read from the topic: `feed` returns the record when it is whole, None while parts are
    missing; raises EnvelopeError (UnknownVersion) on values it cannot read. Incomplete records are kept up
    to `max_pending` of them and `max_bytes` in all; the oldest goes first (counted in `abandoned`)."""

    def __init__(self, max_pending: int = 64, max_bytes: int = 64 << 20) -> None:
        self.max_pending = max_pending
        self.max_bytes = max_bytes
        self._parts: OrderedDict[tuple[bytes, int], list[bytes | None]] = OrderedDict()
        self._bytes = 0
        self.joined = 0  # records made of parts
        self.abandoned = 0  # incomplete records given up
        self.duplicate_parts = 0

    @property
    def pending(self) -> int:
        return len(self._parts)

    def feed(self, key: bytes, value: bytes) -> bytes | None:
        if len(value) < _HEAD.size or value[0] != MAGIC:
            raise EnvelopeError("not a recording envelope")
        if value[1] != VERSION:
            raise UnknownVersion(value[1])
        kind = value[2]
        if kind == WHOLE:
            return value[_HEAD.size :]
        if kind != PART or len(value) < _PART.size:
            raise EnvelopeError(f"recording envelope of unknown kind {kind}")
        _, _, _, message_id, index, count = _PART.unpack_from(value)
        if not 0 < count <= MAX_PARTS or index >= count:
            raise EnvelopeError(f"recording envelope part {index} of {count}")
        slot = (key, message_id)
        parts = self._parts.get(slot)
        if parts is None:
            parts = self._parts[slot] = [None] * count
        elif len(parts) != count:
            self._forget(slot)
            raise EnvelopeError(f"recording envelope parts disagree on their count ({len(parts)}, {count})")
        if parts[index] is not None:
            self.duplicate_parts += 1  # redelivered (at least once): the first copy stands
            return None
        chunk = value[_PART.size :]
        parts[index] = chunk
        self._bytes += len(chunk)
        if all(part is not None for part in parts):
            self._forget(slot)
            self.joined += 1
            return b"".join(parts)  # type: ignore[arg-type]
        while len(self._parts) > self.max_pending or self._bytes > self.max_bytes:
            self._forget(next(iter(self._parts)))
            self.abandoned += 1
        return None

    def _forget(self, slot: tuple[bytes, int]) -> None:
        parts = self._parts.pop(slot)
        self._bytes -= sum(len(p) for p in parts if p is not None)
