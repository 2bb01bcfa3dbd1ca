"""Who may start and stop recordings, over signaling and the REST API, and what participants are told; bad
requests get clear errors and leave the call as it was."""

from __future__ import annotations

import socket

import pytest

from huddle.config import Settings
from huddle.signaling import tokens

from .conftest import Harness

SECRET = "a secret long enough for HS256, 32+ bytes"
API_KEY = "an api key for the integration"


def token(room: str, identity: str, record: bool) -> str:
    return tokens.issue(
        SECRET, room=room, identity=identity, name=identity, permissions=tokens.Permissions(record=record)
    )


@pytest.mark.parametrize("settings", [Settings(secret=SECRET, reconnect_grace=0)])
async def test_only_tokens_with_the_record_permission_start_and_stop(harness: Harness) -> None:
    room = "board"
    viewer = await harness.connect()
    joined = await viewer.join(room, "x", token=token(room, "viewer", record=False))
    assert joined["permissions"]["record"] is False and joined["recording"] is None
    await viewer.send({"type": "start_recording", "id": "r1"})
    error = await viewer.expect("error")
    assert (error["code"], error["id"]) == ("forbidden", "r1")

    # REST: no token, a token without the permission, then one with it.
    url = f"{harness.base}/api/rooms/{room}/recordings"
    async with harness.http.post(url) as response:
        assert response.status == 401
    headers = {"Authorization": "Bearer " + token(room, "viewer", record=False)}
    async with harness.http.post(url, headers=headers) as response:
        assert response.status == 403
    async with harness.http.get(url, headers=headers) as response:
        assert response.status == 200  # listing needs the room, not the record permission
    async with harness.http.get(url + "?token=" + token("other", "x", record=True)) as response:
        assert response.status == 401

    host = await harness.connect()
    await host.join(room, "x", token=token(room, "host", record=True))
    await viewer.expect("participant_joined")
    await host.send({"type": "start_recording", "id": 2, "outputs": ["tracks"]})
    for client in (host, viewer):  # everyone is told, and the 1:1 call moved to the SFU for it
        message = await client.expect("recording")
        assert message["recording"]["state"] == "recording"
        assert message["recording"]["outputs"] == ["tracks"]
    assert harness.node.calls.get(room).mode == "sfu"

    late = await harness.connect()
    joined = await late.join(room, "x", token=token(room, "late", record=False))
    assert joined["recording"]["state"] == "recording"  # who joins later sees it at once

    await host.send({"type": "start_recording", "id": 3})
    assert (await host.expect("error"))["code"] == "already_recording"
    await viewer.send({"type": "stop_recording", "id": 4})
    assert (await viewer.expect("error"))["code"] == "forbidden"
    await host.send({"type": "stop_recording", "id": 5})
    for client in (host, viewer, late):
        assert (await client.expect("recording"))["recording"]["state"] == "processing"
    await host.send({"type": "stop_recording", "id": 6})
    assert (await host.expect("error"))["code"] == "not_recording"


@pytest.mark.parametrize("settings", [Settings(api_key=API_KEY, reconnect_grace=0)])
async def test_bad_recording_requests_get_clear_errors(harness: Harness) -> None:
    room = "open"
    url = f"{harness.base}/api/rooms/{room}/recordings"
    key = {"Authorization": f"Bearer {API_KEY}"}
    async with harness.http.post(url, headers=key) as response:
        assert response.status == 404  # nobody in the room: nothing to record
        assert (await response.json())["error"] == "not_found"
    client = await harness.connect()
    await client.join(room, "Ada")
    await client.send({"type": "start_recording", "id": 1, "outputs": ["hologram"]})
    assert (await client.expect("error"))["code"] == "bad_message"
    async with harness.http.post(url, data=b"{not json", headers=key) as response:
        assert response.status == 400
    async with harness.http.post(url, json={"outputs": "composite"}, headers=key) as response:
        assert response.status == 400
    async with harness.http.post(url, json={"outputs": ["hologram"]}, headers=key) as response:
        assert response.status == 400
    async with harness.http.delete(url + "/nope", headers=key) as response:
        assert response.status == 404
    async with harness.http.get(url + "/nope/files/..%2F..%2Fetc%2Fpasswd") as response:
        assert response.status == 404
    async with harness.http.get(f"{harness.base}/api/rooms/bad%20name/recordings") as response:
        assert response.status == 400
    # The call is untouched by all of it.
    await client.send({"type": "ping", "id": 9})
    assert (await client.expect("pong"))["id"] == 9
    assert harness.node.recordings.running(room) is None


def _dead_endpoint() -> str:
    """An S3 endpoint where nothing listens (a port just freed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize(
    "settings",
    [Settings(s3_endpoint=_dead_endpoint(), s3_bucket="b", s3_access_key="k", s3_secret_key="s")],
)
async def test_an_unreachable_store_is_named_in_a_clear_error(harness: Harness) -> None:
    url = f"{harness.base}/api/rooms/open/recordings"
    async with harness.http.get(url) as response:
        assert response.status == 503
        body = await response.json()
    assert body["error"] == "store_unreachable" and "127.0.0.1" in body["message"]
    async with harness.http.get(url + "/20261125T120000Z-abcdef/files/manifest.json") as response:
        assert response.status == 503
