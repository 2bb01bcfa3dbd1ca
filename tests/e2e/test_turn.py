"""Calls through the node's own TURN relay, in real Chromium: "Always relay calls" (iceTransportPolicy
'relay') for a 1:1 call and an SFU call, browsers whose UDP is dropped by nftables that still carry video,
over TURN over TCP (1:1) and ICE-TCP or TURN over TCP (SFU), and a firewall that passes only TURN over TLS."""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from playwright.sync_api import Browser, Page, sync_playwright

from tests.chromium import CHROMIUM, CHROMIUM_ARGS

from .conftest import Server, dropping, remote_tiles, start_server, stop_server, wait_for

RELAY_LABEL = "Always relay calls (hides your IP address)"
# The relay's ports: below Linux's ephemeral range (32768-60999), so that no browser socket is ever given one
# and the nftables rules below can tell the relay's own UDP from everyone else's.
TURN_PORTS = (20000, 20099)
TURN_RANGE = f"{TURN_PORTS[0]}-{TURN_PORTS[1]}"

# Per peer connection: its ICE policy, decoded video frames, and the selected pair's two ends (for a relay
# candidate, the address is the relayed one and relayProtocol how the browser reaches the relay).
PAIRS_JS = """
async () => {
  const out = [];
  for (const {participantId, pc} of window.huddle.peerConnections()) {
    const stats = await pc.getStats();
    const byId = new Map();
    stats.forEach(r => byId.set(r.id, r));
    const conn = {pc: participantId, policy: pc.getConfiguration().iceTransportPolicy, frames: 0, pair: null};
    stats.forEach(r => {
      if (r.type === 'inbound-rtp' && r.kind === 'video') conn.frames += r.framesDecoded || 0;
      if (r.type === 'transport' && r.selectedCandidatePairId) {
        const pair = byId.get(r.selectedCandidatePairId);
        const end = (c) => ({type: c.candidateType, address: c.address, port: c.port, protocol: c.protocol,
                             relayProtocol: c.relayProtocol || null});
        conn.pair = {state: pair.state, local: end(byId.get(pair.localCandidateId)),
                     remote: end(byId.get(pair.remoteCandidateId))};
      }
    });
    out.push(conn);
  }
  return out;
}
"""

# A page that never sees a TURN server, whatever the node hands out: the control that shows the nftables rules
# leave no way through without one.
WITHOUT_TURN_JS = """
(() => {
  const Native = window.RTCPeerConnection;
  const isTurn = (url) => /^turns?:/i.test(url);
  window.RTCPeerConnection = function (config = {}) {
    const iceServers = (config.iceServers || [])
      .map((s) => ({...s, urls: [].concat(s.urls).filter((url) => !isTurn(url))}))
      .filter((s) => s.urls.length > 0);
    return new Native({...config, iceServers});
  };
  window.RTCPeerConnection.prototype = Native.prototype;
})();
"""


@dataclass(frozen=True)
class RelayCertificate:
    cert: Path
    key: Path
    spki: (
        str  # base64 SHA-256 of the public key, as Chromium's --ignore-certificate-errors-spki-list takes it
    )


@pytest.fixture(scope="module")
def certificate() -> RelayCertificate:
    """A self-signed certificate for 127.0.0.1, for the relay's TLS port."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(key, hashes.SHA256())
    )
    folder = Path(tempfile.mkdtemp("-turn-tls"))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return RelayCertificate(
        folder / "cert.pem", folder / "key.pem", base64.b64encode(hashlib.sha256(spki).digest()).decode()
    )


@pytest.fixture(scope="module")
def browser(certificate: RelayCertificate) -> Iterator[Browser]:
    """The usual Chromium, trusting the test certificate's key and nothing else besides: Chromium checks a
    TURN server's certificate like a web site's, and refuses a self-signed one."""
    with sync_playwright() as pw:
        args = [*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={certificate.spki}"]
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def connections(page: Page) -> list[dict[str, Any]]:
    return page.evaluate(PAIRS_JS)


def start_turn_server(*extra: str) -> Server:
    return start_server("--turn-allow-peer", "127.0.0.0/8", "--turn-ports", TURN_RANGE, *extra)


def in_turn_range(port: int) -> bool:
    return TURN_PORTS[0] <= port <= TURN_PORTS[1]


def udp_only_for_the_relay(server: Server) -> tuple[str, ...]:
    """nftables rules that drop every UDP packet but those between the relay's ports, or between a relay port
    and the node's media port: no browser socket sends or receives UDP (STUN, TURN over UDP, host or
    server-reflexive candidates, UDP to the SFU), while the relay still sends to its peers."""
    relay_or_media = f"{{ {TURN_RANGE}, {server.media} }}"
    return (
        f"udp sport != {TURN_RANGE} udp dport != {TURN_RANGE}",
        f"udp sport {TURN_RANGE} udp dport != {relay_or_media}",
        f"udp dport {TURN_RANGE} udp sport != {relay_or_media}",
    )


class People:
    """Pages in contexts of their own (separate people), some with scripts that run before the page's own."""

    def __init__(self, browser: Browser) -> None:
        self.browser = browser
        self.contexts: list[Any] = []

    def open(self, url: str, *init_scripts: str) -> Page:
        context = self.browser.new_context(viewport={"width": 1000, "height": 700})
        self.contexts.append(context)
        for script in init_scripts:
            context.add_init_script(script)
        page = context.new_page()
        page.on("pageerror", lambda exc: print(f"[page error] {exc}"))
        page.goto(url)
        return page

    def close(self) -> None:
        for context in self.contexts:
            context.close()


