"""Real `huddle serve` nodes of a ZooKeeper cluster, and a minimal signaling participant, for cluster tests.

A node is a child process with ports 0 (its ready line gives them), started, stopped (SIGTERM), killed (-9)
or frozen (SIGSTOP) by the test. A participant speaks the protocol as the web client does: it joins at a door,
follows `redirect` answers, keeps its resume token and the `doors` it was given, and resumes through them
after its socket is closed (1012) or its node dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

ENV = {k: v for k, v in os.environ.items() if not k.startswith("HUDDLE_")}
SESSION_TIMEOUT = 1.5


class NodeExited(Exception):
    """The node exited before its ready line; the message holds its exit code and stderr."""


class Node:
    """One `huddle serve` process."""

    def __init__(self, node_id: str, proc: subprocess.Popen[str], directory: Path) -> None:
        self.id = node_id
        self.proc = proc
        self.directory = directory
        self.http = 0
        self.media = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    @property
    def ws(self) -> str:
        """Its door as a client opens it (the form `joined.doors` and `redirect.url` use)."""
        return f"ws://127.0.0.1:{self.http}/ws?node={self.id}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return (self.directory / "stderr").read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        """SIGTERM: the graceful stop an operator (or systemd) asks for."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """kill -9: no goodbye to ZooKeeper nor to the clients."""
        if self.alive():
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def wait(self, timeout: float) -> int:
        """Exit code (kills the node if it has not exited within `timeout`, then fails)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"node {self.id} still ran after {timeout} s") from None

    def stop(self, timeout: float = 15.0) -> int:
        self.terminate()
        return self.wait(timeout)


def launch(
    directory: Path,
    zookeeper: str | None,
    node_id: str,
    *,
    standby_for: str | None = None,
    session_timeout: float = SESSION_TIMEOUT,
    args: tuple[str, ...] = (),
) -> Node:
    """Start a node without waiting for it (see `ready`); its files (stderr, recordings) go in
    directory/node_id."""
    home = directory / node_id
    home.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "huddle",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--stun-port",
        "0",
        "--media-port",
        "0",
        "--node-id",
        node_id,
        "--zk-session-timeout",
        str(session_timeout),
    ]
    if zookeeper is not None:
        command += ["--zookeeper", zookeeper]
    if standby_for is not None:
        command += ["--standby-for", standby_for]
    with (home / "stderr").open("w") as stderr:
        proc = subprocess.Popen(
            [*command, *args],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=home,
        )
    return Node(node_id, proc, home)


def ready(node: Node, timeout: float = 30.0) -> Node:
    """Wait for the node's ready line and learn its ports; NodeExited if it exits first."""
    assert node.proc.stdout is not None
    readable, _, _ = select.select([node.proc.stdout], [], [], timeout)
    if not readable:
        node.kill()
        raise AssertionError(f"node {node.id}: no ready line within {timeout} s: {node.stderr()[-3000:]}")
    line = node.proc.stdout.readline()
    if not line:
        code = node.proc.wait(10)
        raise NodeExited(f"node {node.id} exited with {code}: {node.stderr()[-3000:]}")
    info = json.loads(line)
    node.http, node.media = info["http"], info["media"]
    return node


def start(
    directory: Path,
    zookeeper: str | None,
    node_id: str,
    *,
    standby_for: str | None = None,
    session_timeout: float = SESSION_TIMEOUT,
    args: tuple[str, ...] = (),
    timeout: float = 30.0,
) -> Node:
    """Start a node and wait until it serves (blocking: call it through asyncio.to_thread from async code
    when the loop has work meanwhile)."""
    node = launch(
        directory, zookeeper, node_id, standby_for=standby_for, session_timeout=session_timeout, args=args
    )
    return ready(node, timeout)


