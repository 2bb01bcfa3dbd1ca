"""The SFU under bad input, vanishing participants and churn: it drops and counts, and nobody else notices."""

from __future__ import annotations

import asyncio
import gc
import os
import socket

import pytest

from huddle.node import Node
from huddle.rtc import ice
from huddle.stun import message as stun

from .conftest import until
from .sfu_client import SfuClient


def dropped(node: Node, reason: str) -> float:
    value = node.metrics.registry.get_sample_value("huddle_media_dropped_total", {"reason": reason})
    return value or 0.0


async def _pair(node: Node, room: str) -> tuple[SfuClient, SfuClient]:
    a, b = SfuClient(node.base_url, room, "A"), SfuClient(node.base_url, room, "B")
    await a.join()
    await b.join()
    await until(lambda: a.video_frames[b.id] >= 10 and b.video_frames[a.id] >= 10, 20, "the call to run")
    return a, b


async def _inject(client: SfuClient, data: bytes) -> None:
    """Send raw bytes to the SFU from the client's own validated address (its nominated ICE pair)."""
    connection = client.publish.getTransceivers()[0].sender.transport.transport._connection
    await connection.send(data)


async def test_garbage_on_the_media_port_is_dropped_and_counted_and_the_call_goes_on(node: Node) -> None:
    a, b = await _pair(node, "garbage")
    try:
        before = b.video_frames[a.id]
        # From a participant's own address, past ICE: broken SRTP, SRTCP, DTLS and unknown protocols.
        rtp_like = bytes([0x80, 0x60, 0x12, 0x34]) + os.urandom(8) + os.urandom(100) + os.urandom(16)
        for data in (
            rtp_like,  # authentication tag does not verify
            bytes([0x80, 0x60, 0x00]),  # truncated RTP
            bytes([0x80, 0xC8, 0x00, 0x06]) + os.urandom(30),  # SRTCP that does not verify
            bytes([0x81, 0xC9]),  # truncated RTCP
            bytes([0x17, 0xFE, 0xFD]) + os.urandom(40),  # DTLS record of garbage
            bytes([0x45]) + os.urandom(50),  # no protocol at all (RFC 7983 gap)
        ):
            for _ in range(20):
                await _inject(a, data)
        # From elsewhere: random bytes, STUN for nobody, STUN for a real transport with a forged integrity.
        peer = node.calls.get("garbage").router.peers[a.id]
        tid = os.urandom(12)
        forged = stun.StunMessage(stun.BINDING, stun.MessageClass.REQUEST, tid)
        forged.add(stun.USERNAME, f"{peer.publish.ice.ufrag}:{peer.publish.ice.remote_ufrag}".encode())
        forged.add(stun.ICE_CONTROLLING, bytes(8))
        nobody = stun.StunMessage(stun.BINDING, stun.MessageClass.REQUEST, tid)
        nobody.add(stun.USERNAME, b"nobody:atall")
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for data in (
            b"\x55" + os.urandom(300),  # no protocol, from an address that never passed ICE
            b"",
            stun.encode(forged, integrity_key=b"not the password", fingerprint=True),
            stun.encode(nobody, integrity_key=b"x", fingerprint=True),
            b"\x00\x01\x00\x00" + b"\x21\x12\xa4\x42",  # truncated STUN
        ):
            sock.sendto(data, (node.settings.host, node.ports.media))
        sock.close()
        await asyncio.sleep(1.0)

        for reason in (
            "srtp_auth",
            "srtcp_auth",
            "unknown_protocol",
            "unknown_source",
            "unknown_username",
            "bad_integrity",
            "empty",
        ):
            assert dropped(node, reason) >= 1, reason
        assert dropped(node, "internal_error") == 0
        # The call was not disturbed: video keeps decoding both ways, nobody left.
        await until(lambda: b.video_frames[a.id] >= before + 30, 10, "video to keep flowing from A to B")
        mid = a.video_frames[b.id]
        await until(lambda: a.video_frames[b.id] >= mid + 30, 10, "video to keep flowing from B to A")
        assert len(node.calls.get("garbage")) == 2
    finally:
        await a.close()
        await b.close()


async def test_a_participant_whose_media_vanishes_is_removed(node: Node, monkeypatch) -> None:
    # 30 s of silence is the real rule (RFC 7675); the test shortens the wait, not the logic, but keeps
    # it above the 5 s (±20 %) between the consent checks that the live participant keeps sending.
    monkeypatch.setattr(ice, "CONSENT_TIMEOUT", 8.0)
    a, b = await _pair(node, "vanish")
    try:
        # B's media stops without a word: no leave, its signaling socket stays open.
        await b.publish.close()
        await b.subscribe.close()
        await until(
            lambda: any(m["type"] == "participant_left" and m["reason"] == "timeout" for m in a.messages),
            15,
            "A to see B removed",
        )
        assert len(node.calls.get("vanish")) == 1
        # A still publishes into the room on its own, as the only one left.
        assert node.calls.get("vanish").router.stats()["consumers"] == 0
    finally:
        await a.close()
        await b.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.timeout(120)
async def test_churn_leaves_nothing_behind(node: Node) -> None:
    steady = SfuClient(node.base_url, "churn", "Steady")
    await steady.join()

    async def cycle(i: int) -> None:
        guest = SfuClient(node.base_url, "churn", f"Guest {i}")
        await guest.join()
        await until(
            lambda: steady.video_frames[guest.id] >= 3 and guest.video_frames[steady.id] >= 3,
            20,
            f"guest {i} and the steady participant to see each other",
        )
        await guest.leave()
        await guest.close()

    async def counts() -> dict[str, int]:
        await asyncio.sleep(0.5)
        gc.collect()
        sfu = node.sfu.sfu_totals()
        port = node.media.counts()
        return {
            "transports": port["transports"],
            "addresses": port["addresses"],
            "tcp": port["tcp_connections"],
            "producers": sfu["producers"],
            "consumers": sfu["consumers"],
            "tasks": len(asyncio.all_tasks()),
            "fds": _open_fds(),
        }

    try:
        await cycle(0)  # warm up: first-use allocations (codecs, thread pools) are not leaks
        baseline = await counts()
        for i in range(1, 21):
            await cycle(i)
        after = await counts()
        assert after == baseline
        assert baseline["producers"] == 2 and baseline["consumers"] == 0
    finally:
        await steady.close()
