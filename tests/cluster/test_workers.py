"""`huddle serve --workers N` as an operator runs it: one public port, N worker processes behind it, calls
placed over the workers by chat id, a worker killed with -9 restarted and its call resumed."""

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
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from huddle.cluster.placement import choose
from huddle.signaling import tokens

ENV = {k: v for k, v in os.environ.items() if not k.startswith("HUDDLE_")}
SECRET = "workers-test-secret-" + "x" * 32
API_KEY = "workers-test-api-key"
IDS = ("w0", "w1")


class Parent:
    def __init__(self, proc: subprocess.Popen[str], port: int, stderr: Path) -> None:
        self.proc = proc
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.stderr = stderr

    def children(self) -> set[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return {int(pid) for pid in path.read_text().split()}


def start(tmp_path: Path, *args: str, timeout: float = 30.0) -> subprocess.Popen[str]:
    stderr = (tmp_path / "stderr").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "huddle", "serve", *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        cwd=tmp_path,
    )


def ready_line(proc: subprocess.Popen[str], timeout: float = 30.0) -> dict[str, Any] | None:
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], timeout)
    assert readable, f"no ready line within {timeout} s"
    line = proc.stdout.readline()
    return json.loads(line) if line else None


def command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def stop(proc: subprocess.Popen[str], timeout: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Parent]:
    tmp = tmp_path_factory.mktemp("workers")
    (tmp / "secret").write_text(SECRET + "\n")
    proc = start(
        tmp,
        "--workers",
        "2",
        "--port",
        "0",
        "--stun-port",
        "0",
        "--media-port",
        "0",
        "--secret-file",
        str(tmp / "secret"),
        "--api-key",
        API_KEY,
        "--reconnect-grace",
        "30",
    )
    try:
        ready = ready_line(proc)
        assert ready is not None, (tmp / "stderr").read_text()
        assert set(ready) == {"event", "http", "stun", "media"} and ready["http"] > 0
        yield Parent(proc, ready["http"], tmp / "stderr")
    finally:
        stop(proc)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def cluster(http: aiohttp.ClientSession, parent: Parent) -> dict[str, Any]:
    async with http.get(parent.base + "/api/cluster", headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def metrics(http: aiohttp.ClientSession, parent: Parent) -> list[tuple[str, dict[str, str], float]]:
    async with http.get(parent.base + "/metrics", headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()
        text = await resp.text()
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


async def wait_for(what: str, check, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.1)


async def join(
    http: aiohttp.ClientSession, parent: Parent, message: dict[str, Any]
) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any], list[str]]:
    """What client.js does: join at the public door, follow redirects; the socket, `joined` and the nodes
    that redirected."""
    url, redirects = parent.base + "/ws", []
    for _ in range(4):
        ws = await http.ws_connect(url)
        await ws.send_str(json.dumps({**message, "id": "j"}))
        reply = json.loads(await ws.receive_str(timeout=5))
        if reply["type"] != "redirect":
            assert reply["type"] == "joined", reply
            return ws, reply, redirects
        await ws.close()
        redirects.append(reply["node"])
        url = reply["url"]
    raise AssertionError(f"more than 3 redirects: {redirects}")


def rooms_on(ids: tuple[str, ...]) -> list[str]:
    """One room name per worker id, each placed on that worker by the hashing."""
    names = (f"call-{i}" for i in range(1000))
    return [next(n for n in names if choose(n, IDS) == wid) for wid in ids]


def token(room: str, identity: str) -> str:
    return tokens.issue(SECRET, room=room, identity=identity, name=identity)


async def test_one_port_serves_through_two_worker_processes(parent: Parent, http: aiohttp.ClientSession):
    async with http.get(parent.base + "/healthz") as resp:
        assert resp.status == 200 and await resp.text() == "ok\n"
    async with http.get(parent.base + "/r/some-room") as resp:
        assert resp.status == 200 and "text/html" in resp.headers["Content-Type"]
    # /api/cluster is guarded like /metrics: with --secret, the API key only.
    async with http.get(parent.base + "/api/cluster") as resp:
        assert resp.status in (401, 403)
    view = await cluster(http, parent)
    assert view["self"] == "workers"
    assert [n["id"] for n in view["nodes"]] == list(IDS)
    assert all(n["role"] == "active" and n["url"] == parent.base for n in view["nodes"])
    pids = {n["pid"] for n in view["nodes"]}
    assert pids == parent.children() and len(pids) == 2
    for node in view["nodes"]:
        command = command_line(node["pid"])
        assert f"serve --workers 1 --host 127.0.0.1 --port 0 --node-id {node['id']} " in command
        # The secret travels in the environment, never on a command line anyone can read with `ps`.
        assert SECRET not in command
    # One scrape covers every process: each worker's figures carry its id.
    samples = await metrics(http, parent)
    assert {labels["worker"] for name, labels, _ in samples if name == "huddle_participants"} == set(IDS)
    cpu = {labels["worker"] for name, labels, _ in samples if name == "process_cpu_seconds_total"}
    assert cpu == {*IDS, "parent"}
    # A page from elsewhere may not open the WebSocket: the worker's refusal reaches the browser.
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(parent.base + "/ws", headers={"Origin": "http://evil.example"})
    assert refused.value.status == 403


