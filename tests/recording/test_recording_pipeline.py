"""A call of synthetic participants (huddle loadtest: real signaling, ICE, DTLS, SRTP, simulcast VP8 and Opus)
recorded through the whole pipeline: the recorder inside the SFU, the composite worker, the log and the
per-track writer, the uploader and the local store; then listed and downloaded over the REST API."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from huddle.config import Settings
from huddle.loadtest.run import LoadtestConfig, run_loadtest
from huddle.node import Node

from ..ffprobe import probe

HOST = "127.0.0.1"
API_KEY = "recording pipeline test key"
# Open rooms take REST recording control from the API key only.
KEY = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(params=["local", "s3"])
async def node(request: pytest.FixtureRequest) -> AsyncIterator[Node]:
    """A node storing recordings in its local folder, or in a real SeaweedFS through the S3 API."""
    s3: dict[str, str] = {}
    if request.param == "s3":
        seaweed = request.getfixturevalue("seaweed")
        s3 = {
            "s3_endpoint": seaweed.endpoint,
            "s3_bucket": "huddle-node-test",
            "s3_access_key": seaweed.access_key,
            "s3_secret_key": seaweed.secret_key,
        }
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
            **s3,
        )
    )
    node.ports = await node.start()
    node.base_url = f"http://{HOST}:{node.ports.http}"
    yield node
    await node.stop()


async def until_stored(http: aiohttp.ClientSession, base: str, room: str, timeout: float) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        async with http.get(f"{base}/api/rooms/{room}/recordings") as response:
            listing = await response.json()
        done = [r for r in listing["recordings"] if r["state"] == "stored"]
        if done:
            return done[0]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no stored recording after {timeout} s: {listing}")
        await asyncio.sleep(0.2)


async def test_a_synthetic_call_recorded_to_composite_and_per_track_files(node: Node, tmp_path: Path) -> None:
    room = "rec3"
    call = asyncio.create_task(
        run_loadtest(LoadtestConfig(url=node.base_url, room=room, participants=3, duration=9.0, warmup=1.0))
    )
    async with aiohttp.ClientSession() as http:
        base = node.base_url
        # Wait for the call to be up, then record about 6 s of it through the REST API.
        for _ in range(200):
            async with http.get(f"{base}/api/rooms/{room}") as response:
                if response.status == 200 and (await response.json())["sfu"]["rtp_in"] > 200:
                    break
            await asyncio.sleep(0.1)
        async with http.post(f"{base}/api/rooms/{room}/recordings", headers=KEY) as response:
            assert response.status == 201, await response.text()
            started = await response.json()
        async with http.post(f"{base}/api/rooms/{room}/recordings", headers=KEY) as response:
            assert response.status == 409  # one recording per call at a time
        await asyncio.sleep(1.0)
        # Someone joins for a couple of seconds and leaves again, mid-recording.
        guest = LoadtestConfig(url=base, room=room, participants=1, duration=2.0, warmup=0.5)
        await run_loadtest(guest)
        await asyncio.sleep(2.0)
        async with http.delete(
            f"{base}/api/rooms/{room}/recordings/{started['id']}", headers=KEY
        ) as response:
            assert response.status == 200, await response.text()
            stopped = await response.json()
        duration = stopped["stopped_at"] - stopped["started_at"]
        recording = await until_stored(http, base, room, 30)
        names = {f["name"] for f in recording["files"]}
        assert "speaker-view.mp4" in names and "manifest.json" in names
        # 3 people throughout and one guest for a while, audio and video each.
        assert len([n for n in names if n.endswith(".webm")]) == 8
        # Each track file says whose it is, in its name and in the listing. The guest is "synthetic-0"
        # too (a second loadtest run): the participant id keeps the two apart.
        listed = {f["name"]: f for f in recording["files"] if f["name"].endswith(".webm")}
        for name, f in listed.items():
            assert f["participant_name"].startswith("synthetic-") and f["kind"] in ("audio", "video"), f
            assert name == f"{f['participant_name']}-{f['participant_id']}-{f['kind']}-1.webm"
        assert len({f["participant_id"] for f in listed.values()}) == 4
        composite = next(f for f in recording["files"] if f["name"] == "speaker-view.mp4")
        assert "participant_name" not in composite

        # Download every file back over HTTP: byte for byte what the node wrote (the spool keeps nothing).
        for f in recording["files"]:
            async with http.get(base + f["url"]) as response:
                assert response.status == 200
                (tmp_path / f["name"]).write_bytes(await response.read())
                assert (tmp_path / f["name"]).stat().st_size == f["size"]
        if node.settings.s3_endpoint:
            stored = {o.key: o.size for o in await node.recordings.store.list(f"{room}/")}
            assert stored == {f"{room}/{started['id']}/{f['name']}": f["size"] for f in recording["files"]}
        assert node.recordings.uploader.pending == 0
    await call

    composite = probe(tmp_path / "speaker-view.mp4")
    streams = {s["codec_type"]: s for s in composite["streams"]}
    assert streams["video"]["codec_name"] == "h264" and streams["audio"]["codec_name"] == "aac"
    assert (streams["video"]["width"], streams["video"]["height"]) == (1280, 720)
    assert abs(float(composite["format"]["duration"]) - duration) < 0.5, (composite["format"], duration)
    assert int(streams["video"]["nb_read_frames"]) >= 25 * (duration - 0.5)

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["recording_id"] == started["id"] and manifest["room"] == room
    tracks = manifest["tracks"]
    assert len(tracks) == 8
    assert {t["file"]: (t["participant_id"], t["name"], t["kind"]) for t in tracks} == {
        name: (f["participant_id"], f["participant_name"], f["kind"]) for name, f in listed.items()
    }
    for track in tracks:
        info = probe(tmp_path / Path(track["file"]).name)
        stream = info["streams"][0]
        assert stream["codec_name"] == ("vp8" if track["kind"] == "video" else "opus")
        assert int(stream["nb_read_frames"]) == track["frames"] > 0
        assert 0 <= track["start_offset"] < duration
    # Everyone was in the call throughout, so on the common clock every track ends when the recording
    # stopped: lined up by their offsets, they end together within 40 ms (10 ms measured).
    stayed = [t for t in tracks if t["left_at"] is None or t["left_at"] >= duration - 0.1]
    assert len(stayed) == 6
    ends = [t["start_offset"] + t["duration"] for t in stayed]
    assert max(ends) - min(ends) < 0.04, stayed
    # The guest's tracks sit inside the recording, where the guest was in the call.
    [guest_audio, guest_video] = sorted((t for t in tracks if t not in stayed), key=lambda t: t["kind"])
    for t in (guest_audio, guest_video):
        assert 0.5 < t["start_offset"] and t["start_offset"] + t["duration"] < duration - 1.0, t
    assert abs(guest_audio["left_at"] - guest_video["left_at"]) < 0.1
