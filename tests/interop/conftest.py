from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import pytest

from huddle.config import Settings
from huddle.node import Node

# The namespace's veth address (scripts/in-netns): aiortc gathers no loopback candidates.
ADDRESS = "10.77.0.1"


@pytest.fixture
def sfu_settings() -> Settings:
    return Settings(sfu_always=True, reconnect_grace=0)


@pytest.fixture
async def node(sfu_settings: Settings) -> AsyncIterator[Node]:
    node = Node(
        replace(
            sfu_settings,
            host=ADDRESS,
            port=0,
            stun_port=0,
            media_port=0,
            recordings_dir=tempfile.mkdtemp("-recordings"),
        )
    )
    node.ports = await node.start()
    node.base_url = f"http://{ADDRESS}:{node.ports.http}"
    yield node
    await node.stop()


async def until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.1)
