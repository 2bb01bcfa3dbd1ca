"""Real headless Chromium (Debian's, fake camera and microphone) driving the real call page.

These tests carry media, so `make test` runs them inside a network namespace that has only loopback
(scripts/in-netns): Chromium gathers candidates on every interface it sees.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from playwright.sync_api import Browser, Page

from tests.chromium import chromium


@dataclass
class Server:
    proc: subprocess.Popen
    http: int
    stun: int
    media: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"


def start_server(*extra: str) -> Server:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUDDLE_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "huddle",
            "serve",
            "--port",
            "0",
            "--stun-port",
            "0",
            "--media-port",
            "0",
            *(() if "--recordings-dir" in extra else ("--recordings-dir", tempfile.mkdtemp("-recordings"))),
            *extra,
        ],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    line = proc.stdout.readline()
    if not line:
        proc.wait(5)
        raise RuntimeError(f"huddle serve exited with {proc.returncode} before it was ready")
    ready = json.loads(line)
    return Server(proc, ready["http"], ready["stun"], ready["media"])


def stop_server(server: Server) -> None:
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(10)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        raise
    assert server.proc.returncode == 0, f"server exited with {server.proc.returncode}"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = start_server()
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


@pytest.fixture
def new_page(browser: Browser) -> Iterator[Callable[..., Page]]:
    """Each page in its own context, as separate people on separate machines would be."""
    contexts = []

    def make(url: str, init_script: str | None = None, **context_options: Any) -> Page:
        """`context_options` for Browser.new_context, e.g. device_scale_factor for a high-density screen;
        `init_script` runs in the page before its own scripts."""
        context = browser.new_context(**{"viewport": {"width": 1000, "height": 700}, **context_options})
        contexts.append(context)
        if init_script:
            context.add_init_script(init_script)
        page = context.new_page()
        page.on("pageerror", lambda exc: print(f"[page error] {exc}"))
        page.goto(url)
        return page

    yield make
    for context in contexts:
        context.close()


# Per remote peer: decoded video frames, received audio, and the selected candidate pair's two ends.
STATS_JS = """
async () => {
  const out = [];
  for (const {participantId, pc} of window.huddle.peerConnections()) {
    const stats = await pc.getStats();
    const peer = {participantId, framesDecoded: 0, frameWidth: 0, audioPackets: 0, audioSamples: 0,
                  pair: null, connectionState: pc.connectionState};
    const byId = new Map();
    stats.forEach(r => byId.set(r.id, r));
    stats.forEach(r => {
      if (r.type === 'inbound-rtp' && r.kind === 'video') {
        peer.framesDecoded += r.framesDecoded || 0;
        peer.frameWidth = Math.max(peer.frameWidth, r.frameWidth || 0);
      }
      if (r.type === 'inbound-rtp' && r.kind === 'audio') {
        peer.audioPackets += r.packetsReceived || 0;
        peer.audioSamples += r.totalSamplesReceived || 0;
      }
      if (r.type === 'transport' && r.selectedCandidatePairId) {
        const pair = byId.get(r.selectedCandidatePairId);
        const local = byId.get(pair.localCandidateId), remote = byId.get(pair.remoteCandidateId);
        peer.pair = {state: pair.state,
                     local: {address: local.address, port: local.port, type: local.candidateType,
                             protocol: local.protocol},
                     remote: {address: remote.address, port: remote.port, type: remote.candidateType,
                              protocol: remote.protocol}};
      }
    });
    out.push(peer);
  }
  return out;
}
"""


def peer_stats(page: Page) -> list[dict[str, Any]]:
    return page.evaluate(STATS_JS)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def wait_decoding(page: Page, peers: int, frames: int = 30, timeout: float = 30) -> list[dict[str, Any]]:
    """Wait until the page decodes at least `frames` video frames from each of `peers` remote peers."""

    def enough() -> list[dict[str, Any]] | None:
        stats = peer_stats(page)
        if len(stats) == peers and all(s["framesDecoded"] >= frames for s in stats):
            return stats
        return None

    return wait_for(enough, timeout, f"{frames} decoded frames from {peers} peers")


def remote_tiles(page: Page) -> list[str]:
    return page.eval_on_selector_all(".tile.remote", "els => els.map(e => e.dataset.name)")


@contextlib.contextmanager
def dropping(*rules: str) -> Iterator[None]:
    """nftables rules (`udp dport 7882`, say) whose matching packets are dropped on arrival, while inside.

    The tests run in a network namespace of their own, so this touches nothing outside them.
    """
    table = "huddle_test_drop"
    script = f"add table inet {table}; add chain inet {table} in {{ type filter hook input priority 0; }}; "
    script += "; ".join(f"add rule inet {table} in {rule} drop" for rule in rules)
    subprocess.run(["nft", script], check=True)
    try:
        yield
    finally:
        subprocess.run(["nft", f"delete table inet {table}"], check=True)
