"""`make bench`: bounded load scenarios against our SFU and Janus, side by side: one table, one JSON file.

    scripts/in-netns .venv/bin/python -m bench.run            # the full set (calls of 10, 50, 100; webinar)
    scripts/in-netns .venv/bin/python -m bench.run --quick    # 10 people for 10 s: a smoke run
    scripts/in-netns .venv/bin/python -m bench.run --only cluster --no-janus   # bench.cluster alone
    scripts/in-netns .venv/bin/python -m bench.run --only kafka --no-janus     # bench.kafka_recording alone
    scripts/in-netns .venv/bin/python -m bench.run --only turn --no-janus      # bench.turn alone

For each scenario a fresh server (`python -m huddle serve ... --sfu-always`) is started as a subprocess, the
synthetic participants of huddle.loadtest join it over the real protocol, and during the loadtest's measured
window we sample, at both edges: the server's CPU (user + system from /proc/<pid>/stat, the server process and
any processes under it, never the generator), its RSS (/proc/<pid>/status) and the SFU's packet counters
(/metrics: huddle_sfu_rtp_in_total, huddle_sfu_rtp_out_total). Loss and forwarding delay come from the
loadtest result (what the subscribers received). Everything is bounded: scenario count, each scenario's
deadline, the server's start and stop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from huddle import stun
from huddle.loadtest import layout as layouts
from huddle.loadtest.connection import MediaConnection, ReceivePoller
from huddle.loadtest.media import build_library
from huddle.loadtest.negotiation import subscribe_answer
from huddle.loadtest.pacer import Pacer
from huddle.loadtest.participant import Shared, SyntheticParticipant
from huddle.loadtest.run import TICK, LoadtestConfig, LoadtestResult, _collect, _every, run_loadtest
from huddle.loadtest.sender import now_us
from huddle.rtc.certificate import Certificate
from huddle.stun.message import encode_xor_mapped_address

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SERVER_START_TIMEOUT = 30.0
JANUS_NOTE = "Janus: not measured in this run"


@dataclass(frozen=True)
class Scenario:
    name: str
    participants: int
    publishers: int
    layout: str = "speaker"
    duration: float = 20.0
    warmup: float = 3.0
    description: str = ""


SCENARIOS = (
    Scenario("call-10", 10, 10, description="10 people, all publish, speaker layout"),
    Scenario("call-50", 50, 10, description="50 people, 10 publish, speaker layout"),
    Scenario("call-100", 100, 10, description="100 people, 10 publish, speaker layout"),
    Scenario("webinar-100", 101, 1, description="1 publisher, 100 viewers"),
)
QUICK = (Scenario("quick-10", 10, 10, duration=10.0, warmup=2.0, description="smoke run: 10 people, 10 s"),)


@dataclass
class Sample:
    """The server's state at one edge of the measured window."""

    at: float
    cpu: float
    rss: int
    rtp_in: float
    rtp_out: float


@dataclass
class Row:
    sfu: str
    scenario: str
    participants: int
    publishers: int
    complete: bool = False
    window_seconds: float = 0.0
    pps_in: float = 0.0
    pps_out: float = 0.0
    cpu_seconds: float = 0.0
    cpu_percent: float = 0.0  # of one core
    rss_mb: float = 0.0
    us_per_forwarded: float | None = None
    forwarded_per_cpu_second: float | None = None
    loss_percent: float | None = None
    delay_p50_ms: float | None = None
    delay_p99_ms: float | None = None
    videos_at_layer: str = ""
    notes: list[str] = field(default_factory=list)
    loadtest: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# The server under test and what we read of it


