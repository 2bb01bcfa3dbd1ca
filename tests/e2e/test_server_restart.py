"""A single `huddle serve` killed (-9) and started again on the same ports within the reconnection grace: the
pages take their people back into the same call by themselves, with the same ids and tiles, and say what
happened. The node has forgotten everything; each page's signed resume token seats it again (`restored`)."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
import urllib.request
from collections.abc import Callable

import pytest
from playwright.sync_api import Page

from huddle.cluster.placement import choose

from .conftest import Server, remote_tiles, start_server, stop_server, wait_for

RESTORED_NOTICE = "The server restarted; you are back in the call"

# Installed in every page before the kill: what the page goes through, stamped with Date.now() (the pages and
# this test share the machine's clock), and in SFU mode the first video frame decoded on a subscribe
# connection other than the one the page had before the kill.
WATCH_JS = """
(sfu) => {
  const huddle = window.huddle;
  const subscribe = () => huddle.peerConnections().find((c) => c.participantId === 'sfu:subscribe');
  const watch = {old: sfu ? subscribe()?.pc : null, states: [], resumed: [], left: [], modes: [],
                 firstFrame: null, tiles: [...document.querySelectorAll('.tile.remote')],
                 pcs: huddle.peerConnections().map((c) => c.pc)};
  window.__restart = watch;
  huddle.addEventListener('state', (e) => watch.states.push([e.detail.state, Date.now()]));
  huddle.addEventListener('participant-left', (e) => watch.left.push(e.detail.participantId));
  huddle.addEventListener('mode', (e) => watch.modes.push(e.detail.mode));
  huddle.addEventListener('resumed', (e) => watch.resumed.push(
    {restored: e.detail.restored, moved: e.detail.moved, mode: e.detail.mode}));
  if (!sfu) return;
  let busy = false;
  const timer = setInterval(async () => {
    const current = subscribe();
    if (busy || !current || current.pc === watch.old) return;
    busy = true;
    let frames = 0;
    (await current.pc.getStats()).forEach((r) => {
      if (r.type === 'inbound-rtp' && r.kind === 'video') frames += r.framesDecoded || 0;
    });
    busy = false;
    if (frames > 0 && watch.firstFrame === null) {
      watch.firstFrame = Date.now();
      clearInterval(timer);
    }
  }, 50);
}
"""

# Per remote tile: the participant id and name, the note about their connection, and the frames decoded
# from the tile's video track (SFU: on the subscribe connection made after the restart, once there is one).
TILES_JS = """
async (sfu) => {
  const old = window.__restart ? window.__restart.old : null;
  const out = [];
  for (const tile of document.querySelectorAll('.tile.remote')) {
    const video = tile.querySelector('video');
    const track = video.srcObject && video.srcObject.getVideoTracks()[0];
    let frames = 0;
    for (const {pc} of window.huddle.peerConnections()) {
      if (sfu && pc === old) continue;
      const receiver = track && pc.getReceivers().find((r) => r.track === track);
      if (!receiver) continue;
      (await receiver.getStats()).forEach((r) => {
        if (r.type === 'inbound-rtp' && r.kind === 'video') frames += r.framesDecoded || 0;
      });
    }
    out.push({id: tile.dataset.participantId, name: tile.dataset.name, frames,
              connection: tile.dataset.connectionState});
  }
  return out;
}
"""


def _tiles(page: Page, sfu: bool = False) -> list[dict]:
    return page.evaluate(TILES_JS, sfu)


def _who(page: Page) -> list[tuple[str, str]]:
    return sorted((t["id"], t["name"]) for t in _tiles(page))


def _frames(page: Page) -> int:
    return sum(t["frames"] for t in _tiles(page))


def _join(new_page: Callable[[str], Page], server: Server, room: str, names: list[str]) -> list[Page]:
    pages = [new_page(f"{server.url}/r/{room}?name={name}") for name in names]
    for page, name in zip(pages, names, strict=True):
        others = sorted(n for n in names if n != name)
        wait_for(lambda page=page, others=others: sorted(remote_tiles(page)) == others, 20, f"{name}'s tiles")
    return pages


def _restart(server: Server, recordings: str) -> Server:
    """Again on the same ports, with the same recordings folder: the node keeps its resume key there."""
    return start_server(
        "--port",
        str(server.http),
        "--stun-port",
        str(server.stun),
        "--media-port",
        str(server.media),
        "--recordings-dir",
        recordings,
        "--reconnect-grace",
        "20",
    )


# Whether the remote tiles of the page are those it had before the kill (the same elements: none went and
# came back), and its peer connections those it had then.
KEPT_JS = """
() => {
  const watch = window.__restart;
  const tiles = [...document.querySelectorAll('.tile.remote')];
  return {tiles: tiles.length === watch.tiles.length && watch.tiles.every((t) => tiles.includes(t)),
          pcs: window.huddle.peerConnections().every(({pc}) => watch.pcs.includes(pc))};
}
"""


def _ids(pages: list[Page]) -> list[str]:
    return [page.evaluate("window.huddle.self.id") for page in pages]


def _see_notices(pages: list[Page], seen: list[bool]) -> None:
    """Marks the pages whose status says the server restarted (it does for a few seconds)."""
    for i, page in enumerate(pages):
        if not seen[i] and page.get_by_role("status").filter(has_text=RESTORED_NOTICE).count() == 1:
            seen[i] = True


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "graceful"])
def test_three_pages_in_an_sfu_call_come_back_after_a_restart_without_a_click(new_page, stop) -> None:
    """kill -9 (a crash: the sockets just close) and a graceful stop (`systemctl restart`: the node closes
    every socket with 1012, service restart, and the pages try again at once)."""
    recordings = tempfile.mkdtemp("-recordings")
    server = start_server("--recordings-dir", recordings, "--reconnect-grace", "20")
    names = ["Ada", "Bob", "Cy"]
    try:
        pages = _join(new_page, server, "restart", names)
        for page, name in zip(pages, names, strict=True):
            wait_for(
                lambda page=page: page.evaluate("window.huddle.mode") == "sfu", 10, f"{name} in SFU mode"
            )
            wait_for(
                lambda page=page: [t["frames"] >= 30 for t in _tiles(page)] == [True, True],
                40,
                f"{name} to decode both others' video",
            )
        ids = _ids(pages)
        who = [_who(page) for page in pages]
        for page in pages:
            page.evaluate(WATCH_JS, True)

        killed = time.time()
        server.proc.send_signal(stop)
        assert server.proc.wait(10) == (-signal.SIGKILL if stop == signal.SIGKILL else 0)
        server = _restart(server, recordings)
        up = time.time() - killed
        notices = [False] * len(pages)

        def back() -> bool:
            _see_notices(pages, notices)
            for page, people in zip(pages, who, strict=True):
                if page.get_attribute("#status", "data-state") != "connected":
                    return False
                tiles = _tiles(page, sfu=True)
                # The same people on the same tiles (no second tile for anyone), each decoding 30 new frames
                # over the new subscribe connection.
                if sorted((t["id"], t["name"]) for t in tiles) != people:
                    return False
                if not all(t["frames"] >= 30 and t["connection"] == "connected" for t in tiles):
                    return False
            return True

        wait_for(back, 30, "every page back in the call, decoding new video of both others")
        watches = [page.evaluate("window.__restart") for page in pages]
        firsts = {
            name: round(w["firstFrame"] / 1000 - killed, 2) for name, w in zip(names, watches, strict=True)
        }
        print(
            f"\nSFU, {signal.Signals(stop).name}: up again {up:.2f} s after the signal; "
            f"first new frame after the signal: {firsts}"
        )
        for name, w in zip(names, watches, strict=True):
            back_at = next(at for state, at in w["states"] if state == "connected") / 1000 - killed
            print(
                f"  {name}: states {[state for state, _ in w['states']]}, connected again at {back_at:.2f} s"
            )

        assert _ids(pages) == ids
        for page, name, w in zip(pages, names, watches, strict=True):
            # Nobody left anyone's page, not even for a moment: the tiles are those from before the kill.
            assert w["left"] == [] and page.evaluate(KEPT_JS)["tiles"], (name, w["left"])
            assert [state for state, _ in w["states"]] == ["reconnecting", "connected"], (name, w["states"])
            assert page.get_by_role("button", name="Rejoin").is_hidden()
            assert page.locator("#error").is_hidden(), page.text_content("#error")
            # The call was rebuilt on the SFU from the start (the resume said where it was): no p2p detour.
            resumed = [(r["restored"], r["mode"]) for r in w["resumed"]]
            assert resumed == [(True, "sfu")] and w["modes"] == [], (name, w["resumed"], w["modes"])
        # Each page said what happened, in the status in the header.
        _see_notices(pages, notices)
        assert all(notices), notices
    finally:
        stop_server(server)


def test_a_p2p_call_goes_on_while_the_server_is_down_and_signaling_comes_back(new_page) -> None:
    recordings = tempfile.mkdtemp("-recordings")
    server = start_server("--recordings-dir", recordings, "--reconnect-grace", "20")
    try:
        pages = _join(new_page, server, "restart-p2p", ["Ada", "Bob"])
        for page in pages:
            wait_for(lambda page=page: _frames(page) >= 30, 30, "video both ways")
            assert page.evaluate("window.huddle.mode") == "p2p"
        ids = _ids(pages)
        who = [_who(page) for page in pages]
        for page in pages:
            page.evaluate(WATCH_JS, False)

        killed = time.time()
        server.proc.kill()
        server.proc.wait(5)
        wait_for(
            lambda: all(page.get_attribute("#status", "data-state") == "reconnecting" for page in pages),
            5,
            "both pages to notice",
        )
        # Browser to browser, the media needs no server: it keeps flowing while there is none.
        down = [_frames(page) for page in pages]
        time.sleep(3)
        later = [_frames(page) for page in pages]
        assert all(b - a >= 45 for a, b in zip(down, later, strict=True)), (down, later)

        server = _restart(server, recordings)
        notices = [False] * len(pages)

        def back() -> bool:
            _see_notices(pages, notices)
            return all(
                page.get_attribute("#status", "data-state") == "connected"
                and [t["connection"] for t in _tiles(page)] == ["connected"]
                for page in pages
            )

        wait_for(back, 20, "signaling back on both pages")
        print(f"\np2p: signaling back {time.time() - killed:.2f} s after the kill (3 s of it with no server)")
        assert _ids(pages) == ids
        assert [_who(page) for page in pages] == who
        for page in pages:
            # The same tile and the same peer connection all along: the other person never left the page.
            watch = page.evaluate("window.__restart")
            assert watch["left"] == [] and page.evaluate(KEPT_JS) == {"tiles": True, "pcs": True}, watch[
                "left"
            ]
        # The video still flows after the ICE restarts of the resume.
        before = [_frames(page) for page in pages]
        time.sleep(2)
        after = [_frames(page) for page in pages]
        assert all(b - a >= 30 for a, b in zip(before, after, strict=True)), (before, after)
        _see_notices(pages, notices)
        assert all(notices), notices
        for page in pages:
            watch = page.evaluate("window.__restart")
            assert [(r["restored"], r["mode"]) for r in watch["resumed"]] == [(True, "p2p")], watch["resumed"]
    finally:
        stop_server(server)


def test_with_two_workers_a_page_follows_the_redirect_and_comes_back_after_its_worker_is_killed(
    new_page,
) -> None:
    """`--workers 2`: the page's socket reaches worker w0 first, which sends the join on to w1, the worker
    whose call it is (`redirect`); w1 killed with -9 and started again by the parent, the pages resume there
    through the door they were given."""
    room = next(name for name in (f"workers-{i}" for i in range(1000)) if choose(name, ["w0", "w1"]) == "w1")
    server = start_server("--workers", "2", "--sfu-always", "--reconnect-grace", "20")
    try:
        pages = _join(new_page, server, room, ["Ada", "Bob"])
        for page in pages:
            wait_for(lambda page=page: [t["frames"] >= 30 for t in _tiles(page)] == [True], 40, "video")
        nodes = {node["id"]: node for node in _cluster(server)["nodes"]}
        assert nodes["w1"]["rooms"] == [room] and nodes["w0"]["rooms"] == []
        ids = _ids(pages)
        for page in pages:
            page.evaluate(WATCH_JS, True)

        killed = time.time()
        os.kill(nodes["w1"]["pid"], signal.SIGKILL)

        def back() -> bool:
            return all(
                page.get_attribute("#status", "data-state") == "connected"
                and [t["frames"] >= 30 for t in _tiles(page, sfu=True)] == [True]
                for page in pages
            )

        wait_for(back, 30, "both pages back on the restarted worker, decoding new video")
        firsts = [round(page.evaluate("window.__restart.firstFrame") / 1000 - killed, 2) for page in pages]
        print(f"\nworkers: first new frame {firsts} s after the kill of w1")
        assert _ids(pages) == ids
        restarted = {node["id"]: node for node in _cluster(server)["nodes"]}["w1"]
        assert restarted["pid"] != nodes["w1"]["pid"] and restarted["rooms"] == [room]
        for page in pages:
            watch = page.evaluate("window.__restart")
            assert watch["left"] == [] and page.evaluate(KEPT_JS)["tiles"], watch["left"]
            assert [(r["restored"], r["moved"]) for r in watch["resumed"]] == [(True, False)], watch[
                "resumed"
            ]
    finally:
        stop_server(server)


def _cluster(server: Server) -> dict:
    with urllib.request.urlopen(f"{server.url}/api/cluster", timeout=5) as response:
        return json.load(response)
