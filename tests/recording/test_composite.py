"""The composite recording: synthetic calls (libvpx VP8, libopus) through the Compositor and CompositeWorker,
checked on the MP4 they write with ffprobe and by decoding it.

The main call (10 s): Alice (640x360, red) all along, her picture flashing white and her audio clicking at 5 s
and 9 s; Bob, audio only, all along; Carol (320x180, green) from 3 s to 7 s. Speakers: Bob at 2 s, Alice at
4 s, Carol at 6 s (after Carol leaves, the last speaker still there, Alice, comes back).
"""

from __future__ import annotations

import asyncio
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from bench.recording import RECORDING_ID, Person, SyntheticCall, synthetic_call
from huddle.recording import composite
from huddle.recording.composite import Compositor
from huddle.recording.layout import MAX_THUMBS, Rect, speaker_layout
from huddle.recording.records import Frame, RecordingStopped, SpeakerChanged, TrackStarted, encode
from huddle.recording.worker import CompositeWorker

from ..ffprobe import probe

ROOT = Path(__file__).resolve().parents[2]
RED = (81, 90, 240)  # Y, U, V
GREEN = (145, 54, 34)
WIDTH, HEIGHT, FPS = 1280, 720, 30
SYNC_TOLERANCE = 0.040


def alice(**changes: Any) -> Person:
    return replace(
        Person("alice", "Alice Liddell", (640, 360), RED, flashes=(5.0, 9.0), clicks=(5.0, 9.0), tone=330.0),
        **changes,
    )


PEOPLE = [
    alice(),
    Person("bob", "Bob", None, tone=220.0),
    Person("carol", "Carol", (320, 180), GREEN, joins=3.0, leaves=7.0, tone=550.0),
]
SPEAKERS = [(2.0, "bob"), (4.0, "alice"), (6.0, "carol")]


# --- helpers ----------------------------------------------------------------------------------------------


def ffprobe(path: Path, count: bool = False) -> dict[str, Any]:
    return probe(path, count_frames=count, timeout=60)


def streams(probe: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["codec_type"]: s for s in probe["streams"]}


def finalised(path: Path) -> bool:
    """A fragmented MP4 closed normally ends with its fragment index (mfra, last box mfro)."""
    with path.open("rb") as f:
        f.seek(-16, os.SEEK_END)
        return f.read()[4:8] == b"mfro"


