"""`make soak`: a long synthetic call with people coming and going; the server must not grow.

    scripts/in-netns .venv/bin/python -m bench.soak                          # 50 people, 30 minutes
    scripts/in-netns .venv/bin/python -m bench.soak --minutes 4 --settle 1   # a short try

A fresh server (`python -m huddle serve --sfu-always` on 10.77.0.1, the test namespace's address) is started
as a subprocess; the synthetic participants of huddle.loadtest join one room (`--publishers` of them send a
microphone and a three-layer camera, the rest only watch, speaker layout) and stay for `--minutes`, while
every `--churn` seconds one of them leaves and a newcomer of the same role takes the seat (every third one
vanishes as a closed tab does, the others hang up; the speaker stays). Every `READ_INTERVAL` seconds the
server is read: RSS and open files from /metrics (process_resident_memory_bytes, process_open_fds) or, when
the server does not export them, from /proc/<pid>; asyncio tasks and event-loop lag from /metrics
(huddle_asyncio_tasks, huddle_event_loop_lag_seconds) when exported. Each minute's sample is the median of
its readings, so that one instant of churn (a seat being replaced, a seat held for a reconnect) does not
decide it.

The rule: RSS, open files and tasks at the last minute must be within `--tolerance` % of the sample at minute
`--settle`, where the call has settled (the server's caches, pools and allocator arenas warm). The run also
fails when the server dies or a minute passes without media. It prints the table of samples and the verdict
and writes the figures as JSON under bench/results/. Everything is bounded: the run's length, the server's
start and stop, every join; it stops by itself and leaves no process behind.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import json
import os
import random
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from bench.ours import process_cpu
from huddle.loadtest import MAX_PARTICIPANTS
from huddle.loadtest.connection import ReceivePoller
from huddle.loadtest.media import build_library
from huddle.loadtest.pacer import Pacer
from huddle.loadtest.participant import Shared
from huddle.loadtest.run import Crowd
from huddle.loadtest.sender import now_us
from huddle.rtc.certificate import Certificate

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
HOST = "10.77.0.1"
SERVER_START_TIMEOUT = 30.0
READ_INTERVAL = 5.0  # seconds between readings of the server
JOIN_RATE = 10.0  # joins per second at the start
CONNECT_TIMEOUT = 30.0  # seconds for everyone at the start, and for each newcomer
MAX_MINUTES = 120
METRICS = {
    "process_resident_memory_bytes": "rss",
    "process_open_fds": "fds",
    "huddle_asyncio_tasks": "tasks",
    "huddle_event_loop_lag_seconds": "lag",
    "huddle_participants": "participants",
    "huddle_sfu_transports": "transports",
    "huddle_sfu_producers": "producers",
    "huddle_sfu_consumers": "consumers",
}
RULED = ("rss", "fds", "tasks")  # what the verdict is on


# ---------------------------------------------------------------------------------------------------------
# The server under test


def _die_with_parent() -> None:
    """In the server's process before exec: SIGTERM it if the soak dies, however it dies."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Server:
    """`python -m huddle serve` as a subprocess on the test namespace's address, with free ports."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.process: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> None:
        # From the main thread: the parent-death signal follows the thread that started the process.
        command = [sys.executable, "-m", "huddle", "serve", "--host", HOST, "--port", "0"]
        command += ["--stun-port", "0", "--media-port", "0", "--sfu-always", "--log-level", "warning"]
        command += ["--recordings-dir", tempfile.mkdtemp("-soak-recordings")]
        self._stderr = self.log.open("w")
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            cwd=ROOT,
            preexec_fn=_die_with_parent,
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}: see {self.log}")
            readable, _, _ = select.select([self.process.stdout], [], [], 0.2)
            if readable:
                with contextlib.suppress(ValueError, AttributeError):
                    ready = json.loads(self.process.stdout.readline())
                    if ready.get("event") == "ready":
                        self.url = f"http://{HOST}:{ready['http']}"
                        return
        raise RuntimeError(f"the server was not ready within {SERVER_START_TIMEOUT:g} s")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self._stderr.close()

    def errors(self) -> collections.Counter[str]:
        """The errors the server logged, by message and the last line of their traceback."""
        found: collections.Counter[str] = collections.Counter()
        with contextlib.suppress(OSError):
            for line in self.log.read_text(errors="replace").splitlines()[:100_000]:
                with contextlib.suppress(ValueError, AttributeError):
                    record = json.loads(line)
                    if record.get("level") in ("error", "critical"):
                        last = (record.get("exception") or "").strip().splitlines()[-1:]
                        found[" / ".join([record.get("msg", "?"), *last])] += 1
        return found

    def read(self) -> dict[str, float]:
        """One reading: the metrics above (those exported), RSS and open files from /proc when not."""
        assert self.process is not None
        pid = self.process.pid
        values: dict[str, float] = {}
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as response:
            for line in response.read().decode().splitlines():
                match = re.match(r"^([a-z_]+) (\S+)$", line)
                if match and match.group(1) in METRICS:
                    values[METRICS[match.group(1)]] = float(match.group(2))
        if "rss" not in values:
            status = Path(f"/proc/{pid}/status").read_text()
            kb = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
            if kb is not None:
                values["rss"] = float(kb.group(1)) * 1024
        if "fds" not in values:
            values["fds"] = float(len(os.listdir(f"/proc/{pid}/fd")))
        values["cpu"] = process_cpu(pid)
        return values


# ---------------------------------------------------------------------------------------------------------
# Samples and the verdict


@dataclass
class Sample:
    minute: int
    rss_mb: float
    fds: float
    tasks: float | None
    lag_ms: float | None  # the largest of the minute's readings
    participants: float | None
    transports: float | None
    producers: float | None
    consumers: float | None
    server_cpu_percent: float  # of one core, over the minute
    generator_cpu_percent: float
    load: float  # the machine's 1-minute load average: the server and the generator share its cores
    packets: int  # RTP packets the participants received in the minute
    lost: int
    freezes: int
    joins: int
    leaves: int
    join_failures: int
    offer_kb: float  # the largest subscribe offer a participant present holds


@dataclass
class Verdict:
    passed: bool
    baseline_minute: int
    lines: list[str] = field(default_factory=list)


def _median(readings: list[dict[str, float]], key: str) -> float | None:
    values = [r[key] for r in readings if key in r]
    return statistics.median(values) if values else None


def judge(samples: list[Sample], settle: int, tolerance: float, server_alive: bool) -> Verdict:
    """RSS, open files and tasks at the last sample within `tolerance` % of the sample at minute `settle`."""
    verdict = Verdict(passed=True, baseline_minute=settle)
    if not server_alive:
        verdict.passed = False
        verdict.lines.append("FAIL: the server died during the soak")
    base = next((s for s in samples if s.minute == settle), None)
    last = samples[-1] if samples else None
    if base is None or last is None or last.minute <= settle:
        verdict.passed = False
        verdict.lines.append(f"FAIL: no samples after minute {settle} to judge")
        return verdict
    silent = [s.minute for s in samples if s.minute > 0 and s.packets == 0]
    if silent:
        verdict.passed = False
        verdict.lines.append(f"FAIL: no media received in minute(s) {silent}")
    for key in RULED:
        column = {"rss": "rss_mb"}.get(key, key)
        settled, end = getattr(base, column), getattr(last, column)
        if settled is None or end is None:
            verdict.lines.append(f"  {key}: not measured (the server does not export it)")
            continue
        change = 100 * (end - settled) / settled if settled else float("inf")
        ok = abs(change) <= tolerance
        verdict.passed &= ok
        verdict.lines.append(
            f"{'  ok' if ok else 'FAIL'}: {key} {settled:g} at minute {settle} -> {end:g} at minute "
            f"{last.minute} ({change:+.1f} %, limit +-{tolerance:g} %)"
        )
    # Not part of the rule, but a pass means less when the call itself suffered: say so.
    after = [s for s in samples if s.minute > 0]
    packets, lost = sum(s.packets for s in after), sum(s.lost for s in after)
    joins, failed = sum(s.joins for s in after), sum(s.join_failures for s in after)
    if after and (lost > 0.01 * (packets + lost) or failed):
        loss = 100 * lost / max(1, packets + lost)
        verdict.lines.append(
            f"warning: the call suffered: {loss:.2f} % loss, {failed} of {joins} "
            f"newcomers not connected, lag up to {max(s.lag_ms or 0 for s in after):.0f} ms, load average up "
            f"to {max(s.load for s in after):.1f} on {os.cpu_count()} cores"
        )
    return verdict


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(samples: list[Sample]) -> str:
    header = (
        f"{'min':>3} {'RSS MB':>7} {'fds':>5} {'tasks':>6} {'lag ms':>7} {'people':>6} {'transp':>6} "
        f"{'prod':>5} {'cons':>5} {'srv CPU%':>8} {'gen CPU%':>8} {'load':>5} "
        f"{'packets':>9} {'lost':>6} {'loss %':>7} {'freeze':>6} {'joins':>5} {'leaves':>6} {'failed':>6} "
        f"{'offer kB':>8}"
    )
    lines = [header, "-" * len(header)]
    for s in samples:
        total = s.packets + s.lost
        loss = 100 * s.lost / total if total else 0.0
        lines.append(
            f"{s.minute:>3} {s.rss_mb:>7.1f} {s.fds:>5.0f} {_f(s.tasks, '.0f'):>6} {_f(s.lag_ms, '.1f'):>7} "
            f"{_f(s.participants, '.0f'):>6} {_f(s.transports, '.0f'):>6} {_f(s.producers, '.0f'):>5} "
            f"{_f(s.consumers, '.0f'):>5} {s.server_cpu_percent:>8.1f} {s.generator_cpu_percent:>8.1f} "
            f"{s.load:>5.1f} "
            f"{s.packets:>9,} {s.lost:>6} {loss:>7.3f} {s.freezes:>6} {s.joins:>5} {s.leaves:>6} "
            f"{s.join_failures:>6} {s.offer_kb:>8.1f}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The call


def _generator_cpu() -> float:
    times = os.times()
    return times.user + times.system


@dataclass(frozen=True)
class _Mark:
    """Where the counters stood at the edge of a minute."""

    at: float
    server_cpu: float
    generator_cpu: float
    packets: int
    lost: int
    freezes: int
    joins: int
    leaves: int
    join_failures: int

    @classmethod
    def of(cls, crowd: Crowd, server_cpu: float) -> _Mark:
        packets, lost, freezes = crowd.received()
        return cls(
            time.monotonic(),
            server_cpu,
            _generator_cpu(),
            packets,
            lost,
            freezes,
            crowd.joins,
            crowd.leaves,
            crowd.join_failures,
        )


class Soak:
    def __init__(self, args: argparse.Namespace, server: Server, say: Callable[[str], None]) -> None:
        self.args = args
        self.server = server
        self.say = say
        self.samples: list[Sample] = []
        self.errors: list[str] = []

    async def run(self) -> None:
        args = self.args
        self.say("encoding media")
        library = await asyncio.to_thread(build_library)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            shared = Shared(
                url=self.server.url,
                room="soak",
                certificate=Certificate.generate(),
                library=library,
                pacer=Pacer(),
                http=http,
                poller=ReceivePoller(),
                layout="speaker",
                speaker=0,
                decrypt_every=args.decrypt_every,
            )
            crowd = Crowd(shared, args.people, args.publishers)
            crowd.start()
            try:
                await self._call(crowd)
            finally:
                self.say("leaving")
                await crowd.stop()
                self.errors.extend(e for p in crowd.everyone for e in p.errors)

    async def _call(self, crowd: Crowd) -> None:
        args = self.args
        self.say(f"joining {args.people} participants ({args.publishers} publish)")
        joins = []
        for person in crowd.people:
            joins.append(asyncio.create_task(asyncio.wait_for(person.join(), CONNECT_TIMEOUT)))
            await asyncio.sleep(1 / JOIN_RATE)
        for outcome in await asyncio.gather(*joins, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise RuntimeError(f"a participant could not join: {outcome!r}")
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while time.monotonic() < deadline:
            if all(p.connected or p.failed for p in crowd.people):
                break
            await asyncio.sleep(0.1)
        missing = [p.name for p in crowd.people if not p.connected]
        if missing:
            raise RuntimeError(f"not connected after {CONNECT_TIMEOUT:g} s: {', '.join(missing[:5])}")
        self.say(f"everyone connected; {args.minutes} minutes with someone leaving every {args.churn:g} s")
        crowd.open_window(now_us())
        crowd.start_churn(args.churn, CONNECT_TIMEOUT, random.Random(args.seed))
        start = time.monotonic()
        try:
            first = await asyncio.to_thread(self.server.read)
        except OSError as exc:
            raise RuntimeError(f"cannot read the server: {exc!r}") from None
        before = _Mark.of(crowd, first["cpu"])
        self._add(0, [first], crowd, before, before)
        for minute in range(1, args.minutes + 1):
            readings: list[dict[str, float]] = []
            end = start + 60 * minute
            while (left := end - time.monotonic()) > 0:
                await asyncio.sleep(min(READ_INTERVAL, left))
                if not self.server.alive:
                    self.errors.append("the server exited")
                    return
                try:
                    readings.append(await asyncio.to_thread(self.server.read))
                except OSError as exc:
                    self.errors.append(f"minute {minute}: reading the server: {exc!r}")
            if not readings:
                return
            now = _Mark.of(crowd, readings[-1]["cpu"])
            self._add(minute, readings, crowd, before, now)
            before = now

    def _add(
        self, minute: int, readings: list[dict[str, float]], crowd: Crowd, before: _Mark, now: _Mark
    ) -> None:
        seconds = max(1e-6, now.at - before.at)
        lags = [r["lag"] for r in readings if "lag" in r]
        sample = Sample(
            minute=minute,
            rss_mb=round((_median(readings, "rss") or 0) / 2**20, 1),
            fds=_median(readings, "fds") or 0,
            tasks=_median(readings, "tasks"),
            lag_ms=round(1000 * max(lags), 1) if lags else None,
            participants=_median(readings, "participants"),
            transports=_median(readings, "transports"),
            producers=_median(readings, "producers"),
            consumers=_median(readings, "consumers"),
            server_cpu_percent=round(100 * (now.server_cpu - before.server_cpu) / seconds, 1),
            generator_cpu_percent=round(100 * (now.generator_cpu - before.generator_cpu) / seconds, 1),
            load=round(os.getloadavg()[0], 1),
            packets=now.packets - before.packets,
            lost=now.lost - before.lost,
            freezes=now.freezes - before.freezes,
            joins=now.joins - before.joins,
            leaves=now.leaves - before.leaves,
            join_failures=now.join_failures - before.join_failures,
            offer_kb=round(max((p.offer_bytes for p in crowd.people), default=0) / 1024, 1),
        )
        self.samples.append(sample)
        self.say(format_table([sample]).splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace, server: Server) -> int:
    def say(text: str) -> None:
        print(f"soak: {text}", file=sys.stderr, flush=True)

    soak = Soak(args, server, say)
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    started = time.time()
    stopped = False
    # Joining, the call, leaving: bounded even if the server stops answering.
    deadline = args.people / JOIN_RATE + 2 * CONNECT_TIMEOUT + 60 * args.minutes + 120
    try:
        async with asyncio.timeout(deadline):
            await soak.run()
    except TimeoutError:
        soak.errors.insert(0, "the soak overran its deadline")
    except RuntimeError as exc:
        soak.errors.insert(0, str(exc))
    except asyncio.CancelledError:
        stopped = True
        soak.errors.insert(0, "stopped by a signal")
    verdict = judge(soak.samples, args.settle, args.tolerance, server.alive)
    table = format_table(soak.samples)
    publishers = (
        f"{args.publishers} publish (microphone and 3-layer camera), {args.people - args.publishers} watch"
    )
    print(
        f"soak: {args.people} people ({publishers}), speaker layout, someone leaves every {args.churn:g} s "
        f"(every third vanishes), {args.minutes} minutes; each row: the median of the minute's readings "
        f"(lag: the largest), packets/lost/joins/leaves within the minute",
        flush=True,
    )
    print(table, flush=True)
    print("\n".join(["", f"verdict: {'PASS' if verdict.passed else 'FAIL'}", *verdict.lines]), flush=True)
    server_errors = server.errors()
    if server_errors:
        print(f"\nthe server logged {sum(server_errors.values())} errors:", flush=True)
        print("\n".join(f"  {n} x {text}" for text, n in server_errors.most_common(5)), flush=True)
    if soak.errors:
        print(f"\nerrors of the participants ({len(soak.errors)}), the first ones:", flush=True)
        print("\n".join(f"  {e}" for e in soak.errors[:10]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    path = RESULTS / f"soak-{stamp}.json"
    document = {
        "started": stamp,
        "seconds": round(time.time() - started, 1),
        "args": vars(args),
        "samples": [asdict(s) for s in soak.samples],
        "verdict": asdict(verdict),
        "errors": soak.errors[:100],
        "server_errors": dict(server_errors.most_common(20)),
        "table": table,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(
        f"\nwritten to {path.relative_to(ROOT)}; the server's log: {server.log.relative_to(ROOT)}", flush=True
    )
    return 0 if verdict.passed and not stopped else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=int, default=30, help=f"length of the call, 2..{MAX_MINUTES}")
    parser.add_argument("--people", type=int, default=50, help=f"participants, 2..{MAX_PARTICIPANTS}")
    parser.add_argument(
        "--publishers",
        type=int,
        default=6,
        help="how many of them publish (the others watch); default 6: a lively call that leaves the "
        "2 cores the generator and the server share room to spare",
    )
    parser.add_argument("--churn", type=float, default=3.0, help="seconds between departures (1..60)")
    parser.add_argument(
        "--settle", type=int, default=5, help="the minute whose sample is the settled level (default 5)"
    )
    parser.add_argument("--tolerance", type=float, default=5.0, help="percent the last sample may differ")
    parser.add_argument(
        "--decrypt-every",
        type=int,
        default=4,
        help="decrypt 1 received packet in this many per stream (loss still counts every packet)",
    )
    parser.add_argument("--seed", type=int, default=1, help="who leaves when")
    args = parser.parse_args(argv)
    if not 2 <= args.minutes <= MAX_MINUTES:
        parser.error(f"--minutes must be 2..{MAX_MINUTES}")
    if not 2 <= args.people <= MAX_PARTICIPANTS:
        parser.error(f"--people must be 2..{MAX_PARTICIPANTS}")
    if not 1 <= args.publishers <= args.people:
        parser.error("--publishers must be 1..people")
    if not 1 <= args.churn <= 60:
        parser.error("--churn must be 1..60 s")
    if not 1 <= args.settle < args.minutes:
        parser.error("--settle must be a minute before the last")
    if not 0 < args.tolerance <= 100 or not 1 <= args.decrypt_every <= 1000:
        parser.error("--tolerance must be in 0..100 and --decrypt-every in 1..1000")
    RESULTS.mkdir(parents=True, exist_ok=True)
    server = Server(RESULTS / "soak-server.stderr.log")
    try:
        server.start()
        return asyncio.run(main_async(args, server))
    except RuntimeError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 1
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
