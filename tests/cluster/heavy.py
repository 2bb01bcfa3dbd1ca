"""Helpers for calls spread over several nodes (issue 12): synthetic participants that keep what they hear and
when each packet arrived, the rooms placed where a test wants them, and what the nodes say about their pipes.

Synthetic participants are huddle.loadtest's (the real protocol, real media with a trailer naming the sender),
with three additions for these tests: every message after `joined` is kept (`heard`), the kernel receive time
of every RTP packet is kept while `recording`, and a participant can hide some tiles (`hide`), which sends the
`video_sizes` a page sends when those tiles are scrolled away.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from huddle.cluster.placement import choose
from huddle.loadtest.media import build_library
from huddle.loadtest.pacer import Pacer
from huddle.loadtest.participant import Shared, SyntheticParticipant
from huddle.loadtest.sender import now_us
from huddle.loadtest.stats import Receiver
from huddle.rtc.certificate import Certificate

T = TypeVar("T")

TICK = 0.05  # seconds between the participants' timer passes (consent checks, RTCP reports)


def room_homed_at(home: str, slots: Iterable[str], prefix: str) -> str:
    """A room name whose call placement puts on `home` among `slots`."""
    slots = list(slots)
    return next(n for n in (f"{prefix}-{i}" for i in range(1000)) if choose(n, slots) == home)


def node_of(url: str) -> str:
    """The node id in a door URL (`...?node=ID`), as `redirect.url` and `joined.doors` spell them."""
    return url.rpartition("node=")[2]


class Arrivals(Receiver):
    """A subscriber's receiver that also keeps (SSRC, kernel receive time in µs) of every RTP packet while
    `log` is a list."""

    def __init__(self, decrypt_every: int = 1) -> None:
        super().__init__(decrypt_every)
        self.log: list[tuple[int, int]] | None = None

    def on_rtp(self, data: bytes, arrival_us: int) -> None:
        log = self.log
        if log is not None:
            log.append((int.from_bytes(data[8:12], "big"), arrival_us))
        super().on_rtp(data, arrival_us)


class Watched(SyntheticParticipant):
    """A synthetic participant whose messages, packet arrivals and hidden tiles a test can see and set."""

    def __init__(self, shared: Shared, index: int, *, publish: bool) -> None:
        super().__init__(shared, index, publish=publish)
        self.receiver: Arrivals = Arrivals(shared.decrypt_every)
        self.heard: list[dict[str, Any]] = []
        self.hidden: set[str] = set()
        # Every SSRC any subscribe offer announced, and whose (publisher id, kind) it is: packets are told
        # apart after their publisher left or came back on new streams.
        self.owners: dict[int, tuple[str, str]] = {}
        self.node = ""  # the id of the node this participant is seated at now

    def _joined(self, message: dict[str, Any], url: str) -> None:
        super()._joined(message, url)
        doors = message.get("doors") or [""]
        self.node = node_of(str(doors[0]))  # `doors` starts with the seating node's own

    async def _handle(self, message: dict[str, Any]) -> None:
        self.heard.append(message)
        await super()._handle(message)

    async def _on_subscribe_offer(self, text: str, revision: int) -> None:
        await super()._on_subscribe_offer(text, revision)
        for track in self.tracks.values():
            self.owners[track.ssrc] = (track.publisher, track.kind)

    def _layout_changed(self) -> None:
        super()._layout_changed()
        if self.hidden:
            self.sizes = {pid: size for pid, size in self.sizes.items() if pid not in self.hidden}
        if self.sizes != self._sent_sizes:
            self._schedule_sizes()

    def hide(self, ids: Iterable[str]) -> None:
        """Show every tile but those of `ids` from now on (the `video_sizes` leave them out)."""
        self.hidden = set(ids)
        self._layout_changed()

    def heard_of(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.heard if m.get("type") == kind]

    def packets(self) -> dict[tuple[str, str], int]:
        """RTP packets received so far on the current streams, by (publisher id, kind)."""
        out: dict[tuple[str, str], int] = {}
        for stream in self.receiver.streams.values():
            key = (stream.publisher, stream.kind)
            out[key] = out.get(key, 0) + stream.count
        return out

    def arrivals(self, publisher: str, since_us: int = 0) -> list[int]:
        """Receive times (µs) of the recorded packets of `publisher`'s tracks, from `since_us` on."""
        log = self.receiver.log or []
        owners = self.owners
        return [t for ssrc, t in log if t >= since_us and owners.get(ssrc, ("", ""))[0] == publisher]


