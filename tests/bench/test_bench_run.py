"""`make bench` on a tiny run, end to end: our SFU and a real Janus, the same synthetic participants, one
run each of a small adaptive call and a small like-for-like call.

What a sceptic checks first is checked here: both servers on the same address, both servers' viewers got
every video at the layer asked for (Janus's `substream`/`temporal` and `rid_order` included), the SRTP
profile each negotiated is on record, and in the like-for-like scenario both forwarded the same packets.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.ours import bench_address

ROOT = Path(__file__).resolve().parents[2]
TINY_RUN_TIMEOUT = 300


def test_a_tiny_run_measures_both_servers_on_the_same_packets_and_layers(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "bench.run", "--only", "quick-10", "same-10", "--runs", "1"]
    command += ["--duration", "2", "--results", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TINY_RUN_TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    document = json.loads(next(tmp_path.glob("*.json")).read_text())
    rows = {(r["sfu"], r["scenario"]): r for r in document["rows"]}
    assert set(rows) == {(s, c) for s in ("huddle", "janus") for c in ("quick-10", "same-10")}
    for key, row in rows.items():
        assert row["complete"], (key, row["notes"])
        assert row["videos_expected"] > 0, key
        assert row["videos_at_layer"] == row["videos_expected"], (key, row["notes"])
        assert row["loss_percent"] == 0, key
        assert row["srtp_profiles"], key
        assert row["address"] == bench_address() == "10.77.0.1", key
        assert row["us_per_forwarded"] > 0 and row["pps_out"] > 0, key
    # 4 publishers, each seen by the 9 others, one 640x360 video each, no audio: the same packets.
    ours, janus = rows["huddle", "same-10"], rows["janus", "same-10"]
    assert ours["videos_expected"] == janus["videos_expected"] == 4 * 9
    assert abs(ours["pps_out"] - janus["pps_out"]) <= 0.1 * janus["pps_out"]
    assert ours["loadtest"]["audio_expected"] == janus["loadtest"]["audio_expected"] == 0
    markdown = next(tmp_path.glob("*.md")).read_text()
    assert "| huddle | same-10 |" in markdown and "| janus | same-10 |" in markdown
    assert "Machine:" in markdown and "ours/Janus" in done.stdout
