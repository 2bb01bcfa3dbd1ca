"""Strangers get nothing: REST recording control, downloads and metrics need a key or the right token, other
sites' pages cannot drive the server from a visitor's browser, every page carries security headers, the
node records only so many calls at once, and sockets that never join or stop answering are closed."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from pathlib import Path

import aiohttp
import pytest

from huddle.config import Settings
from huddle.signaling import tokens
from huddle.signaling.app import WEB_DIR

from .conftest import Harness

SECRET = "a secret long enough for HS256, 32+ bytes"
API_KEY = "the integration's api key"
FOREIGN = "http://evil.example"


def _key(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _token(room: str, **permissions: bool) -> str:
    return tokens.issue(SECRET, room=room, identity="u", permissions=tokens.Permissions(**permissions))


# -- REST recording control -------------------------------------------------------------------------------


async def test_open_mode_without_an_api_key_refuses_rest_recording_but_not_the_page(harness: Harness) -> None:
    ada = await harness.connect()
    joined = await ada.join("open", "Ada")
    assert joined["permissions"]["record"] is True
    url = f"{harness.base}/api/rooms/open/recordings"
    for _ in range(3):
        async with harness.http.post(url) as response:
            assert response.status == 403
            assert "--api-key" in await response.text()
    assert harness.node.recordings.running("open") is None

    # The call page's record button (signaling) still works for whoever is in the open room.
    await ada.send({"type": "start_recording", "id": "r", "outputs": ["tracks"]})
    started = (await ada.expect("recording"))["recording"]
    async with harness.http.delete(f"{url}/{started['id']}") as response:
        assert response.status == 403 and "--api-key" in await response.text()
    assert harness.node.recordings.running("open") is not None


@pytest.mark.parametrize("settings", [Settings(api_key=API_KEY, reconnect_grace=0)])
async def test_open_mode_with_an_api_key_needs_that_key(harness: Harness) -> None:
    ada = await harness.connect()
    await ada.join("open", "Ada")
    url = f"{harness.base}/api/rooms/open/recordings"
    for headers in ({}, _key("guessed"), _key(API_KEY + "x"), {"Authorization": API_KEY}):
        async with harness.http.post(url, headers=headers) as response:
            assert response.status == 401, headers
            assert "--api-key" in await response.text()
    assert harness.node.recordings.running("open") is None
    async with harness.http.post(url, json={"outputs": ["tracks"]}, headers=_key()) as response:
        assert response.status == 201
        started = await response.json()
    async with harness.http.delete(f"{url}/{started['id']}", headers=_key("guessed")) as response:
        assert response.status == 401
    async with harness.http.delete(f"{url}/{started['id']}", headers=_key()) as response:
        assert response.status == 200


@pytest.mark.parametrize("settings", [Settings(secret=SECRET, api_key=API_KEY, reconnect_grace=0)])
async def test_secret_mode_takes_a_record_token_or_the_api_key(harness: Harness) -> None:
    ada = await harness.connect()
    await ada.join("board", "x", token=_token("board"))
    url = f"{harness.base}/api/rooms/board/recordings"
    for headers, status in (
        ({}, 401),
        (_key("guessed"), 401),
        ({"Authorization": "Bearer " + _token("board")}, 403),
    ):
        async with harness.http.post(url, headers=headers) as response:
            assert response.status == status, headers
    async with harness.http.post(url, headers=_key(), json={"outputs": ["tracks"]}) as response:
        assert response.status == 201
        started = await response.json()
    async with harness.http.delete(f"{url}/{started['id']}?token={_token('board', record=True)}") as response:
        assert response.status == 200


# -- Origin -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings", [Settings(api_key=API_KEY, allowed_origins="https://app.example.com/", reconnect_grace=0)]
)
async def test_pages_of_other_sites_cannot_use_the_rest_api(harness: Harness) -> None:
    ada = await harness.connect()
    ada_joined = await ada.join("open", "Ada")
    url = f"{harness.base}/api/rooms/open/recordings"
    # A visitor's browser sends the key-less request with its own cookies and the attacker's Origin; even
    # with the key (a page that stole it) the foreign page is refused.
    for origin in (
        FOREIGN,
        "null",
        f"http://127.0.0.1:{harness.ports.http + 1}",
        "https://app.example.com.evil",
    ):
        async with harness.http.post(url, headers={"Origin": origin, **_key()}) as response:
            assert response.status == 403, origin
            assert "--allowed-origins" in await response.text()
    leave = f"{harness.base}/api/rooms/open/leave"
    async with harness.http.post(leave, data=ada_joined["resume_token"], headers={"Origin": FOREIGN}) as resp:
        assert resp.status == 403
    assert await harness.metric("huddle_errors_total", {"kind": "bad_origin"}) == 5
    assert harness.node.recordings.running("open") is None
    assert await harness.metric("huddle_participants") == 1

    # The server's own pages, the configured origins and programs that send no Origin are served.
    async with harness.http.post(
        url, headers={"Origin": harness.base, **_key()}, json={"outputs": ["tracks"]}
    ) as response:
        assert response.status == 201
        started = await response.json()
    async with harness.http.delete(
        f"{url}/{started['id']}", headers={"Origin": "https://APP.example.com", **_key()}
    ) as response:
        assert response.status == 200


@pytest.mark.parametrize("settings", [Settings(allowed_origins="https://app.example.com", reconnect_grace=0)])
async def test_pages_of_other_sites_cannot_open_the_websocket(harness: Harness) -> None:
    for origin in (FOREIGN, "null"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await harness.connect(origin=origin)
        assert refused.value.status == 403
    assert await harness.metric("huddle_errors_total", {"kind": "bad_origin"}) == 2
    assert await harness.metric("huddle_signaling_connections") == 0
    for origin in (harness.base, "https://app.example.com", None):
        client = await harness.connect(**({"origin": origin} if origin else {}))
        assert (await client.join("r", "Ada"))["type"] == "joined"
        await client.send({"type": "leave"})
        await client.closed()


# -- Headers ----------------------------------------------------------------------------------------------


async def test_every_response_carries_the_security_headers(harness: Harness) -> None:
    for path in (
        "/",
        "/r/x",
        "/r/x/recordings",
        "/static/client.js",
        "/static/style.css",
        "/healthz",
        "/nope",
    ):
        async with harness.http.get(harness.base + path) as response:
            headers = response.headers
            assert response.status == (404 if path == "/nope" else 200), path
        csp = {d.split()[0]: d.split()[1:] for d in headers["Content-Security-Policy"].split("; ")}
        assert csp["default-src"] == ["'self'"], path
        assert csp["script-src"] == ["'self'"] and csp["style-src"] == ["'self'"], path  # nothing inline
        assert csp["frame-ancestors"] == ["'none'"] and csp["object-src"] == ["'none'"], path
        assert csp["base-uri"] == ["'none'"], path
        assert f"ws://127.0.0.1:{harness.ports.http}" in csp["connect-src"], path
        assert headers["X-Frame-Options"] == "DENY", path
        assert headers["Referrer-Policy"] == "no-referrer", path
        assert headers["X-Content-Type-Options"] == "nosniff", path
        assert "camera=(self)" in headers["Permissions-Policy"], path
        assert "microphone=(self)" in headers["Permissions-Policy"], path


def test_the_pages_have_nothing_inline_that_the_policy_would_block() -> None:
    for page in sorted(WEB_DIR.glob("*.html")):
        html = page.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), f"inline script in {page.name}"
        assert "<style" not in html, f"inline style in {page.name}"
        assert not re.search(r"\s(style|on[a-z]+)=", html), f"inline style or handler in {page.name}"


# -- Metrics and downloads --------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [Settings(secret=SECRET, reconnect_grace=0)])
async def test_metrics_need_an_api_key_in_secret_mode(harness: Harness) -> None:
    async with harness.http.get(harness.base + "/metrics") as response:
        assert response.status == 403 and "--api-key" in await response.text()
    async with harness.http.get(harness.base + "/metrics", headers=_key()) as response:
        assert response.status == 403  # no key was configured, so none is right


@pytest.mark.parametrize("settings", [Settings(secret=SECRET, api_key=API_KEY, reconnect_grace=0)])
async def test_metrics_with_the_api_key(harness: Harness) -> None:
    for headers in ({}, _key("guessed"), {"Authorization": "Bearer " + _token("board", record=True)}):
        async with harness.http.get(harness.base + "/metrics", headers=headers) as response:
            assert response.status == 401, headers
    async with harness.http.get(harness.base + "/metrics", headers=_key()) as response:
        assert response.status == 200 and "huddle_rooms" in await response.text()


@pytest.mark.parametrize("settings", [Settings(secret=SECRET, api_key=API_KEY, reconnect_grace=0)])
async def test_downloads_need_the_download_permission(harness: Harness) -> None:
    folder = Path(harness.node.settings.recordings_dir) / "board" / "20261125T120000Z-abcdef"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text('{"tracks": []}')
    listing = f"{harness.base}/api/rooms/board/recordings"
    url = f"{listing}/20261125T120000Z-abcdef/files/manifest.json"

    viewer = _token("board", record=True)
    async with harness.http.get(listing, params={"token": viewer}) as response:
        body = await response.json()
        assert [r["id"] for r in body["recordings"]] == ["20261125T120000Z-abcdef"]
        assert body["download"] is False  # the page shows names without links
    async with harness.http.get(url, params={"token": viewer}) as response:
        assert response.status == 403 and "download" in await response.text()
    async with harness.http.get(
        url, params={"token": tokens.issue(SECRET, room="other", identity="u")}
    ) as response:
        assert response.status == 401

    downloader = _token("board", download=True)
    async with harness.http.get(listing, params={"token": downloader}) as response:
        assert (await response.json())["download"] is True
    for params, headers in (({"token": downloader}, {}), ({}, _key())):
        async with harness.http.get(url, params=params, headers=headers) as response:
            assert response.status == 200
            assert await response.text() == '{"tracks": []}'


# -- The recording cap ------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [Settings(max_recordings=1, api_key=API_KEY, reconnect_grace=0)])
async def test_the_node_records_at_most_max_recordings_calls(harness: Harness) -> None:
    clients = {}
    for room in ("one", "two"):
        clients[room] = await harness.connect()
        await clients[room].join(room, "Ada")
    await clients["one"].send({"type": "start_recording", "id": "r1", "outputs": ["tracks"]})
    assert (await clients["one"].expect("recording"))["recording"]["state"] == "recording"

    await clients["two"].send({"type": "start_recording", "id": "r2", "outputs": ["tracks"]})
    error = await clients["two"].expect("error")
    assert (error["code"], error["id"]) == ("too_many_recordings", "r2")
    assert "--max-recordings" in error["message"]
    async with harness.http.post(f"{harness.base}/api/rooms/two/recordings", headers=_key()) as response:
        assert response.status == 503
        body = await response.json()
    assert body["error"] == "too_many_recordings" and "--max-recordings" in body["message"]
    assert harness.node.recordings.running("two") is None
    assert harness.node.calls.get("two").mode == "p2p"  # the refused call was left as it was


# -- Sockets that do not join, or stop answering ----------------------------------------------------------


async def test_a_websocket_that_does_not_join_within_10_s_is_closed(harness: Harness) -> None:
    started = time.monotonic()
    idle, pinging, joined = await harness.connect(), await harness.connect(), await harness.connect()
    await joined.join("r", "Ada")

    async def keep_pinging() -> int:
        # Pings are answered but are not a join.
        while True:
            await pinging.send({"type": "ping"})
            msg = await pinging.ws.receive(timeout=1.0)
            if msg.type == aiohttp.WSMsgType.CLOSE:
                return msg.data
            assert msg.type == aiohttp.WSMsgType.TEXT
            with contextlib.suppress(TimeoutError):
                msg = await pinging.ws.receive(timeout=0.5)
                assert msg.type == aiohttp.WSMsgType.CLOSE, msg
                return msg.data

    async def stay(stop: asyncio.Event) -> None:
        # Reading answers the server's heartbeat pings, as a live page does.
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                msg = await joined.ws.receive(timeout=0.2)
                assert msg.type == aiohttp.WSMsgType.TEXT, msg

    stop = asyncio.Event()
    staying = asyncio.create_task(stay(stop))
    codes = await asyncio.gather(idle.closed(timeout=13), asyncio.wait_for(keep_pinging(), 13))
    elapsed = time.monotonic() - started
    stop.set()
    await staying
    assert codes == [1008, 1008]
    assert idle.ws.close_code == 1008 and 9.5 < elapsed < 12, elapsed
    assert await harness.metric("huddle_errors_total", {"kind": "join_timeout"}) == 2
    # The one that joined stays.
    await joined.send({"type": "ping", "id": "here"})
    assert (await joined.expect("pong"))["id"] == "here"
    assert await harness.metric("huddle_signaling_connections") == 1


async def test_a_socket_that_stops_answering_pings_is_counted_as_a_heartbeat_timeout(
    harness: Harness,
) -> None:
    silent = await harness.connect(autoping=False)
    await silent.join("r", "Ada")
    started = time.monotonic()
    while True:  # read without answering the server's pings, as a frozen peer would
        msg = await silent.ws.receive(timeout=10)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            break
    assert time.monotonic() - started < 8
    for _ in range(50):
        if await harness.metric("huddle_errors_total", {"kind": "heartbeat_timeout"}):
            break
        await asyncio.sleep(0.1)
    assert await harness.metric("huddle_errors_total", {"kind": "heartbeat_timeout"}) == 1
    assert await harness.metric("huddle_errors_total", {"kind": "protocol_violation"}) == 0
