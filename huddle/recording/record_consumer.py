"""`huddle record-consumer`: reads the recording topic in a consumer group, writes track files, stores them.

Several instances share the topic's partitions (a Kafka consumer group). For each partition it owns, an
instance keeps one `TrackWriter` (in a work folder of its own) and one envelope `Joiner`; each value read
goes Joiner → records.decode → that writer. Values that are not ours (garbage, an envelope of a later
version, a record that does not decode) are counted, logged now and then, and skipped.

When the writer finishes a recording (its RecordingStopped, or nothing of it for `--idle-finish` seconds:
its node died), its track files and then its manifest go to the store under `<room>/<recording id>/` (a
later segment `<id>.<suffix>` under `segment-<n>/`, see huddle.recording.segments), and only then is the
recording durable. Offsets are committed per partition, and only as far as is durable: to the first offset
of the oldest recording of that partition still open or uploading, or past the last value read when there
is none. So whatever a crash loses is read again by the next owner of the partition, which writes the same
bytes under the same keys (bitexact muxing), and a recording whose manifest is already stored when its
RecordingStarted comes again is skipped.

The writer runs in one worker thread (muxing and fsync are file I/O); the event loop reads Kafka, uploads,
commits and answers `/metrics` and `/healthz`. A rebalance first waits for the value being processed, then
commits what is durable of the partitions going away and drops their state (open files deleted, uploads
cancelled): the next owner reads them again from the commit. SIGTERM stops the same way, without waiting
for anything half done.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huddle.logs import event
from huddle.recording import segments
from huddle.recording.envelope import EnvelopeError, Joiner, UnknownVersion
from huddle.recording.records import Record, RecordError, RecordingStarted, decode
from huddle.recording.store import LocalStore, Store, StoreError, check_key

if TYPE_CHECKING:
    from aiohttp import web
    from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

    from huddle.recording.tracks import TrackWriter

__all__ = ["ConsumerOptions", "RecordConsumer", "add_arguments", "main"]

log = logging.getLogger("huddle.recording.consumer")

DEFAULT_TOPIC = "huddle.recording"
DEFAULT_GROUP = "huddle-recorders"
COMMIT_INTERVAL = 1.0  # s between commit passes (and after a recording became durable)
BATCH = 2000  # values taken from Kafka at once
MAX_FETCH = 4 << 20  # bytes per partition and fetch: above the 1 MiB a value may be
RETRY_START, RETRY_CAP = 0.5, 15.0  # s: backoff of a store call that failed
LOG_EVERY = 10.0  # s between two log lines about skipped input of one kind
MAX_MANIFEST_BYTES = 4 << 20
KAFKA_CALL_TIMEOUT = 10.0
_SKIPPED_REMEMBERED = 1024


@dataclass(frozen=True, slots=True)
class ConsumerOptions:
    bootstrap: str
    store: Store
    work_dir: Path
    topic: str = DEFAULT_TOPIC
    group: str = DEFAULT_GROUP
    idle_finish: float = 60.0
    http_host: str = "127.0.0.1"
    http_port: int | None = None
    session_timeout: float = 10.0
    fsync: bool = True


@dataclass(eq=False, slots=True)
class _Recording:
    key: str  # the record's recording id: the segment key
    room: str
    first_offset: int
    last_seen: float  # monotonic time of its last record
    task: asyncio.Task[None] | None = None  # uploading; None while open


@dataclass(eq=False)
class _Partition:
    tp: TopicPartition
    writer: TrackWriter
    directory: Path
    joiner: Joiner = field(default_factory=Joiner)
    recordings: dict[str, _Recording] = field(default_factory=dict)
    skipped: OrderedDict[str, None] = field(default_factory=OrderedDict)  # replays: already stored
    finished: list[tuple[str, list[Path]]] = field(default_factory=list)  # filled in the writer's thread
    next_offset: int | None = None  # after the last value processed
    committed: int | None = None

    def safe_offset(self) -> int | None:
        """How far a commit may go: nothing before it is still needed."""
        if self.next_offset is None:
            return None
        return min((r.first_offset for r in self.recordings.values()), default=self.next_offset)


class _Counters:
    """What /metrics shows; writer counters of partitions given up are kept in `writer_base`."""

    def __init__(self) -> None:
        self.records_read = 0
        self.garbage = 0
        self.unknown_version = 0
        self.malformed = 0
        self.replayed_records = 0  # records of a recording skipped as already stored
        self.recordings_skipped = 0
        self.recordings_finished = 0
        self.recordings_idle_finished = 0
        self.recordings_uploaded = 0
        self.recordings_discarded = 0
        self.recordings_failed = 0
        self.files_uploaded = 0
        self.bytes_uploaded = 0
        self.store_failures = 0
        self.commits = 0
        self.commit_failures = 0
        self.rebalances = 0
        self.joined = 0
        self.abandoned_parts = 0
        self.writer_base: dict[str, int] = {}


class RecordConsumer:
    def __init__(self, options: ConsumerOptions) -> None:
        self.options = options
        self.store = options.store
        self.counters = _Counters()
        self._partitions: dict[int, _Partition] = {}
        self._lock = asyncio.Lock()  # processing a batch, a rebalance, a commit: one at a time
        self._epoch = 0  # bumped by each rebalance: a batch fetched before one is dropped
        self._assignments = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="huddle-record-writer")
        self._consumer: AIOKafkaConsumer | None = None
        self._instance: Path | None = None
        self._lock_fd: int | None = None
        self._segments: dict[str, int] = {}  # segment key → its number, given by this consumer
        self._last_warned: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._running = False
        self.http_port: int | None = None

    # -- running ----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, ready: Callable[[], None] | None = None) -> None:
        """Consume until `stop` is set; `ready` is called once the consumer is in the group."""
        from aiokafka import AIOKafkaConsumer

        self._claim_work_dir()
        session_ms = int(self.options.session_timeout * 1000)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.options.bootstrap.split(","),
            group_id=self.options.group,
            client_id="huddle-record-consumer",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=max(100, session_ms // 3),
            max_partition_fetch_bytes=MAX_FETCH,
            metadata_max_age_ms=30_000,  # a topic created after the start is found within this
        )
        self._consumer = consumer
        runner = await self._serve_http() if self.options.http_port is not None else None
        background: list[asyncio.Task[None]] = []
        try:
            consumer.subscribe([self.options.topic], listener=_listener(self))
            await consumer.start()
            self._running = True
            if ready is not None:
                ready()
            background = [
                asyncio.create_task(self._commit_loop(), name="record-consumer-commits"),
                asyncio.create_task(self._idle_loop(), name="record-consumer-idle"),
            ]
            reading = asyncio.create_task(self._read(consumer), name="record-consumer-read")
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if reading.done():
                reading.result()  # a reader that died is an error of the whole process
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
        finally:
            self._running = False
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._shutdown(consumer)
            if runner is not None:
                await runner.cleanup()
            self._executor.shutdown(wait=True)
            self._release_work_dir()

    async def _shutdown(self, consumer: AIOKafkaConsumer) -> None:
        """Commit what is durable, drop the rest (the next member reads it again), leave the group."""
        async with self._lock:
            parts = list(self._partitions.values())
            self._partitions.clear()
            self._epoch += 1
            with contextlib.suppress(Exception):
                await self._commit(parts)
            for part in parts:
                await self._discard(part)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(consumer.stop(), KAFKA_CALL_TIMEOUT)

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            batches = await consumer.getmany(timeout_ms=500, max_records=BATCH)
            if not batches:
                continue
            # aiokafka returns nothing fetched before a rebalance; but one may start while this waits for
            # the lock. Then the batch is dropped: the new assignment reads again from the commits.
            epoch = self._epoch
            async with self._lock:
                if epoch != self._epoch:
                    continue
                for tp, messages in batches.items():
                    part = self._partitions.get(tp.partition)
                    if part is not None and part.tp == tp and messages:
                        await self._consume(part, messages)

    # -- values → records → writer ----------------------------------------------------------------

    async def _consume(self, part: _Partition, messages: list[ConsumerRecord]) -> None:
        counters = self.counters
        joiner = part.joiner
        run: list[Record] = []
        now = time.monotonic()
        for message in messages:
            counters.records_read += 1
            try:
                data = joiner.feed(message.key or b"", message.value or b"")
            except UnknownVersion as exc:
                counters.unknown_version += 1
                self._warn(
                    "unknown_version",
                    "recording value of an unknown version skipped",
                    partition=part.tp.partition,
                    offset=message.offset,
                    version=exc.version,
                )
                continue
            except EnvelopeError as exc:
                counters.garbage += 1
                self._warn(
                    "garbage",
                    "value that is not a recording envelope skipped",
                    partition=part.tp.partition,
                    offset=message.offset,
                    error=str(exc),
                )
                continue
            if data is None:
                continue
            try:
                record = decode(data)
            except RecordError as exc:
                counters.malformed += 1
                self._warn(
                    "malformed",
                    "recording record that does not decode skipped",
                    partition=part.tp.partition,
                    offset=message.offset,
                    error=str(exc),
                )
                continue
            if type(record) is RecordingStarted:
                if run:
                    await self._write(part, run)
                    run = []
                await self._started(part, record, message.offset, now)
                continue
            rid = record.recording_id
            if isinstance(rid, str):
                if rid in part.skipped:
                    counters.replayed_records += 1
                    continue
                recording = part.recordings.get(rid)
                if recording is not None:
                    recording.last_seen = now
            run.append(record)
        if run:
            await self._write(part, run)
        part.next_offset = messages[-1].offset + 1
        counters.joined += joiner.joined
        counters.abandoned_parts += joiner.abandoned
        joiner.joined = joiner.abandoned = 0

    async def _started(self, part: _Partition, record: RecordingStarted, offset: int, now: float) -> None:
        rid, room = record.recording_id, record.room
        try:
            if not isinstance(rid, str) or not isinstance(room, str):
                raise ValueError("recording id and room must be strings")
            recording_id, _ = segments.split_key(rid)
            check_key(f"{room}/{recording_id}/{segments.MANIFEST}")
        except ValueError as exc:
            self.counters.malformed += 1
            self._warn(
                "malformed", "recording unusable as a store key skipped", recording=rid, error=str(exc)
            )
            return
        if rid in part.recordings:
            await self._write(part, [record])  # the writer counts the duplicate
            return
        if await self._stored(room, rid):
            part.skipped[rid] = None
            while len(part.skipped) > _SKIPPED_REMEMBERED:
                part.skipped.popitem(last=False)
            self.counters.recordings_skipped += 1
            event(log, logging.INFO, "recording already stored: skipped", recording=rid, room=room)
            return
        part.skipped.pop(rid, None)
        await self._write(part, [record])
        if rid in part.writer.recording_ids:
            part.recordings[rid] = _Recording(rid, room, offset, now)

    async def _write(self, part: _Partition, run: list[Record]) -> None:
        await self._call(_handle_all, part.writer, run)
        self._take_finished(part)

    def _take_finished(self, part: _Partition) -> None:
        finished, part.finished = part.finished, []
        for rid, paths in finished:
            recording = part.recordings.get(rid)
            if recording is None or recording.task is not None:
                continue
            self.counters.recordings_finished += 1
            recording.task = asyncio.create_task(self._upload(part, recording, paths), name=f"upload {rid}")

    async def _call(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    # -- the store --------------------------------------------------------------------------------

    async def _stored(self, room: str, key: str) -> bool:
        """Whether this segment's manifest is in the store already (a replay). A store that cannot say
        counts as no: the upload then finds the segment's folder again and rewrites the same bytes."""
        recording_id, continued = segments.split_key(key)
        prefix = f"{room}/{recording_id}/"
        try:
            if not continued:
                return await self.store.exists(prefix + segments.MANIFEST)
            return await self._find_segment(prefix, key) is not None
        except StoreError as exc:
            self.counters.store_failures += 1
            self._warn("store", "cannot tell whether a recording is stored", recording=key, error=str(exc))
            return False

    async def _find_segment(self, prefix: str, key: str) -> int | None:
        """The number of the stored segment whose manifest names `key`."""
        _, manifests = segments.stored_segments(prefix, (o.key for o in await self.store.list(prefix)))
        for number, manifest_key in sorted(manifests.items()):
            if number > 1:
                manifest = await self._read_json(manifest_key)
                if manifest is not None and manifest.get("segment_key") == key:
                    return number
        return None

    async def _read_json(self, key: str) -> Any:
        """A stored manifest, or None when it is gone or not JSON."""
        try:
            stream = await self.store.read(key)
        except FileNotFoundError:
            return None
        data = b""
        async with stream:
            async for chunk in stream:
                data += chunk
                if len(data) > MAX_MANIFEST_BYTES:
                    return None
        try:
            return json.loads(data)
        except ValueError:
            return None

    async def _segment_for(self, prefix: str, key: str) -> tuple[int, dict[str, Any] | None]:
        """Segment number for a later segment and the previous segment's manifest (None if not stored)."""
        number = await self._find_segment(prefix, key)
        stored = await self.store.list(prefix)
        _, manifests = segments.stored_segments(prefix, (o.key for o in stored))
        if number is None:
            number = self._segments.get(key)
        if number is None:
            given = {n for k, n in self._segments.items() if k != key and k.startswith(_base(key))}
            number = segments.next_segment(set(manifests) | given)
        self._segments[key] = number
        before_key = manifests.get(number - 1)
        before = None
        if before_key is not None:
            before = await self._read_json(before_key)
        return number, before

    async def _retrying(self, what: str, call: Callable[[], Any]) -> Any:
        """A store call, again and again with backoff until it works: the commit waits meanwhile, the
        records stay in Kafka."""
        delay = RETRY_START
        while True:
            try:
                return await call()
            except StoreError as exc:
                self.counters.store_failures += 1
                self._warn("store", "store call failed; retrying", action=what, error=str(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_CAP)

    async def _upload(self, part: _Partition, recording: _Recording, paths: list[Path]) -> None:
        key = recording.key
        recording_id, continued = segments.split_key(key)
        prefix = f"{recording.room}/{recording_id}/"
        manifest = paths[-1]
        try:
            number = 1
            if continued:
                number, before = await self._retrying(key, lambda: self._segment_for(prefix, key))
                document = json.loads(await asyncio.to_thread(manifest.read_bytes))
                document = segments.mark_continued(
                    document, recording_id=recording_id, segment=number, segment_key=key, before=before
                )
                await asyncio.to_thread(manifest.write_bytes, json.dumps(document, indent=2).encode())
            destination = prefix + segments.folder(number)
            for path in paths:  # the manifest last: its presence means the recording is complete
                size = (await asyncio.to_thread(path.stat)).st_size
                await self._retrying(
                    path.name, lambda path=path: self.store.put(destination + path.name, path)
                )
                self.counters.files_uploaded += 1
                self.counters.bytes_uploaded += size
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Files of ours that are missing or unreadable: replaying would write them the same way.
            self.counters.recordings_failed += 1
            event(log, logging.ERROR, "recording could not be stored", recording=key, error=repr(exc))
        else:
            self.counters.recordings_uploaded += 1
            event(log, logging.INFO, "recording stored", recording=key, at=destination, files=len(paths))
        await asyncio.to_thread(shutil.rmtree, manifest.parent, True)
        part.recordings.pop(key, None)

    # -- commits, idle recordings -----------------------------------------------------------------

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(COMMIT_INTERVAL)
            async with self._lock:
                await self._commit(list(self._partitions.values()))

    async def _commit(self, parts: list[_Partition]) -> None:
        from aiokafka.errors import KafkaError

        assert self._consumer is not None
        offsets = {}
        for part in parts:
            safe = part.safe_offset()
            if safe is not None and safe != part.committed:
                offsets[part.tp] = safe
        if not offsets:
            return
        try:
            await asyncio.wait_for(self._consumer.commit(offsets), KAFKA_CALL_TIMEOUT)
        except (KafkaError, TimeoutError) as exc:
            self.counters.commit_failures += 1
            self._warn("commit", "commit failed; tried again later", error=repr(exc))
            return
        self.counters.commits += 1
        for part in parts:
            if part.tp in offsets:
                part.committed = offsets[part.tp]

    async def _idle_loop(self) -> None:
        idle = self.options.idle_finish
        while True:
            await asyncio.sleep(min(1.0, idle / 4))
            async with self._lock:
                now = time.monotonic()
                for part in list(self._partitions.values()):
                    for recording in list(part.recordings.values()):
                        if recording.task is None and now - recording.last_seen > idle:
                            event(
                                log,
                                logging.WARNING,
                                "recording idle: finished as incomplete",
                                recording=recording.key,
                                seconds=idle,
                            )
                            self.counters.recordings_idle_finished += 1
                            await self._call(part.writer.finish, recording.key)
                    self._take_finished(part)

    # -- rebalances -------------------------------------------------------------------------------

    async def revoked(self, revoked: list[TopicPartition]) -> None:
        async with self._lock:
            self._epoch += 1
            self.counters.rebalances += 1
            parts = [self._partitions.pop(tp.partition) for tp in revoked if tp.partition in self._partitions]
            await self._commit(parts)
            for part in parts:
                await self._discard(part)
            if parts:
                event(log, logging.INFO, "partitions revoked", partitions=[p.tp.partition for p in parts])

    async def assigned(self, assigned: list[TopicPartition]) -> None:
        from huddle.recording.tracks import TrackWriter

        async with self._lock:
            self._epoch += 1
            assert self._instance is not None
            for tp in assigned:
                if tp.partition in self._partitions:
                    continue
                # A folder per assignment: uploads of a revoked assignment may still be leaving theirs.
                self._assignments += 1
                directory = self._instance / f"p{tp.partition}-{self._assignments}"
                await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
                writer = TrackWriter(directory, fsync=self.options.fsync)
                part = _Partition(tp, writer, directory)
                writer.add_listener(lambda rid, paths, part=part: part.finished.append((rid, paths)))
                self._partitions[tp.partition] = part
            event(
                log, logging.INFO, "partitions assigned", partitions=sorted(tp.partition for tp in assigned)
            )

    async def _discard(self, part: _Partition) -> None:
        """Forget a partition: open recordings' files deleted, uploads cancelled; the next owner of the
        partition reads all of them again from the commit."""
        tasks = [r.task for r in part.recordings.values() if r.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        open_ids = part.writer.recording_ids
        for rid in open_ids:
            await self._call(part.writer.discard, rid)
        self.counters.recordings_discarded += len(part.recordings)
        for name, value in part.writer.stats().items():
            if name not in _GAUGES:
                self.counters.writer_base[name] = self.counters.writer_base.get(name, 0) + value
        part.recordings.clear()
        await asyncio.to_thread(shutil.rmtree, part.directory, True)

    # -- work folder ------------------------------------------------------------------------------

    def _claim_work_dir(self) -> None:
        """A folder of this instance's own under --work-dir, locked; folders of instances that died are
        removed (their lock is free)."""
        root = self.options.work_dir
        root.mkdir(parents=True, exist_ok=True)
        for old in root.iterdir():
            if not old.is_dir() or not old.name.startswith("consumer-"):
                continue
            fd = os.open(old / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live instance's
            finally:
                os.close(fd)
            shutil.rmtree(old, ignore_errors=True)
        instance = root / f"consumer-{uuid.uuid4().hex[:12]}"
        instance.mkdir()
        fd = os.open(instance / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._instance, self._lock_fd = instance, fd

    def _release_work_dir(self) -> None:
        if self._instance is not None:
            shutil.rmtree(self._instance, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- observing --------------------------------------------------------------------------------

    def _warn(self, kind: str, message: str, **fields: Any) -> None:
        """Log skipped input or a failure, at most once per LOG_EVERY seconds per kind."""
        now = time.monotonic()
        last = self._last_warned.get(kind)
        if last is not None and now - last < LOG_EVERY:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last_warned[kind] = now
        event(log, logging.WARNING, message, suppressed=self._suppressed.pop(kind, 0), **fields)

    def writer_stats(self) -> dict[str, int]:
        totals = dict(self.counters.writer_base)
        for part in self._partitions.values():
            for name, value in part.writer.stats().items():
                totals[name] = totals.get(name, 0) + value
        return totals

    def lag(self) -> int:
        consumer = self._consumer
        if consumer is None:
            return 0
        total = 0
        for part in self._partitions.values():
            highwater = consumer.highwater(part.tp)
            if highwater is not None and part.next_offset is not None:
                total += max(0, highwater - part.next_offset)
        return total

    def metrics(self) -> Iterator[tuple[str, str, str, float]]:
        """(name, type, help, value) of each metric."""
        c = self.counters
        writer = self.writer_stats()
        counters = (
            ("records_read", "values read from the topic", c.records_read),
            ("parts_joined", "records put back together from several values", c.joined),
            ("parts_abandoned", "incomplete split records given up", c.abandoned_parts),
            ("garbage_skipped", "values that are not recording envelopes, skipped", c.garbage),
            (
                "unknown_version_skipped",
                "envelopes of a version this consumer does not read",
                c.unknown_version,
            ),
            ("malformed_skipped", "records that do not decode or cannot be stored, skipped", c.malformed),
            ("replayed_records_skipped", "records of recordings already stored, skipped", c.replayed_records),
            ("frames_written", "frames written into track files", writer.get("frames_written", 0)),
            ("bytes_written", "media bytes written into track files", writer.get("bytes_written", 0)),
            (
                "frames_out_of_order",
                "frames dropped as not after the previous (duplicates)",
                writer.get("out_of_order", 0),
            ),
            ("records_late", "records of recordings already finished", writer.get("late", 0)),
            (
                "records_unknown_recording",
                "records of recordings never started here",
                writer.get("unknown_recording", 0),
            ),
            ("writer_errors", "file errors while writing", writer.get("errors", 0)),
            ("recordings_finished", "recordings whose files were finished", c.recordings_finished),
            (
                "recordings_idle_finished",
                "recordings finished after --idle-finish seconds without records",
                c.recordings_idle_finished,
            ),
            ("recordings_uploaded", "recordings stored, manifest last", c.recordings_uploaded),
            (
                "recordings_skipped",
                "recordings already stored when read again, skipped",
                c.recordings_skipped,
            ),
            (
                "recordings_discarded",
                "recordings dropped unfinished (partition revoked, shutdown)",
                c.recordings_discarded,
            ),
            ("recordings_failed", "recordings whose files could not be stored", c.recordings_failed),
            ("files_uploaded", "files stored", c.files_uploaded),
            ("bytes_uploaded", "bytes stored", c.bytes_uploaded),
            ("store_failures", "failed store calls (retried)", c.store_failures),
            ("commits", "offset commits", c.commits),
            ("commit_failures", "offset commits that failed", c.commit_failures),
            ("rebalances", "partitions revoked in a rebalance", c.rebalances),
        )
        for name, text, value in counters:
            yield f"huddle_record_consumer_{name}_total", "counter", text, value
        gauges = (
            ("partitions", "partitions assigned to this member", len(self._partitions)),
            (
                "recordings_open",
                "recordings being written",
                sum(1 for p in self._partitions.values() for r in p.recordings.values() if r.task is None),
            ),
            (
                "recordings_uploading",
                "recordings finished, not yet stored",
                sum(
                    1 for p in self._partitions.values() for r in p.recordings.values() if r.task is not None
                ),
            ),
            ("lag", "values in the assigned partitions not yet read", self.lag()),
        )
        for name, text, value in gauges:
            yield f"huddle_record_consumer_{name}", "gauge", text, value

    def prometheus(self) -> str:
        lines = []
        for name, kind, text, value in self.metrics():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"

    async def _serve_http(self) -> web.AppRunner:
        from aiohttp import web

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(text=self.prometheus(), content_type="text/plain", charset="utf-8")

        async def healthz(_: web.Request) -> web.Response:
            body = {"ok": self._running, "partitions": sorted(self._partitions)}
            return web.json_response(body, status=200 if self._running else 503)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.options.http_host, self.options.http_port)
        await site.start()
        self.http_port = runner.addresses[0][1]
        return runner


_GAUGES = frozenset({"recordings_open", "tracks_open"})


def _base(key: str) -> str:
    return segments.split_key(key)[0] + "."


def _handle_all(writer: TrackWriter, run: list[Record]) -> None:
    handle = writer.handle
    for record in run:
        try:
            handle(record)
        except Exception:  # a bug, not bad input (handle counts that): the other records go on
            log.exception("recording track writer failed on a record")


def _listener(consumer: RecordConsumer) -> Any:
    """aiokafka's ConsumerRebalanceListener for `consumer` (aiokafka is imported when it runs, not before:
    `huddle serve` imports this module's command line too)."""
    from aiokafka import ConsumerRebalanceListener

    class Listener(ConsumerRebalanceListener):
        async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
            await consumer.revoked(list(revoked))

        async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
            await consumer.assigned(list(assigned))

    return Listener()


# --- command line ---------------------------------------------------------------------------------


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"HUDDLE_{name}") or default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from huddle import config

    parser.add_argument(
        "--kafka",
        default=_env("KAFKA"),
        help="Kafka bootstrap servers HOST:PORT[,HOST:PORT...] [env HUDDLE_KAFKA]",
    )
    parser.add_argument(
        "--kafka-topic",
        default=_env("KAFKA_TOPIC", DEFAULT_TOPIC),
        help=f"the recording topic [env HUDDLE_KAFKA_TOPIC; default {DEFAULT_TOPIC}]",
    )
    parser.add_argument(
        "--kafka-group",
        default=_env("KAFKA_GROUP", DEFAULT_GROUP),
        help="consumer group: instances in one group share the partitions "
        f"[env HUDDLE_KAFKA_GROUP; default {DEFAULT_GROUP}]",
    )
    parser.add_argument(
        "--kafka-session-timeout",
        type=float,
        default=_env("KAFKA_SESSION_TIMEOUT", "10"),
        help="seconds without a heartbeat after which the group gives a member's partitions "
        "to the others [env HUDDLE_KAFKA_SESSION_TIMEOUT; default 10]",
    )
    config.add_arguments(
        parser, ("recordings_dir", "s3_endpoint", "s3_bucket", "s3_access_key", "s3_secret_key", "s3_region")
    )
    parser.add_argument(
        "--work-dir",
        default=_env("WORK_DIR"),
        help="folder for files being written [env HUDDLE_WORK_DIR; default: "
        "RECORDINGS_DIR/.consumer with a local store, else a folder in the system's temp dir]",
    )
    parser.add_argument(
        "--idle-finish",
        type=float,
        default=_env("IDLE_FINISH", "60"),
        help="seconds without a record of a recording after which it is finished as "
        "incomplete (its node died) [env HUDDLE_IDLE_FINISH; default 60]",
    )
    parser.add_argument(
        "--http-host",
        default=_env("HTTP_HOST", "127.0.0.1"),
        help="address for /metrics and /healthz [env HUDDLE_HTTP_HOST; default 127.0.0.1]",
    )
    parser.add_argument(
        "--http-port",
        type=int,
        default=_env("HTTP_PORT"),
        help="port for /metrics and /healthz (0 picks one; unset: none) [env HUDDLE_HTTP_PORT]",
    )
    parser.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL", "warning"),
        choices=config.LOG_LEVELS,
        help="log level for the structured logs on stderr [env HUDDLE_LOG_LEVEL; default warning]",
    )


def options_from(args: argparse.Namespace) -> ConsumerOptions:
    from huddle.recording.store import store_from_settings

    if not args.kafka:
        raise ValueError(
            "--kafka (HUDDLE_KAFKA) is required: the bootstrap servers, HOST:PORT[,HOST:PORT...]"
        )
    if args.idle_finish <= 0:
        raise ValueError("--idle-finish must be a positive number of seconds")
    if args.kafka_session_timeout < 1:
        raise ValueError("--kafka-session-timeout must be at least 1 second")
    if args.http_port is not None and not 0 <= int(args.http_port) <= 65535:
        raise ValueError("--http-port must be 0-65535")
    store = store_from_settings(
        Path(args.recordings_dir),
        args.s3_endpoint,
        args.s3_bucket,
        args.s3_access_key,
        args.s3_secret_key,
        args.s3_region,
    )
    if args.work_dir:
        work_dir = Path(args.work_dir)
    elif isinstance(store, LocalStore):
        work_dir = store.root / ".consumer"  # hidden: never listed as a recording; hard links work
    else:
        work_dir = Path(tempfile.gettempdir()) / "huddle-record-consumer"
    return ConsumerOptions(
        bootstrap=args.kafka,
        store=store,
        work_dir=work_dir,
        topic=args.kafka_topic,
        group=args.kafka_group,
        idle_finish=args.idle_finish,
        http_host=args.http_host,
        http_port=None if args.http_port is None else int(args.http_port),
        session_timeout=args.kafka_session_timeout,
    )


def main(args: argparse.Namespace) -> int:
    from huddle import logs

    try:
        options = options_from(args)
    except ValueError as exc:
        print(f"huddle record-consumer: {exc}", file=sys.stderr)
        return 2
    logs.setup(args.log_level)
    consumer = RecordConsumer(options)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def ready() -> None:
            print(json.dumps({"event": "ready", "http": consumer.http_port}), flush=True)

        await consumer.run(stop, ready)

    from aiokafka.errors import KafkaError

    try:
        asyncio.run(run())
    except (OSError, KafkaError) as exc:
        print(f"huddle record-consumer: {exc}", file=sys.stderr)
        return 1
    return 0
