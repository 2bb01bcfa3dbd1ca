"""The recording log: the seam between the recorder (inside the SFU) and the consumers that write files.

The recorder publishes one entry per record (huddle.recording.records, encoded to bytes), keyed by chat id
(the room name); consumers (the per-track writer, the compositor) read the entries back. The shape is
Kafka's on purpose: with `--kafka`, a `KafkaLog` (a topic partitioned by chat id) replaces the in-process
queue without the recorder changing, and `huddle record-consumer` reads the topic with the same writer:

- **An entry is a key and a value**: `key` is the chat id, `value` is opaque bytes.
- **Order is kept per key, and only per key.** Everything published under one key is delivered in the order
  it was published (Kafka: one key → one partition, ordered). Entries of different keys may interleave in
  any order; consumers must not rely on an order across keys.
- **Publishing never blocks and never awaits.** `publish` is called from synchronous per-packet code on the
  event loop. The log is bounded: when it is full the entry is dropped and counted (`dropped`), with one
  warning logged the first time. A dropped entry is a gap in its key's sequence, never a reordering;
  consumers must tolerate gaps (a missing frame, or even a missing control record).
- **Delivery is at least once.** `records()` yields each entry once during a run; across a restart (KafkaLog:
  a new consumer of the group) entries after the last `commit()` are delivered again. Consumers must
  therefore tolerate duplicates. `commit()` says "everything `records()` has yielded so far is processed";
  it does not block (a KafkaLog snapshots its positions and commits them from its own task).
- **One consumer per log object.** `records()` may be iterated by one task at a time (Kafka: one member of a
  consumer group per partition).
- **Closing:** `close()` stops the log: later `publish` calls are dropped (and counted), and `records()`
  ends. The in-process log first delivers everything published before `close()`; a KafkaLog stops at its
  position and leaves the rest to the next consumer of the group (that is where at-least-once comes in).

The in-process log lives on one event loop: `publish` must be called from that loop's thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from huddle.logs import event

__all__ = ["InProcessLog", "ReadableLog", "RecordingLog"]

log = logging.getLogger("huddle.recording")

DEFAULT_MAX_PENDING = 20_000  # entries: ~1 minute of one participant's frames, or 4 s of 60 participants'
DEFAULT_MAX_PENDING_BYTES = 64 * 1024 * 1024


@runtime_checkable
class RecordingLog(Protocol):
    """What the recorder publishes to: the in-process log, or Kafka (huddle.recording.kafka_log). See the
    module docstring for the contract (per-key order, bounded non-blocking publish, at-least-once)."""

    @property
    def dropped(self) -> int:
        """Entries dropped at publish time (log full, or closed)."""
        ...

    def publish(self, key: str, value: bytes) -> None:
        """Append one entry; never blocks, never raises on overflow (drops and counts instead)."""
        ...

    async def close(self) -> None: ...

    def stats(self) -> dict[str, int]:
        """Counters: at least published, dropped, pending."""
        ...


@runtime_checkable
class ReadableLog(RecordingLog, Protocol):
    """A log read back in the same process (the embedded mode's TrackConsumer). A Kafka topic is read by
    `huddle record-consumer` instead, partition by partition (huddle.recording.record_consumer)."""

    def records(self) -> AsyncIterator[tuple[str, bytes]]:
        """The entries, as (key, value), in per-key order; ends after `close()`."""
        ...

    def commit(self) -> None:
        """Everything `records()` has yielded so far is processed (a restart resumes after it)."""
        ...


_END = object()  # queued by close(): the consumer stops when it reaches it


class InProcessLog:
    """The embedded mode's log: a bounded FIFO (asyncio.Queue) on the event loop.

    One FIFO for all keys keeps the order of every key. The bound is on entries (`max_pending`) and on
    bytes (`max_pending_bytes`), counted from publish until the consumer takes the entry; an entry that
    would go over either is dropped. Nothing survives the process, so `commit()` does nothing.
    """

    def __init__(
        self, max_pending: int = DEFAULT_MAX_PENDING, max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES
    ) -> None:
        if max_pending < 1 or max_pending_bytes < 1:
            raise ValueError("max_pending and max_pending_bytes must be positive")
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        # Unbounded as a queue: the bound is enforced in publish(), so that close() can always queue _END.
        self._queue: asyncio.Queue[tuple[str, bytes] | object] = asyncio.Queue()
        self._pending_bytes = 0
        self._closed = False
        self._end_queued = False  # _END is in the queue, not yet taken
        self._consuming = False
        self._warned = False
        self.published = 0
        self.delivered = 0
        self._dropped = 0
        self.dropped_bytes = 0
        self.high_water = 0  # the most entries ever pending at once

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def pending(self) -> int:
        return self._queue.qsize() - self._end_queued

    @property
    def closed(self) -> bool:
        return self._closed

    def publish(self, key: str, value: bytes) -> None:
        size = len(value)
        queue = self._queue
        if (
            self._closed
            or queue.qsize() >= self.max_pending
            or self._pending_bytes + size > self.max_pending_bytes
        ):
            self._drop(key, size)
            return
        queue.put_nowait((key, value))
        self._pending_bytes += size
        self.published += 1
        depth = queue.qsize()
        if depth > self.high_water:
            self.high_water = depth

    def _drop(self, key: str, size: int) -> None:
        self._dropped += 1
        self.dropped_bytes += size
        if not self._warned:
            self._warned = True
            event(
                log,
                logging.WARNING,
                "recording log full: dropping entries (counted in dropped; warned once)",
                key=key,
                closed=self._closed,
                pending=self._queue.qsize(),
                pending_bytes=self._pending_bytes,
                max_pending=self.max_pending,
                max_pending_bytes=self.max_pending_bytes,
            )

    async def records(self) -> AsyncIterator[tuple[str, bytes]]:
        if self._consuming:
            raise RuntimeError("this log already has a consumer")
        self._consuming = True
        queue = self._queue
        try:
            while True:
                if self._closed and not self._end_queued:
                    return  # closed, and an earlier consumer already took everything
                entry = await queue.get()
                if entry is _END:
                    self._end_queued = False
                    return
                key, value = entry  # type: ignore[misc]
                self._pending_bytes -= len(value)
                self.delivered += 1
                yield key, value
        finally:
            self._consuming = False

    def commit(self) -> None:
        """Nothing to persist: an in-process log does not outlive its consumer."""

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._end_queued = True
        self._queue.put_nowait(_END)

    def stats(self) -> dict[str, int]:
        return {
            "published": self.published,
            "delivered": self.delivered,
            "dropped": self._dropped,
            "dropped_bytes": self.dropped_bytes,
            "pending": self.pending,
            "pending_bytes": self._pending_bytes,
            "high_water": self.high_water,
        }
