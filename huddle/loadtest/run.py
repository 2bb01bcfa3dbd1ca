"""A load test run: synthetic participants join one room, media flows, a window is measured, everyone leaves.

    result = await run_loadtest(LoadtestConfig(url="http://127.0.0.1:8080", room="load", participants=100,
                                               publishers=10, duration=30))
    print(format_summary(result))

Phases: encode the media (once per process), join at `join_rate` per second (publishers first: they are the
first `publishers` participants), wait until every media connection is up (at most `connect_timeout`), let
the layers settle for `warmup` seconds, measure for `duration` seconds, leave. With `churn`, from the warm-up
to the end of the window someone leaves every `churn` seconds (every `VANISH_EVERY`th one vanishes, as a
closed tab does; the others hang up) and a newcomer of the same role takes the seat; what the departed
received counts too. Everything is bounded: `MAX_PARTICIPANTS`, `MAX_DURATION`, and a deadline over the whole
run.

`Crowd` is the participants of a run and the loops they share, for drivers with their own timeline (the
soak test, bench/soak.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from huddle.loadtest import MAX_DURATION, MAX_PARTICIPANTS
from huddle.loadtest.connection import ReceivePoller
from huddle.loadtest.layout import LAYOUTS
from huddle.loadtest.media import build_library
from huddle.loadtest.pacer import Pacer
from huddle.loadtest.participant import Shared, SyntheticParticipant
from huddle.loadtest.sender import now_us
from huddle.loadtest.stats import DelayHistogram, SubscriberResult
from huddle.rtc.certificate import Certificate

__all__ = [
    "MAX_DURATION",
    "MAX_PARTICIPANTS",
    "VANISH_EVERY",
    "Crowd",
    "LoadtestConfig",
    "LoadtestResult",
    "format_summary",
    "run_loadtest",
]

log = logging.getLogger("huddle.loadtest")

TICK = 0.05  # seconds between the process-wide timer passes over all participants
VANISH_EVERY = 3  # churn: every third participant who leaves vanishes instead of hanging up


@dataclass
class LoadtestConfig:
    url: str
    room: str
    participants: int = 3
    publishers: int | None = None  # None: everyone publishes
    duration: float = 10.0  # seconds measured
    layout: str = "speaker"
    speaker: int = 0  # index of the participant who talks
    warmup: float = 2.0  # seconds between everyone connected and the measured window
    join_rate: float = 20.0  # joins per second
    connect_timeout: float = 30.0
    decrypt_every: int = 1  # decrypt 1 packet in this many per stream (1: all)
    churn: float = 0.0  # seconds between one leaving and a newcomer taking the seat (0: nobody leaves)
    # False: each publisher's camera sends one stream without simulcast (the library's middle layer, h), as
    # a browser without simulcast does, and every shown video is expected at that layer. With `audio` False
    # too, an SFU has no layer to choose and no loudest three to pick: two SFUs can be measured forwarding
    # the same packets (bench/run.py).
    simulcast: bool = True
    audio: bool = True  # False: publishers offer no microphone, and nobody expects audio

    def validate(self) -> None:
        if not 1 <= self.participants <= MAX_PARTICIPANTS:
            raise ValueError(f"participants must be 1..{MAX_PARTICIPANTS}")
        publishers = self.participants if self.publishers is None else self.publishers
        if not 0 <= publishers <= self.participants:
            raise ValueError("publishers must be 0..participants")
        if not 0 < self.duration <= MAX_DURATION:
            raise ValueError(f"duration must be more than 0 and at most {MAX_DURATION:g} s")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}")
        if not 0 <= self.warmup <= 60 or not 0 < self.connect_timeout <= 300:
            raise ValueError("warmup must be 0..60 s and connect_timeout 0..300 s")
        if not 0 < self.join_rate <= 1000:
            raise ValueError("join_rate must be more than 0 and at most 1000 per second")
        if not 1 <= self.decrypt_every <= 1000:
            raise ValueError("decrypt_every must be 1..1000")
        if self.churn and not (0.5 <= self.churn <= MAX_DURATION and self.participants >= 2):
            raise ValueError(f"churn must be 0 or 0.5..{MAX_DURATION:g} s, with at least 2 participants")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")

    @property
    def publisher_count(self) -> int:
        return self.participants if self.publishers is None else self.publishers


@dataclass
class LoadtestResult:
    config: dict[str, Any]
    media: dict[str, Any] = field(default_factory=dict)
    participants: int = 0
    publishers: int = 0
    joined: int = 0
    connected: int = 0
    join_seconds: float = 0.0
    connect_seconds: float = 0.0
    window_seconds: float = 0.0
    packets_sent: int = 0
    bytes_sent: int = 0
    packets_received: int = 0
    bytes_received: int = 0
    lost: int = 0
    loss_percent: float = 0.0
    freezes: int = 0
    videos_expected: int = 0
    videos_received: int = 0
    videos_at_layer: int = 0
    videos_unexpected: int = 0
    audio_expected: int = 0
    audio_received: int = 0
    delay_p50_ms: float | None = None
    delay_p99_ms: float | None = None
    delay_max_ms: float | None = None
    keyframe_requests: int = 0
    joins: int = 0  # churn: newcomers, from the warm-up to the end of the window
    leaves: int = 0  # churn: departures (hung up or vanished)
    vanished: int = 0
    join_failures: int = 0  # newcomers not connected within connect_timeout
    offer_bytes_max: int = 0  # the largest subscribe offer a participant received last
    # Signaling drops (the node died, restarted, stopped serving) and the way back: resumed, and with media
    # again; drop to the first media packet received again, over those whose media came back.
    reconnects: int = 0
    reconnects_resumed: int = 0
    reconnects_with_media: int = 0
    reconnect_median_s: float | None = None
    reconnect_max_s: float | None = None
    cpu_seconds: float = 0.0  # the generator's own (user + system), inside the window
    cpu_percent_per_participant: float = 0.0  # of one core
    pacer: dict[str, float] = field(default_factory=dict)
    srtp_profiles: list[str] = field(default_factory=list)  # what the media connections negotiated
    errors: list[str] = field(default_factory=list)
    subscribers: list[SubscriberResult] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Everyone joined and connected (newcomers too): the figures describe the call asked for."""
        everyone = self.joined == self.connected == self.participants
        return everyone and not self.join_failures

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["complete"] = self.complete
        return data


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _every(interval: float, action: Callable[[float], None]) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            action(time.monotonic())
        except Exception:  # a timer bug must not stop everyone's consent checks
            log.exception("load test timer failed")


