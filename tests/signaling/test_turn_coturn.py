"""coturn's own test client against our relay (DESIGN.md, "TURN tools"): `turnutils_uclient` with time-limited
REST credentials (-W), over UDP and TCP, relaying through channels to `turnutils_peer`; and the same client
with a wrong secret fails. Runs inside `scripts/in-netns`, everything on 127.0.0.1, which the node is told
to allow as a peer (--turn-allow-peer 127.0.0.0/8)."""

from __future__ import annotations

import asyncio
import shutil
import socket
from collections.abc import AsyncIterator

import pytest

from huddle.config import Settings
from huddle.node import Node, Ports
from tests.signaling.conftest import start

UCLIENT = shutil.which("turnutils_uclient")
PEER = shutil.which("turnutils_peer")
SECRET = "coturn-interop-secret"
MESSAGES = 20
CLIENT_TIMEOUT = 60.0

pytestmark = pytest.mark.skipif(UCLIENT is None or PEER is None, reason="Debian coturn is not installed")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
async def node() -> AsyncIterator[tuple[Node, Ports]]:
    node, ports = await start(Settings(turn_allow_peer="127.0.0.0/8", turn_secret=SECRET))
    try:
        yield node, ports
    finally:
        await node.stop()


@pytest.fixture
async def peer_port() -> AsyncIterator[int]:
    assert PEER is not None
    port = free_udp_port()
    process = await asyncio.create_subprocess_exec(
        PEER,
        "-L",
        "127.0.0.1",
        "-p",
        str(port),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await asyncio.sleep(0.2)  # it binds at once; give it the moment to get there
        assert process.returncode is None
        yield port
    finally:
        process.terminate()
        await process.wait()


async def uclient(stun_port: int, peer_port: int, secret: str, *flags: str) -> tuple[int, str]:
    assert UCLIENT is not None
    # -c: no RTCP companion allocation. That one asks for an even port with the next one reserved
    # (EVEN-PORT with R); the relay keeps no reservations and refuses it with 508, as RFC 8656 allows.
    process = await asyncio.create_subprocess_exec(
        UCLIENT,
        "-c",
        *flags,
        "-n",
        str(MESSAGES),
        "-u",
        "coturn-user",
        "-W",
        secret,
        "-p",
        str(stun_port),
        "-e",
        "127.0.0.1",
        "-r",
        str(peer_port),
        "127.0.0.1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), CLIENT_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


@pytest.mark.parametrize(
    "flags", [(), ("-t",), ("-s",), ("-t", "-s")], ids=["udp", "tcp", "udp-send", "tcp-send"]
)
async def test_coturn_client_relays_through_us(
    node: tuple[Node, Ports], peer_port: int, flags: tuple[str, ...]
) -> None:
    the_node, ports = node
    code, output = await uclient(ports.stun, peer_port, SECRET, *flags)
    assert code == 0, output[-2000:]
    assert "Total lost packets 0" in output, output[-2000:]
    registry = the_node.metrics.registry
    assert (registry.get_sample_value("huddle_turn_packets_total", {"direction": "to_peer"}) or 0) >= MESSAGES
    assert (
        registry.get_sample_value("huddle_turn_packets_total", {"direction": "to_client"}) or 0
    ) >= MESSAGES


@pytest.mark.parametrize("flags", [(), ("-t",)], ids=["udp", "tcp"])
async def test_coturn_client_with_a_wrong_secret_fails(
    node: tuple[Node, Ports], peer_port: int, flags: tuple[str, ...]
) -> None:
    the_node, ports = node
    code, output = await uclient(ports.stun, peer_port, "not-" + SECRET, *flags)
    assert code != 0, output[-2000:]
    registry = the_node.metrics.registry
    assert (registry.get_sample_value("huddle_turn_errors_total", {"code": "401"}) or 0) > 0
    assert (registry.get_sample_value("huddle_turn_allocations") or 0) == 0
    assert (registry.get_sample_value("huddle_turn_packets_total", {"direction": "to_peer"}) or 0) == 0
