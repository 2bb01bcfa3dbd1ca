"""Two people in a 1:1 call see and hear each other, browser to browser."""

from __future__ import annotations

import time
from collections.abc import Callable

from playwright.sync_api import Page

from .conftest import Server, peer_stats, remote_tiles, wait_decoding, wait_for


def _join_pair(new_page: Callable[[str], Page], server: Server, room: str) -> tuple[Page, Page]:
    ada = new_page(f"{server.url}/r/{room}?name=Ada")
    bob = new_page(f"{server.url}/r/{room}?name=Bob")
    wait_for(lambda: remote_tiles(ada) == ["Bob"], 15, "Ada's page to show Bob")
    wait_for(lambda: remote_tiles(bob) == ["Ada"], 15, "Bob's page to show Ada")
    return ada, bob


def test_two_pages_see_and_hear_each_other_peer_to_peer(new_page, server: Server) -> None:
    ada, bob = _join_pair(new_page, server, "standup")
    first = {name: wait_decoding(page, peers=1)[0] for name, page in (("ada", ada), ("bob", bob))}
    time.sleep(2)
    later = {"ada": peer_stats(ada)[0], "bob": peer_stats(bob)[0]}
    for name in ("ada", "bob"):
        # Video keeps decoding (the fake camera runs at 30 fps; allow for a slow machine) and audio flows.
        assert later[name]["framesDecoded"] - first[name]["framesDecoded"] >= 20, (name, first, later)
        assert later[name]["frameWidth"] > 0
        assert later[name]["audioPackets"] - first[name]["audioPackets"] >= 50, (name, first, later)
        assert later[name]["audioSamples"] > first[name]["audioSamples"]

    # The selected pair joins the two browsers: each one's local end is the other's remote end, and
    # neither end is a port of the server (no relay, no SFU: media goes peer to peer).
    server_ports = {server.http, server.stun, server.media}
    a_pair, b_pair = later["ada"]["pair"], later["bob"]["pair"]
    assert a_pair["state"] == "succeeded" and b_pair["state"] == "succeeded"
    assert a_pair["remote"]["port"] == b_pair["local"]["port"]
    assert b_pair["remote"]["port"] == a_pair["local"]["port"]
    for pair in (a_pair, b_pair):
        assert pair["remote"]["port"] not in server_ports and pair["local"]["port"] not in server_ports
        assert pair["local"]["type"] != "relay" and pair["remote"]["type"] != "relay"
    assert ada.get_attribute("#status", "data-state") == "connected"


def test_a_closed_tab_is_gone_for_the_other_within_10_seconds(new_page, server: Server) -> None:
    ada, bob = _join_pair(new_page, server, "closing")
    wait_decoding(ada, peers=1, frames=5)
    started = time.monotonic()
    bob.close()
    wait_for(lambda: remote_tiles(ada) == [], 10, "Bob's tile to go")
    assert time.monotonic() - started < 10
    assert peer_stats(ada) == []  # the peer connection to Bob is closed too


def test_leave_button_and_mute_state(new_page, server: Server) -> None:
    ada, bob = _join_pair(new_page, server, "buttons")
    wait_decoding(ada, peers=1, frames=5)

    bob.click("#toggle-audio")
    wait_for(
        lambda: ada.is_visible('.tile.remote[data-name="Bob"] .muted-indicator'), 5, "Ada to see Bob muted"
    )
    assert bob.get_attribute("#toggle-audio", "data-active") == "true"
    assert bob.get_by_role("button", name="Unmute", exact=True).count() == 1
    bob.click("#toggle-audio")
    wait_for(
        lambda: not ada.is_visible('.tile.remote[data-name="Bob"] .muted-indicator'),
        5,
        "Ada to see Bob unmuted",
    )

    bob.click("#toggle-video")
    wait_for(
        lambda: ada.is_visible('.tile.remote[data-name="Bob"] .camera-off'), 5, "Ada to see Bob's camera off"
    )

    bob.click("#leave")
    wait_for(lambda: remote_tiles(ada) == [], 10, "Bob's tile to go after he leaves")
    wait_for(lambda: bob.is_visible("#left-panel"), 5, "Bob's page to say he left")
    assert "left" in bob.text_content("#left-title").lower()
    assert bob.get_attribute("#status", "data-state") == "idle"
    assert peer_stats(bob) == []
