"""Per-track recording through Kafka, end to end (tests/recording/test_record_consumer.py tests the consumer
alone, on records it publishes itself): a node with `--kafka` publishes its recorder's records to a
real Kafka-protocol broker (Tansu), `huddle record-consumer` (a process of its own) writes the files into
SeaweedFS, and the tests compare every file, frame for frame, with what the topic holds.

The calls are synthetic participants (huddle loadtest: real signaling, ICE, DTLS, SRTP, simulcast VP8, Opus).
Faults are real: the broker killed -9 and started again on its SeaweedFS storage, the node killed -9.
"""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from huddle.config import Settings
from huddle.loadtest.run import LoadtestConfig, run_loadtest
from huddle.node import Node
from tests.cluster import nodes
from tests.recording.record_consumer_helpers import packets, running_consumer, stored_objects
from tests.recording.seaweed import SeaweedS3
from tests.recording.tansu import Tansu
from tests.recording.topic import Published, missing_frames, read_topic

HOST = "127.0.0.1"
API_KEY = "kafka recording test key"
KEY = {"Authorization": f"Bearer {API_KEY}"}
TOPIC = "huddle.recording"
TRACKS = json.dumps({"outputs": ["tracks"]})


def s3_settings(seaweed: SeaweedS3, bucket: str) -> dict[str, str]:
    return {
        "s3_endpoint": seaweed.endpoint,
        "s3_bucket": bucket,
        "s3_access_key": seaweed.access_key,
        "s3_secret_key": seaweed.secret_key,
    }


@pytest.fixture
def bucket() -> str:
    return "kafka-rec"


@pytest.fixture
async def node_factory(seaweed: SeaweedS3, bucket: str) -> AsyncIterator[Callable[[Tansu], Node]]:
    started: list[Node] = []

    async def make(kafka: Tansu) -> Node:
        node = Node(
            Settings(
                host=HOST,
                port=0,
                stun_port=0,
                media_port=0,
                sfu_always=True,
                reconnect_grace=0,
                api_key=API_KEY,
                recordings_dir=tempfile.mkdtemp("-recordings"),
                kafka=kafka.bootstrap,
                **s3_settings(seaweed, bucket),
            )
        )
        node.ports = await node.start()
        node.base_url = f"http://{HOST}:{node.ports.http}"
        started.append(node)
        return node

    yield make  # type: ignore[misc]
    for node in started:
        await node.stop()


async def until(what: str, check: Callable[[], object], timeout: float, interval: float = 0.2) -> object:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = await check()  # type: ignore[misc]
        if found:
            return found
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(interval)


async def call_up(http: aiohttp.ClientSession, base: str, room: str) -> None:
    async def flowing() -> bool:
        async with http.get(f"{base}/api/rooms/{room}") as response:
            return response.status == 200 and (await response.json())["sfu"]["rtp_in"] > 200

    await until("media flowing", flowing, 30, 0.1)


async def stored_recording(
    http: aiohttp.ClientSession, base: str, room: str, recording_id: str, timeout: float
) -> dict:
    """The recording's listing once the consumer has stored its manifest (uploaded last)."""

    async def manifest() -> dict | None:
        async with http.get(f"{base}/api/rooms/{room}/recordings") as response:
            listing = await response.json()
        for recording in listing["recordings"]:
            if recording["id"] == recording_id and any(
                f["name"] == "manifest.json" for f in recording["files"]
            ):
                return recording
        return None

    return await until("the consumer's files in the store", manifest, timeout)  # type: ignore[return-value]


async def download(http: aiohttp.ClientSession, base: str, recording: dict, into: Path) -> dict:
    for f in recording["files"]:
        async with http.get(base + f["url"]) as response:
            assert response.status == 200, f
            (into / f["name"]).write_bytes(await response.read())
    return json.loads((into / "manifest.json").read_text())


def check_frame_for_frame(manifest: dict, published: Published, into: Path) -> dict[str, int]:
    """Every track file holds every frame the topic holds for it (from the first keyframe on, for video),
    once each, and nothing else. Returns the frames per file."""
    counts = {}
    recording = manifest["recording_id"]
    for track in manifest["tracks"]:
        written = [digest for _, digest in packets(into / track["file"])]
        expected = published.unique((recording, track["track_id"]))
        assert expected, f"nothing published for {track['track_id']}"
        assert len(written) == len(set(written)), f"{track['file']}: a frame written twice"
        assert not missing_frames(expected, written, track["kind"] == "video"), track["file"]
        assert set(written) <= {digest for _, digest in expected}, f"{track['file']}: frames nobody published"
        assert track["frames"] == len(written)
        counts[track["file"]] = len(written)
    return counts


