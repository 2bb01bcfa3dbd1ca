"""The call page over HTTPS with `huddle serve --self-signed`, at a LAN address: there, unlike on localhost, a
browser gives the camera only to a secure page."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.chromium import CHROMIUM, CHROMIUM_ARGS

from .conftest import Server, remote_tiles, start_server, stop_server, wait_decoding, wait_for

# The namespace's own address (scripts/in-netns): not loopback, so http:// would not be a secure context.
LAN_ADDRESS = "10.77.0.1"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # A user accepts the self-signed certificate once in the browser's warning page; this flag stands for it.
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, "--ignore-certificate-errors"], headless=True
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = start_server("--self-signed", "--host", LAN_ADDRESS)
    yield s
    stop_server(s)


def test_two_pages_over_https_with_a_self_signed_certificate_see_each_other(new_page, server: Server) -> None:
    base = f"https://{LAN_ADDRESS}:{server.http}"
    ada = new_page(f"{base}/r/lan-try-out?name=Ada")
    bob = new_page(f"{base}/r/lan-try-out?name=Bob")
    for page in (ada, bob):
        assert page.evaluate("location.protocol") == "https:"
        assert page.evaluate("window.isSecureContext") is True
    wait_for(lambda: remote_tiles(ada) == ["Bob"], 15, "Ada's page to show Bob")
    wait_for(lambda: remote_tiles(bob) == ["Ada"], 15, "Bob's page to show Ada")
    for page in (ada, bob):
        stats = wait_decoding(page, peers=1, frames=30)
        assert stats[0]["frameWidth"] > 0
