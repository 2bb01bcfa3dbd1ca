"""Recording through Kafka (issue 13) for `make bench`: what one record consumer writes, how long a frame
takes to be safe, and what recording costs the SFU node, Kafka against the in-process log.

    scripts/in-netns .venv/bin/python -m bench.kafka_recording            # ~3.5 minutes
    scripts/in-netns .venv/bin/python -m bench.kafka_recording --quick    # ~2 minutes
    scripts/in-netns .venv/bin/python -m bench.run --only kafka --no-janus

Real parts: a Tansu broker (tests/recording/tansu.py) on memory storage, and one on SeaweedFS storage for the
durable variant of the acknowledgement delay; SeaweedFS as S3 (tests/recording/seaweed.py); `huddle
record-consumer` as a child process; `huddle serve --kafka` as a child process. Media are
bench.recording_tracks' records: VP8 at ~1.2 Mbit/s, 30 fps (a keyframe every 2 s) and Opus at 50 packets/s
per participant, encoded once beforehand.

throughput: a topic is filled (KafkaLog, the node's producer) with one recording of `participants` people for
`seconds` s; then a fresh `huddle record-consumer` (a group of its own) reads it, writes the WebM files and
the manifest and uploads them to SeaweedFS. Timed from its start, and from its first frame written
(/metrics), to the manifest in S3 (HEAD every 20 ms): frames per second, and its CPU (/proc/PID/stat, from
its ready line to the manifest) per media second per participant. Against the in-process path
(bench.recording_tracks.tracks_throughput: InProcessLog → TrackConsumer → TrackWriter into a local folder, in
one process) on the same records.

delay: KafkaLog publishes a 3-person recording paced in real time (each record at its capture time, within
1 ms); per frame, publish → acknowledged (acks=all, idempotent producer; KafkaLog serves librdkafka's
delivery reports every 10 ms, so this is when the node learns it): from the log's `acked` counter, sampled
every ms, matched to the cumulative count of messages published (one key: one partition: acknowledged in
order). A record consumer runs meanwhile; stop (RecordingStopped published) → the manifest, uploaded last,
in S3. The same publishing against a Tansu whose storage is SeaweedFS gives the acknowledgement delay of a
broker that writes to durable storage before it answers.

node: `huddle serve --sfu-always --api-key K` (in-process log) and the same with `--kafka` (a record consumer
draining the topic), each with one call of N synthetic participants (huddle.loadtest, in this process:
it shares the 2 cores with the server, hence a small N). Within the call, alternating windows: no recording,
then a per-track recording (REST, outputs ["tracks"]) started 1 s before its window and stopped after it
(files finished outside the windows). Figure: the node's CPU (user+sys, /proc/PID/stat) per second in the
recording window minus the window before it, per participant; median over the pairs.

Everything is bounded: process starts, polls, run counts, and a deadline over the whole section.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import secrets
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import boto3
from botocore.exceptions import ClientError
from confluent_kafka.admin import AdminClient, NewTopic

from bench.cluster import ENV, Serve, cpu_seconds, own_cpu, save_results, terminate
from bench.recording_tracks import recording_entries, recording_media, tracks_throughput
from huddle.loadtest.run import LoadtestConfig, run_loadtest
from huddle.recording.kafka_log import KafkaLog
from huddle.recording.records import Frame, decode
from tests.recording.seaweed import SeaweedS3, running_seaweed
from tests.recording.tansu import Tansu, running_tansu

Say = Callable[[str], None]

BUCKET = "bench-kafka"
ROOM = "bench"  # the room of bench.recording_tracks' records: the store key is bench/<recording id>/
API_KEY = "bench-kafka-recording"
START_TIMEOUT = 30.0
STORED_TIMEOUT = 90.0
S3_POLL = 0.02
SECTION_TIMEOUT = 420.0
_local = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_METRIC_LINE = re.compile(r"^([a-z_]+)(?:\{([^}]*)\})?\s+(\S+)$", re.MULTILINE)


@dataclass(frozen=True)
class Plan:
    runs: int
    tput_participants: int
    tput_seconds: float
    delay_participants: int
    delay_seconds: float
    durable_seconds: float
    node_participants: int
    node_window: float
    node_pairs: int


FULL = Plan(3, 10, 20.0, 3, 10.0, 5.0, 5, 5.0, 4)
QUICK = Plan(3, 10, 5.0, 3, 4.0, 3.0, 4, 3.0, 3)


# ---------------------------------------------------------------------------------------------------------
# Small helpers


def spread(values: list[float], digits: int = 3) -> dict[str, Any]:
    """Median and range of repeated measurements (all kept)."""
    if not values:
        return {"median": None, "min": None, "max": None, "values": []}
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "values": [round(v, digits) for v in values],
    }


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: with few values the high percentiles are the maximum."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, num_partitions=partitions)]).values():
        future.result(timeout=15)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {name or name{labels}: value}; summed per name too."""
    values: dict[str, float] = {}
    for name, labels, value in _METRIC_LINE.findall(text):
        with contextlib.suppress(ValueError):
            number = float(value)
            values[name] = values.get(name, 0.0) + number
            if labels:
                values[f"{name}{{{labels}}}"] = number
    return values


