"""Per-track recording: one WebM file per published track, written from the recording log without re-encoding.

`TrackWriter` is the stateful, synchronous part: fed one decoded record at a time, it keeps per recording
(`root/<recording id>/`) one open WebM file per live track and muxes each frame as it comes (VP8 into WebM,
Opus into WebM: the received bytes as they are, PyAV's muxer only). On `RecordingStopped` (or `close()`) it
finalises the recording's files and writes `manifest.json`, which is how the tracks line up: each track's
`start_offset` is the capture time, on the recording clock, of the file's first frame (time 0 of the file).

- A video file starts at a keyframe: delta frames before the first keyframe are dropped (counted). Its size
  comes from the VP8 keyframe header. An audio file starts at any packet; its CodecPrivate is an OpusHead
  (pre-skip 0: the stream was joined in the middle, nothing to trim).
- pts = RTP timestamp - the track's first timestamp, in the track's clock, rescaled by integer arithmetic to
  the muxer's time base (Matroska: 1 ms) packet by packet: nothing accumulates. A video frame's duration is
  the gap to the next frame (each frame is held back until the next one arrives); an Opus packet's is read
  from its TOC byte. So a file's duration is its last pts plus the last frame's duration.
- Frames whose timestamp does not move forward are dropped (counted): that covers duplicates, which an
  at-least-once log delivers after a consumer restart. A timestamp jump that capture times do not explain
  (the RTP timestamp going back by more than a second, or ahead by more than 30 s beyond the capture
  clock) rebases the track on its capture times instead of dropping everything after it.
- A new `TrackStarted` (after `TrackEnded`, e.g. leave and rejoin) starts a new file:
  `<name>-<participant id>-<kind>-<n>.webm`, n counting from 1 per participant and kind (see
  huddle.recording.filenames: the name is a safe slug of the participant's display name).
- A recording whose directory already holds a complete manifest (`"complete": true`) is skipped: that is a
  replay of a recording finished before a restart.
- Records that make no sense (unknown recording or track, bad ids, malformed VP8/Opus) are counted and
  skipped; nothing here raises on input.

`TrackConsumer` runs a `TrackWriter` from a `RecordingLog` on the event loop. Muxing is cheap (no
transcoding; see bench/recording_tracks.py) but it is file I/O: a write() that meets a congested disk, or a
manifest fsync, can take tens or hundreds of milliseconds, and the embedded mode runs this consumer in the
SFU's process, on the SFU's loop. So by default the writer runs in one worker thread of its own: the loop
only moves entries from the log into a batch, and batches grow by themselves when the thread is busy.
FFmpeg releases the GIL while it writes, so a stalled disk does not stall media forwarding.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import functools
import io
import json
import logging
import math
import os
import re
import shutil
import struct
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av

from huddle.logs import event
from huddle.recording.filenames import safe_id, track_file
from huddle.recording.log import RecordingLog
from huddle.recording.records import (
    Frame,
    Record,
    RecordError,
    RecordingStarted,
    RecordingStopped,
    SpeakerChanged,
    TrackEnded,
    TrackStarted,
    decode,
)

__all__ = ["FinishedCallback", "TrackConsumer", "TrackWriter", "opus_duration", "vp8_keyframe_size"]

log = logging.getLogger("huddle.recording")

FinishedCallback = Callable[[str, list[Path]], None]

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_RECORDING_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
BACKWARD_JUMP = 1.0  # s: an RTP timestamp that goes back further than this is a discontinuity, not reordering
FORWARD_JUMP = 30.0  # s: ahead of the capture clock by more than this is a discontinuity
# s: a frame whose RTP timestamp puts it further than this from its capture time (relative to the track's
# start) moves back onto the capture clock. The SFU keeps a forwarded stream's timestamps continuous across
# simulcast layer switches by estimate, so each switch may shift them by tens of milliseconds; the capture
# times (from the publisher's sender reports) are what keep the tracks lined up.
RESYNC = 0.02
DEFAULT_FRAME_RATE = 30  # the last video frame's duration when a track has a single frame
_REMEMBERED = 1024  # finished or skipped recording ids kept, to tell late records from unknown ones


def vp8_keyframe_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a VP8 keyframe's header (RFC 6386 9.1), or None if `data` is not a keyframe."""
    if len(data) < 10 or data[0] & 0x01 or data[3:6] != b"\x9d\x01\x2a":
        return None
    width, height = struct.unpack_from("<HH", data, 6)
    width &= 0x3FFF
    height &= 0x3FFF
    if not width or not height:
        return None
    return width, height


