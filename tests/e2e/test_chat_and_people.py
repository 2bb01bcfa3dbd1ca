"""Chat, the people list, raised hands, button labels, the network banner and the error panels, through the
real call page in Chromium (controls found by role and accessible name, as people and screen readers do)."""

from __future__ import annotations

import re
import time
from urllib.parse import quote

from playwright.sync_api import Page, expect

from huddle.signaling import tokens

from .conftest import Server, dropping, remote_tiles, start_server, stop_server, wait_for

# A name and a message that would run script if the page ever treated them as HTML.
EVIL_NAME = "<img src=x onerror=window.__pwned=1>"
EVIL_TEXT = "<script>window.__pwned=1</script> see https://example.com/x."
LINK = "https://example.com/x"

# Every UDP port this page's peer connections gathered a candidate on: all the sockets its media can use.
LOCAL_UDP_PORTS_JS = """
async () => {
  const ports = new Set();
  for (const {pc} of window.huddle.peerConnections()) {
    (await pc.getStats()).forEach(r => {
      if (r.type === 'local-candidate' && r.protocol === 'udp') ports.add(r.port);
    });
  }
  return [...ports];
}
"""


def _send(page: Page, text: str) -> None:
    if page.get_by_role("textbox", name="Message").is_hidden():
        page.get_by_role("button", name="Chat").click()
    box = page.get_by_role("textbox", name="Message")
    box.fill(text)
    box.press("Enter")
    expect(box).to_have_value("")


def _messages(page: Page) -> list[tuple[str, str]]:
    """(sender as shown, text as shown) of each message in the chat panel."""
    shown = page.eval_on_selector_all(
        "#chat-messages .chat-message",
        "els => els.map(e => [e.querySelector('.chat-name').textContent,"
        " e.querySelector('.chat-text').textContent])",
    )
    return [tuple(message) for message in shown]


def _person(page: Page, name: str):
    return page.get_by_role("list", name="People").get_by_role("listitem").filter(has_text=name)


# Counts the times the network banner is shown from now on (a poll could miss a short one).
WATCH_BANNER_JS = """
() => {
  window.__bannerShown = 0;
  const banner = document.querySelector('#network-banner');
  new MutationObserver(() => { if (!banner.hidden) window.__bannerShown += 1; })
    .observe(banner, {attributes: true, attributeFilter: ['hidden']});
}
"""


def _pwned(*pages: Page) -> list[object]:
    return [page.evaluate("window.__pwned") for page in pages]


