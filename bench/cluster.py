"""Cluster figures for `make bench`: how long a failover keeps media away, and what a second core is worth.

    scripts/in-netns .venv/bin/python -m bench.cluster                       # both, 5 failovers
    scripts/in-netns .venv/bin/python -m bench.cluster --runs 2 --only failover

failover: a real ZooKeeper (tests/cluster/zookeeper_server.py, tickTime 500 ms), an active node `a` and its
standby `b` (`--zk-session-timeout 1.5`), one call of synthetic participants (`huddle loadtest` in this
process) that joins at b's door and is redirected to a. During the measured window a is killed with -9; the
participants resume by themselves through their doors, and b, once a's session has ended, takes the call over
and rebuilds them from their resume tokens. Figure: kill to the first media packet received again, for the
last participant to get it (and each one's), per run; median and max over the runs.

cores: the same load of two calls, whose names the hashing puts on different workers, against `huddle serve
--workers 2` and `--workers 1` in turn. Over the measured window: loss (what the subscribers missed), packets
forwarded per second (/metrics, summed over the workers), CPU seconds of each worker process and of the
parent (/proc/PID/stat), and the generator's own CPU: it shares this machine's cores with the server, so a
generator near one whole core means the figures say more about it than about the server. The default load,
two calls of 70 with 4 publishing (about 50,000 packets forwarded per second), is where one worker on a
2-core machine starts to lose packets while the generator still uses well under one core.

Everything is bounded: process starts, each loadtest's deadline, the run count, and a deadline over it all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import secrets
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from huddle.cluster.placement import choose
from huddle.loadtest import MAX_PARTICIPANTS
from huddle.loadtest.run import LoadtestConfig, LoadtestResult, run_loadtest
from huddle.loadtest.sender import now_us

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 30.0
SESSION_TIMEOUT = 1.5  # seconds: ZooKeeper's session timeout for the failover nodes
MAX_RUNS = 10
ENV = {k: v for k, v in os.environ.items() if not k.startswith("HUDDLE_")}
_METRIC = re.compile(r"^huddle_sfu_rtp_(in|out)_total(?:\{[^}]*\})?\s+(\S+)$", re.MULTILINE)

Say = Callable[[str], None]


# ---------------------------------------------------------------------------------------------------------
# Processes


class Serve:
    """`python -m huddle serve ARGS` on loopback with free ports; its ready line gives the HTTP port."""

    def __init__(self, name: str, *args: str, sfu_always: bool = True) -> None:
        self.name = name
        self.args = args
        self.sfu_always = sfu_always
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.log = RESULTS / f"cluster-{name}.stderr.log"

    def start(self) -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "huddle", "serve", "--host", "127.0.0.1", "--port", "0"]
        command += ["--stun-port", "0", "--media-port", "0", *self.args]
        if self.sfu_always:
            command.append("--sfu-always")
        command += ["--recordings-dir", tempfile.mkdtemp("-recordings")]
        with self.log.open("w") as stderr:
            self.proc = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT, env=ENV
            )
        assert self.proc.stdout is not None
        readable, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT)
        line = self.proc.stdout.readline() if readable else ""
        with contextlib.suppress(ValueError):
            ready = json.loads(line)
            if ready.get("event") == "ready":
                self.url = f"http://127.0.0.1:{ready['http']}"
                return
        self.stop()
        raise RuntimeError(f"{self.name} did not start within {START_TIMEOUT:g} s: see {self.log}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def children(self) -> list[int]:
        with contextlib.suppress(OSError):
            return [int(p) for p in Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()]
        return []

    def kill(self) -> None:
        """kill -9: no goodbye to anyone, as when the machine dies."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is None:
            return
        terminate(self.proc, 15)
        self.proc = None


