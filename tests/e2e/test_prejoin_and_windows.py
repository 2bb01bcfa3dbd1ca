"""Before joining and in any window: the pre-join screen, devices, keyboard shortcuts, small to large windows.

Real Chromium through the real page. Chromium's fake devices: one camera, three microphones, three outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page

from .conftest import Server, remote_tiles, wait_decoding, wait_for

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"

# Counts getUserMedia calls, so that a test can tell one capture from two.
COUNT_CAPTURES = """
const realGetUserMedia = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
window.captures = 0;
navigator.mediaDevices.getUserMedia = (constraints) => {
  window.captures += 1;
  return realGetUserMedia(constraints);
};
"""

# Our live tracks, as the client holds them and as the senders of every peer connection carry them.
LOCAL_TRACKS_JS = """
() => {
  const tracks = Object.fromEntries(window.huddle.localStream.getTracks()
    .filter(t => t.readyState === 'live')
    .map(t => [t.kind, {id: t.id, deviceId: t.getSettings().deviceId, label: t.label, enabled: t.enabled}]));
  const sent = [];
  for (const {pc} of window.huddle.peerConnections())
    for (const s of pc.getSenders()) if (s.track) sent.push(s.track.id);
  const sdp = window.huddle.peerConnections().map(({pc}) => pc.localDescription && pc.localDescription.sdp);
  return {tracks, sent, sdp};
}
"""

# Where the remote video is, what covers its centre, and the boxes of the bars around the stage.
GEOMETRY_JS = """
() => {
  const box = (el) => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const video = document.querySelector('.tile.remote video');
  const [l, t, r, b] = box(video);
  const hit = document.elementFromPoint((l + r) / 2, (t + b) / 2);
  const bars = [...document.querySelectorAll('.controls, .controls button, .topbar')]
    .filter(el => el.getClientRects().length).map(box);
  return {video: [l, t, r, b], bars, videoWidth: video.videoWidth,
          centreInTile: Boolean(hit && hit.closest('.tile') === video.closest('.tile')),
          viewport: [innerWidth, innerHeight]};
}
"""


@pytest.fixture
def open_page(new_page: Callable[..., Page]) -> Callable[..., Page]:
    """A page in its own context (a separate person), counting its captures from the first script on."""

    def make(url: str, width: int = 1000, height: int = 700) -> Page:
        return new_page(url, init_script=COUNT_CAPTURES, viewport={"width": width, "height": height})

    return make


def overlap(a: list[float], b: list[float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, w) * max(0.0, h)


def preview_frames(page: Page) -> int:
    return page.get_by_label("Camera preview").evaluate(
        "v => v.videoWidth > 0 ? v.getVideoPlaybackQuality().totalVideoFrames : 0"
    )


def test_prejoin_devices_join_muted_switch_in_call_and_shortcut(open_page, server: Server) -> None:
    # A link with a name joins at once, with no pre-join screen (integrations rely on it).
    bob = open_page(f"{server.url}/r/prejoin?name=Bob")
    wait_for(lambda: bob.get_attribute("#status", "data-state") == "connected", 15, "Bob to join at once")
    assert not bob.get_by_role("button", name="Join now").is_visible()
    assert not bob.get_by_label("Camera preview").is_visible()

    # A link without one shows the pre-join screen, with a live preview.
    ada = open_page(f"{server.url}/r/prejoin")
    join = ada.get_by_role("button", name="Join now")
    wait_for(join.is_visible, 10, "the pre-join screen")
    first = wait_for(lambda: preview_frames(ada), 10, "the preview to show frames")
    wait_for(lambda: preview_frames(ada) >= first + 10, 10, "the preview to keep decoding frames")
    assert ada.get_attribute("#status", "data-state") == "idle"  # nothing joined yet

    camera = ada.get_by_role("combobox", name="Camera", exact=True)
    microphone = ada.get_by_role("combobox", name="Microphone", exact=True)
    speaker = ada.get_by_role("combobox", name="Speaker", exact=True)
    cameras = camera.evaluate("s => [...s.options].map(o => [o.value, o.text])")
    mics = microphone.evaluate("s => [...s.options].map(o => [o.value, o.text])")
    outputs = speaker.evaluate("s => [...s.options].map(o => [o.value, o.text])")
    assert cameras and all(label for _, label in cameras), cameras
    assert len(mics) >= 2 and len(outputs) >= 2, (mics, outputs)
    camera_id, camera_label = cameras[-1]
    mic_id, mic_label = next((v, t) for v, t in mics if v != "default")
    speaker_id = next(v for v, _ in outputs if v != "default")
    camera.select_option(camera_id)
    microphone.select_option(mic_id)
    speaker.select_option(speaker_id)
    wait_for(
        lambda: ada.evaluate(LOCAL_TRACKS_JS)["tracks"].get("audio", {}).get("deviceId") == mic_id,
        10,
        "the chosen microphone in use",
    )
    ada.get_by_role("checkbox", name="Join with microphone off").check()
    ada.get_by_label("Your name").fill("Ada")
    before = ada.evaluate(LOCAL_TRACKS_JS)
    captures = ada.evaluate("window.captures")
    join.click()

    # Bob sees Ada muted and decodes her video; Ada sends the very tracks of her preview, from the devices she
    # chose, with no second capture.
    wait_for(lambda: remote_tiles(bob) == ["Ada"], 15, "Bob's page to show Ada")
    ada_tile = bob.locator(".tile.remote", has_text="Ada")
    wait_for(lambda: ada_tile.get_by_role("img", name="Microphone off").is_visible(), 10, "Ada's muted mark")
    wait_decoding(bob, peers=1, frames=10)
    after = ada.evaluate(LOCAL_TRACKS_JS)
    assert ada.evaluate("window.captures") == captures
    assert after["tracks"]["video"] == before["tracks"]["video"]
    video, audio = after["tracks"]["video"], after["tracks"]["audio"]
    assert (video["deviceId"], video["label"]) == (camera_id, camera_label)
    assert (audio["deviceId"], audio["label"]) == (mic_id, mic_label)
    assert not after["tracks"]["audio"]["enabled"]
    assert {after["tracks"]["audio"]["id"], after["tracks"]["video"]["id"]} <= set(after["sent"])
    assert ada.get_by_role("button", name="Unmute").is_visible()
    wait_for(
        lambda: ada.eval_on_selector(".tile.remote video", "v => v.sinkId") == speaker_id,
        10,
        "Bob's video playing through the chosen speaker",
    )

    # In the call: another microphone from Settings goes on the same sender, with no new offer.
    ada.get_by_role("button", name="Settings").click()
    other_mic = next(v for v, _ in mics if v not in ("default", mic_id))
    ada.get_by_role("combobox", name="Microphone", exact=True).select_option(other_mic)
    switched = wait_for(
        lambda: (s := ada.evaluate(LOCAL_TRACKS_JS))["tracks"]["audio"]["deviceId"] == other_mic and s,
        10,
        "the other microphone in use",
    )
    assert switched["tracks"]["audio"]["id"] in switched["sent"]
    assert after["tracks"]["audio"]["id"] not in switched["sent"]
    assert switched["sdp"] == after["sdp"]  # replaceTrack: nothing renegotiated
    ada.keyboard.press("Escape")

    # Keyboard: M unmutes and mutes; Bob's page follows.
    ada.evaluate("document.activeElement && document.activeElement.blur()")
    ada.keyboard.press("m")
    wait_for(lambda: ada.get_by_role("button", name="Mute", exact=True).is_visible(), 5, "the Mute label")
    wait_for(lambda: not ada_tile.get_by_role("img", name="Microphone off").is_visible(), 10, "Ada unmuted")
    ada.keyboard.press("m")
    wait_for(lambda: ada.get_by_role("button", name="Unmute").is_visible(), 5, "the Unmute label")
    wait_for(lambda: ada_tile.get_by_role("img", name="Microphone off").is_visible(), 10, "Ada muted again")
    # "?" lists the shortcuts.
    ada.keyboard.press("?")
    shortcuts = ada.get_by_role("dialog", name="Keyboard shortcuts")
    wait_for(shortcuts.is_visible, 5, "the shortcuts list")
    assert "Leave the call" in shortcuts.inner_text()
    ada.keyboard.press("Escape")
    wait_for(lambda: not shortcuts.is_visible(), 5, "the list closed")
    # C presses the chat button, found by its label.
    ada.keyboard.press("c")
    chat = ada.get_by_role("button", name="Chat", exact=True)
    wait_for(lambda: chat.get_attribute("aria-expanded") == "true", 5, "the chat opened by C")


@pytest.mark.parametrize("size", [(320, 180), (390, 844), (1920, 1080)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_stage_shows_the_video_uncovered_in_any_window(open_page, server: Server, size) -> None:
    width, height = size
    room = f"window-{width}x{height}"
    open_page(f"{server.url}/r/{room}?name=Ada")
    page = open_page(f"{server.url}/r/{room}?name=Bob", width=width, height=height)
    wait_for(lambda: remote_tiles(page) == ["Ada"], 15, "Ada's tile")
    wait_decoding(page, peers=1, frames=10)

    def settled() -> dict[str, Any] | None:
        geometry = page.evaluate(GEOMETRY_JS)
        return geometry if geometry["videoWidth"] > 0 and geometry["centreInTile"] else None

    geometry = wait_for(settled, 10, "the remote video shown, its centre uncovered")
    video = geometry["video"]
    screen = [0, 0, width, height]
    shown = overlap(video, screen)
    # The stage shows the video: a good share of the window, and nothing of the bars on it.
    assert shown >= 0.35 * width * height, geometry
    for bar in geometry["bars"]:
        assert overlap(bar, video) == 0, (bar, geometry)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{width}x{height}.png"))
