"""Run the fuzz targets under atheris: `python -m fuzz [--seconds N] [TARGET ...]` (what `make fuzz` does).

Each target runs in its own process for a bounded time, starting from the committed corpus
(fuzz/corpus/<target>/) and what earlier runs found (fuzz/work/<target>/, not committed). A crash, or an
input that takes over a second, is written to fuzz/crashes/ and makes the run fail.

    python -m fuzz merge [TARGET ...]   fold the inputs from fuzz/work/ that add coverage into fuzz/corpus/
    python -m fuzz seed                 (re)write the seed inputs taken from the test fixtures
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from fuzz import TARGETS

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
WORK = HERE / "work"
CRASHES = HERE / "crashes"
DEFAULT_SECONDS = int(os.environ.get("FUZZ_SECONDS", "60"))
# libFuzzer's flags for every run: a second is a hang; the parsers hold a few MB, so 2 GB is a leak.
HANG_SECONDS = 1
_COMMON = [f"-timeout={HANG_SECONDS}", "-rss_limit_mb=2048", "-print_final_stats=1"]
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.M)
_PROGRESS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)", re.M)


def _worker(target: str, flags: list[str]) -> None:
    """In the child process: instrument huddle while importing the harness, then hand over to libFuzzer."""
    import atheris

    with atheris.instrument_imports(include=["huddle"]):
        harness = importlib.import_module(f"fuzz.{target}")
    if not any(flag.startswith("-max_len=") for flag in flags):
        flags = [*flags, f"-max_len={harness.MAX_LEN}"]
    # libFuzzer's merge runs argv[0] through the shell for its inner passes: make that this worker again.
    atheris.Setup([f"{sys.executable} -m fuzz worker {target} --", *flags], harness.one_input)
    atheris.Fuzz()


def _child(target: str, flags: list[str], log: Path, limit: float) -> int:
    command = [sys.executable, "-m", "fuzz", "worker", target, "--", *flags]
    with log.open("w") as out:
        try:
            return subprocess.run(
                command, cwd=HERE.parent, stdout=out, stderr=subprocess.STDOUT, timeout=limit
            ).returncode
        except subprocess.TimeoutExpired:
            out.write(f"\nhuddle fuzz: killed after {limit:.0f} s\n")
            return -1


def _cpu_seconds(target: str, path: Path) -> float:
    """CPU time of one input through the harness, uninstrumented: what a reported timeout really costs."""
    harness = importlib.import_module(f"fuzz.{target}")
    started = time.thread_time()
    try:
        harness.one_input(path.read_bytes())
    except Exception:  # a crash is reported as one by the fuzzer; this only measures
        pass
    return time.thread_time() - started


def _fuzz(target: str, seconds: int) -> tuple[str, list[Path]]:
    """One target for `seconds`: its summary line, and the reproducers it left in fuzz/crashes/."""
    work = WORK / target
    work.mkdir(parents=True, exist_ok=True)
    (CORPUS / target).mkdir(parents=True, exist_ok=True)
    log = WORK / f"{target}.log"
    deadline = time.monotonic() + seconds
    runs = new = 0
    while True:
        # libFuzzer's timeout is wall time, and a niced process on a busy machine can wait a second for a
        # core: a timeout that costs well under a second of CPU is the scheduler's, so fuzzing goes on.
        before = set(CRASHES.glob(f"{target}-*"))
        started = time.monotonic()
        flags = [
            *_COMMON,
            f"-max_total_time={max(1, round(deadline - started))}",
            f"-artifact_prefix={CRASHES}/{target}-",
            str(work),
            str(CORPUS / target),
        ]
        code = _child(target, flags, log, deadline - started + 300)
        text = log.read_text(errors="replace")
        stats = {name: int(value) for name, value in _STAT.findall(text)}
        runs += stats.get("number_of_executed_units", 0)
        new += stats.get("new_units_added", 0)
        found = sorted(set(CRASHES.glob(f"{target}-*")) - before)
        spurious = [p for p in found if "-timeout-" in p.name and _cpu_seconds(target, p) < HANG_SECONDS / 2]
        for path in spurious:
            print(f"  {target}: a timeout that costs little CPU (a busy machine), fuzzing on", flush=True)
            path.unlink()
        real = [p for p in found if p not in spurious]
        if real or not spurious or deadline - time.monotonic() < 10:
            break
    progress = _PROGRESS.findall(text)
    cov, ft, corpus = progress[-1][1:] if progress else ("?", "?", "?")
    result = "ok" if not real and (code == 0 or spurious) else f"FAILED (exit {code})"
    line = f"{target:<10} {runs:>10} {runs / seconds:>8.0f} {cov:>6} {ft:>7} {corpus:>7} {new:>5}  {result}"
    if result != "ok":
        line += "\n  " + "\n  ".join(text.strip().splitlines()[-25:])
    return line, real


def run(targets: list[str], seconds: int) -> int:
    CRASHES.mkdir(exist_ok=True)
    failed = []
    print(f"{'target':<10} {'runs':>10} {'exec/s':>8} {'cov':>6} {'ft':>7} {'corpus':>7} {'new':>5}  result")
    for target in targets:
        line, found = _fuzz(target, seconds)
        print(line, flush=True)
        if "FAILED" in line.split("\n")[0]:
            failed.append(target)
            for path in found:
                print(f"  reproducer: {path}")
    if failed:
        print(f"fuzzing found problems in: {', '.join(failed)} (logs in {WORK})")
        return 1
    return 0


def merge(targets: list[str]) -> int:
    for target in targets:
        work = WORK / target
        if not work.is_dir():
            continue
        log = WORK / f"{target}-merge.log"
        flags = [*_COMMON, "-merge=1", str(CORPUS / target), str(work)]
        code = _child(target, flags, log, 1800)
        print(f"{target}: merge exit {code}, {len(list((CORPUS / target).iterdir()))} files in the corpus")
        if code != 0:
            return code
    return 0


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["worker"]:
        flags = argv[2:]
        _worker(argv[1], flags[1:] if flags[:1] == ["--"] else flags)
        return 0
    command = argv.pop(0) if argv[:1] in (["run"], ["merge"], ["seed"]) else "run"
    parser = argparse.ArgumentParser(prog=f"python -m fuzz {command}", description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=f"any of {', '.join(TARGETS)}")
    parser.add_argument("--seconds", type=int, default=DEFAULT_SECONDS, help="per target (FUZZ_SECONDS)")
    args = parser.parse_args(argv)
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; known: {', '.join(TARGETS)}")
    targets = args.targets or list(TARGETS)
    if command == "seed":
        from fuzz.seeds import write_seeds

        write_seeds(CORPUS)
        return 0
    if command == "merge":
        return merge(targets)
    return run(targets, args.seconds)


if __name__ == "__main__":
    sys.exit(main())
