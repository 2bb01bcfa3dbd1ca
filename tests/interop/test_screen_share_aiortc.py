"""A screen share through the SFU, with aiortc on both ends: the sharer publishes microphone, camera and
screen (one layer, named in `sources`); the viewer decodes the camera and the screen as two streams, `<id>`
and `<id>~screen`, gets only what its `video_sizes` shows, loses the screen when sharing stops, and a
recording keeps the screen: a file of its own and the composite's main area."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import av
import numpy as np

from huddle.node import Node

from .conftest import until
from .sfu_client import SCREEN_SIZE, SCREEN_YUV, SfuClient


async def test_a_screen_share_is_its_own_stream_sized_on_its_own_and_gone_when_stopped(node: Node) -> None:
    sharer = SfuClient(node.base_url, "screen", "Sharer", screen=True)
    viewer = SfuClient(node.base_url, "screen", "Viewer")
    try:
        await sharer.join()
        await viewer.join(send=False)
        camera, screen = sharer.id, f"{sharer.id}~screen"
        assert camera is not None
        await until(
            lambda: (
                viewer.video_frames[camera] >= 30
                and viewer.video_frames[screen] >= 30
                and viewer.audio_frames[camera] >= 50
            ),
            20,
            "the viewer to decode the sharer's camera, screen and microphone",
        )
        assert viewer.stream_ids() == {camera, screen}
        assert viewer.frame_sizes[screen] == SCREEN_SIZE
        assert viewer.frame_sizes[camera] == (640, 480)

        # The screen on the stage, the camera not shown: only the screen keeps coming.
        await viewer._send({"type": "video_sizes", "sizes": {screen: [1280, 720]}})
        await asyncio.sleep(0.5)  # what was on its way arrives
        before = dict(viewer.video_frames)
        await asyncio.sleep(2.0)
        assert viewer.video_frames[screen] - before[screen] >= 30
        assert viewer.video_frames[camera] - before[camera] <= 1

        # Sharing stops: the screen leaves the viewer's next offer; the camera, shown again, comes back.
        await viewer._send({"type": "video_sizes", "sizes": {camera: [640, 480], screen: [1280, 720]}})
        await sharer.stop_screen()
        await until(lambda: viewer.stream_ids() == {camera}, 10, "the screen to leave the viewer's offer")
        before = dict(viewer.video_frames)
        await asyncio.sleep(2.0)
        assert viewer.video_frames[camera] - before[camera] >= 30
        assert viewer.video_frames[screen] == before[screen]
        room = node.calls.get("screen")
        assert room is not None and room.router is not None
        assert [p.track_source for p in room.router.peers[camera].producers.values()] == [
            "microphone",
            "camera",
        ]
    finally:
        await sharer.close()
        await viewer.close()


async def test_a_recording_keeps_the_screen_in_a_file_of_its_own_and_on_the_composites_main_area(
    node: Node,
) -> None:
    sharer = SfuClient(node.base_url, "screen-rec", "Sharer", screen=True)
    viewer = SfuClient(node.base_url, "screen-rec", "Viewer")
    try:
        await sharer.join()
        await viewer.join(send=False)
        screen = f"{sharer.id}~screen"
        await until(lambda: viewer.video_frames[screen] >= 10, 20, "the screen to reach the viewer")
        await viewer._send({"type": "start_recording", "outputs": ["composite", "tracks"]})
        await until(lambda: _recording(viewer, "recording"), 10, "the recording to start")
        await asyncio.sleep(4.0)
        await viewer._send({"type": "stop_recording"})
        await until(lambda: _recording(viewer, "processing"), 10, "the recording to stop")
        recording_id = _recording(viewer, "processing")["id"]
        for _ in range(900):  # the files are written, then stored: 90 s at most
            listed = {r["id"]: r["state"] for r in await node.recordings.list("screen-rec")}
            if listed.get(recording_id) == "stored":
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"recording {recording_id} not stored in 90 s: {listed}")
        folder = Path(node.settings.recordings_dir) / "screen-rec" / recording_id
    finally:
        await sharer.close()
        await viewer.close()

    manifest = json.loads((folder / "manifest.json").read_text())
    by_source = {t["source"]: t for t in manifest["tracks"] if t["participant_id"] == sharer.id}
    assert set(by_source) == {"microphone", "camera", "screen"}, manifest["empty_tracks"]
    track = by_source["screen"]
    assert "-screen-1.webm" in track["file"] and (track["width"], track["height"]) == SCREEN_SIZE
    assert track["frames"] >= 30
    assert "-video-1.webm" in by_source["camera"]["file"]
    with av.open(str(folder / track["file"])) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert frames == track["frames"]

    # The composite's last frame: the white screen fills the main area (letterboxed), the sharer's green
    # camera is a tile in the strip below it.
    count, last = 0, None
    with av.open(str(folder / "speaker-view.mp4")) as container:
        for count, last in enumerate(container.decode(video=0), 1):  # noqa: B007 (the last one is kept)
            pass
    assert count >= 60 and last is not None
    y = last.to_ndarray(format="yuv420p")[: last.height]
    assert (
        abs(int(np.median(y[last.height // 3, last.width // 3 : 2 * last.width // 3])) - SCREEN_YUV[0]) < 20
    )
    assert int(np.median(y[last.height - 40, :])) < 100  # the strip: no white there


def _recording(client: SfuClient, state: str) -> dict | None:
    """The latest `recording` state the client heard, if it is `state`."""
    states = [m["recording"] for m in client.messages if m["type"] == "recording"]
    return states[-1] if states and states[-1] and states[-1]["state"] == state else None