def test_chat_hands_labels_and_a_cut_network_in_one_call(new_page, server: Server) -> None:
    url = f"{server.url}/r/people"
    ada = new_page(f"{url}?name=Ada")
    bob = new_page(f"{url}?name={quote(EVIL_NAME)}")
    wait_for(lambda: remote_tiles(ada) == [EVIL_NAME], 15, "Ada to see Bob's tile")
    wait_for(lambda: remote_tiles(bob) == ["Ada"], 15, "Bob to see Ada's tile")
    for page in (ada, bob):
        page.evaluate(WATCH_BANNER_JS)

    # Chat: Ada's message reaches Bob, whose closed panel counts it as unread.
    _send(ada, EVIL_TEXT)
    expect(bob.get_by_role("button", name="Chat, 1 unread")).to_be_visible(timeout=5000)
    bob.get_by_role("button", name="Chat, 1 unread").click()
    expect(bob.get_by_role("button", name="Chat", exact=True)).to_be_visible()
    assert _messages(bob) == [("Ada", EVIL_TEXT)]  # the markup shown as text, with the sender's name
    link = bob.get_by_role("log", name="Chat").get_by_role("link", name=LINK)
    expect(link).to_have_attribute("href", LINK)  # the full stop after it is not part of the link
    expect(link).to_have_attribute("rel", "noopener noreferrer")
    expect(link).to_have_attribute("target", "_blank")
    _send(bob, "hello from Bob")
    wait_for(lambda: len(_messages(ada)) == 2, 5, "Bob's message on Ada's page")
    assert _messages(ada)[1] == (EVIL_NAME, "hello from Bob")
    assert ada.locator("#chat-messages time").count() == 2  # each with its time

    # A late joiner sees the chat so far (the call moves to the SFU with three people).
    cy = new_page(f"{url}?name=Cy")
    wait_for(lambda: sorted(remote_tiles(cy)) == sorted(["Ada", EVIL_NAME]), 20, "Cy's tiles")
    cy.evaluate(WATCH_BANNER_JS)
    expect(cy.get_by_role("button", name="Chat, 2 unread")).to_be_visible(timeout=5000)
    cy.get_by_role("button", name="Chat, 2 unread").click()
    assert _messages(cy) == [("Ada", EVIL_TEXT), (EVIL_NAME, "hello from Bob")]

    # A raised hand: Ada's button says what it does next; Bob sees the hand on Ada's tile and in his list.
    ada.get_by_role("button", name="Raise hand").click()
    expect(ada.get_by_role("button", name="Lower hand")).to_be_visible(timeout=5000)
    ada_tile = bob.locator('.tile.remote[data-name="Ada"]')
    expect(ada_tile.get_by_role("img", name="Hand raised")).to_be_visible(timeout=5000)
    bob.get_by_role("button", name=re.compile(r"^People")).click()
    expect(_person(bob, "Ada").get_by_role("img", name="Hand raised")).to_be_visible()
    expect(bob.get_by_role("button", name=re.compile(r"^People, 3, 1 hand raised"))).to_be_visible()

    # Muting: Bob's button reads "Unmute"; Ada's list says Bob is muted.
    bob.get_by_role("button", name="Mute", exact=True).click()
    expect(bob.get_by_role("button", name="Unmute", exact=True)).to_be_visible()
    ada.get_by_role("button", name=re.compile(r"^People")).click()
    expect(_person(ada, EVIL_NAME).get_by_role("img", name="Muted")).to_be_visible(timeout=5000)
    expect(_person(ada, "Ada (you)").get_by_role("img", name="Hand raised")).to_be_visible()
    ada.get_by_role("button", name="Lower hand").click()
    expect(ada_tile.get_by_role("img", name="Hand raised")).to_have_count(0, timeout=5000)

    # Connection quality, graded from getStats, on the tiles (ours and the others') and in the list.
    quality = re.compile(r"^Connection: (good|fair|poor)$")
    for page in (ada, cy):
        for tile in (page.locator(".tile.remote").first, page.locator(".tile.local")):
            expect(tile.get_by_role("img", name=quality)).to_be_visible(timeout=10000)
    expect(_person(ada, "Cy").get_by_role("img", name=quality)).to_be_visible(timeout=5000)

    # Nothing anyone typed became markup, anywhere (the page's CSP would also stop inline script, so the
    # elements themselves are what shows the text stayed text).
    assert _pwned(ada, bob, cy) == [None, None, None]
    for page in (ada, bob, cy):
        assert page.locator(":is(#chat-panel, #people-panel, .tile) :is(img, script)").count() == 0

    # No false alarm so far, the move from p2p to the SFU included.
    assert [page.evaluate("window.__bannerShown") for page in (ada, bob, cy)] == [0, 0, 0]

    # Cy's network cut (every UDP packet of its media dropped): Cy's page says so within 3 s, in a banner
    # that covers neither the tiles nor the controls; Ada's does not. Back once media flows again.
    banner = cy.get_by_role("alert").filter(has_text="Connection lost")
    ports = cy.evaluate(LOCAL_UDP_PORTS_JS)
    assert ports
    listed = ", ".join(map(str, sorted(ports)))
    with dropping(f"udp sport {{ {listed} }}", f"udp dport {{ {listed} }}"):
        started = time.monotonic()
        wait_for(banner.is_visible, 5, "the network banner on Cy's page", interval=0.1)
        shown_after = time.monotonic() - started
        print(f"banner shown {shown_after:.2f} s after the cut")
        assert shown_after < 3, shown_after
        box = banner.bounding_box()
        for control in (cy.locator(".tile.local .tile-label"), cy.get_by_role("button", name="Leave")):
            other = control.bounding_box()
            apart = box["y"] + box["height"] <= other["y"] or other["y"] + other["height"] <= box["y"]
            assert apart, (box, other)
        assert ada.get_by_role("alert").filter(has_text="Connection lost").is_hidden()
        time.sleep(1)  # a second of the cut seen as such
    restored = time.monotonic()
    wait_for(banner.is_hidden, 10, "the banner to go once media flows", interval=0.1)
    print(f"banner gone {time.monotonic() - restored:.2f} s after the network came back")
    assert cy.get_attribute("#status", "data-state") == "connected"

    # Cy's signaling socket drops: the page resumes the call on a new one, whose `joined` carries the chat
    # again; nothing shows twice, and what comes after shows once.
    cy.evaluate("window.huddle._signaling.ws.close()")
    wait_for(lambda: cy.evaluate("window.huddle.state") == "reconnecting", 5, "Cy's page to resume")
    wait_for(lambda: cy.evaluate("window.huddle.state") == "connected", 15, "Cy back on a new socket")
    _send(ada, "after the resume")
    wait_for(lambda: len(_messages(cy)) >= 3, 5, "the new message on Cy's page")
    assert [text for _, text in _messages(cy)] == [EVIL_TEXT, "hello from Bob", "after the resume"]


def test_a_link_that_cannot_work_says_why_and_offers_no_retry(new_page) -> None:
    secret = "people secret"
    server = start_server("--secret", secret)
    try:
        links = {
            "another room": tokens.issue(secret, room="other", identity="eve", name="Eve"),
            "expired": tokens.issue(
                secret, room="board", identity="eve", name="Eve", ttl=10, now=time.time() - 60
            ),
        }
        for why, token in links.items():
            page = new_page(f"{server.url}/r/board?token={token}")
            heading = page.locator("#left-panel").get_by_role("heading")
            expect(heading).to_contain_text(why, timeout=10000)
            expect(page.locator("#left-note")).to_contain_text("link")
            expect(page.get_by_role("button", name="Try again")).to_have_count(0)
            expect(page.get_by_role("button", name="Rejoin")).to_have_count(0)
            expect(page.get_by_role("link", name="Back to start")).to_be_visible()
    finally:
        stop_server(server)
