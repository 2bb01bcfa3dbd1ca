"""The capacity search (bench.capacity) against a fake server whose limit is known: it finds it within its
resolution, in a bounded number of probes, and says when it stopped at its bound rather than at a failure."""

from __future__ import annotations

import asyncio

import pytest

from bench.capacity import largest_passing, passes
from bench.table import Row


def server(limit: int, probed: list[int]):
    async def probe(n: int) -> Row:
        probed.append(n)
        row = Row("fake", f"call-{n}", n, 10, complete=True, loss_percent=0.0, delay_p99_ms=5.0)
        row.videos_at_layer = row.videos_expected = n
        if n > limit:
            row.delay_p99_ms = 80.0  # overloaded: the queue shows first in the delay
        return row

    return probe


@pytest.mark.parametrize("limit", [1, 37, 55, 100, 163])
def test_the_largest_passing_size_is_found_within_the_resolution(limit: int) -> None:
    probed: list[int] = []
    found = asyncio.run(largest_passing(server(limit, probed), start=40, limit=200, max_probes=12))
    assert found.largest <= limit
    assert limit - found.largest <= max(1, limit // 10)
    assert len(probed) <= 12 and not found.bounded


def test_the_search_is_bounded_in_probes_and_says_so() -> None:
    probed: list[int] = []
    found = asyncio.run(largest_passing(server(113, probed), start=40, limit=200, max_probes=3))
    assert probed == [40, 80, 160]
    assert found.largest == 80 and found.bounded


def test_a_server_that_carries_the_limit_is_reported_at_the_limit_as_bounded() -> None:
    probed: list[int] = []
    found = asyncio.run(largest_passing(server(1000, probed), start=40, limit=200))
    assert probed == [40, 80, 160, 200]
    assert found.largest == 200 and found.bounded


def test_what_fails_a_probe() -> None:
    good = Row("x", "c", 5, 1, complete=True, loss_percent=0.0, delay_p99_ms=10.0)
    good.videos_at_layer = good.videos_expected = 4
    assert passes(good)
    for change in (
        {"loss_percent": 0.01},
        {"delay_p99_ms": 50.0},
        {"videos_at_layer": 3},
        {"complete": False},
    ):
        row = Row(**{**good.__dict__, **change})
        assert not passes(row), change
