"""The arithmetic of the benchmark's table (bench.table): rates of one run, medians and ranges over runs,
and when a ratio may be called a difference."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bench.table import Row, Spread, compare, format_markdown, format_text, summarise


def run(sfu: str, us: float, *, complete: bool = True, layers: tuple[int, int] = (9, 9)) -> Row:
    row = Row(
        sfu, "call-10", 10, 10, complete=complete, us_per_forwarded=us, forwarded_per_cpu_second=1e6 / us
    )
    row.videos_at_layer, row.videos_expected = layers
    return row


def test_one_window_gives_rates_per_second_and_cpu_per_forwarded_packet() -> None:
    row = Row("huddle", "call-10", 10, 10)
    row.fill(window=10.0, cpu=2.5, rss=100 * 2**20, sent=10_000, forwarded=50_000, server_forwarded=50_100)
    assert (row.pps_in, row.pps_out, row.server_pps_out) == (1000, 5000, 5010)
    assert row.cpu_percent == 25.0
    assert row.us_per_forwarded == 50.0  # 2.5 s / 50,000 packets
    assert row.forwarded_per_cpu_second == 20_000
    assert row.rss_mb == 100.0


def test_a_window_with_nothing_forwarded_has_no_cost_per_packet_rather_than_a_division_by_zero() -> None:
    row = Row("janus", "call-10", 10, 10)
    row.fill(window=5.0, cpu=0.0, rss=0, sent=0, forwarded=0)
    assert row.us_per_forwarded is None and row.forwarded_per_cpu_second is None


def test_layers_are_ok_only_when_every_expected_video_came_at_its_layer() -> None:
    assert run("huddle", 5, layers=(9, 9)).layers_ok
    assert not run("huddle", 5, layers=(8, 9)).layers_ok
    assert not run("huddle", 5, layers=(0, 0)).layers_ok  # nothing expected is no proof
    assert not run("huddle", 5, complete=False).layers_ok


def test_the_loadtests_verdict_is_taken_with_the_generators_cpu() -> None:
    result = SimpleNamespace(
        complete=False, loss_percent=0.5, delay_p50_ms=1.0, delay_p99_ms=9.0, videos_at_layer=3,
        videos_expected=4, window_seconds=10.0, cpu_seconds=7.5, connected=9, participants=10,
        errors=["p9: no answer"], to_dict=lambda: {"subscribers": [1, 2], "loss_percent": 0.5},
    )  # fmt: skip
    row = Row("huddle", "call-10", 10, 10)
    row.take_loadtest(result)
    assert row.generator_cpu_percent == 75.0
    assert row.notes == ["only 9/10 connected", "p9: no answer"]
    assert "subscribers" not in row.loadtest


def test_a_spread_is_the_median_and_the_range() -> None:
    spread = Spread.of([3.0, 1.0, None, 2.0])
    assert (spread.median, spread.low, spread.high, spread.runs) == (2.0, 1.0, 3.0, 3)
    assert spread.text(".1f") == "2.0 (1.0-3.0)"
    assert Spread.of([None]).text(".1f") == "-"


def test_incomplete_runs_count_as_runs_but_not_as_measurements() -> None:
    summary = summarise([run("huddle", 4.0), run("huddle", 99.0, complete=False), run("huddle", 6.0)])
    assert summary.runs == 3 and summary.complete_runs == 2
    assert summary.figures["us_per_forwarded"].median == 5.0
    assert summary.layers_ok == "2/3"


@pytest.mark.parametrize(
    ("ours", "theirs", "ratio", "difference"),
    [
        ((4.0, 5.0, 6.0), (9.0, 10.0, 11.0), 0.5, True),  # ranges apart
        ((4.0, 5.0, 9.5), (9.0, 10.0, 11.0), 0.5, False),  # the same ratio of medians, overlapping ranges
        ((10.0, 10.0, 10.0), (10.0, 10.0, 10.0), 1.0, False),
    ],
)
def test_a_ratio_is_a_difference_only_when_the_ranges_do_not_overlap(
    ours: tuple[float, ...], theirs: tuple[float, ...], ratio: float, difference: bool
) -> None:
    verdict = compare(
        summarise([run("huddle", v) for v in ours]), summarise([run("janus", v) for v in theirs])
    )
    assert verdict.ratio == pytest.approx(ratio)
    assert verdict.difference is difference
    assert verdict.text().endswith("(difference)" if difference else "(within noise)")


def test_fewer_than_three_runs_give_a_ratio_but_no_verdict() -> None:
    verdict = compare(summarise([run("huddle", 5.0)] * 2), summarise([run("janus", 10.0)] * 3))
    assert verdict.ratio == 0.5 and not verdict.difference
    assert verdict.text() == "0.50 (under 3 runs: no verdict)"


def test_the_tables_show_each_server_once_with_the_verdict_under_its_scenario() -> None:
    ours = summarise([run("huddle", v) for v in (4.0, 5.0, 6.0)])
    theirs = summarise([run("janus", v) for v in (9.0, 10.0, 11.0)])
    verdicts = {"call-10": compare(ours, theirs)}
    text = format_text([ours, theirs], verdicts).splitlines()
    assert text[2].split()[:2] == ["huddle", "call-10"] and "5.00 (4.00-6.00)" in text[2]
    assert text[3].split()[:2] == ["janus", "call-10"]
    assert text[4].strip() == "ours/Janus CPU per forwarded packet: 0.50 (difference)"
    markdown = format_markdown([ours, theirs], verdicts).splitlines()
    assert len(markdown) == 4 and markdown[2].endswith("| 0.50 (difference) |")