_OPUS_FRAME_SAMPLES = (
    (480, 960, 1920, 2880),  # configs 0-11: SILK, 10/20/40/60 ms
    (480, 960),  # 12-15: hybrid, 10/20 ms
    (120, 240, 480, 960),  # 16-31: CELT, 2.5/5/10/20 ms
)


def opus_duration(data: bytes) -> int | None:
    """The duration of one Opus packet in 48 kHz samples, from its TOC byte (RFC 6716 3.1), or None."""
    if not data:
        return None
    toc = data[0]
    config = toc >> 3
    if config < 12:
        frame = _OPUS_FRAME_SAMPLES[0][config & 3]
    elif config < 16:
        frame = _OPUS_FRAME_SAMPLES[1][config & 1]
    else:
        frame = _OPUS_FRAME_SAMPLES[2][config & 3]
    code = toc & 0x03
    if code == 0:
        count = 1
    elif code < 3:
        count = 2
    else:
        if len(data) < 2:
            return None
        count = data[1] & 0x3F
        if not count:
            return None
    samples = frame * count
    return samples if samples <= 5760 else None  # at most 120 ms per packet


# --- the Opus stream template ---------------------------------------------------------------------
# PyAV muxes pre-encoded packets through streams without a codec context (add_mux_stream), which cannot carry
# extradata; but WebM's Opus track needs its OpusHead as CodecPrivate (browsers refuse the file without it).
# add_stream_from_template copies a stream's codec parameters, extradata included, and opens no encoder. So
# the template is the stream of a three-page Ogg Opus file built here in memory, with the OpusHead we want.


def _ogg_crc_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return tuple(table)


