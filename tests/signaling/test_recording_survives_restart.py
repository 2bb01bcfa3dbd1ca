"""A recording outlives the node that made it: the node stops mid-recording (its segment's files are finished
and stored), a new node takes the call back from its clients' resume tokens and records on under the same
recording id, as a second segment whose manifest says how long the gap was.

Media comes from synthetic participants (huddle loadtest: real ICE, DTLS, SRTP, VP8 and Opus), which resume
by themselves; a raw signaling client starts and stops the recording and keeps the `resume_token` messages,
as the web client does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp

from huddle.config import Settings
from huddle.loadtest.run import LoadtestConfig, run_loadtest
from huddle.node import Node

from ..ffprobe import probe
from .conftest import Client

HOST = "127.0.0.1"
ROOM = "keeps-recording"
SEGMENT = 3.0  # seconds recorded on each node


async def _node(settings: Settings) -> tuple[Node, str]:
    node = Node(settings)
    ports = await node.start()
    return node, f"http://{HOST}:{ports.http}"


async def _media_flowing(http: aiohttp.ClientSession, base: str, packets: int, timeout: float = 30.0) -> None:
    """Until the call's SFU has received `packets` RTP packets more than when we started looking."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    start: int | None = None
    while loop.time() < deadline:
        async with http.get(f"{base}/api/rooms/{ROOM}") as response:
            if response.status == 200:
                rtp_in = (await response.json())["sfu"]["rtp_in"]
                start = rtp_in if start is None else start
                if rtp_in - start >= packets:
                    return
        await asyncio.sleep(0.1)
    raise AssertionError(f"no media in {ROOM} after {timeout} s")


async def _stored(http: aiohttp.ClientSession, base: str, timeout: float = 60.0) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        async with http.get(f"{base}/api/rooms/{ROOM}/recordings") as response:
            recordings = (await response.json())["recordings"]
        if recordings and all(r["state"] == "stored" for r in recordings):
            return recordings
        if loop.time() > deadline:
            raise AssertionError(f"recordings not stored after {timeout} s: {recordings}")
        await asyncio.sleep(0.2)


