"""`huddle record-consumer` against a real Kafka-protocol broker (Tansu) and a real S3 (SeaweedFS).

Synthetic calls (real VP8 and Opus frames) are published straight to the topic as a node would; the consumer
runs as a subprocess. What is checked is what a user of the recordings sees: the files and manifests in the
store, frame by frame against what was published, also across kill -9 of a consumer; and the consumer's
/metrics.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from huddle.recording import envelope, segments
from huddle.recording.records import Record
from huddle.recording.store import LocalStore, S3Store, Store
from huddle.recording.tracks import TrackWriter
from tests.ffprobe import probe
from tests.recording.conftest import BUCKET
from tests.recording.record_consumer_helpers import (
    Call,
    ConsumerProcess,
    Media,
    Publisher,
    committed,
    create_topic,
    digest,
    make_media,
    packets,
    wait_for,
)
from tests.recording.seaweed import SeaweedS3
from tests.recording.tansu import Tansu

SESSION = "3"  # s: Kafka session timeout of the consumers, so that a dead one's partitions move quickly


@pytest.fixture(scope="module")
def media() -> Media:
    return make_media()


@pytest.fixture
def consumers(tmp_path: Path) -> Iterator[list[ConsumerProcess]]:
    started: list[ConsumerProcess] = []
    yield started
    for consumer in started:
        consumer.close()


def names() -> tuple[str, str, str]:
    """A topic, a group and a room of the test's own (the tests share the S3 bucket)."""
    tag = uuid.uuid4().hex[:8]
    return f"rec-{tag}", f"g-{tag}", f"room-{tag}"


def s3_args(kafka: Tansu, seaweed: SeaweedS3, topic: str, group: str, work: Path) -> list[str]:
    return [
        "--kafka", kafka.bootstrap, "--kafka-topic", topic, "--kafka-group", group,
        "--kafka-session-timeout", SESSION, "--idle-finish", "30", "--work-dir", str(work),
        "--s3-endpoint", seaweed.endpoint, "--s3-bucket", BUCKET, "--s3-access-key", seaweed.access_key,
    ]  # fmt: skip


def s3_env(seaweed: SeaweedS3) -> dict[str, str]:
    return {"HUDDLE_S3_SECRET_KEY": seaweed.secret_key}  # the secret through the environment, as advised


def start(
    consumers: list[ConsumerProcess], tmp_path: Path, args: list[str], env: dict[str, str]
) -> ConsumerProcess:
    consumer = ConsumerProcess(tmp_path, args, env)
    consumers.append(consumer)
    consumer.ready()
    return consumer


