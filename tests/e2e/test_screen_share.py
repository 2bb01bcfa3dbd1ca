"""Screen sharing in real Chromium, through the call page's "Share screen" button: in a three-person call
through the SFU, and in a 1:1 peer-to-peer call (which stays peer to peer until a third person joins; the
share then goes on through the SFU).

Headless Chromium answers getDisplayMedia({video: true, audio: true}) on http://127.0.0.1 with a fake
"screen" (displaySurface 'monitor', 30 fps, label 'screen:-3:0') and a fake audio track, at once and without a
picker, given the usual flags of tests/chromium.py. No extra flag is needed, but both fake-media flags are
(checked with Chromium 156): without --use-fake-ui-for-media-stream the promise did not settle in 5 s (the
picker waits for a click); without --use-fake-device-for-media-stream it fails (NotReadableError, "Could not
start audio source"). The fake screen follows the page's size: 1280x720 with Playwright's default 1280x720
viewport, 1000x564 in these tests' 1000x700 pages.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from playwright.sync_api import Page

from .conftest import Server, remote_tiles, wait_for

# The remote screen tiles (name, whether the tile is the largest on the page, the id of its video track and
# whether that track comes from the SFU, packets received of its audio) and, per inbound video stream of every
# peer connection, its track id, frames decoded and frame width.
SCREEN_JS = """
async () => {
  const out = {tiles: {}, videos: [], audioPackets: {}};
  const area = (el) => { const r = el.getBoundingClientRect(); return r.width * r.height; };
  const all = [...document.querySelectorAll('.tile')];
  const sfuTracks = new Set();
  for (const {participantId, pc} of window.huddle.peerConnections()) {
    (await pc.getStats()).forEach(r => {
      if (r.type === 'inbound-rtp' && r.kind === 'video') {
        out.videos.push({trackId: r.trackIdentifier, frames: r.framesDecoded || 0, width: r.frameWidth || 0});
        if (participantId === 'sfu:subscribe') sfuTracks.add(r.trackIdentifier);
      }
      if (r.type === 'inbound-rtp' && r.kind === 'audio') {
        out.audioPackets[r.trackIdentifier] = r.packetsReceived;
      }
    });
  }
  for (const tile of document.querySelectorAll('.tile.remote.screen')) {
    const stream = tile.querySelector('video').srcObject;
    const track = stream?.getVideoTracks()[0];
    const audio = stream?.getAudioTracks()[0];
    out.tiles[tile.dataset.name] = {
      trackId: track ? track.id : null, viaSfu: Boolean(track && sfuTracks.has(track.id)),
      audioPackets: audio ? out.audioPackets[audio.id] || 0 : 0,
      largest: all.every(t => t === tile || area(t) < area(tile))};
  }
  return out;
}
"""


def screen_state(page: Page) -> dict:
    return page.evaluate(SCREEN_JS)


def screen_tile(page: Page, owner: str) -> dict | None:
    return screen_state(page)["tiles"].get(f"{owner}'s screen")


def track_frames(page: Page, track_id: str) -> int:
    return sum(v["frames"] for v in screen_state(page)["videos"] if v["trackId"] == track_id)


def other_frames(page: Page, track_id: str) -> int:
    return sum(v["frames"] for v in screen_state(page)["videos"] if v["trackId"] != track_id)


def decoding_videos(page: Page) -> int:
    return sum(1 for v in screen_state(page)["videos"] if v["frames"] > 0)


def share_button(page: Page, name: str):
    return page.get_by_role("button", name=name, exact=True)


def wait_screen_decoding(page: Page, owner: str, timeout: float = 20) -> dict:
    """Wait until `page` shows `owner`'s screen in a tile and decodes frames of it; returns the tile."""

    def decoding() -> dict | None:
        state = screen_state(page)
        tile = state["tiles"].get(f"{owner}'s screen")
        if not tile or not tile["trackId"]:
            return None
        frames = sum(v["frames"] for v in state["videos"] if v["trackId"] == tile["trackId"])
        return tile if frames > 0 else None

    return wait_for(decoding, timeout, f"{owner}'s screen decoded in its tile", interval=0.05)


