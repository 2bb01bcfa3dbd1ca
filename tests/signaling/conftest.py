from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import pytest

from huddle.config import Settings
from huddle.node import Node, Ports


class Client:
    """A raw signaling client: what a browser's client.js does, without a browser."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(message))

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        msg = await self.ws.receive(timeout=timeout)
        assert msg.type == aiohttp.WSMsgType.TEXT, f"expected a text frame, got {msg.type} {msg.data!r}"
        return json.loads(msg.data)

    async def expect(self, kind: str, timeout: float = 5.0) -> dict[str, Any]:
        """The next message of type `kind`, skipping pongs and others' chatter in between."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            message = await self.recv(max(0.01, deadline - loop.time()))
            if message["type"] == kind:
                return message

    async def closed(self, timeout: float = 5.0) -> int:
        """Skip what is still queued for us and return the close code the server sent."""
        while True:
            msg = await self.ws.receive(timeout=timeout)
            if msg.type != aiohttp.WSMsgType.TEXT:
                assert msg.type == aiohttp.WSMsgType.CLOSE, msg
                return msg.data

    async def join(self, room: str, name: str, **extra: Any) -> dict[str, Any]:
        await self.send({"type": "join", "id": "j", "room": room, "name": name, **extra})
        reply = await self.recv()
        assert reply["type"] == "joined", reply
        return reply


class Harness:
    def __init__(self, node: Node, ports: Ports, session: aiohttp.ClientSession) -> None:
        self.node = node
        self.ports = ports
        self.http = session
        self.base = f"http://127.0.0.1:{ports.http}"
        self._sockets: list[aiohttp.ClientWebSocketResponse] = []

    async def connect(self, **kwargs: Any) -> Client:
        ws = await self.http.ws_connect(self.base + "/ws", **kwargs)
        self._sockets.append(ws)
        return Client(ws)

    async def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.node.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value

    async def close(self) -> None:
        for ws in self._sockets:
            await ws.close()


async def start(settings: Settings | None = None) -> tuple[Node, Ports]:
    settings = replace(
        settings or Settings(),
        port=0,
        stun_port=0,
        media_port=0,
        recordings_dir=tempfile.mkdtemp("-recordings"),
    )
    node = Node(settings)
    return node, await node.start()


@pytest.fixture
def settings() -> Settings:
    # No grace period unless a test is about reconnection: a dropped socket leaves at once.
    return Settings(reconnect_grace=0)


@pytest.fixture
async def harness(settings: Settings) -> AsyncIterator[Harness]:
    node, ports = await start(settings)
    async with aiohttp.ClientSession() as session:
        h = Harness(node, ports, session)
        try:
            yield h
        finally:
            await h.close()
            await node.stop()
