"""How many per-track recordings one core sustains: records → InProcessLog → TrackConsumer → TrackWriter.

    .venv/bin/python -m bench.recording_tracks            # 20 s of media per participant
    .venv/bin/python -m bench.recording_tracks --seconds 5 --paced 3

One participant's worth of records is VP8 at ~1.2 Mbit/s, 30 fps (a 2 s 640x360 clip encoded once with
libvpx, a keyframe every 2 s when looped) and Opus at 50 packets/s. `participants` such participants are
recorded in one recording; their records are encoded to bytes beforehand (that is the recorder's cost, not
the writer's) and interleaved in capture order.

- bulk: everything is published into the log at once, then the consumer drains it as fast as it can; CPU
  seconds (process time: the loop and the writer's thread) per media second per participant, and
  "participants per core" = 1 / that. Files, manifest and fsyncs included.
- paced (optional): the same records published in real time (each within 1 ms of its capture time) for a
  few seconds: what the consumer costs when entries trickle in as in a live call (batches gather for the
  consumer's linger, then one thread hop per batch), and how late a 5 ms timer on the loop fires meanwhile
  (what forwarding would feel). A baseline run (the same publisher, a consumer that only drains the log)
  is subtracted: `net_cpu_seconds` is the consumer's own cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from huddle.loadtest.media import TRAILER_SIZE, encode_opus, encode_vp8
from huddle.recording.log import InProcessLog
from huddle.recording.records import (
    Frame,
    RecordingStarted,
    RecordingStopped,
    TrackEnded,
    TrackStarted,
    encode,
)
from huddle.recording.tracks import TrackConsumer, TrackWriter

FPS = 30
CLIP = 60  # 2 s: a keyframe every 2 s
VIDEO_BITRATE = 1_200_000
TICK = 0.001  # the paced publisher's granularity: records go out within 1 ms of their capture time


def recording_media() -> tuple[list[tuple[bytes, bool]], list[bytes]]:
    video = encode_vp8(640, 360, VIDEO_BITRATE, CLIP, seed=5)
    audio = [p[:-TRAILER_SIZE] for p in encode_opus(True, 50)]
    return video, audio


def recording_entries(
    recording_id: str, participants: int, seconds: float, media: tuple[list[tuple[bytes, bool]], list[bytes]]
) -> list[tuple[float, bytes]]:
    """(capture time, encoded record) for one recording, in capture order."""
    video, audio = media
    timed: list[tuple[float, int, bytes]] = []

    def add(at: float, record: Any) -> None:
        timed.append((at, len(timed), encode(record)))

    add(-1.0, RecordingStarted(recording_id, "bench", time.time(), ("tracks",)))
    for p in range(participants):
        pid = f"p{p}"
        offset = p * 0.003  # participants' frames do not all land on the same instant
        for kind, clock, rate in (("video", 90_000, FPS), ("audio", 48_000, 50)):
            track = f"{pid}:{kind}"
            add(-0.5, TrackStarted(recording_id, track, pid, f"Participant {p}", kind,
                                   "vp8" if kind == "video" else "opus", clock, 0.0))  # fmt: skip
            for i in range(int(seconds * rate)):
                at = offset + i / rate
                if kind == "video":
                    data, keyframe = video[i % CLIP]
                else:
                    data, keyframe = audio[i % len(audio)], True
                add(at, Frame(recording_id, track, 1000 + i * clock // rate, at, keyframe, data))
            add(seconds + offset, TrackEnded(recording_id, track, seconds))
    add(seconds + 1, RecordingStopped(recording_id, seconds + 1))
    timed.sort(key=lambda t: (t[0], t[1]))
    return [(at, data) for at, _, data in timed]


async def _bulk(entries: list[tuple[float, bytes]], root: Path, offload: bool) -> dict[str, Any]:
    log = InProcessLog(max_pending=len(entries) + 1, max_pending_bytes=sum(len(e) for _, e in entries) + 1)
    for _, value in entries:
        log.publish("bench", value)
    writer = TrackWriter(root)
    consumer = TrackConsumer(log, writer, offload=offload)
    wall, cpu = time.perf_counter(), time.process_time()
    consumer.start()
    await consumer.close()
    return {
        "cpu": time.process_time() - cpu,
        "wall": time.perf_counter() - wall,
        "batches": consumer.batches,
        "writer": writer.stats(),
    }


async def _lag(samples: list[float]) -> None:
    """How late a 5 ms timer fires: what the SFU's packets would wait while the loop is busy."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + 0.005
        await asyncio.sleep(0.005)
        samples.append(loop.time() - due)


class _Drain:
    """The baseline's consumer: takes entries off the log and does nothing with them."""

    def __init__(self, log: InProcessLog) -> None:
        self.log = log
        self.batches = 0
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for _ in self.log.records():
            pass

    async def close(self) -> None:
        await self.log.close()
        if self.task is not None:
            await self.task


