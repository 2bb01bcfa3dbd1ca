"""What the recording topic holds, read back by the tests: the frames a node published (and Kafka
acknowledged), to compare with the files the record consumer wrote."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections import defaultdict
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer

from huddle.recording import envelope, records


@dataclass
class Published:
    """Per track (recording id, track id): its frames as (RTP timestamp, sha1 of the data), in topic order."""

    frames: dict[tuple[str, str], list[tuple[int, str]]] = field(default_factory=lambda: defaultdict(list))
    tracks: dict[tuple[str, str], records.TrackStarted] = field(default_factory=dict)
    started: list[records.RecordingStarted] = field(default_factory=list)
    stopped: list[records.RecordingStopped] = field(default_factory=list)
    values: int = 0

    def unique(self, key: tuple[str, str]) -> list[tuple[int, str]]:
        """The track's frames once each (a producer that retried may have sent one twice), by timestamp."""
        return sorted(dict(self.frames[key]).items())


async def read_topic(bootstrap: str, topic: str, *, quiet: float = 2.0, timeout: float = 30.0) -> Published:
    """Everything on `topic` from the start, until nothing new came for `quiet` s (at most `timeout`)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"test-reader-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=16 << 20,
    )
    found = Published()
    joiner = envelope.Joiner()
    await consumer.start()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = loop.time()
        while loop.time() < deadline and loop.time() - last < quiet:
            batch = await consumer.getmany(timeout_ms=200)
            for messages in batch.values():
                for message in messages:
                    last = loop.time()
                    found.values += 1
                    data = joiner.feed(message.key or b"", message.value or b"")
                    if data is None:
                        continue
                    record = records.decode(data)
                    if isinstance(record, records.Frame):
                        digest = hashlib.sha1(record.data).hexdigest()
                        track = (record.recording_id, record.track_id)
                        found.frames[track].append((record.timestamp, digest))
                    elif isinstance(record, records.TrackStarted):
                        found.tracks[(record.recording_id, record.track_id)] = record
                    elif isinstance(record, records.RecordingStarted):
                        found.started.append(record)
                    elif isinstance(record, records.RecordingStopped):
                        found.stopped.append(record)
    finally:
        await consumer.stop()
    return found


def missing_frames(published: list[tuple[int, str]], written: list[str], video: bool) -> list[int]:
    """Timestamps of published frames the file lacks. A video file starts at a keyframe, so frames before the
    first one the file has are not expected in it."""
    have = set(written)
    start = 0
    if video:
        start = next((i for i, (_, digest) in enumerate(published) if digest in have), len(published))
    return [timestamp for timestamp, digest in published[start:] if digest not in have]