async def test_two_calls_land_on_two_workers_and_a_killed_worker_takes_its_call_back(
    parent: Parent, http: aiohttp.ClientSession
):
    room_a, room_b = rooms_on(IDS)
    ws_a, _, redirects_a = await join(
        http, parent, {"type": "join", "room": room_a, "token": token(room_a, "ann")}
    )
    ws_b, joined_b, redirects_b = await join(
        http, parent, {"type": "join", "room": room_b, "token": token(room_b, "bob")}
    )
    # The public /ws leads to w0, which keeps its own call and sends the other on.
    assert redirects_a == [] and redirects_b == ["w1"]

    async def placed() -> dict[str, Any] | None:
        view = await cluster(http, parent)
        rooms = {n["id"]: n["rooms"] for n in view["nodes"]}
        return view if rooms == {"w0": [room_a], "w1": [room_b]} else None

    view = await wait_for("each call shown on its worker", placed, 5)
    old_pid = next(n["pid"] for n in view["nodes"] if n["id"] == "w1")
    os.kill(old_pid, signal.SIGKILL)
    killed = time.monotonic()
    # The parent tells w1's clients at once that their node is gone (1012: reconnect now).
    close = await ws_b.receive(timeout=5)
    assert close.type == aiohttp.WSMsgType.CLOSE and close.data == 1012, close

    async def restarted() -> dict[str, Any] | None:
        view = await cluster(http, parent)
        pids = {n["id"]: n["pid"] for n in view["nodes"]}
        return view if pids.get("w1") not in (None, old_pid) else None

    await wait_for("w1 restarted", restarted, 10)
    print(f"\nkill -9 of w1 -> w1 back in /api/cluster: {time.monotonic() - killed:.2f} s")
    assert len(parent.children()) == 2 and old_pid not in parent.children()
    restarts = [
        value
        for name, labels, value in await metrics(http, parent)
        if name == "huddle_errors_total" and labels == {"kind": "worker_restart", "worker": "parent"}
    ]
    assert restarts == [1.0]
    ws_b2, rejoined, _ = await join(
        http, parent, {"type": "join", "room": room_b, "resume": joined_b["resume_token"]}
    )
    assert rejoined["resumed"] is True and rejoined["restored"] is True
    assert rejoined["self"]["id"] == joined_b["self"]["id"]
    print(f"kill -9 of w1 -> its participant back in its call: {time.monotonic() - killed:.2f} s")
    # w0's call never noticed.
    await ws_a.send_str(json.dumps({"type": "ping", "id": "p"}))
    assert json.loads(await ws_a.receive_str(timeout=5))["type"] == "pong"
    for ws in (ws_a, ws_b2):
        await ws.close()


async def test_sigterm_stops_the_workers_whose_clients_hear_the_restart(tmp_path: Path):
    proc = start(tmp_path, "--workers", "2", "--port", "0", "--stun-port", "0", "--media-port", "0")
    try:
        ready = ready_line(proc)
        assert ready is not None, (tmp_path / "stderr").read_text()
        parent = Parent(proc, ready["http"], tmp_path / "stderr")
        workers = parent.children()
        assert len(workers) == 2
        async with aiohttp.ClientSession() as http:
            ws, _, _ = await join(http, parent, {"type": "join", "room": "bye", "name": "Ann"})
            proc.send_signal(signal.SIGTERM)
            close = await ws.receive(timeout=10)
            assert close.type == aiohttp.WSMsgType.CLOSE and close.data == 1012, close
            assert "restarting" in close.extra  # the worker's own words
        code = await asyncio.to_thread(proc.wait, 15)
    finally:
        proc.kill()
    assert code == 0, (tmp_path / "stderr").read_text()
    assert not any(alive(pid) for pid in workers)


def test_workers_of_a_parent_killed_with_9_stop_and_free_their_ports(tmp_path: Path):
    proc = start(tmp_path, "--workers", "2", "--port", "0", "--stun-port", "0", "--media-port", "0")
    try:
        assert ready_line(proc) is not None, (tmp_path / "stderr").read_text()
        workers = Parent(proc, 0, tmp_path / "stderr").children()
        proc.kill()
        proc.wait(5)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers):
            assert time.monotonic() < deadline, "orphaned workers still run"
            time.sleep(0.1)
    finally:
        proc.kill()


def test_a_worker_that_cannot_start_stops_the_parent_with_its_error(tmp_path: Path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        # w1's media port is base + 1.
        proc = start(
            tmp_path, "--workers", "2", "--port", "0", "--stun-port", "0", "--media-port", str(port - 1)
        )
        assert ready_line(proc) is None
        code = proc.wait(15)
    errors = (tmp_path / "stderr").read_text()
    assert code != 0
    assert "worker w1" in errors and "cannot listen" in errors, errors


@pytest.mark.parametrize("value", ["0", "x"])
def test_bad_worker_counts_are_refused_with_a_clear_message(tmp_path: Path, value: str):
    proc = start(tmp_path, "--workers", value, "--port", "0")
    code = proc.wait(15)
    assert code == 2
    assert "--workers must be" in (tmp_path / "stderr").read_text()