def fetch_metrics(url: str) -> dict[str, float]:
    with _local.open(f"{url}/metrics", timeout=3.0) as reply:
        return parse_metrics(reply.read().decode())


class S3:
    """HEAD / LIST on the bench's bucket, straight to SeaweedFS."""

    def __init__(self, seaweed: SeaweedS3) -> None:
        self.client = boto3.client(
            "s3",
            endpoint_url=seaweed.endpoint,
            aws_access_key_id=seaweed.access_key,
            aws_secret_access_key=seaweed.secret_key,
            region_name=seaweed.region,
        )

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=BUCKET, Key=key)
        except ClientError:
            return False
        return True

    def keys(self, prefix: str) -> list[str]:
        listing = self.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        return [entry["Key"] for entry in listing.get("Contents", [])]

    async def wait(self, key: str, timeout: float, alive: Callable[[], bool]) -> float | None:
        """Monotonic time at which `key` was seen (HEAD every 20 ms), or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and alive():
            if await asyncio.to_thread(self.exists, key):
                return time.monotonic()
            await asyncio.sleep(S3_POLL)
        return None


class Consumer:
    """`huddle record-consumer` as a child process, into the bench's bucket."""

    def __init__(self, workdir: Path, kafka: Tansu, seaweed: SeaweedS3, topic: str) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.command = [
            sys.executable, "-m", "huddle", "record-consumer",
            "--kafka", kafka.bootstrap, "--kafka-topic", topic,
            "--kafka-group", f"bench-{secrets.token_hex(4)}",  # a group of its own: reads from the start
            "--kafka-session-timeout", "6",
            "--work-dir", str(workdir / "work"), "--http-port", "0",
            "--s3-endpoint", seaweed.endpoint, "--s3-bucket", BUCKET,
            "--s3-access-key", seaweed.access_key, "--s3-secret-key", seaweed.secret_key,
        ]  # fmt: skip
        self.stderr_path = workdir / "stderr"
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.started = self.ready = 0.0

    def start(self) -> None:
        with self.stderr_path.open("w") as stderr:
            self.started = time.monotonic()
            self.proc = subprocess.Popen(
                self.command, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, text=True,
                env=ENV,
            )  # fmt: skip
        assert self.proc.stdout is not None
        readable, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT)
        line = self.proc.stdout.readline() if readable else ""
        with contextlib.suppress(ValueError, AttributeError):
            ready = json.loads(line)
            if ready.get("event") == "ready":
                self.ready = time.monotonic()
                self.url = f"http://127.0.0.1:{ready['http']}"
                return
        self.stop()
        raise RuntimeError(f"record-consumer not ready within {START_TIMEOUT:g} s: {self.stderr()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr(self) -> str:
        with contextlib.suppress(OSError):
            return self.stderr_path.read_text(errors="replace")[-600:]
        return ""

    def metrics(self) -> dict[str, float]:
        return fetch_metrics(self.url)

    async def until(self, name: str, above: float, timeout: float, interval: float = 0.1) -> float | None:
        """Monotonic time at which /metrics `name` exceeded `above`, or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive():
            with contextlib.suppress(OSError):
                if (await asyncio.to_thread(self.metrics)).get(name, 0.0) > above:
                    return time.monotonic()
            await asyncio.sleep(interval)
        return None

    def stop(self) -> None:
        if self.proc is None:
            return
        terminate(self.proc, 15)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextlib.asynccontextmanager
async def consumer_running(
    workdir: Path, kafka: Tansu, seaweed: SeaweedS3, topic: str
) -> AsyncIterator[Consumer]:
    consumer = Consumer(workdir, kafka, seaweed, topic)
    await asyncio.to_thread(consumer.start)
    try:
        yield consumer
    finally:
        await asyncio.to_thread(consumer.stop)


def frames_of(entries: list[tuple[float, bytes]]) -> int:
    return sum(1 for _, data in entries if isinstance(decode(data), Frame))


# ---------------------------------------------------------------------------------------------------------
# 1. Consumer throughput


async def _fill(bootstrap: str, topic: str, entries: list[tuple[float, bytes]], buffer_dir: Path) -> float:
    """Publish every record at once through KafkaLog and wait for Kafka's acks: seconds taken."""
    log = KafkaLog(bootstrap, topic, buffer_dir=buffer_dir)
    await log.start()
    started = time.monotonic()
    try:
        for _, value in entries:
            log.publish(ROOM, value)
        if not await log.flush(120.0):
            raise RuntimeError(f"prefill not acknowledged within 120 s: {log.stats()}")
        if log.dropped:
            raise RuntimeError(f"prefill dropped records: {log.stats()}")
        return time.monotonic() - started
    finally:
        await log.close()


async def _throughput_run(
    run: int, plan: Plan, media: Any, kafka: Tansu, seaweed: SeaweedS3, s3: S3, tmp: Path
) -> dict[str, Any]:
    rid = f"tput-{run}-{secrets.token_hex(3)}"
    topic = f"bench.tput.{rid}"
    entries = recording_entries(rid, plan.tput_participants, plan.tput_seconds, media)
    frames = frames_of(entries)
    await asyncio.to_thread(create_topic, kafka.bootstrap, topic, 1)
    fill = await _fill(kafka.bootstrap, topic, entries, tmp / f"buffer-{rid}")
    size = sum(len(v) for _, v in entries)
    async with consumer_running(tmp / f"consumer-{rid}", kafka, seaweed, topic) as consumer:
        cpu_ready = cpu_seconds(consumer.pid)
        manifest = f"{ROOM}/{rid}/manifest.json"
        first_task = asyncio.create_task(
            consumer.until("huddle_record_consumer_frames_written_total", 0, 60, 0.05)
        )
        stored = await s3.wait(manifest, STORED_TIMEOUT, consumer.alive)
        cpu_stored = cpu_seconds(consumer.pid)
        first = await first_task if first_task.done() else None
        first_task.cancel()
        if stored is None:
            raise RuntimeError(f"{manifest} not stored within {STORED_TIMEOUT:g} s: {consumer.stderr()}")
        metrics = await asyncio.to_thread(consumer.metrics)
        written = int(metrics.get("huddle_record_consumer_frames_written_total", 0))
        files = len(await asyncio.to_thread(s3.keys, f"{ROOM}/{rid}/"))
    media_seconds = plan.tput_seconds * plan.tput_participants
    figures: dict[str, Any] = {
        "frames": frames,
        "frames_written": written,
        "files": files,
        "topic_mb": round(size / 2**20, 1),
        "prefill_seconds": round(fill, 2),
        "prefill_records_per_second": round(len(entries) / fill),
        "startup_seconds": round(consumer.ready - consumer.started, 2),
        "start_to_stored_seconds": round(stored - consumer.started, 2),
        "fps_from_start": round(frames / (stored - consumer.started)),
        "cpu_seconds": round(cpu_stored - cpu_ready, 3),
        "cpu_per_media_second_per_participant": round((cpu_stored - cpu_ready) / media_seconds, 6),
    }
    if first is not None and stored > first:
        figures["ready_to_first_frame_seconds"] = round(first - consumer.ready, 2)
        figures["first_to_stored_seconds"] = round(stored - first, 2)
        figures["fps_from_first_frame"] = round(frames / (stored - first))
    return figures


async def measure_throughput(
    say: Say, plan: Plan, media: Any, kafka: Tansu, seaweed: SeaweedS3, s3: S3, tmp: Path
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "participants": plan.tput_participants,
        "seconds": plan.tput_seconds,
        "runs": [],
        "in_process_runs": [],
        "notes": [],
    }
    for run in range(plan.runs):
        say(f"kafka throughput: run {run + 1}/{plan.runs}")
        try:
            result["runs"].append(await _throughput_run(run, plan, media, kafka, seaweed, s3, tmp))
        except (RuntimeError, OSError) as exc:
            result["notes"].append(f"run {run + 1}: {exc}"[:400])
    for _ in range(plan.runs):
        found = await asyncio.to_thread(tracks_throughput, plan.tput_seconds, plan.tput_participants)
        bulk = found["bulk_thread"]
        frames = found["records"] - 2 - 4 * plan.tput_participants
        result["in_process_runs"].append(
            {
                "frames": frames,
                "wall_seconds": bulk["wall_seconds"],
                "fps": round(frames / bulk["wall_seconds"]),
                "cpu_per_media_second_per_participant": bulk["cpu_per_media_second_per_participant"],
            }
        )
        result["media"] = found["media"]
    runs, local = result["runs"], result["in_process_runs"]
    result["complete"] = len(runs) == plan.runs and all(r["frames_written"] == r["frames"] for r in runs)
    for r in runs:
        if r["frames_written"] != r["frames"]:
            result["notes"].append(f"frames written {r['frames_written']} of {r['frames']}")
    result["fps_from_start"] = spread([r["fps_from_start"] for r in runs], 0)
    result["fps_from_first_frame"] = spread(
        [r["fps_from_first_frame"] for r in runs if "fps_from_first_frame" in r], 0
    )
    result["startup_seconds"] = spread([r["startup_seconds"] for r in runs], 2)
    result["ready_to_first_frame_seconds"] = spread(
        [r["ready_to_first_frame_seconds"] for r in runs if "ready_to_first_frame_seconds" in r], 2
    )
    result["cpu_per_media_second_per_participant"] = spread(
        [r["cpu_per_media_second_per_participant"] for r in runs], 6
    )
    result["prefill_records_per_second"] = spread([r["prefill_records_per_second"] for r in runs], 0)
    result["in_process_fps"] = spread([r["fps"] for r in local], 0)
    result["in_process_cpu_per_media_second_per_participant"] = spread(
        [r["cpu_per_media_second_per_participant"] for r in local], 6
    )
    consumer_fps = result["fps_from_first_frame"]["median"] or result["fps_from_start"]["median"]
    local_fps = result["in_process_fps"]["median"]
    cpu, local_cpu = (
        result["cpu_per_media_second_per_participant"]["median"],
        result["in_process_cpu_per_media_second_per_participant"]["median"],
    )
    result["fps_ratio_consumer_to_in_process"] = (
        round(consumer_fps / local_fps, 3) if consumer_fps and local_fps else None
    )
    result["cpu_ratio_consumer_to_in_process"] = round(cpu / local_cpu, 2) if cpu and local_cpu else None
    if cpu:
        result["participants_per_core"] = round(1 / cpu)
    return result


# ---------------------------------------------------------------------------------------------------------
# 2. Delay: publish → acknowledged, stop → stored


async def _paced(log: KafkaLog, entries: list[tuple[float, bytes]]) -> tuple[list[float], float, float]:
    """Publish `entries` at their capture times; (per frame: publish → ack seconds, monotonic time of the
    last publish, monotonic time its ack was seen)."""
    loop = asyncio.get_running_loop()
    is_frame = [isinstance(decode(data), Frame) for _, data in entries]
    ends: list[int] = []  # log.parts after each publish: the record is acked when log.acked reaches it
    published_at: list[float] = []
    acked_at: list[float] = [0.0] * len(entries)
    done = asyncio.Event()

    async def watch() -> None:
        index = 0
        for _ in range(int(300 / 0.001)):  # bounded: far beyond any run
            acked = log.acked
            now = time.monotonic()
            while index < len(ends) and ends[index] <= acked:
                acked_at[index] = now
                index += 1
            if index == len(entries):
                done.set()
                return
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    start = loop.time() + 1.0  # RecordingStarted and TrackStarted are at negative times: published first
    i = 0
    try:
        while i < len(entries):
            delay = start + entries[i][0] - loop.time()
            if delay > 0:
                await asyncio.sleep(min(delay, 0.001))
                continue
            while i < len(entries) and start + entries[i][0] <= loop.time():
                log.publish(ROOM, entries[i][1])
                ends.append(log.parts)
                published_at.append(time.monotonic())
                i += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 30)
    finally:
        watcher.cancel()
    if not done.is_set():
        raise RuntimeError(f"not every record acknowledged within 30 s: {log.stats()}")
    delays = [acked_at[k] - published_at[k] for k in range(len(entries)) if is_frame[k]]
    return delays, published_at[-1], acked_at[-1]