async def download(store: Store, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix`, by the rest of its key."""
    found = {}
    for obj in await store.list(prefix):
        stream = await store.read(obj.key)
        found[obj.key[len(prefix) :]] = b"".join([chunk async for chunk in stream])
    return found


async def wait_stored(
    store: Store, key: str, timeout: float, consumer: ConsumerProcess | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while not await store.exists(key):
        if time.monotonic() > deadline:
            raise AssertionError(f"{key} not stored in {timeout} s\n{consumer.log() if consumer else ''}")
        await asyncio.sleep(0.2)


def reference(records: list[Record], root: Path) -> dict[str, str]:
    """Checksums of the files a TrackWriter makes of `records` in one go, with no Kafka and no crash."""
    writer = TrackWriter(root, fsync=False)
    for record in records:
        writer.handle(record)
    (directory,) = [p for p in root.iterdir() if p.is_dir()]
    return {p.name: digest(p.read_bytes()) for p in directory.iterdir() if not p.name.startswith(".")}


def checksums(files: dict[str, bytes]) -> dict[str, str]:
    return {name: digest(data) for name, data in files.items()}


def check_recording(
    files: dict[str, bytes], call: Call, tmp_path: Path, complete: bool = True
) -> dict[str, Any]:
    """The stored recording holds every frame published, once each, in order; ffprobe agrees."""
    manifest = json.loads(files["manifest.json"])
    assert manifest["complete"] is complete
    assert manifest["recording_id"] == call.recording_id and manifest["room"] == call.room
    tracks = {t["track_id"]: t for t in manifest["tracks"]}
    assert set(tracks) == set(call.sent)
    assert set(files) == {"manifest.json", *(t["file"] for t in tracks.values())}
    for track_id, sent in call.sent.items():
        entry = tracks[track_id]
        # Named after the person, as the node's own writer names them (these names are plain ASCII).
        assert entry["file"].startswith(f"{entry['name'].lower()}-{entry['participant_id']}-{entry['kind']}-")
        path = tmp_path / f"check-{uuid.uuid4().hex[:6]}-{entry['file']}"
        path.write_bytes(files[entry["file"]])
        stored = packets(path)
        timestamps = [pts for pts, _ in stored]
        assert timestamps == sorted(set(timestamps)), f"{track_id}: duplicate or unordered timestamps"
        assert Counter(checksum for _, checksum in stored) == sent, f"{track_id}: frames lost or doubled"
        assert entry["frames"] == sum(sent.values())
        (stream,) = probe(path)["streams"]
        assert int(stream["nb_read_frames"]) == entry["frames"]
    return manifest


async def test_a_three_participant_call_is_stored_frame_for_frame(
    kafka: Tansu,
    seaweed: SeaweedS3,
    s3_store: S3Store,
    media: Media,
    tmp_path: Path,
    consumers: list[ConsumerProcess],
) -> None:
    topic, group, room = names()
    create_topic(kafka.bootstrap, topic, 3)
    call = Call("20260101T100000Z-a1b2c3", room)
    call.participants(media, ["alice", "bob", "carol"], seconds=4)
    records = call.records(stop_at=4.5)
    # Values of at most 2 KiB: the keyframes travel in parts, which the consumer joins again.
    publisher = Publisher(kafka.bootstrap, topic, max_value=2048)
    publisher.publish(room, records, partition=1)
    publisher.flush()

    consumer = start(
        consumers, tmp_path, s3_args(kafka, seaweed, topic, group, tmp_path / "work"), s3_env(seaweed)
    )
    prefix = f"{room}/{call.recording_id}/"
    await wait_stored(s3_store, prefix + "manifest.json", 30, consumer)
    files = await download(s3_store, prefix)
    manifest = check_recording(files, call, tmp_path)
    assert len(manifest["tracks"]) == 6
    assert checksums(files) == reference(records, tmp_path / "reference")  # the bytes one writer makes

    frames = sum(sum(sent.values()) for sent in call.sent.values())
    metrics = consumer.wait_metric("commits_total", 1, 10)
    assert metrics["frames_written_total"] == frames
    assert metrics["parts_joined_total"] > 0
    assert metrics["records_read_total"] > len(records)  # split records are several values
    assert metrics["recordings_uploaded_total"] == 1
    assert metrics["garbage_skipped_total"] == metrics["unknown_version_skipped_total"] == 0
    assert metrics["lag"] == 0 and metrics["recordings_open"] == 0
    status, body = consumer.get("/healthz")
    assert status == 200 and json.loads(body)["ok"] is True
    assert consumer.terminate() == 0  # SIGTERM: a clean stop


async def test_kill_9_mid_recording_then_restart_loses_and_duplicates_no_frame(
    kafka: Tansu,
    seaweed: SeaweedS3,
    s3_store: S3Store,
    media: Media,
    tmp_path: Path,
    consumers: list[ConsumerProcess],
) -> None:
    topic, group, room = names()
    create_topic(kafka.bootstrap, topic, 2)
    early = Call("20260101T105900Z-00000e", room + "-e")
    early.participants(media, ["dan"], seconds=1)
    early_records = early.records(stop_at=1.5)
    long = Call("20260101T110000Z-00000b", room + "-b")
    long.participants(media, ["alice", "bob"], seconds=6)
    long_records = long.records(stop_at=6.5)
    short = Call("20260101T110001Z-00000a", room + "-a")
    short.participants(media, ["carol"], seconds=2)
    short_records = short.records(stop_at=2.5)
    # All in one partition (one value per record). The early call ends before the long one starts, so the
    # commit goes past it; the short one starts and ends while the long one goes on, so the commit stays at
    # the long one's start and a replay reads the short one again.
    half = len(long_records) // 2
    publisher = Publisher(kafka.bootstrap, topic)
    publisher.publish(early.room, early_records, partition=0)
    publisher.publish(long.room, long_records[:10], partition=0)
    publisher.publish(short.room, short_records, partition=0)
    publisher.publish(long.room, long_records[10:half], partition=0)
    publisher.flush()

    args = s3_args(kafka, seaweed, topic, group, tmp_path / "work")
    first = start(consumers, tmp_path, args, s3_env(seaweed))
    await wait_stored(s3_store, f"{short.room}/{short.recording_id}/manifest.json", 30, first)
    wait_for(lambda: committed(kafka.bootstrap, group, topic, 0) == len(early_records), 10, "the commit")
    before = first.metrics()
    assert before["recordings_open"] == 1 and before["frames_written_total"] > 0
    first.kill()  # kill -9, with the long recording's files half written

    publisher.publish(long.room, long_records[half:], partition=0)
    publisher.flush()
    second = start(consumers, tmp_path, args, s3_env(seaweed))
    prefix = f"{long.room}/{long.recording_id}/"
    await wait_stored(s3_store, prefix + "manifest.json", 40, second)
    files = await download(s3_store, prefix)
    check_recording(files, long, tmp_path)
    assert checksums(files) == reference(long_records, tmp_path / "reference")  # as without the crash
    after = second.wait_metric("recordings_skipped_total", 1, 10)  # the short call, stored already
    assert after["recordings_uploaded_total"] == 1
    assert after["records_read_total"] == len(long_records) + len(short_records)  # from the commit on
    for call in (early, short):
        prefix = f"{call.room}/{call.recording_id}/"
        check_recording(await download(s3_store, prefix), call, tmp_path)


async def test_two_consumers_in_a_group_one_killed_the_other_finishes_the_calls(
    kafka: Tansu,
    seaweed: SeaweedS3,
    s3_store: S3Store,
    media: Media,
    tmp_path: Path,
    consumers: list[ConsumerProcess],
) -> None:
    topic, group, room = names()
    create_topic(kafka.bootstrap, topic, 2)
    args = s3_args(kafka, seaweed, topic, group, tmp_path / "work")
    one = start(consumers, tmp_path, args, s3_env(seaweed))
    two = start(consumers, tmp_path, args, s3_env(seaweed))
    deadline = time.monotonic() + 20
    while not (one.metrics()["partitions"] == two.metrics()["partitions"] == 1):
        assert time.monotonic() < deadline, "the two members did not share the partitions"
        await asyncio.sleep(0.2)

    calls = [Call(f"20260101T120000Z-00000{p}", f"{room}-{p}") for p in range(2)]
    publisher = Publisher(kafka.bootstrap, topic)
    for partition, call in enumerate(calls):
        call.participants(media, ["dave", "erin"], seconds=4)
        records = call.records(stop_at=4.5)
        publisher.publish(call.room, records[: len(records) // 2], partition=partition)
    publisher.flush()
    for consumer in (one, two):
        consumer.wait_metric("frames_written_total", 1, 15)  # each is writing its call
    one.kill()

    for partition, call in enumerate(calls):
        records = call.records(stop_at=4.5)
        publisher.publish(call.room, records[len(records) // 2 :], partition=partition)
    publisher.flush()
    for call in calls:
        prefix = f"{call.room}/{call.recording_id}/"
        await wait_stored(s3_store, prefix + "manifest.json", 40, two)
        check_recording(await download(s3_store, prefix), call, tmp_path)
    metrics = two.metrics()
    assert metrics["partitions"] == 2 and metrics["recordings_uploaded_total"] == 2


async def test_garbage_and_unknown_versions_are_skipped_counted_and_logged(
    kafka: Tansu,
    seaweed: SeaweedS3,
    s3_store: S3Store,
    media: Media,
    tmp_path: Path,
    consumers: list[ConsumerProcess],
) -> None:
    topic, group, room = names()
    create_topic(kafka.bootstrap, topic, 1)
    call = Call("20260101T130000Z-0000cc", room)
    call.participants(media, ["frank"], seconds=2)
    records = call.records(stop_at=2.5)
    publisher = Publisher(kafka.bootstrap, topic)
    third = len(records) // 3
    publisher.publish(room, records[:third], partition=0)
    for value in (b"garbage that is no envelope", b"", b"H"):
        publisher.raw(room, value, partition=0)
    for version in (2, 7):  # a later producer's envelopes
        publisher.raw(room, bytes((envelope.MAGIC, version, 0)) + b"a record of the future", partition=0)
    publisher.raw(
        room, bytes((envelope.MAGIC, envelope.VERSION, 0, 99)) + b"{}", partition=0
    )  # no record kind
    publisher.publish(room, records[third:], partition=0)
    publisher.flush()

    consumer = start(
        consumers, tmp_path, s3_args(kafka, seaweed, topic, group, tmp_path / "work"), s3_env(seaweed)
    )
    prefix = f"{room}/{call.recording_id}/"
    await wait_stored(s3_store, prefix + "manifest.json", 30, consumer)
    check_recording(await download(s3_store, prefix), call, tmp_path)
    metrics = consumer.metrics()
    assert metrics["garbage_skipped_total"] == 3
    assert metrics["unknown_version_skipped_total"] == 2
    assert metrics["malformed_skipped_total"] == 1
    logged = [json.loads(line) for line in consumer.log().splitlines() if line.startswith("{")]
    messages = {entry["msg"] for entry in logged}
    assert "value that is not a recording envelope skipped" in messages
    assert "recording value of an unknown version skipped" in messages
    assert any(entry.get("version") == 2 for entry in logged)
    assert consumer.terminate() == 0


async def test_a_later_segment_is_stored_apart_with_its_gap_and_replays_are_skipped(
    kafka: Tansu, media: Media, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    topic, group, room = names()
    create_topic(kafka.bootstrap, topic, 1)
    store = LocalStore(tmp_path / "recordings")
    args = [
        "--kafka", kafka.bootstrap, "--kafka-topic", topic, "--kafka-group", group,
        "--kafka-session-timeout", SESSION, "--idle-finish", "2", "--recordings-dir", str(store.root),
    ]  # fmt: skip
    first = Call("20260101T140000Z-0000dd", room)
    first.participants(media, ["gina"], seconds=2)
    publisher = Publisher(kafka.bootstrap, topic)
    publisher.publish(room, first.records(stop_at=None), partition=0)  # its node died: no stop
    publisher.flush()
    consumer = start(consumers, tmp_path, args, {})
    prefix = f"{room}/{first.recording_id}/"
    await wait_stored(store, prefix + "manifest.json", 20, consumer)  # finished after 2 s of nothing
    assert consumer.metrics()["recordings_idle_finished_total"] == 1
    check_recording(await download(store, prefix), first, tmp_path, complete=False)

    # Another node goes on with the call 3 s later, as a segment of the same recording.
    key = f"{first.recording_id}.9f8e7d"
    later = Call(key, room, started_at=first.started_at + 5.0)
    later.participants(media, ["gina"], seconds=2)
    publisher.publish(room, later.records(stop_at=2.5), partition=0)
    publisher.flush()
    await wait_stored(store, prefix + "segment-2/manifest.json", 20, consumer)
    files = await download(store, prefix + "segment-2/")
    manifest = json.loads(files["manifest.json"])
    assert manifest["segment"] == 2 and manifest["segment_key"] == key
    assert manifest["recording_id"] == first.recording_id
    assert manifest["recording_started_at"] == first.started_at
    gap = manifest["gap"]
    assert gap["after_segment"] == 1
    # From the end of the first segment's last frame (0.2 s + 2 s) to the later one's first (5 s + 0.2 s).
    assert gap["duration"] == pytest.approx(3.0, abs=0.01)
    assert gap["from"] == pytest.approx(first.started_at + 2.2, abs=0.01)
    assert consumer.terminate() == 0
    stored = [(o.key, o.size, o.modified) for o in await store.list(prefix)]
    assert len(stored) == 6  # two segments: two tracks and a manifest each

    # A new group reads the topic from the start: both segments are stored already, nothing is rewritten.
    again = start(consumers, tmp_path, [*args[:5], group + "-again", *args[6:]], {})
    metrics = again.wait_metric("recordings_skipped_total", 2, 20)
    assert metrics["recordings_uploaded_total"] == 0 and metrics["frames_written_total"] == 0
    assert [(o.key, o.size, o.modified) for o in await store.list(prefix)] == stored


def test_segment_numbers_and_gaps() -> None:
    prefix = "room/rec/"
    names = ["a.webm", "manifest.json", "segment-2/a.webm", "segment-3/a.webm", "segment-3/manifest.json"]
    keys = [prefix + name for name in names] + ["room/other/manifest.json"]
    numbers, manifests = segments.stored_segments(prefix, keys)
    assert numbers == {1, 2, 3}
    assert manifests == {1: prefix + "manifest.json", 3: prefix + "segment-3/manifest.json"}
    assert segments.next_segment(manifests) == 4
    assert segments.next_segment([]) == 2  # the first segment exists even with nothing stored
    assert segments.split_key("rec") == ("rec", False) and segments.split_key("rec.ab") == ("rec", True)
    assert segments.folder(1) == "" and segments.folder(4) == "segment-4/"
    before = {"started_at": 100.0, "duration": 9.0, "tracks": [{"start_offset": 1.0, "duration": 5.0}]}
    after = {"started_at": 110.0, "duration": 3.0, "tracks": [{"start_offset": 0.5, "duration": 2.0}]}
    marked = segments.mark_continued(
        after, recording_id="rec", segment=2, segment_key="rec.ab", before=before
    )
    assert marked["gap"] == {"after_segment": 1, "from": 106.0, "to": 110.5, "duration": 4.5}
    assert marked["recording_started_at"] == 100.0 and marked["segment_key"] == "rec.ab"
    assert segments.gap(after, None, 1)["missing"]


def test_a_discarded_recording_leaves_no_file_and_no_manifest(media: Media, tmp_path: Path) -> None:
    """What a consumer does with the open recordings of a partition it loses: nothing of them stays."""
    call = Call("20260101T150000Z-0000ee", "room")
    call.participants(media, ["hana"], seconds=1)
    finished: list[str] = []
    writer = TrackWriter(tmp_path, lambda rid, paths: finished.append(rid), fsync=False)
    for record in call.records(stop_at=None):
        writer.handle(record)
    assert writer.recording_ids == [call.recording_id]
    assert any((tmp_path / call.recording_id).iterdir())
    assert writer.discard(call.recording_id)
    assert not (tmp_path / call.recording_id).exists()
    assert writer.recording_ids == [] and finished == []
    assert not writer.discard(call.recording_id) and not writer.finish(call.recording_id)


async def test_sigterm_mid_recording_stops_at_once_and_the_next_member_writes_it_whole(
    kafka: Tansu, media: Media, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    topic, group, room = names()
    create_topic(kafka.bootstrap, topic, 1)
    store = LocalStore(tmp_path / "recordings")
    work = tmp_path / "work"
    args = [
        "--kafka", kafka.bootstrap, "--kafka-topic", topic, "--kafka-group", group,
        "--kafka-session-timeout", SESSION, "--recordings-dir", str(store.root), "--work-dir", str(work),
    ]  # fmt: skip
    call = Call("20260101T170000Z-0000ff", room)
    call.participants(media, ["ivan", "judy"], seconds=3)
    records = call.records(stop_at=3.5)
    publisher = Publisher(kafka.bootstrap, topic)
    publisher.publish(room, records[: len(records) // 2], partition=0)
    publisher.flush()
    first = start(consumers, tmp_path, args, {})
    first.wait_metric("frames_written_total", 1, 15)
    started = time.monotonic()
    assert first.terminate() == 0
    assert time.monotonic() - started < 5
    assert await store.list(f"{room}/") == []  # nothing half done reached the store
    assert [p for p in work.rglob("*") if p.is_file()] == []  # nor stayed in the work folder

    publisher.publish(room, records[len(records) // 2 :], partition=0)
    publisher.flush()
    second = start(consumers, tmp_path, args, {})
    prefix = f"{room}/{call.recording_id}/"
    await wait_stored(store, prefix + "manifest.json", 20, second)
    files = await download(store, prefix)
    check_recording(files, call, tmp_path)
    assert checksums(files) == reference(records, tmp_path / "reference")