def join_from_the_form(page: Page, name: str, *, always_relay: bool) -> None:
    """The join form (the link had no name): set "Always relay calls" in Settings as a person would, then
    join."""
    wait_for(lambda: page.get_by_role("button", name="Join now").is_visible(), 10, "the join form")
    page.get_by_role("button", name="Settings").click()
    relay = page.get_by_role("checkbox", name=RELAY_LABEL)
    relay.set_checked(always_relay)
    page.keyboard.press("Escape")
    assert page.get_by_role("dialog", name="Settings").is_hidden()
    page.get_by_label("Your name").fill(name)
    page.get_by_role("button", name="Join now").click()


def wait_video(
    page: Page, wanted: int, *, sfu: bool = False, frames: int = 30, timeout: float = 40
) -> list[dict]:
    """Until the page has `wanted` connections (only its two SFU ones when `sfu`), each with a succeeded pair,
    that together decode at least `frames` video frames per remote person. Returns those connections."""

    def enough() -> list[dict] | None:
        conns = [c for c in connections(page) if c["pc"].startswith("sfu:") or not sfu]
        paired = [c for c in conns if c["pair"] and c["pair"]["state"] == "succeeded"]
        people = len(remote_tiles(page))
        if (
            len(paired) == len(conns) == wanted
            and people
            and sum(c["frames"] for c in conns) >= frames * people
        ):
            return conns
        return None

    return wait_for(enough, timeout, f"{frames} decoded frames per person over {wanted} connections")


def _join_pair(
    people: People, server: Server, room: str, *scripts: str, base: str | None = None
) -> tuple[Page, Page]:
    base = base or server.url
    ada = people.open(f"{base}/r/{room}?name=Ada", *scripts)
    bob = people.open(f"{base}/r/{room}?name=Bob", *scripts)
    wait_for(lambda: remote_tiles(ada) == ["Bob"] and remote_tiles(bob) == ["Ada"], 15, "Ada and Bob to meet")
    return ada, bob


def test_always_relay_calls_go_through_our_turn(browser: Browser) -> None:
    server = start_turn_server()
    people = People(browser)
    try:
        ada = people.open(f"{server.url}/r/relayed")
        bob = people.open(f"{server.url}/r/relayed")
        join_from_the_form(ada, "Ada", always_relay=True)
        join_from_the_form(bob, "Bob", always_relay=True)
        wait_for(
            lambda: remote_tiles(ada) == ["Bob"] and remote_tiles(bob) == ["Ada"], 15, "Ada and Bob to meet"
        )

        # The node hands each of them time-limited TURN credentials beside its STUN server.
        turn = [s for s in ada.evaluate("window.huddle.iceServers") if any("turn:" in u for u in s["urls"])]
        assert len(turn) == 1, turn
        assert f"turn:127.0.0.1:{server.stun}?transport=udp" in turn[0]["urls"]
        assert f"turn:127.0.0.1:{server.stun}?transport=tcp" in turn[0]["urls"]
        expiry = int(turn[0]["username"].split(":", 1)[0])
        assert time.time() < expiry and turn[0]["credential"]

        # Video decodes both ways, and each side's selected pair joins two relayed addresses of our relay (its
        # port range): neither browser used a host or server-reflexive address of its own.
        for page in (ada, bob):
            (conn,) = wait_video(page, 1)
            assert conn["policy"] == "relay", conn
            for end in (conn["pair"]["local"], conn["pair"]["remote"]):
                assert end["type"] == "relay" and in_turn_range(end["port"]), conn
            print(f"relayed 1:1 pair: {conn['pair']}")

        # The setting is remembered in this browser: Ada's next visit starts with it on.
        again = ada.context.new_page()
        again.goto(f"{server.url}/r/relayed")
        again.get_by_role("button", name="Settings").click()
        assert again.get_by_role("checkbox", name=RELAY_LABEL).is_checked()
        assert again.evaluate("window.huddle.relayOnly") is True
    finally:
        people.close()
        stop_server(server)


def test_always_relay_reaches_the_sfu_through_our_turn(browser: Browser) -> None:
    server = start_turn_server("--sfu-always")
    people = People(browser)
    try:
        pages = [people.open(f"{server.url}/r/relayed-sfu") for _ in range(2)]
        for page, name in zip(pages, ("Ada", "Bob"), strict=True):
            join_from_the_form(page, name, always_relay=True)
        for page in pages:
            conns = wait_video(page, 2, sfu=True)
            assert {c["pc"] for c in conns} == {"sfu:publish", "sfu:subscribe"}, conns
            for conn in conns:
                # Our end is a relayed address; the other is the SFU's media port, reached from the relay.
                assert conn["policy"] == "relay", conn
                local, remote = conn["pair"]["local"], conn["pair"]["remote"]
                assert local["type"] == "relay" and in_turn_range(local["port"]), conn
                assert remote["port"] == server.media and remote["protocol"] == "udp", conn
    finally:
        people.close()
        stop_server(server)


