"""What the recorder publishes to the recording log, one record at a time, keyed by chat id (room name).

The recorder (an internal subscriber of the SFU) turns RTP into these records; consumers downstream (the
per-track writer, the compositor) rebuild files from them. Records cross a process boundary (a worker
process today, a Kafka topic later), so each one encodes to bytes and back: a one-byte kind, a JSON header
and, for frames, the media payload as is.

Times are seconds on the recording's clock: 0 is when the recording started on the server; a frame's time is
its capture time (from the publisher's RTCP sender reports) mapped onto that clock.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from typing import Literal

Kind = Literal["audio", "video"]


@dataclass(frozen=True, slots=True)
class RecordingStarted:
    recording_id: str
    room: str
    started_at: float  # Unix time of the recording clock's 0
    outputs: tuple[str, ...]  # "composite", "tracks"


@dataclass(frozen=True, slots=True)
class TrackStarted:
    recording_id: str
    track_id: str  # unique within the recording, e.g. "<participant id>:<mid>"
    participant_id: str
    name: str  # the participant's display name
    kind: Kind
    codec: str  # "opus" or "vp8"
    clock_rate: int
    at: float
    # What the track carries: "microphone", "camera", "screen" or "screen_audio" ("" in records written
    # before screen sharing: the microphone or camera, by kind).
    source: str = ""


@dataclass(frozen=True, slots=True)
class Frame:
    """One whole encoded frame: a VP8 frame (payload descriptors removed) or one Opus packet."""

    recording_id: str
    track_id: str
    timestamp: int  # RTP timestamp, unwrapped to 64 bits, in the track's clock rate
    time: float  # capture time on the recording clock
    keyframe: bool
    data: bytes


@dataclass(frozen=True, slots=True)
class TrackEnded:
    recording_id: str
    track_id: str
    at: float


@dataclass(frozen=True, slots=True)
class SpeakerChanged:
    recording_id: str
    participant_id: str | None
    at: float


@dataclass(frozen=True, slots=True)
class RecordingStopped:
    recording_id: str
    at: float


Record = RecordingStarted | TrackStarted | Frame | TrackEnded | SpeakerChanged | RecordingStopped

_KINDS: dict[type, int] = {
    RecordingStarted: 1,
    TrackStarted: 2,
    Frame: 3,
    TrackEnded: 4,
    SpeakerChanged: 5,
    RecordingStopped: 6,
}
_TYPES = {code: cls for cls, code in _KINDS.items()}
_FRAME = struct.Struct("!BqdBH")  # kind, timestamp, time, keyframe, length of the JSON header


class RecordError(ValueError):
    """Bytes that are not a record this version understands."""


def encode(record: Record) -> bytes:
    if isinstance(record, Frame):
        # Frames are most of the traffic: a fixed binary header, only the ids in JSON.
        ids = json.dumps([record.recording_id, record.track_id], separators=(",", ":")).encode()
        header = _FRAME.pack(3, record.timestamp, record.time, record.keyframe, len(ids))
        return header + ids + record.data
    fields = asdict(record)
    return bytes((_KINDS[type(record)],)) + json.dumps(fields, separators=(",", ":")).encode()


def decode(data: bytes) -> Record:
    if not data:
        raise RecordError("empty record")
    try:
        if data[0] == 3:
            _, timestamp, at, keyframe, length = _FRAME.unpack_from(data)
            start = _FRAME.size
            recording_id, track_id = json.loads(data[start : start + length])
            return Frame(recording_id, track_id, timestamp, at, bool(keyframe), bytes(data[start + length :]))
        cls = _TYPES.get(data[0])
        if cls is None:
            raise RecordError(f"unknown record kind {data[0]}")
        fields = json.loads(data[1:])
        if cls is RecordingStarted:
            fields["outputs"] = tuple(fields["outputs"])
        return cls(**fields)
    except (struct.error, ValueError, TypeError, KeyError) as exc:
        if isinstance(exc, RecordError):
            raise
        raise RecordError(f"malformed record: {exc}") from exc
