"""Join tokens: with --secret, only a valid token for this room gets in."""

from __future__ import annotations

import time

import jwt
import pytest

from huddle.config import Settings
from huddle.signaling import tokens

from .conftest import Client, Harness

SECRET = "correct horse battery staple"
secret_settings = pytest.mark.parametrize("settings", [Settings(secret=SECRET)])


async def _join_with(harness: Harness, room: str, token: str | None) -> tuple[Client, dict]:
    client = await harness.connect()
    message = {"type": "join", "id": 1, "room": room, "name": "Someone Else"}
    if token is not None:
        message["token"] = token
    await client.send(message)
    return client, await client.recv()


async def _refused(client: Client) -> None:
    assert await client.closed() == 4001


@secret_settings
async def test_a_valid_token_admits_with_its_identity_name_and_permissions(harness: Harness) -> None:
    token = tokens.issue(
        SECRET,
        room="board",
        identity="u-42",
        name="Ada Lovelace",
        permissions=tokens.Permissions(publish=False, download=True),
    )
    _, reply = await _join_with(harness, "board", token)
    assert reply["type"] == "joined"
    assert reply["self"]["identity"] == "u-42"
    assert reply["self"]["name"] == "Ada Lovelace"  # the token's name wins over the one sent
    assert reply["permissions"] == {"publish": False, "subscribe": True, "record": False, "download": True}


@secret_settings
@pytest.mark.parametrize(
    ("make_token", "code"),
    [
        (lambda: None, "unauthorized"),
        (lambda: "not.a.jwt", "unauthorized"),
        (lambda: tokens.issue("some other secret", room="board", identity="u"), "unauthorized"),
        (
            lambda: tokens.issue(SECRET, room="board", identity="u", ttl=60, now=time.time() - 3600),
            "token_expired",
        ),
        (lambda: tokens.issue(SECRET, room="elsewhere", identity="u"), "wrong_room"),
        (
            lambda: jwt.encode({"room": "board", "sub": "u", "exp": time.time() + 60}, SECRET, "HS512"),
            "unauthorized",
        ),
        (lambda: jwt.encode({"room": "board", "sub": "u"}, SECRET, "HS256"), "unauthorized"),
    ],
    ids=["missing", "malformed", "forged", "expired", "wrong-room", "other-algorithm", "no-expiry"],
)
async def test_bad_tokens_are_refused_with_a_clear_error(harness: Harness, make_token, code: str) -> None:
    client, reply = await _join_with(harness, "board", make_token())
    assert reply["type"] == "error" and reply["code"] == code, reply
    assert reply["message"]
    await _refused(client)
    assert await harness.metric("huddle_errors_total", {"kind": code}) == 1
    assert await harness.metric("huddle_participants") == 0


@secret_settings
async def test_a_tampered_token_is_refused(harness: Harness) -> None:
    token = tokens.issue(SECRET, room="board", identity="guest")
    header, _payload, signature = token.split(".")
    forged = jwt.encode({"room": "board", "sub": "admin", "exp": time.time() + 60}, "x", "HS256").split(".")[
        1
    ]
    client, reply = await _join_with(harness, "board", f"{header}.{forged}.{signature}")
    assert reply["code"] == "unauthorized"
    await _refused(client)


@secret_settings
async def test_the_same_identity_joining_again_replaces_the_first(harness: Harness) -> None:
    watcher, _ = await _join_with(harness, "board", tokens.issue(SECRET, room="board", identity="w"))
    first, reply1 = await _join_with(harness, "board", tokens.issue(SECRET, room="board", identity="ada"))
    await watcher.expect("participant_joined")
    _second, reply2 = await _join_with(harness, "board", tokens.issue(SECRET, room="board", identity="ada"))
    left = await watcher.expect("participant_left")
    assert left == {"type": "participant_left", "id": reply1["self"]["id"], "reason": "replaced"}
    joined = await watcher.expect("participant_joined")
    assert joined["participant"]["id"] == reply2["self"]["id"]
    assert await first.closed() == 4002
    assert [p["identity"] for p in reply2["participants"]] == ["w"]


def test_token_round_trip_and_claims() -> None:
    token = tokens.issue(SECRET, room="r", identity="id", ttl=30, now=1_000_000)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert claims == {
        "room": "r",
        "sub": "id",
        "name": "id",
        "iat": 1_000_000,
        "exp": 1_000_030,
        "permissions": {"publish": True, "subscribe": True, "record": False, "download": False},
    }
    grant = tokens.verify(SECRET, tokens.issue(SECRET, room="r", identity="id", name=" Ada "), "r")
    assert (grant.identity, grant.name) == ("id", "Ada")


@secret_settings
async def test_room_stats_need_a_token_for_that_room(harness: Harness) -> None:
    await _join_with(harness, "board", tokens.issue(SECRET, room="board", identity="ada"))
    url = f"{harness.base}/api/rooms/board"
    async with harness.http.get(url) as resp:
        assert resp.status == 401
    async with harness.http.get(
        url, params={"token": tokens.issue(SECRET, room="other", identity="x")}
    ) as resp:
        assert resp.status == 401
    headers = {"Authorization": "Bearer " + tokens.issue(SECRET, room="board", identity="x")}
    async with harness.http.get(url, headers=headers) as resp:
        assert resp.status == 200
        assert [p["identity"] for p in (await resp.json())["participants"]] == ["ada"]
