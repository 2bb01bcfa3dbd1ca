"""A call over two workers (issue 12) in real Chromium: `huddle serve --workers 2
--max-participants-per-node 3`, three pages and three synthetic participants (huddle.loadtest: the real
protocol, real media) in one call. The call's home worker seats three and sends the next ones to the other
worker with a ticket, so pages sit on both workers; every page still decodes every video its layout shows,
hears the one who speaks, and shows the same active speaker as everyone else."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from playwright.sync_api import Page

from tests.cluster.heavy import InThread, Synthetics, Watched, flowing, room_homed_at, serve_workers, stop

from .conftest import wait_for

WORKERS = ("w0", "w1")
PER_NODE = 3

# Per remote tile: whether the page shows it now (in the layout, with some of its video on screen: what the
# page reports in `video_sizes`), whether it is the large tile and marked speaking, and what arrives of that
# participant: video frames decoded, the widest frame, audio packets and the audio energy decoded.
TILES_JS = """
async () => {
  const clips = new Map();
  const onScreen = (element) => {
    const rect = element.getBoundingClientRect();
    let left = Math.max(rect.left, 0), top = Math.max(rect.top, 0);
    let right = Math.min(rect.right, window.innerWidth), bottom = Math.min(rect.bottom, window.innerHeight);
    for (let node = element.parentElement; node && node !== document.body; node = node.parentElement) {
      if (!clips.has(node)) {
        const style = getComputedStyle(node);
        const clipping = style.overflowX !== 'visible' || style.overflowY !== 'visible';
        clips.set(node, clipping ? node.getBoundingClientRect() : null);
      }
      const clip = clips.get(node);
      if (!clip) continue;
      left = Math.max(left, clip.left); top = Math.max(top, clip.top);
      right = Math.min(right, clip.right); bottom = Math.min(bottom, clip.bottom);
    }
    return right > left && bottom > top;
  };
  const out = [];
  for (const tile of document.querySelectorAll('.tile.remote')) {
    const video = tile.querySelector('video');
    const row = {id: tile.dataset.participantId, name: tile.dataset.name,
                 stage: tile.classList.contains('stage'), speaking: tile.dataset.speaking === 'true',
                 shown: !tile.hidden && video.clientWidth > 0 && video.clientHeight > 0 && onScreen(video),
                 frames: 0, width: 0, videoPackets: 0, plis: 0, nacks: 0, audioPackets: 0, audioEnergy: 0};
    const stream = video.srcObject;
    for (const track of stream ? stream.getTracks() : []) {
      for (const {pc} of window.huddle.peerConnections()) {
        const receiver = pc.getReceivers().find((r) => r.track === track);
        if (!receiver) continue;
        (await receiver.getStats()).forEach((r) => {
          if (r.type !== 'inbound-rtp') return;
          if (r.kind === 'video') {
            row.frames += r.framesDecoded || 0;
            row.width = Math.max(row.width, r.frameWidth || 0);
            row.videoPackets += r.packetsReceived || 0;
            row.plis += r.pliCount || 0;
            row.nacks += r.nackCount || 0;
          } else {
            row.audioPackets += r.packetsReceived || 0;
            row.audioEnergy += r.totalAudioEnergy || 0;
          }
        });
      }
    }
    out.push(row);
  }
  return out;
}
"""


def tiles(page: Page) -> dict[str, dict[str, Any]]:
    return {t["id"]: t for t in page.evaluate(TILES_JS)}


def rooms(base: str, room: str) -> dict[str, int]:
    """Per worker, the participants of `room` it holds, as the parent's GET /api/cluster says."""
    with urllib.request.urlopen(base + "/api/cluster", timeout=5) as response:
        view = json.load(response)
    return {n["id"]: n["room_participants"].get(room, 0) for n in view["nodes"]}