async def test_a_recording_goes_on_as_a_second_segment_after_the_node_restarts(tmp_path: Path) -> None:
    settings = Settings(
        host=HOST,
        port=0,
        stun_port=0,
        media_port=0,
        sfu_always=True,
        reconnect_grace=20,
        recordings_dir=tempfile.mkdtemp("-recordings"),
    )
    first, base = await _node(settings)
    port = int(base.rsplit(":", 1)[1])
    second: Node | None = None
    running = [first]
    call = asyncio.create_task(
        run_loadtest(LoadtestConfig(url=base, room=ROOM, participants=2, duration=25.0, warmup=1.0))
    )
    try:
        async with aiohttp.ClientSession() as http:
            await _media_flowing(http, base, 200)
            host = Client(await http.ws_connect(base + "/ws"))
            joined = await host.join(ROOM, "Host")
            await host.send({"type": "start_recording", "id": "r1", "outputs": ["composite", "tracks"]})
            started = (await host.expect("recording"))["recording"]
            assert started["state"] == "recording"
            # The token now names the recording: whichever node rebuilds the call learns of it from there.
            token = (await host.expect("resume_token"))["token"]
            assert token != joined["resume_token"]
            await asyncio.sleep(SEGMENT)

            running.remove(first)
            await first.stop()
            await host.ws.close()  # the node closed it (1012); the host comes back with its token
            second, base = await _node(replace(settings, port=port))
            running.append(second)
            host = Client(await http.ws_connect(base + "/ws"))
            await host.send({"type": "join", "id": 2, "room": ROOM, "resume": token, "mode": "sfu"})
            back = await host.expect("joined")
            assert back["restored"] is True and back["self"]["id"] == joined["self"]["id"]
            # Participants are shown the same recording, still running, since it started.
            assert back["recording"] is not None, "the recording did not go on after the restart"
            assert back["recording"]["id"] == started["id"]
            assert back["recording"]["state"] == "recording"
            assert back["recording"]["started_at"] == started["started_at"]

            await _media_flowing(http, base, 200)  # the synthetic participants are back
            await asyncio.sleep(SEGMENT)
            await host.send({"type": "stop_recording", "id": "r2"})
            stopped = (await host.expect("recording"))["recording"]
            assert (stopped["id"], stopped["state"]) == (started["id"], "processing")

            recordings = await _stored(http, base)
            assert [r["id"] for r in recordings] == [started["id"]]  # one recording, not two
            recording = recordings[0]
            assert recording["segments"] == 2
            for f in recording["files"]:
                async with http.get(base + f["url"]) as response:
                    assert response.status == 200, f
                    target = tmp_path / f["name"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(await response.read())
    finally:
        # The synthetic call is bounded (25 s) but no longer needed: the recording is stored.
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        for node in running:
            await node.stop()

    names = {f["name"] for f in recording["files"]}
    assert {"speaker-view.mp4", "manifest.json"} <= names
    assert {"segment-2/speaker-view.mp4", "segment-2/manifest.json"} <= names
    one = json.loads((tmp_path / "manifest.json").read_text())
    two = json.loads((tmp_path / "segment-2" / "manifest.json").read_text())
    assert one["recording_id"] == two["recording_id"] == started["id"]
    assert two["segment"] == 2 and two["recording_started_at"] == started["started_at"]
    # The gap runs from the end of segment 1's last frame to segment 2's first frame.
    last = one["started_at"] + max(t["start_offset"] + t["duration"] for t in one["tracks"])
    first_frame = two["started_at"] + min(t["start_offset"] for t in two["tracks"])
    gap = two["gap"]
    assert gap["after_segment"] == 1
    assert abs(gap["from"] - last) < 0.01 and abs(gap["to"] - first_frame) < 0.01
    assert 0 < gap["duration"] < 15, gap
    # Both people's audio and video in each segment, and every file plays.
    for manifest, folder in ((one, tmp_path), (two, tmp_path / "segment-2")):
        assert len({(t["participant_id"], t["kind"]) for t in manifest["tracks"]}) == 4, manifest["tracks"]
        for track in manifest["tracks"]:
            stream = probe(folder / track["file"])["streams"][0]
            assert stream["codec_name"] == ("vp8" if track["kind"] == "video" else "opus")
            assert int(stream["nb_read_frames"]) == track["frames"] > 0
        composite = probe(folder / "speaker-view.mp4")
        assert {s["codec_type"] for s in composite["streams"]} == {"video", "audio"}
        assert float(composite["format"]["duration"]) > SEGMENT - 0.5


async def test_a_recording_stopped_before_the_restart_does_not_come_back() -> None:
    settings = Settings(
        host=HOST, port=0, stun_port=0, media_port=0, recordings_dir=tempfile.mkdtemp("-recordings")
    )
    first, base = await _node(settings)
    running = [first]
    try:
        async with aiohttp.ClientSession() as http:
            host = Client(await http.ws_connect(base + "/ws"))
            await host.join(ROOM, "Host")
            await host.send({"type": "start_recording", "id": "r1", "outputs": ["tracks"]})
            started = (await host.expect("recording"))["recording"]
            await host.expect("resume_token")
            await host.send({"type": "stop_recording", "id": "r2"})
            assert (await host.expect("recording"))["recording"]["state"] == "processing"
            # The token that says nothing is recorded any more replaces the one that named the recording.
            token = (await host.expect("resume_token"))["token"]

            running.remove(first)
            await first.stop()
            await host.ws.close()
            second, base = await _node(replace(settings, port=int(base.rsplit(":", 1)[1])))
            running.append(second)
            host = Client(await http.ws_connect(base + "/ws"))
            await host.send({"type": "join", "id": 2, "room": ROOM, "resume": token})
            back = await host.expect("joined")
            assert back["restored"] is True and back["recording"] is None
            assert second.recordings.running(ROOM) is None
            recordings = await _stored(http, base)
            assert [(r["id"], r["segments"]) for r in recordings] == [(started["id"], 1)]
    finally:
        for node in running:
            await node.stop()
