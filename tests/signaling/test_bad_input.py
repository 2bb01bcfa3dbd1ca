"""Bad input to signaling: a clear error or a counted drop, never a crash, never another call disturbed."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from .conftest import Client, Harness


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "bad_json"),
        ("[1, 2, 3]", "bad_json"),
        ('"join"', "bad_json"),
        ('{"id": 3}', "bad_message"),
        ('{"type": "dance", "id": 3}', "unknown_type"),
        ('{"type": "ping", "v": 2, "id": 3}', "unsupported_version"),
        ('{"type": "join", "id": 3, "room": "no spaces here", "name": "Ada"}', "invalid_room"),
        ('{"type": "join", "id": 3, "room": "' + "x" * 65 + '", "name": "Ada"}', "invalid_room"),
        ('{"type": "join", "id": 3, "room": "../../etc", "name": "Ada"}', "invalid_room"),
        ('{"type": "join", "id": 3, "room": "ok"}', "invalid_name"),
        ('{"type": "join", "id": 3, "room": "ok", "name": "   "}', "invalid_name"),
        ('{"type": "join", "id": 3, "room": 7, "name": "Ada"}', "bad_message"),
        ('{"type": "offer", "id": 3, "to": "p_1", "sdp": "v=0"}', "not_joined"),
    ],
)
async def test_bad_messages_get_a_clear_error_and_the_socket_stays_usable(
    harness: Harness, frame: str, code: str
) -> None:
    client = await harness.connect()
    await client.ws.send_str(frame)
    error = await client.recv()
    assert error["type"] == "error" and error["code"] == code, error
    assert error["message"]
    if '"id": 3' in frame:
        assert error["id"] == 3
    assert await harness.metric("huddle_errors_total", {"kind": code}) == 1
    await client.join("after", "Ada")


async def test_wrong_types_in_a_joined_session_are_refused_by_the_schema(harness: Harness) -> None:
    client = await harness.connect()
    await client.join("r", "Ada")
    for bad in (
        {"type": "media", "audio": "yes"},
        {"type": "offer", "to": "p_x"},
        {"type": "offer", "to": "p_x", "sdp": "v" * 60_001},
        {"type": "candidate", "to": "p_x", "candidate": {"candidate": 5}},
        {"type": "candidate", "to": "p_x", "candidate": {"candidate": "x", "sdpMLineIndex": -1}},
    ):
        await client.send(bad)
        error = await client.expect("error")
        assert error["code"] == "bad_message", (bad, error)
    await client.send({"type": "join", "id": 9, "room": "r", "name": "Ada"})
    assert (await client.expect("error"))["code"] == "already_joined"


async def test_binary_frames_are_refused(harness: Harness) -> None:
    client = await harness.connect()
    await client.ws.send_bytes(b"\x00\x01\x02")
    assert (await client.recv())["code"] == "binary_not_supported"


async def test_a_message_over_64_kib_is_dropped_with_an_error(harness: Harness) -> None:
    client = await harness.connect()
    await client.join("r", "Ada")
    await client.send({"type": "ping", "id": 1, "padding": "x" * 70_000})
    error = await client.recv()
    assert error["code"] == "too_large"
    await client.send({"type": "ping", "id": 2})
    assert (await client.recv())["id"] == 2


async def test_a_huge_frame_closes_only_that_socket(harness: Harness) -> None:
    ada, bob = await harness.connect(), await harness.connect()
    await ada.join("r", "Ada")
    await bob.join("r", "Bob")
    await ada.expect("participant_joined")
    await bob.ws.send_str("x" * (1024 * 1024))
    assert await bob.closed() == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    left = await ada.expect("participant_left")
    assert left["reason"] == "disconnected"
    await ada.send({"type": "ping", "id": "still here"})
    assert (await ada.expect("pong"))["id"] == "still here"
    assert await harness.metric("huddle_errors_total", {"kind": "too_large"}) == 1


async def test_a_flood_is_rate_limited_and_a_call_beside_it_keeps_working(harness: Harness) -> None:
    ada, bob = await harness.connect(), await harness.connect()
    ada_id = (await ada.join("call", "Ada"))["self"]["id"]
    bob_id = (await bob.join("call", "Bob"))["self"]["id"]
    await ada.expect("participant_joined")
    flooder = await harness.connect()
    await flooder.join("elsewhere", "Mallory")

    relayed = 0

    async def call_goes_on() -> None:
        nonlocal relayed
        for i in range(20):
            await ada.send({"type": "candidate", "to": bob_id, "candidate": {"candidate": f"c{i}"}})
            msg = await bob.expect("candidate", timeout=2)
            assert msg["from"] == ada_id and msg["candidate"]["candidate"] == f"c{i}"
            relayed += 1
            await asyncio.sleep(0.1)

    async def flood() -> None:
        # 1,000 messages a second for 2 s, paced in bursts of 50 every 50 ms.
        for _ in range(40):
            for _ in range(50):
                await flooder.send({"type": "media", "audio": False})
            await asyncio.sleep(0.05)

    await asyncio.gather(call_goes_on(), flood())
    assert relayed == 20
    dropped = await harness.metric("huddle_errors_total", {"kind": "rate_limited"})
    assert 1000 <= dropped <= 1850, dropped  # 2,000 sent; a burst of 200 and 50/s pass
    errors = []
    while True:
        try:
            msg = await flooder.recv(timeout=0.5)
        except TimeoutError:
            break
        if msg["type"] == "error":
            errors.append(msg["code"])
    # One error a second at most, not one per dropped message.
    assert errors and set(errors) == {"rate_limited"} and len(errors) <= 4
    async with harness.http.get(harness.base + "/healthz") as resp:
        assert resp.status == 200


async def test_a_socket_that_keeps_flooding_is_closed(harness: Harness) -> None:
    flooder = await harness.connect()
    for _ in range(2500):
        await flooder.ws.send_str('{"type":"ping"}')
    assert await flooder.closed() == aiohttp.WSCloseCode.POLICY_VIOLATION


async def test_unknown_types_are_counted_under_one_label(harness: Harness) -> None:
    client = await harness.connect()
    for i in range(5):
        await client.ws.send_str(json.dumps({"type": f"junk{i}"}))
        assert (await client.recv())["code"] == "unknown_type"
    text = await (await harness.http.get(harness.base + "/metrics")).text()
    assert "junk" not in text
    assert 'huddle_signaling_messages_total{type="invalid"} 5.0' in text


async def test_garbage_over_plain_http_is_refused_and_the_connection_closed(harness: Harness) -> None:
    """TLS, or no HTTP at all, sent to the plain HTTP port: a 400, and the server hangs up at once rather
    than keeping the connection (and its file) for whoever sent it."""
    for garbage in (b"\x16\x03\x01garbage\r\n\r\n" * 10, b"GET / HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", harness.ports.http)
        writer.write(garbage)
        await writer.drain()
        # read() returns only at end of file: the server closed the connection, within the second.
        answer = await asyncio.wait_for(reader.read(), 1.0)
        assert answer.startswith(b"HTTP/1.0 400 ") or answer.startswith(b"HTTP/1.1 400 "), answer[:80]
        assert reader.at_eof()
        writer.close()
    assert await harness.metric("huddle_errors_total", {"kind": "http_bad_request"}) == 2
    ok: Client = await harness.connect()
    await ok.join("r", "Ada")
