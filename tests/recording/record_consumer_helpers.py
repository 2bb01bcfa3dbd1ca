"""Helpers for the record-consumer tests: synthetic calls published straight to the recording topic, the
consumer run as a subprocess (`python -m huddle record-consumer`), and what a stored track file holds.

Nothing here uses the node's recorder or Kafka producer: records are built, encoded (records.encode),
wrapped (envelope.wrap) and produced with confluent-kafka, the way the contract says a node publishes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import boto3
from confluent_kafka import ConsumerGroupTopicPartitions, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from huddle.loadtest.media import TRAILER_SIZE, encode_opus, encode_vp8
from huddle.recording import envelope
from huddle.recording.records import (
    Frame,
    Record,
    RecordingStarted,
    RecordingStopped,
    SpeakerChanged,
    TrackEnded,
    TrackStarted,
    encode,
)

FPS = 30
CLIP = 60  # VP8 frames per clip, the first a keyframe: looped, a keyframe every 2 s
VIDEO_CLOCK = 90_000
AUDIO_CLOCK = 48_000
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Media:
    video: list[tuple[bytes, bool]]
    audio: list[bytes]


def make_media() -> Media:
    video = encode_vp8(320, 180, 300_000, CLIP, seed=5)
    audio = [p[:-TRAILER_SIZE] for p in encode_opus(True, 50)]
    return Media(video, audio)


def digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


@dataclass
class Call:
    """One recording segment's records, tracks interleaved in capture order, with what was sent per track."""

    recording_id: str
    room: str
    started_at: float = 1_780_000_000.0
    timed: list[tuple[float, int, Record]] = field(default_factory=list)
    sent: dict[str, Counter[str]] = field(default_factory=dict)  # track id → checksums of the frames sent

    def add(self, at: float, record: Record) -> None:
        self.timed.append((at, len(self.timed), record))

    def track(self, media: Media, participant: str, kind: str, start: float, count: int) -> str:
        track_id = f"{participant}:{kind}"
        video = kind == "video"
        clock = VIDEO_CLOCK if video else AUDIO_CLOCK
        rid = self.recording_id
        joined = start - 0.05
        self.add(joined, TrackStarted(rid, track_id, participant, participant.title(), kind,
                                      "vp8" if video else "opus", clock, joined))  # fmt: skip
        rnd = random.Random(f"{rid}/{track_id}")
        base = rnd.randrange(2**31)
        sent = self.sent.setdefault(track_id, Counter())
        for i in range(count):
            if video:
                data, keyframe = media.video[i % CLIP]
                timestamp, at = base + i * VIDEO_CLOCK // FPS, start + i / FPS
            else:
                data, keyframe = media.audio[i % len(media.audio)], True
                timestamp, at = base + i * 960, start + i * 0.02
            at += rnd.uniform(-0.0004, 0.0004)
            sent[digest(data)] += 1
            self.add(at, Frame(rid, track_id, timestamp, at, keyframe, data))
        leave = start + count * (1 / FPS if video else 0.02)
        self.add(leave, TrackEnded(rid, track_id, leave))
        return track_id

    def participants(self, media: Media, names: list[str], seconds: float) -> None:
        """Each participant publishes video and audio for `seconds`, from slightly different starts."""
        for n, name in enumerate(names):
            start = 0.2 + 0.1 * n
            self.track(media, name, "video", start, int(seconds * FPS))
            self.track(media, name, "audio", start, int(seconds * 50))
        self.add(0.3, SpeakerChanged(self.recording_id, names[0], 0.3))

    def records(self, stop_at: float | None) -> list[Record]:
        out: list[Record] = [RecordingStarted(self.recording_id, self.room, self.started_at, ("tracks",))]
        out += [record for _, _, record in sorted(self.timed, key=lambda t: (t[0], t[1]))]
        if stop_at is not None:
            out.append(RecordingStopped(self.recording_id, stop_at))
        return out


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics(
        [NewTopic(topic, num_partitions=partitions, replication_factor=1)]
    ).values():
        future.result(timeout=15)