def _ack_figures(per_run: list[list[float]]) -> dict[str, Any]:
    pooled = [d for run in per_run for d in run]
    return {
        "p50_ms": spread([1000 * percentile(run, 50) for run in per_run], 2),
        "p99_ms": spread([1000 * percentile(run, 99) for run in per_run], 2),
        "max_ms": spread([1000 * max(run) for run in per_run], 2),
        "pooled_p50_ms": round(1000 * percentile(pooled, 50), 2) if pooled else None,
        "pooled_p99_ms": round(1000 * percentile(pooled, 99), 2) if pooled else None,
        "frames": len(pooled),
    }


async def _wait_assigned(consumer: Consumer) -> None:
    if await consumer.until("huddle_record_consumer_partitions", 0, 30) is None:
        raise RuntimeError(f"the record consumer got no partition within 30 s: {consumer.stderr()}")


async def measure_delay(
    say: Say, plan: Plan, media: Any, kafka: Tansu, seaweed: SeaweedS3, s3: S3, tmp: Path
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "participants": plan.delay_participants,
        "seconds": plan.delay_seconds,
        "runs": [],
        "notes": [],
    }
    topic = f"bench.delay.{secrets.token_hex(3)}"
    await asyncio.to_thread(create_topic, kafka.bootstrap, topic, 4)
    delays: list[list[float]] = []
    stored: list[float] = []
    async with consumer_running(tmp / "consumer-delay", kafka, seaweed, topic) as consumer:
        await _wait_assigned(consumer)
        log = KafkaLog(kafka.bootstrap, topic, buffer_dir=tmp / "buffer-delay")
        await log.start()
        try:
            for run in range(plan.runs):
                say(f"kafka delay: run {run + 1}/{plan.runs} ({plan.delay_participants} people, "
                    f"{plan.delay_seconds:g} s in real time)")  # fmt: skip
                rid = f"delay-{run}-{secrets.token_hex(3)}"
                entries = recording_entries(rid, plan.delay_participants, plan.delay_seconds, media)
                try:
                    run_delays, stop, stop_acked = await _paced(log, entries)
                except RuntimeError as exc:
                    result["notes"].append(f"run {run + 1}: {exc}"[:400])
                    continue
                manifest = f"{ROOM}/{rid}/manifest.json"
                at = await s3.wait(manifest, STORED_TIMEOUT, consumer.alive)
                if at is None:
                    result["notes"].append(f"run {run + 1}: {manifest} not stored: {consumer.stderr()}"[:400])
                    continue
                files = len(await asyncio.to_thread(s3.keys, f"{ROOM}/{rid}/"))
                delays.append(run_delays)
                stored.append(at - stop)
                result["runs"].append(
                    {
                        "frames": len(run_delays),
                        "ack_p50_ms": round(1000 * percentile(run_delays, 50), 2),
                        "ack_p99_ms": round(1000 * percentile(run_delays, 99), 2),
                        "stop_to_acked_s": round(stop_acked - stop, 3),
                        "stop_to_stored_s": round(at - stop, 3),
                        "files": files,
                    }
                )
            result["log"] = log.stats()
        finally:
            await log.close()
    result["ack"] = _ack_figures(delays)
    result["stop_to_stored_s"] = {
        "p50": round(percentile(stored, 50), 3) if stored else None,
        "p99": round(percentile(stored, 99), 3) if stored else None,
        "values": [round(s, 3) for s in stored],
    }
    result["complete"] = len(stored) == plan.runs and result["log"].get("dropped", 1) == 0
    return result