def assert_screen_shown_large(page: Page, owner: str) -> None:
    """`owner`'s screen keeps decoding (frames rising) and its tile is the largest on the page."""
    track_id = screen_tile(page, owner)["trackId"]
    first = track_frames(page, track_id)
    wait_for(lambda: track_frames(page, track_id) >= first + 15, 10, f"{owner}'s screen's frames to rise")
    wait_for(lambda: screen_tile(page, owner)["largest"], 5, f"{owner}'s screen tile to be the largest")


def assert_screen_gone(page: Page, owner: str, track_id: str) -> None:
    """`owner`'s screen tile goes, and its track decodes no more frames."""
    wait_for(lambda: screen_tile(page, owner) is None, 10, f"{owner}'s screen tile to go")

    def stopped() -> bool:
        before = track_frames(page, track_id)
        time.sleep(0.5)
        return track_frames(page, track_id) == before

    wait_for(stopped, 10, f"{owner}'s screen's frames to stop", interval=0)


def _join(new_page: Callable[[str], Page], server: Server, room: str, names: list[str]) -> list[Page]:
    pages = [new_page(f"{server.url}/r/{room}?name={name}") for name in names]
    for page, name in zip(pages, names, strict=True):
        others = sorted(n for n in names if n != name)
        wait_for(lambda page=page, others=others: sorted(remote_tiles(page)) == others, 20, f"{name}'s tiles")
    return pages


def test_a_screen_shared_in_a_group_call_is_large_for_all_until_stopped(new_page, server: Server) -> None:
    ada, bob, cy = _join(new_page, server, "share-sfu", ["Ada", "Bob", "Cy"])
    for page in (ada, bob, cy):
        wait_for(lambda page=page: page.evaluate("window.huddle.mode") == "sfu", 10, "SFU mode")
        wait_for(lambda page=page: decoding_videos(page) == 2, 30, "two cameras decoded")

    clicked = time.monotonic()
    share_button(ada, "Share screen").click()
    shown = {}
    for name, page in (("Bob", bob), ("Cy", cy)):
        shown[name] = wait_screen_decoding(page, "Ada")
        print(f"{name}: first screen frame decoded {time.monotonic() - clicked:.2f} s after the click")
    assert share_button(ada, "Stop sharing").get_attribute("data-active") == "true"
    # Our own screen: a small preview on our page, not on our stage.
    assert ada.locator(".tile.own-screen .name").inner_text() == "Your screen"
    assert screen_state(ada)["tiles"] == {}

    ada_id = ada.evaluate("window.huddle.self.id")
    captured = ada.evaluate("window.huddle.screen.video.getSettings()")
    print(f"Ada's screen is captured at {captured['width']}x{captured['height']}")
    for name, page in (("Bob", bob), ("Cy", cy)):
        assert_screen_shown_large(page, "Ada")
        wait_for(lambda page=page: decoding_videos(page) == 3, 10, f"{name} to decode a third video")
        # Sent whole (one layer, detail over frame rate): as wide as the sharer captures it.
        track_id, width = shown[name]["trackId"], captured["width"]
        wait_for(
            lambda page=page, track_id=track_id, width=width: any(
                v["trackId"] == track_id and v["width"] == width for v in screen_state(page)["videos"]
            ),
            15,
            f"{name} to decode the screen {width} wide",
        )
        # The screen's own audio (Chromium's fake one) plays in its tile.
        wait_for(
            lambda page=page: screen_tile(page, "Ada")["audioPackets"] > 50,
            10,
            f"{name} to get the screen audio",
        )
        # Adaptive stream: the screen's size is reported under its own key.
        sizes = page.evaluate("window.huddle.lastVideoSizes")
        assert sizes.get(f"{ada_id}~screen", [0, 0])[0] > 0, sizes

    # Bob shares too: the latest share wins Cy's stage, Ada's stays as a tile; pinning Ada's brings it back.
    share_button(bob, "Share screen").click()
    wait_screen_decoding(cy, "Bob")
    wait_for(lambda: screen_tile(cy, "Bob")["largest"], 5, "Bob's screen to take Cy's stage")
    assert screen_tile(cy, "Ada") is not None
    cy.get_by_role("button", name="Pin Ada's screen").click()
    wait_for(lambda: screen_tile(cy, "Ada")["largest"], 5, "the pinned screen to be large")
    cy.get_by_role("button", name="Unpin Ada's screen").click()
    wait_for(lambda: screen_tile(cy, "Bob")["largest"], 5, "the latest screen to be large again")

    share_button(ada, "Stop sharing").click()
    share_button(ada, "Share screen").wait_for()
    assert share_button(ada, "Share screen").get_attribute("data-active") == "false"
    assert ada.locator(".tile.own-screen").count() == 0
    assert_screen_gone(cy, "Ada", shown["Cy"]["trackId"])
    assert_screen_gone(bob, "Ada", shown["Bob"]["trackId"])
    share_button(bob, "Stop sharing").click()
    for name, page in (("Ada", ada), ("Cy", cy)):
        wait_for(
            lambda page=page: screen_state(page)["tiles"] == {}, 10, f"Bob's screen tile to go for {name}"
        )
        assert sorted(remote_tiles(page)) == sorted({"Ada", "Bob", "Cy"} - {name})

    # Sharing again reuses the stopped share's m-section of the publish connection.
    share_button(ada, "Share screen").click()
    wait_screen_decoding(bob, "Ada")
    assert_screen_shown_large(bob, "Ada")