class Nodes:
    """The nodes a test started, all stopped at the end (SIGTERM, then -9 for any that hangs)."""

    def __init__(self, directory: Path, zookeeper: str, args: tuple[str, ...] = ()) -> None:
        self.directory = directory
        self.zookeeper = zookeeper
        self.args = args
        self.started: dict[str, Node] = {}

    def start(
        self,
        node_id: str,
        *,
        standby_for: str | None = None,
        session_timeout: float = SESSION_TIMEOUT,
        zookeeper: str | None = None,
        args: tuple[str, ...] = (),
    ) -> Node:
        node = start(
            self.directory,
            zookeeper or self.zookeeper,
            node_id,
            standby_for=standby_for,
            session_timeout=session_timeout,
            args=(*self.args, *args),
        )
        self.started[node_id] = node
        return node

    async def start_async(self, node_id: str, **kwargs: Any) -> Node:
        return await asyncio.to_thread(self.start, node_id, **kwargs)

    def __getitem__(self, node_id: str) -> Node:
        return self.started[node_id]

    def close(self) -> None:
        for node in self.started.values():
            node.terminate()
        for node in self.started.values():
            try:
                node.proc.wait(10)
            except subprocess.TimeoutExpired:
                node.kill()


def client_session() -> aiohttp.ClientSession:
    """An HTTP client for participants: every open WebSocket holds a connection, so no pool limit (aiohttp's
    default of 100 would stall the 101st join), and no request waits longer than 10 s."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=10)
    )


async def cluster_view(
    http: aiohttp.ClientSession, node: Node, headers: dict[str, str] | None = None
) -> dict:
    """GET /api/cluster at `node`."""
    async with http.get(node.base + "/api/cluster", headers=headers or {}) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def until(what: str, check: Any, timeout: float, interval: float = 0.05) -> Any:
    """Poll the coroutine function `check` until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what} (last: {value!r})")
        await asyncio.sleep(interval)


class JoinFailed(Exception):
    """The server answered `join` with an error (`code` holds its code)."""

    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__(f"{reply.get('code')}: {reply.get('message')}")
        self.code = reply.get("code")
        self.reply = reply