def test_a_call_over_two_workers(new_page: Callable[..., Page], tmp_path: Path) -> None:
    parent, port = serve_workers(
        tmp_path, "--max-participants-per-node", str(PER_NODE), "--sfu-always", "--reconnect-grace", "20"
    )
    base = f"http://127.0.0.1:{port}"
    # Home on w0, where the public door leads: w0 seats three, then sends joiners to w1 with a ticket.
    room = room_homed_at("w0", WORKERS, "heavy-e2e")
    side = InThread()
    crowd = Synthetics(base, room, speaker=-1)  # the synthetic ones are silent: Ada (a page) talks
    pages: dict[str, Page] = {}
    synthetic: dict[str, Watched] = {}
    try:
        side.run(crowd.start())

        def open_page(name: str, muted: bool) -> None:
            page = new_page(f"{base}/r/{room}?name={name}")
            wait_for(lambda: page.evaluate("window.huddle.self?.id"), 20, f"{name} to join")
            if muted:
                # Only Ada's (fake, beeping) microphone stays on: she is the one everyone must hear.
                page.get_by_role("button", name="Mute", exact=True).click()
            pages[name] = page

        def add_synthetic(name: str) -> None:
            synthetic[name] = side.run(crowd.add(), 15)

        # Synthetic participants' video is real VP8, but every RTP payload ends with their 8-byte trailer
        # (huddle.loadtest.media), so a frame cut into several packets reaches a decoder with trailers inside.
        # Chromium decodes their q layer (small frames, one packet each), not h or f: on a plain single
        # node, a page with a synthetic participant on its large tile decoded 0 frames of it in 16 s (68
        # packets/s, a PLI a second) while a thumbnail beside it decoded ~14 frames/s. So the order below
        # makes every page's large tile a page: Ada for the others, Bob (her first other) for her.
        seats = [
            ("Ada", lambda: open_page("Ada", muted=False), {"w0": 1, "w1": 0}),
            ("Bob", lambda: open_page("Bob", muted=True), {"w0": 2, "w1": 0}),
            ("S0", lambda: add_synthetic("S0"), {"w0": 3, "w1": 0}),
            ("Cy", lambda: open_page("Cy", muted=True), {"w0": 3, "w1": 1}),
            ("S1", lambda: add_synthetic("S1"), {"w0": 3, "w1": 2}),
            ("S2", lambda: add_synthetic("S2"), {"w0": 3, "w1": 3}),
        ]
        for name, seat, expected in seats:
            seat()
            # Each seated where the spill-over says before the next comes: the pages end up on both workers.
            wait_for(lambda expected=expected: rooms(base, room) == expected, 5, f"{name} seated: {expected}")

        ids = {name: page.evaluate("window.huddle.self.id") for name, page in pages.items()}
        ids.update({name: person.id for name, person in synthetic.items()})
        everyone = set(ids.values())
        worker_of = {ids[n]: "w0" for n in ("Ada", "Bob", "S0")} | {ids[n]: "w1" for n in ("Cy", "S1", "S2")}
        for name, page in pages.items():
            wait_for(
                lambda page=page, name=name: set(tiles(page)) == everyone - {ids[name]},
                20,
                f"{name}'s page to show the five others",
            )

        # Every page decodes every video it shows, and receives Ada's audio (she talks); 2 s apart.
        def lacking() -> dict[str, list[str]]:
            first = {name: tiles(page) for name, page in pages.items()}
            time.sleep(2)
            out = {}
            for name, page in pages.items():
                now, before = tiles(page), first[name]
                shown = [pid for pid, t in now.items() if t["shown"]]
                wrong = [] if shown else ["shows no video"]
                for pid in shown:
                    frames = now[pid]["frames"] - before.get(pid, {"frames": 0})["frames"]
                    if frames < 10:
                        t = now[pid]
                        wrong.append(
                            f"{t['name']}: {frames} frames ({t['frames']} in all, "
                            f"{t['videoPackets']} packets, {t['plis']} PLIs, {t['nacks']} NACKs sent)"
                        )
                if name != "Ada":
                    packets = now[ids["Ada"]]["audioPackets"] - before[ids["Ada"]]["audioPackets"]
                    if packets < 40:
                        wrong.append(f"Ada's audio: {packets} packets")
                if wrong:
                    out[name] = wrong
            return out

        started = time.monotonic()
        missing = lacking()
        while missing and time.monotonic() - started < 40:
            missing = lacking()
        assert not missing, f"in 2 s, after {time.monotonic() - started:.0f} s: {missing}"
        print(
            f"\nevery page decoding what it shows {time.monotonic() - started:.1f} s after the sixth joined"
        )

        # One speaker for the whole call, on every page (Ada's own too) and for the synthetic participants.
        def agreed() -> bool:
            seen = {name: page.evaluate("window.huddle.activeSpeaker") for name, page in pages.items()}
            seen.update({name: person.active_speaker for name, person in synthetic.items()})
            return set(seen.values()) == {ids["Ada"]}

        wait_for(agreed, 10, "everyone to show Ada as the active speaker")
        final = {name: tiles(page) for name, page in pages.items()}
        for name in ("Bob", "Cy"):
            ada = final[name][ids["Ada"]]
            # Ada is the large tile, marked speaking, and heard (on Cy's page, w1, across the workers).
            assert ada["stage"] and ada["speaking"], (name, ada)
            assert ada["audioEnergy"] > 0, (name, ada)
        for name, shown in final.items():
            stage = [t["name"] for t in shown.values() if t["stage"]]
            assert len(stage) == 1 and stage[0] in pages, (name, stage)
        for name, shown in final.items():
            others = [
                pid for pid, t in shown.items() if t["shown"] and worker_of[pid] != worker_of[ids[name]]
            ]
            assert others, f"{name}'s page shows nobody of the other worker: {shown}"
            print(
                f"  {name} ({worker_of[ids[name]]}): "
                + ", ".join(
                    f"{t['name']}@{worker_of[pid]}{' stage' if t['stage'] else ''} {t['width']}px "
                    f"{t['frames']} frames"
                    for pid, t in shown.items()
                    if t["shown"]
                )
            )

        # The synthetic participants, on both workers, receive every page's video and Ada's audio.
        got = side.run(flowing(synthetic.values(), 1.0))
        for name, person in synthetic.items():
            want = {(ids[p], "video") for p in pages} | {(ids["Ada"], "audio")}
            assert want <= got[person.name], (name, person.node, sorted(want - got[person.name]))
        assert rooms(base, room) == {"w0": 3, "w1": 3}
        assert not crowd.errors(), crowd.errors()
    finally:
        try:
            side.run(crowd.close(), 20)
        finally:
            side.close()
            stop(parent)
            print("parent and workers:", (tmp_path / "stderr").read_text()[-3000:])
