"""The arithmetic of `make bench`'s SFU table: one Row per run, summaries over repeated runs, and the verdict
on ours against Janus (pure functions, tested in tests/bench/test_table.py).

A ratio of medians alone invites a reader to see a difference in noise, so every comparison carries the
spread of both sides: it is called a difference only when the ranges (min..max over the runs) do not
overlap, and "within noise" otherwise.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Row:
    """What one run of one scenario against one server measured."""

    sfu: str
    scenario: str
    participants: int
    publishers: int
    run: int = 0
    complete: bool = False
    window_seconds: float = 0.0
    pps_in: float = 0.0  # packets the publishers sent (the generator's count, for both servers)
    pps_out: float = 0.0  # packets the subscribers received + lost (the generator's count, for both)
    server_pps_out: float | None = None  # the server's own count, where it has one (ours: /metrics)
    cpu_seconds: float = 0.0
    cpu_percent: float = 0.0  # of one core
    rss_mb: float = 0.0
    us_per_forwarded: float | None = None
    forwarded_per_cpu_second: float | None = None
    loss_percent: float | None = None
    delay_p50_ms: float | None = None
    delay_p99_ms: float | None = None
    videos_at_layer: int = 0
    videos_expected: int = 0
    srtp_profiles: list[str] = field(default_factory=list)
    address: str = ""
    generator_cpu_percent: float | None = None
    notes: list[str] = field(default_factory=list)
    loadtest: dict[str, Any] = field(default_factory=dict)

    @property
    def layers_ok(self) -> bool:
        """Every video the layout shows arrived at the layer asked for (and there were some)."""
        return self.complete and self.videos_expected > 0 and self.videos_at_layer == self.videos_expected

    def take_loadtest(self, result: Any) -> None:
        """What the subscribers saw (a huddle.loadtest LoadtestResult): completeness, loss, delay, layers,
        and the generator's own CPU, which shares the machine with the server."""
        self.complete = result.complete
        self.loss_percent = result.loss_percent
        self.delay_p50_ms = result.delay_p50_ms
        self.delay_p99_ms = result.delay_p99_ms
        self.videos_at_layer = result.videos_at_layer
        self.videos_expected = result.videos_expected
        if result.window_seconds:
            self.generator_cpu_percent = round(100 * result.cpu_seconds / result.window_seconds, 1)
        data = result.to_dict()
        data.pop("subscribers", None)  # per-subscriber detail: huge at 100 people, the totals say enough
        self.loadtest = data
        if not result.complete:
            self.notes.append(f"only {result.connected}/{result.participants} connected")
        self.notes.extend(e for e in result.errors[:3] if e not in self.notes)

    def fill(
        self,
        *,
        window: float,
        cpu: float,
        rss: int,
        sent: int,
        forwarded: int,
        server_forwarded: float | None = None,
    ) -> None:
        """The rates of a measured window: `cpu` server CPU seconds, `sent` and `forwarded` packets as the
        generator counted them (forwarded = received + lost at the subscribers)."""
        window = max(window, 1e-6)
        self.window_seconds = round(window, 2)
        self.pps_in = round(sent / window)
        self.pps_out = round(forwarded / window)
        if server_forwarded is not None:
            self.server_pps_out = round(server_forwarded / window)
        self.cpu_seconds = round(cpu, 2)
        self.cpu_percent = round(100 * cpu / window, 1)
        self.rss_mb = round(rss / 2**20, 1)
        self.us_per_forwarded = round(1e6 * cpu / forwarded, 2) if forwarded > 0 else None
        self.forwarded_per_cpu_second = round(forwarded / cpu) if cpu > 0 else None


@dataclass(frozen=True)
class Spread:
    """Median and range of one figure over repeated runs (None where no run gave it)."""

    median: float | None
    low: float | None
    high: float | None
    runs: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Spread:
        known = [v for v in values if v is not None]
        if not known:
            return cls(None, None, None, 0)
        return cls(statistics.median(known), min(known), max(known), len(known))

    def overlaps(self, other: Spread) -> bool:
        if None in (self.low, self.high, other.low, other.high):
            return True
        return not (self.high < other.low or other.high < self.low)  # type: ignore[operator]

    def text(self, spec: str) -> str:
        if self.median is None:
            return "-"
        if self.runs == 1 or self.low == self.high:
            return format(self.median, spec)
        return f"{format(self.median, spec)} ({format(self.low, spec)}-{format(self.high, spec)})"


FIGURES = ("pps_in", "pps_out", "cpu_percent", "rss_mb", "us_per_forwarded", "forwarded_per_cpu_second",
           "loss_percent", "delay_p50_ms", "delay_p99_ms")  # fmt: skip


