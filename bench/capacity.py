"""Capacity, not only cost: the largest call a server carries before anyone's video suffers.

A size N passes when every participant connected, every viewer got every video its layout shows at the
layer it asked for, nothing was lost, and the p99 forwarding delay stayed under 50 ms. `largest_passing` finds
the largest N that passes by a bounded search (doubling from a start, then halving the gap), with the
probe (one loadtest at size N against a fresh server) given by the caller, so that the search itself is
tested without any server (tests/bench/test_capacity.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bench.table import Row

__all__ = ["MAX_P99_MS", "Capacity", "largest_passing", "passes"]

MAX_P99_MS = 50.0


def passes(row: Row) -> bool:
    return (
        row.layers_ok
        and row.loss_percent == 0
        and row.delay_p99_ms is not None
        and row.delay_p99_ms < MAX_P99_MS
    )


def why_not(row: Row) -> str:
    """The first reason a probe failed, in words."""
    if not row.complete:
        return "not everyone connected"
    if not row.layers_ok:
        return f"videos at their layer {row.videos_at_layer}/{row.videos_expected}"
    if row.loss_percent != 0:
        return f"loss {row.loss_percent}%"
    return f"p99 {row.delay_p99_ms} ms"


@dataclass
class Capacity:
    largest: int  # 0: even the smallest size probed failed
    probes: list[tuple[int, bool, str]] = field(default_factory=list)  # (N, passed, why not)
    rows: list[Row] = field(default_factory=list)
    bounded: bool = False  # the search stopped at `limit` or at its probe budget, not at a failure


async def largest_passing(
    probe: Callable[[int], Awaitable[Row]],
    *,
    start: int,
    limit: int,
    max_probes: int = 7,
    resolution: float = 0.1,
) -> Capacity:
    """Double from `start` while it passes (up to `limit`), then bisect the gap between the largest pass
    and the smallest failure until it is within `resolution` of the pass; halve from `start` when `start`
    fails. At most `max_probes` probes."""
    found = Capacity(0)
    good, bad = 0, limit + 1
    n = min(start, limit)
    while len(found.probes) < max_probes and n >= 1:
        row = await probe(n)
        ok = passes(row)
        found.rows.append(row)
        found.probes.append((n, ok, "" if ok else why_not(row)))
        if ok:
            good = n
        else:
            bad = n
        if good == 0:
            n //= 2  # the start already fails: look below it
            continue
        if bad > limit:
            if good >= limit:
                break
            n = min(good * 2, limit)
            continue
        if bad - good <= max(1, int(good * resolution)):
            break
        n = (good + bad) // 2
    found.largest = good
    found.bounded = bad > limit or (
        len(found.probes) >= max_probes and bad - good > max(1, good * resolution)
    )
    return found
