"""Chromium calls on a cluster of real `huddle serve` nodes and a real ZooKeeper (the Debian server, tickTime
500 ms): a page opened on any node ends up in the call on the node that serves it, and when that node is
killed (-9) its standby takes the call over while the pages come back by themselves, with the same ids."""

from __future__ import annotations

import itertools
import json
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page

from huddle.cluster.placement import choose
from tests.cluster.nodes import Node, Nodes
from tests.cluster.zookeeper_server import ZooKeeperServer

from .conftest import peer_stats, remote_tiles, wait_for
from .test_server_restart import KEPT_JS, WATCH_JS, _ids, _tiles

SESSION_TIMEOUT = 1.5
# The bound: kill -9 of the active node -> the first newly decoded frame on every page.
FAILOVER_BOUND_S = 3.0
MOVED_NOTICE = "The call moved to another server; you are back in it"

_chroots = itertools.count(1)


@pytest.fixture(scope="module")
def zookeeper_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeperServer]:
    server = ZooKeeperServer(tmp_path_factory.mktemp("zookeeper"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def zookeeper(zookeeper_server: ZooKeeperServer) -> str:
    """`host:port/chroot`: a cluster of this test's own on the module's ZooKeeper."""
    return f"{zookeeper_server.hosts}/huddle-e2e-{next(_chroots)}"


@pytest.fixture
def nodes(zookeeper: str, tmp_path: Path) -> Iterator[Nodes]:
    """`huddle serve` nodes of this test's cluster (each one's stderr in tmp_path/ID/stderr), stopped at the
    end."""
    started = Nodes(tmp_path, zookeeper)
    yield started
    started.close()


def _cluster(server: Node) -> dict[str, Any]:
    with urllib.request.urlopen(f"{server.base}/api/cluster", timeout=5) as response:
        return json.load(response)


def _rooms(server: Node) -> dict[str, dict[str, int]]:
    """Per node id, as `server` sees the cluster: room -> participants."""
    return {node["id"]: node["room_participants"] for node in _cluster(server)["nodes"]}


def _room_for(slot: str, slots: list[str], prefix: str) -> str:
    return next(name for name in (f"{prefix}-{i}" for i in range(1000)) if choose(name, slots) == slot)


def _join(new_page: Callable[[str], Page], urls: list[str], room: str, names: list[str]) -> list[Page]:
    pages = [new_page(f"{url}/r/{room}?name={name}") for url, name in zip(urls, names, strict=True)]
    for page, name in zip(pages, names, strict=True):
        others = sorted(n for n in names if n != name)
        wait_for(lambda page=page, others=others: sorted(remote_tiles(page)) == others, 20, f"{name}'s tiles")
    return pages


def test_a_page_opened_on_another_node_joins_the_call_where_it_is_served_and_decodes_video(
    nodes: Nodes, new_page: Callable[..., Page]
) -> None:
    """Node B is the door: its page is sent on to A, whose SFU carries the media of both pages."""
    a = nodes.start("a", args=("--sfu-always",))
    b = nodes.start("b", args=("--sfu-always",))
    wait_for(lambda: {n["id"] for n in _cluster(b)["nodes"]} == {"a", "b"}, 10, "B to see both nodes")
    room = _room_for("a", ["a", "b"], "routing")

    pages = _join(new_page, [b.base, a.base], room, ["Ada", "Bob"])
    for page, name in zip(pages, ["Ada", "Bob"], strict=True):
        wait_for(
            lambda page=page: [t["frames"] >= 30 for t in _tiles(page)] == [True],
            40,
            f"{name} to decode the other's video",
        )
    # The media of both pages, Ada's (opened on B) included, goes to and comes from A's media port only.
    for page in pages:
        pairs = [s["pair"] for s in peer_stats(page)]
        assert pairs and all(p["state"] == "succeeded" and p["remote"]["port"] == a.media for p in pairs), (
            pairs
        )
    # Either node tells the same: the call is on A, with both in it; B hosts nothing.
    for door in (a, b):
        wait_for(
            lambda door=door: _rooms(door) == {"a": {room: 2}, "b": {}}, 10, "the call on A with 2 people"
        )
    # B sent Ada's join on (`redirect`) rather than hosting the call itself.
    assert _errors(b, "redirected") >= 1


# Stamps, in each page, when a signaling socket is made, opens and closes, and which answers to `join` come
# on it (joined, redirect, error): where the time of a resume goes.
SOCKETS_JS = """
() => {
  const log = [];
  window.__sockets = log;
  const Native = window.WebSocket;
  window.WebSocket = class extends Native {
    constructor(url, ...rest) {
      super(url, ...rest);
      const entry = {url: String(url), made: Date.now(), open: null, closed: null, code: null, answers: []};
      log.push(entry);
      this.addEventListener('open', () => { entry.open = Date.now(); });
      this.addEventListener('close', (e) => { entry.closed = Date.now(); entry.code = e.code; });
      this.addEventListener('message', (e) => {
        try {
          const message = JSON.parse(e.data);
          if (['joined', 'redirect', 'error'].includes(message.type)) {
            entry.answers.push([message.type, message.code || message.node || null, Date.now()]);
          }
        } catch {}
      });
    }
  };
}
"""


# Stamps, in each page, the peer connections made after the kill (the SFU's publish and subscribe): when
# each is first seen, when it connects (ICE and DTLS done), and on the subscribe connection the first video
# packet and the first decoded frame (the gap between them is the wait for a keyframe).
TRANSPORTS_JS = """
() => {
  const old = new Set(window.huddle.peerConnections().map((c) => c.pc));
  const seen = {};
  window.__transports = seen;
  const started = Date.now();
  let busy = false;
  const timer = setInterval(async () => {
    if (busy) return;
    busy = true;
    for (const {participantId, pc} of window.huddle.peerConnections()) {
      if (old.has(pc)) continue;
      const e = seen[participantId] ??= {seen: Date.now(), connected: null, packet: null, frame: null};
      if (e.connected === null && pc.connectionState === 'connected') e.connected = Date.now();
      if (participantId !== 'sfu:subscribe' || e.frame !== null) continue;
      let packets = 0, frames = 0;
      (await pc.getStats()).forEach((r) => {
        if (r.type === 'inbound-rtp' && r.kind === 'video') {
          packets += r.packetsReceived || 0;
          frames += r.framesDecoded || 0;
        }
      });
      if (e.packet === null && packets > 0) e.packet = Date.now();
      if (frames > 0) e.frame = Date.now();
    }
    busy = false;
    if (seen['sfu:subscribe']?.frame || Date.now() - started > 30000) clearInterval(timer);
  }, 50);
}
"""


class _Watcher:
    """Polls a standby's /api/cluster from a thread: when it first says it serves the dead node's slot."""

    def __init__(self, standby: Node, slot: str) -> None:
        self.standby, self.slot = standby, slot
        self.serving_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 30
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                me = next(n for n in _cluster(self.standby)["nodes"] if n["id"] == self.standby.id)
            except (OSError, StopIteration, ValueError):
                me = None
            if me and me["role"] == "active" and me["serves"] == self.slot:
                self.serving_at = time.time()
                return
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _errors(node: Node, kind: str) -> float:
    """The node's `huddle_errors_total` of this kind (redirected joins, refused origins, ...)."""
    with urllib.request.urlopen(f"{node.base}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f'huddle_errors_total{{kind="{kind}"}}'):
                return float(line.split()[-1])
    return 0.0


def _timeline(page: Page, killed: float) -> str:
    """One page's resume after the kill, in seconds since it: states, sockets, answers, first new frame."""
    watch = page.evaluate("window.__restart")
    sockets = page.evaluate("window.__sockets")

    def at(ms: float | None) -> str:
        return "-" if ms is None else f"{ms / 1000 - killed:.2f}"

    parts = [f"{state}@{at(t)}" for state, t in watch["states"]]
    for s in sockets:
        port = s["url"].split(":")[2].split("/")[0]
        answers = ",".join(f"{kind}({detail})@{at(t)}" for kind, detail, t in s["answers"])
        parts.append(
            f"ws :{port} made@{at(s['made'])} open@{at(s['open'])} [{answers}] closed@{at(s['closed'])}"
        )
    for name, t in page.evaluate("window.__transports").items():
        parts.append(f"{name} " + " ".join(f"{k}@{at(v)}" for k, v in t.items()))
    parts.append(f"first new frame@{at(watch['firstFrame'])}")
    return "; ".join(parts)


def test_the_standby_takes_over_a_killed_active_and_every_page_decodes_again_within_the_bound(
    nodes: Nodes, new_page: Callable[..., Page]
) -> None:
    """kill -9 of the active node under a 3-page SFU call: its standby takes the slot when ZooKeeper ends the
    dead node's session, and every page resumes there by itself (signed resume token, `restored`), keeps its
    participant id and the others' tiles, and decodes new frames of both others within FAILOVER_BOUND_S."""
    # SFU from the first join (the call under test is the one the SFU carries, not the move to it).
    sfu = ("--sfu-always",)
    active = nodes.start("a", session_timeout=SESSION_TIMEOUT, args=sfu)
    standby = nodes.start("s", standby_for="a", session_timeout=SESSION_TIMEOUT, args=sfu)
    wait_for(lambda: {n["id"] for n in _cluster(active)["nodes"]} == {"a", "s"}, 10, "A to see its standby")
    names = ["Ada", "Bob", "Cy"]
    room = "failover"
    pages = _join(new_page, [active.base] * 3, room, names)
    for page, name in zip(pages, names, strict=True):
        assert page.evaluate("window.huddle.mode") == "sfu"
        wait_for(
            lambda page=page: [t["frames"] >= 30 for t in _tiles(page)] == [True, True],
            40,
            f"{name} to decode both others' video",
        )
    wait_for(lambda: _rooms(standby) == {"a": {room: 3}, "s": {}}, 10, "the standby to see the call on A")
    ids = _ids(pages)
    who = [sorted((t["id"], t["name"]) for t in _tiles(page)) for page in pages]
    for page in pages:
        page.evaluate(WATCH_JS, True)
        page.evaluate(SOCKETS_JS)
        page.evaluate(TRANSPORTS_JS)

    watcher = _Watcher(standby, "a")
    killed = time.time()
    active.kill()
    assert active.proc.returncode == -signal.SIGKILL

    notices = [False] * len(pages)

    def back() -> bool:
        for i, page in enumerate(pages):
            notices[i] = notices[i] or page.get_by_role("status").filter(has_text=MOVED_NOTICE).count() == 1
        for page, people in zip(pages, who, strict=True):
            if page.get_attribute("#status", "data-state") != "connected":
                return False
            tiles = _tiles(page, sfu=True)
            if sorted((t["id"], t["name"]) for t in tiles) != people:
                return False
            if not all(t["frames"] >= 10 and t["connection"] == "connected" for t in tiles):
                return False
        return True

    try:
        wait_for(back, 30, "every page back in the call on the standby, decoding new video of both others")
    finally:
        watcher.stop()
        took_over = "-" if watcher.serving_at is None else f"{watcher.serving_at - killed:.2f}"
        print(
            f"\nfailover: the standby serves slot a {took_over} s after kill -9 (requests it refused for "
            f"their origin: {_errors(standby, 'bad_origin'):.0f}); per page:"
        )
        for page, name in zip(pages, names, strict=True):
            print(f"  {name}: {_timeline(page, killed)}")
            print(f"    tiles {_tiles(page, sfu=True)}")
    firsts = [page.evaluate("window.__restart.firstFrame") / 1000 - killed for page in pages]
    print(f"first new frame per page: {[round(first, 2) for first in firsts]} s after kill -9")

    assert _ids(pages) == ids
    # The standby now serves the dead node's slot, with the call and its three people.
    wait_for(lambda: _rooms(standby) == {"s": {room: 3}}, 10, "the call on the standby with 3 people")
    for page, name in zip(pages, names, strict=True):
        watch = page.evaluate("window.__restart")
        # Nobody left anyone's page: the tiles are those from before the kill.
        assert watch["left"] == [] and page.evaluate(KEPT_JS)["tiles"], (name, watch["left"])
        resumed = [(r["restored"], r["moved"], r["mode"]) for r in watch["resumed"]]
        assert resumed == [(True, True, "sfu")] and watch["modes"] == [], (name, resumed, watch["modes"])
        assert page.get_by_role("button", name="Rejoin").is_hidden()
        assert page.locator("#error").is_hidden(), page.text_content("#error")
    # Each page said what happened, in the status in the header.
    assert all(notices), notices
    assert max(firsts) < FAILOVER_BOUND_S, (
        f"first new frame {max(firsts):.2f} s after the kill, over the bound"
    )