def committed(bootstrap: str, group: str, topic: str, partition: int) -> int | None:
    """The offset `group` committed for one partition, or None."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, partition)])
    for future in admin.list_consumer_group_offsets([request]).values():
        (found,) = future.result(timeout=15).topic_partitions
        return found.offset if found.offset >= 0 else None
    return None


class Publisher:
    """Publishes records as a node would: encode, wrap (split above `max_value`), produce keyed by room;
    `partition` pins them (so that tests choose which calls share a partition)."""

    def __init__(self, bootstrap: str, topic: str, max_value: int = 1 << 20) -> None:
        self.topic = topic
        self.max_value = max_value
        self.message_id = 0
        self.producer = Producer(
            {"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 5}
        )

    def publish(self, key: str, records: list[Record], partition: int) -> None:
        for record in records:
            self.message_id += 1
            for value in envelope.wrap(encode(record), self.max_value, self.message_id):
                self.raw(key, value, partition)

    def raw(self, key: str, value: bytes, partition: int) -> None:
        for _ in range(1000):
            try:
                self.producer.produce(self.topic, value=value, key=key.encode(), partition=partition)
                break
            except BufferError:
                self.producer.poll(0.05)
        self.producer.poll(0)

    def flush(self) -> None:
        assert self.producer.flush(30) == 0, "records not acknowledged by the broker"


class ConsumerProcess:
    """`python -m huddle record-consumer ...` in a subprocess; `ready` waits for its JSON line."""

    def __init__(self, workdir: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        self.log_path = workdir / f"consumer-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "huddle", "record-consumer", "--http-port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        self.http: int | None = None

    def ready(self, timeout: float = 20.0) -> None:
        assert self.process.stdout is not None
        os.set_blocking(self.process.stdout.fileno(), False)
        deadline = time.monotonic() + timeout
        buffer = b""
        while time.monotonic() < deadline:
            chunk = self.process.stdout.read()
            if chunk:
                buffer += chunk
            if b"\n" in buffer:
                line = json.loads(buffer.split(b"\n", 1)[0])
                assert line["event"] == "ready"
                self.http = line["http"]
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"record-consumer not ready (exit {self.process.poll()}):\n{self.log()}")

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=5) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metrics(self) -> dict[str, float]:
        status, text = self.get("/metrics")
        assert status == 200
        found = {}
        for line in text.splitlines():
            match = re.fullmatch(r"huddle_record_consumer_(\w+) (\S+)", line)
            if match:
                found[match.group(1)] = float(match.group(2))
        return found

    def wait_metric(self, name: str, at_least: float, timeout: float) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            metrics = self.metrics()
            if metrics.get(name, 0) >= at_least:
                return metrics
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"{name} = {metrics.get(name)} < {at_least}:\n{self.log()}")
            time.sleep(0.1)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self, timeout: float = 15.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill()
        self._log.close()
        if self.process.stdout is not None:
            self.process.stdout.close()


def packets(path: Path) -> list[tuple[int, str]]:
    """(pts, checksum) of every packet of a one-track file, as stored (no decoding)."""
    with av.open(str(path)) as container:
        stream = container.streams[0]
        return [(int(p.pts), digest(bytes(p))) for p in container.demux(stream) if p.size]


def wait_for(check: Any, timeout: float, what: str) -> Any:
    """Call `check` until it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def consumer_args(
    kafka: str,
    *,
    seaweed: Any = None,
    bucket: str | None = None,
    recordings_dir: Path | None = None,
    work_dir: Path,
    idle_finish: float = 60.0,
    group: str = "huddle-recorders",
) -> list[str]:
    """The command line of a consumer storing into SeaweedFS (`seaweed`, `bucket`) or a local folder."""
    args = ["--kafka", kafka, "--kafka-group", group, "--work-dir", str(work_dir)]
    args += ["--idle-finish", str(idle_finish), "--kafka-session-timeout", "3"]
    if seaweed is not None:
        assert bucket is not None
        args += ["--s3-endpoint", seaweed.endpoint, "--s3-bucket", bucket]
        args += ["--s3-access-key", seaweed.access_key, "--s3-secret-key", seaweed.secret_key]
    else:
        assert recordings_dir is not None
        args += ["--recordings-dir", str(recordings_dir)]
    return args


@contextlib.contextmanager
def running_consumer(workdir: Path, kafka: str, **kwargs: Any) -> Iterator[ConsumerProcess]:
    """A ready consumer (see consumer_args), stopped with SIGTERM at the end; its log printed on failure."""
    workdir.mkdir(parents=True, exist_ok=True)
    consumer = ConsumerProcess(workdir, consumer_args(kafka, work_dir=workdir / "work", **kwargs))
    try:
        consumer.ready()
        yield consumer
    finally:
        if consumer.process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                consumer.terminate()
        print("record consumer:", consumer.log())
        consumer.close()


def stored_objects(seaweed: Any, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix` in the bucket, by key."""
    client = boto3.client(
        "s3",
        endpoint_url=seaweed.endpoint,
        aws_access_key_id=seaweed.access_key,
        aws_secret_access_key=seaweed.secret_key,
        region_name=seaweed.region,
    )
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {
        entry["Key"]: client.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read()
        for entry in listing.get("Contents", [])
    }
