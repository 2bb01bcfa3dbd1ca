"""Per-track recording: records in, one WebM per track out, checked with ffprobe and decoded with PyAV.

The media is encoded once per module with PyAV (huddle.loadtest.media): a 2 s VP8 clip at 640x360 / 30 fps
that starts with a keyframe, looped so that a 10 s track has a keyframe every 2 s, and 1 s of 20 ms Opus
packets, looped. Records carry realistic RTP timestamps (random bases, 90 kHz and 48 kHz) and capture times
on the recording clock with sub-millisecond jitter, interleaved across tracks in capture order.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import pytest

from huddle.loadtest.media import TRAILER_SIZE, encode_opus, encode_vp8
from huddle.recording.log import InProcessLog
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
from huddle.recording.tracks import TrackConsumer, TrackWriter, opus_duration, vp8_keyframe_size

FPS = 30
CLIP = 60  # frames: a keyframe every 2 s when looped
VIDEO_CLOCK = 90_000
AUDIO_CLOCK = 48_000
FFPROBE = "/usr/bin/ffprobe"


@dataclass(frozen=True)
class Media:
    video: list[tuple[bytes, bool]]  # one 2 s clip, the first frame a keyframe
    audio: list[bytes]  # 1 s of 20 ms packets


@pytest.fixture(scope="module")
def media() -> Media:
    video = encode_vp8(640, 360, 500_000, CLIP, seed=3)
    assert video[0][1] and not any(keyframe for _, keyframe in video[1:])
    audio = [p[:-TRAILER_SIZE] for p in encode_opus(True, 50)]
    return Media(video, audio)


class Call:
    """Builds one recording's records: tracks with realistic timestamps, merged in capture order."""

    def __init__(self, recording_id: str, room: str = "standup") -> None:
        self.recording_id = recording_id
        self.room = room
        self.timed: list[tuple[float, int, Record]] = []
        self.rnd = random.Random(recording_id)
        self.written: dict[str, list[float]] = {}  # track id → capture times of the frames sent

    def _add(self, at: float, record: Record) -> None:
        self.timed.append((at, len(self.timed), record))

    def track(
        self,
        media: Media,
        participant: str,
        name: str,
        kind: str,
        start: float,
        count: int,
        *,
        track_id: str | None = None,
        first_index: int = 0,
        end: bool = True,
    ) -> str:
        """`count` frames of one track from capture time `start`, TrackStarted before, TrackEnded after."""
        track_id = track_id or f"{participant}:{kind}"
        video = kind == "video"
        clock = VIDEO_CLOCK if video else AUDIO_CLOCK
        step = 1 / FPS if video else 0.02
        rid = self.recording_id
        codec = "vp8" if video else "opus"
        joined = start - 0.05
        self._add(joined, TrackStarted(rid, track_id, participant, name, kind, codec, clock, joined))
        base = self.rnd.randrange(2**31)
        times = self.written.setdefault(track_id, [])
        for i in range(count):
            index = first_index + i
            if video:
                data, keyframe = media.video[index % CLIP]
                timestamp = base + i * VIDEO_CLOCK // FPS
            else:
                data, keyframe = media.audio[index % len(media.audio)], True
                timestamp = base + i * 960
            time = start + i * step + self.rnd.uniform(-0.0004, 0.0004)
            times.append(time)
            self._add(time, Frame(rid, track_id, timestamp, time, keyframe, data))
        if end:
            leave = start + count * step
            self._add(leave, TrackEnded(rid, track_id, leave))
        return track_id

    def records(self, stop_at: float | None) -> list[Record]:
        out: list[Record] = [RecordingStarted(self.recording_id, self.room, 1_780_000_000.0, ("tracks",))]
        out += [record for _, _, record in sorted(self.timed, key=lambda t: (t[0], t[1]))]
        if stop_at is not None:
            out.append(RecordingStopped(self.recording_id, stop_at))
        return out


class CountingLog(InProcessLog):
    """Counts commits, and those made while the consumer still had a recording open (there must be none)."""

    consumer: TrackConsumer | None = None
    commits = 0
    commits_while_open = 0

    def commit(self) -> None:
        self.commits += 1
        if self.consumer is not None and self.consumer.writer.open_recordings:
            self.commits_while_open += 1


