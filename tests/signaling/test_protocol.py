"""The signaling protocol as two clients in a room see it (docs/protocol.md)."""

from __future__ import annotations

import asyncio
import time

import pytest

from huddle.config import Settings

from .conftest import Harness


async def test_join_lists_participants_and_hands_out_our_stun_and_turn_servers(harness: Harness) -> None:
    ada = await harness.connect()
    joined = await ada.join("standup", "Ada")
    assert joined["id"] == "j"
    assert joined["participants"] == []
    assert joined["mode"] == "p2p"
    assert joined["self"]["name"] == "Ada"
    stun, turn = joined["ice_servers"]
    assert stun == {"urls": [f"stun:127.0.0.1:{harness.ports.stun}"]}
    port = harness.ports.stun  # the relay shares the STUN port, UDP and TCP
    assert turn["urls"] == [f"turn:127.0.0.1:{port}?transport=udp", f"turn:127.0.0.1:{port}?transport=tcp"]
    expiry, _, identity = turn["username"].partition(":")
    assert identity == joined["self"]["identity"] and int(expiry) > time.time() + 3600
    assert turn["credential"]

    bob = await harness.connect()
    joined_bob = await bob.join("standup", "  Bob  ")
    assert [p["name"] for p in joined_bob["participants"]] == ["Ada"]
    assert joined_bob["self"]["name"] == "Bob"
    seen = await ada.expect("participant_joined")
    assert seen["participant"]["id"] == joined_bob["self"]["id"]
    assert seen["participant"]["name"] == "Bob"


async def test_offer_answer_and_candidates_are_relayed_between_the_two_peers(harness: Harness) -> None:
    ada, bob = await harness.connect(), await harness.connect()
    ada_id = (await ada.join("pair", "Ada"))["self"]["id"]
    bob_id = (await bob.join("pair", "Bob"))["self"]["id"]
    await ada.expect("participant_joined")

    await bob.send({"type": "offer", "to": ada_id, "sdp": "v=0\r\noffer"})
    offer = await ada.expect("offer")
    assert offer == {"type": "offer", "from": bob_id, "sdp": "v=0\r\noffer"}

    await ada.send({"type": "answer", "to": bob_id, "sdp": "v=0\r\nanswer"})
    assert (await bob.expect("answer"))["sdp"] == "v=0\r\nanswer"

    cand = {
        "candidate": "candidate:1 1 udp 2122260223 127.0.0.1 50123 typ host",
        "sdpMid": "0",
        "sdpMLineIndex": 0,
    }
    await ada.send({"type": "candidate", "to": bob_id, "candidate": cand})
    relayed = await bob.expect("candidate")
    assert relayed["from"] == ada_id and relayed["candidate"] == cand
    await ada.send({"type": "candidate", "to": bob_id, "candidate": None})
    assert (await bob.expect("candidate"))["candidate"] is None


async def test_rooms_are_separate(harness: Harness) -> None:
    ada, eve = await harness.connect(), await harness.connect()
    await ada.join("one", "Ada")
    eve_id = (await eve.join("two", "Eve"))["self"]["id"]
    await ada.send({"type": "offer", "id": 5, "to": eve_id, "sdp": "v=0"})
    error = await ada.expect("error")
    assert error["code"] == "unknown_participant" and error["id"] == 5
    assert eve.ws.closed is False
    await eve.send({"type": "ping", "id": "p"})
    assert (await eve.recv())["type"] == "pong"  # nothing from room "one" reached Eve


async def test_mute_and_camera_state_reach_everyone(harness: Harness) -> None:
    ada, bob = await harness.connect(), await harness.connect()
    await ada.join("r", "Ada")
    bob_id = (await bob.join("r", "Bob"))["self"]["id"]
    await bob.send({"type": "media", "audio": False})
    for client in (ada, bob):
        update = await client.expect("participant_updated")
        assert update["participant"]["id"] == bob_id
        assert update["participant"]["audio"] is False and update["participant"]["video"] is True
    carol = await harness.connect()
    listed = (await carol.join("r", "Carol"))["participants"]
    assert [(p["name"], p["audio"]) for p in listed] == [("Ada", True), ("Bob", False)]