def test_a_screen_shared_in_a_one_to_one_call_goes_peer_to_peer(new_page, server: Server) -> None:
    ada, bob = _join(new_page, server, "share-p2p", ["Ada", "Bob"])
    for page in (ada, bob):
        wait_for(lambda page=page: decoding_videos(page) == 1, 20, "the other camera decoded")

    # Ada joined first, so Bob sent the offers so far: her share is an offer from the answering side. Then
    # Bob shares, from the side that made the call.
    _share_and_stop(ada, "Ada", bob)
    _share_and_stop(bob, "Bob", ada)
    for page in (ada, bob):
        assert page.evaluate("window.huddle.mode") == "p2p"
        assert page.evaluate("window.huddle.peerConnections().length") == 1

    # Ada shares again and a third person joins: the call moves to the SFU and the share goes on through it.
    share_button(ada, "Share screen").click()
    wait_screen_decoding(bob, "Ada")
    cy = new_page(f"{server.url}/r/share-p2p?name=Cy")
    for name, page in (("Bob", bob), ("Cy", cy)):
        wait_for(lambda page=page: page.evaluate("window.huddle.mode") == "sfu", 15, f"{name} in SFU mode")
        wait_for(
            lambda page=page: (screen_tile(page, "Ada") or {}).get("viaSfu"),
            20,
            f"{name} to get Ada's screen via the SFU",
        )
        assert_screen_shown_large(page, "Ada")


def _share_and_stop(sharer: Page, sharer_name: str, viewer: Page) -> None:
    clicked = time.monotonic()
    share_button(sharer, "Share screen").click()
    tile = wait_screen_decoding(viewer, sharer_name)
    print(f"P2P, {sharer_name}'s screen: first frame {time.monotonic() - clicked:.2f} s after the click")
    assert_screen_shown_large(viewer, sharer_name)
    assert decoding_videos(viewer) == 2
    wait_for(lambda: screen_tile(viewer, sharer_name)["audioPackets"] > 50, 10, "the screen audio")
    share_button(sharer, "Stop sharing").click()
    assert_screen_gone(viewer, sharer_name, tile["trackId"])
    # The camera still plays.
    before = other_frames(viewer, tile["trackId"])
    wait_for(lambda: other_frames(viewer, tile["trackId"]) >= before + 10, 5, "the camera to keep decoding")