def _ogg_page(data: bytes, sequence: int, flags: int, granule: int) -> bytes:
    table = _ogg_crc_table()
    lacing = [255] * (len(data) // 255) + [len(data) % 255]
    header = b"OggS" + struct.pack("<BBqIIIB", 0, flags, granule, 1, sequence, 0, len(lacing)) + bytes(lacing)
    page = header + data
    crc = 0
    for byte in page:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ table[((crc >> 24) ^ byte) & 0xFF]
    return page[:22] + struct.pack("<I", crc) + page[26:]


def opus_head(channels: int, sample_rate: int = 48000) -> bytes:
    """An OpusHead (RFC 7845 5.1): version 1, pre-skip 0, no gain, channel mapping family 0."""
    return b"OpusHead" + struct.pack("<BBHIhB", 1, channels, 0, sample_rate, 0, 0)


@functools.lru_cache(maxsize=4)
def _opus_template(channels: int) -> Any:
    tags = b"OpusTags" + struct.pack("<I", 6) + b"huddle" + struct.pack("<I", 0)
    silence = b"\xf8\xff\xfe" if channels == 1 else b"\xfc\xff\xfe"  # one 20 ms CELT frame of silence
    ogg = (
        _ogg_page(opus_head(channels), 0, 0x02, 0)
        + _ogg_page(tags, 1, 0x00, 0)
        + _ogg_page(silence, 2, 0x04, 960)
    )
    container = av.open(io.BytesIO(ogg), format="ogg")
    stream = container.streams.audio[0]
    if stream.codec_context.extradata != opus_head(channels):
        raise RuntimeError("the Ogg Opus template lost its OpusHead")
    # The container must stay open as long as the stream is used as a template: cached together.
    return container, stream


# --- the writer -----------------------------------------------------------------------------------


# A screen share's tracks are files of their own beside the camera's and microphone's: their label says so.
_SCREEN_LABELS = {"screen": "screen", "screen_audio": "screen-audio"}


@dataclass(eq=False)
class _Track:
    meta: TrackStarted
    file: str  # relative to the recording's directory
    time_base: fractions.Fraction
    container: Any = None
    stream: Any = None
    first_timestamp: int | None = None  # RTP timestamp of the first written frame
    base: int = 0  # the RTP timestamp that is pts 0 (moves only on a timestamp jump)
    start_offset: float | None = None
    last_timestamp: int | None = None
    last_time: float = 0.0
    pts: int = 0  # of the last accepted frame (for video, possibly still held)
    last_pts: int = 0  # of the last written frame
    last_duration: int = 0
    held: tuple[int, bytes, bool] | None = None  # video: (pts, data, keyframe) waiting for its duration
    frames: int = 0
    width: int | None = None
    height: int | None = None
    channels: int | None = None
    left_at: float | None = None
    leading_dropped: int = 0
    out_of_order: int = 0
    malformed: int = 0
    jumps: int = 0
    resyncs: int = 0  # moved back onto the capture clock (see RESYNC)
    size: tuple[int, int] | None = None  # the last keyframe's size
    size_changes: int = 0
    errors: int = 0
    failed: bool = False  # the file could not be written: the rest of the track is dropped

    @property
    def end_pts(self) -> int:
        return self.last_pts + self.last_duration if self.frames else 0


@dataclass(eq=False)
class _Recording:
    start: RecordingStarted
    directory: Path
    tracks: dict[str, _Track] = field(default_factory=dict)  # live tracks by track id
    done: list[_Track] = field(default_factory=list)  # ended tracks, in order of their start
    names: set[str] = field(default_factory=set)
    numbers: dict[tuple[str, str], int] = field(default_factory=dict)
    speakers: list[dict[str, Any]] = field(default_factory=list)
    last_at: float = 0.0


class TrackWriter:
    """Writes each track of each recording to its own WebM file, and a manifest per recording.

    Synchronous and single-threaded: call `handle` (and `close`) from one thread at a time. `on_finished`
    (and listeners added with `add_listener`) get (recording id, paths) when a recording's files are final:
    the track files in order of start, then the manifest, so that an uploader that keeps this order uploads
    the manifest last. They run in the thread that called `handle`/`close`.
    """

    def __init__(
        self, root: Path, on_finished: FinishedCallback | None = None, *, fsync: bool = True
    ) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self._listeners: list[FinishedCallback] = [on_finished] if on_finished else []
        self._recordings: dict[str, _Recording] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()  # recently finished or skipped ids
        self.records = 0
        self.frames_written = 0
        self.bytes_written = 0
        self.malformed = 0  # records that make no sense (bad ids, bad VP8/Opus, wrong types)
        self.unknown_recording = 0  # records of a recording never started here
        self.late = 0  # records of a recording already finished (or skipped)
        self.unknown_track = 0  # frames of a track never started or already ended
        self.leading_dropped = 0  # video delta frames before a track's first keyframe
        self.out_of_order = 0  # frames whose timestamp did not move forward (duplicates included)
        self.duplicates = 0  # repeated RecordingStarted / TrackStarted
        self.errors = 0  # I/O or muxer errors
        self.recordings_finished = 0
        self.recordings_skipped = 0
        self.files_finished = 0

    def add_listener(self, callback: FinishedCallback) -> None:
        self._listeners.append(callback)

    @property
    def open_recordings(self) -> int:
        return len(self._recordings)

    @property
    def recording_ids(self) -> list[str]:
        """The ids of the recordings open now, oldest first."""
        return list(self._recordings)

    def stats(self) -> dict[str, int]:
        return {
            "records": self.records,
            "frames_written": self.frames_written,
            "bytes_written": self.bytes_written,
            "malformed": self.malformed,
            "unknown_recording": self.unknown_recording,
            "late": self.late,
            "unknown_track": self.unknown_track,
            "leading_dropped": self.leading_dropped,
            "out_of_order": self.out_of_order,
            "duplicates": self.duplicates,
            "errors": self.errors,
            "recordings_open": len(self._recordings),
            "recordings_finished": self.recordings_finished,
            "recordings_skipped": self.recordings_skipped,
            "files_finished": self.files_finished,
            "tracks_open": sum(len(r.tracks) for r in self._recordings.values()),
        }

    # -- records ----------------------------------------------------------------------------------

    def handle(self, record: Record) -> None:
        """Apply one record. Never raises on bad input: it is counted and skipped."""
        self.records += 1
        try:
            if type(record) is Frame:
                self._frame(record)
            elif type(record) is TrackStarted:
                self._track_started(record)
            elif type(record) is TrackEnded:
                self._track_ended(record)
            elif type(record) is RecordingStarted:
                self._recording_started(record)
            elif type(record) is RecordingStopped:
                self._recording_stopped(record)
            elif type(record) is SpeakerChanged:
                self._speaker_changed(record)
            else:
                self.malformed += 1
        except (TypeError, ValueError, AttributeError, OverflowError) as exc:
            # A record built with fields of the wrong types (decode checks the JSON, not the types).
            self.malformed += 1
            event(log, logging.DEBUG, "malformed recording record", error=repr(exc))

    def _recording(self, recording_id: str) -> _Recording | None:
        recording = self._recordings.get(recording_id)
        if recording is None:
            if recording_id in self._finished:
                self.late += 1
            else:
                self.unknown_recording += 1
        return recording

    def _recording_started(self, record: RecordingStarted) -> None:
        rid = record.recording_id
        if rid in self._recordings or rid in self._finished:
            self.duplicates += 1
            return
        if not isinstance(rid, str) or not _RECORDING_ID.fullmatch(rid):
            self.malformed += 1
            event(log, logging.WARNING, "recording id unusable as a directory name: ignored", recording=rid)
            return
        directory = self.root / rid
        if _complete_manifest(directory / MANIFEST):
            self.recordings_skipped += 1
            self._remember(rid)
            event(log, logging.INFO, "recording already complete on disk: skipped", recording=rid)
            return
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self.errors += 1
            event(log, logging.ERROR, "cannot create the recording directory", recording=rid, error=str(exc))
            return
        self._recordings[rid] = _Recording(record, directory)
        event(log, logging.INFO, "track recording started", recording=rid, room=record.room)

    def _track_started(self, record: TrackStarted) -> None:
        recording = self._recording(record.recording_id)
        if recording is None:
            return
        if record.kind not in ("audio", "video") or record.clock_rate <= 0:
            self.malformed += 1
            return
        codec = record.codec.lower()
        if (record.kind, codec) not in (("video", "vp8"), ("audio", "opus")):
            self.malformed += 1
            event(log, logging.WARNING, "codec not recorded", track=record.track_id, codec=record.codec)
            return
        recording.last_at = max(recording.last_at, record.at)
        current = recording.tracks.get(record.track_id)
        if current is not None:
            if current.meta == record:
                self.duplicates += 1
                return
            # A new start without an end in between (the end was lost): the old file ends here.
            self._end_track(recording, current, record.at)
        who = safe_id(record.participant_id)
        label = _SCREEN_LABELS.get(record.source, record.kind)
        number = recording.numbers.get((who, label), 0)
        while True:
            number += 1
            name = track_file(record.name, record.participant_id, label, number)
            if name not in recording.names:
                break
        recording.numbers[(who, label)] = number
        recording.names.add(name)
        recording.tracks[record.track_id] = _Track(record, name, fractions.Fraction(1, record.clock_rate))

    def _track_ended(self, record: TrackEnded) -> None:
        recording = self._recording(record.recording_id)
        if recording is None:
            return
        track = recording.tracks.get(record.track_id)
        if track is None:
            self.unknown_track += 1
            return
        recording.last_at = max(recording.last_at, record.at)
        self._end_track(recording, track, record.at)

    def _speaker_changed(self, record: SpeakerChanged) -> None:
        recording = self._recording(record.recording_id)
        if recording is not None:
            recording.speakers.append({"at": record.at, "participant_id": record.participant_id})

    def _recording_stopped(self, record: RecordingStopped) -> None:
        recording = self._recording(record.recording_id)
        if recording is not None:
            self._finish(recording, stopped_at=record.at)

    def finish(self, recording_id: str) -> bool:
        """Finalise one open recording now, as if it had stopped (manifest `"complete": false`): the way out
        when its RecordingStopped was lost (e.g. dropped by a full log). False if it is not open."""
        recording = self._recordings.get(recording_id)
        if recording is None:
            return False
        self._finish(recording, stopped_at=None)
        return True

    def discard(self, recording_id: str) -> bool:
        """Drop one open recording: its files are closed and deleted, no manifest is written and listeners
        are not told (a consumer that lost the partition leaves the recording to the next owner, which
        reads it again). False if it is not open."""
        recording = self._recordings.pop(recording_id, None)
        if recording is None:
            return False
        for track in recording.tracks.values():
            if track.container is not None:
                with contextlib.suppress(Exception):
                    track.container.close()
                track.container = track.stream = None
        shutil.rmtree(recording.directory, ignore_errors=True)
        return True

    def close(self) -> list[str]:
        """Finalise every open recording (files playable, manifest `"complete": false`); returns their ids."""
        ids = list(self._recordings)
        for rid in ids:
            self._finish(self._recordings[rid], stopped_at=None)
        return ids

    # -- frames -----------------------------------------------------------------------------------

    def _frame(self, frame: Frame) -> None:
        recording = self._recordings.get(frame.recording_id)
        if recording is None:
            self._recording(frame.recording_id)  # counts it
            return
        track = recording.tracks.get(frame.track_id)
        if track is None:
            self.unknown_track += 1
            return
        if track.failed:
            return
        data = frame.data
        video = track.meta.kind == "video"
        keyframe = False
        if video:
            size = vp8_keyframe_size(data)
            keyframe = size is not None
            if track.container is None and size is None:
                track.leading_dropped += 1
                self.leading_dropped += 1
                return
            if len(data) < 3:
                track.malformed += 1
                self.malformed += 1
                return
            duration = 0  # known when the next frame arrives
        else:
            samples = opus_duration(data)
            if samples is None:
                track.malformed += 1
                self.malformed += 1
                return
            duration = samples * track.meta.clock_rate // 48000
            size = None
        timestamp = frame.timestamp
        if track.container is None:
            if not self._open(recording, track, data, size):
                return
            track.first_timestamp = track.base = timestamp
            track.start_offset = frame.time
            pts = 0
        else:
            last = track.last_timestamp
            assert last is not None
            rate = track.meta.clock_rate
            ahead = (timestamp - last) / rate
            if ahead < -BACKWARD_JUMP or ahead - (frame.time - track.last_time) > FORWARD_JUMP:
                # A discontinuity (the source's timestamps restarted): go on from the capture clock.
                step = max(1, round((frame.time - track.last_time) * rate))
                track.base = timestamp - (track.pts + step)
                track.jumps += 1
                event(log, logging.INFO, "timestamp jump in a recorded track", track=track.meta.track_id)
            elif timestamp <= last:
                track.out_of_order += 1
                self.out_of_order += 1
                return
            pts = timestamp - track.base
            on_clock = round((frame.time - track.start_offset) * rate)
            if abs(pts - on_clock) > RESYNC * rate:
                pts = max(on_clock, track.pts + 1)
                track.base = timestamp - pts
                track.resyncs += 1
        if video and size is not None and size != track.size:
            # VP8 decoders follow a new size at a keyframe; the file goes on (its header has the first).
            track.size_changes += track.size is not None
            track.size = size
        track.last_timestamp = timestamp
        track.last_time = frame.time
        track.pts = pts
        if video:
            held = track.held
            track.held = (pts, data, keyframe)
            if held is not None:
                self._write(track, held[0], pts - held[0], held[1], held[2])
        else:
            self._write(track, pts, duration, data, True)

    def _open(self, recording: _Recording, track: _Track, data: bytes, size: tuple[int, int] | None) -> bool:
        path = recording.directory / track.file
        container = None
        try:
            # Bitexact: no random segment UID, no muxing date, no library version in the file, so that a
            # replay of the same records (a restarted consumer) writes the same bytes.
            container = av.open(str(path), "w", format="webm", container_options={"fflags": "+bitexact"})
            if size is not None:
                stream = container.add_mux_stream("vp8", width=size[0], height=size[1])
                track.width, track.height = size
            else:
                track.channels = 2 if data[0] & 0x04 else 1
                stream = container.add_stream_from_template(_opus_template(track.channels)[1])
            stream.time_base = track.time_base
            container.metadata["title"] = f"{track.meta.name} ({track.meta.kind})"
        except (av.FFmpegError, OSError, ValueError) as exc:
            if container is not None:
                with contextlib.suppress(Exception):
                    container.close()
            track.errors += 1
            track.failed = True
            self.errors += 1
            event(log, logging.ERROR, "cannot open a track file", file=str(path), error=str(exc))
            return False
        track.container, track.stream = container, stream
        return True

    def _write(self, track: _Track, pts: int, duration: int, data: bytes, keyframe: bool) -> None:
        packet = av.Packet(data)
        packet.pts = packet.dts = pts
        packet.duration = duration
        packet.time_base = track.time_base
        packet.is_keyframe = keyframe
        packet.stream = track.stream
        try:
            track.container.mux_one(packet)
        except (av.FFmpegError, OSError, ValueError) as exc:
            track.errors += 1
            self.errors += 1
            if track.errors == 1:
                event(log, logging.ERROR, "cannot write a track file", file=track.file, error=str(exc))
            return
        track.frames += 1
        track.last_pts = pts
        track.last_duration = duration
        self.frames_written += 1
        self.bytes_written += len(data)

    # -- ends -------------------------------------------------------------------------------------

    def _end_track(self, recording: _Recording, track: _Track, at: float | None) -> None:
        recording.tracks.pop(track.meta.track_id, None)
        track.left_at = at
        held = track.held
        if held is not None:
            track.held = None
            # The last video frame lasts as long as the one before it (or one frame at 30 fps).
            duration = track.last_duration or track.meta.clock_rate // DEFAULT_FRAME_RATE
            self._write(track, held[0], duration, held[1], held[2])
        if track.container is not None:
            try:
                track.container.close()
            except (av.FFmpegError, OSError, ValueError) as exc:
                track.errors += 1
                self.errors += 1
                event(log, logging.ERROR, "cannot finish a track file", file=track.file, error=str(exc))
            track.container = track.stream = None
            self.files_finished += 1
            if self.fsync:
                try:
                    _fsync_path(recording.directory / track.file)
                except OSError as exc:
                    self.errors += 1
                    event(log, logging.ERROR, "cannot sync a track file", file=track.file, error=str(exc))
        recording.done.append(track)

    def _finish(self, recording: _Recording, stopped_at: float | None) -> None:
        rid = recording.start.recording_id
        for track in list(recording.tracks.values()):
            self._end_track(recording, track, stopped_at)
        del self._recordings[rid]
        self._remember(rid)
        manifest = self._manifest(recording, stopped_at)
        path = recording.directory / MANIFEST
        try:
            _write_atomically(path, json.dumps(manifest, indent=2).encode(), self.fsync)
        except OSError as exc:
            self.errors += 1
            event(log, logging.ERROR, "cannot write the recording manifest", recording=rid, error=str(exc))
        self.recordings_finished += 1
        paths = [recording.directory / t["file"] for t in manifest["tracks"]] + [path]
        event(
            log,
            logging.INFO,
            "track recording finished",
            recording=rid,
            files=len(paths) - 1,
            complete=stopped_at is not None,
        )
        for callback in self._listeners:
            try:
                callback(rid, paths)
            except Exception:
                log.exception("recording finished callback failed")

    def _remember(self, rid: str) -> None:
        self._finished[rid] = None
        while len(self._finished) > _REMEMBERED:
            self._finished.popitem(last=False)

    def _manifest(self, recording: _Recording, stopped_at: float | None) -> dict[str, Any]:
        start = recording.start
        tracks: list[dict[str, Any]] = []
        empty: list[dict[str, Any]] = []
        people: dict[str, dict[str, Any]] = {}
        end = stopped_at if stopped_at is not None else recording.last_at
        for track in sorted(recording.done, key=lambda t: (t.meta.at, t.file)):
            meta = track.meta
            left_at = track.left_at
            rate = meta.clock_rate
            duration = track.end_pts / rate
            if track.start_offset is not None:
                end = max(end, track.start_offset + duration)
            person = people.setdefault(
                meta.participant_id,
                {"participant_id": meta.participant_id, "name": meta.name, "intervals": []},
            )
            person["name"] = meta.name  # the latest name
            person["intervals"].append((meta.at, left_at))
            if not track.frames:
                empty.append(
                    {
                        "track_id": meta.track_id,
                        "participant_id": meta.participant_id,
                        "kind": meta.kind,
                        "joined_at": meta.at,
                        "left_at": left_at,
                        "reason": "no keyframe" if meta.kind == "video" else "no media",
                    }
                )
                continue
            entry: dict[str, Any] = {
                "track_id": meta.track_id,
                "participant_id": meta.participant_id,
                "name": meta.name,
                "kind": meta.kind,
                "source": meta.source or ("microphone" if meta.kind == "audio" else "camera"),
                "codec": meta.codec.lower(),
                "file": track.file,
                "start_offset": track.start_offset,
                "first_timestamp": track.first_timestamp,
                "clock_rate": rate,
                "frames": track.frames,
                "duration": duration,
                "joined_at": meta.at,
                "left_at": left_at,
                "dropped": {
                    "leading": track.leading_dropped,
                    "out_of_order": track.out_of_order,
                    "malformed": track.malformed,
                    "errors": track.errors,
                },
                "timestamp_jumps": track.jumps,
                "resyncs": track.resyncs,
            }
            if meta.kind == "video":
                entry.update(width=track.width, height=track.height, size_changes=track.size_changes)
            else:
                entry.update(channels=track.channels)
            tracks.append(entry)
        participants = []
        for person in people.values():
            intervals = _merge(person["intervals"])
            participants.append(
                {
                    "participant_id": person["participant_id"],
                    "name": person["name"],
                    "joined_at": intervals[0][0],
                    "left_at": intervals[-1][1],
                    "intervals": intervals,
                }
            )
        return {
            "version": MANIFEST_VERSION,
            "recording_id": start.recording_id,
            "room": start.room,
            "started_at": start.started_at,
            "duration": end,
            "complete": stopped_at is not None,
            "stopped_at": stopped_at,
            "tracks": tracks,
            "empty_tracks": empty,
            "participants": participants,
            "speakers": recording.speakers,
        }


def _merge(intervals: list[tuple[float, float | None]]) -> list[list[float | None]]:
    """Join overlapping (joined, left) intervals; left None: still there when the recording ended."""
    merged: list[list[float]] = []
    for joined, left in sorted(intervals):
        end = math.inf if left is None else left
        if merged and joined <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([joined, end])
    return [[joined, None if left == math.inf else left] for joined, left in merged]


def _complete_manifest(path: Path) -> bool:
    try:
        return json.loads(path.read_bytes()).get("complete") is True
    except (OSError, ValueError, AttributeError):
        return False


def _fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_atomically(path: Path, data: bytes, fsync: bool) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(temporary, path)
    if fsync:
        _fsync_path(path.parent)


# --- the consumer ---------------------------------------------------------------------------------


class TrackConsumer:
    """Feeds a TrackWriter from a RecordingLog: one asyncio task reads the log, the writer runs in a worker
    thread (`offload=True`, the default; see the module docstring) or inline on the loop, a batch at a time:
    a batch gathers for `linger` seconds or up to `max_batch` entries, whichever comes first.

    `on_finished` runs on the event loop (so it may start an upload task) with (recording id, paths).

    At-least-once: the consumer commits the log only when it has written everything read so far and no
    recording is open, so that a restarted consumer (KafkaLog) is delivered again every record of the
    recordings that were open: the writer writes those again from their start (same file names), and skips
    those whose complete manifest is already on disk.
    """

    def __init__(
        self,
        log: RecordingLog,
        writer: TrackWriter,
        *,
        on_finished: FinishedCallback | None = None,
        offload: bool = True,
        linger: float = 0.05,
        max_batch: int = 4096,
    ) -> None:
        self.log = log
        self.writer = writer
        self.offload = offload
        self.linger = linger
        self.max_batch = max_batch
        self._on_finished = on_finished
        self._pending: deque[bytes] = deque()
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._full = asyncio.Event()
        self._reading_done = False
        self._reader: asyncio.Task[None] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._finished: OrderedDict[str, list[Path]] = OrderedDict()
        self._waiters: dict[str, list[asyncio.Future[list[Path]]]] = {}
        self._closed = False
        self.received = 0
        self.malformed = 0  # entries that do not decode
        self.batches = 0
        self.errors = 0
        writer.add_listener(self._writer_finished)

    def start(self) -> None:
        if self._reader is not None:
            raise RuntimeError("already started")
        self._loop = asyncio.get_running_loop()
        if self.offload:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="huddle-tracks")
        self._reader = asyncio.create_task(self._read(), name="recording-tracks-reader")
        self._worker = asyncio.create_task(self._work(), name="recording-tracks-writer")

    async def close(self) -> None:
        """Close the log, write everything it still delivers, then finalise open recordings."""
        if self._closed:
            return
        self._closed = True
        await self.log.close()
        if self._reader is not None and self._worker is not None:
            await asyncio.gather(self._reader, self._worker, return_exceptions=True)
            await self._call(self.writer.close)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def finish(self, recording_id: str) -> bool:
        """Finalise an open recording without its RecordingStopped (after wait_finished timed out, say):
        entries already read from the log are written first. False if the recording is not open."""
        batch = list(self._pending)
        self._pending.clear()
        self._space.set()

        def finish() -> bool:
            self._process(batch)
            return self.writer.finish(recording_id)

        return bool(await self._call(finish))

    async def wait_finished(self, recording_id: str, timeout: float) -> list[Path]:
        """The paths of a finished recording: at once if it already finished, else when it does."""
        if recording_id in self._finished:
            return self._finished[recording_id]
        future: asyncio.Future[list[Path]] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(recording_id, []).append(future)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            waiters = self._waiters.get(recording_id)
            if waiters and future in waiters:
                waiters.remove(future)
                if not waiters:
                    del self._waiters[recording_id]

    def stats(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "malformed": self.malformed,
            "batches": self.batches,
            "errors": self.errors,
            "pending": len(self._pending),
            "writer": self.writer.stats(),
            "log": self.log.stats(),
        }

    # -- inside -----------------------------------------------------------------------------------

    async def _read(self) -> None:
        pending, wake, space = self._pending, self._wake, self._space
        try:
            async for _key, value in self.log.records():
                pending.append(value)
                self.received += 1
                wake.set()
                if len(pending) >= self.max_batch:
                    # A full batch: hand it over now, and if the writer is still busy with the last one, stop
                    # taking entries, so that the log's own bound applies.
                    self._full.set()
                    space.clear()
                    await space.wait()
        except Exception:
            self.errors += 1
            log.exception("recording log reader failed")
        finally:
            self._reading_done = True
            wake.set()
            self._full.set()

    async def _work(self) -> None:
        pending, wake = self._pending, self._wake
        while True:
            if not pending:
                if self._reading_done:
                    return
                wake.clear()
                await wake.wait()
                continue
            if self.linger > 0 and not self._reading_done and len(pending) < self.max_batch:
                # Let a batch gather (Kafka's linger.ms): a thread hop per entry would cost more than the
                # writing; files lag by `linger` at most, which a recording does not mind.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.linger):
                        await self._full.wait()
            self._full.clear()
            batch = list(pending)
            pending.clear()
            self._space.set()
            self.batches += 1
            try:
                await self._call(self._process, batch)
            except Exception:
                self.errors += 1
                log.exception("recording track writer failed on a batch")
            if not pending and not self.writer.open_recordings:
                self.log.commit()  # everything read so far is in finished files

    async def _call(self, function: Callable[..., Any], *args: Any) -> Any:
        if self._executor is None:
            return function(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def _process(self, batch: list[bytes]) -> None:
        handle = self.writer.handle
        for value in batch:
            try:
                record = decode(value)
            except RecordError:
                self.malformed += 1
                continue
            try:
                handle(record)
            except Exception:  # a bug, not bad input (handle counts that): keep the other records going
                self.errors += 1
                if self.errors == 1:
                    log.exception("recording track writer failed on a record")

    def _writer_finished(self, recording_id: str, paths: list[Path]) -> None:
        loop = self._loop
        if loop is None:
            return
        loop.call_soon_threadsafe(self._finished_on_loop, recording_id, paths)

    def _finished_on_loop(self, recording_id: str, paths: list[Path]) -> None:
        self._finished[recording_id] = paths
        while len(self._finished) > _REMEMBERED:
            self._finished.popitem(last=False)
        for future in self._waiters.pop(recording_id, []):
            if not future.done():
                future.set_result(paths)
        if self._on_finished is not None:
            try:
                self._on_finished(recording_id, paths)
            except Exception:
                log.exception("recording finished callback failed")
