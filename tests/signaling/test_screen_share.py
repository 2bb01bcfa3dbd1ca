"""Screen sharing over signaling (docs/protocol.md, `media`, `sfu_offer`, `video_sizes`): the participant's
`screen` state reaches everyone, a publish offer names its screen sections in `sources` (checked), the
screen reaches subscribers as a stream of its own (`<participant id>~screen`) that `video_sizes` sizes on its
own, and a stopped screen leaves every subscriber's next offer. No media flows here (tests/interop has it)."""

from __future__ import annotations

import asyncio
import copy

import pytest

from huddle.config import Settings
from huddle.loadtest.negotiation import AUDIO_MID, VIDEO_MID, publish_offer
from huddle.rtc import sdp
from tests.signaling.conftest import Client, Harness
from tests.signaling.test_offer_limits import chromium_like_answer

FINGERPRINT = ":".join(f"{b:02X}" for b in range(32))
SCREEN_MID = "2"


def publish_sdp(screen: str | None = "sendonly") -> str:
    """A publish offer as a browser sharing its screen writes it: microphone, simulcast camera and one
    single-layer video section for the screen (`screen` is its direction; None: no such section)."""
    desc = sdp.parse(
        publish_offer(
            ufrag="abcd",
            pwd="0123456789abcdefghijkl",
            fingerprint=FINGERPRINT,
            host=("127.0.0.1", 9),
            session_id=1,
            stream_id="camera-stream",
            audio_ssrc=1234,
        )
    )
    if screen is not None:
        section = copy.deepcopy(desc.media_by_mid(VIDEO_MID))
        assert section is not None
        section.mid = SCREEN_MID
        section.rids, section.simulcast = [], None
        section.direction = screen
        section.msids = [sdp.Msid("screen-stream", "screen-track")]
        desc.media.append(section)
        desc.groups = [sdp.Group("BUNDLE", [m.mid for m in desc.media if m.mid is not None])]
    return sdp.serialize(desc)


def msids(offer_text: str) -> dict[str, str]:
    """mid → stream id of each sending section of a subscribe offer."""
    desc = sdp.parse(offer_text)
    return {m.mid: m.msids[0].stream_id for m in desc.media if m.direction == "sendonly" and m.msids}


async def publish(client: Client, sources: dict[str, str] | None, screen: str | None = "sendonly") -> dict:
    message = {"type": "sfu_offer", "pc": "publish", "id": "pub", "sdp": publish_sdp(screen)}
    if sources is not None:
        message["sources"] = sources
    await client.send(message)
    while True:
        reply = await client.recv()
        if reply["type"] in ("sfu_answer", "error"):
            return reply


async def test_screen_state_reaches_everyone_and_late_joiners_and_clears_its_stream(harness: Harness):
    ada, bob = await harness.connect(), await harness.connect()
    joined = await ada.join("screens", "Ada")
    assert joined["self"]["screen"] is False and joined["self"]["screen_stream"] is None
    ada_id = joined["self"]["id"]
    await bob.join("screens", "Bob")
    stream = "{6f1e0c0a-3b7d-4c52-9a57-0f4f1d2b8e11}"
    await ada.send({"type": "media", "screen": True, "screen_stream": stream})
    update = (await bob.expect("participant_updated"))["participant"]
    assert (update["id"], update["screen"], update["screen_stream"]) == (ada_id, True, stream)
    assert update["video"] is True  # the camera's state is its own
    late = await harness.connect()
    seen = [p for p in (await late.join("screens", "Cy"))["participants"] if p["id"] == ada_id]
    assert [(p["screen"], p["screen_stream"]) for p in seen] == [(True, stream)]
    await ada.send({"type": "media", "screen": False})
    update = (await bob.expect("participant_updated"))["participant"]
    assert (update["screen"], update["screen_stream"]) == (False, None)


async def test_bad_screen_fields_get_clear_errors(harness: Harness):
    ada = await harness.connect()
    await ada.join("bad-screens", "Ada")
    for bad, where in (
        ({"screen": "yes"}, "screen"),
        ({"screen": True, "screen_stream": "x" * 65}, "screen_stream"),
        ({"screen": True, "screen_stream": "has space"}, "screen_stream"),
    ):
        await ada.send({"type": "media", "id": "m", **bad})
        error = await ada.expect("error")
        assert error["code"] == "bad_message" and error["id"] == "m", error
        assert error["message"].startswith(f"media: {where}:"), error


@pytest.fixture
def settings() -> Settings:
    return Settings(reconnect_grace=0, sfu_always=True)