async def measure_durable_ack(
    say: Say, plan: Plan, media: Any, seaweed: SeaweedS3, tmp: Path
) -> dict[str, Any]:
    """The same paced publishing against a broker that keeps its log in SeaweedFS."""
    result: dict[str, Any] = {"participants": plan.delay_participants, "seconds": plan.durable_seconds}
    delays: list[list[float]] = []
    with running_tansu(tmp / "tansu-s3", s3=seaweed) as kafka:
        topic = "bench.durable"
        await asyncio.to_thread(create_topic, kafka.bootstrap, topic, 4)
        log = KafkaLog(kafka.bootstrap, topic, buffer_dir=tmp / "buffer-durable")
        await log.start()
        try:
            for run in range(plan.runs):
                say(f"kafka delay, broker on S3 storage: run {run + 1}/{plan.runs}")
                entries = recording_entries(
                    f"durable-{run}", plan.delay_participants, plan.durable_seconds, media
                )
                with contextlib.suppress(RuntimeError):
                    delays.append((await _paced(log, entries))[0])
            result["log"] = log.stats()
        finally:
            await log.close()
    result["ack"] = _ack_figures(delays)
    result["complete"] = len(delays) == plan.runs
    return result


# ---------------------------------------------------------------------------------------------------------
# 3. What recording costs the SFU node


