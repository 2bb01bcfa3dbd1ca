"""Synthetic participants get back into their call by themselves, as the web client does: a `huddle serve`
killed with -9 and started again on the same ports (and recordings folder, where its resume key lives)
within the reconnection grace takes them back with the same ids, and their media flows again.

The same after a failover (the standby of a killed node takes the call over) and in `--workers 2` (the parent
restarts a killed worker). Runs inside the tests' network namespace (scripts/in-netns): servers and ZooKeeper
are real processes on loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from huddle.cluster.placement import choose
from huddle.loadtest.run import LoadtestConfig, format_summary, run_loadtest
from huddle.loadtest.sender import now_us
from tests.cluster.zookeeper_server import ZooKeeperServer

HOST = "127.0.0.1"
ENV = {k: v for k, v in os.environ.items() if not k.startswith("HUDDLE_")}
DOWN = 1.0  # seconds the server stays dead


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def serve(directory: Path, log: str, *args: str) -> tuple[subprocess.Popen[str], int]:
    """`huddle serve ARGS` (every call on the SFU), ready: the process and its HTTP port."""
    with (directory / log).open("w") as stderr:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "huddle", "serve", "--host", HOST, *args, "--sfu-always"),
                *("--reconnect-grace", "20", "--recordings-dir", str(directory / "recordings")),
            ],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline() if readable else ""
    if not line:
        proc.kill()
        raise AssertionError((directory / log).read_text()[-2000:])
    return proc, int(json.loads(line)["http"])


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Server:
    """`huddle serve` on fixed ports, so that it can be killed and started again where it was."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.http = free_port(socket.SOCK_STREAM)
        self.stun = free_port(socket.SOCK_DGRAM)
        self.media = free_port(socket.SOCK_DGRAM)
        self.url = f"http://{HOST}:{self.http}"
        self.proc: subprocess.Popen[str] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        ports = ["--port", str(self.http), "--stun-port", str(self.stun), "--media-port", str(self.media)]
        self.proc, _ = serve(self.directory, f"stderr-{self.starts}", *ports)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    def log(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted(self.directory.glob("stderr-*")))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    server = Server(tmp_path)
    server.start()
    yield server
    server.stop()


async def room_ids(url: str, room: str) -> list[str]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/api/rooms/{room}") as resp:
        assert resp.status == 200, await resp.text()
        data: dict[str, Any] = await resp.json()
    return sorted(p["id"] for p in data["participants"])