def _descendants(pid: int) -> list[int]:
    """pid and every process under it (children files of every thread), bounded in count."""
    found, todo = [], [pid]
    while todo and len(found) < 256:
        current = todo.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with contextlib.suppress(OSError):
                    children = Path(f"/proc/{current}/task/{task}/children").read_text()
                    todo.extend(int(c) for c in children.split())
    return found


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of pid and the processes under it, from /proc/<pid>/stat."""
    total = 0
    for p in _descendants(pid):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces: cut after it
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLOCK_TICKS


def process_rss(pid: int) -> int:
    """Resident bytes of pid and the processes under it."""
    total = 0
    for p in _descendants(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def read_metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        match = re.match(r"^(huddle_sfu_rtp_(?:in|out)_total)\s+(\S+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


class HuddleServer:
    """`python -m huddle serve` as a subprocess, on loopback, with free ports."""

    def __init__(self, max_participants: int = 200) -> None:
        self.max_participants = max_participants
        self.process: subprocess.Popen[str] | None = None
        self.url = ""
        self.stderr_path = RESULTS / "server.stderr.log"

    def start(self) -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "huddle", "serve", "--host", "127.0.0.1", "--port", "0"]
        command += ["--stun-port", "0", "--media-port", "0", "--sfu-always"]
        command += ["--max-participants", str(self.max_participants)]
        command += ["--recordings-dir", tempfile.mkdtemp("-recordings")]
        self.stderr_file = self.stderr_path.open("w")
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=self.stderr_file, text=True, cwd=ROOT
        )
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise RuntimeError(f"the server exited with {code}: see {self.stderr_path}")
            readable, _, _ = select.select([self.process.stdout], [], [], 0.2)
            if not readable:
                continue
            line = self.process.stdout.readline()  # the ready line is one whole line, flushed
            with contextlib.suppress(ValueError, AttributeError):
                ready = json.loads(line)
                if ready.get("event") == "ready":
                    self.url = f"http://127.0.0.1:{ready['http']}"
                    return
        self.stop()
        raise RuntimeError(f"the server was not ready within {SERVER_START_TIMEOUT:g} s")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def sample(self) -> Sample:
        metrics = read_metrics(self.url)
        return Sample(
            at=time.monotonic(),
            cpu=process_cpu(self.pid),
            rss=process_rss(self.pid),
            rtp_in=metrics.get("huddle_sfu_rtp_in_total", 0.0),
            rtp_out=metrics.get("huddle_sfu_rtp_out_total", 0.0),
        )

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.stderr_file.close()
        self.process = None


# ---------------------------------------------------------------------------------------------------------
# One scenario against our SFU


def _fill(row: Row, before: Sample | None, after: Sample | None, result: LoadtestResult | None) -> None:
    if before is not None and after is not None:
        window = max(1e-6, after.at - before.at)
        forwarded = after.rtp_out - before.rtp_out
        cpu = after.cpu - before.cpu
        row.window_seconds = round(window, 2)
        row.pps_in = round((after.rtp_in - before.rtp_in) / window)
        row.pps_out = round(forwarded / window)
        row.cpu_seconds = round(cpu, 2)
        row.cpu_percent = round(100 * cpu / window, 1)
        row.rss_mb = round(after.rss / 2**20, 1)
        if forwarded > 0:
            row.us_per_forwarded = round(1e6 * cpu / forwarded, 2)
        if cpu > 0:
            row.forwarded_per_cpu_second = round(forwarded / cpu)
    if result is not None:
        row.complete = result.complete
        row.loss_percent = result.loss_percent
        row.delay_p50_ms = result.delay_p50_ms
        row.delay_p99_ms = result.delay_p99_ms
        row.videos_at_layer = f"{result.videos_at_layer}/{result.videos_expected}"
        data = result.to_dict()
        data.pop("subscribers", None)  # per-subscriber detail: huge at 100 people, the totals say enough
        row.loadtest = data
        if not result.complete:
            row.notes.append(f"only {result.connected}/{result.participants} connected")
        row.notes.extend(result.errors[:3])


async def run_ours(scenario: Scenario, say: Any) -> Row:
    row = Row("huddle", scenario.name, scenario.participants, scenario.publishers)
    server = HuddleServer(max_participants=max(200, scenario.participants))
    samples: dict[str, Sample] = {}
    result = None
    try:
        await asyncio.to_thread(server.start)

        def progress(text: str) -> None:
            say(f"  {scenario.name}: {text}")
            # The loadtest says "measuring" just before its window opens and "leaving" just after it closes
            # (and its totals are gathered): sample there, with our own clock for the rates.
            with contextlib.suppress(OSError):
                if text.startswith("measuring"):
                    samples["before"] = server.sample()
                elif text.startswith("leaving") and "before" in samples:
                    samples["after"] = server.sample()

        config = LoadtestConfig(
            url=server.url,
            room=f"bench-{scenario.name}",
            participants=scenario.participants,
            publishers=scenario.publishers,
            duration=scenario.duration,
            layout=scenario.layout,
            warmup=scenario.warmup,
            join_rate=25.0,
            connect_timeout=45.0,
        )
        try:
            result = await run_loadtest(config, progress=progress)
        except TimeoutError:
            row.notes.append("the loadtest overran its deadline")
        except OSError as exc:
            row.notes.append(f"loadtest: {exc}")
    except RuntimeError as exc:
        row.notes.append(str(exc))
    finally:
        await asyncio.to_thread(server.stop)
    _fill(row, samples.get("before"), samples.get("after"), result)
    return row


# ---------------------------------------------------------------------------------------------------------
# The same scenarios against Janus (VideoRoom), driven by the same synthetic media


JANUS_LAYERS = 3  # the rids of publish_offer: q, h, f


class JanusConnection(MediaConnection):
    """The loadtest's connection, answering connectivity checks too: Janus's libnice, even in ICE-lite mode,
    checks the pair back (a triggered check) and brings its side up only when that check is answered."""

    def _receive_stun(self, data: bytes) -> None:
        try:
            message = stun.parse(data)
        except stun.StunError:
            return
        if message.message_class != stun.MessageClass.REQUEST or message.method != stun.BINDING:
            super()._receive_stun(data)
            return
        if self.sock is None or not stun.verify_integrity(data, self.pwd.encode()):
            return
        host, port = self.sock.getsockname()[:2]
        response = stun.StunMessage(
            stun.BINDING,
            stun.MessageClass.SUCCESS,
            message.transaction_id,
            [
                stun.Attribute(
                    stun.XOR_MAPPED_ADDRESS,
                    encode_xor_mapped_address(host, port, message.transaction_id),
                )
            ],
        )
        self._send(stun.encode(response, integrity_key=self.pwd.encode(), fingerprint=True))


class JanusParticipant(SyntheticParticipant):
    """A synthetic participant whose signaling is Janus's VideoRoom API instead of our WebSocket.

    Media is the loadtest's own: the same MediaConnection (ICE, DTLS client, SRTP), the same senders (three
    VP8 simulcast layers and Opus) and the same Receiver. Janus has no `video_sizes` and no dynacast, so each
    subscriber picks its layers with `configure(substream=...)` for its layout, once, and every publisher
    sends all three layers all the time.
    """

    async def publish_to(self, janus: Any, room: int) -> None:
        handle = await janus.attach()
        offer = self._open_publish(JanusConnection, self.name)
        # Our DTLS is always the client: offer `active`, so that Janus answers `passive` (DTLS server).
        offer = offer.replace("a=setup:actpass", "a=setup:active")
        answer = await handle.publish(room, offer, display=self.name)
        await janus.trickle(handle.id)  # our one candidate is in the offer: Janus waits for this before ICE
        self.id = str(handle.feed_id)
        self.shared.index_of[self.id] = self.index
        self.mode = "sfu"
        self._on_publish_answer(answer)

    async def subscribe_to(self, janus: Any, room: int, feeds: list[str]) -> None:
        if self.id is None:
            self.id = f"viewer-{self.index}"
        others = [f for f in feeds if f != self.id]
        if not others:
            return
        handle = await janus.attach()
        offer = await handle.subscribe(room, [int(f) for f in others])
        self.subscribe = JanusConnection(
            self.shared.certificate,
            label=f"{self.name}/subscribe",
            on_rtp=self.receiver.on_rtp,
            on_connected=self._on_subscribe_connected,
            poller=self.shared.poller,
        )
        answer, transport, tracks = subscribe_answer(
            offer,
            ufrag=self.subscribe.ufrag,
            pwd=self.subscribe.pwd,
            fingerprint=self.shared.certificate.fingerprint_sha256,
            session_id=self.session_id,
        )
        feed_of = {str(s.get("mid")): str(s.get("feed_id")) for s in handle.streams}
        self.order = others
        stage = self.shared.speaker_id()
        self.stage = stage if stage in others else others[0]
        self.sizes = layouts.video_sizes(self.shared.layout, others, self.stage)
        layers = []
        for track in tracks:
            publisher = feed_of.get(track.mid, "?")
            self.tracks[track.ssrc] = track
            stream = self.receiver.stream(track.ssrc)
            stream.publisher = publisher
            stream.kind = track.kind
            stream.publisher_index = self.shared.index_of.get(publisher, -1)
            if track.kind == "video":
                stream.expected_layer = layouts.expected_layer(self.sizes.get(publisher))
                # Janus cannot stop a stream it was asked for: a video not shown gets the lowest layer. Janus
                # numbers rid layers in the order of the offer, taken as highest first (janus.js offers h, m,
                # l); ours offers q, h, f (lowest first, as Chromium), so its substream 0 is our f.
                layer = 0 if stream.expected_layer is None else stream.expected_layer
                layers.append({"mid": track.mid, "substream": JANUS_LAYERS - 1 - layer})
        await handle.start(answer)
        await janus.trickle(handle.id)
        self.subscribe.start(transport.ufrag, transport.pwd, transport.fingerprint, transport.address)
        if layers:
            await handle.request({"request": "configure", "streams": layers})

    def _layout_changed(self) -> None:  # no video_sizes to send: layers were chosen by `configure`
        pass

    def _tracks_publishers(self) -> int:
        return len({t.publisher for t in self.tracks.values() if t.kind == "audio"})


JANUS_CANNOT = (
    "Janus differs here: no adaptive layers (each subscriber's layer is set once with configure, no "
    "video_sizes, no dynacast: publishers send all 3 layers all the time), no top-3 audio (every subscribed "
    "audio is forwarded), pkt/s from the generator (sent; received + lost) as Janus has no RTP counters here"
)


async def _until(condition: Any, timeout: float) -> None:
    """Poll `condition` every 50 ms until it holds or `timeout` seconds pass (bounded either way)."""
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)


async def _bounded(items: list[Any], action: Any, limit: int = 8) -> list[BaseException | None]:
    gate = asyncio.Semaphore(limit)

    async def one(item: Any) -> BaseException | None:
        async with gate:
            try:
                await asyncio.wait_for(action(item), 20)
            except Exception as exc:
                return exc
            return None

    return list(await asyncio.gather(*(one(i) for i in items)))


async def run_janus(scenario: Scenario, say: Any) -> Row:
    from bench.janus.harness import JanusClient, JanusServer

    row = Row("janus", scenario.name, scenario.participants, scenario.publishers)
    result = LoadtestResult(config={"room": scenario.name, "layout": scenario.layout}, participants=0)
    result.participants = scenario.participants
    result.publishers = scenario.publishers
    library = await asyncio.to_thread(build_library)
    pacer, poller = Pacer(), ReceivePoller()
    server = JanusServer()
    tasks: list[asyncio.Task[Any]] = []
    people: list[JanusParticipant] = []
    try:
        await server.start()
        say(f"  {scenario.name}: janus up (pid {server.pid}, media on {server.media_ip})")
        async with aiohttp.ClientSession() as http, JanusClient(server.url) as janus:
            shared = Shared(
                url=f"http://{server.media_ip or '10.77.0.1'}:1",
                room=scenario.name,
                certificate=Certificate.generate(),
                library=library,
                pacer=pacer,
                http=http,
                poller=poller,
                layout=scenario.layout,
            )
            people = [
                JanusParticipant(shared, i, publish=i < scenario.publishers)
                for i in range(scenario.participants)
            ]
            shared.participants = people  # type: ignore[assignment]
            loop = asyncio.get_running_loop()
            tasks = [
                loop.create_task(pacer.run()),
                loop.create_task(poller.run()),
                loop.create_task(_every(TICK, lambda now: [p.tick(now) for p in people])),
            ]
            admin = await janus.attach()
            room = await admin.create_room(publishers=max(10, scenario.publishers))
            say(f"  {scenario.name}: publishing {scenario.publishers}")
            started = time.monotonic()
            publishers = [p for p in people if p.publishes]
            for error in await _bounded(publishers, lambda p: p.publish_to(janus, room)):
                if error is not None:
                    result.errors.append(f"publish: {error!r}")
            await _until(
                lambda: all(
                    p.publish is not None and (p.publish.connected or p.publish.failed) for p in publishers
                ),
                30,
            )
            await asyncio.sleep(1.0)  # Janus turns a publisher into a feed at webrtcup
            feeds = [p.id for p in publishers if p.id is not None]
            say(f"  {scenario.name}: subscribing {scenario.participants}")
            for error in await _bounded(people, lambda p: p.subscribe_to(janus, room, feeds)):
                if error is not None:
                    result.errors.append(f"subscribe: {error!r}")
            await _until(lambda: all(p.connected or p.failed for p in people), 45)
            result.joined = sum(1 for p in people if p.id is not None)
            result.connected = sum(1 for p in people if p.connected)
            result.connect_seconds = round(time.monotonic() - started, 2)
            for person in people:
                if person.failed:
                    result.errors.append(person.failed)
            say(f"  {scenario.name}: warming up for {scenario.warmup:g} s")
            await asyncio.sleep(scenario.warmup)
            say(f"  {scenario.name}: measuring for {scenario.duration:g} s")
            sent_before = sum(p.publish.sent for p in publishers if p.publish is not None)
            cpu_before, at_before = server.cpu_seconds(), time.monotonic()
            stamp = now_us()
            for person in people:
                person.receiver.start_window(stamp)
            await asyncio.sleep(scenario.duration)
            stamp = now_us()
            for person in people:
                person.receiver.stop_window(stamp)
            cpu_after, at_after = server.cpu_seconds(), time.monotonic()
            rss = server.rss_bytes()
            sent_after = sum(p.publish.sent for p in publishers if p.publish is not None)
            result.packets_sent = sent_after - sent_before
            result.window_seconds = round(at_after - at_before, 3)
            _collect(result, people)  # type: ignore[arg-type]
            window = at_after - at_before
            forwarded = result.packets_received + result.lost
            before = Sample(at_before, cpu_before, 0, 0, 0)
            after = Sample(at_after, cpu_after, rss, result.packets_sent, forwarded)
            _fill(row, before, after, result)
            row.window_seconds = round(window, 2)
            row.notes.append(JANUS_CANNOT)
            for person in people:
                with contextlib.suppress(Exception):
                    await person.leave()
    except Exception as exc:  # Janus not there, not starting, or refusing: the row says so
        row.notes.append(f"janus: {exc!r}"[:300])
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for person in people:
            with contextlib.suppress(Exception):
                await person.leave()
        with contextlib.suppress(Exception):
            await server.stop()
    return row


async def run_janus_all(
    scenarios: tuple[Scenario, ...], say: Any
) -> tuple[dict[str, Row] | None, str | None]:
    if shutil.which("janus") is None:
        return None, f"{JANUS_NOTE} (the Debian package janus is not installed)"
    rows = {}
    for scenario in scenarios:
        say(f"{scenario.name} ({scenario.description}) against janus")
        rows[scenario.name] = await run_janus(scenario, say)
    measured = [r for r in rows.values() if r.complete]
    if not measured:
        return rows, f"{JANUS_NOTE} (Janus runs failed: see the notes)"
    return rows, None


# ---------------------------------------------------------------------------------------------------------
# The table


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None:
        return "-"
    if theirs == 0:
        return "0/0" if ours == 0 else "inf"
    return f"{ours / theirs:.2f}"


def format_table(rows: list[Row], janus_rows: dict[str, Row] | None, janus_note: str | None) -> str:
    header = (
        f"{'sfu':<7} {'scenario':<12} {'people':>6} {'pubs':>4} {'pkt/s in':>9} {'pkt/s out':>10} "
        f"{'CPU s':>6} {'CPU %':>6} {'RSS MB':>7} {'us/fwd':>7} {'fwd/CPU s':>10} {'loss %':>7} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'layers ok':>9}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        group = [row] + ([janus_rows[row.scenario]] if janus_rows and row.scenario in janus_rows else [])
        for r in group:
            lines.append(
                f"{r.sfu:<7} {r.scenario:<12} {r.participants:>6} {r.publishers:>4} {r.pps_in:>9,.0f} "
                f"{r.pps_out:>10,.0f} {r.cpu_seconds:>6.2f} {r.cpu_percent:>6.1f} {r.rss_mb:>7.1f} "
                f"{_f(r.us_per_forwarded, '.2f'):>7} {_f(r.forwarded_per_cpu_second, ',.0f'):>10} "
                f"{_f(r.loss_percent, '.3f'):>7} {_f(r.delay_p50_ms, '.2f'):>7} "
                f"{_f(r.delay_p99_ms, '.2f'):>7} "
                f"{r.videos_at_layer or '-':>9}"
            )
        if janus_rows and row.scenario in janus_rows:
            j = janus_rows[row.scenario]
            lines.append(
                f"{'':<7} ours/Janus: CPU per forwarded packet "
                f"{_ratio(row.us_per_forwarded, j.us_per_forwarded)}, loss "
                f"{_ratio(row.loss_percent, j.loss_percent)}"
            )
            lines.extend(f"{'':<7} janus note: {n}" for n in j.notes if n != JANUS_CANNOT)
        lines.extend(f"{'':<7} note: {n}" for n in row.notes)
    if janus_note:
        lines.append("")
        lines.append(janus_note)
    if janus_rows:
        lines.append("")
        lines.append(JANUS_CANNOT + ".")
    lines.append("")
    lines.append(
        "CPU: user+sys of the server process(es) only, over the measured window; pkt/s from /metrics "
        "rtp_in/rtp_out; us/fwd = server CPU per forwarded RTP packet; loss and delay (send to receive, one "
        "clock) from the subscribers; layers ok = shown videos at the expected simulcast layer."
    )
    return "\n".join(lines)


def measure_recording(seconds: int) -> dict[str, Any]:
    """Recording costs, measured on synthetic media (no call needed): how fast one core composes and encodes
    the speaker view, and how many participants' per-track recordings one core writes."""
    from bench.recording import composite_speed
    from bench.recording_tracks import tracks_throughput

    return {
        "composite": composite_speed(participants=3, seconds=seconds),
        "tracks": tracks_throughput(seconds),
    }