def probe(path: Path) -> dict[str, Any]:
    result = subprocess.run(
        [FFPROBE, "-v", "error", "-count_frames", "-show_entries",
         "stream=codec_name,nb_read_frames,width,height,channels:format=duration", "-of", "json", str(path)],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert result.stderr == "", result.stderr
    info = json.loads(result.stdout)
    (stream,) = info["streams"]
    return {**stream, "duration": float(info["format"]["duration"])}


def decoded_times(path: Path) -> tuple[list[float], bool]:
    """Every decoded frame's time in the file (PyAV), and whether the first one is a keyframe."""
    with av.open(str(path)) as container:
        stream = container.streams[0]
        frames = list(container.decode(stream))
    assert frames
    first_key = getattr(frames[0], "key_frame", True)
    return [float(f.time) for f in frames], bool(first_key)


def check_file(directory: Path, entry: dict[str, Any], sent: int) -> list[float]:
    """The file holds exactly what the manifest says, ffprobe and PyAV agree; returns decoded frame times."""
    path = directory / entry["file"]
    info = probe(path)
    video = entry["kind"] == "video"
    assert info["codec_name"] == ("vp8" if video else "opus")
    assert int(info["nb_read_frames"]) == entry["frames"] == sent
    written = sent / FPS if video else sent * 0.02
    assert abs(info["duration"] - written) <= 0.1
    assert abs(entry["duration"] - written) <= 0.1
    if video:
        assert (info["width"], info["height"]) == (640, 360) == (entry["width"], entry["height"])
    times, first_key = decoded_times(path)
    assert len(times) == sent
    assert first_key
    return times


def manifest(root: Path, recording_id: str) -> dict[str, Any]:
    return json.loads((root / recording_id / "manifest.json").read_text())


def by_track(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["track_id"]: t for t in doc["tracks"]}


async def test_through_the_log_files_decode_and_tracks_line_up(media: Media, tmp_path: Path) -> None:
    call = Call("rec-main")
    call.track(media, "alice", "Alice", "video", 0.5, 300)  # 10 s, keyframes every 2 s
    call.track(media, "alice", "Alice", "audio", 0.5, 500)
    call.track(media, "bob", "Bob", "video", 3.2, 150)  # Bob's tracks start at 3.2 s
    call.track(media, "bob", "Bob", "audio", 3.2, 250)
    call._add(3.3, SpeakerChanged("rec-main", "bob", 3.3))
    records = call.records(stop_at=11.0)

    log = CountingLog(max_pending=10_000)
    finished_on: list[int] = []
    consumer = TrackConsumer(
        log, TrackWriter(tmp_path), on_finished=lambda rid, paths: finished_on.append(threading.get_ident())
    )
    log.consumer = consumer
    consumer.start()
    for record in records:
        log.publish(call.room, encode(record))
    paths = await consumer.wait_finished("rec-main", timeout=20)
    await consumer.close()

    directory = tmp_path / "rec-main"
    doc = manifest(tmp_path, "rec-main")
    assert paths[-1] == directory / "manifest.json"
    # Named "<name>-<participant id>-...": these participants' ids are their names in lower case.
    assert sorted(p.name for p in paths[:-1]) == sorted(
        f"{who}-{who}-{kind}-1.webm" for who in ("alice", "bob") for kind in ("video", "audio")
    )
    assert finished_on == [threading.get_ident()]  # on_finished runs on the event loop's thread
    assert doc["recording_id"] == "rec-main" and doc["room"] == "standup" and doc["complete"] is True
    assert doc["started_at"] == 1_780_000_000.0
    assert doc["duration"] == pytest.approx(11.0)
    assert doc["speakers"] == [{"at": 3.3, "participant_id": "bob"}]
    assert {p["participant_id"]: p["name"] for p in doc["participants"]} == {"alice": "Alice", "bob": "Bob"}
    bob_joined = next(p for p in doc["participants"] if p["participant_id"] == "bob")
    assert bob_joined["joined_at"] == pytest.approx(3.15)
    assert bob_joined["left_at"] == pytest.approx(3.2 + 5.0)

    tracks = by_track(doc)
    for track_id, entry in tracks.items():
        sent = call.written[track_id]
        times = check_file(directory, entry, len(sent))
        assert entry["codec"] == ("vp8" if entry["kind"] == "video" else "opus")
        assert entry["clock_rate"] == (VIDEO_CLOCK if entry["kind"] == "video" else AUDIO_CLOCK)
        assert entry["start_offset"] == pytest.approx(sent[0], abs=1e-9)
        # Where each decoded frame lands on the recording clock: start_offset + its time in the file.
        # Within 20 ms of its capture time for every frame of both kinds: audio and video within 40 ms.
        errors = [abs(entry["start_offset"] + t - captured) for t, captured in zip(times, sent, strict=True)]
        assert max(errors) < 0.02, (track_id, max(errors))
    for who in ("alice", "bob"):
        video, audio = tracks[f"{who}:video"], tracks[f"{who}:audio"]
        assert abs(video["start_offset"] - audio["start_offset"]) < 0.04
    assert tracks["bob:video"]["start_offset"] == pytest.approx(3.2, abs=0.001)
    assert tracks["bob:audio"]["start_offset"] == pytest.approx(3.2, abs=0.001)
    assert tracks["bob:video"]["joined_at"] == pytest.approx(3.15)
    assert tracks["bob:video"]["left_at"] == pytest.approx(8.2)
    assert log.commits_while_open == 0 and log.commits >= 1  # committed once the recording was written
    stats = consumer.stats()
    assert stats["malformed"] == 0 and stats["log"]["dropped"] == 0
    assert stats["writer"]["frames_written"] == 300 + 500 + 150 + 250


def test_leading_delta_frames_are_dropped(media: Media, tmp_path: Path) -> None:
    call = Call("rec-delta")
    # The track joins 10 frames before the clip's next keyframe (index 60).
    call.track(media, "carol", "Carol", "video", 1.0, 100, first_index=CLIP - 10)
    writer = TrackWriter(tmp_path)
    for record in call.records(stop_at=5.0):
        writer.handle(record)
    doc = manifest(tmp_path, "rec-delta")
    (entry,) = doc["tracks"]
    sent = call.written["carol:video"]
    assert entry["dropped"]["leading"] == 10
    assert writer.leading_dropped == 10
    assert entry["frames"] == 90
    assert entry["start_offset"] == pytest.approx(sent[10], abs=1e-9)  # the keyframe's capture time
    times = check_file(tmp_path / "rec-delta", entry, 90)
    assert times[0] == 0.0


def test_leave_and_rejoin_make_two_files(media: Media, tmp_path: Path) -> None:
    call = Call("rec-rejoin")
    for start in (1.0, 5.0):  # the same track ids again after the rejoin
        call.track(media, "dave", "Dave", "video", start, 60)
        call.track(media, "dave", "Dave", "audio", start, 100)
    finished: list[tuple[str, list[Path]]] = []
    writer = TrackWriter(tmp_path, on_finished=lambda rid, paths: finished.append((rid, paths)))
    for record in call.records(stop_at=8.0):
        writer.handle(record)
    doc = manifest(tmp_path, "rec-rejoin")
    files = sorted(t["file"] for t in doc["tracks"])
    assert files == [f"dave-dave-{kind}-{n}.webm" for kind in ("audio", "video") for n in (1, 2)]
    for entry in doc["tracks"]:
        check_file(tmp_path / "rec-rejoin", entry, 60 if entry["kind"] == "video" else 100)
        second = entry["file"].endswith("-2.webm")
        assert entry["start_offset"] == pytest.approx(5.0 if second else 1.0, abs=0.001)
        assert entry["left_at"] == pytest.approx(7.0 if second else 3.0)
    (dave,) = doc["participants"]
    assert dave["intervals"] == [[pytest.approx(0.95), pytest.approx(3.0)], [pytest.approx(4.95), 7.0]]
    ((rid, paths),) = finished
    assert rid == "rec-rejoin" and len(paths) == 5 and all(p.exists() for p in paths)
    assert not list((tmp_path / "rec-rejoin").glob(".*"))  # no temporary file left behind


async def test_malformed_entries_are_counted_and_skipped(media: Media, tmp_path: Path) -> None:
    call = Call("rec-bad")
    call.track(media, "erin", "Erin", "audio", 0.2, 50)
    records = call.records(stop_at=2.0)
    log = InProcessLog()
    writer = TrackWriter(tmp_path)
    consumer = TrackConsumer(log, writer)
    consumer.start()
    garbage = [b"", b"\x03short", b"\x63{}", b"\x02{not json", b"\x02{}"]
    log.publish("room", encode(records[0]))
    for junk in garbage:
        log.publish("room", junk)
    log.publish("room", encode(Frame("never-started", "x:audio", 1, 0.1, True, media.audio[0])))
    log.publish("room", encode(Frame("rec-bad", "no-such-track", 1, 0.1, True, media.audio[0])))
    log.publish("room", encode(TrackStarted("rec-bad", "t", "p", "P", "video", "h264", 90000, 0.1)))
    log.publish("room", encode(RecordingStarted("../escape", "room", 0.0, ("tracks",))))
    empty_packets = 0
    for record in records[1:]:
        log.publish("room", encode(record))
        if isinstance(record, Frame) and record.timestamp % 7 == 0:
            bad = Frame("rec-bad", record.track_id, record.timestamp + 1, 0.3, True, b"")
            log.publish("room", encode(bad))
            empty_packets += 1
    assert empty_packets
    await consumer.wait_finished("rec-bad", timeout=10)
    await consumer.close()
    assert consumer.malformed == len(garbage)
    assert writer.unknown_recording == 1
    assert writer.unknown_track == 1
    assert writer.malformed == 2 + empty_packets  # the H.264 track, the escaping id, the empty packets
    assert not (tmp_path.parent / "escape").exists()
    (entry,) = manifest(tmp_path, "rec-bad")["tracks"]
    check_file(tmp_path / "rec-bad", entry, 50)


async def test_close_finalises_open_recordings_into_playable_files(media: Media, tmp_path: Path) -> None:
    call = Call("rec-open")
    call.track(media, "fay", "Fay", "video", 0.0, 90, end=False)
    call.track(media, "fay", "Fay", "audio", 0.0, 150, end=False)
    log = InProcessLog()
    finished: list[str] = []
    consumer = TrackConsumer(log, TrackWriter(tmp_path), on_finished=lambda rid, paths: finished.append(rid))
    consumer.start()
    for record in call.records(stop_at=None):
        log.publish("room", encode(record))
    await asyncio.sleep(0)
    await consumer.close()  # no RecordingStopped: close drains the log and finishes the files
    assert finished == ["rec-open"]
    doc = manifest(tmp_path, "rec-open")
    assert doc["complete"] is False and doc["stopped_at"] is None
    for entry in doc["tracks"]:
        check_file(tmp_path / "rec-open", entry, 90 if entry["kind"] == "video" else 150)
        assert entry["left_at"] is None


async def test_a_recording_whose_stop_was_lost_can_be_finished(media: Media, tmp_path: Path) -> None:
    call = Call("rec-lost")
    call.track(media, "ivy", "Ivy", "audio", 0.0, 100)
    log = InProcessLog()
    consumer = TrackConsumer(log, TrackWriter(tmp_path))
    consumer.start()
    for record in call.records(stop_at=None):  # RecordingStopped never arrives
        log.publish("room", encode(record))
    with pytest.raises(TimeoutError):
        await consumer.wait_finished("rec-lost", timeout=0.2)
    assert await consumer.finish("rec-lost") is True
    paths = await consumer.wait_finished("rec-lost", timeout=5)
    assert [p.name for p in paths] == ["ivy-ivy-audio-1.webm", "manifest.json"]
    doc = manifest(tmp_path, "rec-lost")
    assert doc["complete"] is False
    check_file(tmp_path / "rec-lost", doc["tracks"][0], 100)
    assert await consumer.finish("rec-lost") is False
    await consumer.close()


def test_files_are_named_after_their_people_whatever_the_names(media: Media, tmp_path: Path) -> None:
    call = Call("rec-names")
    people = [
        ("p_00000001", "Alice"),
        ("p_00000002", "Alice"),  # a second Alice: her own files
        ("p_00000003", "../../etc"),
        ("p_00000004", "<script>alert(1)</script>"),
        ("p_00000005", "🎉"),
        ("p_00000006", "Zoë " * 125),  # 500 characters
        ("p_00000007", ".."),
    ]
    for participant, name in people:
        call.track(media, participant, name, "audio", 0.5, 50)
    writer = TrackWriter(tmp_path)
    for record in call.records(stop_at=2.0):
        writer.handle(record)
    directory = tmp_path / "rec-names"
    doc = manifest(tmp_path, "rec-names")
    files = {t["participant_id"]: t["file"] for t in doc["tracks"]}
    assert files == {
        "p_00000001": "alice-p_00000001-audio-1.webm",
        "p_00000002": "alice-p_00000002-audio-1.webm",
        "p_00000003": "etc-p_00000003-audio-1.webm",
        "p_00000004": "script-alert-1-script-p_00000004-audio-1.webm",
        "p_00000005": "p_00000005-audio-1.webm",
        "p_00000006": "zoe-" * 7 + "zoe-p_00000006-audio-1.webm",
        "p_00000007": "p_00000007-audio-1.webm",
    }
    # Every file is where its name says, inside the recording's folder, and plays; the manifest keeps the
    # name as it was typed.
    assert sorted(p.name for p in directory.iterdir()) == sorted([*files.values(), "manifest.json"])
    for entry in doc["tracks"]:
        check_file(directory, entry, 50)
    assert {t["participant_id"]: t["name"] for t in doc["tracks"]} == dict(people)


def test_duplicates_and_replays_are_not_written_twice(media: Media, tmp_path: Path) -> None:
    call = Call("rec-again")
    call.track(media, "gus", "Gus", "audio", 0.0, 100)
    call.track(media, "gus", "Gus", "video", 0.0, 60)
    records = call.records(stop_at=3.0)
    writer = TrackWriter(tmp_path)
    middle = len(records) // 2
    for record in records[:middle] + records[:middle] + records[middle:]:  # a stretch delivered twice
        writer.handle(record)
    assert writer.duplicates == 3  # RecordingStarted, and both TrackStarted
    assert writer.out_of_order > 0
    doc = manifest(tmp_path, "rec-again")
    for entry in doc["tracks"]:
        check_file(tmp_path / "rec-again", entry, 60 if entry["kind"] == "video" else 100)
    # After a restart, the log delivers the whole finished recording again: it is left as it is.
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "rec-again").iterdir()}
    again = TrackWriter(tmp_path)
    for record in records:
        again.handle(record)
    assert again.recordings_skipped == 1 and again.frames_written == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "rec-again").iterdir()} == before


