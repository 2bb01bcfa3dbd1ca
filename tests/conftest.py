"""`--part media` or `--part services`: one of the two halves that `make test` runs side by side.

Most of the suite's time is waiting, not computing (a clean run took 1,005 s of wall time for about 390 s
of CPU): servers killed and restarted, outages of 10 s, timeouts that must expire. scripts/test-parts runs
the two halves at once, each in a network namespace of its own, so that their ports, addresses and packet
filters cannot meet. `media` holds what carries real media through browsers and aiortc (tests/e2e,
tests/interop) and the unit tests; `services` holds the rest. Keeping every browser in one half means one
Chromium call at a time, as before: two would compete for the two cores and their frame counts with them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).parent
PARTS = {
    "media": ("e2e", "interop", "unit"),
    "services": ("bench", "cluster", "loadtest", "recording", "signaling"),
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--part",
        choices=sorted(PARTS),
        help="run one half of the suite (scripts/test-parts runs both side by side)",
    )


def part_of(path: Path) -> str | None:
    try:
        top = path.relative_to(TESTS).parts[0]
    except (ValueError, IndexError):
        return None
    return next((name for name, folders in PARTS.items() if top in folders), None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    part = config.getoption("--part")
    if part is None:
        return
    unplaced = sorted({str(item.path) for item in items if part_of(item.path) is None})
    if unplaced:
        # A new folder of tests must be given a half, or neither would run it.
        raise pytest.UsageError(f"tests in no part of tests/conftest.py's PARTS: {', '.join(unplaced)}")
    kept = [item for item in items if part_of(item.path) == part]
    deselected = [item for item in items if part_of(item.path) != part]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
