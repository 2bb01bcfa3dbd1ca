"""A screen share in a recording: the composite shows the latest screen shared on its main area (over the
active speaker, who leads the strip) while any is shared, and the per-track writer gives the screen a file of
its own, named `screen`, with its source in the manifest."""

from __future__ import annotations

import heapq
import json
from dataclasses import replace
from pathlib import Path

import av
import numpy as np

from bench.recording import RECORDING_ID, Person, encode_video, synthetic_call
from huddle.recording.composite import Compositor
from huddle.recording.layout import Rect, speaker_layout
from huddle.recording.records import (
    Frame,
    Record,
    RecordingStarted,
    RecordingStopped,
    TrackEnded,
    TrackStarted,
)
from huddle.recording.tracks import TrackWriter

# Small and slow enough to encode quickly, with a frame at every instant the test looks at.
WIDTH, HEIGHT, FPS = 640, 360, 10
VIDEO_CLOCK = 90_000
RED = (81, 90, 240)  # Y, U, V: Alice's camera
GREEN = (145, 54, 34)  # Bob's camera
BLUE = (41, 240, 110)  # Bob's screen
YELLOW = (210, 16, 146)  # Alice's screen


def screen_records(person: Person, start: float, end: float) -> list[Record]:
    """A screen share of `person`'s (its `video` size and `colour`) from `start` to `end`, as the recorder
    publishes it: TrackStarted with source "screen", a frame every 1/FPS s from a keyframe on, TrackEnded."""
    track = f"{person.id}:screen"
    records: list[Record] = [
        TrackStarted(
            RECORDING_ID, track, person.id, person.name, "video", "vp8", VIDEO_CLOCK, start, "screen"
        )
    ]
    frames = round((end - start) * FPS)
    for i, (data, key) in enumerate(encode_video(person, frames, FPS)):
        records.append(Frame(RECORDING_ID, track, 1000 + i * VIDEO_CLOCK // FPS, start + i / FPS, key, data))
    records.append(TrackEnded(RECORDING_ID, track, end))
    return records


def _time(record: Record) -> float:
    if isinstance(record, Frame):
        return record.time
    return -1.0 if isinstance(record, RecordingStarted) else record.at  # type: ignore[union-attr]


def mean_yuv(frame: np.ndarray, rect: Rect) -> tuple[float, float, float]:
    """Mean Y, U, V of the middle half of `rect` in a yuv420p array."""
    x0, x1 = rect.x + rect.w // 4 & ~1, rect.x + 3 * rect.w // 4 & ~1
    y0, y1 = rect.y + rect.h // 4 & ~1, rect.y + 3 * rect.h // 4 & ~1
    y = frame[:HEIGHT]
    chroma = frame[HEIGHT:].reshape(-1)
    u = chroma[: WIDTH * HEIGHT // 4].reshape(HEIGHT // 2, WIDTH // 2)
    v = chroma[WIDTH * HEIGHT // 4 :].reshape(HEIGHT // 2, WIDTH // 2)
    return (
        float(y[y0:y1, x0:x1].mean()),
        float(u[y0 // 2 : y1 // 2, x0 // 2 : x1 // 2].mean()),
        float(v[y0 // 2 : y1 // 2, x0 // 2 : x1 // 2].mean()),
    )


def near(colour: tuple[float, float, float], expected: tuple[int, int, int], tolerance: float = 14) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(colour, expected, strict=True))


def test_the_latest_screen_takes_the_main_area_and_the_speaker_leads_the_strip(tmp_path: Path) -> None:
    alice = Person("alice", "Alice", (320, 180), RED, tone=330.0)
    bob = Person("bob", "Bob", (320, 180), GREEN, tone=220.0)
    call = synthetic_call([alice, bob], 6.0, [(0.2, "alice")], fps=FPS)
    # Bob shares from 1 s to 5 s; Alice shares too, from 2 s to 3 s: hers is the latest while it lasts.
    shares = [
        *screen_records(replace(bob, id="bob", colour=BLUE, video=(640, 360)), 1.0, 5.0),
        *screen_records(replace(alice, id="alice", colour=YELLOW, video=(480, 270)), 2.0, 3.0),
    ]
    shares.sort(key=_time)
    path = tmp_path / "screen.mp4"
    compositor = Compositor(path, WIDTH, HEIGHT, FPS)
    for record in heapq.merge(call.records, shares, key=_time):
        compositor.feed(record)
    compositor.close()

    full = speaker_layout(WIDTH, HEIGHT, 1)  # no screen: the speaker large, the other one in the strip
    shared = speaker_layout(WIDTH, HEIGHT, 2)  # a screen large, both people in the strip
    seen: dict[float, np.ndarray] = {}
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            if round(frame.time, 3) in (0.5, 1.5, 2.5, 3.5, 5.5):
                seen[round(frame.time, 3)] = frame.to_ndarray(format="yuv420p")
    assert sorted(seen) == [0.5, 1.5, 2.5, 3.5, 5.5]
    assert near(mean_yuv(seen[0.5], full.main), RED)  # nobody shares: the speaker, Alice
    assert near(mean_yuv(seen[0.5], full.thumbs[0]), GREEN)
    assert near(mean_yuv(seen[1.5], shared.main), BLUE)  # Bob's screen over the speaker
    assert near(mean_yuv(seen[2.5], shared.main), YELLOW)  # Alice shared after him: hers wins
    assert near(mean_yuv(seen[3.5], shared.main), BLUE)  # hers stopped: his is back
    assert near(mean_yuv(seen[5.5], full.main), RED)  # all stopped: the speaker again
    for t in (1.5, 2.5, 3.5):  # the speaker leads the strip, then the others: cameras, never a screen
        assert near(mean_yuv(seen[t], shared.thumbs[0]), RED)
        assert near(mean_yuv(seen[t], shared.thumbs[1]), GREEN)


def test_the_screen_is_a_track_file_of_its_own(tmp_path: Path) -> None:
    ada = Person("p_0000000a", "Ada", (640, 360), RED)
    writer = TrackWriter(tmp_path)
    records: list[Record] = [RecordingStarted(RECORDING_ID, "room", 1.7e9, ("tracks",))]
    for source, colour in (("camera", RED), ("screen", BLUE)):
        track = f"{ada.id}:{source}"
        records.append(
            TrackStarted(RECORDING_ID, track, ada.id, ada.name, "video", "vp8", VIDEO_CLOCK, 0.0, source)
        )
        for i, (data, key) in enumerate(encode_video(replace(ada, colour=colour), 30, FPS)):
            records.append(Frame(RECORDING_ID, track, i * VIDEO_CLOCK // FPS, i / FPS, key, data))
    records.append(RecordingStopped(RECORDING_ID, 1.0))
    for record in records:
        writer.handle(record)
    writer.close()

    manifest = json.loads((tmp_path / RECORDING_ID / "manifest.json").read_text())
    by_source = {t["source"]: t for t in manifest["tracks"]}
    assert set(by_source) == {"camera", "screen"}
    assert by_source["screen"]["file"].endswith(f"{ada.id}-screen-1.webm")
    assert by_source["camera"]["file"].endswith(f"{ada.id}-video-1.webm")
    for entry in by_source.values():
        with av.open(str(tmp_path / RECORDING_ID / entry["file"])) as container:
            frames = list(container.decode(video=0))
        assert len(frames) == entry["frames"] == 30
        middle = frames[-1].to_ndarray(format="yuv420p")[180, 320]
        expected = BLUE if entry["source"] == "screen" else RED
        assert abs(int(middle) - expected[0]) < 14