def test_a_timestamp_jump_rebases_on_capture_time(media: Media, tmp_path: Path) -> None:
    writer = TrackWriter(tmp_path)
    rid, track = "rec-jump", "hal:audio"
    writer.handle(RecordingStarted(rid, "room", 0.0, ("tracks",)))
    writer.handle(TrackStarted(rid, track, "hal", "Hal", "audio", "opus", AUDIO_CLOCK, 0.0))
    for i in range(200):
        base = 1_000_000 if i < 100 else 200  # the source's timestamps restart halfway
        writer.handle(Frame(rid, track, base + (i % 100) * 960, 0.1 + i * 0.02, True, media.audio[i % 50]))
    writer.handle(RecordingStopped(rid, 5.0))
    (entry,) = manifest(tmp_path, rid)["tracks"]
    assert entry["timestamp_jumps"] == 1
    assert entry["dropped"]["out_of_order"] == 0
    check_file(tmp_path / rid, entry, 200)


def test_codec_headers() -> None:
    keyframe = bytes([0x50, 0x42, 0x00, 0x9D, 0x01, 0x2A, 0x80, 0x02, 0x68, 0x01])
    assert vp8_keyframe_size(keyframe) == (640, 360)
    assert vp8_keyframe_size(bytes([0x51]) + keyframe[1:]) is None  # the inter-frame bit
    assert vp8_keyframe_size(keyframe[:9]) is None
    assert opus_duration(bytes([0x78])) == 960  # SILK WB 20 ms, one frame
    assert opus_duration(bytes([0xFC])) == 960  # CELT FB 20 ms, stereo
    assert opus_duration(bytes([0x79])) == 1920  # two 20 ms frames
    assert opus_duration(bytes([0x7B, 0x03])) == 2880  # code 3: three frames
    assert opus_duration(bytes([0x7B])) is None
    assert opus_duration(b"") is None
