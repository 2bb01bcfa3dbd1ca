"""`--part services`, `--part checks` or `--part media`: the parts that scripts/test-parts (`make test`) runs.

Most of the suite's time is waiting, not computing (a clean serial run took 971 s of wall time for about 400 s
of CPU): servers killed and restarted, outages of 10 s, timeouts that must expire. `services` (ZooKeeper,
Kafka, recording, the nodes of a cluster) and `checks` (unit and signaling tests) run side by side, each in a
network namespace of its own so that their ports, addresses and packet filters cannot meet. `media` holds
what carries media at full rate (browsers, aiortc, synthetic calls, the benchmark) and runs alone afterwards:
on 2 cores, with another half of the suite beside them, these failed a different timing assertion in each of
three clean runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).parent
# Folders, or files that go elsewhere than their folder (the longest match wins).
PARTS = {
    "media": ("e2e", "interop", "loadtest", "bench", "cluster/test_heavy_calls.py"),
    "services": ("cluster", "recording"),
    # With the cluster's ZooKeeper tests, so that both parts of the first phase take about as long.
    "checks": ("unit", "signaling", "cluster/test_nodes.py"),
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--part",
        choices=sorted(PARTS),
        help="run one part of the suite (scripts/test-parts runs them all)",
    )


def part_of(path: Path) -> str | None:
    try:
        relative = path.relative_to(TESTS).as_posix()
    except ValueError:
        return None
    matches = [
        (len(prefix), name)
        for name, prefixes in PARTS.items()
        for prefix in prefixes
        if relative == prefix or relative.startswith(prefix + "/")
    ]
    return max(matches)[1] if matches else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    part = config.getoption("--part")
    if part is None:
        return
    unplaced = sorted({str(item.path) for item in items if part_of(item.path) is None})
    if unplaced:
        # A new folder of tests must be given a part, or none would run it.
        raise pytest.UsageError(f"tests in no part of tests/conftest.py's PARTS: {', '.join(unplaced)}")
    kept = [item for item in items if part_of(item.path) == part]
    deselected = [item for item in items if part_of(item.path) != part]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
