"""A load test run: synthetic participants join one room, media flows, a window is measured, everyone leaves.

    result = await run_loadtest(LoadtestConfig(url="http://127.0.0.1:8080", room="load", participants=100,
                                               publishers=10, duration=30))
    print(format_summary(result))

Phases: encode the media (once per process), join at `join_rate` per second (publishers first: they are the
first `publishers` participants), wait until every media connection is up (at most `connect_timeout`), let
the layers settle for `warmup` seconds, measure for `duration` seconds, leave. Everything is bounded:
`MAX_PARTICIPANTS`, `MAX_DURATION`, and a deadline over the whole run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
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
    "LoadtestConfig",
    "LoadtestResult",
    "format_summary",
    "run_loadtest",
]

log = logging.getLogger("huddle.loadtest")

TICK = 0.05  # seconds between the process-wide timer passes over all participants


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
    cpu_seconds: float = 0.0  # the generator's own (user + system), inside the window
    cpu_percent_per_participant: float = 0.0  # of one core
    pacer: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    subscribers: list[SubscriberResult] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Everyone joined and connected: the figures describe the call asked for."""
        return self.joined == self.participants and self.connected == self.participants

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
        )
        people = [
            SyntheticParticipant(shared, i, publish=i < config.publisher_count)
            for i in range(config.participants)
        ]
        shared.participants = people
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(pacer.run()),
            loop.create_task(poller.run()),
            loop.create_task(_every(TICK, lambda now: [p.tick(now) for p in people])),
        ]
        try:
            await _measure(config, result, people, pacer, say)
        finally:
            say("leaving")
            await asyncio.gather(*(p.leave() for p in people), return_exceptions=True)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    return result


async def _measure(
    config: LoadtestConfig,
    result: LoadtestResult,
    people: list[SyntheticParticipant],
    pacer: Pacer,
    say: Callable[[str], None],
) -> None:
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

    say(f"warming up for {config.warmup:g} s")
    await asyncio.sleep(config.warmup)
    say(f"measuring for {config.duration:g} s")
    sent_before = [(c.sent, c.sent_bytes) for p in people for c in (p.publish,) if c is not None]
    fired, late, skipped, busy = pacer.fired, pacer.late, pacer.skipped, pacer.busy
    cpu_before = _cpu()
    window_start = time.monotonic()
    stamp = now_us()
    for person in people:
        person.receiver.start_window(stamp)
    await asyncio.sleep(config.duration)
    stamp = now_us()
    for person in people:
        person.receiver.stop_window(stamp)
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
    sent_after = [(c.sent, c.sent_bytes) for p in people for c in (p.publish,) if c is not None]
    result.packets_sent = sum(a for a, _ in sent_after) - sum(a for a, _ in sent_before)
    result.bytes_sent = sum(b for _, b in sent_after) - sum(b for _, b in sent_before)
    _collect(result, people)


def _collect(result: LoadtestResult, people: list[SyntheticParticipant]) -> None:
    histogram = DelayHistogram()
    for person in people:
        result.keyframe_requests += person.keyframe_requests
        result.errors.extend(f"{person.name}: {error}" for error in person.errors)
        if person.id is None:
            continue
        sub = person.results()
        result.subscribers.append(sub)
        histogram.merge(person.receiver.histogram)
        result.packets_received += sub.packets
        result.bytes_received += sum(s.bytes for s in sub.streams)
        result.lost += sub.lost
        result.freezes += sub.freezes
        result.videos_expected += sub.videos_expected
        result.videos_received += sub.videos_received
        result.videos_at_layer += sub.videos_at_layer
        result.videos_unexpected += sub.videos_unexpected
        result.audio_expected += sub.audio_expected
        result.audio_received += sub.audio_received
    expected = result.packets_received + result.lost
    result.loss_percent = round(100 * result.lost / expected, 4) if expected else 0.0
    result.delay_p50_ms = histogram.percentile_ms(0.5)
    result.delay_p99_ms = histogram.percentile_ms(0.99)
    result.delay_max_ms = histogram.max_us / 1000 if histogram.total else None
    del result.errors[50:]  # the first ones say what went wrong; a hundred copies say no more


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_summary(result: LoadtestResult, *, rows: int = 20) -> str:
    """A human-readable table of the run."""
    config = result.config
    window = result.window_seconds or 1.0
    sent, received = result.packets_sent, result.packets_received
    lines = [
        f"huddle loadtest: {result.participants} participants ({result.publishers} publishing) in room "
        f"{config['room']!r}, layout {config['layout']}, {result.window_seconds:.1f} s measured",
        f"  joined {result.joined}/{result.participants} in {result.join_seconds:.1f} s, "
        f"connected {result.connected}/{result.participants} after {result.connect_seconds:.1f} s",
        f"  sent      {sent:>10,} RTP packets  {sent / window:>9,.0f} /s  "
        f"{result.bytes_sent * 8 / window / 1e6:8.2f} Mbit/s",
        f"  received  {received:>10,} RTP packets  {received / window:>9,.0f} /s  "
        f"{result.bytes_received * 8 / window / 1e6:8.2f} Mbit/s",
        f"  loss      {result.lost:,} packets ({result.loss_percent:.3f} %), freezes (video gaps > 0.5 s) "
        f"{result.freezes}",
        f"  delay     p50 {_ms(result.delay_p50_ms)} ms, p99 {_ms(result.delay_p99_ms)} ms, "
        f"max {_ms(result.delay_max_ms)} ms (send to receive, one clock)",
        f"  videos    {result.videos_received}/{result.videos_expected} shown videos arrive, "
        f"{result.videos_at_layer}/{result.videos_expected} at the expected layer, "
        f"{result.videos_unexpected} not shown but sent; audio streams "
        f"{result.audio_received}/{result.audio_expected} (top-3 rule)",
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
        )
        for sub in result.subscribers[:rows]:
            shown = [s for s in sub.streams if s.kind == "video" and s.expected_layer is not None]
            layers = " ".join(f"{s.layer or '-'}({s.expected_layer})" for s in shown[:4])
            if len(shown) > 4:
                layers += " ..."
            lines.append(
                f"  {sub.index:>3}  {sub.participant:<12} {sub.packets:>9,} {sub.lost:>6} {sub.freezes:>7} "
                f"{sub.videos_received:>3}/{sub.videos_expected:<3} {layers:<24} "
                f"{sub.audio_received:>2}/{sub.audio_expected:<2} {_ms(sub.delay_p50_ms):>7} "
                f"{_ms(sub.delay_p99_ms):>7}"
            )
        if len(result.subscribers) > rows:
            lines.append(f"  ... {len(result.subscribers) - rows} more (--json has them all)")
    if result.errors:
        lines.append("")
        lines.append(f"  errors ({len(result.errors)}):")
        lines.extend(f"    {error}" for error in result.errors[:10])
    return "\n".join(lines)