class Synthetics:
    """Synthetic participants of one call, driven by the running event loop: added one at a time (each
    joined before the next, so that placement sees them in order) and all gone at `close`."""

    def __init__(self, url: str, room: str, *, speaker: int = 0) -> None:
        """`url`: the http:// door they join at; `speaker`: the index of the one who talks (-1: nobody)."""
        self.url, self.room, self.speaker = url, room, speaker
        self.people: list[Watched] = []
        self.shared: Shared | None = None
        self._http: aiohttp.ClientSession | None = None
        self._loops: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        library = await asyncio.to_thread(build_library)
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=10)
        )
        pacer = Pacer()
        self.shared = Shared(
            url=self.url,
            room=self.room,
            certificate=Certificate.generate(),
            library=library,
            pacer=pacer,
            http=self._http,
            speaker=self.speaker,
        )
        self.shared.participants = self.people
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(pacer.run()), loop.create_task(self._tick())]

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            for person in self.people:
                person.tick(now)

    async def add(self, *, publish: bool = True, timeout: float = 10.0) -> Watched:
        """One more participant, joined (redirects and tickets followed) when this returns."""
        assert self.shared is not None, "start first"
        person = Watched(self.shared, len(self.people), publish=publish)
        self.people.append(person)
        await asyncio.wait_for(person.join(), timeout)
        return person

    async def connected(self, people: Iterable[Watched] | None = None, timeout: float = 20.0) -> None:
        people = list(self.people if people is None else people)

        async def up() -> bool:
            failed = [f"{p.name}: {p.failed}" for p in people if p.failed]
            assert not failed, failed
            return all(p.connected for p in people)

        await until("media connections up", up, timeout)

    async def close(self) -> None:
        await asyncio.gather(*(p.leave() for p in self.people), return_exceptions=True)
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    def errors(self) -> list[str]:
        return [f"{p.name}: {e}" for p in self.people for e in p.errors]


class InThread:
    """An event loop of its own in a thread, for async helpers beside sync Playwright (which owns the main
    thread's loop). `run` waits for a coroutine there, bounded."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="synthetics", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


async def until(what: str, check: Callable[[], Awaitable[Any]], timeout: float, interval: float = 0.1) -> Any:
    """Poll `check` until it returns something true, and return it; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what} (last: {last!r})")
        await asyncio.sleep(interval)


async def flowing(people: Iterable[Watched], seconds: float = 1.0) -> dict[str, set[tuple[str, str]]]:
    """Per participant name, the (publisher id, kind) whose packets arrived within the next `seconds`."""
    people = list(people)
    before = [p.packets() for p in people]
    await asyncio.sleep(seconds)
    out = {}
    for person, old in zip(people, before, strict=True):
        now = person.packets()
        out[person.name] = {key for key, n in now.items() if n > old.get(key, 0)}
    return out


def empty_windows(times_us: list[int], start_us: int, end_us: int, window_us: int) -> list[float]:
    """The starts (s after `start_us`) of the `window_us` windows between start and end without a packet."""
    hits = {(t - start_us) // window_us for t in times_us if start_us <= t < end_us}
    count = (end_us - start_us) // window_us
    return [round(i * window_us / 1e6, 2) for i in range(count) if i not in hits]


def longest_gap_ms(times_us: list[int], start_us: int, end_us: int) -> float:
    """The longest stretch between start, the packets in between, and end, in ms."""
    marks = [start_us, *sorted(t for t in times_us if start_us <= t < end_us), end_us]
    return max(b - a for a, b in itertools.pairwise(marks)) / 1000


async def get_json(http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> Any:
    async with http.get(url, headers=headers or {}) as resp:
        assert resp.status == 200, f"{url}: {resp.status} {await resp.text()}"
        return await resp.json()


async def samples(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> list[tuple[str, dict[str, str], float]]:
    """GET /metrics at `url` (the node's base): (name, labels, value) of every sample."""
    async with http.get(url + "/metrics", headers=headers or {}) as resp:
        assert resp.status == 200, await resp.text()
        text = await resp.text()
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def metric(found: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels`."""
    return sum(v for n, ls, v in found if n == name and all(ls.get(k) == x for k, x in labels.items()))


def out_layers(node: dict[str, Any], room: str, publisher: str) -> dict[str, list[int]] | None:
    """From a node's GET /api/node: the video layers its pipes of `room` send of `publisher`'s tracks, by
    pipe (the other node's id); None when the node has no pipe of that room."""
    pipes = [p for p in node.get("pipes", []) if p.get("room") == room]
    if not pipes:
        return None
    return {
        p["node"]: sorted(
            {
                layer
                for track, ls in p["out_layers"].items()
                if track.startswith(f"{publisher}:")
                for layer in ls
            }
        )
        for p in pipes
    }


@contextlib.asynccontextmanager
async def synthetics(url: str, room: str, *, speaker: int = 0):
    crowd = Synthetics(url, room, speaker=speaker)
    await crowd.start()
    try:
        yield crowd
    finally:
        await crowd.close()


def stamp() -> int:
    """Now on the clock of the packets' receive times (µs)."""
    return now_us()


def serve_workers(directory: Path, *args: str, timeout: float = 30.0) -> tuple[subprocess.Popen[str], int]:
    """`huddle serve --workers 2 ARGS` on port 0, ready: the parent process and its HTTP port (its stderr and
    its workers' in directory/stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUDDLE_")}
    command = [sys.executable, "-m", "huddle", "serve", "--host", "127.0.0.1", "--workers", "2"]
    command += ["--port", "0", "--stun-port", "0", "--media-port", "0"]
    command += ["--recordings-dir", str(directory / "recordings")]
    with (directory / "stderr").open("w") as stderr:
        proc = subprocess.Popen(
            [*command, *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            text=True,
        )
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if readable else ""
    if not line:
        proc.kill()
        proc.wait(10)
        raise AssertionError("no ready line: " + (directory / "stderr").read_text()[-3000:])
    return proc, int(json.loads(line)["http"])


def stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, and -9 if it has not stopped within 15 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