class Participant:
    """One signaling client: joins following redirects, records what it hears, resumes through its doors.
    Give it a session from client_session() (an open socket holds a pooled connection).

    `messages` holds every message received after `joined` (offers, participant_joined, ...); `closed` is
    the close code of the current socket once the server closed it.
    """

    def __init__(
        self, http: aiohttp.ClientSession, room: str, *, name: str = "Ann", token: str | None = None
    ) -> None:
        self.http = http
        self.room = room
        self.name = name
        self.token = token
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.joined: dict[str, Any] = {}
        self.resume_token: str | None = None
        self.doors: list[str] = []
        self.door = ""  # the URL of the socket now open (after redirects)
        self.redirects: list[str] = []  # nodes that the last join was redirected to
        self.messages: list[dict[str, Any]] = []
        self.closed: int | None = None
        self._closed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._pongs: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._pings = 0

    @property
    def id(self) -> str:
        return self.joined["self"]["id"]

    @property
    def node(self) -> str:
        """The node id of the door this participant is seated at."""
        return self.door.rpartition("node=")[2]

    def _join_message(self, resume: bool) -> dict[str, Any]:
        if resume:
            assert self.resume_token is not None, "join first"
            return {"type": "join", "id": "j", "room": self.room, "resume": self.resume_token}
        message: dict[str, Any] = {"type": "join", "id": "j", "room": self.room}
        if self.token is not None:
            message["token"] = self.token
        else:
            message["name"] = self.name
        return message

    async def _attempt(self, url: str, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        """One join at `url`, following up to 3 redirects; `joined` (the socket stays open). Raises
        JoinFailed for an error answer and OSError/aiohttp errors/TimeoutError when a door is unreachable."""
        redirects: list[str] = []
        for _ in range(4):
            ws = await self.http.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=2), heartbeat=None)
            try:
                await ws.send_str(json.dumps(message))
                reply = await self._first_reply(ws, timeout)
            except BaseException:
                await ws.close()
                raise
            if reply["type"] == "redirect":
                await ws.close()
                redirects.append(reply["node"])
                url = reply["url"]
                continue
            if reply["type"] != "joined":
                await ws.close()
                raise JoinFailed(reply)
            self._seat(ws, url, reply, redirects)
            return reply
        raise AssertionError(f"more than 3 redirects: {redirects}")

    @staticmethod
    async def _first_reply(ws: aiohttp.ClientWebSocketResponse, timeout: float) -> dict[str, Any]:
        while True:
            msg = await ws.receive(timeout=timeout)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise ConnectionResetError(f"socket closed before an answer to join: {msg.type} {msg.data}")
            reply = json.loads(msg.data)
            if reply.get("id") == "j":
                return reply

    def _seat(
        self, ws: aiohttp.ClientWebSocketResponse, url: str, joined: dict[str, Any], redirects: list[str]
    ):
        self.ws, self.door, self.joined, self.redirects = ws, url, joined, redirects
        self.resume_token = joined["resume_token"]
        self.doors = list(joined["doors"])
        self.closed = None
        self._closed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read(ws, self._closed))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse, closed: asyncio.Event) -> None:
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                data = json.loads(msg.data)
                waiter = self._pongs.pop(str(data.get("id")), None) if data.get("type") == "pong" else None
                if waiter is not None and not waiter.done():
                    waiter.set_result(data)
                else:
                    if data.get("type") == "resume_token":
                        # A recording started or stopped: the token that rebuilds the call says so now.
                        self.resume_token = data["token"]
                    self.messages.append(data)
        except (aiohttp.ClientError, ConnectionError):
            pass
        finally:
            if self.ws is ws:
                self.closed = ws.close_code if ws.close_code is not None else -1
            closed.set()

    async def join(self, door: str, timeout: float = 10.0) -> dict[str, Any]:
        """A first join at `door` (a ws:// URL), following redirects."""
        return await self._attempt(door, self._join_message(resume=False), timeout)

    async def resume(
        self, doors: list[str] | None = None, *, avoid: str | None = None, timeout: float = 10.0
    ) -> dict[str, Any]:
        """Resume with the kept token as the web client does after a dropped socket: door after door (its
        `doors`, with `avoid`, e.g. the node that went away, tried last), skipping unreachable ones and those
        that answer try_again, until one seats it or `timeout` passes. resume_failed is final (JoinFailed).
        `avoid` is a node id."""
        await self.drop()
        order = list(doors if doors is not None else self.doors)
        if avoid is not None:
            gone = [d for d in order if d.endswith(f"node={avoid}")]
            order = [d for d in order if d not in gone] + gone
        deadline = time.monotonic() + timeout
        errors: list[str] = []
        while True:
            for door in order:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"not resumed within {timeout} s: {errors[-6:]}")
                try:
                    return await asyncio.wait_for(
                        self._attempt(door, self._join_message(resume=True), min(left, 3.0)), left
                    )
                except JoinFailed as exc:
                    if exc.code != "try_again":
                        raise
                    errors.append(f"{door}: {exc}")
                except (TimeoutError, OSError, aiohttp.ClientError) as exc:
                    errors.append(f"{door}: {exc!r}")
            await asyncio.sleep(0.05)

    async def wait_closed(self, timeout: float) -> int:
        """The close code the server closed this socket with (-1: dropped without a close frame)."""
        await asyncio.wait_for(self._closed.wait(), timeout)
        assert self.closed is not None
        return self.closed

    async def ping(self, timeout: float = 5.0) -> dict[str, Any]:
        """A ping answered on the open socket (the pong)."""
        assert self.ws is not None and self.closed is None, f"socket closed ({self.closed})"
        self._pings += 1
        key = f"ping-{self._pings}"
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pongs[key] = waiter
        await self.ws.send_str(json.dumps({"type": "ping", "id": key}))
        try:
            return await asyncio.wait_for(waiter, timeout)
        finally:
            self._pongs.pop(key, None)

    async def send(self, message: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send_str(json.dumps(message))

    def heard(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == kind]

    async def drop(self) -> None:
        """Close the socket without `leave` (as a page whose connection died): the server keeps the place."""
        ws, reader = self.ws, self._reader
        self.ws = self._reader = None
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2)
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader

    async def leave(self) -> None:
        if self.ws is not None and self.closed is None:
            with contextlib.suppress(Exception):
                await self.send({"type": "leave"})
        await self.drop()
