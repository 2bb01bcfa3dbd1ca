"""Recording a real Chromium call: started and stopped from the call page, seen by everyone, and the files
checked with ffprobe: the speaker-view MP4 (duration, frame rate, audio), the per-track WebMs (they decode)
and the manifest (its offsets line the tracks up). Also: a 1:1 call moves to the SFU when recording starts,
and a server stopped with SIGTERM mid-recording leaves playable files."""

from __future__ import annotations

import json
import signal
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page

from ..ffprobe import probe
from .conftest import Server, peer_stats, remote_tiles, start_server, stop_server, wait_decoding, wait_for


@pytest.fixture(scope="module")
def recordings_dir() -> Path:
    return Path(tempfile.mkdtemp("-recordings"))


@pytest.fixture(scope="module")
def server(recordings_dir: Path) -> Iterator[Server]:
    s = start_server("--recordings-dir", str(recordings_dir))
    yield s
    stop_server(s)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def join(new_page, server: Server, room: str, names: list[str]) -> list[Page]:
    pages = [new_page(f"{server.url}/r/{room}?name={name}") for name in names]
    for page, name in zip(pages, names, strict=True):
        others = sorted(n for n in names if n != name)
        wait_for(lambda page=page, others=others: sorted(remote_tiles(page)) == others, 20, f"{name}'s tiles")
    return pages


def indicator_shown(page: Page) -> bool:
    return page.evaluate("!document.getElementById('recording-indicator').hidden")


def sfu_frames(page: Page) -> int:
    return sum(s["framesDecoded"] for s in peer_stats(page) if s["participantId"] == "sfu:subscribe")


def stored(server: Server, room: str) -> dict | None:
    listing = get_json(f"{server.url}/api/rooms/{room}/recordings")
    return next((r for r in listing["recordings"] if r["state"] == "stored"), None)


def frames_played(page: Page, player: str) -> int:
    return (
        page.get_by_role("region", name=player)
        .locator("video")
        .evaluate("v => v.error ? -1 : v.getVideoPlaybackQuality().totalVideoFrames")
    )


def play_in_place(page: Page) -> None:
    """The recordings page plays a person's camera (WebM) and the speaker view (MP4) where it is: one player
    at a time, decoding frames, the page's URL unchanged; used with the mouse and with the keyboard."""
    url = page.url
    ada = page.get_by_role("button", name="Play Ada's camera")
    ada.click()
    wait_for(lambda: frames_played(page, "Player: Ada's camera") > 15, 20, "Ada's camera to play in place")
    assert page.url == url
    assert ada.get_attribute("aria-expanded") == "true"
    assert page.evaluate("document.activeElement.tagName") == "VIDEO"  # ready for space to pause

    # From the keyboard: the speaker view's button, Enter. Ada's player closes: one at a time.
    speaker_view = page.get_by_role("button", name="Play speaker view")
    speaker_view.focus()
    page.keyboard.press("Enter")
    wait_for(
        lambda: frames_played(page, "Player: speaker view") > 15, 20, "the speaker view to play in place"
    )
    assert page.get_by_role("region", name="Player: Ada's camera").count() == 0
    assert ada.get_attribute("aria-expanded") == "false"
    assert page.locator("video").count() == 1
    played = (
        page.get_by_role("region", name="Player: speaker view")
        .locator("video")
        .evaluate("v => v.currentTime")
    )
    assert played > 0.3
    # Escape closes it and gives the focus back to its button; the close button does the same.
    page.keyboard.press("Escape")
    wait_for(lambda: page.locator("video").count() == 0, 5, "the player to close")
    assert page.evaluate("document.activeElement.textContent") == "Play speaker view"
    ada.click()
    page.get_by_role("region", name="Player: Ada's camera").get_by_role("button", name="Close player").click()
    wait_for(lambda: page.locator("video").count() == 0, 5, "the player to close")
    assert page.url == url
    # The download links are still there.
    assert page.get_by_role("link", name="speaker-view.mp4").count() == 1


