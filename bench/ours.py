"""Our SFU as the benchmark runs it: `python -m huddle serve --sfu-always` as a subprocess, on the same
address as Janus (the namespace's veth, hx0 = 10.77.0.1 under scripts/in-netns; 127.0.0.1 elsewhere), and
one scenario run against it by huddle.loadtest.

During the loadtest's measured window the server's CPU (user + system from /proc/<pid>/stat, the server
process and any processes under it, never the generator) and RSS are sampled at both edges; packet counts
come from the generator (what the publishers sent, what the subscribers received + lost), as for Janus, and
the server's own /metrics count is kept beside them as a cross-check.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.janus.harness import interface_ipv4
from bench.table import Row
from huddle.loadtest.run import LoadtestConfig, run_loadtest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SERVER_START_TIMEOUT = 30.0
BENCH_INTERFACE = "hx0"


def bench_address() -> str:
    """Where both servers listen: the veth Janus needs (it offers no loopback candidates), else loopback."""
    return interface_ipv4(BENCH_INTERFACE) or "127.0.0.1"


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


def read_forwarded(url: str) -> float | None:
    """The SFU's own count of RTP packets sent (huddle_sfu_rtp_out_total), None when /metrics lacks it."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        text = response.read().decode()
    match = re.search(r"^huddle_sfu_rtp_out_total\s+(\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


class HuddleServer:
    """`python -m huddle serve` as a subprocess with free ports; `workers` as `--workers` takes it."""

    def __init__(
        self,
        max_participants: int = 200,
        host: str = "127.0.0.1",
        workers: str = "1",
        env: dict[str, str] | None = None,
        per_node: int | None = None,
    ) -> None:
        self.max_participants = max_participants
        self.host = host
        self.workers = workers
        self.env = {**os.environ, **(env or {})}
        self.per_node = per_node
        self.process: subprocess.Popen[str] | None = None
        self.url = ""
        self.stderr_path = RESULTS / "server.stderr.log"

    def start(self) -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "huddle", "serve", "--host", self.host, "--port", "0"]
        command += ["--stun-port", "0", "--media-port", "0", "--sfu-always", "--workers", self.workers]
        command += ["--max-participants", str(self.max_participants)]
        if self.per_node is not None:
            command += ["--max-participants-per-node", str(self.per_node)]
        command += ["--recordings-dir", tempfile.mkdtemp("-recordings")]
        self.stderr_file = self.stderr_path.open("w")
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=self.stderr_file, text=True, cwd=ROOT, env=self.env
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
                    self.url = f"http://{self.host}:{ready['http']}"
                    return
        self.stop()
        raise RuntimeError(f"the server was not ready within {SERVER_START_TIMEOUT:g} s")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def sample(self) -> tuple[float, float, float | None]:
        """(monotonic time, CPU seconds, forwarded packets by the server's own count)."""
        forwarded = None
        with contextlib.suppress(OSError, ValueError):
            forwarded = read_forwarded(self.url)
        return time.monotonic(), process_cpu(self.pid), forwarded

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


async def run_ours(scenario: Any, say: Any, run: int = 0, workers: str = "1", fastpath: bool = True) -> Row:
    """One run of `scenario` (bench.run.Scenario) against a fresh server: `workers` as `--workers` takes
    it (with several, the call is split over them: half its seats per worker, as bench.heavy does), and
    `fastpath` False for the pure-Python per-packet path (huddle.rtc.fastpath)."""
    if not fastpath:
        sfu = "huddle-py"
    elif workers == "1":
        sfu = "huddle"
    else:
        sfu = f"huddle/{os.cpu_count() if workers == 'auto' else workers}w"
    row = Row(sfu, scenario.name, scenario.participants, scenario.publishers, run=run)
    env = None if fastpath else {"HUDDLE_FASTPATH": "0"}
    per_node = None if workers == "1" else -(-scenario.participants // 2)
    server = HuddleServer(max(200, scenario.participants), bench_address(), workers, env, per_node)
    row.address = server.host
    samples: dict[str, tuple[float, float, float | None]] = {}
    try:
        await asyncio.to_thread(server.start)

        def progress(text: str) -> None:
            say(f"  {scenario.name}: {text}")
            # The loadtest says "measuring" just before its window opens and "leaving" just after it closes
            # (and its totals are gathered): sample there.
            with contextlib.suppress(OSError):
                if text.startswith("measuring"):
                    samples["before"] = server.sample()
                elif text.startswith("leaving") and "before" in samples:
                    samples["after"] = server.sample()
                    samples["rss"] = (0.0, float(process_rss(server.pid)), None)

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
            simulcast=scenario.simulcast,
            audio=scenario.audio,
            decrypt_every=scenario.decrypt_every,
        )
        try:
            result = await run_loadtest(config, progress=progress)
        except TimeoutError:
            row.notes.append("the loadtest overran its deadline")
        except OSError as exc:
            row.notes.append(f"loadtest: {exc}")
        else:
            row.take_loadtest(result)
            row.srtp_profiles = list(result.srtp_profiles)
            if "after" in samples:
                (at0, cpu0, out0), (at1, cpu1, out1) = samples["before"], samples["after"]
                row.fill(
                    window=at1 - at0,
                    cpu=cpu1 - cpu0,
                    rss=int(samples["rss"][1]),
                    sent=result.packets_sent,
                    forwarded=result.packets_received + result.lost,
                    server_forwarded=None if out0 is None or out1 is None else out1 - out0,
                )
    except RuntimeError as exc:
        row.notes.append(str(exc))
    finally:
        await asyncio.to_thread(server.stop)
    return row