async def _node_run(
    mode: str, say: Say, plan: Plan, kafka: Tansu, seaweed: SeaweedS3, tmp: Path
) -> dict[str, Any]:
    result: dict[str, Any] = {"pairs": [], "notes": []}
    args = ["--api-key", API_KEY]
    topic = f"bench.node.{secrets.token_hex(3)}"
    if mode == "kafka":
        args += ["--kafka", kafka.bootstrap, "--kafka-topic", topic]
        await asyncio.to_thread(create_topic, kafka.bootstrap, topic, 4)
    server = Serve(f"kafka-node-{mode}", *args)
    async with contextlib.AsyncExitStack() as stack:
        consumer = None
        if mode == "kafka":
            consumer = await stack.enter_async_context(
                consumer_running(tmp / "consumer-node", kafka, seaweed, topic)
            )
            await _wait_assigned(consumer)
        await asyncio.to_thread(server.start)
        stack.callback(server.stop)
        room = f"bench-kafka-{mode}-{secrets.token_hex(2)}"
        headers = {"Authorization": f"Bearer {API_KEY}"}
        window, settle, finish = plan.node_window, 1.0, 2.0
        duration = plan.node_pairs * (2 * window + settle + finish) + 2.0
        cycle: list[asyncio.Task[None]] = []

        def sample() -> tuple[float, float, float]:
            node = cpu_seconds(server.pid) + sum(cpu_seconds(child) for child in server.children())
            return time.monotonic(), node, own_cpu()

        async def measure(http: aiohttp.ClientSession) -> None:
            for pair in range(plan.node_pairs):
                a = sample()
                await asyncio.sleep(window)
                b = sample()
                async with http.post(
                    f"{server.url}/api/rooms/{room}/recordings", json={"outputs": ["tracks"]}, headers=headers
                ) as response:
                    info = await response.json()
                    if response.status != 201:
                        raise RuntimeError(f"start recording: {response.status} {info}")
                await asyncio.sleep(settle)
                c = sample()
                await asyncio.sleep(window)
                d = sample()
                async with http.delete(
                    f"{server.url}/api/rooms/{room}/recordings/{info['id']}", headers=headers
                ) as response:
                    if response.status != 200:
                        raise RuntimeError(f"stop recording: {response.status} {await response.text()}")
                off = (b[1] - a[1]) / (b[0] - a[0])
                on = (d[1] - c[1]) / (d[0] - c[0])
                result["pairs"].append(
                    {
                        "off_cpu_per_s": round(off, 4),
                        "on_cpu_per_s": round(on, 4),
                        "generator_cpu_per_s": round(
                            ((b[2] - a[2]) + (d[2] - c[2])) / (b[0] - a[0] + d[0] - c[0]), 3
                        ),
                        "recording": info["id"],
                    }
                )
                say(f"  node {mode}: pair {pair + 1}: {off:.3f} CPU s/s without, {on:.3f} with a recording")
                await asyncio.sleep(finish)

        async with aiohttp.ClientSession() as http:

            def progress(text: str) -> None:
                if text.startswith("measuring"):
                    cycle.append(asyncio.get_running_loop().create_task(measure(http)))

            config = LoadtestConfig(
                url=server.url,
                room=room,
                participants=plan.node_participants,
                duration=duration,
                warmup=2.0,
                connect_timeout=30.0,
            )
            loadtest = await run_loadtest(config, progress=progress)
            if not cycle:
                result["notes"].append("the call never reached its measured window")
            for task in cycle:
                if not task.done():
                    task.cancel()
                    result["notes"].append("the windows outlasted the call")
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                elif task.exception() is not None:
                    result["notes"].append(repr(task.exception())[:300])
        result["loss_percent"] = loadtest.loss_percent
        result["connected"] = f"{loadtest.connected}/{loadtest.participants}"
        metrics = await asyncio.to_thread(fetch_metrics, server.url)
        result["log"] = {
            outcome.group(1): int(v)
            for k, v in metrics.items()
            if k.startswith("huddle_recording_log_records_total{")
            and (outcome := re.search(r'outcome="([^"]+)"', k)) is not None
        }
        if consumer is not None:
            expected = len(result["pairs"])
            await consumer.until("huddle_record_consumer_recordings_uploaded_total", expected - 1, 30)
            found = await asyncio.to_thread(consumer.metrics)
            result["consumer"] = {
                "recordings_uploaded": int(found.get("huddle_record_consumer_recordings_uploaded_total", 0)),
                "frames_written": int(found.get("huddle_record_consumer_frames_written_total", 0)),
            }
    n = plan.node_participants
    extra = [(p["on_cpu_per_s"] - p["off_cpu_per_s"]) / n for p in result["pairs"]]
    result["off_cpu_per_s"] = spread([p["off_cpu_per_s"] for p in result["pairs"]], 4)
    result["on_cpu_per_s"] = spread([p["on_cpu_per_s"] for p in result["pairs"]], 4)
    result["extra_cpu_per_participant"] = spread(extra, 5)
    result["generator_cpu_per_s"] = spread([p["generator_cpu_per_s"] for p in result["pairs"]], 3)
    result["complete"] = (
        len(result["pairs"]) == plan.node_pairs
        and loadtest.complete
        and not result["log"].get("dropped", 0)
        and (consumer is None or result["consumer"]["recordings_uploaded"] >= plan.node_pairs)
    )
    return result