async def test_kafka_away_for_10_s_leaves_the_call_alone_and_the_recording_whole(
    durable_kafka: Tansu, seaweed: SeaweedS3, bucket: str, node_factory, tmp_path: Path
) -> None:
    node = await node_factory(durable_kafka)
    room = "kafka-away"
    call = asyncio.create_task(
        run_loadtest(LoadtestConfig(url=node.base_url, room=room, participants=3, duration=20.0, warmup=1.0))
    )
    with running_consumer(
        tmp_path / "consumer", durable_kafka.bootstrap, seaweed=seaweed, bucket=bucket
    ) as consumer:
        async with aiohttp.ClientSession() as http:
            base = node.base_url
            await call_up(http, base, room)
            async with http.post(f"{base}/api/rooms/{room}/recordings", data=TRACKS, headers=KEY) as response:
                assert response.status == 201, await response.text()
                started = await response.json()
            await asyncio.sleep(2.0)

            async def forwarded() -> int:
                async with http.get(f"{base}/api/rooms/{room}") as response:
                    return (await response.json())["sfu"]["rtp_out"]

            async def buffering() -> bool:
                async with http.get(f"{base}/api/rooms/{room}/recordings") as response:
                    listing = await response.json()
                return any(r.get("kafka") == "buffering" for r in listing["recordings"])

            before = await forwarded()
            await asyncio.sleep(2.0)
            rate_before = (await forwarded() - before) / 2.0
            durable_kafka.kill()
            outage = asyncio.get_running_loop().time()
            await until("the recording says Kafka is away", buffering, 8.0)
            async with http.get(f"{base}/metrics") as response:
                text = await response.text()
            assert re.search(r'huddle_recording_log_state\{state="buffering"\} 1\.0', text), text[-2000:]
            during = await forwarded()
            await asyncio.sleep(max(0.0, outage + 10.0 - asyncio.get_running_loop().time()))
            rate_during = (await forwarded() - during) / max(1.0, asyncio.get_running_loop().time() - outage)
            # The call does not notice: the SFU forwards as much as before the outage.
            assert rate_during > 0.85 * rate_before, (rate_before, rate_during)
            await asyncio.to_thread(durable_kafka.start)
            await asyncio.sleep(2.0)
            async with http.delete(
                f"{base}/api/rooms/{room}/recordings/{started['id']}", headers=KEY
            ) as reply:
                assert reply.status == 200, await reply.text()
                stopped = await reply.json()
            recording = await stored_recording(http, base, room, started["id"], 60)
            manifest = await download(http, base, recording, tmp_path)
            metrics = consumer.metrics()
        await call
    assert manifest["complete"] is True and manifest["room"] == room
    assert metrics["recordings_uploaded_total"] == 1 and metrics["lag"] == 0
    assert len(manifest["tracks"]) == 6  # 3 people, audio and video each
    published = await read_topic(durable_kafka.bootstrap, TOPIC)
    counts = check_frame_for_frame(manifest, published, tmp_path)
    duration = stopped["stopped_at"] - stopped["started_at"]
    assert duration > 13.0
    for track in manifest["tracks"]:
        # Whole across the outage: no second of the call is missing from any file.
        assert abs(track["start_offset"] + track["duration"] - duration) < 0.15, track
        assert counts[track["file"]] > (20 if track["kind"] == "video" else 45) * (duration - 1.0), track
    assert node.recordings.log.stats()["dropped"] == 0


async def test_a_recording_node_killed_keeps_every_frame_kafka_acknowledged(
    kafka: Tansu, seaweed: SeaweedS3, bucket: str, tmp_path: Path
) -> None:
    s3 = s3_settings(seaweed, bucket)
    args = ["--kafka", kafka.bootstrap, "--api-key", API_KEY, "--sfu-always", "--reconnect-grace", "0"]
    for name, value in s3.items():
        args += ["--" + name.replace("_", "-"), value]
    node = await asyncio.to_thread(nodes.start, tmp_path / "nodes", None, "rec", args=tuple(args))
    room = "kafka-kill"
    call = asyncio.create_task(
        run_loadtest(LoadtestConfig(url=node.base, room=room, participants=3, duration=12.0, warmup=1.0))
    )
    try:
        with running_consumer(
            tmp_path / "consumer", kafka.bootstrap, seaweed=seaweed, bucket=bucket, idle_finish=3.0
        ):
            async with aiohttp.ClientSession() as http:
                await call_up(http, node.base, room)
                async with http.post(
                    f"{node.base}/api/rooms/{room}/recordings", data=TRACKS, headers=KEY
                ) as response:
                    assert response.status == 201, await response.text()
                    started = await response.json()
                await asyncio.sleep(4.0)
                node.kill()
            # Nothing says the recording stopped: the consumer finishes it when nothing more comes.
            folder = f"{room}/{started['id']}/"

            async def stored() -> dict[str, bytes] | None:
                found = await asyncio.to_thread(stored_objects, seaweed, bucket, folder)
                return found if folder + "manifest.json" in found else None

            found = await until("the consumer's files in the store", stored, 40, 0.3)
            for key, data in found.items():  # type: ignore[union-attr]
                (tmp_path / key.rsplit("/", 1)[-1]).write_bytes(data)
    finally:
        node.kill()
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] is False  # its node died: no stop, files finished by the consumer
    assert len(manifest["tracks"]) == 6
    published = await read_topic(kafka.bootstrap, TOPIC)
    counts = check_frame_for_frame(manifest, published, tmp_path)
    assert all(frames > 50 for frames in counts.values()), counts