def terminate(proc: subprocess.Popen[Any], grace: float) -> None:
    """SIGTERM, and kill -9 if it has not exited within `grace` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (not its children), from /proc/PID/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces: cut after it
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
        resp.raise_for_status()
        return await resp.json()


async def rtp_counters(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The SFU's RTP packets in and out so far, summed over the workers (a parent labels each one's)."""
    async with http.get(f"{url}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as resp:
        text = await resp.text()
    totals = {"in": 0.0, "out": 0.0}
    for direction, value in _METRIC.findall(text):
        totals[direction] += float(value)
    return totals


# ---------------------------------------------------------------------------------------------------------
# Failover


@dataclass
class FailoverRun:
    run: int
    participants: int
    all_back_s: float | None = None  # kill to media again on the last participant to get it
    each_back_s: list[float | None] = field(default_factory=list)  # kill to media again, per participant
    resumed_s: list[float | None] = field(default_factory=list)  # drop to `joined` again, per participant
    restored: int = 0  # participants rebuilt from their resume token by the node that took over
    attempts: list[int] = field(default_factory=list)  # joins sent while resuming, per participant
    taken_over: bool = False  # /api/cluster on b afterwards: b active, serving a's slot
    notes: list[str] = field(default_factory=list)


async def _wait_for(what: str, check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
            value = await check()
            if value:
                return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.1)


async def failover_run(zookeeper: str, run: int, participants: int, publishers: int, say: Say) -> FailoverRun:
    figures = FailoverRun(run, participants)
    cluster = ["--zookeeper", zookeeper, "--zk-session-timeout", str(SESSION_TIMEOUT)]
    active = Serve("a", *cluster, "--node-id", "a")
    standby = Serve("b", *cluster, "--node-id", "b", "--standby-for", "a")
    kill_us: list[int] = []
    tasks: list[asyncio.Task[None]] = []

    async def kill_soon() -> None:
        await asyncio.sleep(1.0)
        kill_us.append(now_us())
        active.kill()

    def progress(text: str) -> None:
        if text.startswith("measuring"):
            tasks.append(asyncio.get_running_loop().create_task(kill_soon()))

    try:
        async with aiohttp.ClientSession() as http:
            await asyncio.to_thread(active.start)
            await asyncio.to_thread(standby.start)

            async def standing_by() -> bool:
                nodes = (await get_json(http, f"{standby.url}/api/cluster"))["nodes"]
                return {(n["id"], n["role"]) for n in nodes} == {("a", "active"), ("b", "standby")}

            await _wait_for("a active and b its standby", standing_by, 10)
            config = LoadtestConfig(
                url=standby.url,  # any node is a door: b sends everyone on to a
                room=f"failover-{run}",
                participants=participants,
                publishers=publishers,
                duration=8.0,
                warmup=1.0,
                connect_timeout=20.0,
            )
            result = await run_loadtest(config, progress=progress)
            await asyncio.gather(*tasks)

            async def took_over() -> bool:
                me = await get_json(http, f"{standby.url}/api/node")
                return me["role"] == "active" and me["serves"] == "a"

            with contextlib.suppress(RuntimeError):
                figures.taken_over = await _wait_for("b serves a's slot", took_over, 5)
    except (RuntimeError, TimeoutError, OSError) as exc:
        figures.notes.append(str(exc) or type(exc).__name__)
        return figures
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.to_thread(active.kill)
        await asyncio.to_thread(standby.stop)
    if not kill_us:
        figures.notes.append("the loadtest never reached its window: " + "; ".join(result.errors[:3]))
        return figures
    for sub in result.subscribers:
        drop = sub.reconnections[0] if sub.reconnections else None
        back = None
        if drop is not None and drop.media_seconds is not None:
            back = round((drop.dropped_us + drop.media_seconds * 1e6 - kill_us[0]) / 1e6, 3)
        figures.each_back_s.append(back)
        figures.resumed_s.append(drop.resumed_seconds if drop is not None else None)
        figures.attempts.append(drop.attempts if drop is not None else 0)
        figures.restored += bool(drop is not None and drop.restored)
    if figures.each_back_s and None not in figures.each_back_s:
        figures.all_back_s = max(b for b in figures.each_back_s if b is not None)
    else:
        figures.notes.append("some participants never received media again")
    figures.notes.extend(result.errors[:3])
    return figures


async def measure_failover(runs: int, say: Say, participants: int = 4, publishers: int = 2) -> dict[str, Any]:
    from tests.cluster.zookeeper_server import ZooKeeperServer

    zookeeper = ZooKeeperServer(Path(tempfile.mkdtemp("-zookeeper")))
    await asyncio.to_thread(zookeeper.start)
    rows: list[FailoverRun] = []
    try:
        for run in range(1, min(runs, MAX_RUNS) + 1):
            chroot = f"{zookeeper.hosts}/bench-{secrets.token_hex(4)}"
            rows.append(await failover_run(chroot, run, participants, publishers, say))
            last = rows[-1]
            say(f"  failover run {run}: every participant back after {_f(last.all_back_s, '.2f')} s")
    finally:
        await asyncio.to_thread(zookeeper.stop)
    times = [r.all_back_s for r in rows if r.all_back_s is not None]
    return {
        "participants": participants,
        "publishers": publishers,
        "session_timeout_s": SESSION_TIMEOUT,
        "runs": [asdict(r) for r in rows],
        "median_s": round(statistics.median(times), 3) if times else None,
        "max_s": max(times) if len(times) == len(rows) and times else None,
        "complete": len(times) == len(rows) > 0,
    }


# ---------------------------------------------------------------------------------------------------------
# Cores


@dataclass
class CoresCase:
    workers: int
    calls: int
    participants: int  # per call
    publishers: int  # per call
    complete: bool = False
    window_seconds: float = 0.0
    pps_in: float = 0.0
    pps_out: float = 0.0  # forwarded
    loss_percent: float | None = None
    delay_p99_ms: float | None = None
    worker_cpu_seconds: list[float] = field(default_factory=list)  # per worker process, in the window
    parent_cpu_seconds: float | None = None  # --workers N > 1: the proxy in front
    generator_cpu_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def rooms_over_workers(calls: int, workers: int = 2) -> list[str]:
    """Call names that the hashing spreads evenly over `workers` workers (w0, w1, ...)."""
    ids = [f"w{i}" for i in range(workers)]
    names = (f"cores-{n}" for n in range(10_000))
    return [next(name for name in names if choose(name, ids) == ids[i % workers]) for i in range(calls)]


async def cores_case(
    workers: int, rooms: list[str], participants: int, publishers: int, duration: float, say: Say
) -> CoresCase:
    case = CoresCase(workers, len(rooms), participants, publishers)
    server = Serve(f"workers-{workers}", "--workers", str(workers), "--max-participants", "200")
    edges: dict[str, tuple[float, float, dict[str, float], dict[int, float], float]] = {}
    results: list[LoadtestResult | BaseException] = []
    measuring: set[str] = set()
    leaving: set[str] = set()
    try:
        await asyncio.to_thread(server.start)
        async with aiohttp.ClientSession() as http:

            async def sample(edge: str) -> None:
                counters = await rtp_counters(http, server.url)
                pids = server.children() or [server.pid]
                edges[edge] = (
                    time.monotonic(),
                    own_cpu(),
                    counters,
                    {pid: cpu_seconds(pid) for pid in pids},
                    cpu_seconds(server.pid),
                )

            tasks: list[asyncio.Task[None]] = []

            def progress_of(room: str) -> Callable[[str], None]:
                def progress(text: str) -> None:
                    loop = asyncio.get_running_loop()
                    # The window over which every call measures: from the last to open to the first to close.
                    if text.startswith("measuring"):
                        measuring.add(room)
                        if len(measuring) == len(rooms):
                            tasks.append(loop.create_task(sample("before")))
                    elif text.startswith("leaving") and not leaving:
                        leaving.add(room)
                        if tasks:
                            tasks.append(loop.create_task(sample("after")))

                return progress

            configs = [
                LoadtestConfig(
                    url=server.url,
                    room=room,
                    participants=participants,
                    publishers=publishers,
                    duration=duration,
                    warmup=3.0,
                    join_rate=25.0,
                    connect_timeout=45.0,
                    # The generator shares the two cores: it reads every packet (loss counts them all) but
                    # decrypts one in 4, to leave the server what it can.
                    decrypt_every=4,
                )
                for room in rooms
            ]
            results = await asyncio.gather(
                *(run_loadtest(c, progress=progress_of(c.room)) for c in configs), return_exceptions=True
            )
            await asyncio.gather(*tasks, return_exceptions=True)
    except RuntimeError as exc:
        case.notes.append(str(exc))
    finally:
        await asyncio.to_thread(server.stop)
    done = [r for r in results if isinstance(r, LoadtestResult)]
    case.notes.extend(repr(r) for r in results if not isinstance(r, LoadtestResult))
    if "before" in edges and "after" in edges:
        t0, g0, c0, w0, p0 = edges["before"]
        t1, g1, c1, w1, p1 = edges["after"]
        window = max(1e-6, t1 - t0)
        case.window_seconds = round(window, 2)
        case.pps_in = round((c1["in"] - c0["in"]) / window)
        case.pps_out = round((c1["out"] - c0["out"]) / window)
        case.worker_cpu_seconds = [round(w1[pid] - w0.get(pid, 0.0), 2) for pid in sorted(w1)]
        if workers > 1:
            case.parent_cpu_seconds = round(p1 - p0, 2)
        case.generator_cpu_seconds = round(g1 - g0, 2)
    else:
        case.notes.append("no common measured window")
    received = sum(r.packets_received for r in done)
    lost = sum(r.lost for r in done)
    if received + lost:
        case.loss_percent = round(100 * lost / (received + lost), 3)
    p99 = [r.delay_p99_ms for r in done if r.delay_p99_ms is not None]
    case.delay_p99_ms = max(p99) if p99 else None
    case.complete = len(done) == len(rooms) and all(r.complete for r in done)
    for result in done:
        case.notes.extend(result.errors[:2])
    return case


async def measure_cores(
    say: Say, calls: int = 2, participants: int = 70, publishers: int = 4, duration: float = 15.0
) -> dict[str, Any]:
    rooms = rooms_over_workers(calls)
    cases = []
    for workers in (2, 1):
        say(f"  cores: {calls} calls of {participants} ({publishers} publishing) against --workers {workers}")
        cases.append(await cores_case(workers, rooms, participants, publishers, duration, say))
    by = {c.workers: c for c in cases}
    ratio = by[2].pps_out / by[1].pps_out if by[1].pps_out else None
    return {
        "rooms": rooms,
        "cases": [asdict(c) for c in cases],
        "forwarded_ratio_2_to_1": round(ratio, 2) if ratio is not None else None,
        "complete": all(c.complete for c in cases),
    }


# ---------------------------------------------------------------------------------------------------------
# Both, and the table


async def measure_cluster(
    say: Say,
    *,
    runs: int = 5,
    only: str | None = None,
    participants: int = 70,
    publishers: int = 4,
    duration: float = 15.0,
) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    if only in (None, "failover"):
        say(f"cluster failover: kill -9 of the active node, {runs} runs")
        figures["failover"] = await measure_failover(runs, say)
    if only in (None, "cores"):
        figures["cores"] = await measure_cores(
            say, participants=participants, publishers=publishers, duration=duration
        )
    return figures


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_cluster(figures: dict[str, Any]) -> str:
    lines = []
    failover = figures.get("failover")
    if failover:
        lines.append(
            f"cluster failover (active + standby, ZooKeeper session {failover['session_timeout_s']:g} s, "
            f"{failover['participants']} participants, {failover['publishers']} publishing): kill -9 of the "
            "active -> media again on every participant"
        )
        for run in failover["runs"]:
            each = " ".join(_f(b, ".2f") for b in run["each_back_s"])
            taken = "yes" if run["taken_over"] else "no"
            lines.append(
                f"  run {run['run']}: {_f(run['all_back_s'], '.2f'):>5} s  (each: {each}; restored "
                f"{run['restored']}/{run['participants']}, taken over: {taken})"
            )
            lines.extend(f"         note: {n}" for n in run["notes"][:3])
        lines.append(
            f"  median {_f(failover['median_s'], '.2f')} s, max {_f(failover['max_s'], '.2f')} s "
            f"over {len(failover['runs'])} runs"
        )
    cores = figures.get("cores")
    if cores:
        if lines:
            lines.append("")
        first = cores["cases"][0]
        lines.append(
            f"cluster cores: {first['calls']} calls of {first['participants']} ({first['publishers']} "
            "publishing each), the same load against --workers 2 and --workers 1"
        )
        header = (
            f"  {'workers':>7} {'loss %':>7} {'p99 ms':>7} {'pkt/s in':>9} {'fwd pkt/s':>10} "
            f"{'CPU s per worker':>18} {'parent':>7} {'generator':>9} {'window s':>8}"
        )
        lines += [header, "  " + "-" * (len(header) - 2)]
        for case in cores["cases"]:
            per_worker = " ".join(f"{c:.2f}" for c in case["worker_cpu_seconds"]) or "-"
            lines.append(
                f"  {case['workers']:>7} {_f(case['loss_percent'], '.3f'):>7} "
                f"{_f(case['delay_p99_ms'], '.1f'):>7} {case['pps_in']:>9,.0f} {case['pps_out']:>10,.0f} "
                f"{per_worker:>18} {_f(case['parent_cpu_seconds'], '.2f'):>7} "
                f"{case['generator_cpu_seconds']:>9.2f} {case['window_seconds']:>8.1f}"
            )
            lines.extend(f"          note: {n}" for n in case["notes"][:3])
        lines.append(
            f"  forwarded with 2 workers / with 1: {_f(cores['forwarded_ratio_2_to_1'], '.2f')}x. CPU s are "
            "user+sys over the window (/proc/PID/stat); generator = this process, which shares the cores."
        )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    def say(text: str) -> None:
        print(f"bench.cluster: {text}", file=sys.stderr, flush=True)

    started = time.time()
    figures = await measure_cluster(
        say,
        runs=args.runs,
        only=args.only,
        participants=args.participants,
        publishers=args.publishers,
        duration=args.duration,
    )
    table = format_cluster(figures)
    print(table, flush=True)
    save_results("cluster", started, figures, table)
    return 0 if all(part["complete"] for part in figures.values()) else 1


def save_results(kind: str, started: float, figures: dict[str, Any], table: str) -> None:
    """bench/results/<kind>-<start time>.json: the figures, the printed table and the machine."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    path = RESULTS / f"{kind}-{stamp}.json"
    document = {
        "started": stamp,
        "seconds": round(time.time() - started, 1),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        **figures,
        "table": table,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwritten to {path.relative_to(ROOT)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("failover", "cores"), help="one of the two scenarios")
    parser.add_argument("--runs", type=int, default=5, help=f"failover runs (1..{MAX_RUNS})")
    parser.add_argument("--participants", type=int, default=70, help="cores: participants per call")
    parser.add_argument("--publishers", type=int, default=4, help="cores: publishers per call")
    parser.add_argument("--duration", type=float, default=15.0, help="cores: seconds measured (5..60)")
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= MAX_RUNS or not 5 <= args.duration <= 60:
        parser.error(f"--runs must be 1..{MAX_RUNS} and --duration 5..60 s")
    if not 2 <= args.participants <= MAX_PARTICIPANTS or not 1 <= args.publishers <= args.participants:
        parser.error(f"--participants must be 2..{MAX_PARTICIPANTS} and --publishers 1..participants")
    try:
        return asyncio.run(asyncio.wait_for(main_async(args), timeout=600))
    except TimeoutError:
        print("bench.cluster: the run overran 10 minutes and was stopped", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