async def measure_node(say: Say, plan: Plan, kafka: Tansu, seaweed: SeaweedS3, tmp: Path) -> dict[str, Any]:
    result: dict[str, Any] = {
        "participants": plan.node_participants,
        "window_s": plan.node_window,
        "pairs": plan.node_pairs,
        "modes": {},
        "notes": [],
    }
    for mode in ("in-process", "kafka"):
        say(f"kafka node cost: {mode} log, {plan.node_participants} participants, {plan.node_pairs} pairs of "
            f"{plan.node_window:g} s windows")  # fmt: skip
        try:
            result["modes"][mode] = await _node_run(mode, say, plan, kafka, seaweed, tmp)
        except (RuntimeError, OSError, TimeoutError, aiohttp.ClientError) as exc:
            result["notes"].append(f"{mode}: {exc!r}"[:400])
    modes = result["modes"]
    result["complete"] = len(modes) == 2 and all(m["complete"] for m in modes.values())
    if len(modes) == 2:
        local = modes["in-process"]["extra_cpu_per_participant"]["median"]
        remote = modes["kafka"]["extra_cpu_per_participant"]["median"]
        if local and remote and local > 0:
            result["ratio_kafka_to_in_process"] = round(remote / local, 2)
    return result


# ---------------------------------------------------------------------------------------------------------
# All of it


