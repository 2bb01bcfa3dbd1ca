"""ffprobe (Debian `ffmpeg`) on a recording: what a player will make of the file."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any


def probe(path: Path, count_frames: bool = True, timeout: float = 120) -> dict[str, Any]:
    """Streams and format of `path` as JSON; with `count_frames`, each stream's `nb_read_frames` (decoded)."""
    command = ["ffprobe", "-v", "error", "-show_streams", "-show_format", "-of", "json"]
    if count_frames:
        command.append("-count_frames")
    done = subprocess.run([*command, str(path)], capture_output=True, text=True, timeout=timeout, check=True)
    return json.loads(done.stdout)