async def test_leave_and_closed_socket_are_announced(harness: Harness) -> None:
    ada, bob, carol = await harness.connect(), await harness.connect(), await harness.connect()
    await ada.join("r", "Ada")
    bob_id = (await bob.join("r", "Bob"))["self"]["id"]
    carol_id = (await carol.join("r", "Carol"))["self"]["id"]

    await bob.send({"type": "leave"})
    left = await ada.expect("participant_left")
    assert left == {"type": "participant_left", "id": bob_id, "reason": "left"}
    assert await bob.closed() == 1000

    await carol.ws.close()
    left = await ada.expect("participant_left")
    assert left == {"type": "participant_left", "id": carol_id, "reason": "disconnected"}
    assert await harness.metric("huddle_participants") == 1


@pytest.mark.parametrize("settings", [Settings(reconnect_grace=1)])
async def test_a_vanished_client_is_gone_for_the_others_within_10_seconds(harness: Harness) -> None:
    ada = await harness.connect()
    await ada.join("r", "Ada")
    # autoping off and never reading: the server's WebSocket pings go unanswered, as from a frozen tab
    # or a machine whose network vanished without closing the TCP connection.
    ghost = await harness.connect(autoping=False)
    await ghost.send({"type": "join", "room": "r", "name": "Ghost"})
    joined = await ada.expect("participant_joined")
    loop = asyncio.get_running_loop()
    started = loop.time()
    # First shown as reconnecting (it may come back), then removed when the grace period is over.
    update = await ada.expect("participant_updated", timeout=10)
    assert update["participant"]["id"] == joined["participant"]["id"]
    assert update["participant"]["connection"] == "reconnecting"
    assert loop.time() - started < 10
    left = await ada.expect("participant_left", timeout=5)
    assert left["id"] == joined["participant"]["id"] and left["reason"] == "timeout"


async def test_ping_is_answered_with_the_request_id(harness: Harness) -> None:
    client = await harness.connect()
    await client.send({"type": "ping", "id": 41})
    pong = await client.recv()
    assert pong["type"] == "pong" and pong["id"] == 41 and pong["time"] > 0


async def test_in_open_rooms_two_tabs_with_one_name_are_two_participants(harness: Harness) -> None:
    a1, a2 = await harness.connect(), await harness.connect()
    first = await a1.join("r", "Ada")
    second = await a2.join("r", "Ada")
    assert [p["id"] for p in second["participants"]] == [first["self"]["id"]]
    assert first["self"]["identity"] != second["self"]["identity"]


@pytest.mark.parametrize("settings", [Settings(max_participants=3)])
async def test_room_capacity(harness: Harness) -> None:
    room_size = 3
    clients = [await harness.connect() for _ in range(room_size)]
    for i, client in enumerate(clients):
        await client.join("big", f"P{i}")
    late = await harness.connect()
    await late.send({"type": "join", "id": 1, "room": "big", "name": "Late"})
    error = await late.expect("error")
    assert error["code"] == "room_full"


