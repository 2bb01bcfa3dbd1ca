"""The recordings listing says whose each track file is, from the manifest of the file's segment, and still
lists every file when a manifest is missing, broken or not JSON at all."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from huddle.recording.manager import Recordings
from huddle.recording.store import LocalStore

RID = "20261205T120000Z-abcdef"


def stub_calls() -> Any:
    return SimpleNamespace(room_closed=[], recording_restored=[], recording_elsewhere=[], chat_posted=[])


def put(root: Path, name: str, data: bytes) -> None:
    path = root / "standup" / RID / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def manifest(*tracks: tuple[str, str, str, str]) -> bytes:
    entries = [
        {"file": f, "participant_id": p, "name": n, "kind": k, "source": "camera"} for f, p, n, k in tracks
    ]
    return json.dumps({"tracks": entries}).encode()


async def test_each_track_file_is_listed_with_its_person(tmp_path: Path) -> None:
    store = tmp_path / "store"
    put(store, "speaker-view.mp4", b"mp4")
    put(store, "zoe-p_00000001-video-1.webm", b"a")
    put(store, "p_00000002-video-1.webm", b"b")
    put(
        store,
        "manifest.json",
        manifest(
            ("zoe-p_00000001-video-1.webm", "p_00000001", "Zoë", "video"),
            ("p_00000002-video-1.webm", "p_00000002", "🎉", "video"),
        ),
    )
    # A later segment whose manifest is not there yet, and one whose manifest is not JSON.
    put(store, "segment-2/zoe-p_00000001-video-1.webm", b"c")
    put(store, "segment-3/zoe-p_00000001-video-1.webm", b"d")
    put(store, "segment-3/manifest.json", b"{not json")
    recordings = Recordings(stub_calls(), root=tmp_path / "node", store=LocalStore(store), max_recordings=1)

    for _ in range(2):  # the second time from the cache: the same answer
        [listed] = await recordings.list("standup")
        files = {f["name"]: f for f in listed["files"]}
        assert len(files) == 7
        assert files["zoe-p_00000001-video-1.webm"] | {"url": ""} == {
            "name": "zoe-p_00000001-video-1.webm",
            "size": 1,
            "url": "",
            "participant_id": "p_00000001",
            "participant_name": "Zoë",
            "kind": "video",
            "source": "camera",
        }
        assert files["p_00000002-video-1.webm"]["participant_name"] == "🎉"
        for name in (
            "speaker-view.mp4",
            "segment-2/zoe-p_00000001-video-1.webm",
            "segment-3/zoe-p_00000001-video-1.webm",
        ):
            assert "participant_name" not in files[name], name
