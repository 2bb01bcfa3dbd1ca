"""Connections that try to take a node's descriptors or time (idle floods, slowloris), and the figures in
/metrics that show a node's resources."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Harness

HUDDLE = str(Path(sys.executable).parent / "huddle")
SOFT_LIMIT = 1024  # the usual default soft limit on open files
FLOOD = 1100  # idle connections from one address: more than the soft limit allows
SPREAD = [f"127.0.0.{i}" for i in range(3, 9)]  # six more addresses, each within its share...
PER_SPREAD_ADDRESS = 199  # ...but 1,194 connections together: more than the soft limit too
CAP = 200  # the default --max-connections-per-address


class Server:
    def __init__(self, process: asyncio.subprocess.Process, ports: dict[str, int]) -> None:
        self.process, self.ports = process, ports
        self.url = f"http://127.0.0.1:{ports['http']}"


@contextlib.asynccontextmanager
async def huddle_serve(*args: str) -> AsyncIterator[Server]:
    """`huddle serve` as an operator starts it, under a soft open-files limit of 1,024."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard > 4 * SOFT_LIMIT, (
        f"this test needs a hard open-files limit above {4 * SOFT_LIMIT}, not {hard}"
    )
    stderr = tempfile.TemporaryFile()
    process = await asyncio.create_subprocess_exec(
        HUDDLE,
        "serve",
        *("--host", "127.0.0.1", "--port", "0", "--stun-port", "0", "--media-port", "0"),
        *("--recordings-dir", tempfile.mkdtemp("-recordings"), *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT_LIMIT, hard)),
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        assert line, f"huddle serve exited: {_tail(stderr)}"
        ready = json.loads(line)
        assert ready["event"] == "ready"
        yield Server(process, ready)
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()
        stderr.close()


def _tail(file) -> str:
    file.seek(0)
    return file.read()[-2000:].decode(errors="replace")


@contextlib.contextmanager
def open_files(count: int) -> Iterator[None]:
    """Room for `count` more descriptors in this process (the client side of the flood)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, soft + count)
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def connect_many(port: int, source: str, count: int, sockets: list[socket.socket]) -> int:
    """Open `count` idle connections from `source`; returns how many could not even connect."""
    failed = 0
    deadline = time.monotonic() + 60
    for _ in range(count):
        if time.monotonic() > deadline:
            return failed + count
        try:
            sockets.append(
                socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
            )
        except OSError:
            failed += 1
    return failed


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.1)


def closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def metric(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or labels.items() <= sample.labels.items()):
                return sample.value
    return None


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open files limit in /proc")


@pytest.mark.timeout(150)
async def test_an_idle_flood_from_one_address_leaves_the_node_to_everyone_else() -> None:
    sockets: list[socket.socket] = []
    with open_files(FLOOD + len(SPREAD) * PER_SPREAD_ADDRESS + 64):
        try:
            async with huddle_serve() as server:
                pid, port = server.process.pid, server.ports["http"]
                # The node took the hard limit: 1,024 is a few hundred participants.
                soft, hard = open_files_limit(pid)
                assert soft == hard > SOFT_LIMIT

                flood_failed = await asyncio.to_thread(connect_many, port, "127.0.0.1", FLOOD, sockets)
                flood = sockets[:]
                # One address got its share and no more: the rest are closed at once.
                await until(
                    lambda: sum(closed_by_server(s) for s in flood) >= FLOOD - CAP,
                    30,
                    f"the server to close the {FLOOD - CAP} connections over the cap",
                )
                spread_failed = 0
                for source in SPREAD:
                    spread_failed += await asyncio.to_thread(
                        connect_many, port, source, PER_SPREAD_ADDRESS, sockets
                    )
                assert flood_failed == spread_failed == 0
                # The other addresses' connections are all kept, beyond the soft limit the node started with.
                held = len(SPREAD) * PER_SPREAD_ADDRESS
                await until(lambda: open_fds(pid) > held, 30, f"the server to hold {held} connections")

                connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
                timeout = aiohttp.ClientTimeout(total=5)
                async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
                    async with http.get(server.url + "/healthz") as reply:
                        assert reply.status == 200
                    async with http.ws_connect(server.url + "/ws") as ws:
                        await ws.send_json({"type": "join", "id": "j", "room": "standup", "name": "Ada"})
                        joined = await ws.receive_json(timeout=5)
                        assert joined["type"] == "joined", joined
                    async with http.get(server.url + "/metrics") as reply:
                        text = await reply.text()

                assert metric(text, "huddle_errors_total", {"kind": "http_per_address_limit"}) == FLOOD - CAP
                assert (metric(text, "process_open_fds") or 0) > held
                assert metric(text, "huddle_errors_total", {"kind": "accept_error"}) == 0
        finally:
            for sock in sockets:
                sock.close()


@pytest.mark.timeout(60)
async def test_a_slowloris_client_is_closed_after_10_s(harness: Harness) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", harness.ports.http)
    loop = asyncio.get_running_loop()
    opened = loop.time()

    async def until_closed() -> float:
        with contextlib.suppress(ConnectionResetError):
            while await reader.read(4096):
                pass
        return loop.time() - opened

    closed = asyncio.create_task(until_closed())
    request = b"GET /healthz HTTP/1.1\r\nHost: huddle\r\nUser-Agent: slow\r\nAccept: */*\r\n\r\n"
    try:
        for byte in request[:13]:  # one byte a second: the whole request would take over a minute
            if closed.done():
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(1.0)
        assert closed.done(), "the server still waits for the headers after 13 s"
        assert 9.5 <= closed.result() <= 11.5
        assert await harness.metric("huddle_errors_total", {"kind": "http_header_timeout"}) == 1
        # Meanwhile and after, others are served as usual.
        async with harness.http.get(harness.base + "/healthz") as reply:
            assert reply.status == 200
    finally:
        closed.cancel()
        writer.close()


async def test_metrics_show_memory_files_tasks_and_event_loop_lag(harness: Harness) -> None:
    async def scrape() -> str:
        async with harness.http.get(harness.base + "/metrics") as reply:
            assert reply.status == 200
            return await reply.text()

    def over_half_a_second(text: str) -> float:
        total = metric(text, "huddle_event_loop_lag_samples_seconds_count")
        within = metric(text, "huddle_event_loop_lag_samples_seconds_bucket", {"le": "0.5"})
        assert total is not None and within is not None
        return total - within

    before = await scrape()
    assert (metric(before, "process_resident_memory_bytes") or 0) > 10 * 1024 * 1024
    assert (metric(before, "process_open_fds") or 0) > 0
    assert (metric(before, "huddle_asyncio_tasks") or 0) >= 1
    assert metric(before, "huddle_event_loop_lag_seconds") is not None

    # A 600 ms stall of the event loop, as one slow handler would cause: far above what a loaded machine's
    # scheduling adds, so that the figure shows the stall and not the neighbours.
    asyncio.get_running_loop().call_soon(time.sleep, 0.6)
    await asyncio.sleep(0.1)
    after = await scrape()
    assert (metric(after, "huddle_event_loop_lag_seconds") or 0) >= 0.55
    assert over_half_a_second(after) >= over_half_a_second(before) + 1