async def _paced(
    entries: list[tuple[float, bytes]], root: Path, mode: dict[str, Any] | None
) -> dict[str, Any]:
    log = InProcessLog()
    writer = TrackWriter(root)
    consumer: TrackConsumer | _Drain = _Drain(log) if mode is None else TrackConsumer(log, writer, **mode)
    loop = asyncio.get_running_loop()
    lags: list[float] = []
    monitor = asyncio.create_task(_lag(lags))
    wall, cpu = time.perf_counter(), time.process_time()
    consumer.start()
    start = loop.time() + 1.0  # RecordingStarted and TrackStarted are at negative times: published first
    i = 0
    while i < len(entries):
        due = entries[i][0]
        delay = start + due - loop.time()
        if delay > 0:
            await asyncio.sleep(min(delay, TICK))
            continue
        while i < len(entries) and start + entries[i][0] <= loop.time():
            log.publish("bench", entries[i][1])
            i += 1
    await consumer.close()
    cpu = time.process_time() - cpu
    monitor.cancel()
    lags.sort()
    return {
        "cpu": cpu,
        "wall": time.perf_counter() - wall,
        "batches": consumer.batches,
        "dropped": log.dropped,
        "loop_lag_ms": {
            "p50": round(lags[len(lags) // 2] * 1000, 2),
            "p99": round(lags[len(lags) * 99 // 100] * 1000, 2),
            "max": round(lags[-1] * 1000, 2),
        },
        "writer": writer.stats(),
    }


def tracks_throughput(
    seconds: float = 20, participants: int = 10, paced_seconds: float = 0, paced_participants: int = 20
) -> dict[str, Any]:
    """CPU per media second of one participant (VP8 1.2 Mbit/s 30 fps + Opus 50 pkt/s), and its inverse."""
    media = recording_media()
    video_bps = sum(len(d) for d, _ in media[0]) * 8 * FPS / len(media[0])
    result: dict[str, Any] = {
        "media": {"video_kbps": round(video_bps / 1000), "video_fps": FPS, "audio_packets_per_second": 50},
        "seconds": seconds,
        "participants": participants,
    }
    entries = recording_entries("bench-bulk", participants, seconds, media)
    result["records"] = len(entries)
    root = Path(tempfile.mkdtemp(prefix="huddle-bench-tracks-"))
    try:
        for mode, offload in (("thread", True), ("inline", False)):
            shutil.rmtree(root / "bench-bulk", ignore_errors=True)
            run = asyncio.run(_bulk(entries, root, offload))
            written = run["writer"]["frames_written"]
            assert written == len(entries) - 2 - 4 * participants, run["writer"]
            per = run["cpu"] / (seconds * participants)
            result[f"bulk_{mode}"] = {
                "cpu_seconds": round(run["cpu"], 3),
                "wall_seconds": round(run["wall"], 3),
                "batches": run["batches"],
                "us_per_record": round(run["cpu"] / len(entries) * 1e6, 2),
                "cpu_per_media_second_per_participant": round(per, 6),
                "participants_per_core": round(1 / per),
            }
        result["participants_per_core"] = result["bulk_thread"]["participants_per_core"]
        if paced_seconds:
            paced = recording_entries("bench-paced", paced_participants, paced_seconds, media)
            modes: dict[str, dict[str, Any] | None] = {
                "baseline": None,
                "thread": {"offload": True},
                "inline": {"offload": False},
                "thread_no_linger": {"offload": True, "linger": 0},
            }
            baseline = 0.0
            for name, mode in modes.items():
                shutil.rmtree(root / "bench-paced", ignore_errors=True)
                run = asyncio.run(_paced(paced, root, mode))
                entry = {
                    "cpu_seconds": round(run["cpu"], 3),
                    "batches": run["batches"],
                    "dropped": run["dropped"],
                    "loop_lag_ms": run["loop_lag_ms"],
                }
                if mode is None:
                    baseline = run["cpu"]
                else:
                    net = max(run["cpu"] - baseline, 1e-9)
                    per = net / (paced_seconds * paced_participants)
                    entry.update(
                        net_cpu_seconds=round(net, 3),
                        cpu_per_media_second_per_participant=round(per, 6),
                        participants_per_core=round(1 / per),
                    )
                result[f"paced_{name}"] = entry
            result["paced"] = {"participants": paced_participants, "seconds": paced_seconds}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--participants", type=int, default=10)
    parser.add_argument("--paced", type=float, default=5, help="seconds of the real-time run (0: skip)")
    parser.add_argument("--paced-participants", type=int, default=20)
    args = parser.parse_args()
    result = tracks_throughput(args.seconds, args.participants, args.paced, args.paced_participants)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