class Crowd:
    """The synthetic participants of one run and the process-wide loops they share (pacing, reading,
    timers). People may come and go: `replace` has one leave and a newcomer of the same role take the seat,
    and `start_churn` does that every few seconds. The departed stay in `gone`, with what they received."""

    def __init__(self, shared: Shared, participants: int, publishers: int) -> None:
        self.shared = shared
        self.people = [SyntheticParticipant(shared, i, publish=i < publishers) for i in range(participants)]
        shared.participants = self.people  # the same list: seats are replaced in place
        self.gone: list[SyntheticParticipant] = []
        self.joins = self.leaves = self.vanished = self.join_failures = 0
        self.measuring = False
        self._next_index = participants  # fresh indices: media trailers tell the newcomer from the departed
        self._busy: set[int] = set()  # seats being replaced
        self._replacing: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._churn: asyncio.Task[None] | None = None

    @property
    def everyone(self) -> list[SyntheticParticipant]:
        return self.people + self.gone

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loops = [
            loop.create_task(self.shared.pacer.run()),
            loop.create_task(_every(TICK, lambda now: [p.tick(now) for p in self.people])),
        ]
        if self.shared.poller is not None:
            self._loops.append(loop.create_task(self.shared.poller.run()))

    async def stop(self) -> None:
        """Everyone still here leaves, and the loops end."""
        await self.stop_churn()
        for task in self._replacing:
            task.cancel()
        await asyncio.gather(*self._replacing, return_exceptions=True)
        await asyncio.gather(*(p.leave() for p in self.people), return_exceptions=True)
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)

    def open_window(self, stamp: int) -> None:
        self.measuring = True
        for person in self.people:
            person.receiver.start_window(stamp)

    def close_window(self, stamp: int) -> None:
        self.measuring = False
        for person in self.people:
            person.receiver.stop_window(stamp)

    def received(self) -> tuple[int, int, int]:
        """(packets, lost, freezes) in the window so far, over everyone who has been in the call."""
        packets = lost = freezes = 0
        for person in self.everyone:
            receiver = person.receiver
            packets += receiver.retired.packets
            lost += receiver.retired.lost
            freezes += receiver.retired.freezes
            for stream in receiver.streams.values():
                packets += stream.received
                lost += stream.lost
                freezes += stream.freezes
        return packets, lost, freezes

    def start_churn(self, interval: float, connect_timeout: float, rng: random.Random) -> None:
        """From now until `stop_churn`, every `interval` seconds someone leaves (never the speaker, nor a
        seat still being replaced) and a newcomer takes the seat."""
        if self._churn is None:
            churn = self._churn_loop(interval, connect_timeout, rng)
            self._churn = asyncio.get_running_loop().create_task(churn)

    async def stop_churn(self) -> None:
        """No more departures; the replacements under way finish (each is bounded by its timeout)."""
        if self._churn is not None:
            self._churn.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._churn
            self._churn = None

    async def _churn_loop(self, interval: float, connect_timeout: float, rng: random.Random) -> None:
        loop = asyncio.get_running_loop()
        seats = [i for i in range(len(self.people)) if i != self.shared.speaker]
        while True:
            await asyncio.sleep(interval)
            free = [i for i in seats if i not in self._busy]
            if not free:
                continue
            vanish = (self.leaves + 1) % VANISH_EVERY == 0
            task = loop.create_task(self.replace(rng.choice(free), vanish=vanish, timeout=connect_timeout))
            self._replacing.add(task)
            task.add_done_callback(self._replacing.discard)

    async def replace(self, seat: int, *, vanish: bool, timeout: float) -> None:
        """The participant in `seat` leaves (or vanishes); a newcomer of the same role joins and connects
        within `timeout` seconds, or counts as a join failure."""
        self._busy.add(seat)
        try:
            old = self.people[seat]
            new = SyntheticParticipant(self.shared, self._next_index, publish=old.publishes)
            self._next_index += 1
            stamp = now_us()
            if self.measuring:
                old.receiver.stop_window(stamp)
                new.receiver.start_window(stamp)
            self.people[seat] = new
            self.gone.append(old)
            self.leaves += 1
            self.vanished += vanish
            await asyncio.gather(old.leave(vanish=vanish), self._join(new, timeout))
        finally:
            self._busy.discard(seat)

    async def _join(self, person: SyntheticParticipant, timeout: float) -> None:
        self.joins += 1
        deadline = time.monotonic() + timeout
        try:
            await asyncio.wait_for(person.join(), timeout)
        except (TimeoutError, OSError, ConnectionError, aiohttp.ClientError) as exc:
            person.errors.append(f"newcomer could not join: {exc!r}")
            self.join_failures += 1
            return
        while time.monotonic() < deadline:
            if person.connected or person.failed:
                break
            await asyncio.sleep(0.05)
        if not person.connected:
            person.errors.append(f"newcomer not connected: {person.failed or f'after {timeout:g} s'}")
            self.join_failures += 1


