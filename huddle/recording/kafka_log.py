"""Publishing the recording log to Kafka: the node sends the recorder's records to a topic keyed by chat id.

`KafkaLog.publish(key, value)` is called synchronously, per frame, from the event loop, so it never blocks
and never raises. Each record is wrapped into one or more message values (huddle.recording.envelope: a
record larger than `max_message_bytes` becomes several parts, under the same key) and handed to
confluent-kafka's producer (librdkafka): acks from all in-sync replicas, the idempotent producer (no
duplicates or reordering from its own retries), Java's murmur2 partitioner so that every client of the topic
puts a key in the same partition, and retries forever (`message.timeout.ms` 0): the bound is the disk.

States (`state`, and in `stats()`):
- "live": messages go straight into librdkafka's memory queue (`memory_bytes`).
- "buffering": Kafka is away (librdkafka says all brokers are down) or slow (its queue is full): this message
  and every later one go to the on-disk outbox (huddle.recording.outbox), in order; a drain task feeds the
  outbox back into the producer, oldest first, as room appears, and returns to "live" only when the outbox
  is empty. Per-key order holds: librdkafka's queue holds the older messages, the outbox the newer ones.
  While Kafka is away the drain keeps a single message in librdkafka (a probe whose acknowledgement says
  Kafka is back), so that the outage's records wait on disk, not in memory.
- "dropping": the outbox is at `max_buffer_bytes`: records are dropped and counted (one warning).

`close()` waits a little for Kafka, then takes back what librdkafka still holds (purge) and keeps it in the
outbox, in its place, for the next KafkaLog on the same `buffer_dir`, which sends all of it before anything
new. A message is acknowledged-or-on-disk across a close; across a kill -9, what librdkafka held in memory
and Kafka had not acknowledged is lost (the outbox's own entries are not), and a message may be sent twice
(at least once: the consumer tolerates duplicates).

librdkafka's own log is routed to Python logging at debug level; what matters reaches us through its error
callback and becomes one structured warning per outage ("kafka unreachable"), and one line when Kafka
acknowledges again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import secrets
import time
from pathlib import Path
from typing import Any, Literal

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from huddle.logs import event
from huddle.recording.envelope import wrap
from huddle.recording.outbox import Entry, Outbox

__all__ = ["KafkaLog", "State"]

log = logging.getLogger("huddle.recording.kafka")

State = Literal["live", "buffering", "dropping"]
LIVE: State = "live"
BUFFERING: State = "buffering"
DROPPING: State = "dropping"

POLL_INTERVAL = 0.01  # seconds between serving librdkafka's delivery reports on the loop
MESSAGE_OVERHEAD = 64 << 10  # message.max.bytes over max_message_bytes: key, headers, batch framing
DRAIN_BATCH = 256  # outbox entries read back per disk read
DRAIN_BATCH_BYTES = 4 << 20
DROP_WARNING_INTERVAL = 60.0
_PURGED = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})


class _LibrdkafkaLog:
    """Takes librdkafka's log lines (confluent-kafka calls `.log(level, fmt, *args)`) down to debug: its
    errors come again through the error callback, which logs them once per outage."""

    def __init__(self) -> None:
        self.logger = logging.getLogger("huddle.recording.kafka.librdkafka")

    def log(self, level: int, msg: str, *args: Any) -> None:
        self.logger.debug(msg, *args)


class _Generation:
    """The messages produced straight into librdkafka during one "live" period. If close() has to take
    them back (purge), they go to the outbox segment `slot`, reserved when the period ended, so that they
    stay before the messages that went to the outbox after them."""

    __slots__ = ("delivered", "purged", "slot")

    def __init__(self, owner: KafkaLog) -> None:
        self.slot: int | None = None
        self.purged: list[tuple[int, bytes, bytes]] = []
        self.delivered = functools.partial(owner._live_delivered, self)


class KafkaLog:
    """Publishes recording records to Kafka (see the module docstring). `start()` before `publish`."""

    def __init__(
        self,
        bootstrap: str,
        topic: str = "huddle.recording",
        *,
        buffer_dir: Path,
        max_buffer_bytes: int = 1 << 30,
        max_message_bytes: int = 1_000_000,
        memory_bytes: int = 32 << 20,
        client_id: str = "huddle",
    ) -> None:
        if memory_bytes < 1024 or max_message_bytes < 1024:
            raise ValueError("memory_bytes and max_message_bytes must be at least 1024")
        self.bootstrap = bootstrap
        self.topic = topic
        self.max_message_bytes = max_message_bytes
        self.config: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "client.id": client_id,
            "acks": "all",
            "enable.idempotence": True,
            "partitioner": "murmur2_random",
            "linger.ms": 5,
            "message.timeout.ms": 0,  # retry forever: the outbox is the bound, not a timeout
            "queue.buffering.max.kbytes": memory_bytes // 1024,
            # The byte bound is the one that matters; this one only keeps tiny messages from piling up.
            "queue.buffering.max.messages": max(1000, memory_bytes // 256),
            "message.max.bytes": max_message_bytes + MESSAGE_OVERHEAD,
            # Back within a second of the broker's return, rather than librdkafka's default 10 s backoff.
            "reconnect.backoff.ms": 100,
            "reconnect.backoff.max.ms": 1000,
            "logger": _LibrdkafkaLog(),
            "error_cb": self._on_error,
        }
        self._outbox = Outbox(buffer_dir, max_buffer_bytes)
        self._producer: Producer | None = None
        self._state: State = LIVE
        self._generation = _Generation(self)
        # Message ids tell one record's parts from another's under one key, and several nodes publish
        # under one key: a random run prefix keeps theirs apart.
        self._ids = itertools.count(secrets.randbits(32) << 32)
        self._in_kafka = 0  # messages produced, delivery report not yet served
        self._draining = 0  # read back from the outbox, not yet produced
        self._room = asyncio.Event()  # a delivery report came: librdkafka's queue has room again
        self._wake = asyncio.Event()  # the outbox has something to drain
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._closing = False  # purging: delivery reports of purged messages are kept, not errors
        self._purged: dict[int, _Generation] = {}
        self._unreachable_since: float | None = None
        self._last_drop_warning = -DROP_WARNING_INTERVAL
        self.published = 0  # records accepted
        self.parts = 0  # messages (envelope values) made of them
        self.acked = 0  # messages Kafka acknowledged
        self._dropped = 0  # records dropped, wholly or in part
        self.dropped_bytes = 0
        self.delivery_errors = 0  # messages Kafka refused for good
        self.kafka_errors = 0  # errors librdkafka reported (connection lost, broker down, ...)

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def state(self) -> State:
        return self._state

    @property
    def pending(self) -> int:
        """Messages not yet acknowledged: in librdkafka's queue, or in the outbox."""
        return self._in_kafka + self._draining + self._outbox.unread

    async def start(self) -> None:
        """Open the outbox (what an earlier run left is sent first) and the producer."""
        await self._outbox.open()
        self._producer = Producer(self.config)
        if self._outbox.unread:
            self._state = BUFFERING
            self._wake.set()
            event(
                log,
                logging.INFO,
                "recording outbox from an earlier run: sending it first",
                entries=self._outbox.unread,
                bytes=self._outbox.bytes,
                torn_segments=self._outbox.torn,
            )
        self._tasks = [
            asyncio.create_task(self._poll(), name="kafka-log-poll"),
            asyncio.create_task(self._drain(), name="kafka-log-drain"),
        ]

    def publish(self, key: str, value: bytes) -> None:
        producer = self._producer
        if producer is None or self._closed:
            self._drop(key, len(value), "closed" if self._closed else "not started")
            return
        try:
            parts = wrap(value, self.max_message_bytes, next(self._ids))
        except ValueError:
            self._drop(key, len(value), "too large")
            return
        if self._state is LIVE:
            delivered = self._generation.delivered
            for index, part in enumerate(parts):
                try:
                    producer.produce(self.topic, part, key, on_delivery=delivered)
                except BufferError:
                    self._start_buffering("producer queue full")
                    self._buffer(key, value, parts, index)
                    return
                except KafkaException as exc:
                    self._refused(exc.args[0])
                    self._drop(key, len(value), "refused")
                    return
                self._in_kafka += 1
            self.published += 1
            self.parts += len(parts)
            return
        self._buffer(key, value, parts, 0)

    def _buffer(self, key: str, value: bytes, parts: list[bytes], start: int) -> None:
        """Parts `start`.. of a record into the outbox (the earlier ones are in librdkafka already)."""
        key_bytes = key.encode()
        for index in range(start, len(parts)):
            if not self._outbox.append(key_bytes, parts[index]):
                self._state = DROPPING
                self._drop(key, len(value), "buffer full")
                return
        if self._state is DROPPING:
            self._state = BUFFERING
        self.published += 1
        self.parts += len(parts)
        self._wake.set()

    def _start_buffering(self, why: str) -> None:
        self._state = BUFFERING
        self._generation.slot = self._outbox.reserve()
        self._generation = _Generation(self)
        event(
            log,
            logging.INFO,
            "recording records go to the disk buffer",
            why=why,
            in_kafka=self._in_kafka,
        )

    def _drop(self, key: str, size: int, why: str) -> None:
        self._dropped += 1
        self.dropped_bytes += size
        now = time.monotonic()
        if now - self._last_drop_warning >= DROP_WARNING_INTERVAL:
            self._last_drop_warning = now
            event(
                log,
                logging.WARNING,
                "recording records dropped (counted in dropped; warned at most once a minute)",
                why=why,
                key=key,
                dropped=self._dropped,
                buffered_bytes=self._outbox.bytes,
                max_buffer_bytes=self._outbox.max_bytes,
            )

    async def _drain(self) -> None:
        outbox = self._outbox
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                while outbox.unread:
                    batch = await outbox.read(DRAIN_BATCH, DRAIN_BATCH_BYTES)
                    self._draining = len(batch)
                    for entry in batch:
                        while self._unreachable_since is not None and self._in_kafka:
                            self._room.clear()
                            with contextlib.suppress(TimeoutError):
                                await asyncio.wait_for(self._room.wait(), 0.1)
                        await self._produce_entry(entry)
                        self._draining -= 1
            except Exception as exc:  # a bug or the disk: keep the log alive, try again on the next wake
                self._draining = 0
                event(log, logging.ERROR, "recording outbox drain failed", error=repr(exc))
                await asyncio.sleep(1.0)
                self._wake.set()
                continue
            # No await since the last check: nothing was appended in between, so the outbox is empty and
            # everything older than the next publish is in librdkafka's queue already.
            if self._state is not LIVE:
                outbox.seal()
                self._state = LIVE
                event(log, logging.INFO, "recording disk buffer sent: back to live", in_kafka=self._in_kafka)

    async def _produce_entry(self, entry: Entry) -> None:
        producer = self._producer
        assert producer is not None
        delivered = functools.partial(self._outbox_delivered, entry)
        while True:
            try:
                producer.produce(self.topic, entry.value, entry.key, on_delivery=delivered)
            except BufferError:
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), 0.1)
                continue
            except KafkaException as exc:
                self._refused(exc.args[0])
                self._outbox.done(entry)  # never sendable: waiting for it would stall the outbox
                return
            self._in_kafka += 1
            return

    async def _poll(self) -> None:
        producer = self._producer
        assert producer is not None
        while True:
            try:
                producer.poll(0)
            except Exception as exc:  # raised by one of our callbacks: a bug, but the reports must go on
                event(log, logging.ERROR, "kafka delivery callback failed", error=repr(exc))
            await asyncio.sleep(POLL_INTERVAL)

    def _live_delivered(self, generation: _Generation, err: KafkaError | None, msg: Message) -> None:
        self._in_kafka -= 1
        self._room.set()
        if err is None:
            self.acked += 1
            if self._unreachable_since is not None:
                self._reachable()
        elif self._closing and err.code() in _PURGED:
            # In flight is older than still queued, within a partition: keep that order for the next run.
            rank = 0 if err.code() == KafkaError._PURGE_INFLIGHT else 1
            self._purged.setdefault(id(generation), generation)
            generation.purged.append((rank, msg.key() or b"", msg.value() or b""))
        else:
            self._refused(err)

    def _outbox_delivered(self, entry: Entry, err: KafkaError | None, msg: Message) -> None:
        self._in_kafka -= 1
        self._room.set()
        if err is None:
            self.acked += 1
            self._outbox.done(entry)
            if self._unreachable_since is not None:
                self._reachable()
        elif self._closing and err.code() in _PURGED:
            pass  # not done: it stays in the outbox for the next run
        else:
            self._refused(err)
            self._outbox.done(entry)

    def _refused(self, err: KafkaError) -> None:
        self.delivery_errors += 1
        if self.delivery_errors == 1 or err.fatal():
            event(
                log,
                logging.ERROR,
                "kafka refused a recording message (counted in delivery_errors; logged once)",
                error=err.str(),
                code=err.name(),
                topic=self.topic,
            )

    def _on_error(self, err: KafkaError) -> None:
        self.kafka_errors += 1
        if err.fatal():
            event(log, logging.ERROR, "kafka producer fatal error", error=err.str(), code=err.name())
        elif err.code() == KafkaError._ALL_BROKERS_DOWN and self._unreachable_since is None:
            self._unreachable_since = time.monotonic()
            if self._state is LIVE and not self._closing:
                self._start_buffering("all brokers down")
            event(
                log,
                logging.WARNING,
                "kafka unreachable: recording goes on, its records wait in memory, then on disk "
                "(logged once until Kafka acknowledges again)",
                error=err.str(),
                code=err.name(),
                bootstrap=self.bootstrap,
            )

    def _reachable(self) -> None:
        since, self._unreachable_since = self._unreachable_since, None
        assert since is not None
        event(
            log,
            logging.INFO,
            "kafka acknowledges again",
            after_seconds=round(time.monotonic() - since, 3),
            buffered_entries=self._outbox.entries,
        )

    async def flush(self, timeout: float) -> bool:
        """Wait until every message published so far is acknowledged; False if `timeout` seconds pass
        first (when publishing goes on, until nothing at all is pending)."""
        deadline = time.monotonic() + timeout
        while self.pending:
            if self._producer is None or time.monotonic() >= deadline:
                return False
            await asyncio.sleep(POLL_INTERVAL)
        return True

    async def close(self, flush_timeout: float = 2.0) -> None:
        """Stop: later publish calls are dropped. Waits up to `flush_timeout` seconds for Kafka, then keeps
        what is not acknowledged in the outbox for the next KafkaLog on the same buffer_dir."""
        if self._closed:
            return
        self._closed = True
        producer = self._producer
        if producer is None:
            return
        await self.flush(flush_timeout)
        drain, poll = self._tasks
        drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drain
        self._draining = 0  # read back but not produced: still in the outbox (not done)
        self._closing = True
        poll.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poll
        producer.purge(in_queue=True, in_flight=True, blocking=True)
        deadline = time.monotonic() + 2.0
        while self._in_kafka and time.monotonic() < deadline:
            producer.poll(0)  # serves the purged messages' reports
            await asyncio.sleep(POLL_INTERVAL)
        await self._keep_purged()
        await self._outbox.close()
        self._producer = None
        event(log, logging.INFO, "kafka recording log closed", **self.stats())

    async def _keep_purged(self) -> None:
        """Put what librdkafka gave back into the outbox, each live period's messages in their place."""
        kept = 0
        for generation in self._purged.values():
            entries = [(key, value) for _, key, value in sorted(generation.purged, key=lambda m: m[0])]
            kept += len(entries)
            if generation.slot is not None:
                await self._outbox.insert(generation.slot, entries)
            else:
                for key, value in entries:
                    if not self._outbox.append(key, value):
                        self._dropped += 1
        if kept:
            event(
                log, logging.INFO, "kept unacknowledged recording messages for the next start", messages=kept
            )

    def stats(self) -> dict[str, int]:
        return {
            "published": self.published,
            "parts": self.parts,
            "acked": self.acked,
            "dropped": self._dropped,
            "dropped_bytes": self.dropped_bytes,
            "pending": self.pending,
            "in_kafka": self._in_kafka,
            "buffered_bytes": self._outbox.bytes,
            "buffered_entries": self._outbox.entries,
            "buffer_lost": self._outbox.lost,
            "delivery_errors": self.delivery_errors,
            "kafka_errors": self.kafka_errors,
            "buffering": int(self._state is not LIVE),
        }