def test_with_udp_blocked_a_1to1_call_goes_through_turn_over_tcp(browser: Browser) -> None:
    server = start_turn_server()
    people = People(browser)
    try:
        with dropping(*udp_only_for_the_relay(server)):
            # The control: without a TURN server the two browsers have no way to each other under these rules.
            ada, bob = _join_pair(people, server, "no-turn", WITHOUT_TURN_JS)
            time.sleep(12)
            for page in (ada, bob):
                conns = connections(page)
                assert all(c["frames"] == 0 for c in conns), conns
                assert not any(c["pair"] and c["pair"]["state"] == "succeeded" for c in conns), conns
            for page in (ada, bob):
                page.close()

            # With the node's TURN entry (and the setting off: ICE picks the path), they reach each other
            # through the relay, the browsers talking to it over TCP.
            ada, bob = _join_pair(people, server, "udp-blocked")
            for page in (ada, bob):
                (conn,) = wait_video(page, 1, timeout=45)
                assert conn["policy"] == "all", conn
                # Each browser's own end is its relayed address, reached over TCP (its UDP goes nowhere).
                local = conn["pair"]["local"]
                assert local["type"] == "relay" and local["relayProtocol"] == "tcp", conn
                assert in_turn_range(local["port"]), conn
                print(f"1:1 pair with UDP blocked: {conn['pair']}")
    finally:
        people.close()
        stop_server(server)


def test_with_udp_blocked_an_sfu_call_still_carries_video(browser: Browser) -> None:
    server = start_turn_server()
    people = People(browser)
    try:
        with dropping(*udp_only_for_the_relay(server)):
            # Three people: the third moves the call to the SFU. Cy always relays (TURN over TCP to the relay,
            # UDP from the relay to the SFU); Ada and Bob let ICE choose (ICE-TCP to the media port, or TURN).
            ada, bob = _join_pair(people, server, "udp-blocked-sfu")
            cy = people.open(f"{server.url}/r/udp-blocked-sfu")
            join_from_the_form(cy, "Cy", always_relay=True)
            pages = {"Ada": ada, "Bob": bob, "Cy": cy}
            for name, page in pages.items():
                wait_for(
                    lambda page=page: page.evaluate("window.huddle.mode") == "sfu", 20, f"{name} in SFU mode"
                )
                wait_for(lambda page=page: len(remote_tiles(page)) == 2, 15, f"{name} to see two others")
            for name, page in pages.items():
                conns = wait_video(page, 2, sfu=True, timeout=60)
                assert {c["pc"] for c in conns} == {"sfu:publish", "sfu:subscribe"}, (name, conns)
                for conn in conns:
                    local, remote = conn["pair"]["local"], conn["pair"]["remote"]
                    assert remote["port"] == server.media, (name, conn)
                    over_tcp = local["protocol"] == "tcp" and remote["protocol"] == "tcp"
                    relayed = local["type"] == "relay" and local["relayProtocol"] in ("tcp", "tls")
                    assert over_tcp or relayed, (name, conn)
                    if name == "Cy":
                        assert relayed, conn
                print(f"{name}'s SFU pairs with UDP blocked: {[c['pair'] for c in conns]}")
    finally:
        people.close()
        stop_server(server)


def test_a_firewall_that_passes_only_turn_over_tls(browser: Browser, certificate: RelayCertificate) -> None:
    server = start_turn_server(
        "--tls-cert", str(certificate.cert), "--tls-key", str(certificate.key), "--turn-tls-port", "0"
    )
    people = People(browser)
    try:
        # No UDP for the browsers, and no TCP to the STUN port (TURN over TCP) or the media port (ICE-TCP):
        # what is left is TURN over TLS, as behind a firewall that passes only TLS.
        rules = (*udp_only_for_the_relay(server), f"tcp dport {{ {server.stun}, {server.media} }}")
        with dropping(*rules):
            # With a certificate the node serves its page over HTTPS too, on the same port.
            ada, bob = _join_pair(people, server, "tls-only", base=f"https://127.0.0.1:{server.http}")
            urls = [url for entry in ada.evaluate("window.huddle.iceServers") for url in entry["urls"]]
            assert any(
                url.startswith("turns:127.0.0.1:") and url.endswith("?transport=tcp") for url in urls
            ), urls
            for page in (ada, bob):
                (conn,) = wait_video(page, 1, timeout=45)
                local = conn["pair"]["local"]
                assert local["type"] == "relay" and local["relayProtocol"] == "tls", conn
                assert in_turn_range(local["port"]), conn
    finally:
        people.close()
        stop_server(server)