async def run_loadtest(
    config: LoadtestConfig, *, progress: Callable[[str], None] | None = None
) -> LoadtestResult:
    config.validate()
    say = progress or (lambda text: None)
    # Joining, connecting, warming up, measuring and leaving, each bounded: the run stops by itself.
    deadline = (
        60.0  # encoding and leaving
        + config.participants / config.join_rate
        + config.connect_timeout
        + config.warmup
        + config.duration
    )
    async with asyncio.timeout(deadline):
        return await _run(config, say)


async def _run(config: LoadtestConfig, say: Callable[[str], None]) -> LoadtestResult:
    result = LoadtestResult(config=asdict(config), participants=config.participants)
    result.publishers = config.publisher_count
    say("encoding media")
    library = await asyncio.to_thread(build_library)
    result.media = library.describe()
    pacer = Pacer()
    poller = ReceivePoller()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        shared = Shared(
            url=config.url,
            room=config.room,
            certificate=Certificate.generate(),
            library=library,
            pacer=pacer,
            http=http,
            poller=poller,
            layout=config.layout,
            speaker=config.speaker,
            decrypt_every=config.decrypt_every,
            simulcast=config.simulcast,
            audio=config.audio,
        )
        crowd = Crowd(shared, config.participants, config.publisher_count)
        crowd.start()
        try:
            await _measure(config, result, crowd, pacer, say)
        finally:
            say("leaving")
            await crowd.stop()
    return result