def mean_yuv(frame: np.ndarray, rect: Rect, inset: float = 0.25) -> tuple[float, float, float]:
    """Mean Y, U, V of the middle of `rect` in a yuv420p array (height * 3 / 2, width)."""
    height, width = frame.shape[0] * 2 // 3, frame.shape[1]
    dx, dy = int(rect.w * inset) // 2 * 2, int(rect.h * inset) // 2 * 2
    x0, x1, y0, y1 = rect.x + dx, rect.x + rect.w - dx, rect.y + dy, rect.y + rect.h - dy
    y = frame[:height]
    chroma = frame[height:].reshape(-1)
    u = chroma[: width * height // 4].reshape(height // 2, width // 2)
    v = chroma[width * height // 4 :].reshape(height // 2, width // 2)
    return (
        float(y[y0:y1, x0:x1].mean()),
        float(u[y0 // 2 : y1 // 2, x0 // 2 : x1 // 2].mean()),
        float(v[y0 // 2 : y1 // 2, x0 // 2 : x1 // 2].mean()),
    )


def near(colour: tuple[float, float, float], expected: tuple[int, int, int], tolerance: float = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(colour, expected, strict=True))


def onsets(times: list[float], on: list[bool]) -> list[float]:
    return [t for i, t in enumerate(times) if on[i] and (i == 0 or not on[i - 1])]


def audio_onsets(
    path: Path, threshold: float = 0.4, window: tuple[float, float] | None = None
) -> list[float]:
    """Times where the audio (left channel) first goes above `threshold`, 0.1 s apart at least."""
    found: list[float] = []
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        if window is not None:
            container.seek(int(max(0.0, window[0] - 1.0) / stream.time_base), stream=stream)
        for frame in container.decode(stream):
            start = frame.time
            if window is not None and start > window[1]:
                break
            loud = np.nonzero(np.abs(frame.to_ndarray()[0]) > threshold)[0]
            for index in loud:
                t = start + index / frame.sample_rate
                if (not found or t - found[-1] > 0.1) and (window is None or window[0] <= t <= window[1]):
                    found.append(t)
    return found


def video_onsets(path: Path, rect: Rect, window: tuple[float, float] | None = None) -> list[float]:
    """Times of the frames where the middle of `rect` turns white."""
    times: list[float] = []
    white: list[bool] = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if window is not None:
            container.seek(int(max(0.0, window[0] - 3.0) / stream.time_base), stream=stream)
        for frame in container.decode(stream):
            if window is not None and frame.time > window[1]:
                break
            times.append(frame.time)
            white.append(mean_yuv(frame.to_ndarray(format="yuv420p"), rect)[0] > 200)
    found = onsets(times, white)
    return [t for t in found if window is None or window[0] <= t <= window[1]]


def write_records(call: SyntheticCall, path: Path, **options: Any) -> Compositor:
    compositor = Compositor(path, **options)
    for record in call.records:
        compositor.feed(record)
    compositor.close()
    return compositor


# --- the main call, composed once -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def call() -> SyntheticCall:
    return synthetic_call(PEOPLE, 10.0, SPEAKERS, fps=FPS)


@pytest.fixture(scope="module")
def composed(call: SyntheticCall, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Compositor]:
    path = tmp_path_factory.mktemp("composite") / "call.mp4"
    composite._label.cache_clear()
    return path, write_records(call, path)


@pytest.fixture(scope="module")
def decoded(composed: tuple[Path, Compositor]) -> dict[str, Any]:
    """One pass over the output video: the main tile's colour per frame, and whole frames at a few times."""
    path, _ = composed
    keep = {1.0, 2.5, 3.5, 5.5, 6.5, 8.0}
    main = speaker_layout(WIDTH, HEIGHT, 1).main
    times: list[float] = []
    colours: list[tuple[float, float, float]] = []
    frames: dict[float, np.ndarray] = {}
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            array = frame.to_ndarray(format="yuv420p")
            times.append(frame.time)
            colours.append(mean_yuv(array, main))
            for t in keep:
                if abs(frame.time - t) < 1e-6:
                    frames[t] = array
    return {"times": times, "main": colours, "frames": frames}


def test_streams_duration_and_frame_counts(composed: tuple[Path, Compositor]) -> None:
    path, compositor = composed
    probe = ffprobe(path, count=True)
    video, audio = streams(probe)["video"], streams(probe)["audio"]
    assert (video["codec_name"], video["width"], video["height"]) == ("h264", WIDTH, HEIGHT)
    assert video["pix_fmt"] == "yuv420p"
    assert (audio["codec_name"], int(audio["sample_rate"])) == ("aac", 48_000)
    assert abs(float(probe["format"]["duration"]) - 10.0) <= 0.5
    assert int(video["nb_read_frames"]) >= 25 * 10
    assert int(video["nb_read_frames"]) == 300  # 0 .. RecordingStopped.at at 30 fps, exactly
    assert float(video["start_time"]) == 0 and float(audio["start_time"]) == 0
    assert int(audio["nb_read_frames"]) >= 10 * 48_000 // 1024
    assert finalised(path)
    stats = compositor.stats
    assert stats["output_video_frames"] == 300
    assert not any(key.startswith(("corrupt", "late_audio", "bad")) for key in stats), stats


def test_flash_and_click_line_up(composed: tuple[Path, Compositor], decoded: dict[str, Any]) -> None:
    path, _ = composed
    flashes = onsets(decoded["times"], [c[0] > 200 for c in decoded["main"]])
    clicks = audio_onsets(path)
    assert len(flashes) == 2 and len(clicks) == 2, (flashes, clicks)
    for expected, flash, click in zip((5.0, 9.0), flashes, clicks, strict=True):
        assert abs(flash - click) < SYNC_TOLERANCE, (flash, click)
        # Output frame n shows t = n / fps: the flash captured at 5.0 is frame 150, exactly.
        assert abs(flash - expected) < 1e-6
        # The click comes out of Opus 6.5 ms late (the codec's own delay), as from a browser.
        assert 0 <= click - expected < 0.015


def test_speaker_view_follows_speaker_changes(decoded: dict[str, Any]) -> None:
    times, main = decoded["times"], decoded["main"]

    def colour_at(t: float) -> tuple[float, float, float]:
        return main[round(t * FPS)]

    # Before any SpeakerChanged: the first participant with video, Alice.
    assert all(near(colour_at(t), RED) for t in (0.0, 1.0, 1.95))
    # Bob (no video) at 2 s: his placeholder, neither red nor green.
    bob = colour_at(3.0)
    assert not near(bob, RED, 30) and not near(bob, GREEN, 30)
    # The main tile changes on the first frame whose time is at or after each change.
    assert near(colour_at(1.0), RED) and not near(colour_at(2.0), RED, 30)
    assert near(colour_at(4.0), RED) and not near(colour_at(4.0 - 1 / FPS), RED, 30)
    assert near(colour_at(6.0), GREEN) and near(colour_at(6.5), GREEN)
    assert near(colour_at(6.0 - 1 / FPS), RED)
    # Carol leaves at 7 s: back to the last speaker still there, Alice.
    assert near(colour_at(7.0), RED) and near(colour_at(8.0), RED)
    assert len(times) == 300


def test_thumbnails_for_late_joiner_and_leaver(decoded: dict[str, Any]) -> None:
    frames = decoded["frames"]
    # 1 s: Alice speaks; Bob alone in the strip, as a placeholder.
    (bob,) = speaker_layout(WIDTH, HEIGHT, 1).thumbs
    assert not near(mean_yuv(frames[1.0], bob), RED, 30)
    # 3.5 s: Bob speaks; Alice and Carol (who joined at 3 s) in the strip, in joining order.
    alice_thumb, carol_thumb = speaker_layout(WIDTH, HEIGHT, 2).thumbs
    assert near(mean_yuv(frames[3.5], alice_thumb), RED)
    assert near(mean_yuv(frames[3.5], carol_thumb), GREEN)
    # 6.5 s: Carol speaks; Alice and Bob in the strip.
    alice_thumb, bob_thumb = speaker_layout(WIDTH, HEIGHT, 2).thumbs
    assert near(mean_yuv(frames[6.5], alice_thumb), RED)
    assert not near(mean_yuv(frames[6.5], bob_thumb), GREEN, 30)
    # 8 s: Carol has left; one thumbnail again, and nothing green anywhere.
    (bob,) = speaker_layout(WIDTH, HEIGHT, 1).thumbs
    assert not near(mean_yuv(frames[8.0], bob), RED, 30)
    full = Rect(0, 0, WIDTH, HEIGHT)
    assert not near(mean_yuv(frames[8.0], full, inset=0), GREEN, 40)


def test_names_are_drawn_and_rendered_once(
    decoded: dict[str, Any], composed: tuple[Path, Compositor]
) -> None:
    frame = decoded["frames"][1.0]
    y = frame[:HEIGHT]
    # Alice's label: bottom left of her picture (letterboxed 640x360 in the main area): bright text on a
    # dark box, over her red.
    inner = speaker_layout(WIDTH, HEIGHT, 1).main.fit(640, 360)
    label = y[inner.y + inner.h - 40 : inner.y + inner.h, inner.x : inner.x + 200]
    assert label.max() > 200 and label.min() < 60
    # Elsewhere her picture is plain red.
    assert abs(float(y[inner.y + 20 : inner.y + 60, inner.x + 400 : inner.x + 600].mean()) - RED[0]) < 6
    # Labels were rendered once per name and size, then reused frame after frame.
    info = composite._label.cache_info()
    assert info.misses <= 8 and info.hits >= 250, info


def test_audio_mixes_everyone(composed: tuple[Path, Compositor]) -> None:
    """Bob's 220 Hz and Alice's 330 Hz both in the mix at 1 s; Carol's 550 Hz only while she is there."""
    path, _ = composed

    def spectrum_at(t: float) -> tuple[np.ndarray, np.ndarray]:
        with av.open(str(path)) as container:
            chunks = []
            for frame in container.decode(audio=0):
                if frame.time >= t:
                    chunks.append(frame.to_ndarray()[0])
                if len(chunks) * 1024 >= 24_000:
                    break
        samples = np.concatenate(chunks)[:24_000]
        power = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
        return np.fft.rfftfreq(len(samples), 1 / 48_000), power

    def level(freqs: np.ndarray, power: np.ndarray, hz: float) -> float:
        return float(power[np.abs(freqs - hz) < 5].max())

    freqs, power = spectrum_at(1.0)
    tone = level(freqs, power, 220)
    assert abs(level(freqs, power, 330) / tone - 1) < 0.2  # Alice and Bob at the same level
    assert level(freqs, power, 550) < tone / 100
    freqs, power = spectrum_at(4.0)
    assert abs(level(freqs, power, 550) / level(freqs, power, 220) - 1) < 0.2


# --- robustness -------------------------------------------------------------------------------------------


def test_corrupt_and_odd_records_are_skipped(call: SyntheticCall, tmp_path: Path) -> None:
    records = list(call.records)
    garbage = random.Random(1).randbytes(300)
    bad: list[Any] = []
    for index, record in enumerate(records):
        if isinstance(record, Frame) and record.track_id == "alice:video" and record.time in (2.0, 2.5):
            records[index] = replace(record, data=b"\x01" + garbage)  # an inter frame of noise
        elif isinstance(record, Frame) and record.track_id == "carol:video" and abs(record.time - 4.0) < 1e-9:
            records[index] = replace(record, data=record.data[:5])  # cut short
        elif isinstance(record, Frame) and record.track_id == "bob:audio" and 1.0 <= record.time < 1.1:
            records[index] = replace(record, data=b"")  # empty: must not drain the decoder
    bad.append(Frame(RECORDING_ID, "nobody:video", 0, 1.0, True, b"\x00" * 40))
    bad.append(Frame(RECORDING_ID, "alice:audio", 0, math.nan, False, b"\x00"))
    bad.append(Frame(RECORDING_ID, "alice:audio", 0, 1e12, False, b"\x00"))
    bad.append(TrackStarted(RECORDING_ID, "dave:video", "dave", "Dave", "video", "h264", 90_000, 1.0))
    bad.append(SpeakerChanged(RECORDING_ID, "nobody", 1.5))
    at = next(i for i, r in enumerate(records) if isinstance(r, Frame) and r.time > 1.6)
    records[at:at] = bad
    path = tmp_path / "corrupt.mp4"
    compositor = write_records(
        SyntheticCall(records, call.seconds, call.people, call.fps), path, width=320, height=180
    )
    stats = compositor.stats
    assert stats["corrupt_video_frames"] >= 2, stats
    assert stats["corrupt_audio_frames"] == 5, stats
    assert stats["unknown_track_frames"] == 1 and stats["bad_times"] == 2, stats
    assert stats["unsupported_tracks"] == 1, stats
    probe = ffprobe(path, count=True)
    assert abs(float(probe["format"]["duration"]) - 10.0) <= 0.5
    assert int(streams(probe)["video"]["nb_read_frames"]) == 300
    # Exactly the 5 empty packets: Bob's decoder was not left draining by them (every later packet of his
    # would then fail).


def test_no_records_at_all_still_makes_a_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp4"
    compositor = Compositor(path, width=320, height=180)
    compositor.feed(RecordingStopped(RECORDING_ID, 1.0))
    compositor.close()
    compositor.close()  # idempotent
    probe = ffprobe(path, count=True)
    assert int(streams(probe)["video"]["nb_read_frames"]) == 30
    assert abs(float(probe["format"]["duration"]) - 1.0) < 0.1


def test_thumbnails_are_bounded_recent_speakers_first(tmp_path: Path) -> None:
    compositor = Compositor(tmp_path / "many.mp4", width=320, height=180, max_thumbs=3)
    for i in range(6):
        compositor.feed(
            TrackStarted(RECORDING_ID, f"p{i}:audio", f"p{i}", f"P {i}", "audio", "opus", 48_000, 0.0)
        )
    compositor.feed(SpeakerChanged(RECORDING_ID, "p5", 0.1))
    compositor.feed(SpeakerChanged(RECORDING_ID, "p4", 0.2))
    compositor.feed(RecordingStopped(RECORDING_ID, 0.5))
    compositor.close()
    shown = [tile[0] for tile in compositor._signature or ()]
    assert shown[0] == "p4"  # the speaker
    assert shown[1:] == ["p0", "p1", "p5"]  # 3 thumbnails: p5 spoke recently, then by joining order


def test_layout_geometry() -> None:
    for count in range(10):
        layout = speaker_layout(WIDTH, HEIGHT, count)
        assert len(layout.thumbs) == min(count, MAX_THUMBS)
        for rect in (layout.main, *layout.thumbs):
            assert all(v % 2 == 0 for v in (rect.x, rect.y, rect.w, rect.h))
            assert rect.x >= 0 and rect.y >= 0 and rect.x + rect.w <= WIDTH and rect.y + rect.h <= HEIGHT
        for a, b in zip(layout.thumbs, layout.thumbs[1:], strict=False):
            assert a.x + a.w <= b.x and a.y == b.y
            assert b.y >= layout.main.y + layout.main.h
    assert speaker_layout(WIDTH, HEIGHT, 0).main == Rect(0, 0, WIDTH, HEIGHT)
    main = speaker_layout(WIDTH, HEIGHT, 2).main
    for w, h in ((640, 360), (320, 180), (480, 640), (1920, 800)):
        inner = main.fit(w, h)
        assert abs(inner.w / inner.h - w / h) < 0.02
        assert inner.w == main.w or inner.h == main.h  # as large as it fits
        assert inner.x >= main.x and inner.x + inner.w <= main.x + main.w


def test_av_sync_over_ten_minutes(tmp_path: Path) -> None:
    """10 minutes, with the sender's audio RTP clock 100 ppm fast (60 ms over the call): the flash and the
    click still line up at the start and at the end. Small (320x180, 10 fps; 60 ms Opus packets of
    silence but for the clicks) to stay quick."""
    seconds, fps = 600.0, 10
    person = alice(
        video=(160, 90),
        flashes=(10.0, 590.0),
        clicks=(10.0, 590.0),
        level=0.0,
        opus_application="audio",
        opus_ms=60,
    )
    call = synthetic_call([person], seconds, fps=fps, audio_clock_skew=100e-6)
    path = tmp_path / "long.mp4"
    compositor = write_records(call, path, width=320, height=180, fps=fps)
    assert compositor.stats["late_audio_frames"] == 0
    rect = speaker_layout(320, 180, 0).main
    offsets = []
    for at in (10.0, 590.0):
        window = (at - 0.5, at + 0.5)
        (flash,) = video_onsets(path, rect, window)
        (click,) = audio_onsets(path, window=window)
        assert abs(flash - at) < 1e-6 and abs(click - flash) < SYNC_TOLERANCE, (at, flash, click)
        offsets.append(click - flash)
    assert abs(offsets[1] - offsets[0]) < 0.015, offsets
    assert abs(float(ffprobe(path)["format"]["duration"]) - seconds) < 0.5


# --- the worker process -----------------------------------------------------------------------------------


def small_call(seconds: float, stop: bool = True) -> list[bytes]:
    people = [alice(flashes=(), clicks=()), Person("bob", "Bob", (320, 180), GREEN)]
    call = synthetic_call(people, seconds, [(seconds / 2, "bob")])
    records = call.records if stop else [r for r in call.records if not isinstance(r, RecordingStopped)]
    return [encode(r) for r in records]


async def wait_for(condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


async def test_worker_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "worker.mp4"
    worker = CompositeWorker(path, width=640, height=360)
    worker.start()
    assert worker.alive
    data = small_call(4.0)
    for chunk in data[: len(data) // 2]:
        assert worker.send(chunk)
    # SIGTERM and SIGINT are the parent's to act on: the worker carries on.
    await wait_for(lambda: worker.position > 0.5, 20)
    os.kill(worker.pid, signal.SIGTERM)
    os.kill(worker.pid, signal.SIGINT)
    for chunk in data[len(data) // 2 :]:
        assert worker.send(chunk)
    await asyncio.sleep(0.2)
    assert worker.alive
    await worker.stop(timeout=30)
    assert not worker.alive
    assert worker.dropped == 0 and worker.sent == len(data)
    assert worker.stats is not None and worker.stats["reason"] == "stop"
    assert worker.stats["records"] == len(data) and worker.stats["output_video_frames"] == 120
    assert finalised(path)
    probe = ffprobe(path, count=True)
    assert abs(float(probe["format"]["duration"]) - 4.0) <= 0.1
    assert int(streams(probe)["video"]["nb_read_frames"]) == 120
    assert worker.send(data[0]) is False  # after stop: dropped, counted
    await worker.stop()  # again: nothing to do


async def test_worker_drops_frames_beyond_its_bound(tmp_path: Path) -> None:
    bound = 256 << 10
    worker = CompositeWorker(tmp_path / "bounded.mp4", width=320, height=180, max_pending_bytes=bound)
    worker.start()
    big = encode(Frame(RECORDING_ID, "nobody:video", 0, 0.0, True, bytes(64 << 10)))
    results = [worker.send(big) for _ in range(64)]  # 4 MB at once: more than the pipe and the bound
    assert worker.dropped > 0 and results.count(False) == worker.dropped
    assert worker.pending_bytes <= bound
    # Other records are small and carry the timeline: they always go.
    assert worker.send(encode(RecordingStopped(RECORDING_ID, 0.5)))
    await worker.stop(timeout=30)
    assert worker.stats is not None and worker.stats["reason"] == "stop"
    assert worker.stats["unknown_track_frames"] == 64 - worker.dropped
    assert finalised(tmp_path / "bounded.mp4")


async def test_killed_worker_leaves_a_playable_file(tmp_path: Path) -> None:
    path = tmp_path / "killed.mp4"
    worker = CompositeWorker(path, width=640, height=360, keyframe_interval=1.0)
    worker.start()
    for chunk in small_call(6.0, stop=False):
        worker.send(chunk)
    await wait_for(lambda: worker.position >= 5.0, 30)  # all in but the last latency's worth
    worker.kill()
    await worker.stop(timeout=10)
    assert not worker.alive and worker.stats is None
    assert not finalised(path)
    probe = ffprobe(path, count=True)
    video, audio = streams(probe)["video"], streams(probe)["audio"]
    assert video["codec_name"] == "h264" and audio["codec_name"] == "aac"
    # Complete fragments (one per keyframe, every second here) survive: at least 4 of the 5 s written.
    assert 4.0 <= float(probe["format"]["duration"]) <= 5.5, probe["format"]
    assert int(video["nb_read_frames"]) >= 4 * FPS
    assert int(audio["nb_read_frames"]) >= 4 * 48_000 // 1024
    with av.open(str(path)) as container:  # and it decodes to the end
        assert sum(1 for _ in container.decode(video=0)) == int(video["nb_read_frames"])


PARENT = """
import asyncio, pickle, sys
from huddle.recording.worker import CompositeWorker

async def main():
    data = pickle.loads(open(sys.argv[1], "rb").read())
    worker = CompositeWorker(sys.argv[2], width=320, height=180)
    worker.start()
    for chunk in data:
        worker.send(chunk)
    while worker.pending_bytes:
        await asyncio.sleep(0.01)
    print(worker.pid, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_worker_finishes_the_file_when_its_parent_dies(tmp_path: Path) -> None:
    records = tmp_path / "records.pickle"
    records.write_bytes(pickle.dumps(small_call(3.0, stop=False)))
    path = tmp_path / "orphan.mp4"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(records), str(path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()

    def gone() -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # a zombie has exited
        except FileNotFoundError:
            return True

    deadline = time.monotonic() + 30
    while not gone():
        assert time.monotonic() < deadline, "the orphaned worker did not finish"
        time.sleep(0.05)
    assert finalised(path)
    # Everything that reached it, up to the newest time it saw (no RecordingStopped): about 3 s.
    assert abs(float(ffprobe(path)["format"]["duration"]) - 3.0) < 0.1
