"""`--part media` or `--part services`: one of the two halves that `make test` runs side by side.

Most of the suite's time is waiting, not computing (a clean run took 1,005 s of wall time for about 390 s
of CPU): servers killed and restarted, outages of 10 s, timeouts that must expire. scripts/test-parts runs
the two halves at once, each in a network namespace of its own, so that their ports, addresses and packet
filters cannot meet. `media` holds what carries real media through browsers and aiortc (tests/e2e,
tests/interop) and the unit tests; `services` holds the rest.

Tests that carry media at full rate (browsers, aiortc, synthetic participants) take one lock shared by both
halves, so that only one of them runs at a time, as in a serial run: two at once overload the two cores, and
then the frame counts, freezes and speaker changes they assert on fail for want of CPU, not for a bug (seen:
a synthetic stream froze and a speaker change took over 5 s while a three-page browser call ran beside them).
What waits (restarts, outages, timeouts) runs beside them.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
PARTS = {
    "media": ("e2e", "interop", "unit"),
    "services": ("bench", "cluster", "loadtest", "recording", "signaling"),
}
FULL_RATE_MEDIA = (
    "e2e/",
    "interop/",
    "loadtest/",
    "bench/",
    "cluster/test_heavy_calls.py",
    "cluster/test_workers.py",
)
MEDIA_LOCK = TESTS.parent / ".test-logs" / "media.lock"


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


@pytest.fixture(autouse=True)
def one_media_test_at_a_time(request: pytest.FixtureRequest) -> Iterator[None]:
    """Held for the whole test (its function-scoped fixtures too) when its file carries media at full rate
    and the two halves run side by side."""
    path = Path(request.node.path).relative_to(TESTS).as_posix()
    if request.config.getoption("--part") is None or not path.startswith(FULL_RATE_MEDIA):
        yield
        return
    MEDIA_LOCK.parent.mkdir(exist_ok=True)
    with MEDIA_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
