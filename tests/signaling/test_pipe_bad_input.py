"""Bad input to the links between nodes (/pipe, the pipe UDP port) and forged placement tickets: refused and
counted, never a crash, and the calls on the node go on."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp

from huddle.calls.span import KEY_LABEL
from huddle.rtc.pipe import Sealer, new_link_id

from .conftest import Harness


def hello(key: bytes, room: str, *, at: float | None = None) -> bytes:
    sealer = Sealer(key, new_link_id())
    body = {
        "t": "hello",
        "node": "intruder",
        "room": room,
        "time": time.time() if at is None else at,
        "media": new_link_id().hex(),
        "pipe": ["127.0.0.1", 9],
    }
    return sealer.seal(json.dumps(body).encode())


async def pipe_answer(harness: Harness, room: str, frame: bytes) -> tuple[aiohttp.WSMessage, int | None]:
    async with harness.http.ws_connect(f"{harness.base}/pipe?room={room}") as ws:
        await ws.send_bytes(frame)
        msg = await ws.receive(timeout=5)
        return msg, ws.close_code


async def test_links_without_the_cluster_key_are_refused_and_counted_while_a_call_goes_on(harness: Harness):
    ada = await harness.connect()
    await ada.join("standup", "Ada")
    key = harness.node.calls.resume_key.derive(KEY_LABEL)
    refused = [
        b"garbage that is no sealed frame",
        hello(b"another deployment's key 32 byte", "standup"),
        hello(key, "standup", at=time.time() - 300),  # a recorded hello, replayed later
        hello(key, "another-room"),  # sealed for one call, sent for another
    ]
    for frame in refused:
        msg, code = await pipe_answer(harness, "standup", frame)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
        assert code == 4003
    assert await harness.metric("huddle_errors_total", {"kind": "pipe_hello"}) == len(refused)
    await ada.send({"type": "ping", "id": 9})
    assert (await ada.expect("pong"))["id"] == 9


async def test_a_hello_is_good_once(harness: Harness):
    key = harness.node.calls.resume_key.derive(KEY_LABEL)
    frame = hello(key, "standup")
    msg, _ = await pipe_answer(harness, "standup", frame)
    # A node holding the key is answered with the hub's own hello.
    assert msg.type == aiohttp.WSMsgType.BINARY
    msg, code = await pipe_answer(harness, "standup", frame)
    assert code == 4003, "a replayed hello opened a second link"
    assert await harness.metric("huddle_errors_total", {"kind": "pipe_hello"}) == 1


async def test_garbage_on_the_pipe_port_is_dropped_and_counted(harness: Harness):
    port = harness.node.pipe_port.address[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for payload in (b"", b"\x80" * 40, b"\xf1" + b"\x00" * 60, bytes(range(256)) * 4):
            sock.sendto(payload, ("127.0.0.1", port))
    deadline = time.monotonic() + 3
    kinds = ("pipe_short", "pipe_version", "pipe_unknown_link")
    while time.monotonic() < deadline:
        total = sum([await harness.metric("huddle_errors_total", {"kind": k}) for k in kinds])
        if total >= 3:  # the empty datagram may not even reach the port
            break
        await asyncio.sleep(0.05)
    assert total >= 3


async def test_a_forged_or_misdirected_ticket_is_ignored(harness: Harness):
    calls = harness.node.calls
    for ticket in ("not-a-ticket", calls.resume_key.ticket("standup", "some-other-node", time.time())):
        client = await harness.connect()
        joined = await client.join("standup", "Ada", ticket=ticket)
        assert joined["room"] == "standup"  # joined as anyone else, not as spill-over
    assert not calls.get("standup").spilled
    assert await harness.metric("huddle_errors_total", {"kind": "bad_ticket"}) == 2
