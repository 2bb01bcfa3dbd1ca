"""Heavy calls over several SFU nodes (issue 12) for `make bench`: how big a call one worker carries, how big
when the call is split over two, and what the pipe between them costs.

    scripts/in-netns .venv/bin/python -m bench.heavy                 # capacity and pipe, ~6 minutes
    scripts/in-netns .venv/bin/python -m bench.heavy --quick         # fewer, shorter probes: ~2 minutes
    scripts/in-netns .venv/bin/python -m bench.heavy --only capacity --workers 1

capacity: the largest webinar (1 publisher and N viewers) and the largest call (10 publishers, the rest
viewers), speaker layout, that the server carries, against `huddle serve --workers 1` and against `--workers 2
--max-participants-per-node M` with M half the call (so that its home worker seats the first half and sends
the rest to the other worker). The size is searched by probes: a fresh server, synthetic participants
(huddle.loadtest's, in this process) join, a short warm-up, a measured window, everyone leaves. Sizes go up
by a factor until one fails, then the gap is halved, at most `--probes` probes per configuration. A probe
*carries* when everyone connected, every video the layout shows arrived, the subscribers lost no packet in
the window (loss is what huddle.loadtest counts: per received stream, sequence numbers missing between the
first and the highest received in the window, over all subscribers) and the forwarding delay's p99 stayed
under `MAX_P99_MS`. The delay bound is needed because a worker that falls behind queues in its socket
buffers for many seconds before it drops anything: one worker at a full core, a call of 200, lost nothing in
10 s but delivered packets 1.9 s late (p50), and read only 85 % of what the publishers sent. At the largest
size carried we report the packets forwarded per second (/metrics huddle_sfu_rtp_out_total, summed over the
workers), CPU seconds per second of each worker and of the parent (/proc/PID/stat), and the generator's own
(this process): the generator shares the machine's cores, and the first failing probe says which was full.

pipe: a call of `--pipe-participants` (10 publishing) on `--workers 2`, split (M = half: the publishers and
the first viewers on the home worker, the other viewers on the second) and not split (M = 200: all on the
home worker), in turn, `--runs` times each. Figures: worker CPU with and without the split and the pipe
packets of /metrics (huddle_pipe_packets_total{direction="out"|"in"}), hence CPU per piped packet; and the
forwarding delay (send to receive, one clock) of viewers on the other worker against viewers on the home
worker, from each participant's delay histogram, grouped by the worker its media connection reached.

Everything is bounded: probes per configuration, each probe's deadline, a time budget over the search, and a
deadline over the whole run; every server is stopped (and its workers killed if they outlive it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.cluster import Serve, cpu_seconds, get_json, own_cpu, save_results
from huddle.cluster.placement import choose
from huddle.loadtest import MAX_PARTICIPANTS
from huddle.loadtest.connection import ReceivePoller
from huddle.loadtest.media import build_library
from huddle.loadtest.pacer import Pacer
from huddle.loadtest.participant import Shared, SyntheticParticipant
from huddle.loadtest.run import Crowd
from huddle.loadtest.sender import now_us
from huddle.loadtest.stats import DelayHistogram
from huddle.rtc.certificate import Certificate

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
Say = Callable[[str], None]

CALL_PUBLISHERS = 10
WEBINAR_MAX = MAX_PARTICIPANTS - 1  # viewers: the publisher takes a seat too
CALL_MIN = CALL_PUBLISHERS + 1
# First sizes tried against one worker (about what one worker carried here; the search moves from there).
WEBINAR_START = WEBINAR_MAX
CALL_START = 150
UNSPLIT = MAX_PARTICIPANTS  # --max-participants-per-node that seats a whole call on its home worker
JOIN_RATE = 40.0  # joins per second
JOIN_TIMEOUT = 15.0
CONNECT_TIMEOUT = 20.0
STOP_WAIT = 5.0  # seconds a worker may outlive its stopped parent before it is killed
# Diagnosis of a failing probe, in CPU seconds per second: a process this busy is saturated.
FULL_WORKER = 0.9
# A worker that keeps up forwards within tens of ms even at 0.9 CPU s/s (p99 68 ms for a call of 154 here);
# one that falls behind queues for seconds.
MAX_P99_MS = 100.0
FULL_GENERATOR = 0.85
_SAMPLE = re.compile(r"^(huddle_sfu_rtp_(?:in|out)_total|huddle_pipe_packets_total)(?:\{([^}]*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


# ---------------------------------------------------------------------------------------------------------
# One probe: a fresh server, one call, one measured window


@dataclass
class NodeFigures:
    """One worker as a probe saw it."""

    id: str
    participants: int = 0  # of the call, from /api/cluster
    cpu: float | None = None  # CPU seconds per second
    forwarded_pps: float = 0.0
    pipe_out_pps: float = 0.0
    pipe_in_pps: float = 0.0
    viewers: int = 0  # non-publishers whose media reached this worker
    viewer_loss_percent: float | None = None
    viewer_delay_p50_ms: float | None = None
    viewer_delay_p99_ms: float | None = None


@dataclass
class Probe:
    kind: str  # webinar, call, pipe
    workers: int
    per_node: int | None  # --max-participants-per-node (None: not passed)
    participants: int
    publishers: int
    carried: bool = False
    complete: bool = False  # everyone joined and connected
    connected: int = 0
    window_seconds: float = 0.0
    received: int = 0
    lost: int = 0
    loss_percent: float | None = None
    videos_expected: int = 0
    videos_received: int = 0
    freezes: int = 0
    delay_p50_ms: float | None = None
    delay_p99_ms: float | None = None
    pps_in: float = 0.0
    pps_out: float = 0.0  # forwarded, all workers
    pipe_out_pps: float = 0.0
    pipe_in_pps: float = 0.0
    worker_cpu: dict[str, float] = field(default_factory=dict)  # CPU s per s, by worker id
    parent_cpu: float | None = None
    generator_cpu: float = 0.0
    pacer_late: int = 0  # the generator's sends that went out late in the window
    home: str | None = None
    split: bool = False  # the call's participants were on more than one worker
    nodes: list[NodeFigures] = field(default_factory=list)
    seconds: float = 0.0  # the probe's wall time, server start to stop
    notes: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.participants - 1 if self.kind == "webinar" else self.participants

    def busiest(self) -> float | None:
        return max(self.worker_cpu.values()) if self.worker_cpu else None

    def limit(self) -> str:
        """Why this probe did not carry, and what was full."""
        if not self.window_seconds:
            return f"nothing measured: {self.notes[0] if self.notes else 'no window'}"
        why = [f"lost {self.lost} packets"] if self.lost else []
        if not self.complete:
            why.append(f"{self.connected}/{self.participants} connected")
        if self.videos_received < self.videos_expected:
            why.append(f"{self.videos_received}/{self.videos_expected} videos arrived")
        if self.delay_p99_ms is None or self.delay_p99_ms > MAX_P99_MS:
            why.append(f"delay p50 {_f(self.delay_p50_ms, '.0f')} ms, p99 {_f(self.delay_p99_ms, '.0f')} ms")
        full = [f"{w} at {c:.2f}" for w, c in sorted(self.worker_cpu.items()) if c >= FULL_WORKER]
        if self.generator_cpu >= FULL_GENERATOR:
            full.append(f"generator at {self.generator_cpu:.2f}")
        total = sum(self.worker_cpu.values()) + (self.parent_cpu or 0.0) + self.generator_cpu
        cores = os.cpu_count() or 1
        if total >= 0.92 * cores:
            full.append(f"all {cores} cores busy ({total:.2f} CPU s/s)")
        what = ", ".join(full) if full else f"nothing full ({total:.2f} CPU s/s in all)"
        return f"{'; '.join(why) or 'not split'}; CPU s/s: {what}"


@dataclass
class Options:
    window: float = 10.0
    warmup: float = 2.0
    decrypt_every: int = 4
    per_node_flag: bool = True  # the server knows --max-participants-per-node


def _room(kind: str) -> str:
    """A fresh call name whose home is w0, where the workers' parent sends every first join: the home's half
    of the call is seated without a redirect, the other half with one."""
    names = (f"heavy-{kind}-{secrets.token_hex(4)}" for _ in range(256))
    return next(name for name in names if choose(name, ("w0", "w1")) == "w0")


async def _counters(http: aiohttp.ClientSession, url: str) -> dict[tuple[str, str], float]:
    """(counter, worker) -> value: rtp_in, rtp_out, pipe_out, pipe_in; worker "" when there is no parent."""
    async with http.get(f"{url}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as resp:
        text = await resp.text()
    totals: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        found = dict(_LABEL.findall(labels or ""))
        if name.startswith("huddle_pipe"):
            what = f"pipe_{found.get('direction', '')}"
        else:
            what = "rtp_in" if name == "huddle_sfu_rtp_in_total" else "rtp_out"
        key = (what, found.get("worker", ""))
        totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def _alive_huddle(pid: int) -> bool:
    try:
        return b"huddle" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _stop(server: Serve, workers: list[int]) -> None:
    """Stop the server; workers that outlive their parent (it was killed) are killed too."""
    server.stop()
    deadline = time.monotonic() + STOP_WAIT
    while any(_alive_huddle(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in workers:
        if _alive_huddle(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _node_of(person: SyntheticParticipant, by_port: dict[int, str]) -> str | None:
    for connection in (person.subscribe, person.publish):
        if connection is not None and connection.address is not None:
            return by_port.get(connection.address[1])
    return None


def _percentiles(histogram: DelayHistogram) -> tuple[float | None, float | None]:
    return histogram.percentile_ms(0.5), histogram.percentile_ms(0.99)


async def run_probe(
    kind: str, workers: int, per_node: int | None, participants: int, publishers: int, opts: Options, say: Say
) -> Probe:
    probe = Probe(kind, workers, per_node, participants, publishers)
    started = time.monotonic()
    args = ["--workers", str(workers), "--max-participants", str(MAX_PARTICIPANTS)]
    # Every participant's WebSocket comes from this one address, and the probe's HTTP requests too.
    args += ["--max-connections-per-address", str(4 * MAX_PARTICIPANTS)]
    if per_node is not None:
        args += ["--max-participants-per-node", str(per_node)]
    server = Serve(f"heavy-w{workers}", *args)
    worker_pids: list[int] = []
    bound = 30 + participants / JOIN_RATE + JOIN_TIMEOUT + CONNECT_TIMEOUT + opts.warmup + opts.window + 30
    try:
        async with asyncio.timeout(bound):
            await asyncio.to_thread(server.start)
            worker_pids = server.children() if workers > 1 else []
            await _call(probe, server, worker_pids, opts, say)
    except TimeoutError:
        probe.notes.append(f"the probe overran its {bound:.0f} s deadline")
    except (RuntimeError, OSError, aiohttp.ClientError) as exc:
        probe.notes.append(str(exc) or repr(exc))
    finally:
        await asyncio.to_thread(_stop, server, worker_pids)
    probe.seconds = round(time.monotonic() - started, 1)
    probe.carried = (
        probe.complete
        and probe.received > 0
        and probe.lost == 0
        and probe.videos_received == probe.videos_expected
        and probe.delay_p99_ms is not None
        and probe.delay_p99_ms <= MAX_P99_MS
        and not (workers > 1 and not probe.split)
    )
    return probe


async def _call(probe: Probe, server: Serve, worker_pids: list[int], opts: Options, say: Say) -> None:
    room = _room(probe.kind)
    library = await asyncio.to_thread(build_library)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        shared = Shared(
            url=server.url,
            room=room,
            certificate=Certificate.generate(),
            library=library,
            pacer=Pacer(),
            http=http,
            poller=ReceivePoller(),
            layout="speaker",
            speaker=0,
            decrypt_every=opts.decrypt_every,
        )
        crowd = Crowd(shared, probe.participants, probe.publishers)
        crowd.start()
        try:
            await _measure(probe, crowd, server, worker_pids, http, opts, say)
        finally:
            await crowd.stop()
            probe.notes.extend(e for p in crowd.everyone for e in p.errors[:1])
            del probe.notes[6:]


async def _measure(
    probe: Probe,
    crowd: Crowd,
    server: Serve,
    worker_pids: list[int],
    http: aiohttp.ClientSession,
    opts: Options,
    say: Say,
) -> None:
    people = crowd.people
    joins = []
    for person in people:
        joins.append(asyncio.create_task(asyncio.wait_for(person.join(), JOIN_TIMEOUT)))
        await asyncio.sleep(1 / JOIN_RATE)
    for outcome in await asyncio.gather(*joins, return_exceptions=True):
        if isinstance(outcome, BaseException):
            probe.notes.append(f"join: {outcome!r}"[:200])
    joined = [p for p in people if p.id is not None]
    for _ in range(int(CONNECT_TIMEOUT / 0.05)):
        if all(p.connected or p.failed for p in joined):
            break
        await asyncio.sleep(0.05)
    probe.connected = sum(1 for p in joined if p.connected)
    probe.complete = len(joined) == len(people) == probe.connected
    if not joined:
        return
    await asyncio.sleep(opts.warmup)
    pids = worker_pids or [server.pid]

    async def sample() -> tuple[float, float, dict[tuple[str, str], float], dict[int, float], float]:
        counters = await _counters(http, server.url)
        return (
            time.monotonic(),
            own_cpu(),
            counters,
            {p: cpu_seconds(p) for p in pids},
            cpu_seconds(server.pid),
        )

    late = crowd.shared.pacer.late
    t0, g0, c0, w0, p0 = await sample()
    crowd.open_window(now_us())
    await asyncio.sleep(opts.window)
    crowd.close_window(now_us())
    t1, g1, c1, w1, p1 = await sample()
    nodes = (await get_json(http, f"{server.url}/api/cluster"))["nodes"]
    window = max(1e-6, t1 - t0)
    probe.window_seconds = round(window, 2)
    probe.pacer_late = crowd.shared.pacer.late - late
    probe.generator_cpu = round((g1 - g0) / window, 3)
    if worker_pids:
        probe.parent_cpu = round((p1 - p0) / window, 3)

    def rate(what: str, worker: str | None = None) -> float:
        keys = [k for k in c1 if k[0] == what and (worker is None or k[1] == worker)]
        return round(sum(c1[k] - c0.get(k, 0.0) for k in keys) / window, 1)

    probe.pps_in, probe.pps_out = rate("rtp_in"), rate("rtp_out")
    probe.pipe_out_pps, probe.pipe_in_pps = rate("pipe_out"), rate("pipe_in")
    room = crowd.shared.room
    by_port: dict[int, str] = {}
    figures: dict[str, NodeFigures] = {}
    for node in nodes:
        nid = str(node["id"])
        figures[nid] = figure = NodeFigures(nid, int(node.get("room_participants", {}).get(room, 0)))
        with contextlib.suppress(ValueError, KeyError, TypeError):
            by_port[int(str(node["media"]).rsplit(":", 1)[1])] = nid
        pid = node.get("pid") or (server.pid if not worker_pids else None)
        if pid in w1:
            figure.cpu = round((w1[pid] - w0.get(pid, 0.0)) / window, 3)
        label = nid if worker_pids else ""
        figure.forwarded_pps = rate("rtp_out", label)
        figure.pipe_out_pps, figure.pipe_in_pps = rate("pipe_out", label), rate("pipe_in", label)
    probe.worker_cpu = {f.id: f.cpu for f in figures.values() if f.cpu is not None}
    probe.split = sum(1 for f in figures.values() if f.participants) > 1
    everyone, viewers = DelayHistogram(), {nid: DelayHistogram() for nid in figures}
    lost_by, received_by = dict.fromkeys(figures, 0), dict.fromkeys(figures, 0)
    for person in crowd.everyone:
        if person.id is None:
            continue
        result = person.results()
        probe.received += result.packets
        probe.lost += result.lost
        probe.freezes += result.freezes
        probe.videos_expected += result.videos_expected
        probe.videos_received += result.videos_received
        everyone.merge(person.receiver.histogram)
        nid = _node_of(person, by_port)
        if person.index == 0:
            probe.home = nid
        if nid in figures and not person.publishes:
            figures[nid].viewers += 1
            viewers[nid].merge(person.receiver.histogram)
            lost_by[nid] += result.lost
            received_by[nid] += result.packets
    if probe.received + probe.lost:
        probe.loss_percent = round(100 * probe.lost / (probe.received + probe.lost), 4)
    probe.delay_p50_ms, probe.delay_p99_ms = _percentiles(everyone)
    for nid, figure in figures.items():
        figure.viewer_delay_p50_ms, figure.viewer_delay_p99_ms = _percentiles(viewers[nid])
        if received_by[nid] + lost_by[nid]:
            figure.viewer_loss_percent = round(100 * lost_by[nid] / (received_by[nid] + lost_by[nid]), 4)
    probe.nodes = sorted(figures.values(), key=lambda f: f.id)
    counts = ", ".join(f"{f.id} {f.participants}" for f in probe.nodes)
    say(
        f"    {probe.kind} {probe.size} on --workers {probe.workers}: loss {probe.loss_percent} %, "
        f"{probe.videos_received}/{probe.videos_expected} videos, fwd {probe.pps_out:,.0f} pkt/s, CPU s/s "
        f"{' '.join(f'{w} {c:.2f}' for w, c in sorted(probe.worker_cpu.items()))} generator "
        f"{probe.generator_cpu:.2f}; on the workers: {counts}"
    )


# ---------------------------------------------------------------------------------------------------------
# Capacity: the largest size carried, by probes


@dataclass
class Capacity:
    kind: str  # webinar (size: viewers) or call (size: participants, 10 publishing)
    workers: int
    largest: int | None = None  # the largest size carried
    smallest_failed: int | None = None
    at_cap: bool = False  # carried at the loadtest's largest size: the ceiling is the generator's
    # The largest size over the CPU s/s of the busiest worker there: where that worker would be full, if its
    # CPU grows in proportion (a projection past what the generator and the machine's cores can show).
    per_core: int | None = None
    limit: str = ""  # what was full at the smallest size that failed
    probes: list[Probe] = field(default_factory=list)
    complete: bool = False  # the search ran (the server could be measured this way)
    notes: list[str] = field(default_factory=list)

    def best(self) -> Probe | None:
        carried = [p for p in self.probes if p.carried and p.size == self.largest]
        return carried[-1] if carried else None


def _shape(kind: str, size: int) -> tuple[int, int]:
    """(participants, publishers) of a webinar of `size` viewers or a call of `size` people."""
    return (size + 1, 1) if kind == "webinar" else (size, CALL_PUBLISHERS)


def _next_size(lo: int | None, hi: int | None, last: int, floor: int, cap: int, factor: float) -> int | None:
    """The next size to try, knowing the largest carried (`lo`) and the smallest failed (`hi`); None: done."""
    if hi is None:
        return None if last >= cap else min(cap, max(last + 1, math.ceil(last * factor)))
    if lo is None:
        return None if last <= floor else max(floor, min(last - 1, math.floor(last / factor)))
    if hi - lo <= max(2, round(0.06 * lo)):  # close enough: within the noise of one probe
        return None
    return (lo + hi) // 2


async def search(
    kind: str, workers: int, start: int, factor: float, probes: int, budget: float, opts: Options, say: Say
) -> Capacity:
    """Probe sizes from `start`, by `factor` until one carries and one fails, then halving the gap: at most
    `probes` probes, and none started after `budget` (time.monotonic())."""
    cap, floor = (WEBINAR_MAX, 1) if kind == "webinar" else (MAX_PARTICIPANTS, CALL_MIN)
    found = Capacity(kind, workers)
    size: int | None = max(floor, min(cap, start))
    while size is not None and len(found.probes) < probes:
        if time.monotonic() > budget:
            found.notes.append("time budget spent: the search stopped early")
            break
        participants, publishers = _shape(kind, size)
        per_node: int | None = UNSPLIT if opts.per_node_flag else None
        if workers > 1:
            per_node = math.ceil(participants / 2)
        say(
            f"  {kind} of {size} against --workers {workers}"
            + (f" (per node {per_node})" if per_node else "")
        )
        probe = await run_probe(kind, workers, per_node, participants, publishers, opts, say)
        found.probes.append(probe)
        if workers > 1 and probe.complete and not probe.split:
            counts = ", ".join(f"{n.id} {n.participants}" for n in probe.nodes)
            found.notes.append(
                f"the call was not split over the workers (participants: {counts}) although the server took "
                f"--max-participants-per-node {per_node}: not measured"
            )
            return found
        if 2 * probe.connected < participants:
            # Not a load the server fell behind on: it did not seat the call (refused, or failed a redirect).
            why = probe.notes[0] if probe.notes else "no error"
            found.notes.append(f"only {probe.connected}/{participants} connected, search stopped: {why}")
            return found
        if probe.carried:
            found.largest = max(found.largest or 0, size)
        else:
            found.smallest_failed = min(found.smallest_failed or cap + 1, size)
        size = _next_size(found.largest, found.smallest_failed, size, floor, cap, factor)
        if size is not None and found.largest is not None and size <= found.largest:
            size = None
    found.complete = True
    found.at_cap = found.largest == cap
    best = found.best()
    if best is not None and best.busiest():
        found.per_core = round(best.size / best.busiest())
    failed = [p for p in found.probes if p.size == found.smallest_failed]
    if found.at_cap:
        found.limit = (
            f"the loadtest's largest call ({MAX_PARTICIPANTS} participants): the generator's ceiling"
        )
    elif failed:
        found.limit = failed[-1].limit()
    return found


async def measure_capacity(
    say: Say, opts: Options, workers: tuple[int, ...], probes: int, budget: float
) -> dict[str, Any]:
    rows: list[Capacity] = []
    refused = None
    if 2 in workers and not opts.per_node_flag:
        refused = (
            "huddle serve has no --max-participants-per-node (the multi-node feature of issue 12 is not in "
            "this tree): --workers 2 not measured"
        )
    started = time.monotonic()
    for kind, start in (("webinar", WEBINAR_START), ("call", CALL_START)):
        one: Capacity | None = None
        for count in workers:
            # Each configuration gets its share of what is left of the budget.
            left = len(workers) * 2 - len(rows)
            share = started + budget - time.monotonic()
            deadline = time.monotonic() + max(0.0, share / max(1, left))
            if count > 1 and refused:
                rows.append(Capacity(kind, count, notes=[refused]))
                continue
            if count > 1 and one is not None and one.largest:
                # Two workers should carry more than one: start at 1.5x one's and move by smaller steps.
                row = await search(kind, count, round(1.5 * one.largest), 1.33, probes, deadline, opts, say)
            else:
                row = await search(kind, count, start, 1.6, probes, deadline, opts, say)
            rows.append(row)
            if count == 1:
                one = row
    ratios, projected = {}, {}
    for kind in ("webinar", "call"):
        by = {r.workers: r for r in rows if r.kind == kind}
        if 1 in by and 2 in by and by[1].largest and by[2].largest:
            ratios[kind] = round(by[2].largest / by[1].largest, 2)
        if 1 in by and 2 in by and by[1].per_core and by[2].per_core:
            projected[kind] = round(by[2].per_core / by[1].per_core, 2)
    return {
        "rows": [asdict(r) | {"best": asdict(b) if (b := r.best()) else None} for r in rows],
        "ratio_2_to_1": ratios,
        "projected_ratio_2_to_1": projected,
        "complete": all(r.complete for r in rows),
    }


# ---------------------------------------------------------------------------------------------------------
# Pipe overhead


async def measure_pipe(say: Say, opts: Options, participants: int, runs: int) -> dict[str, Any]:
    if not opts.per_node_flag:
        return {
            "complete": False,
            "notes": ["huddle serve has no --max-participants-per-node: the pipe was not measured"],
        }
    half = math.ceil(participants / 2)
    probes: dict[str, list[Probe]] = {"unsplit": [], "split": []}
    notes: list[str] = []
    for run in range(1, runs + 1):
        for case, per_node in (("unsplit", UNSPLIT), ("split", half)):
            say(f"  pipe run {run}: a call of {participants} on --workers 2, {case} (per node {per_node})")
            probe = await run_probe("pipe", 2, per_node, participants, CALL_PUBLISHERS, opts, say)
            probes[case].append(probe)
            if case == "split" and probe.complete and not probe.split:
                notes.append("the call was not split over the workers: the pipe cannot be measured yet")
                return {
                    "complete": False,
                    "notes": notes,
                    "probes": {k: [asdict(p) for p in v] for k, v in probes.items()},
                }
    figures: dict[str, Any] = {"participants": participants, "publishers": CALL_PUBLISHERS, "per_node": half}

    def median(case: str, value: Callable[[Probe], float | None]) -> float | None:
        values = [v for p in probes[case] if p.complete and (v := value(p)) is not None]
        return round(statistics.median(values), 3) if values else None

    def viewer(home: bool, what: str) -> Callable[[Probe], float | None]:
        def pick(p: Probe) -> float | None:
            nodes = [n for n in p.nodes if (n.id == p.home) == home and n.viewers]
            return getattr(nodes[0], what) if nodes else None

        return pick

    for case in probes:
        figures[case] = {
            "worker_cpu": median(case, lambda p: sum(p.worker_cpu.values())),
            "forwarded_pps": median(case, lambda p: p.pps_out),
            "us_per_forwarded": median(
                case, lambda p: 1e6 * sum(p.worker_cpu.values()) / p.pps_out if p.pps_out else None
            ),
            "pipe_out_pps": median(case, lambda p: p.pipe_out_pps),
            "pipe_in_pps": median(case, lambda p: p.pipe_in_pps),
            "loss_percent": median(case, lambda p: p.loss_percent),
            "generator_cpu": median(case, lambda p: p.generator_cpu),
            "home_viewers": median(case, viewer(True, "viewers")),
            "other_viewers": median(case, viewer(False, "viewers")),
            "home_p50_ms": median(case, viewer(True, "viewer_delay_p50_ms")),
            "home_p99_ms": median(case, viewer(True, "viewer_delay_p99_ms")),
            "other_p50_ms": median(case, viewer(False, "viewer_delay_p50_ms")),
            "other_p99_ms": median(case, viewer(False, "viewer_delay_p99_ms")),
            "runs_complete": sum(p.complete for p in probes[case]),
        }
    split, unsplit = figures["split"], figures["unsplit"]
    piped = split["pipe_out_pps"]
    if split["worker_cpu"] is not None and unsplit["worker_cpu"] is not None:
        extra = split["worker_cpu"] - unsplit["worker_cpu"]
        figures["extra_cpu"] = round(extra, 3)
        figures["us_per_piped_packet"] = round(1e6 * extra / piped, 1) if piped else None
    if not piped:
        notes.append("no pipe packets in /metrics (huddle_pipe_packets_total): CPU per piped packet unknown")
    figures["notes"] = notes + [n for v in probes.values() for p in v for n in p.notes][:6]
    figures["probes"] = {k: [asdict(p) for p in v] for k, v in probes.items()}
    figures["complete"] = all(
        p.complete and (p.split or case == "unsplit") for case, v in probes.items() for p in v
    )
    return figures


# ---------------------------------------------------------------------------------------------------------
# Both, and the table


def server_knows_per_node() -> bool:
    help_text = subprocess.run(
        [sys.executable, "-m", "huddle", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    ).stdout
    return "--max-participants-per-node" in help_text


async def measure_heavy(
    say: Say,
    *,
    quick: bool = False,
    only: str | None = None,
    workers: tuple[int, ...] = (1, 2),
    probes: int | None = None,
    window: float | None = None,
    runs: int | None = None,
    pipe_participants: int = 40,
    decrypt_every: int = 4,
) -> dict[str, Any]:
    opts = Options(
        window=window or (5.0 if quick else 10.0),
        warmup=1.5 if quick else 2.0,
        decrypt_every=decrypt_every,
        per_node_flag=await asyncio.to_thread(server_knows_per_node),
    )
    figures: dict[str, Any] = {
        "window_s": opts.window,
        "warmup_s": opts.warmup,
        "decrypt_every": decrypt_every,
    }
    if only in (None, "capacity"):
        count = probes or (3 if quick else 4)
        budget = 100.0 if quick else 270.0
        say(
            f"heavy capacity: webinar and call, --workers {' and '.join(map(str, workers))}, "
            f"<= {count} probes each"
        )
        figures["capacity"] = await measure_capacity(say, opts, workers, count, budget)
    if only in (None, "pipe") and 2 in workers:
        say(f"heavy pipe: a call of {pipe_participants} on --workers 2, split and not")
        figures["pipe"] = await measure_pipe(say, opts, pipe_participants, runs or (1 if quick else 3))
    return figures


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_heavy(figures: dict[str, Any]) -> str:
    lines: list[str] = []
    capacity = figures.get("capacity")
    if capacity:
        lines.append(
            f"heavy calls (issue 12): the largest call carried at 0 % loss, speaker layout; each probe "
            f"{figures['warmup_s']:g} s warm-up, {figures['window_s']:g} s measured; workers 2 with "
            "--max-participants-per-node = half the call"
        )
        header = (
            f"  {'call':<8} {'workers':>7} {'largest':>8} {'fwd pkt/s':>10} {'CPU s/s per worker':>20} "
            f"{'parent':>6} {'generator':>9} {'per core':>8}  probes (size, + carried, - not)"
        )
        lines += [header, "  " + "-" * (len(header) - 2)]
        for row in capacity["rows"]:
            best = row["best"] or {}
            cpu = " ".join(f"{w} {c:.2f}" for w, c in sorted(best.get("worker_cpu", {}).items())) or "-"
            largest = "-" if row["largest"] is None else f"{'>=' if row['at_cap'] else ''}{row['largest']}"
            ladder = " ".join(
                f"{p['participants'] - (p['kind'] == 'webinar')}{'+' if p['carried'] else '-'}"
                for p in row["probes"]
            )
            lines.append(
                f"  {row['kind']:<8} {row['workers']:>7} {largest:>8} {best.get('pps_out', 0):>10,.0f} "
                f"{cpu:>20} {_f(best.get('parent_cpu'), '.2f'):>6} {_f(best.get('generator_cpu'), '.2f'):>9}"
                f" {_f(row['per_core'], 'd'):>8}  {ladder}"
            )
            if row["limit"]:
                where = f"at {row['smallest_failed']}" if row["smallest_failed"] else "ceiling"
                lines.append(f"           {where}: {row['limit']}")
            lines.extend(f"           note: {n}" for n in row["notes"][:3])
            failed = [p for p in row["probes"] if not p["carried"] and p["notes"]]
            lines.extend(f"           probe note: {n}" for n in (failed[-1]["notes"][:2] if failed else []))

        def ratios(found: dict[str, float]) -> str:
            return ", ".join(f"{k} {v:.2f}x" for k, v in found.items()) or "-"

        lines += [
            f"  workers 2 / workers 1: largest sizes {ratios(capacity['ratio_2_to_1'])} (goal 2x; a size at "
            f"the loadtest's cap of {MAX_PARTICIPANTS} participants is a lower bound); per core "
            f"{ratios(capacity['projected_ratio_2_to_1'])}",
            "  webinar size = viewers (1 publisher); call size = participants (10 publishing). Loss = "
            "packets missing from the sequence numbers of each stream a subscriber received, in the window. "
            "per core = largest size / CPU s/s of the busiest worker there: where it would be full, if CPU "
            "grows in proportion (a projection past what this machine's cores, shared with the generator, "
            "can show).",
        ]
    pipe = figures.get("pipe")
    if pipe:
        if lines:
            lines.append("")
        if "split" not in pipe:
            lines.append("heavy pipe: not measured")
        else:
            lines.append(
                f"heavy pipe: a call of {pipe['participants']} ({pipe['publishers']} publishing) on "
                f"--workers 2, split (per node {pipe['per_node']}: publishers on the home worker, viewers on "
                "both) and not (all on the home worker); medians over the runs"
            )
            header = (
                f"  {'':<8} {'worker CPU s/s':>14} {'fwd pkt/s':>10} {'us/fwd':>6} {'pipe out/in pkt/s':>18} "
                f"{'loss %':>7} {'viewers home/other':>18} {'delay home p50/p99':>19} "
                f"{'other p50/p99 ms':>17}"
            )
            lines += [header, "  " + "-" * (len(header) - 2)]
            for case in ("unsplit", "split"):
                c = pipe[case]
                lines.append(
                    f"  {case:<8} {_f(c['worker_cpu'], '.3f'):>14} {_f(c['forwarded_pps'], ',.0f'):>10} "
                    f"{_f(c['us_per_forwarded'], '.1f'):>6} "
                    f"{_f(c['pipe_out_pps'], ',.0f') + '/' + _f(c['pipe_in_pps'], ',.0f'):>18} "
                    f"{_f(c['loss_percent'], '.3f'):>7} "
                    f"{_f(c['home_viewers'], '.0f') + '/' + _f(c['other_viewers'], '.0f'):>18} "
                    f"{_f(c['home_p50_ms'], '.2f') + '/' + _f(c['home_p99_ms'], '.2f'):>19} "
                    f"{_f(c['other_p50_ms'], '.2f') + '/' + _f(c['other_p99_ms'], '.2f'):>17}"
                )
            lines.append(
                f"  the split costs the workers {_f(pipe.get('extra_cpu'), '+.3f')} CPU s/s: "
                f"{_f(pipe.get('us_per_piped_packet'), '.1f')} us per packet piped out (and received at the "
                "other end)"
            )
        lines.extend(f"  note: {n}" for n in pipe.get("notes", [])[:4])
    if lines:
        lines.append(
            "  CPU s/s: user+sys per second of window (/proc/PID/stat); generator = this process "
            f"(huddle.loadtest, decrypting 1 packet in {figures['decrypt_every']}), on the same "
            f"{os.cpu_count()} cores as the server."
        )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    def say(text: str) -> None:
        print(f"bench.heavy: {text}", file=sys.stderr, flush=True)

    started = time.time()
    figures = await measure_heavy(
        say,
        quick=args.quick,
        only=args.only,
        workers=tuple(args.workers),
        probes=args.probes,
        window=args.window,
        runs=args.runs,
        pipe_participants=args.pipe_participants,
        decrypt_every=args.decrypt_every,
    )
    table = format_heavy(figures)
    print(table, flush=True)
    save_results("heavy", started, figures, table)
    parts = [figures[k] for k in ("capacity", "pipe") if k in figures]
    return 0 if all(part["complete"] for part in parts) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.heavy", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter probes (~2 minutes)")
    parser.add_argument("--only", choices=("capacity", "pipe"), help="one of the two parts")
    parser.add_argument("--workers", type=int, nargs="+", choices=(1, 2), default=[1, 2])
    parser.add_argument("--probes", type=int, help="capacity: probes per configuration (1..8)")
    parser.add_argument("--window", type=float, help="seconds measured per probe (3..30)")
    parser.add_argument("--runs", type=int, help="pipe: runs of each case (1..5)")
    parser.add_argument("--pipe-participants", type=int, default=40, help="pipe: the call's size")
    parser.add_argument("--decrypt-every", type=int, default=4, help="the generator decrypts 1 packet in N")
    args = parser.parse_args(argv)
    if args.probes is not None and not 1 <= args.probes <= 8:
        parser.error("--probes must be 1..8")
    if args.window is not None and not 3 <= args.window <= 30:
        parser.error("--window must be 3..30 s")
    if args.runs is not None and not 1 <= args.runs <= 5:
        parser.error("--runs must be 1..5")
    if not 2 * CALL_PUBLISHERS <= args.pipe_participants <= MAX_PARTICIPANTS:
        parser.error(f"--pipe-participants must be {2 * CALL_PUBLISHERS}..{MAX_PARTICIPANTS}")
    if not 1 <= args.decrypt_every <= 100:
        parser.error("--decrypt-every must be 1..100")
    try:
        return asyncio.run(asyncio.wait_for(main_async(args), timeout=900))
    except TimeoutError:
        print("bench.heavy: the run overran 15 minutes and was stopped", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