def test_a_three_person_call_recorded_from_the_page(new_page, server: Server, tmp_path: Path) -> None:
    room = "recorded"
    pages = join(new_page, server, room, ["Ada", "Bob", "Cy"])
    for page in pages:
        wait_for(lambda page=page: page.evaluate("window.huddle.mode") == "sfu", 10, "SFU mode")
    assert not any(indicator_shown(p) for p in pages)

    pages[0].click("#toggle-recording")
    for page in pages:  # everyone is told, not only who pressed the button
        wait_for(lambda page=page: indicator_shown(page), 10, "the recording indicator")
    assert pages[0].get_attribute("#toggle-recording", "data-active") == "true"
    time.sleep(10)
    pages[0].click("#toggle-recording")
    for page in pages:
        wait_for(lambda page=page: not indicator_shown(page), 10, "the indicator to go")

    recording = wait_for(lambda: stored(server, room), 60, "the recording to be stored")
    # The recordings page lists it, a download link per file, the speaker view first.
    listing = new_page(f"{server.url}/r/{room}/recordings")
    links = f"li.recording[data-id='{recording['id']}'] a.download"
    wait_for(lambda: listing.locator(links).count() == len(recording["files"]), 15, "the download links")
    assert "speaker-view.mp4" in listing.locator(links).first.get_attribute("href")
    # Each track file says whose it is, in its name and in the listing.
    tracks = [f for f in recording["files"] if f["name"].endswith(".webm")]
    assert sorted((f["participant_name"], f["kind"]) for f in tracks) == sorted(
        (n, k) for n in ("Ada", "Bob", "Cy") for k in ("audio", "video")
    )
    for f in tracks:
        assert f["name"] == f"{f['participant_name'].lower()}-{f['participant_id']}-{f['kind']}-1.webm"
    play_in_place(listing)
    for f in recording["files"]:
        with urllib.request.urlopen(server.url + f["url"], timeout=30) as response:
            (tmp_path / f["name"]).write_bytes(response.read())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    duration = manifest["duration"]
    assert 9.5 < duration < 13, manifest

    composite = probe(tmp_path / "speaker-view.mp4")
    streams = {s["codec_type"]: s for s in composite["streams"]}
    assert streams["video"]["codec_name"] == "h264" and streams["audio"]["codec_name"] == "aac"
    assert (streams["video"]["width"], streams["video"]["height"]) == (1280, 720)
    assert abs(float(composite["format"]["duration"]) - duration) <= 0.5, (composite["format"], duration)
    assert abs(float(streams["audio"]["duration"]) - duration) <= 0.5
    assert int(streams["video"]["nb_read_frames"]) >= 25 * duration

    # One audio and one video file per person, each decodes, each named in the manifest.
    tracks = manifest["tracks"]
    assert sorted((t["name"], t["kind"]) for t in tracks) == sorted(
        (n, k) for n in ("Ada", "Bob", "Cy") for k in ("audio", "video")
    )
    for track in tracks:
        stream = probe(tmp_path / Path(track["file"]).name)["streams"][0]
        assert stream["codec_name"] == ("vp8" if track["kind"] == "video" else "opus")
        assert int(stream["nb_read_frames"]) == track["frames"] > 0
    # Everyone stayed throughout: lined up by their manifest offsets, all tracks end at the stop, within a
    # frame or two of one another (a loaded machine delays the last ones: 40 ms failed now and then under
    # the whole suite; a track cut short by a bug ends seconds early).
    ends = [t["start_offset"] + t["duration"] for t in tracks]
    assert max(ends) - min(ends) < 0.1, [
        (t["name"], t["kind"], t["start_offset"], t["duration"]) for t in tracks
    ]


def test_recording_a_one_to_one_call_moves_it_to_the_sfu(new_page, server: Server) -> None:
    room = "duo"
    pages = join(new_page, server, room, ["Ann", "Ben"])
    for page in pages:
        wait_decoding(page, peers=1, frames=20)
        assert page.evaluate("window.huddle.mode") == "p2p"
    pages[1].click("#toggle-recording")
    for page in pages:
        wait_for(lambda page=page: page.evaluate("window.huddle.mode") == "sfu", 15, "the move to the SFU")
        wait_for(lambda page=page: indicator_shown(page), 10, "the indicator")
    # Media flows again, now through the SFU (and into the recording: 4 consumers for the two people, 4 for
    # the recorder).
    for page in pages:
        wait_for(lambda page=page: sfu_frames(page) >= 30, 40, "video through the SFU")
    wait_for(lambda: get_json(f"{server.url}/api/rooms/{room}")["sfu"]["consumers"] == 8, 15, "8 consumers")
    pages[1].click("#toggle-recording")
    wait_for(lambda: stored(server, room), 60, "the recording to be stored")


def test_sigterm_in_the_middle_of_a_recording_leaves_playable_files(new_page, tmp_path: Path) -> None:
    recordings = tmp_path / "recordings"
    server = start_server("--recordings-dir", str(recordings), "--sfu-always", "--api-key", "e2e-key")
    try:
        room = "cut"
        pages = join(new_page, server, room, ["Eve", "Fay"])
        for page in pages:
            wait_for(lambda page=page: page.evaluate("window.huddle.mode") == "sfu", 10, "SFU mode")
        request = urllib.request.Request(
            f"{server.url}/api/rooms/{room}/recordings",
            method="POST",
            headers={"Authorization": "Bearer e2e-key"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 201
        time.sleep(4)
    finally:
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(60)
    assert server.proc.returncode == 0
    [folder] = list((recordings / room).iterdir())
    composite = probe(folder / "speaker-view.mp4")
    assert float(composite["format"]["duration"]) > 3
    assert {s["codec_type"] for s in composite["streams"]} == {"video", "audio"}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert len(manifest["tracks"]) == 4
    for track in manifest["tracks"]:
        assert int(probe(folder / track["file"])["streams"][0]["nb_read_frames"]) == track["frames"] > 0
