"""Time to first frame: from opening a call link to the first remote video frame on screen, in real Chromium.

    scripts/in-netns .venv/bin/python -m bench.first_frame               # 5 runs of each case
    scripts/in-netns .venv/bin/python -m bench.first_frame --runs 3 --only 1:1

Two cases, each in a room of its own per run, against one `huddle serve` on loopback with its defaults:
- "1:1": someone waits in the call; the second person opens `/r/<room>?name=...`, connected peer to peer.
- "3rd": two people are in a peer-to-peer call; the third opens the link, which moves the call to the SFU, and
  the figure is the third person's.

The clock is the page's own: `requestVideoFrameCallback` on every video of the page gives the time a frame
was presented, on the performance timeline whose zero is the start of navigation. So the figure covers loading
the page and its modules, the camera, the socket, `join`, ICE, DTLS and the first keyframe, and nothing of
Playwright's own overhead. A page whose remote video shows no frame within the deadline fails the run.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from playwright.sync_api import Browser, Page

from bench.cluster import RESULTS, Serve
from tests.chromium import chromium

MAX_RUNS = 20
FIRST_FRAME_TIMEOUT = 20.0  # seconds a page may take to show a remote frame before the run fails
GOAL_MS = 500.0

# Records, on the page's performance timeline, when the first frame of any video inside a remote tile was
# presented. Installed before the page's own scripts run, so no video element is missed.
FIRST_FRAME_JS = """
(() => {
  window.__firstRemoteFrame = null;
  const watched = new WeakSet();
  const watch = (video) => {
    if (watched.has(video)) return;
    watched.add(video);
    const onFrame = (now) => {
      if (window.__firstRemoteFrame !== null) return;
      if (video.closest('.tile.remote')) window.__firstRemoteFrame = now;
      else video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
  };
  new MutationObserver(() => document.querySelectorAll('video').forEach(watch))
    .observe(document, { subtree: true, childList: true });
})();
"""

Say = Callable[[str], None]


def open_call(browser: Browser, url: str, room: str, name: str) -> Page:
    context = browser.new_context(viewport={"width": 1280, "height": 720})
    context.add_init_script(FIRST_FRAME_JS)
    page = context.new_page()
    page.goto(f"{url}/r/{room}?name={name}")
    return page


def first_frame_ms(page: Page) -> float:
    deadline = time.monotonic() + FIRST_FRAME_TIMEOUT
    while time.monotonic() < deadline:
        value = page.evaluate("window.__firstRemoteFrame")
        if value is not None:
            return float(value)
        time.sleep(0.05)
    raise RuntimeError(f"no remote frame on {page.url} within {FIRST_FRAME_TIMEOUT:g} s")


def one_run(browser: Browser, url: str, others: int) -> float:
    """`others` people join first and see each other (or just wait); then the measured one opens the link."""
    room = "ff-" + secrets.token_hex(4)
    pages = []
    try:
        for i in range(others):
            pages.append(open_call(browser, url, room, f"early{i}"))
        for page in pages[: others if others > 1 else 0]:
            first_frame_ms(page)  # the early ones are in a call that carries video before the newcomer comes
        newcomer = open_call(browser, url, room, "newcomer")
        pages.append(newcomer)
        return first_frame_ms(newcomer)
    finally:
        for page in pages:
            page.context.close()


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 1),
        "min": round(min(values), 1),
        "max": round(max(values), 1),
    }


CASES = {"1:1": 1, "3rd": 2}


def measure(runs: int, only: list[str], say: Say) -> dict[str, Any]:
    server = Serve("first-frame", sfu_always=False)
    server.start()
    results: dict[str, Any] = {"runs": runs, "goal_ms": GOAL_MS, "cases": {}}
    try:
        with chromium() as browser:
            one_run(browser, server.url, 1)  # warm the browser and the server; not counted
            for case in only:
                values = [one_run(browser, server.url, CASES[case]) for _ in range(runs)]
                results["cases"][case] = {"ms": [round(v, 1) for v in values], **spread(values)}
                figures = results["cases"][case]
                say(
                    f"{case:>4}: first remote frame {figures['median']:.0f} ms median "
                    f"({figures['min']:.0f}-{figures['max']:.0f}) over {runs} runs; goal {GOAL_MS:.0f} ms"
                )
    finally:
        server.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--runs", type=int, default=5, help=f"runs per case, at most {MAX_RUNS}")
    parser.add_argument("--only", choices=sorted(CASES), action="append", help="one case (repeatable)")
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= MAX_RUNS:
        parser.error(f"--runs must be 1 to {MAX_RUNS}")
    results = measure(args.runs, args.only or list(CASES), lambda line: print(line, flush=True))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "first_frame.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
