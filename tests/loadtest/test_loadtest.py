"""The load generator at small scale, through our SFU: 3 synthetic participants, speaker layout.

Runs inside the tests' network namespace (scripts/in-netns); the synthetic participants use plain UDP sockets,
so the server listens on loopback. Every subscriber must get every stream it should (the other two videos,
the stage one at layer f and the thumbnail at q, and both others' audio under the top-3 rule) with no loss.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from huddle.config import Settings
from huddle.loadtest.cli import add_arguments
from huddle.loadtest.run import LoadtestConfig, format_summary, run_loadtest
from huddle.node import Node

HOST = "127.0.0.1"


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    node = Node(
        Settings(
            host=HOST,
            port=0,
            stun_port=0,
            media_port=0,
            sfu_always=True,
            reconnect_grace=0,
            recordings_dir=tempfile.mkdtemp("-recordings"),
        )
    )
    node.ports = await node.start()
    node.base_url = f"http://{HOST}:{node.ports.http}"
    yield node
    await node.stop()


async def test_three_synthetic_participants_get_every_stream_at_its_layer_without_loss(node: Node) -> None:
    config = LoadtestConfig(
        url=node.base_url, room="load3", participants=3, duration=3.5, warmup=1.5, layout="speaker"
    )
    result = await run_loadtest(config)
    summary = format_summary(result)
    assert result.complete, summary
    assert not result.errors, summary

    ids = [sub.participant for sub in result.subscribers]
    speaker = ids[0]  # participant 0 talks: it is on everyone else's stage
    for sub in result.subscribers:
        others = [pid for pid in ids if pid != sub.participant]
        stage = speaker if sub.participant != speaker else others[0]
        videos = {s.publisher: s for s in sub.streams if s.kind == "video"}
        audio = {s.publisher: s for s in sub.streams if s.kind == "audio"}
        assert sorted(videos) == sorted(others), summary
        assert sorted(audio) == sorted(others), summary
        for publisher, stream in videos.items():
            want = "f" if publisher == stage else "q"
            assert stream.expected_layer == want, (sub.participant, stream)
            # After the warm-up the switch to the stage's layer is done: every packet is at its layer.
            assert stream.packets > 0 and stream.layers == {want: stream.packets}, (sub.participant, stream)
            assert stream.lost == 0 and stream.freezes == 0, (sub.participant, stream)
            assert stream.wrong_sender == 0 and stream.errors == 0, (sub.participant, stream)
        for stream in audio.values():
            # Both others are heard: the top 3 topped up with quiet ones in a small call.
            assert stream.packets >= 40 * config.duration, (sub.participant, stream)
            assert stream.layers == {"audio": stream.packets} and stream.lost == 0, (sub.participant, stream)
        # The stage video carries 30 fps of a 1.5 Mbit/s layer; a thumbnail half the frames of the lowest.
        assert videos[stage].packets > 3 * max(s.packets for p, s in videos.items() if p != stage), summary
        assert sub.lost == 0 and sub.freezes == 0
        assert sub.videos_received == sub.videos_at_layer == sub.videos_expected == 2
        assert sub.videos_unexpected == 0
        assert sub.audio_received == sub.audio_expected == 2
        assert sub.delay_p99_ms is not None and sub.delay_p99_ms < 200, summary
        # Lip sync: every stream has the SFU's sender reports, and read through them each packet's timestamp
        # gives its publisher's clock when it was sent (within the publisher's own pacing), whatever the SFU
        # did to the SSRC, the timestamps and the layers.
        for stream in sub.streams:
            assert stream.reports >= 2 and stream.sync_max_ms is not None, (sub.participant, stream)
            assert stream.sync_max_ms < 20, (sub.participant, stream)
        # Together, in compound packets: not a datagram per report.
        assert sub.rtcp_datagrams * 2 <= sum(s.reports for s in sub.streams), (sub.participant, sub)

    # Dynacast: each publisher sends the layers someone shows, and pauses the others. Participant 0 is on
    # the others' stage (f) and on nobody's thumbnails; 1 is on 0's stage and 2's thumbnails; 2 only on
    # thumbnails.
    assert [sub.layers_sent for sub in result.subscribers] == [
        ["f", "audio"],
        ["q", "f", "audio"],
        ["q", "audio"],
    ]
    assert result.lost == 0 and result.loss_percent == 0.0
    assert result.packets_sent > 0 and result.packets_received > result.packets_sent, summary
    totals = node.sfu.sfu_totals()
    assert totals["rtp_in"] >= result.packets_sent and totals["rtp_out"] >= result.packets_received
    json.dumps(result.to_dict())  # JSON-able


async def test_like_for_like_run_forwards_one_middle_layer_video_and_no_audio_without_loss(
    node: Node,
) -> None:
    producers: list[tuple[str, list[str], list[int | None]]] = []

    def progress(text: str) -> None:
        # Mid-run, with everyone connected: what the server made of the publishers' offers.
        if text.startswith("measuring"):
            producers.extend(
                (producer.kind, producer.rids, list(producer.ssrcs))
                for router in node.sfu.routers
                for peer in router.peers.values()
                for producer in peer.producers.values()
            )

    config = LoadtestConfig(
        url=node.base_url,
        room="like",
        participants=4,
        publishers=2,
        duration=2.5,
        warmup=1.0,
        layout="gallery",
        simulcast=False,
        audio=False,
    )
    result = await run_loadtest(config, progress=progress)
    summary = format_summary(result)
    assert result.complete and not result.errors, summary
    assert summary.splitlines()[0].endswith("camera without simulcast, no audio"), summary
    # One video track per publisher, of one layer whose SSRC the server took from the SDP; no audio track.
    assert len(producers) == 2, producers
    for kind, rids, ssrcs in producers:
        assert kind == "video" and rids == [] and len(ssrcs) == 1 and ssrcs[0] is not None, producers

    # Each publisher shows the other one, each viewer both; a 960x540 tile (of 2 publishers in a gallery)
    # would want layer f from a simulcast camera, and gets h, the only one there is.
    assert result.videos_expected == 1 + 1 + 2 + 2, summary
    assert result.videos_at_layer == result.videos_received == result.videos_expected, summary
    assert result.videos_unexpected == 0 and result.audio_expected == result.audio_received == 0, summary
    assert result.lost == 0 and result.loss_percent == 0.0 and result.freezes == 0, summary
    for sub in result.subscribers:
        assert sub.layers_sent == (["h"] if sub.index < 2 else []), sub
        assert sub.streams and all(s.kind == "video" for s in sub.streams), sub
        for stream in sub.streams:
            assert stream.expected_layer == "h" and stream.layers == {"h": stream.packets}, stream
            assert stream.wrong_sender == 0 and stream.errors == 0, stream
    # Every packet sent reaches the three others (the window's edges shift a few by the forwarding delay).
    assert abs(result.packets_received - 3 * result.packets_sent) <= 0.05 * 3 * result.packets_sent, summary


async def test_cli_runs_three_participants_for_two_seconds_and_prints_a_summary(node: Node, tmp_path: Path):
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUDDLE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "huddle",
        "loadtest",
        "--url",
        node.base_url,
        "--room",
        "cli",
        "--participants",
        "3",
        "--duration",
        "2",
        "--warmup",
        "0.5",
        "--json",
        str(out),
        "--quiet",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    text = stdout.decode()
    assert proc.returncode == 0, (text, stderr.decode())
    assert "3 participants (3 publishing)" in text and "loss" in text and "p99" in text, text
    data = json.loads(out.read_text())
    assert data["complete"] and data["participants"] == 3 and len(data["subscribers"]) == 3
    assert data["packets_received"] > 0 and data["window_seconds"] >= 2


def test_cli_flags_turn_simulcast_and_audio_off():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    default = parser.parse_args([])
    assert (default.simulcast, default.audio) == (True, True)
    like = parser.parse_args(["--no-simulcast", "--no-audio"])
    assert (like.simulcast, like.audio) == (False, False)


async def test_cli_refuses_runs_beyond_its_bounds():
    for extra in (["--participants", "100000"], ["--duration", "601"], ["--publishers", "5"]):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "huddle",
            "loadtest",
            "--url",
            "http://127.0.0.1:9",
            "--participants",
            "3",
            *extra,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 2, (extra, stderr.decode())
