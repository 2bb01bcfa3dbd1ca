"""aiortc participants through Huddle's SFU: ICE-lite, DTLS-SRTP, forwarding, with a second WebRTC stack."""

from __future__ import annotations

from huddle.node import Node

from .conftest import until
from .sfu_client import SfuClient


async def test_three_aiortc_participants_receive_each_other_through_the_sfu(node: Node) -> None:
    clients = [SfuClient(node.base_url, "interop", name) for name in ("A", "B", "C")]
    try:
        for client in clients:
            await client.join()
        for client in clients:
            others = {c.id for c in clients if c is not client}

            def decoding(client=client, others=others) -> bool:
                return all(client.video_frames[o] >= 30 and client.audio_frames[o] >= 50 for o in others)

            await until(decoding, 20, f"{client.name} to decode video and audio from both others")
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
