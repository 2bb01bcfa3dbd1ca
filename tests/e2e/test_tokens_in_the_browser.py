"""With --secret, invite links admit their holder, and a bad link gets a clear error and no media."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from huddle.signaling import tokens

from .conftest import Server, peer_stats, remote_tiles, start_server, stop_server, wait_decoding, wait_for

SECRET = "e2e secret"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = start_server("--secret", SECRET)
    yield s
    stop_server(s)


def _link(server: Server, room: str, token: str) -> str:
    return f"{server.url}/r/{room}?token={token}"


def test_invite_links_admit_and_bad_links_are_refused_without_media(new_page, server: Server) -> None:
    ada = new_page(_link(server, "board", tokens.issue(SECRET, room="board", identity="ada", name="Ada")))
    bob = new_page(_link(server, "board", tokens.issue(SECRET, room="board", identity="bob", name="Bob")))
    wait_for(lambda: remote_tiles(ada) == ["Bob"], 15, "Ada to see Bob")
    wait_decoding(ada, peers=1, frames=10)

    bad_links = {
        "forged": _link(server, "board", tokens.issue("guessed", room="board", identity="eve", name="Eve")),
        "expired": _link(
            server,
            "board",
            tokens.issue(SECRET, room="board", identity="eve", name="Eve", ttl=10, now=time.time() - 60),
        ),
        "wrong room": _link(server, "board", tokens.issue(SECRET, room="other", identity="eve", name="Eve")),
        "no token": f"{server.url}/r/board?name=Eve",
    }
    for why, url in bad_links.items():
        eve = new_page(url)
        message = wait_for(
            lambda eve=eve: (eve.text_content("#error .error-text") or "").strip(),
            10,
            f"an error for a {why} link",
        )
        assert eve.is_visible("#error"), why
        assert any(word in message.lower() for word in ("invite", "link", "token")), (why, message)
        assert eve.get_attribute("#status", "data-state") in ("error", "disconnected"), why
        assert remote_tiles(eve) == [], why
        assert peer_stats(eve) == [], why
    assert remote_tiles(ada) == ["Bob"] and remote_tiles(bob) == ["Ada"]
    assert len(peer_stats(ada)) == 1
