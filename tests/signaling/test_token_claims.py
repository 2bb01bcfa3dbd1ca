"""What a token grants fails closed: permissions are JSON booleans or nothing, recording and downloading only
when granted, and a resume lasts no longer than the invite behind it and works once per resume token."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt
import pytest

from huddle.config import Settings
from huddle.signaling import tokens

from .conftest import Client, Harness

SECRET = "a secret long enough for HS256, 32+ bytes"


def _signed(permissions: Any, **claims: Any) -> str:
    body = {
        "room": "board",
        "sub": "eve",
        "exp": int(time.time()) + 600,
        "permissions": permissions,
        **claims,
    }
    return jwt.encode(body, SECRET, "HS256")


async def _join(harness: Harness, token: str, room: str = "board") -> tuple[Client, dict]:
    client = await harness.connect()
    await client.send({"type": "join", "id": 1, "room": room, "token": token})
    return client, await client.recv()


@pytest.mark.parametrize("settings", [Settings(secret=SECRET, reconnect_grace=0)])
@pytest.mark.parametrize(
    "permissions",
    [
        {"publish": "false", "record": "false"},
        {"record": "true"},
        {"record": 1},
        {"publish": 0},
        {"subscribe": None},
        {"download": "yes"},
        {"record": [True]},
        "all",
        None,
        [True, True],
    ],
    ids=[
        "string-false",
        "string-true",
        "one",
        "zero",
        "null",
        "yes",
        "list",
        "string",
        "null-claim",
        "array",
    ],
)
async def test_permissions_that_are_not_booleans_admit_nobody(harness: Harness, permissions: Any) -> None:
    client, reply = await _join(harness, _signed(permissions))
    assert reply["type"] == "error" and reply["code"] == "unauthorized", reply
    assert "true or false" in reply["message"] or "object of booleans" in reply["message"]
    assert await client.closed() == 4001
    assert await harness.metric("huddle_participants") == 0
    # Nor does such a token open the REST API.
    url = f"{harness.base}/api/rooms/board/recordings"
    async with harness.http.get(url, params={"token": _signed(permissions)}) as response:
        assert response.status == 401


@pytest.mark.parametrize("settings", [Settings(secret=SECRET, reconnect_grace=0)])
async def test_a_token_without_permissions_may_take_part_but_not_record_or_download(harness: Harness) -> None:
    client, reply = await _join(
        harness, jwt.encode({"room": "board", "sub": "eve", "exp": time.time() + 60}, SECRET)
    )
    assert reply["permissions"] == {"publish": True, "subscribe": True, "record": False, "download": False}
    await client.send({"type": "start_recording", "id": "r"})
    assert (await client.expect("error"))["code"] == "forbidden"
    assert harness.node.recordings.running("board") is None
    # Booleans are taken as they are, false included.
    _, reply = await _join(harness, _signed({"publish": False, "record": True}, sub="ada"))
    assert reply["permissions"] == {"publish": False, "subscribe": True, "record": True, "download": False}


@pytest.mark.parametrize("settings", [Settings(secret=SECRET, reconnect_grace=30)])
async def test_an_expired_invite_cannot_resume_its_seat(harness: Harness) -> None:
    short = tokens.issue(SECRET, room="board", identity="eve", ttl=2)
    expires = jwt.decode(short, options={"verify_signature": False})["exp"]
    eve, eve_joined = await _join(harness, short)
    ada, ada_joined = await _join(harness, tokens.issue(SECRET, room="board", identity="ada"))
    for client in (eve, ada):
        await client.ws.close()
    await asyncio.sleep(max(0.0, expires - time.time()) + 0.1)

    again = await harness.connect()
    await again.send({"type": "join", "id": 2, "room": "board", "resume": eve_joined["resume_token"]})
    error = await again.expect("error")
    assert error["code"] == "resume_failed" and "expired" in error["message"], error
    # A valid invite resumes as ever, after the same time away.
    back = await harness.connect()
    await back.send({"type": "join", "id": 3, "room": "board", "resume": ada_joined["resume_token"]})
    resumed = await back.expect("joined")
    assert resumed["resumed"] is True and resumed["self"]["id"] == ada_joined["self"]["id"]


@pytest.mark.parametrize("settings", [Settings(reconnect_grace=30)])
async def test_a_resume_token_works_once(harness: Harness) -> None:
    ada, bob = await harness.connect(), await harness.connect()
    await ada.join("r", "Ada")
    first = await bob.join("r", "Bob")
    await bob.ws.close()
    again = await harness.connect()
    await again.send({"type": "join", "id": 1, "room": "r", "resume": first["resume_token"]})
    resumed = await again.expect("joined")
    assert resumed["resumed"] is True
    assert resumed["resume_token"] != first["resume_token"]

    # Whoever kept a copy of the used token can neither take the seat over nor end it.
    thief = await harness.connect()
    await thief.send({"type": "join", "id": 2, "room": "r", "resume": first["resume_token"]})
    assert (await thief.expect("error"))["code"] == "resume_failed"
    async with harness.http.post(f"{harness.base}/api/rooms/r/leave", data=first["resume_token"]) as resp:
        assert resp.status == 404
    await again.send({"type": "ping", "id": "still"})
    assert (await again.expect("pong"))["id"] == "still"
    assert await harness.metric("huddle_participants") == 2

    # The new token does both, once more.
    await again.ws.close()
    third = await harness.connect()
    await third.send({"type": "join", "id": 3, "room": "r", "resume": resumed["resume_token"]})
    assert (await third.expect("joined"))["self"]["id"] == first["self"]["id"]
