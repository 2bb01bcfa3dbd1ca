"""The Janus harness of the benchmark, end to end: aiortc publisher → Janus VideoRoom → aiortc subscriber.

Run inside the tests' namespace (Janus's ICE is pinned to hx0 = 10.77.0.1):
    scripts/in-netns .venv/bin/pytest tests/bench -q
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, VideoStreamTrack

from bench.janus.harness import JanusClient, JanusServer, JanusStartError, VideoRoomHandle


def peer() -> RTCPeerConnection:
    # No ICE servers: aiortc would otherwise ask a public STUN server. Janus is ICE-lite on 10.77.0.1.
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


class Publisher:
    """aiortc sending its synthetic video (VP8) and audio (Opus) to Janus through one handle."""

    def __init__(self, handle: VideoRoomHandle) -> None:
        self.handle = handle
        self.pc = peer()
        self.pc.addTrack(AudioStreamTrack())
        self.pc.addTrack(VideoStreamTrack())

    async def publish(self, room: int, display: str) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())  # gathers: candidates in the SDP
        answer = await self.handle.publish(room, self.pc.localDescription.sdp, display=display)
        await self.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))


class Subscriber:
    """aiortc receiving from Janus on one PeerConnection; counts decoded frames per (kind, feed)."""

    def __init__(self, handle: VideoRoomHandle) -> None:
        self.handle = handle
        self.pc = peer()
        self.frames: Counter[tuple[str, int]] = Counter()
        self._tasks: list[asyncio.Task[None]] = []
        self.pc.on("track", self._on_track)

    async def answer(self, offer: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        self._keep_bundled()
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        await self.handle.start(self.pc.localDescription.sdp)

    def _keep_bundled(self) -> None:
        # aiortc 1.16 gives the second and later m-sections of a kind that is not the first section's kind
        # (audio, video, audio, video...) a transport of their own that never connects; all of Janus's
        # m-sections are bundled, so put them back on the first one's transport.
        transceivers = self.pc.getTransceivers()
        bundle = transceivers[0].receiver.transport
        for transceiver in transceivers[1:]:
            if transceiver.receiver.transport is not bundle:
                transceiver.receiver.setTransport(bundle)
                transceiver.sender.setTransport(bundle)
                transceiver._bundled = True

    def _on_track(self, track: Any) -> None:
        transceiver = next(t for t in self.pc.getTransceivers() if t.receiver.track is track)
        self._tasks.append(asyncio.create_task(self._count(track, transceiver.mid)))

    async def _count(self, track: Any, mid: str) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()
                feed = next(s["feed_id"] for s in self.handle.streams if s["mid"] == mid)
                self.frames[track.kind, feed] += 1

    async def close(self) -> None:
        await self.pc.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def until(predicate: Any, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def janus() -> AsyncIterator[JanusServer]:
    async with JanusServer() as server:
        yield server
        assert server.log_errors() == []


async def test_aiortc_publisher_to_aiortc_subscriber_through_janus(janus: JanusServer) -> None:
    # Only VideoRoom and the HTTP transport are loaded, in ICE-lite mode (JanusServer checks /janus/info).
    assert set(janus.info["plugins"]) == {"janus.plugin.videoroom"}
    async with JanusClient(janus.url) as client:
        admin = await client.attach()
        room = await admin.create_room(publishers=100)
        alice = Publisher(await client.attach())
        bob = Publisher(await client.attach())
        viewer = Subscriber(await client.attach())
        try:
            await alice.publish(room, "alice")
            await alice.handle.wait_webrtcup()
            # Janus's answer offers its host candidate on the veth only, never loopback.
            answer = alice.pc.remoteDescription.sdp
            assert "10.77.0.1 " in answer and "127.0.0.1" not in answer
            participants = await admin.list_participants(room)
            assert [(p["id"], p["display"], p["publisher"]) for p in participants] == [
                (alice.handle.feed_id, "alice", True)
            ]

            await viewer.answer(await viewer.handle.subscribe(room, [alice.handle.feed_id]))
            await viewer.handle.wait_webrtcup()
            started = asyncio.get_running_loop().time()
            await asyncio.sleep(5)
            seconds = asyncio.get_running_loop().time() - started
            video = viewer.frames["video", alice.handle.feed_id]
            audio = viewer.frames["audio", alice.handle.feed_id]
            print(f"\ndecoded through Janus in {seconds:.1f} s: {video} video frames, {audio} audio frames")
            assert video >= 100 and audio >= 150  # aiortc sends 30 video frames and 50 audio frames a second

            # A layer choice is accepted per video stream (aiortc does not simulcast, so nothing switches).
            await viewer.handle.configure(substream=0, temporal=0)
            await viewer.handle.configure(substream=2)

            # A second publisher, added to the same subscription: Janus renegotiates with a new offer.
            await bob.publish(room, "bob")
            await bob.handle.wait_webrtcup()
            offer = await viewer.handle.update(subscribe=[bob.handle.feed_id])
            assert offer is not None
            await viewer.answer(offer)
            await until(
                lambda: viewer.frames["video", bob.handle.feed_id] >= 30,
                15,
                "the subscriber to decode video from the second publisher",
            )
            before = viewer.frames["video", alice.handle.feed_id]
            await until(
                lambda: viewer.frames["video", alice.handle.feed_id] >= before + 30,
                10,
                "video from the first publisher to keep coming",
            )
            assert {p["display"] for p in await admin.list_participants(room)} == {"alice", "bob"}
            assert janus.cpu_seconds() > 0 and janus.rss_bytes() > 0
        finally:
            await viewer.close()
            await alice.pc.close()
            await bob.pc.close()
        await admin.destroy_room(room)
        assert room not in {r["room"] for r in await admin.list_rooms()}


async def test_keepalives_hold_a_session_past_its_timeout() -> None:
    # The long poll does not count as activity for Janus: without keepalives a session dies, poll or not.
    async with (
        JanusServer(session_timeout=2) as server,
        JanusClient(server.url, keepalive_interval=0.5) as kept,
        JanusClient(server.url, keepalive_interval=60) as forgotten,
    ):
        handles = [await kept.attach(), await forgotten.attach()]
        await asyncio.sleep(6)  # three times the timeout (Janus's watchdog looks every 2 s)
        await handles[0].destroy_room(await handles[0].create_room())
        assert kept.failure is None
        assert isinstance(forgotten.failure, ConnectionError), "the session should have expired"
        # Either the long poll got Janus's `timeout` event, or the poll after it found the session gone: which
        # one comes first depends on where the watchdog's 2-s tick falls.
        assert "timed out" in str(forgotten.failure) or "no such session" in str(forgotten.failure)
        with pytest.raises(ConnectionError):
            await handles[1].create_room()


async def test_a_simulcast_offer_by_rid_is_taken_and_layers_are_chosen_per_subscriber(
    janus: JanusServer,
) -> None:
    # What the load generator sends: three VP8 layers by rid (aiortc's offer, with the rid lines added; aiortc
    # itself sends one layer, so this checks the signaling, not a layer switch).
    async with JanusClient(janus.url) as client:
        admin = await client.attach()
        room = await admin.create_room()
        sender = Publisher(await client.attach())
        viewer = Subscriber(await client.attach())
        try:
            await sender.pc.setLocalDescription(await sender.pc.createOffer())
            offer = sender.pc.localDescription.sdp.rstrip("\r\n") + "\r\n"
            assert offer.rindex("m=video") > offer.rindex(
                "m=audio"
            )  # the lines below go to the video section
            offer += "".join(
                f"{line}\r\n"
                for line in (
                    "a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id",
                    "a=rid:q send",
                    "a=rid:h send",
                    "a=rid:f send",
                    "a=simulcast:send q;h;f",
                )
            )
            answer = await sender.handle.publish(room, offer, display="simulcast")
            assert "a=simulcast:recv q;h;f" in answer
            assert [s.get("simulcast") for s in sender.handle.streams] == [None, True]
            await sender.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
            await sender.handle.wait_webrtcup()

            await viewer.handle.subscribe(room, [{"feed": sender.handle.feed_id, "substream": 1}])
            video = next(s for s in viewer.handle.streams if s["type"] == "video")
            assert video["simulcast"]["substream-target"] == 1
            assert await viewer.handle.configure(substream=0) == {
                "videoroom": "event",
                "room": room,
                "configured": "ok",
            }
        finally:
            await viewer.close()
            await sender.pc.close()
        await admin.destroy_room(room)


async def test_a_startup_failure_says_why() -> None:
    server = JanusServer(
        overrides={"certificates": {"cert_pem": "/nonexistent.pem", "cert_key": "/nonexistent.key"}}
    )
    with pytest.raises(
        JanusStartError, match=r"(?s)exited with status 1.*\[FATAL\].*certificate file"
    ) as failure:
        await server.start()
    assert server.config_dir is not None and str(server.config_dir) in str(failure.value)
    shutil.rmtree(server.config_dir)  # kept by JanusServer for a look after a failed start

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(JanusStartError, match="is in use"):
            await JanusServer(port=taken.getsockname()[1]).start()