async def measure_kafka(say: Say, *, quick: bool = False) -> dict[str, Any]:
    plan = QUICK if quick else FULL
    figures: dict[str, Any] = {"quick": quick, "notes": []}
    tmp = Path(tempfile.mkdtemp(prefix="huddle-bench-kafka-"))
    media = await asyncio.to_thread(recording_media)
    stack = contextlib.ExitStack()
    try:
        say("kafka: starting SeaweedFS and Tansu")
        seaweed = await asyncio.to_thread(stack.enter_context, running_seaweed(tmp / "seaweed"))
        kafka = await asyncio.to_thread(stack.enter_context, running_tansu(tmp / "tansu"))
        s3 = S3(seaweed)
        async with asyncio.timeout(SECTION_TIMEOUT):
            figures["throughput"] = await measure_throughput(say, plan, media, kafka, seaweed, s3, tmp)
            figures["delay"] = await measure_delay(say, plan, media, kafka, seaweed, s3, tmp)
            figures["durable_ack"] = await measure_durable_ack(say, plan, media, seaweed, tmp)
            figures["node"] = await measure_node(say, plan, kafka, seaweed, tmp)
    except (RuntimeError, OSError, TimeoutError) as exc:
        figures["notes"].append(f"stopped: {exc!r}"[:400])
    finally:
        await asyncio.to_thread(stack.close)
        shutil.rmtree(tmp, ignore_errors=True)
    parts = ("throughput", "delay", "durable_ack", "node")
    figures["complete"] = all(figures.get(p, {}).get("complete") for p in parts)
    return figures


# ---------------------------------------------------------------------------------------------------------
# The table


def _s(found: dict[str, Any] | None, spec: str, scale: float = 1.0) -> str:
    """median [min-max] of a spread."""
    if not found or found.get("median") is None:
        return "-"
    m, lo, hi = (scale * found[k] for k in ("median", "min", "max"))
    return f"{m:{spec}} [{lo:{spec}}-{hi:{spec}}]"


