"""How fast the composite recording is made: a synthetic call, as records, through a CompositeWorker.

    .venv/bin/python -m bench.recording                      # 3 participants, 20 s
    .venv/bin/python -m bench.recording --participants 6 --seconds 30

`composite_speed` reports times real time (media seconds per wall second: above 1 the worker keeps up with a
live call) and the CPU cores the worker used (its user + system CPU time over the wall time), measured on
the worker process alone: records are produced beforehand and sent as fast as the worker takes them.

The synthetic call (`synthetic_call`) is also what tests/recording/test_composite.py feeds the compositor:
VP8 from libvpx (realtime settings, as a browser sends), Opus in 20 ms packets, capture times with network
jitter in the order of arrival, tracks joining and leaving, speaker changes.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import os
import random
import resource
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np

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

RECORDING_ID = "rec-1"
SAMPLE_RATE = 48_000
VIDEO_CLOCK = 90_000
FLASH_FRAMES = 3  # how long a flash stays white, in frames
WHITE = (235, 128, 128)


@dataclass(frozen=True)
class Person:
    """One synthetic participant. Colours are (Y, U, V)."""

    id: str
    name: str
    video: tuple[int, int] | None = (640, 360)  # None: audio only
    colour: tuple[int, int, int] = (81, 90, 240)  # red
    joins: float = 0.0
    leaves: float | None = None  # None: stays to the end
    flashes: tuple[float, ...] = ()  # the video turns white for FLASH_FRAMES frames from these times
    clicks: tuple[float, ...] = ()  # a loud click in the audio at these times
    tone: float = 440.0  # Hz of a quiet background tone
    level: float = 0.03  # its amplitude
    texture: bool = False  # a panned, noisy picture (decodes like a camera) rather than a flat colour
    video_bitrate: int = 0  # 0: by size
    audio: bool = True
    # libopus's mode: "voip" as browsers send; "audio" decodes digital silence to exact zeros, which the
    # AAC encoder then takes in 0.05 ms per frame rather than 0.3 (what long tests of clicks want).
    opus_application: str = "voip"
    opus_ms: int = 20  # per packet: 20 as browsers send; up to 60 (fewer packets for long tests)

    @property
    def opus_frame(self) -> int:
        return SAMPLE_RATE * self.opus_ms // 1000


@dataclass
class SyntheticCall:
    records: list[Record]
    seconds: float
    people: Sequence[Person]
    fps: int
    counts: dict[str, int] = field(default_factory=dict)

    def encoded(self) -> list[bytes]:
        return [encode(r) for r in self.records]


def encode_video(person: Person, frames: int, fps: int, seed: int = 1) -> list[tuple[bytes, bool]]:
    """`frames` VP8 frames of `person`, keyframes at the start and around every flash."""
    assert person.video is not None
    width, height = person.video
    codec = av.CodecContext.create("libvpx", "w")
    codec.width, codec.height, codec.pix_fmt = width, height, "yuv420p"
    codec.time_base = fractions.Fraction(1, fps)
    codec.framerate = fps
    codec.bit_rate = person.video_bitrate or max(100_000, width * height * 2)
    codec.gop_size = 100_000
    codec.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0", "error-resilient": "1"}
    flash_frames: set[int] = set()
    forced: set[int] = {0}
    for at in person.flashes:
        first = round((at - person.joins) * fps)
        flash_frames.update(range(first, first + FLASH_FRAMES))
        forced.update((first, first + FLASH_FRAMES))
    rnd = np.random.default_rng(seed)
    cy, cu, cv = person.colour
    texture = None
    if person.texture:
        blocks = rnd.integers(40, 200, size=(height // 8 + 1, (width + 2 * frames) // 8 + 1), dtype=np.uint8)
        texture = np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)[:height]
    out: list[tuple[bytes, bool]] = []
    for i in range(frames):
        frame = av.VideoFrame(width, height, "yuv420p")
        y, u, v = (np.frombuffer(p, np.uint8).reshape(p.height, p.line_size) for p in frame.planes)
        if i in flash_frames:
            y[:], u[:], v[:] = WHITE
        else:
            if texture is not None:
                y[:, :width] = texture[:, 2 * i : 2 * i + width] // 2 + cy // 2
                y[:, :width] += rnd.integers(0, 24, size=(height, width), dtype=np.uint8)
            else:
                y[:] = cy
            u[:], v[:] = cu, cv
        frame.pts = i
        if i in forced:
            frame.pict_type = av.video.frame.PictureType.I
        out.extend((bytes(p), bool(p.is_keyframe)) for p in codec.encode(frame))
    out.extend((bytes(p), bool(p.is_keyframe)) for p in codec.encode(None))
    return out[:frames]


def encode_audio(person: Person, packets: int) -> list[bytes]:
    """`packets` Opus packets (mono, `person.opus_ms` each) of a quiet tone with clicks."""
    codec = av.CodecContext.create("libopus", "w")
    codec.sample_rate, codec.layout, codec.format = SAMPLE_RATE, "mono", "s16"
    codec.bit_rate = 32_000
    codec.options = {
        "application": person.opus_application,
        "frame_duration": str(person.opus_ms),
        "compression_level": "0",  # quick
    }
    size = person.opus_frame
    total = packets * size
    if person.level:
        signal = person.level * np.sin(2 * np.pi * person.tone * np.arange(total) / SAMPLE_RATE)
    else:
        signal = np.zeros(total)
    for at in person.clicks:
        start = round((at - person.joins) * SAMPLE_RATE)
        if 0 <= start < total:
            signal[start : start + 96] = 0.9  # 2 ms at full scale
    pcm = (np.clip(signal, -1, 1) * 32767).astype(np.int16)
    out: list[bytes] = []
    for k in range(packets):
        frame = av.AudioFrame.from_ndarray(pcm[None, k * size : (k + 1) * size], format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = k * size
        out.extend(bytes(p) for p in codec.encode(frame))
    out.extend(bytes(p) for p in codec.encode(None))
    return out[:packets]


def synthetic_call(
    people: Sequence[Person],
    seconds: float,
    speakers: Sequence[tuple[float, str | None]] = (),
    *,
    fps: int = 30,
    jitter: float = 0.06,
    seed: int = 7,
    audio_clock_skew: float = 0.0,
) -> SyntheticCall:
    """Records of a call, in the order a recorder would publish them: each frame at its capture time plus a
    random network delay (0 to `jitter` s), in order within a track. `audio_clock_skew` makes the senders'
    audio RTP clocks run fast by that fraction (their `time`s stay true), as a drifting sound card does."""
    rnd = random.Random(seed)
    timed: list[tuple[float, int, Record]] = []
    seq = 0

    def add(arrival: float, record: Record) -> None:
        nonlocal seq
        seq += 1
        timed.append((arrival, seq, record))

    add(-1.0, RecordingStarted(RECORDING_ID, "room", 1.7e9, ("composite",)))
    counts: dict[str, int] = {}
    for index, person in enumerate(people):
        leaves = seconds if person.leaves is None else person.leaves
        span = leaves - person.joins
        if person.video is not None:
            track = f"{person.id}:video"
            add(
                person.joins,
                TrackStarted(
                    RECORDING_ID, track, person.id, person.name, "video", "vp8", VIDEO_CLOCK, person.joins
                ),
            )
            frames = int(span * fps + 1e-9)
            arrival = person.joins
            ts0 = rnd.randrange(1 << 31)
            for i, (data, key) in enumerate(encode_video(person, frames, fps, seed=index + 1)):
                at = person.joins + i / fps
                arrival = max(arrival, at + rnd.uniform(0.005, jitter))
                add(arrival, Frame(RECORDING_ID, track, ts0 + i * VIDEO_CLOCK // fps, at, key, data))
            counts[track] = frames
            if person.leaves is not None:
                add(leaves + jitter, TrackEnded(RECORDING_ID, track, leaves))
        if person.audio:
            track = f"{person.id}:audio"
            add(
                person.joins,
                TrackStarted(
                    RECORDING_ID, track, person.id, person.name, "audio", "opus", SAMPLE_RATE, person.joins
                ),
            )
            packets = int(span * SAMPLE_RATE / person.opus_frame + 1e-9)
            arrival = person.joins
            ts0 = rnd.randrange(1 << 31)
            for k, data in enumerate(encode_audio(person, packets)):
                at = person.joins + k * person.opus_frame / SAMPLE_RATE
                arrival = max(arrival, at + rnd.uniform(0.005, jitter))
                timestamp = ts0 + round(k * person.opus_frame * (1 + audio_clock_skew))
                add(arrival, Frame(RECORDING_ID, track, timestamp, at, False, data))
            counts[track] = packets
            if person.leaves is not None:
                add(leaves + jitter, TrackEnded(RECORDING_ID, track, leaves))
    for at, participant in speakers:
        add(at + 0.01, SpeakerChanged(RECORDING_ID, participant, at))
    add(seconds + jitter + 0.01, RecordingStopped(RECORDING_ID, seconds))
    timed.sort(key=lambda item: (item[0], item[1]))
    return SyntheticCall([record for _, _, record in timed], seconds, people, fps, counts)


def bench_people(participants: int) -> list[Person]:
    """Everyone with camera-like 640x360 video and audio, the first one speaking."""
    colours = [(81, 90, 240), (145, 54, 34), (41, 240, 110), (170, 166, 16), (106, 202, 222), (60, 160, 160)]
    return [
        Person(
            f"p{i}",
            f"Participant {i + 1}",
            (640, 360),
            colours[i % len(colours)],
            texture=True,
            tone=220.0 * (i + 1),
        )
        for i in range(participants)
    ]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def composite_speed(participants: int = 3, seconds: int = 20, **options: Any) -> dict[str, Any]:
    """Run a synthetic call of `participants` x (640x360 VP8 + Opus) for `seconds` through a CompositeWorker
    (1280x720 at 30 fps by default; `options` go to it), as fast as it goes."""
    from huddle.recording.worker import CompositeWorker

    people = bench_people(participants)
    speakers = [(seconds * k / participants, p.id) for k, p in enumerate(people)]
    made = time.perf_counter()
    call = synthetic_call(people, seconds, speakers)
    data = call.encoded()
    generated = time.perf_counter() - made

    async def run(path: Path) -> tuple[float, float, float, dict[str, Any] | None, int]:
        cpu_before = _children_cpu()
        begin = time.perf_counter()
        worker = CompositeWorker(path, **options)
        worker.start()
        for chunk in data:
            # Keep the parent's buffer modest, never near the bound: a poll is all a benchmark needs.
            while worker.pending_bytes > 8 << 20:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            worker.send(chunk)
        await asyncio.sleep(0)
        sent = time.perf_counter()
        await worker.stop(timeout=600)
        wall = time.perf_counter() - begin
        cpu = _children_cpu() - cpu_before
        return wall, sent - begin, cpu, worker.stats, worker.dropped

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "composite.mp4"
        wall, _, cpu, stats, dropped = asyncio.run(run(path))
        size = path.stat().st_size
    return {
        "participants": participants,
        "media_seconds": seconds,
        "output": f"{options.get('width', 1280)}x{options.get('height', 720)}@{options.get('fps', 30)}",
        "wall_seconds": round(wall, 2),
        "times_real_time": round(seconds / wall, 2),
        "worker_cpu_seconds": round(cpu, 2),
        "cores": round(cpu / wall, 2),
        "cpu_per_media_second": round(cpu / seconds, 3),
        "output_kbps": round(size * 8 / seconds / 1000),
        "records": len(data),
        "input_kbps": round(sum(len(d) for d in data) * 8 / seconds / 1000),
        "dropped": dropped,
        "worker_stats": stats,
        "input_generation_seconds": round(generated, 1),
        "cpus_on_machine": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--participants", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--preset", default="veryfast")
    parser.add_argument("--threads", type=int, default=1, help="libx264 threads (0: its own choice)")
    args = parser.parse_args()
    result = composite_speed(args.participants, args.seconds, preset=args.preset, threads=args.threads)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
