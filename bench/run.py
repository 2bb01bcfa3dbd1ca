"""`make bench`: bounded load scenarios against our SFU and Janus, side by side; a table on stdout, and its
JSON and Markdown under bench/results/.

    scripts/in-netns .venv/bin/python -m bench.run                 # everything (about an hour on 2 cores)
    scripts/in-netns .venv/bin/python -m bench.run --quick         # a smoke run: one small call, one run each
    scripts/in-netns .venv/bin/python -m bench.run --only same-50 call-100 --runs 5
    scripts/in-netns .venv/bin/python -m bench.run --only capacity # the capacity search alone
    scripts/in-netns .venv/bin/python -m bench.run --only cluster --no-janus   # bench.cluster alone

Like for like. Both servers listen on the same address (the namespace's veth), are driven by the same
synthetic participants (huddle.loadtest: the same ICE, DTLS, SRTP, VP8 and Opus), and their packet counts
come from the same place: what the generator's publishers sent and its subscribers received + lost. The
SRTP profile each negotiated is recorded. `same-50` makes both do exactly the same work (no simulcast, no
audio, every viewer sees every video), so that CPU per packet compares the same thing; the adaptive
scenarios beside it differ in what each server forwards (JANUS_DIFFERS says how). Every scenario is run
`--runs` times (3 by default), ours and Janus's alternating; the table gives the median and the range, and
a ratio is called a difference only when the ranges do not overlap (bench.table).

The reference path. `call-100` is also run against our server on its pure-Python per-packet path
(HUDDLE_FASTPATH=0, "huddle-py"), alternating too: the compiled path's gain, measured in the same run.

Capacity (bench.capacity): for a call (10 publishers, speaker layout) and a webinar (1 publisher), the largest
N at which everyone gets every video at its layer, with 0 % loss and p99 under 50 ms: ours with 1 worker and
with one per core, and Janus. The generator shares the machine: its own CPU is printed beside each figure.

Everything is bounded: scenario count, runs, probes, each loadtest's deadline, the whole run's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench.capacity import Capacity, largest_passing
from bench.janus.videoroom import JANUS_DIFFERS, run_janus
from bench.ours import RESULTS, ROOT, run_ours
from bench.table import Row, Summary, Verdict, compare, format_markdown, format_text, summarise

__all__ = ["Scenario", "main"]

JANUS_NOTE = "Janus: not measured in this run"
WHOLE_RUN_TIMEOUT = 5400.0
MAX_RUNS = 9


@dataclass(frozen=True)
class Scenario:
    name: str
    participants: int
    publishers: int
    layout: str = "speaker"
    duration: float = 15.0
    warmup: float = 3.0
    simulcast: bool = True
    audio: bool = True
    decrypt_every: int = 1  # the generator decrypts 1 packet in this many per stream (capacity: 4)
    description: str = ""


SAME_WORK = Scenario(
    "same-50",
    50,
    10,
    layout="gallery",
    simulcast=False,
    audio=False,
    description="like for like: 50 people, 10 publish one 640x360 VP8 video (no simulcast, no audio), "
    "everyone sees every video",
)
SCENARIOS = (
    SAME_WORK,
    Scenario("call-10", 10, 10, description="10 people, all publish, speaker layout"),
    Scenario("call-50", 50, 10, description="50 people, 10 publish, speaker layout"),
    Scenario("call-100", 100, 10, description="100 people, 10 publish, speaker layout"),
    Scenario("webinar-100", 101, 1, description="1 publisher, 100 viewers"),
)
QUICK = (
    Scenario("quick-10", 10, 10, duration=8.0, warmup=2.0, description="smoke run: 10 people, 8 s"),
    replace(SAME_WORK, name="same-10", participants=10, publishers=4, duration=8.0, warmup=2.0,
            description="smoke run, like for like: 10 people, 4 publish one video, no audio"),
)  # fmt: skip
REFERENCE_PATH = ("call-100",)  # also run on the pure-Python per-packet path (HUDDLE_FASTPATH=0)


@dataclass(frozen=True)
class CapacitySeries:
    name: str
    publishers: int
    layout: str
    start: int
    description: str


CAPACITY = (
    CapacitySeries("call", 10, "speaker", 40, "a call: 10 publish, everyone else watches, speaker layout"),
    CapacitySeries("webinar", 1, "speaker", 60, "a webinar: 1 publishes, N - 1 watch"),
)
CAPACITY_LIMIT = 200  # huddle.loadtest's own bound on participants
CAPACITY_PROBES = 6
# The generator shares the machine: decrypting 1 packet in 4 per stream (loss is counted on every packet,
# layers and delay on the decrypted ones) leaves it room, so that the server is what the search finds full.
CAPACITY_DECRYPT_EVERY = 4


Say = Callable[[str], None]


# ---------------------------------------------------------------------------------------------------------
# Ours against Janus, scenario by scenario


async def run_server(sfu: str, scenario: Scenario, say: Say, run: int = 0) -> Row:
    if sfu == "janus":
        return await run_janus(scenario, say, run)
    if sfu == "huddle-py":
        return await run_ours(scenario, say, run, fastpath=False)
    return await run_ours(scenario, say, run, workers="auto" if sfu.endswith("w") else "1")


async def compare_servers(scenarios: tuple[Scenario, ...], runs: int, janus: bool, say: Say) -> list[Row]:
    """Every scenario `runs` times against each server, the order of the servers reversed every other run
    (so that neither always runs on a machine the other just warmed or loaded)."""
    rows = []
    for run in range(runs):
        for scenario in scenarios:
            servers = ["huddle"]
            if scenario.name in REFERENCE_PATH:
                servers.append("huddle-py")
            if janus:
                servers.append("janus")
            if run % 2:
                servers.reverse()
            for sfu in servers:
                say(f"{scenario.name} ({scenario.description}), run {run + 1}/{runs}, against {sfu}")
                rows.append(await run_server(sfu, scenario, say, run))
    return rows


SFU_ORDER = ("huddle", "huddle-py", "janus")


def summaries_of(rows: list[Row], scenarios: tuple[Scenario, ...]) -> list[Summary]:
    found = []
    for scenario in scenarios:
        for sfu in SFU_ORDER:
            mine = [r for r in rows if r.scenario == scenario.name and r.sfu == sfu]
            if mine:
                found.append(summarise(mine))
    return found


def verdicts_of(summaries: list[Summary]) -> tuple[dict[str, Verdict], dict[str, Verdict]]:
    """(ours against Janus on CPU per forwarded packet, the compiled path against the pure-Python one on
    forwarded packets per CPU-second), by scenario."""
    by = {(s.scenario, s.sfu): s for s in summaries}
    janus, reference = {}, {}
    for (scenario, sfu), summary in by.items():
        if sfu != "huddle":
            continue
        if (scenario, "janus") in by:
            janus[scenario] = compare(summary, by[scenario, "janus"])
        if (scenario, "huddle-py") in by:
            reference[scenario] = compare(summary, by[scenario, "huddle-py"], "forwarded_per_cpu_second")
    return janus, reference


def explain(summaries: list[Summary], reference: dict[str, Verdict], janus_note: str | None) -> str:
    lines = []
    for scenario, verdict in reference.items():
        lines.append(
            f"{scenario}: the compiled per-packet path against the pure-Python one (HUDDLE_FASTPATH=0), "
            "forwarded "
            f"packets per CPU-second: {verdict.text()}"
        )
    for summary in summaries:
        if summary.srtp_profiles:
            lines.append(f"{summary.scenario} {summary.sfu}: SRTP {', '.join(summary.srtp_profiles)}")
        lines.extend(f"{summary.scenario} {summary.sfu}: {note}" for note in summary.notes[:3])
    if janus_note:
        lines.append(janus_note)
    else:
        lines.append(JANUS_DIFFERS + "; in same-* both forward exactly the same packets.")
    lines.append(
        "Each figure: median (min-max) over the complete runs. pkt/s from the generator for both (sent; "
        "received + lost); CPU = user+sys of the server's processes only, over the measured window; us/fwd = "
        "server CPU per forwarded packet; loss and p99 delay (send to receive, one clock) at the "
        "subscribers; layers ok = runs in which every shown video arrived at the layer asked for."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Capacity


async def measure_capacity(say: Say, janus: bool, quick: bool) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    servers = ["huddle", f"huddle/{cores}w"] + (["janus"] if janus else [])
    found: dict[str, Any] = {}
    for series in CAPACITY:
        for sfu in servers:

            async def probe(n: int, series: CapacitySeries = series, sfu: str = sfu) -> Row:
                scenario = Scenario(
                    f"{series.name}-{n}",
                    n,
                    min(series.publishers, n),
                    layout=series.layout,
                    duration=6.0 if quick else 8.0,
                    warmup=2.0,
                    decrypt_every=CAPACITY_DECRYPT_EVERY,
                    description=series.description,
                )
                say(f"capacity: {series.name} of {n} against {sfu}")
                return await run_server(sfu, scenario, say)

            capacity = await largest_passing(
                probe,
                start=series.start // 4 if quick else series.start,
                limit=CAPACITY_LIMIT,
                max_probes=2 if quick else CAPACITY_PROBES,
            )
            found[f"{series.name} {sfu}"] = _capacity_dict(series, sfu, capacity)
    return found


def _capacity_dict(series: CapacitySeries, sfu: str, capacity: Capacity) -> dict[str, Any]:
    at = next((r for r in capacity.rows if r.participants == capacity.largest), None)
    return {
        "series": series.name,
        "sfu": sfu,
        "largest": capacity.largest,
        "bounded": capacity.bounded,
        "probes": [{"n": n, "passed": ok, "why_not": why} for n, ok, why in capacity.probes],
        "server_cpu_percent": at.cpu_percent if at else None,
        "generator_cpu_percent": at.generator_cpu_percent if at else None,
        "rows": [asdict(r) for r in capacity.rows],
    }


def format_capacity(found: dict[str, Any]) -> str:
    lines = [
        "capacity: the largest N with every video at its layer, 0 % loss, p99 < 50 ms (bounded search: "
        f"at most {CAPACITY_PROBES} probes, N <= {CAPACITY_LIMIT}); CPU % of one core at that N"
    ]
    for item in found.values():
        largest = f"{item['largest']}" + ("+" if item["bounded"] and item["largest"] else "")
        probes = ", ".join(
            f"{p['n']} {'ok' if p['passed'] else 'failed (' + p['why_not'] + ')'}" for p in item["probes"]
        )
        lines.append(
            f"  {item['series']:<8} {item['sfu']:<10} N = {largest:<5} "
            f"server CPU {item['server_cpu_percent']}"
            f" %, generator CPU {item['generator_cpu_percent']} %; probes: {probes}"
        )
    lines.append("  (N+: the search stopped at its bound, not at a failure)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Recording


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


# ---------------------------------------------------------------------------------------------------------
# The run


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        memory = Path("/proc/meminfo").read_text().split()[1]
    except OSError:
        memory = "0"
    janus = ""
    if shutil.which("janus"):
        janus = subprocess.run(["janus", "--version"], capture_output=True, text=True, timeout=10).stdout
    # "+changes" when the tree measured is not the commit (a result must say what code it measured).
    describe = ["git", "describe", "--always", "--abbrev=7", "--dirty=+changes"]
    commit = subprocess.run(describe, capture_output=True, text=True, cwd=ROOT)
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(int(memory) / 2**20, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "janus": janus.splitlines()[0] if janus else None,
        "commit": commit.stdout.strip(),
    }


def markdown(stamp: str, about: dict[str, Any], table: str, explanation: str, extra: str) -> str:
    parts = [
        f"# make bench, {stamp}",
        "",
        f"Machine: {about['cpu']}, {about['cores']} cores, {about['memory_gib']} GiB, "
        f"Linux {about['kernel']}, "
        f"Python {about['python']}, {about['janus'] or 'no Janus'}; commit {about['commit']}.",
        "",
        table,
        "",
        *[f"- {line}" for line in explanation.splitlines()],
    ]
    if extra:
        parts += ["", "```", extra, "```"]
    return "\n".join(parts) + "\n"


async def main_async(args: argparse.Namespace) -> int:
    only = set(args.only or ())
    scenarios = QUICK if args.quick else SCENARIOS
    if only:
        scenarios = tuple(s for s in SCENARIOS + QUICK if s.name in only)
    if args.duration:
        scenarios = tuple(replace(s, duration=args.duration) for s in scenarios)
    runs = args.runs or (1 if args.quick else 3)

    def say(text: str) -> None:
        print(f"bench: {text}", file=sys.stderr, flush=True)

    def wanted(part: str, skip: bool) -> bool:
        return not skip and (not only or part in only)

    started = time.time()
    janus = not args.no_janus and shutil.which("janus") is not None
    janus_note = (
        None if janus else f"{JANUS_NOTE} ({'--no-janus' if args.no_janus else 'janus not installed'})"
    )
    rows = await compare_servers(scenarios, runs, janus, say) if scenarios else []
    summaries = summaries_of(rows, scenarios)
    against_janus, reference = verdicts_of(summaries)
    explanation = explain(summaries, reference, janus_note) if rows else ""
    table = format_text(summaries, against_janus) if rows else ""
    md_table = format_markdown(summaries, against_janus) if rows else ""
    sections: list[str] = []
    document: dict[str, Any] = {}
    if wanted("capacity", args.no_capacity or (args.quick and not only)):
        document["capacity"] = await measure_capacity(say, janus, args.quick)
        sections.append(format_capacity(document["capacity"]))
    if wanted("recording", args.no_recording):
        say("recording: composite speed and per-track writer throughput")
        document["recording"] = await asyncio.to_thread(measure_recording, 10 if args.quick else 20)
        sections.append(format_recording(document["recording"]))
    if wanted("cluster", args.no_cluster):
        from bench.cluster import format_cluster, measure_cluster

        document["cluster"] = await measure_cluster(say, runs=2 if args.quick else 5)
        sections.append(format_cluster(document["cluster"]))
    if wanted("heavy", args.no_heavy):
        from bench.heavy import format_heavy, measure_heavy

        # Its capacity search is the one above (same criterion, Janus beside): the pipe's cost only here;
        # `python -m bench.heavy --only capacity` gives the per-worker detail.
        document["heavy"] = await measure_heavy(say, quick=args.quick, only="pipe")
        sections.append(format_heavy(document["heavy"]))
    if wanted("kafka", args.no_kafka):
        from bench.kafka_recording import format_kafka, measure_kafka

        document["kafka"] = await measure_kafka(say, quick=args.quick)
        sections.append(format_kafka(document["kafka"]))
    if wanted("turn", args.no_turn):
        from bench.turn import format_turn, measure_turn

        document["turn"] = await measure_turn(say, quick=args.quick)
        sections.append(format_turn(document["turn"]))
    extra = "\n\n".join(sections)
    print("\n\n".join(part for part in (table, explanation, extra) if part), flush=True)
    results = args.results or RESULTS
    results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    about = machine()
    path = results / f"{stamp}.json"
    document = {
        "started": stamp,
        "seconds": round(time.time() - started, 1),
        "machine": about,
        "runs": runs,
        "scenarios": [asdict(s) for s in scenarios],
        "rows": [asdict(r) for r in rows],
        "summaries": [asdict(s) for s in summaries],
        "against_janus": {k: asdict(v) for k, v in against_janus.items()},
        "compiled_against_reference": {k: asdict(v) for k, v in reference.items()},
        "janus_note": janus_note,
        **document,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    (results / f"{stamp}.md").write_text(markdown(stamp, about, md_table, explanation, extra))
    print(f"\nwritten to {path} and {stamp}.md beside it", flush=True)
    return 0 if all(r.complete for r in rows) and _parts_complete(document) else 1


def _parts_complete(document: dict[str, Any]) -> bool:
    cluster, heavy = document.get("cluster"), document.get("heavy")
    if cluster is not None and not all(part["complete"] for part in cluster.values()):
        return False
    if heavy is not None and not all(heavy[k]["complete"] for k in ("capacity", "pipe") if k in heavy):
        return False
    return all(document[k]["complete"] for k in ("kafka", "turn") if document.get(k) is not None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: two small scenarios, one run each")
    parser.add_argument("--only", nargs="+", help="scenarios or parts to run (e.g. call-100 capacity turn)")
    parser.add_argument("--runs", type=int, help=f"runs per scenario and server (default 3, 1..{MAX_RUNS})")
    parser.add_argument("--duration", type=float, help="seconds measured per run (default 15)")
    parser.add_argument("--results", type=Path, help=f"where the JSON and Markdown go (default {RESULTS})")
    parser.add_argument("--no-janus", action="store_true", help="our SFU only")
    parser.add_argument("--no-capacity", action="store_true", help="skip the capacity search")
    parser.add_argument("--no-recording", action="store_true", help="skip the recording figures")
    parser.add_argument("--no-cluster", action="store_true", help="skip the cluster figures (bench.cluster)")
    parser.add_argument("--no-heavy", action="store_true", help="skip the heavy-call figures (bench.heavy)")
    parser.add_argument("--no-kafka", action="store_true", help="skip the Kafka recording figures")
    parser.add_argument("--no-turn", action="store_true", help="skip the TURN relay figures (bench.turn)")
    args = parser.parse_args(argv)
    if args.duration is not None and not 1 <= args.duration <= 120:
        parser.error("--duration must be 1..120 s")
    if args.runs is not None and not 1 <= args.runs <= MAX_RUNS:
        parser.error(f"--runs must be 1..{MAX_RUNS}")
    try:
        return asyncio.run(asyncio.wait_for(main_async(args), timeout=WHOLE_RUN_TIMEOUT))
    except TimeoutError:
        print(
            f"bench: the whole run overran {WHOLE_RUN_TIMEOUT / 60:g} minutes and was stopped",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
