"""A participant made of aiortc, the second WebRTC stack: speaks Huddle's protocol in SFU mode.

It publishes aiortc's synthetic video (VP8) and audio (Opus) on its `publish` connection, and with
`screen=True` a screen share too (a third track, named in the offer's `sources`), and answers the server's
offers on its `subscribe` connection, counting the frames it decodes per stream id (a participant's id, or
`<participant id>~screen` for its screen).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import defaultdict
from typing import Any

import aiohttp
from aiortc import RTCBundlePolicy, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, VideoStreamTrack
from av import VideoFrame

# The screen share's frames: a size and a colour of their own (white, where aiortc's camera is 640x480 and
# green), so that a test tells them apart wherever they arrive.
SCREEN_SIZE = (640, 360)
SCREEN_YUV = (235, 128, 128)


class ScreenTrack(VideoStreamTrack):
    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = VideoFrame(width=SCREEN_SIZE[0], height=SCREEN_SIZE[1])
        for plane, value in zip(frame.planes, SCREEN_YUV, strict=True):
            plane.update(bytes([value]) * plane.buffer_size)
        frame.pts, frame.time_base = pts, time_base
        return frame


class SfuClient:
    def __init__(self, base_url: str, room: str, name: str, *, screen: bool = False) -> None:
        self.base_url = base_url
        self.room = room
        self.name = name
        self.screen = screen
        self._screen_transceiver: Any = None
        self.id: str | None = None
        # No ICE servers: aiortc would otherwise default to a public STUN server. The SFU is ICE-lite and
        # reachable on its host candidate, which is all a test on this machine needs.
        config = RTCConfiguration(iceServers=[])
        # Max-bundle for what it sends: with aiortc's default policy a second video track (the screen) shares
        # the first one's transport, which setting the BUNDLE answer then stops under it (aiortc 1.16).
        self.publish = RTCPeerConnection(
            RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)
        )
        self.subscribe = RTCPeerConnection(config)
        self.video_frames: dict[str, int] = defaultdict(int)
        self.audio_frames: dict[str, int] = defaultdict(int)
        self.frame_sizes: dict[str, tuple[int, int]] = {}
        self.messages: list[dict[str, Any]] = []
        self._owners: dict[str, str] = {}  # subscribe mid → publishing participant, per the last offer
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._answered = asyncio.Event()
        self._gone = asyncio.Event()
        self.subscribe.on("track", self._on_track)

    async def join(self, *, send: bool = True) -> dict[str, Any]:
        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(f"{self.base_url}/ws")
        await self._send({"type": "join", "room": self.room, "name": self.name})
        joined = json.loads((await self._ws.receive(timeout=10)).data)
        assert joined["type"] == "joined", joined
        self.id = joined["self"]["id"]
        self._tasks.append(asyncio.create_task(self._read()))
        if joined["mode"] == "sfu" and send:
            await self.start_publishing()
        return joined

    async def start_publishing(self) -> None:
        self.publish.addTrack(AudioStreamTrack())
        self.publish.addTrack(VideoStreamTrack())
        if self.screen:
            sender = self.publish.addTrack(ScreenTrack())
            self._screen_transceiver = next(t for t in self.publish.getTransceivers() if t.sender is sender)
        await self._publish_offer()

    async def stop_screen(self) -> None:
        """Stop sharing as a browser does: the screen's section goes inactive in the next publish offer."""
        self._screen_transceiver.direction = "inactive"
        self.screen = False
        await self._publish_offer()

    async def _publish_offer(self) -> None:
        self._answered.clear()
        await self.publish.setLocalDescription(await self.publish.createOffer())
        message = {"type": "sfu_offer", "pc": "publish", "sdp": self.publish.localDescription.sdp}
        if self.screen:
            message["sources"] = {self._screen_transceiver.mid: "screen"}
        await self._send(message)
        await asyncio.wait_for(self._answered.wait(), 10)

    def stream_ids(self) -> set[str]:
        """The stream ids of the tracks the server's latest subscribe offer sends this client."""
        return set(self._owners.values())

    async def _send(self, message: dict[str, Any]) -> None:
        assert self._ws is not None
        await self._ws.send_str(json.dumps(message))

    async def _read(self) -> None:
        try:
            await self._dispatch()
        finally:
            self._gone.set()

    async def _dispatch(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            message = json.loads(msg.data)
            self.messages.append(message)
            if message["type"] == "sfu_answer":
                await self.publish.setRemoteDescription(RTCSessionDescription(message["sdp"], "answer"))
                self._answered.set()
            elif message["type"] == "sfu_offer" and self.subscribe.connectionState != "closed":
                self._owners = _stream_ids_by_mid(message["sdp"])
                await self.subscribe.setRemoteDescription(RTCSessionDescription(message["sdp"], "offer"))
                self._fix_bundle()
                await self.subscribe.setLocalDescription(await self.subscribe.createAnswer())
                await self._send(
                    {
                        "type": "sfu_answer",
                        "pc": "subscribe",
                        "revision": message["revision"],
                        "sdp": self.subscribe.localDescription.sdp,
                    }
                )
            elif message["type"] == "mode" and message["mode"] == "sfu":
                await self.start_publishing()

    def _fix_bundle(self) -> None:
        """Work around an aiortc 1.16 bug, not ours: answering one offer that brings several new m-sections of
        the kind that is not the first section's (audio, video, audio, video...), aiortc leaves the second and
        later ones of that kind on a transport of their own that never gathers (port 9), so their tracks
        are never received. (Reproduced with aiortc on both sides, no Huddle involved.) Put them back on
        the BUNDLE transport, where they belong."""
        transceivers = self.subscribe.getTransceivers()
        primary = transceivers[0].receiver.transport
        for transceiver in transceivers[1:]:
            if transceiver.receiver.transport is not primary:
                transceiver.receiver.setTransport(primary)
                transceiver.sender.setTransport(primary)
                transceiver._bundled = True

    def _on_track(self, track: Any) -> None:
        transceiver = next(t for t in self.subscribe.getTransceivers() if t.receiver.track is track)
        self._tasks.append(asyncio.create_task(self._count(track, transceiver)))

    async def _count(self, track: Any, transceiver: Any) -> None:
        # Whose frames these are is read per frame: when the SFU reuses an m-section for another
        # participant, aiortc keeps the same track object (Chromium fires a new track event instead).
        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while True:
                frame = await track.recv()
                stream_id = self._owners.get(transceiver.mid, "?")
                if track.kind == "video":
                    self.video_frames[stream_id] += 1
                    self.frame_sizes[stream_id] = (frame.width, frame.height)
                else:
                    self.audio_frames[stream_id] += 1

    async def leave(self) -> None:
        await self._send({"type": "leave"})
        await asyncio.wait_for(self._gone.wait(), 10)  # the server closes the socket after `leave`

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.publish.close()
        await self.subscribe.close()
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()


def _stream_ids_by_mid(text: str) -> dict[str, str]:
    """mid → the stream id in its a=msid (the SFU puts the publisher's participant id there), per sending
    section."""
    owners: dict[str, str] = {}
    for section in text.split("\r\nm=")[1:]:
        lines = section.split("\r\n")
        mid = next((line[6:] for line in lines if line.startswith("a=mid:")), None)
        msid = next((line[7:].split()[0] for line in lines if line.startswith("a=msid:")), None)
        if mid is not None and msid is not None and "a=sendonly" in lines:
            owners[mid] = msid
    return owners
