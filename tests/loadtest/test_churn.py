"""Churn in the load generator: people leave (hanging up, or vanishing as a closed tab) and newcomers take
their seats while the call goes on; what the departed received still counts, and nobody keeps streams of
publishers who left.

Runs inside the tests' network namespace (scripts/in-netns), against a node on loopback.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from huddle.config import Settings
from huddle.loadtest.connection import ReceivePoller
from huddle.loadtest.media import build_library
from huddle.loadtest.pacer import Pacer
from huddle.loadtest.participant import Shared
from huddle.loadtest.run import Crowd, LoadtestConfig, format_summary, run_loadtest
from huddle.loadtest.sender import ExtensionIds, RtpStream, now_us
from huddle.loadtest.stats import Receiver
from huddle.node import Node
from huddle.rtc.certificate import Certificate

HOST = "127.0.0.1"
GRACE = 30.0


def test_what_arrives_while_leaving_is_not_loss_and_departed_streams_are_retired_with_their_figures():
    receiver = Receiver()
    ids = ExtensionIds(mid=4, rid=10, abs_send_time=2, transport_cc=3, audio_level=1)
    senders = {ssrc: RtpStream(96, ssrc, "1", "q", ids, "video", 0) for ssrc in (7, 8)}
    for ssrc in senders:
        receiver.stream(ssrc).kind = "video"
    receiver.start_window(1_000_000)
    for n in range(1, 21):
        for ssrc, sender in senders.items():
            packet = sender.build(bytes(50), False, n, 1)
            if not (ssrc == 8 and n == 10):  # one packet of stream 8 lost
                receiver.on_rtp(packet, 1_000_000 + n * 30_000)
    # Leaving: the window closes, and what is still in flight arrives before the sockets close.
    receiver.stop_window(1_700_000)
    for n in range(21, 31):
        receiver.on_rtp(senders[7].build(bytes(50), False, n, 1), 1_700_000 + n * 1000)
    assert (receiver.streams[7].received, receiver.streams[7].lost) == (20, 0)
    assert (receiver.streams[8].received, receiver.streams[8].lost) == (19, 1)
    # Stream 8's publisher left: the new offer has only 7. Its figures stay in the totals.
    receiver.retire({7})
    assert list(receiver.streams) == [7]
    assert (receiver.retired.packets, receiver.retired.lost) == (19, 1)
    result = receiver.results("p_me", 0, 0)
    assert (result.packets, result.lost) == (39, 1) and len(result.streams) == 1


async def _node(grace: float) -> Node:
    node = Node(
        Settings(
            host=HOST,
            port=0,
            stun_port=0,
            media_port=0,
            sfu_always=True,
            reconnect_grace=grace,
            recordings_dir=tempfile.mkdtemp("-recordings"),
        )
    )
    node.ports = await node.start()
    node.base_url = f"http://{HOST}:{node.ports.http}"
    return node


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    node = await _node(0)
    yield node
    await node.stop()


@pytest.fixture
async def patient_node() -> AsyncIterator[Node]:
    """A node that holds a vanished participant's seat for a reconnect."""
    node = await _node(GRACE)
    yield node
    await node.stop()


async def _metric(node: Node, name: str) -> float:
    def read() -> str:
        with urllib.request.urlopen(f"{node.base_url}/metrics", timeout=5) as response:
            return response.read().decode()

    match = re.search(rf"^{name} (\S+)$", await asyncio.to_thread(read), re.M)
    assert match, name
    return float(match.group(1))


async def _until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


async def test_churn_replaces_people_newcomers_get_the_call_and_the_server_lets_everyone_go(node: Node):
    config = LoadtestConfig(
        url=node.base_url, room="churn", participants=5, publishers=3, duration=6, warmup=1, churn=0.8
    )
    result = await run_loadtest(config)
    summary = format_summary(result)
    assert result.complete and not result.errors, summary
    # About one departure per 0.8 s from the warm-up on; every third vanished; each seat was taken again.
    assert result.leaves >= 6 and result.joins == result.leaves and result.join_failures == 0, summary
    assert result.vanished == result.leaves // 3, summary
    assert "churn" in summary and f"{result.leaves} left ({result.vanished} vanished)" in summary
    newcomers = [s for s in result.subscribers if s.index >= config.participants]
    assert len(newcomers) == result.joins, summary
    # Newcomers see and hear the call (all but the last few, who may have come in at the very end).
    early = sorted(newcomers, key=lambda s: s.index)[:-3]
    assert early and all(s.packets > 0 and s.audio_received > 0 for s in early), summary
    # What the departed received counts: more than the five still here received.
    assert result.packets_received > sum(s.packets for s in result.subscribers[-5:]), summary
    assert result.lost == 0 and result.loss_percent == 0.0, summary
    # Hung up or vanished, nobody is left behind on the server.
    for name in ("huddle_participants", "huddle_sfu_transports", "huddle_sfu_producers"):
        for _ in range(40):
            if await _metric(node, name) == 0:
                break
            await asyncio.sleep(0.1)
        assert await _metric(node, name) == 0, name


async def test_a_vanished_participant_keeps_its_seat_a_hung_up_one_does_not_and_the_departed_are_forgotten(
    patient_node: Node,
):
    node = patient_node
    library = await asyncio.to_thread(build_library)
    async with aiohttp.ClientSession() as http:
        shared = Shared(
            url=node.base_url,
            room="seats",
            certificate=Certificate.generate(),
            library=library,
            pacer=Pacer(),
            http=http,
            poller=ReceivePoller(),
        )
        crowd = Crowd(shared, participants=3, publishers=3)
        crowd.start()
        try:
            for person in crowd.people:
                await person.join()
            assert await _until(lambda: all(p.connected for p in crowd.people), 15)
            crowd.open_window(now_us())
            listener = crowd.people[0]
            assert await _until(lambda: len(listener.receiver.streams) == 4, 5)  # 2 others: audio + video
            await asyncio.sleep(1.0)
            assert await _metric(node, "huddle_participants") == 3

            departed = crowd.people[1]
            await crowd.replace(1, vanish=False, timeout=15)
            assert crowd.people[1] is not departed and crowd.people[1].connected
            assert crowd.gone == [departed] and departed.closed
            # Hung up: the seat is free at once.
            assert await _metric(node, "huddle_participants") == 3
            # The listener received from the departed; those figures stay, the streams go.
            assert await _until(lambda: departed.id not in {t.publisher for t in listener.tracks.values()}, 5)
            assert await _until(lambda: len(listener.receiver.streams) == 4, 5)
            assert set(listener.receiver.streams) == set(listener.tracks)
            assert listener.receiver.retired.packets > 0
            packets, lost, _ = crowd.received()
            assert packets > listener.receiver.retired.packets and lost == 0

            ghost = crowd.people[2]
            await crowd.replace(2, vanish=True, timeout=15)
            assert crowd.people[2].connected and ghost.closed
            # Vanished: no `leave`, so the server holds the seat for the reconnect grace.
            await asyncio.sleep(1.0)
            assert await _metric(node, "huddle_participants") == 4
            assert ghost.id in {t.publisher for t in listener.tracks.values()}
            assert (crowd.joins, crowd.leaves, crowd.vanished, crowd.join_failures) == (2, 2, 1, 0)
        finally:
            await crowd.stop()
    assert all(p.closed for p in crowd.everyone)
