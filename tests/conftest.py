"""`--part media` or `--part services`: one of the two halves that `make test` runs side by side.

Most of the suite's time is waiting, not computing (a clean run took 1,005 s of wall time for about 390 s
of CPU): servers killed and restarted, outages of 10 s, timeouts that must expire. scripts/test-parts runs
the two halves at once, each in a network namespace of its own, so that their ports, addresses and packet
filters cannot meet. `media` holds what carries real media through browsers and aiortc (tests/e2e,
tests/interop) and the unit tests; `services` holds the rest.

The two cores are shared, so a lock (a file both halves flock) keeps the tests apart that must not meet:
- media at full rate (browsers, aiortc, synthetic participants), whose frame counts, freezes and speaker
  changes fail for want of CPU, not for a bug, when anything busy runs beside them (seen beside a browser
  call: a synthetic stream froze and a speaker change took over 5 s; a browser took over 30 s to recover
  from a thin downlink beside the other half's unlocked tests): the lock alone (`MEDIA`);
- busy but not timed (unit tests, encoding and Kafka consumers): the lock shared (`BUSY`), so they run beside
  each other but never beside media;
- everything else mostly waits (restarts, outages, timeouts): no lock, beside anything.
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
MEDIA = (
    "e2e/",
    "interop/",
    "loadtest/",
    "bench/",
    "cluster/test_heavy_calls.py",
    "cluster/test_workers.py",
    "recording/test_kafka_recording.py",
    "recording/test_recording_pipeline.py",
    "recording/test_screen_recording.py",
)
BUSY = (
    "unit/",
    "recording/test_composite.py",
    "recording/test_record_consumer.py",
    "recording/test_store.py",
)
WAITING = ("unit/test_media_port.py",)  # under unit/, yet it waits out a 10-s timeout
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


def lock_mode(path: str) -> int | None:
    """How a test at `path` (relative to tests/) takes the lock: fcntl.LOCK_EX, LOCK_SH, or None."""
    if path.startswith(WAITING):
        return None
    if path.startswith(MEDIA):
        return fcntl.LOCK_EX
    return fcntl.LOCK_SH if path.startswith(BUSY) else None


@pytest.fixture(autouse=True)
def cores_shared_fairly(request: pytest.FixtureRequest) -> Iterator[None]:
    """The lock, held for the whole test (its function-scoped fixtures too) while the halves run side by
    side."""
    mode = lock_mode(Path(request.node.path).relative_to(TESTS).as_posix())
    if request.config.getoption("--part") is None or mode is None:
        yield
        return
    MEDIA_LOCK.parent.mkdir(exist_ok=True)
    with MEDIA_LOCK.open("a") as lock:
        fcntl.flock(lock, mode)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
