"""The benchmark's harnesses, checked end to end; they run only when asked for: `pytest -m janus`."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "janus: needs the Debian package janus and scripts/in-netns; runs only with `-m janus`"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Janus is the benchmark's reference SFU, not part of `make test`: without an `-m` that names it, its
    # tests are left out of the run (deselected, not skipped: nothing here is a test that could not run).
    if "janus" in (config.option.markexpr or ""):
        return
    kept = [item for item in items if item.get_closest_marker("janus") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept
