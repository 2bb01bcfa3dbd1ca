"""Segments of one recording in the store: numbering, and what a later segment's manifest says about the gap.

A recording that outlives its node goes on elsewhere as a new segment with a key of its own,
`<recording id>.<suffix>`; the first segment's key is the recording id itself. In the store, the first
segment's files lie in `<room>/<recording id>/`, segment n > 1 in `<room>/<recording id>/segment-<n>/`.
A later segment's manifest names its key (`segment_key`), the recording it continues and the gap before it.

Pure functions over keys and manifests (no I/O), so that the node's recording manager and the Kafka record
consumer number segments and describe gaps the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

__all__ = ["MANIFEST", "folder", "gap", "mark_continued", "next_segment", "split_key", "stored_segments"]

MANIFEST = "manifest.json"
_SEGMENT = re.compile(r"segment-([0-9]{1,6})/")


def split_key(key: str) -> tuple[str, bool]:
    """(recording id, continued) of a segment key: `<id>` is the first segment, `<id>.<suffix>` a later
    one."""
    recording_id, dot, _ = key.partition(".")
    return recording_id, bool(dot)


def folder(number: int) -> str:
    """Where segment `number`'s files lie within the recording's folder ('' or 'segment-<n>/')."""
    return "" if number == 1 else f"segment-{number}/"


def stored_segments(prefix: str, keys: Iterable[str]) -> tuple[set[int], dict[int, str]]:
    """From the keys stored under a recording's prefix (`<room>/<id>/`): the segment numbers that have any
    file, and those that have a manifest (number → its key)."""
    numbers: set[int] = set()
    manifests: dict[int, str] = {}
    for key in keys:
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        found = _SEGMENT.match(name)
        number = int(found.group(1)) if found is not None else 1
        numbers.add(number)
        if name == folder(number) + MANIFEST:
            manifests[number] = key
    return numbers, manifests


def next_segment(used: Iterable[int]) -> int:
    """The number of a new later segment: after every number in `used` and after the first segment, which
    was made even when none of its files reached the store."""
    return 1 + max({1, *used})


def gap(manifest: dict[str, Any], before: dict[str, Any] | None, after_segment: int) -> dict[str, Any]:
    """How long nothing was recorded before the segment of `manifest`: from the end of the previous
    segment's last frame (`before`, its manifest, None when it is not in the store) to this one's first."""
    tracks = manifest.get("tracks") or []
    first = manifest["started_at"] + min((t["start_offset"] for t in tracks), default=0.0)
    result: dict[str, Any] = {"after_segment": after_segment, "from": None, "to": first, "duration": None}
    if before is None:
        result["missing"] = "the previous segment's manifest is not in the store"
        return result
    ends = [t["start_offset"] + t["duration"] for t in before.get("tracks") or []]
    last = before["started_at"] + max(ends, default=before["duration"])
    result.update({"from": last, "duration": round(first - last, 3)})
    return result


def mark_continued(
    manifest: dict[str, Any],
    *,
    recording_id: str,
    segment: int,
    segment_key: str,
    before: dict[str, Any] | None,
) -> dict[str, Any]:
    """A later segment's manifest: `manifest` (as the track writer wrote it, under the segment's key) with the
    recording it continues, its number and key, when the recording started (from the previous segment's
    manifest, when there is one) and the gap before it."""
    started = None
    if before is not None:
        started = before.get("recording_started_at", before.get("started_at"))
    return {
        **manifest,
        "recording_id": recording_id,
        "segment": segment,
        "segment_key": segment_key,
        "recording_started_at": started,
        "gap": gap(manifest, before, segment - 1),
    }