async def test_healthz_and_metrics(harness: Harness) -> None:
    async with harness.http.get(harness.base + "/healthz") as resp:
        assert resp.status == 200
    ada = await harness.connect()
    await ada.join("r", "Ada")
    await ada.send({"type": "ping"})
    await ada.recv()
    async with harness.http.get(harness.base + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    assert "huddle_rooms 1.0" in text
    assert "huddle_participants 1.0" in text
    assert 'huddle_signaling_messages_total{type="join"} 1.0' in text
    assert 'huddle_signaling_messages_total{type="ping"} 1.0' in text


async def test_call_page_and_client_are_served(harness: Harness) -> None:
    for path in ("/", "/r/standup", "/static/client.js", "/static/call.js", "/static/style.css"):
        async with harness.http.get(harness.base + path) as resp:
            assert resp.status == 200, path
            assert len(await resp.read()) > 100, path


@pytest.mark.parametrize("settings", [Settings(reconnect_grace=5)])
async def test_a_dropped_client_resumes_with_its_identity_within_the_grace_period(harness: Harness) -> None:
    ada, bob = await harness.connect(), await harness.connect()
    await ada.join("r", "Ada")
    bob_joined = await bob.join("r", "Bob")
    await ada.expect("participant_joined")
    await bob.ws.close()
    update = await ada.expect("participant_updated")
    assert update["participant"]["connection"] == "reconnecting"

    again = await harness.connect()
    await again.send({"type": "join", "id": 2, "room": "r", "resume": bob_joined["resume_token"]})
    resumed = await again.expect("joined")
    assert resumed["resumed"] is True
    assert resumed["self"]["id"] == bob_joined["self"]["id"]
    assert resumed["self"]["name"] == "Bob"
    assert [p["name"] for p in resumed["participants"]] == ["Ada"]
    update = await ada.expect("participant_updated")
    assert update["participant"]["connection"] == "connected"
    # Messages reach Bob over his new connection, and nobody ever saw him leave.
    await ada.send({"type": "offer", "to": bob_joined["self"]["id"], "sdp": "v=0"})
    assert (await again.expect("offer"))["from"] == ada_joined_id(resumed)
    assert await harness.metric("huddle_participants") == 2


def ada_joined_id(joined: dict) -> str:
    return joined["participants"][0]["id"]


@pytest.mark.parametrize("settings", [Settings(reconnect_grace=5)])
async def test_resume_with_a_wrong_or_used_up_token_fails_clearly(harness: Harness) -> None:
    bob = await harness.connect()
    token = (await bob.join("r", "Bob"))["resume_token"]
    for room, resume in (("r", "not-a-token"), ("other", token)):
        client = await harness.connect()
        await client.send({"type": "join", "id": 1, "room": room, "resume": resume})
        assert (await client.expect("error"))["code"] == "resume_failed"
    await bob.send({"type": "leave"})
    await bob.closed()
    late = await harness.connect()
    await late.send({"type": "join", "id": 1, "room": "r", "resume": token})
    assert (await late.expect("error"))["code"] == "resume_failed"


@pytest.mark.parametrize("settings", [Settings(reconnect_grace=30)])
async def test_a_closing_page_without_a_socket_leaves_with_its_resume_token(harness: Harness) -> None:
    ada, bob = await harness.connect(), await harness.connect()
    await ada.join("r", "Ada")
    bob_joined = await bob.join("r", "Bob")
    await bob.ws.close()
    assert (await ada.expect("participant_updated"))["participant"]["connection"] == "reconnecting"
    # What navigator.sendBeacon sends from the page's pagehide handler.
    url = f"{harness.base}/api/rooms/r/leave"
    async with harness.http.post(url, data="wrong-token") as resp:
        assert resp.status == 404
    async with harness.http.post(url, data=bob_joined["resume_token"]) as resp:
        assert resp.status == 204
    left = await ada.expect("participant_left")
    assert left == {"type": "participant_left", "id": bob_joined["self"]["id"], "reason": "left"}


async def test_room_stats_say_who_is_there_and_in_which_mode(harness: Harness) -> None:
    async with harness.http.get(harness.base + "/api/rooms/empty") as resp:
        assert resp.status == 404
    async with harness.http.get(harness.base + "/api/rooms/bad%20name") as resp:
        assert resp.status == 400
    ada = await harness.connect()
    await ada.join("stats", "Ada")
    async with harness.http.get(harness.base + "/api/rooms/stats") as resp:
        body = await resp.json()
    assert body["mode"] == "p2p" and body["sfu"] is None
    assert [p["name"] for p in body["participants"]] == ["Ada"]


@pytest.mark.parametrize("settings", [Settings(sfu_always=True), Settings()], ids=["sfu", "p2p"])
async def test_video_sizes_are_taken_in_either_mode_and_checked(harness: Harness) -> None:
    ada, bob = await harness.connect(), await harness.connect()
    await ada.join("sizes", "Ada")
    bob_id = (await bob.join("sizes", "Bob"))["self"]["id"]
    for sizes in ({}, {bob_id: [1280, 720]}, {bob_id: [0, 0], "p_gone": [320, 180]}):
        await ada.send({"type": "video_sizes", "id": "video-sizes-1", "sizes": sizes})
    for bad in ({bob_id: [1280]}, {bob_id: [-1, 10]}, {bob_id: [99999, 10]}, [1, 2]):
        await ada.send({"type": "video_sizes", "id": "v", "sizes": bad})
        error = await ada.expect("error")
        assert error["code"] == "bad_message" and error["id"] == "v"
    await ada.send({"type": "ping", "id": "alive"})
    assert (await ada.expect("pong"))["id"] == "alive"