def format_recording(figures: dict[str, Any]) -> str:
    c, t = figures["composite"], figures["tracks"]
    return "\n".join(
        [
            "recording",
            f"  composite speaker view ({c['participants']} people in, {c['output']} H.264 + AAC out):"
            f" {c['times_real_time']:.2f}x real time on {c['cores']:.2f} cores"
            f" ({c['cpu_per_media_second']:.3f} CPU-s per second of call)",
            f"  per-track files (VP8 {t['media']['video_kbps']} kbit/s + Opus, no re-encoding):"
            f" {t['participants_per_core']:,} participants per core"
            f" ({t['bulk_thread']['us_per_record']:.1f} us per frame)",
        ]
    )


async def main_async(args: argparse.Namespace) -> int:
    scenarios = QUICK if args.quick else SCENARIOS
    if args.only:
        scenarios = tuple(s for s in SCENARIOS + QUICK if s.name in args.only)
    if args.duration:
        scenarios = tuple(
            Scenario(s.name, s.participants, s.publishers, s.layout, args.duration, s.warmup, s.description)
            for s in scenarios
        )

    def say(text: str) -> None:
        print(f"bench: {text}", file=sys.stderr, flush=True)

    started = time.time()
    rows = []
    for scenario in scenarios[:8]:  # bounded: a handful of scenarios
        say(f"{scenario.name} ({scenario.description}) against huddle")
        rows.append(await run_ours(scenario, say))
    janus_rows: dict[str, Row] | None = None
    janus_note: str | None = JANUS_NOTE
    if not args.no_janus:
        janus_rows, janus_note = await run_janus_all(scenarios, say)
    table = format_table(rows, janus_rows, janus_note) if rows else ""
    recording = None
    if not args.no_recording and (not args.only or "recording" in args.only):
        say("recording: composite speed and per-track writer throughput")
        recording = await asyncio.to_thread(measure_recording, 10 if args.quick else 20)
        table = "\n\n".join(part for part in (table, format_recording(recording)) if part)
    cluster = None
    if not args.no_cluster and (not args.only or "cluster" in args.only):
        from bench.cluster import format_cluster, measure_cluster

        cluster = await measure_cluster(say, runs=2 if args.quick else 5)
        table = "\n\n".join(part for part in (table, format_cluster(cluster)) if part)
    heavy = None
    if not args.no_heavy and (not args.only or "heavy" in args.only):
        from bench.heavy import format_heavy, measure_heavy

        heavy = await measure_heavy(say, quick=args.quick)
        table = "\n\n".join(part for part in (table, format_heavy(heavy)) if part)
    kafka = None
    if not args.no_kafka and (not args.only or "kafka" in args.only):
        from bench.kafka_recording import format_kafka, measure_kafka

        kafka = await measure_kafka(say, quick=args.quick)
        table = "\n\n".join(part for part in (table, format_kafka(kafka)) if part)
    turn = None
    if not args.no_turn and (not args.only or "turn" in args.only):
        from bench.turn import format_turn, measure_turn

        turn = await measure_turn(say, quick=args.quick)
        table = "\n\n".join(part for part in (table, format_turn(turn)) if part)
    print(table, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    path = RESULTS / f"{stamp}.json"
    document = {
        "started": stamp,
        "seconds": round(time.time() - started, 1),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "scenarios": [asdict(s) for s in scenarios],
        "huddle": [asdict(r) for r in rows],
        "janus": [asdict(r) for r in janus_rows.values()] if janus_rows else None,
        "janus_note": janus_note,
        "recording": recording,
        "cluster": cluster,
        "heavy": heavy,
        "kafka": kafka,
        "turn": turn,
        "table": table,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwritten to {path.relative_to(ROOT)}", flush=True)
    clustered = cluster is None or all(part["complete"] for part in cluster.values())
    heavy_done = heavy is None or all(heavy[k]["complete"] for k in ("capacity", "pipe") if k in heavy)
    kafka_done = kafka is None or kafka["complete"]
    turn_done = turn is None or turn["complete"]
    done = clustered and heavy_done and kafka_done and turn_done
    return 0 if all(r.complete for r in rows) and done else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small scenario: 10 people for 10 s")
    parser.add_argument("--only", nargs="+", help="scenario names to run (e.g. call-10 webinar-100)")
    parser.add_argument("--duration", type=float, help="seconds measured per scenario (default 20)")
    parser.add_argument("--no-janus", action="store_true", help="our SFU only")
    parser.add_argument("--no-recording", action="store_true", help="skip the recording figures")
    parser.add_argument("--no-cluster", action="store_true", help="skip the cluster figures (bench.cluster)")
    parser.add_argument("--no-heavy", action="store_true", help="skip the heavy-call figures (bench.heavy)")
    parser.add_argument("--no-kafka", action="store_true", help="skip the Kafka recording figures")
    parser.add_argument("--no-turn", action="store_true", help="skip the TURN relay figures (bench.turn)")
    args = parser.parse_args(argv)
    if args.duration is not None and not 1 <= args.duration <= 120:
        parser.error("--duration must be 1..120 s")
    try:
        return asyncio.run(asyncio.wait_for(main_async(args), timeout=1800))
    except TimeoutError:
        print("bench: the whole run overran 25 minutes and was stopped", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