def format_kafka(figures: dict[str, Any]) -> str:
    lines = ["recording through Kafka (issue 13): median [min-max] of the runs"]
    t = figures.get("throughput")
    if t:
        runs = t["runs"]
        media = t.get("media", {})
        frames = runs[0]["frames"] if runs else 0
        size = runs[0]["topic_mb"] if runs else 0
        lines += [
            f"  consumer throughput: one `huddle record-consumer` process, a topic filled beforehand with "
            f"{t['participants']} people x {t['seconds']:g} s (VP8 {media.get('video_kbps', '?')} kbit/s "
            f"30 fps + Opus 50/s: {frames:,} frames, {size} MB), files to SeaweedFS; {len(runs)} runs",
            f"    frames/s, first frame written -> manifest in S3: {_s(t['fps_from_first_frame'], ',.0f')};"
            f" process start -> manifest: {_s(t['fps_from_start'], ',.0f')}"
            f" (start to ready {_s(t['startup_seconds'], '.2f')} s, ready to first frame"
            f" {_s(t['ready_to_first_frame_seconds'], '.2f')} s)",
            f"    consumer CPU per media second per participant: "
            f"{_s(t['cpu_per_media_second_per_participant'], '.2f', 1000)} ms"
            f" -> ~{_f(t.get('participants_per_core'), ',')} participants per core",
            f"    in-process TrackConsumer on the same records (one process, local folder, no Kafka, no S3):"
            f" {_s(t['in_process_fps'], ',.0f')} frames/s,"
            f" {_s(t['in_process_cpu_per_media_second_per_participant'], '.2f', 1000)} ms CPU",
            f"    consumer / in-process: frames/s {t.get('fps_ratio_consumer_to_in_process') or '-'}x,"
            f" CPU per media second {t.get('cpu_ratio_consumer_to_in_process') or '-'}x;"
            f" filling the topic (KafkaLog, all at once, until acked):"
            f" {_s(t['prefill_records_per_second'], ',.0f')} records/s",
        ]
        if figures.get("quick"):
            lines.append(
                "    (quick: short recordings, so the consumer's fixed costs, joining the group and its first"
                " S3 connections, weigh more than in the full run)"
            )
        lines.extend(f"    note: {n}" for n in t["notes"][:3])
    d = figures.get("delay")
    if d:
        ack, durable = d["ack"], figures.get("durable_ack", {}).get("ack")
        stored = d["stop_to_stored_s"]
        values = ", ".join(f"{v:.2f}" for v in stored["values"])
        lines += [
            f"  delay: {d['participants']} people published in real time for {d['seconds']:g} s (KafkaLog),"
            f" {len(d['runs'])} runs, {ack['frames']:,} frames",
            f"    publish -> acknowledged by Kafka (acks=all, idempotent; Tansu, memory storage):"
            f" p50 {_s(ack['p50_ms'], '.1f')} ms, p99 {_s(ack['p99_ms'], '.1f')} ms",
        ]
        if durable:
            lines.append(
                f"    the same against Tansu storing its log in SeaweedFS"
                f" ({figures['durable_ack']['seconds']:g} s runs):"
                f" p50 {_s(durable['p50_ms'], '.1f')} ms, p99 {_s(durable['p99_ms'], '.1f')} ms"
            )
        p50 = "-" if stored["p50"] is None else f"{stored['p50']:.2f}"
        p99 = "-" if stored["p99"] is None else f"{stored['p99']:.2f}"
        count = len(stored["values"])
        lines += [
            f"    recording stopped -> every file in S3 (manifest, uploaded last, seen):"
            f" p50 {p50} s, p99 {p99} s over {count} recordings ({values}; with {count}, p99 is the largest)",
            "    Files reach S3 when a recording stops (the consumer uploads finished files), so for a",
            "    frame, 'durable in S3' is the stop -> stored figure; during the call a frame is durable",
            "    once Kafka has acknowledged it (acks=all), the publish -> acknowledged figure. The node",
            "    learns of acks every 10 ms (KafkaLog's poll), which is in these figures.",
        ]
        lines.extend(f"    note: {n}" for n in d["notes"][:3])
    n = figures.get("node")
    if n:
        lines.append(
            f"  SFU node CPU for a per-track recording: one call of {n['participants']} synthetic people (all"
            f" publishing), {n['pairs']} pairs of {n['window_s']:g} s windows without / with a recording"
        )
        for mode, m in n["modes"].items():
            lines.append(
                f"    {mode + ' log':<15} node CPU s/s without {_s(m['off_cpu_per_s'], '.3f')}, with"
                f" {_s(m['on_cpu_per_s'], '.3f')}: +{_s(m['extra_cpu_per_participant'], '.1f', 1000)} ms"
                f" CPU per second per participant; loss {_f(m.get('loss_percent'), '.3f')} %,"
                f" generator {_s(m['generator_cpu_per_s'], '.2f')} CPU s/s"
            )
            log = m.get("log", {})
            said = f"      records published {_f(log.get('published'), ',')}"
            said += f", dropped {_f(log.get('dropped'), 'd')}"
            if "acked" in log:
                said += f", acknowledged by Kafka {log['acked']:,}"
            consumer = m.get("consumer")
            if consumer:
                said += (
                    f"; the record consumer stored {consumer['recordings_uploaded']} recordings"
                    f" ({consumer['frames_written']:,} frames)"
                )
            lines.append(said)
            lines.extend(f"      note: {x}" for x in m["notes"][:2])
        if "ratio_kafka_to_in_process" in n:
            a, b = (n["modes"][k]["extra_cpu_per_participant"] for k in ("in-process", "kafka"))
            overlap = a["min"] <= b["max"] and b["min"] <= a["max"]
            lines.append(
                f"    kafka / in-process: {n['ratio_kafka_to_in_process']}x (medians"
                + ("; the ranges overlap: no difference this run can tell)" if overlap else ")")
            )
        lines += [
            "    The load generator (huddle.loadtest) runs in the bench process on the same 2 cores as the",
            "    node (and, with Kafka, the broker and the record consumer): hence the small call. Per",
            "    participant = (CPU s/s with - without) / people; recording start and finish fall outside",
            "    the windows.",
        ]
        lines.extend(f"    note: {x}" for x in n["notes"][:2])
    lines.extend(f"  note: {x}" for x in figures.get("notes", [])[:3])
    return "\n".join(lines)


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


async def main_async(args: argparse.Namespace) -> int:
    def say(text: str) -> None:
        print(f"bench.kafka_recording: {text}", file=sys.stderr, flush=True)

    started = time.time()
    figures = await measure_kafka(say, quick=args.quick)
    table = format_kafka(figures)
    print(table, flush=True)
    save_results("kafka", started, figures, table)
    return 0 if figures["complete"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.kafka_recording", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (~2 minutes)")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(asyncio.wait_for(main_async(args), timeout=SECTION_TIMEOUT + 120))
    except TimeoutError:
        print("bench.kafka_recording: the run overran its deadline and was stopped", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