@pytest.mark.parametrize(
    ("sources", "code", "text"),
    [
        (
            {SCREEN_MID: "camera"},
            "bad_message",
            "sfu_offer: sources.2: Input should be 'screen' or 'screen_audio'",
        ),
        (
            {"2": "screen", "3": "screen"},
            "bad_message",
            "at most one 'screen' and one 'screen_audio' section",
        ),
        (
            {"2": "screen", "3": "screen_audio", "4": "screen"},
            "bad_message",
            "sources: Dictionary should have",
        ),
        ({"x" * 33: "screen"}, "bad_message", "sfu_offer: sources.xxxx"),
        ({"7": "screen"}, "bad_sdp", "sources: mid '7' is not a sending m-section of this offer"),
        ({AUDIO_MID: "screen"}, "bad_sdp", "sources: mid '0' is audio, and screen must be video"),
        (
            {SCREEN_MID: "screen_audio"},
            "bad_sdp",
            "sources: mid '2' is video, and screen_audio must be audio",
        ),
    ],
)
async def test_bad_sources_are_refused_by_name_and_change_nothing(
    harness: Harness, sources: dict[str, str], code: str, text: str
):
    ada = await harness.connect()
    await ada.join("bad-sources", "Ada")
    reply = await publish(ada, sources)
    assert reply["type"] == "error" and reply["code"] == code and reply["id"] == "pub", reply
    assert text in reply["message"], reply
    room = harness.node.calls.get("bad-sources")
    assert room is not None and room.router is not None
    assert all(not peer.producers for peer in room.router.peers.values())


async def test_an_inactive_screen_section_cannot_be_named(harness: Harness):
    ada = await harness.connect()
    await ada.join("inactive-screen", "Ada")
    reply = await publish(ada, {SCREEN_MID: "screen"}, screen="inactive")
    assert reply["code"] == "bad_sdp" and "mid '2' is not a sending m-section" in reply["message"], reply


async def subscribe_offer(client: Client) -> str:
    """The next subscribe offer, answered as a browser would (so that the next one may come)."""
    offer = await client.expect("sfu_offer")
    await client.send(
        {
            "type": "sfu_answer",
            "pc": "subscribe",
            "revision": offer["revision"],
            "sdp": chromium_like_answer(offer["sdp"]),
        }
    )
    return offer["sdp"]


async def test_the_screen_is_a_stream_of_its_own_sized_on_its_own_and_leaves_when_stopped(harness: Harness):
    ada, bob = await harness.connect(), await harness.connect()
    ada_id = (await ada.join("share", "Ada"))["self"]["id"]
    bob_id = (await bob.join("share", "Bob"))["self"]["id"]
    reply = await publish(ada, {SCREEN_MID: "screen"})
    assert reply["type"] == "sfu_answer", reply

    streams = msids(await subscribe_offer(bob))
    assert sorted(streams.values()) == sorted([ada_id, ada_id, f"{ada_id}~screen"])
    router = harness.node.calls.get("share").router
    producers = router.peers[ada_id].producers
    assert {mid: p.track_source for mid, p in producers.items()} == {
        AUDIO_MID: "microphone",
        VIDEO_MID: "camera",
        SCREEN_MID: "screen",
    }
    consumers = router.peers[bob_id].consumers
    camera, screen = consumers[producers[VIDEO_MID].id], consumers[producers[SCREEN_MID].id]

    async def wanted(sizes: dict[str, list[int]]) -> tuple[int | None, int | None]:
        before = (camera.wanted, screen.wanted)
        await bob.send({"type": "video_sizes", "sizes": sizes})
        for _ in range(50):  # the allocation runs on a later loop turn
            await asyncio.sleep(0.02)
            if (camera.wanted, screen.wanted) != before:
                break
        return camera.wanted, screen.wanted

    # Before any sizes everyone gets thumbnails: the lowest layer of both.
    assert (camera.wanted, screen.wanted) == (0, 0)
    # The screen on the stage, the camera hidden: the screen's one layer, nothing of the camera.
    assert await wanted({f"{ada_id}~screen": [1280, 720]}) == (None, 0)
    # The camera large and the screen not shown: the camera's top layer, nothing of the screen.
    assert await wanted({ada_id: [1280, 720]}) == (2, None)

    # Sharing stops: the section goes inactive in the next publish offer, and the screen leaves Bob's offer
    # (its section idle, to be reused), the camera and microphone staying as they were.
    reply = await publish(ada, None, screen="inactive")
    assert reply["type"] == "sfu_answer", reply
    assert set(producers) == {AUDIO_MID, VIDEO_MID}
    after = msids(await subscribe_offer(bob))
    assert sorted(after.values()) == [ada_id, ada_id]
    assert {mid for mid, stream in streams.items() if stream == ada_id} == set(after)
    assert producers[VIDEO_MID].id in router.peers[bob_id].consumers
