"""What each viewer gets, in real Chromium: simulcast layers that follow the layout, nothing for a hidden
tile, the active speaker agreed by everyone, and layers that step down on a thin downlink and back up."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from playwright.sync_api import Page

from .conftest import Server, remote_tiles, start_server, stop_server, wait_for

# One remote participant's video as this page receives it: the inbound-rtp of the track in their tile.
VIDEO_FROM_JS = """
async (pid) => {
  const video = document.querySelector(`.tile.remote[data-participant-id="${pid}"] video`);
  const track = video && video.srcObject && video.srcObject.getVideoTracks()[0];
  const out = {width: 0, frames: 0, packets: 0, plis: 0};
  if (!track) return out;
  for (const {pc} of window.huddle.peerConnections()) {
    const receiver = pc.getReceivers().find(r => r.track === track);
    if (!receiver) continue;
    (await receiver.getStats()).forEach(r => {
      if (r.type === 'inbound-rtp') {
        out.width = r.frameWidth || 0; out.frames = r.framesDecoded || 0;
        out.packets = r.packetsReceived || 0; out.plis = r.pliCount || 0;
      }
    });
  }
  return out;
}
"""

# This page's camera layers as it sends them: rid -> [frames encoded, width].
SENT_JS = """
async () => {
  const out = {};
  for (const {participantId, pc} of window.huddle.peerConnections()) {
    if (participantId !== 'sfu:publish') continue;
    (await pc.getStats()).forEach(r => {
      if (r.type === 'outbound-rtp' && r.kind === 'video') {
        out[r.rid] = [r.framesEncoded || 0, r.frameWidth || 0, r.qualityLimitationReason || ''];
      }
    });
  }
  return out;
}
"""


def video_from(page: Page, pid: str) -> dict:
    return page.evaluate(VIDEO_FROM_JS, pid)


def pid_of(page: Page) -> str:
    return page.evaluate("window.huddle.self.id")


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = start_server("--sfu-always", "--log-level", "debug")  # a failure shows the downlink budget's steps
    yield s
    stop_server(s)


def _room(new_page, server: Server, room: str, names: list[str]) -> list[Page]:
    pages = []
    for name in names:
        page = new_page(f"{server.url}/r/{room}?name={name}")
        page.set_viewport_size({"width": 1280, "height": 720})
        pages.append(page)
    for page, name in zip(pages, names, strict=True):
        others = sorted(n for n in names if n != name)
        wait_for(lambda page=page, others=others: sorted(remote_tiles(page)) == others, 20, f"{name}'s tiles")
    return pages


def _pin(page: Page, name: str) -> None:
    page.click(f'.tile.remote[data-name="{name}"] .pin')


def test_layers_follow_the_layout(new_page, server: Server) -> None:
    ada, bob, cy = _room(new_page, server, "layers", ["Ada", "Bob", "Cy"])
    ada_id = pid_of(ada)
    wait_for(lambda: video_from(bob, ada_id)["frames"] > 30, 30, "Bob to see Ada")

    # Ada large on Bob's page: Bob gets her top layer (1280 wide, or the largest she sends).
    _pin(bob, "Ada")
    wait_for(
        lambda: bob.get_attribute('.tile.remote[data-name="Ada"]', "class").count("stage") == 1,
        5,
        "Ada on Bob's stage",
    )
    wait_for(lambda: video_from(bob, ada_id)["width"] >= 1280, 10, "Ada in HD on Bob's stage")

    # Ada becomes a thumbnail on Bob's page: within 3 s Bob decodes her at most 320 wide, without a stall.
    started = time.monotonic()
    _pin(bob, "Cy")
    last, last_change, worst, width = video_from(bob, ada_id)["frames"], time.monotonic(), 0.0, 9999
    switched_at = None
    while time.monotonic() - started < 6:
        now_stats = video_from(bob, ada_id)
        now = time.monotonic()
        if now_stats["frames"] != last:
            last, last_change = now_stats["frames"], now
        worst = max(worst, now - last_change)
        width = now_stats["width"]
        if width <= 320 and switched_at is None:
            switched_at = now - started
        time.sleep(0.2)
    assert switched_at is not None and switched_at <= 3, (
        f"still {width} px wide after {time.monotonic() - started:.1f} s"
    )
    assert width <= 320
    assert worst <= 1.0, f"Ada's video stalled for {worst:.2f} s on Bob's page"

    # And back to the stage: the top layer again within 3 s.
    started = time.monotonic()
    _pin(bob, "Ada")
    wait_for(lambda: video_from(bob, ada_id)["width"] >= 1280, 3, "Ada back in HD")
    # No keyframe storm: a handful of requests for all these switches.
    assert video_from(bob, ada_id)["plis"] <= 10
    # Cy's gallery shows Ada mid-sized: her middle layer goes out too. Over the test she sent all three.
    cy.click("#layout-gallery")
    wait_for(lambda: ada.evaluate(SENT_JS).get("h", [0])[0] > 0, 10, "Ada's middle layer")
    sent = ada.evaluate(SENT_JS)
    assert set(sent) == {"q", "h", "f"}
    assert all(frames > 0 for frames, *_ in sent.values()), sent


# Whether a remote participant's video shows in the strip's scrolled view (the strip clips its thumbnails).
IN_STRIP_VIEW_JS = """
(pid) => {
  const video = document.querySelector(`.tile.remote[data-participant-id="${pid}"] video`);
  const strip = document.querySelector('#strip');
  if (!video || !strip.contains(video)) return false;
  const v = video.getBoundingClientRect(), s = strip.getBoundingClientRect();
  return Math.min(v.bottom, s.bottom) > Math.max(v.top, s.top)
    && Math.min(v.right, s.right) > Math.max(v.left, s.left);
}
"""


def test_a_tile_scrolled_out_of_view_gets_no_packets_and_comes_back(new_page, server: Server) -> None:
    ada, bob, _cy = _room(new_page, server, "hidden", ["Ada", "Bob", "Cy"])
    ada_id = pid_of(ada)
    wait_for(lambda: video_from(bob, ada_id)["frames"] > 30, 30, "Bob to see Ada")
    # Cy large on Bob's page, in a window so short that the strip beside the stage shows one thumbnail (his
    # own, the first) and Ada's, below it, is scrolled out of view.
    _pin(bob, "Cy")
    bob.set_viewport_size({"width": 1280, "height": 150})
    wait_for(lambda: not bob.evaluate(IN_STRIP_VIEW_JS, ada_id), 5, "Ada's thumbnail out of the strip's view")
    time.sleep(1.5)
    before = video_from(bob, ada_id)["packets"]
    time.sleep(2)
    assert video_from(bob, ada_id)["packets"] == before, "packets still arrive for a tile out of view"
    frames = video_from(bob, ada_id)["frames"]
    # Bob scrolls the strip down to Ada.
    bob.hover("#strip")
    bob.mouse.wheel(0, 600)
    shown = time.monotonic()
    wait_for(lambda: bob.evaluate(IN_STRIP_VIEW_JS, ada_id), 2, "Ada's thumbnail scrolled into view")
    wait_for(lambda: video_from(bob, ada_id)["frames"] > frames + 5, 2, "Ada's video back within 2 s")
    assert time.monotonic() - shown <= 2.5


def test_everyone_agrees_on_the_active_speaker_and_it_moves(new_page, server: Server) -> None:
    pages = _room(new_page, server, "speaker", ["Ada", "Bob", "Cy"])
    ada, bob, cy = pages
    ids = {name: pid_of(page) for name, page in zip(["Ada", "Bob", "Cy"], pages, strict=True)}

    def agreed(pid: str) -> bool:
        return all(p.evaluate("window.huddle.activeSpeaker") == pid for p in pages)

    # Only Bob's (fake, beeping) microphone is on, until everyone sees him speaking; then he falls silent too.
    for page in (ada, cy):
        page.click("#toggle-audio")
    wait_for(lambda: agreed(ids["Bob"]), 10, "everyone to see Bob speaking")
    bob.click("#toggle-audio")
    time.sleep(2)  # past the 1.5 s a speaker's speech is held: the floor is free, though still shown as Bob's
    assert agreed(ids["Bob"])

    # Ada starts speaking into the silence: every page shows her as the speaker within what people notice.
    ada.click("#toggle-audio")
    started = time.monotonic()
    wait_for(lambda: agreed(ids["Ada"]), 5, "everyone to see Ada speaking", interval=0.05)
    first = time.monotonic() - started
    print(f"all pages agreed on Ada {first:.2f} s after she unmuted")
    assert first <= FIRST_AGREEMENT_BOUND, f"the pages agreed on Ada only {first:.2f} s after she unmuted"
    for page in (bob, cy):
        assert (
            page.get_attribute(f'.tile.remote[data-participant-id="{ids["Ada"]}"]', "data-speaking") == "true"
        )
    # Ada stops, Bob starts: the floor moves, and every page follows.
    ada.click("#toggle-audio")
    bob.click("#toggle-audio")
    started = time.monotonic()
    wait_for(lambda: agreed(ids["Bob"]), 3, "everyone to see Bob speaking", interval=0.05)
    moved = time.monotonic() - started
    print(f"the floor moved to Bob in {moved:.2f} s")
    assert moved <= 2.5  # 1.7-2.1 s measured: Ada's speech is held 1.5 s, then Bob's takeover
    # And it stays there: no flapping back while Bob goes on.
    time.sleep(2)
    assert agreed(ids["Bob"])


# Someone who starts talking into a silence is shown as the speaker on every page within this: 0.68-0.98 s
# measured over five runs (the fake microphone beeps once a second, so up to a second more by its phase).
FIRST_AGREEMENT_BOUND = 2.0


def _limit(port: int, rate: str) -> None:
    """Limit what reaches one UDP port on loopback (a subscriber's downlink) with an htb class."""
    for cmd in (
        "tc qdisc add dev lo root handle 1: htb default 10",
        "tc class add dev lo parent 1: classid 1:10 htb rate 10gbit",
        f"tc class add dev lo parent 1: classid 1:20 htb rate {rate} ceil {rate}",
        "tc qdisc add dev lo parent 1:20 handle 20: pfifo limit 30",
        f"tc filter add dev lo parent 1: protocol ip prio 1 u32 match ip dport {port} 0xffff flowid 1:20",
    ):
        subprocess.run(cmd.split(), check=True, capture_output=True)


def _unlimit() -> None:
    subprocess.run("tc qdisc del dev lo root".split(), check=False, capture_output=True)


SUBSCRIBE_PORT_JS = """
async () => {
  for (const {participantId, pc} of window.huddle.peerConnections()) {
    if (participantId !== 'sfu:subscribe') continue;
    const stats = await pc.getStats();
    let port = null;
    stats.forEach(r => {
      if (r.type === 'transport' && r.selectedCandidatePairId) {
        port = stats.get(stats.get(r.selectedCandidatePairId).localCandidateId).port;
      }
    });
    return port;
  }
  return null;
}
"""


def test_a_thin_downlink_settles_on_low_layers_and_recovers(new_page, server: Server) -> None:
    names = ["Ada", "Bob", "Cy"]
    pages = []
    for name in names:
        # Bob's screen has twice the pixel density: his thumbnail of Cy (about 250 px wide) takes about 500
        # device pixels and so Cy's middle layer, which leaves the thumbnail something to give up first.
        density = {"device_scale_factor": 2} if name == "Bob" else {}
        page = new_page(f"{server.url}/r/thin?name={name}", **density)
        page.set_viewport_size({"width": 1280, "height": 720})
        pages.append(page)
    for page, name in zip(pages, names, strict=True):
        others = sorted(n for n in names if n != name)
        wait_for(lambda page=page, others=others: sorted(remote_tiles(page)) == others, 20, f"{name}'s tiles")
    ada, bob, cy = pages
    ada_id, cy_id = pid_of(ada), pid_of(cy)
    _pin(bob, "Ada")
    try:
        wait_for(
            lambda: video_from(bob, ada_id)["width"] >= 1280 and video_from(bob, cy_id)["width"] == 640,
            30,
            "Ada in HD on Bob's stage and Cy's middle layer in his thumbnail",
        )
    except AssertionError as e:
        # What each side had, so that a failure says whether the senders or the allocation held back.
        seen = {"stage": video_from(bob, ada_id), "thumbnail": video_from(bob, cy_id)}
        raise AssertionError(
            f"{e}; Bob received {seen}; Ada sent {ada.evaluate(SENT_JS)}, Cy sent "
            f"{cy.evaluate(SENT_JS)} (rid: [frames, width, limited by])"
        ) from None
    port = bob.evaluate(SUBSCRIBE_PORT_JS)

    def watch(seconds: float) -> list[tuple[float, int, int, int]]:
        """(seconds since, stage width, thumbnail width, stage frames decoded), four times a second."""
        timeline = []
        started = time.monotonic()
        while (now := time.monotonic() - started) < seconds:
            stage, thumbnail = video_from(bob, ada_id), video_from(bob, cy_id)
            timeline.append((now, stage["width"], thumbnail["width"], stage["frames"]))
            time.sleep(0.25)
        return timeline

    def settled(
        timeline: list[tuple[float, int, int, int]], condition: Callable[..., bool], what: str
    ) -> list:
        """The samples from the first that meets `condition`, which must come within 10 s."""
        i = next((i for i, sample in enumerate(timeline) if condition(*sample[1:3])), len(timeline))
        assert i < len(timeline) and timeline[i][0] <= 10, f"{what}: not within 10 s: {timeline}"
        return timeline[i:]

    _limit(port, "500kbit")
    try:
        timeline = watch(LIMITED_SECONDS)
    finally:
        _unlimit()
    restored = time.monotonic()
    print(f"on 500 kbit/s (s, stage px, thumbnail px, stage frames): {timeline}")
    # The thumbnail gives up its middle layer, and the stage steps down from its top one ...
    after = settled(
        timeline, lambda stage, thumbnail: stage <= 640 and thumbnail <= 320, "both stepping down"
    )
    # ... and then, in every sample for as long as the link is thin (not in one): the stage stays down, and
    # the thumbnail stays on its lowest layer, whatever room the estimate leaves going to the stage first.
    risen = [sample for sample in after if sample[1] > 640 or sample[2] > 320]
    assert not risen, f"back up while the link was thin: {risen}"
    assert after[-1][0] - after[0][0] >= 8
    assert after[-1][3] - after[0][3] >= 60, "the stage's video stalled on the thin link"
    # 15-23 s measured: the probe that failed while limited holds the next one back (16 s), then it climbs a
    # layer at a time, each up waiting for a keyframe.
    wait_for(lambda: video_from(bob, ada_id)["width"] >= 1280, 30, "Bob's layers to come back up")
    print(f"the stage back in HD {time.monotonic() - restored:.1f} s after the limit went")


LIMITED_SECONDS = 20