@dataclass
class Summary:
    """One server on one scenario, over its runs."""

    sfu: str
    scenario: str
    participants: int
    publishers: int
    runs: int
    complete_runs: int
    layers_ok_runs: int
    figures: dict[str, Spread]
    srtp_profiles: list[str]
    notes: list[str]

    @property
    def layers_ok(self) -> str:
        return f"{self.layers_ok_runs}/{self.runs}"


def summarise(rows: Sequence[Row]) -> Summary:
    """The runs of one server on one scenario (figures from the complete runs only: an incomplete one is a
    failure to report, not a measurement)."""
    first = rows[0]
    complete = [r for r in rows if r.complete]
    notes: list[str] = []
    for row in rows:
        notes.extend(n for n in row.notes if n not in notes)
    return Summary(
        sfu=first.sfu,
        scenario=first.scenario,
        participants=first.participants,
        publishers=first.publishers,
        runs=len(rows),
        complete_runs=len(complete),
        layers_ok_runs=sum(1 for r in rows if r.layers_ok),
        figures={name: Spread.of(getattr(r, name) for r in complete) for name in FIGURES},
        srtp_profiles=sorted({p for r in rows for p in r.srtp_profiles}),
        notes=notes,
    )


@dataclass(frozen=True)
class Verdict:
    """Ours against Janus on one figure: the ratio of medians, and whether the ranges say it is real."""

    figure: str
    ratio: float | None
    difference: bool
    enough_runs: bool = True

    def text(self) -> str:
        if self.ratio is None:
            return "-"
        if not self.enough_runs:
            return f"{self.ratio:.2f} (under {MIN_RUNS} runs: no verdict)"
        return f"{self.ratio:.2f} ({'difference' if self.difference else 'within noise'})"


# A range over fewer runs says little about the spread: one run's "range" is a point, which never overlaps.
MIN_RUNS = 3


def compare(ours: Summary, theirs: Summary, figure: str = "us_per_forwarded") -> Verdict:
    a, b = ours.figures[figure], theirs.figures[figure]
    if a.median is None or b.median is None or b.median == 0:
        return Verdict(figure, None, False)
    enough = min(a.runs, b.runs) >= MIN_RUNS
    return Verdict(figure, a.median / b.median, enough and not a.overlaps(b), enough)


# (title, Summary attribute or figure, format of a figure)
COLUMNS = (
    ("sfu", "sfu", ""),
    ("scenario", "scenario", ""),
    ("people", "participants", ""),
    ("pubs", "publishers", ""),
    ("runs", "runs", ""),
    ("pkt/s in", "pps_in", ",.0f"),
    ("pkt/s out", "pps_out", ",.0f"),
    ("CPU %", "cpu_percent", ".1f"),
    ("RSS MB", "rss_mb", ".0f"),
    ("us/fwd", "us_per_forwarded", ".2f"),
    ("fwd/CPU s", "forwarded_per_cpu_second", ",.0f"),
    ("loss %", "loss_percent", ".3f"),
    ("p99 ms", "delay_p99_ms", ".1f"),
    ("layers ok", "layers_ok", ""),
)


def _cells(summary: Summary) -> list[str]:
    cells = []
    for _title, name, spec in COLUMNS:
        if name in summary.figures:
            cells.append(summary.figures[name].text(spec))
        else:
            cells.append(str(getattr(summary, name)))
    return cells


def format_text(summaries: Sequence[Summary], verdicts: dict[str, Verdict]) -> str:
    """A fixed-width table: each figure as `median (min-max)` over the runs; under each scenario ours/Janus
    CPU per forwarded packet with its verdict."""
    body = [_cells(s) for s in summaries]
    titles = [c[0] for c in COLUMNS]
    widths = [max(len(t), *(len(r[i]) for r in body)) if body else len(t) for i, t in enumerate(titles)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    lines = [line(titles), "-" * len(line(titles))]
    for i, (summary, cells) in enumerate(zip(summaries, body, strict=True)):
        lines.append(line(cells))
        last_of_scenario = i + 1 == len(summaries) or summaries[i + 1].scenario != summary.scenario
        if last_of_scenario and summary.scenario in verdicts:
            lines.append(f"        ours/Janus CPU per forwarded packet: {verdicts[summary.scenario].text()}")
    return "\n".join(lines)


def format_markdown(summaries: Sequence[Summary], verdicts: dict[str, Verdict]) -> str:
    titles = [c[0] for c in COLUMNS] + ["ours/Janus us/fwd"]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for summary in summaries:
        verdict = verdicts.get(summary.scenario) if summary.sfu == "huddle" else None
        cells = [*_cells(summary), verdict.text() if verdict else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
