"""aiortc participants through Huddle's SFU: ICE-lite, DTLS-SRTP, forwarding, with a second WebRTC stack."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from huddle.config import Settings
from huddle.node import Node

from .sfu_client import SfuClient

# The namespace's veth address (scripts/in-netns): aiortc gathers no loopback candidates.
ADDRESS = "10.77.0.1"


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    node = Node(Settings(host=ADDRESS, port=0, stun_port=0, media_port=0, sfu_always=True, reconnect_grace=0))
    node.ports = await node.start()
    yield node
    await node.stop()


async def _until(predicate, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_three_aiortc_participants_receive_each_other_through_the_sfu(node: Node) -> None:
    base = f"http://{ADDRESS}:{node.ports.http}"
    clients = [SfuClient(base, "interop", name) for name in ("A", "B", "C")]
    try:
        for client in clients:
            await client.join()
        for client in clients:
            others = {c.id for c in clients if c is not client}

            def decoding(client=client, others=others) -> bool:
                return all(client.video_frames[o] >= 30 and client.audio_frames[o] >= 50 for o in others)

            await _until(decoding, 20, f"{client.name} to decode video and audio from both others")
        stats = node.calls.get("interop").router.stats()
        assert stats["producers"] == 6 and stats["consumers"] == 12
        # Both connections of every client end at the SFU's one media port (aioice keeps the pair private).
        for client in clients:
            for pc in (client.publish, client.subscribe):
                nominated = pc.getTransceivers()[0].receiver.transport.transport._connection._nominated
                assert [pair.remote_candidate.port for pair in nominated.values()] == [node.ports.media]
    finally:
        for client in clients:
            await client.close()
