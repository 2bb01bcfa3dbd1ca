"""Pipe ports over real UDP sockets on 127.0.0.1: sealed datagrams both ways, and everything else dropped and
counted without disturbing the good flow.

Run as `scripts/in-netns .venv/bin/pytest tests/unit/test_pipe_port.py`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from huddle.rtc.pipe import VERSION, Opener, Sealer, new_link_id
from huddle.rtc.pipe_port import PipePort

CLUSTER_KEY = b"the cluster's resume secret"
TIMEOUT = 5.0  # an upper bound only: each wait ends as soon as what it waits for happens


class Node:
    """A pipe port and the drops it counted, as a node's metrics would see them."""

    def __init__(self) -> None:
        self.drops: Counter[str] = Counter()
        self.port = PipePort(self.count_drop)

    def count_drop(self, reason: str) -> None:
        self.drops[reason] += 1


async def wait_until(condition: Callable[[], bool]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while not condition():
        assert loop.time() < deadline, "what the test waited for never happened"
        await asyncio.sleep(0.001)


@pytest.fixture
async def nodes() -> AsyncIterator[tuple[Node, Node]]:
    a, b = Node(), Node()
    await a.port.start("127.0.0.1", 0)
    await b.port.start("127.0.0.1", 0)
    yield a, b
    a.port.close()
    b.port.close()


@pytest.fixture
def stranger() -> Iterator[socket.socket]:
    """Another process on the network: not a registered peer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


def pipe(sender: Node, receiver: Node, *, peer: bool = True) -> tuple[Sealer, list[bytes]]:
    """One direction of a link: the sender's Sealer, and the payloads the receiver's handler got."""
    link_id = new_link_id()
    received: list[bytes] = []
    receiver.port.add_link(
        Opener(CLUSTER_KEY, link_id), received.append, sender.port.address if peer else None
    )
    return Sealer(CLUSTER_KEY, link_id), received


async def test_sealed_datagrams_flow_both_ways(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    assert a.port.address[0] == "127.0.0.1" and a.port.address[1] != b.port.address[1] > 0
    a_to_b, at_b = pipe(a, b)
    b_to_a, at_a = pipe(b, a)
    payloads = [os.urandom(1200) for _ in range(100)]
    for payload in payloads:
        a.port.send(a_to_b.seal(payload), b.port.address)
        b.port.send(b_to_a.seal(payload[::-1]), a.port.address)
        await asyncio.sleep(0)
    await wait_until(lambda: len(at_b) == len(at_a) == len(payloads))
    assert at_b == payloads
    assert at_a == [p[::-1] for p in payloads]
    assert a.port.counts == b.port.counts == {"in": 100, "out": 100}
    assert not a.drops and not b.drops


async def test_bad_datagrams_are_counted_and_the_good_flow_is_untouched(
    nodes: tuple[Node, Node], stranger: socket.socket
) -> None:
    a, b = nodes
    sealer, received = pipe(a, b)
    forger = Sealer(b"another cluster", sealer.link_id)
    # Counters far ahead of the real ones: the forgeries are refused for their tag, not as replays.
    forger.counter = 1_000_000
    to_b = b.port.address
    good: list[bytes] = []
    sealed: list[bytes] = []
    expected: Counter[str] = Counter()
    bad_kinds = ["short", "version", "unknown_link", "integrity", "replay", "address"]
    for i in range(500):
        good.append(os.urandom(1200))
        sealed.append(sealer.seal(good[-1]))
        a.port.send(sealed[-1], to_b)
        kind = bad_kinds[i % len(bad_kinds)]
        if kind == "short":
            stranger.sendto(os.urandom(i % 33), to_b)
        elif kind == "version":
            stranger.sendto(b"\x80" + os.urandom(1199), to_b)  # RTP on the wrong port
        elif kind == "unknown_link":
            stranger.sendto(bytes([VERSION]) + new_link_id() + os.urandom(1100), to_b)
        elif kind == "integrity":
            a.port.send(forger.seal(os.urandom(1200)), to_b)
        elif kind == "replay":
            a.port.send(sealed[-2], to_b)  # captured and sent again from the real peer's address
        else:
            stranger.sendto(sealed[-1], to_b)  # a captured datagram, sent from elsewhere
        expected["pipe_" + kind] += 1
        if i % 25 == 24:
            # Paced, so that the receive buffer (capped at net.core.rmem_max) never overflows.
            await wait_until(lambda n=i: b.port.counts["in"] == 2 * (n + 1))
    await wait_until(lambda: b.port.counts["in"] == 1000)
    assert received == good
    assert b.drops == expected
    assert sum(expected.values()) == 500


async def test_a_handler_that_raises_does_not_stop_the_port(
    nodes: tuple[Node, Node], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = nodes
    link_id = new_link_id()
    sealer = Sealer(CLUSTER_KEY, link_id)
    delivered: list[int] = []

    def handler(payload: bytes) -> None:
        number = int(payload)
        if number % 3 == 0:
            raise ValueError(number)
        if number % 3 == 1:
            raise KeyError(number)
        delivered.append(number)

    b.port.add_link(Opener(CLUSTER_KEY, link_id), handler, a.port.address)
    with caplog.at_level(logging.ERROR, logger="huddle.rtc"):
        for number in range(90):
            a.port.send(sealer.seal(b"%d" % number), b.port.address)
            await asyncio.sleep(0)
        await wait_until(lambda: b.port.counts["in"] == 90)
    assert delivered == list(range(2, 90, 3))
    assert b.drops == {"pipe_handler": 60}
    # Once per kind of failure, with its traceback: not once per datagram.
    failures = [r for r in caplog.records if r.getMessage().startswith("pipe datagram handler failed")]
    assert sorted(r.exc_info[0].__name__ for r in failures if r.exc_info) == ["KeyError", "ValueError"]
    assert len(failures) == 2


async def test_a_removed_link_is_unknown(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    sealer, received = pipe(a, b)
    a.port.send(sealer.seal(b"before"), b.port.address)
    await wait_until(lambda: received == [b"before"])
    b.port.remove_link(sealer.link_id)
    a.port.send(sealer.seal(b"after"), b.port.address)
    await wait_until(lambda: b.port.counts["in"] == 2)
    assert received == [b"before"]
    assert b.drops == {"pipe_unknown_link": 1}


async def test_without_a_peer_any_address_is_accepted(
    nodes: tuple[Node, Node], stranger: socket.socket
) -> None:
    a, b = nodes
    sealer, received = pipe(a, b, peer=False)
    stranger.sendto(sealer.seal(b"from a node that moved"), b.port.address)
    await wait_until(lambda: received == [b"from a node that moved"])
    assert not b.drops


async def test_send_errors_are_counted_not_raised(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    a.port.send(bytes(70_000), b.port.address)  # larger than any UDP datagram: EMSGSIZE
    assert a.drops == {"pipe_send": 1}
    assert a.port.counts["out"] == 0
    a.port.close()
    a.port.send(b"after close", b.port.address)
    assert a.drops == {"pipe_send": 2}


async def test_a_handler_may_close_the_port(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    link_id = new_link_id()
    sealer = Sealer(CLUSTER_KEY, link_id)
    got: list[bytes] = []

    def close_on_first(payload: bytes) -> None:
        got.append(payload)
        b.port.close()

    b.port.add_link(Opener(CLUSTER_KEY, link_id), close_on_first, a.port.address)
    for _ in range(10):  # several in one batch: the rest must not be read from the closed socket
        a.port.send(sealer.seal(b"x"), b.port.address)
    await wait_until(lambda: bool(got))
    await asyncio.sleep(0.05)
    assert got == [b"x"]
    assert not b.drops


async def test_peers_must_be_numeric_addresses(nodes: tuple[Node, Node]) -> None:
    _, b = nodes
    with pytest.raises(ValueError):
        b.port.add_link(Opener(CLUSTER_KEY, new_link_id()), lambda payload: None, ("localhost", 4000))