async def _measure(
    config: LoadtestConfig,
    result: LoadtestResult,
    crowd: Crowd,
    pacer: Pacer,
    say: Callable[[str], None],
) -> None:
    people = crowd.people
    say(f"joining {config.participants} participants")
    started = time.monotonic()
    joins = []
    for person in people:
        joins.append(asyncio.get_running_loop().create_task(person.join()))
        await asyncio.sleep(1 / config.join_rate)
    outcomes = await asyncio.gather(*joins, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            result.errors.append(f"join: {outcome!r}")
    joined = [p for p in people if p.id is not None]
    result.joined = len(joined)
    result.join_seconds = round(time.monotonic() - started, 2)
    if not joined:
        return  # nothing to measure: the errors say why

    say("connecting")
    deadline = time.monotonic() + config.connect_timeout
    while time.monotonic() < deadline:
        if all(p.connected or p.failed for p in joined):
            break
        await asyncio.sleep(0.05)
    result.connected = sum(1 for p in joined if p.connected)
    result.connect_seconds = round(time.monotonic() - started, 2)
    for person in joined:
        if person.failed:
            result.errors.append(person.failed)
        elif not person.connected:
            result.errors.append(f"{person.name}: not connected after {config.connect_timeout:g} s")

    if config.churn:
        crowd.start_churn(config.churn, config.connect_timeout, random.Random(config.room))
    say(f"warming up for {config.warmup:g} s")
    await asyncio.sleep(config.warmup)
    say(f"measuring for {config.duration:g} s")
    sent_before = _sent(crowd.everyone)
    fired, late, skipped, busy = pacer.fired, pacer.late, pacer.skipped, pacer.busy
    cpu_before = _cpu()
    window_start = time.monotonic()
    crowd.open_window(now_us())
    await asyncio.sleep(config.duration)
    await crowd.stop_churn()
    crowd.close_window(now_us())
    result.joins, result.leaves = crowd.joins, crowd.leaves
    result.vanished, result.join_failures = crowd.vanished, crowd.join_failures
    window = time.monotonic() - window_start
    cpu = _cpu() - cpu_before
    result.window_seconds = round(window, 3)
    result.cpu_seconds = round(cpu, 3)
    result.cpu_percent_per_participant = round(100 * cpu / window / max(1, config.participants), 3)
    result.pacer = {
        "fired": pacer.fired - fired,
        "late": pacer.late - late,
        "skipped": pacer.skipped - skipped,
        "busy_seconds": round(pacer.busy - busy, 3),
    }
    for index, (packets, sent_bytes) in _sent(crowd.everyone).items():
        packets_before, bytes_before = sent_before.get(index, (0, 0))
        result.packets_sent += packets - packets_before
        result.bytes_sent += sent_bytes - bytes_before
    _collect(result, crowd.everyone)


def _sent(people: list[SyntheticParticipant]) -> dict[int, tuple[int, int]]:
    """RTP packets and bytes each publisher has sent so far, by participant index."""
    return {p.index: p.sent() for p in people if p.publishes}


def _collect(result: LoadtestResult, people: list[SyntheticParticipant]) -> None:
    histogram = DelayHistogram()
    profiles = set()
    for person in people:
        for connection in (person.publish, person.subscribe):
            if connection is not None and connection.srtp is not None:
                profiles.add(connection.srtp.profile.name)
        result.keyframe_requests += person.keyframe_requests
        result.offer_bytes_max = max(result.offer_bytes_max, person.offer_bytes)
        result.errors.extend(f"{person.name}: {error}" for error in person.errors)
        if person.id is None:
            continue
        sub = person.results()
        result.subscribers.append(sub)
        histogram.merge(person.receiver.histogram)
        result.packets_received += sub.packets
        result.bytes_received += sum(s.bytes for s in sub.streams) + person.receiver.retired.bytes
        result.lost += sub.lost
        result.freezes += sub.freezes
        result.videos_expected += sub.videos_expected
        result.videos_received += sub.videos_received
        result.videos_at_layer += sub.videos_at_layer
        result.videos_unexpected += sub.videos_unexpected
        result.audio_expected += sub.audio_expected
        result.audio_received += sub.audio_received
    result.srtp_profiles = sorted(profiles)
    drops = [r for sub in result.subscribers for r in sub.reconnections]
    back = sorted(r.media_seconds for r in drops if r.media_seconds is not None)
    result.reconnects = len(drops)
    result.reconnects_resumed = sum(1 for r in drops if r.resumed_seconds is not None)
    result.reconnects_with_media = len(back)
    if back:
        result.reconnect_median_s = statistics.median(back)
        result.reconnect_max_s = back[-1]
    expected = result.packets_received + result.lost
    result.loss_percent = round(100 * result.lost / expected, 4) if expected else 0.0
    result.delay_p50_ms = histogram.percentile_ms(0.5)
    result.delay_p99_ms = histogram.percentile_ms(0.99)
    result.delay_max_ms = histogram.max_us / 1000 if histogram.total else None
    del result.errors[50:]  # the first ones say what went wrong; a hundred copies say no more


def _f2(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_summary(result: LoadtestResult, *, rows: int = 20) -> str:
    """A human-readable table of the run."""
    config = result.config
    window = result.window_seconds or 1.0
    sent, received = result.packets_sent, result.packets_received
    lines = [
        f"huddle loadtest: {result.participants} participants ({result.publishers} publishing) in room "
        f"{config['room']!r}, layout {config['layout']}, {result.window_seconds:.1f} s measured"
        + ("" if config.get("simulcast", True) else ", camera without simulcast")
        + ("" if config.get("audio", True) else ", no audio"),
        f"  joined {result.joined}/{result.participants} in {result.join_seconds:.1f} s, "
        f"connected {result.connected}/{result.participants} after {result.connect_seconds:.1f} s",
        f"  sent      {sent:>10,} RTP packets  {sent / window:>9,.0f} /s  "
        f"{result.bytes_sent * 8 / window / 1e6:8.2f} Mbit/s",
        f"  received  {received:>10,} RTP packets  {received / window:>9,.0f} /s  "
        f"{result.bytes_received * 8 / window / 1e6:8.2f} Mbit/s",
        f"  loss      {result.lost:,} packets ({result.loss_percent:.3f} %), freezes (video gaps > 0.5 s) "
        f"{result.freezes}",
        f"  delay     p50 {_f2(result.delay_p50_ms)} ms, p99 {_f2(result.delay_p99_ms)} ms, "
        f"max {_f2(result.delay_max_ms)} ms (send to receive, one clock)",
        f"  videos    {result.videos_received}/{result.videos_expected} shown videos arrive, "
        f"{result.videos_at_layer}/{result.videos_expected} at the expected layer, "
        f"{result.videos_unexpected} not shown but sent; audio streams "
        f"{result.audio_received}/{result.audio_expected} (top-3 rule)",
        *(
            [
                f"  churn     {result.leaves} left ({result.vanished} vanished), {result.joins} joined, "
                f"{result.join_failures} newcomers not connected; largest subscribe offer "
                f"{result.offer_bytes_max:,} bytes"
            ]
            if config.get("churn")
            else []
        ),
        *(
            [
                f"  reconnect {result.reconnects} signaling drops, {result.reconnects_resumed} resumed, "
                f"{result.reconnects_with_media} with media again: drop to first media packet median "
                f"{_f2(result.reconnect_median_s)} s, max {_f2(result.reconnect_max_s)} s"
            ]
            if result.reconnects
            else []
        ),
        f"  generator {result.cpu_seconds:.2f} CPU s in the window: "
        f"{result.cpu_percent_per_participant:.2f} % of a core per participant, "
        f"{100 * result.cpu_seconds / window:.0f} % in all; keyframe requests {result.keyframe_requests}, "
        f"pacer late {result.pacer.get('late', 0)}, skipped {result.pacer.get('skipped', 0)}",
    ]
    if result.subscribers:
        lines.append("")
        lines.append(
            f"  {'#':>3}  {'participant':<12} {'packets':>9} {'lost':>6} {'freezes':>7} "
            f"{'videos':>7} {'layers (expected)':<24} {'audio':>5} {'p50 ms':>7} {'p99 ms':>7}"
            + (f" {'media back s':>12}" if result.reconnects else "")
        )
        for sub in result.subscribers[:rows]:
            shown = [s for s in sub.streams if s.kind == "video" and s.expected_layer is not None]
            layers = " ".join(f"{s.layer or '-'}({s.expected_layer})" for s in shown[:4])
            if len(shown) > 4:
                layers += " ..."
            lines.append(
                f"  {sub.index:>3}  {sub.participant:<12} {sub.packets:>9,} {sub.lost:>6} {sub.freezes:>7} "
                f"{sub.videos_received:>3}/{sub.videos_expected:<3} {layers:<24} "
                f"{sub.audio_received:>2}/{sub.audio_expected:<2} {_f2(sub.delay_p50_ms):>7} "
                f"{_f2(sub.delay_p99_ms):>7}"
                + (
                    f" {' '.join(_f2(r.media_seconds) for r in sub.reconnections) or '-':>12}"
                    if result.reconnects
                    else ""
                )
            )
        if len(result.subscribers) > rows:
            lines.append(f"  ... {len(result.subscribers) - rows} more (--json has them all)")
    if result.errors:
        lines.append("")
        lines.append(f"  errors ({len(result.errors)}):")
        lines.extend(f"    {error}" for error in result.errors[:10])
    return "\n".join(lines)