async def test_participants_resume_after_the_server_is_killed_and_restarted_on_the_same_ports(server: Server):
    room = "comeback"
    config = LoadtestConfig(
        url=server.url, room=room, participants=3, publishers=2, duration=9.0, warmup=1.0, layout="gallery"
    )
    measuring = asyncio.Event()

    def progress(text: str) -> None:
        if text.startswith("measuring"):
            measuring.set()

    run = asyncio.create_task(run_loadtest(config, progress=progress))
    window = asyncio.create_task(measuring.wait())
    await asyncio.wait({run, window}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
    window.cancel()
    if run.done():  # over before its window: the summary says why
        pytest.fail(format_summary(run.result()) + "\n" + server.log())
    assert measuring.is_set(), "the loadtest did not reach its window within 120 s"
    before = await room_ids(server.url, room)
    assert len(before) == 3
    await asyncio.sleep(1.0)
    server.kill()
    killed = time.monotonic()
    await asyncio.sleep(DOWN)
    await asyncio.to_thread(server.start)
    restarted = time.monotonic()
    result = await asyncio.wait_for(run, 120)
    summary = format_summary(result)
    print("\n" + summary)
    assert result.complete, summary

    # The restarted server has the same people, by their ids, and so do they.
    assert sorted(sub.participant for sub in result.subscribers) == before, summary
    # Each one's signaling dropped once, was resumed and rebuilt (restored) by the new process, and media
    # came back: every subscriber receives both publishers' video and audio again, on new connections.
    publishers = {sub.participant for sub in result.subscribers if sub.index < 2}
    for sub in result.subscribers:
        assert len(sub.reconnections) == 1, (sub.participant, sub.reconnections)
        drop = sub.reconnections[0]
        assert drop.restored and drop.resumed_seconds is not None, drop
        assert drop.media_seconds is not None, drop
        # Not before the server was back; within a few seconds of that (the backoff is 0.5, 1, 2 s).
        assert DOWN < drop.media_seconds < DOWN + (restarted - killed - DOWN) + 5.0, drop
        flowing = {(s.publisher, s.kind) for s in sub.streams if s.packets > 0}
        assert flowing == {(p, k) for p in publishers - {sub.participant} for k in ("video", "audio")}, (
            sub.participant,
            sub.streams,
        )
    assert result.reconnects == result.reconnects_resumed == result.reconnects_with_media == 3
    assert result.reconnect_max_s is not None and result.reconnect_max_s < DOWN + 6.0
    assert "reconnect 3 signaling drops, 3 resumed, 3 with media again" in summary, summary
    assert not result.errors, summary


async def test_participants_redirected_to_a_worker_come_back_after_it_is_killed(tmp_path: Path):
    """`--workers 2`: the call's worker is reached through a redirect; killed with -9, the parent closes its
    sockets with 1012 and starts it again, and the participants resume through their doors at once."""
    room = next(f"work-{n}" for n in range(1000) if choose(f"work-{n}", ("w0", "w1")) == "w1")
    parent, port = serve(
        tmp_path, "stderr", "--workers", "2", "--port", "0", "--stun-port", "0", "--media-port", "0"
    )
    try:
        url = f"http://{HOST}:{port}"
        config = LoadtestConfig(url=url, room=room, participants=3, publishers=2, duration=8.0, warmup=1.0)
        measuring = asyncio.Event()
        run = asyncio.create_task(
            run_loadtest(
                config, progress=lambda text: measuring.set() if text.startswith("measuring") else None
            )
        )
        window = asyncio.create_task(measuring.wait())
        await asyncio.wait({run, window}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
        window.cancel()
        if run.done():
            pytest.fail(format_summary(run.result()))
        async with aiohttp.ClientSession() as http, http.get(f"{url}/api/cluster") as resp:
            nodes = {n["id"]: n for n in (await resp.json())["nodes"]}
        # Joined at the public door, the call sits on w1, where w0 sent it.
        assert nodes["w1"]["rooms"] == [room] and nodes["w0"]["rooms"] == [], nodes
        before = await room_ids(url, room)
        await asyncio.sleep(1.0)
        os.kill(nodes["w1"]["pid"], signal.SIGKILL)
        result = await asyncio.wait_for(run, 120)
        summary = format_summary(result)
        print("\n" + summary)
        assert result.complete, summary
        assert sorted(sub.participant for sub in result.subscribers) == before, summary
        for sub in result.subscribers:
            assert len(sub.reconnections) == 1, (sub.participant, sub.reconnections)
            drop = sub.reconnections[0]
            assert drop.close_code == 1012 and drop.restored, drop
            assert drop.media_seconds is not None and drop.media_seconds < 8.0, drop
        assert not result.errors, summary
    finally:
        stop(parent)


@pytest.fixture
def zookeeper(tmp_path: Path) -> Iterator[ZooKeeperServer]:
    server = ZooKeeperServer(tmp_path / "zookeeper")
    server.start()
    yield server
    server.stop()


async def test_participants_follow_their_call_to_the_standby_when_the_active_node_is_killed(
    tmp_path: Path, zookeeper: ZooKeeperServer
):
    """Active `a` and standby `b` with a 1.5 s ZooKeeper session: the participants join at b's door and are
    sent on to a; a is killed with -9; they resume through their doors (b keeps sending them on to the dead a
    until a's session ends: they ask again at once rather than after the backoff) and b rebuilds the call."""
    room = "failover"
    cluster = ("--zookeeper", f"{zookeeper.hosts}/loadtest", "--zk-session-timeout", "1.5")
    nodes = {}
    for node_id, extra in (("a", ()), ("b", ("--standby-for", "a"))):
        (tmp_path / node_id).mkdir()
        nodes[node_id] = serve(
            tmp_path / node_id,
            "stderr",
            *("--port", "0", "--stun-port", "0", "--media-port", "0", "--node-id", node_id),
            *cluster,
            *extra,
        )
    (active, _), (standby, b_port) = nodes["a"], nodes["b"]
    try:
        door = f"http://{HOST}:{b_port}"
        config = LoadtestConfig(url=door, room=room, participants=3, publishers=2, duration=8.0, warmup=1.0)
        measuring = asyncio.Event()
        run = asyncio.create_task(
            run_loadtest(
                config, progress=lambda text: measuring.set() if text.startswith("measuring") else None
            )
        )
        window = asyncio.create_task(measuring.wait())
        await asyncio.wait({run, window}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
        window.cancel()
        if run.done():
            pytest.fail(format_summary(run.result()))
        a_url = f"http://{HOST}:{nodes['a'][1]}"
        before = await room_ids(a_url, room)  # the call is on a
        await asyncio.sleep(1.0)
        killed_us = now_us()
        active.kill()
        result = await asyncio.wait_for(run, 120)
        summary = format_summary(result)
        print("\n" + summary)
        assert result.complete, summary
        assert sorted(sub.participant for sub in result.subscribers) == before, summary
        async with aiohttp.ClientSession() as http, http.get(f"{door}/api/node") as resp:
            node = await resp.json()
        assert node["role"] == "active" and node["serves"] == "a", node
        for sub in result.subscribers:
            assert len(sub.reconnections) == 1, (sub.participant, sub.reconnections)
            drop = sub.reconnections[0]
            assert drop.restored and drop.media_seconds is not None, drop
            back = (drop.dropped_us - killed_us) / 1e6 + drop.media_seconds
            # The session (1.5 s, expired on ZooKeeper's 0.5 s ticks) and the takeover, then a quick try:
            # the backoff's next round alone would come 3.5 s after the drop.
            assert back < 3.2, (sub.participant, back, drop)
        assert not result.errors, summary
    finally:
        stop(standby)
        active.kill()
        active.wait(5)
