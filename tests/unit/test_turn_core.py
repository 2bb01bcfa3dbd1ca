"""The TURN state machine fed bytes and time: no sockets, a fake relay pool, a clock the tests move."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from huddle.stun.message import (
    ERROR_CODE,
    FINGERPRINT,
    NONCE,
    REALM,
    SOFTWARE,
    UNKNOWN_ATTRIBUTES,
    USERNAME,
    XOR_MAPPED_ADDRESS,
    MessageClass,
    StunMessage,
    decode_error_code,
    decode_unknown_attributes,
    encode,
    parse,
    verify_integrity,
)
from huddle.turn import attributes as a
from huddle.turn.core import (
    BANDWIDTH,
    FORBIDDEN_PEER,
    NO_CHANNEL,
    NO_PERMISSION,
    AllocationEnded,
    StreamClient,
    ToClient,
    ToPeer,
    TurnCore,
)
from huddle.turn.credentials import issue, long_term_key
from huddle.turn.peers import PeerPolicy, parse_networks

SECRET = b"core-test-secret"
NOW = 1_800_000_000.0
CLIENT = ("198.51.100.7", 40000)
PEER = ("203.0.113.9", 6000)
PEER6 = ("2001:db8::9", 6000)
RELAY_V4 = "192.0.2.1"
RELAY_V6 = "2001:db8::1"


class FakeRelay:
    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address


class FakePool:
    def __init__(self, size: int = 100, families: Sequence[int] = (socket.AF_INET, socket.AF_INET6)) -> None:
        self.size = size
        self.families = frozenset(families)
        self.open_relays: list[FakeRelay] = []
        self.closed: list[FakeRelay] = []
        self.asked: list[dict[str, Any]] = []
        self._next = 50000

    def open(self, family: int, *, even: bool, dont_fragment: bool) -> FakeRelay | None:
        self.asked.append({"family": family, "even": even, "dont_fragment": dont_fragment})
        if len(self.open_relays) >= self.size:
            return None
        self._next += 2
        relay = FakeRelay((RELAY_V4 if family == socket.AF_INET else RELAY_V6, self._next))
        self.open_relays.append(relay)
        return relay

    def close(self, relay: FakeRelay) -> None:
        self.open_relays.remove(relay)
        self.closed.append(relay)


def make_core(pool: FakePool | None = None, **options: Any) -> TurnCore:
    policy = PeerPolicy(own=parse_networks(f"{RELAY_V4}/32,{RELAY_V6}/128"))
    return TurnCore(secret=SECRET, pool=pool or FakePool(), policy=policy, **options)


def request(
    method: int,
    attributes: Sequence[tuple[int, bytes]] = (),
    *,
    username: str | None = None,
    password: str | None = None,
    nonce: str = "",
    realm: str = "huddle",
    transaction_id: bytes | None = None,
    message_class: MessageClass = MessageClass.REQUEST,
    fingerprint: bool = True,
) -> bytes:
    """What a TURN client sends: signed with the long-term key when a username is given."""
    message = StunMessage(method, message_class, transaction_id or os.urandom(12))
    for kind, value in attributes:
        message.add(kind, value)
    key = None
    if username is not None:
        message.add(USERNAME, username.encode())
        message.add(REALM, realm.encode())
        message.add(NONCE, nonce.encode())
        key = hashlib.md5(f"{username}:{realm}:{password}".encode()).digest()
    return encode(message, integrity_key=key, fingerprint=fingerprint)


def error_code(message: StunMessage) -> int | None:
    value = message.get(ERROR_CODE)
    return None if value is None else decode_error_code(value)[0]


def peer_attribute(host: str, port: int, transaction_id: bytes) -> tuple[int, bytes]:
    return a.XOR_PEER_ADDRESS, a.encode_xor_address(host, port, transaction_id)


class Client:
    """A client of the core, with credentials and the nonce it was last given."""

    def __init__(
        self,
        core: TurnCore,
        client: Any = CLIENT,
        identity: str = "alice",
        *,
        password: str | None = None,
        now: float = NOW,
    ) -> None:
        self.core = core
        self.client = client
        self.username, real_password = issue(SECRET, identity, now, 24 * 3600)
        self.password = password or real_password
        self.nonce = core.nonce(client, now)

    def send(
        self, method: int, attributes: Sequence[tuple[int, bytes]] = (), now: float = NOW, **kw: Any
    ) -> Any:
        data = request(
            method, attributes, username=self.username, password=self.password, nonce=self.nonce, **kw
        )
        return self.core.receive(data, self.client, now)

    def ask(self, method: int, attributes: Any = (), now: float = NOW, **kw: Any) -> StunMessage:
        """Send a request; return the response (checking it is signed with our key when it is a success)."""
        transaction_id = kw.pop("transaction_id", None) or os.urandom(12)
        if callable(attributes):
            attributes = attributes(transaction_id)
        out = self.send(method, attributes, now, transaction_id=transaction_id, **kw)
        assert isinstance(out, ToClient) and out.client == self.client
        response = parse(out.data)
        assert response.transaction_id == transaction_id
        if response.message_class == MessageClass.SUCCESS:
            assert verify_integrity(out.data, long_term_key(self.username, "huddle", SECRET))
        return response

    def allocate(self, *extra: tuple[int, bytes], now: float = NOW, **kw: Any) -> StunMessage:
        transport = (a.REQUESTED_TRANSPORT, a.encode_requested_transport(a.TRANSPORT_UDP))
        return self.ask(a.ALLOCATE, [transport, *extra], now, **kw)

    def relayed(self, response: StunMessage) -> tuple[int, str, int]:
        value = response.get(a.XOR_RELAYED_ADDRESS)
        assert value is not None
        return a.decode_xor_address(value, response.transaction_id)

    def permit(self, host: str, now: float = NOW) -> StunMessage:
        return self.ask(a.CREATE_PERMISSION, lambda tid: [peer_attribute(host, 1, tid)], now)

    def bind(self, number: int, peer: tuple[str, int], now: float = NOW) -> StunMessage:
        return self.ask(
            a.CHANNEL_BIND,
            lambda tid: [(a.CHANNEL_NUMBER, a.encode_channel_number(number)), peer_attribute(*peer, tid)],
            now,
        )

    def send_indication(self, peer: tuple[str, int], data: bytes, now: float = NOW) -> Any:
        tid = os.urandom(12)
        attributes = [peer_attribute(*peer, tid), (a.DATA, data)]
        indication = request(a.SEND, attributes, transaction_id=tid, message_class=MessageClass.INDICATION)
        return self.core.receive(indication, self.client, now)


@pytest.fixture
def pool() -> FakePool:
    return FakePool()


@pytest.fixture
def core(pool: FakePool) -> TurnCore:
    return make_core(pool)


@pytest.fixture
def alice(core: TurnCore) -> Client:
    return Client(core)


# --- authentication -------------------------------------------------------------------------------


def test_unauthenticated_allocate_is_challenged_with_realm_and_nonce(core: TurnCore, pool: FakePool) -> None:
    transport = (a.REQUESTED_TRANSPORT, a.encode_requested_transport(a.TRANSPORT_UDP))
    out = core.receive(request(a.ALLOCATE, [transport]), CLIENT, NOW)
    assert isinstance(out, ToClient)
    response = parse(out.data)
    assert error_code(response) == 401
    assert response.get(REALM) == b"huddle"
    nonce = response.get(NONCE)
    assert nonce
    assert not pool.asked
    # The nonce we were given is one the core takes.
    alice = Client(core)
    alice.nonce = nonce.decode()
    assert alice.allocate().message_class == MessageClass.SUCCESS


def test_allocate_gives_a_relay_address_with_the_default_lifetime(alice: Client, pool: FakePool) -> None:
    response = alice.allocate()
    assert response.message_class == MessageClass.SUCCESS
    assert alice.relayed(response) == (socket.AF_INET, RELAY_V4, pool.open_relays[0].address[1])
    assert a.decode_lifetime(response.get(a.LIFETIME)) == 600
    mapped = response.get(XOR_MAPPED_ADDRESS)
    assert a.decode_xor_address(mapped, response.transaction_id)[1:] == CLIENT
    assert response.get(SOFTWARE) is not None
    assert response.attributes[-1].type == FINGERPRINT


def test_wrong_password_gets_401_and_no_relay(core: TurnCore, pool: FakePool) -> None:
    mallory = Client(core, password="guessed")
    response = mallory.allocate()
    assert error_code(response) == 401
    assert response.get(NONCE)
    assert not pool.asked and len(core) == 0


def test_forged_username_signed_with_its_own_password_gets_401(core: TurnCore, pool: FakePool) -> None:
    mallory = Client(core)
    mallory.username = mallory.username.replace("alice", "admin")  # the password is alice's
    assert error_code(mallory.allocate()) == 401
    assert not pool.asked


def test_expired_username_gets_401(core: TurnCore, pool: FakePool) -> None:
    old = Client(core, now=NOW - 2 * 24 * 3600)
    old.nonce = core.nonce(CLIENT, NOW)
    assert error_code(old.allocate()) == 401
    assert not pool.asked


def test_username_without_expiry_gets_401(core: TurnCore) -> None:
    eve = Client(core)
    eve.username = "alice"
    eve.password = issue(SECRET, "x", NOW, 10)[1]
    assert error_code(eve.allocate()) == 401


def test_stale_nonce_gets_438_and_a_fresh_nonce_that_works(alice: Client) -> None:
    later = NOW + 601
    response = alice.allocate(now=later)
    assert error_code(response) == 438
    fresh = response.get(NONCE)
    assert fresh and fresh.decode() != alice.nonce
    alice.nonce = fresh.decode()
    assert alice.allocate(now=later).message_class == MessageClass.SUCCESS


def test_nonce_from_another_address_is_stale(core: TurnCore) -> None:
    alice = Client(core)
    alice.nonce = core.nonce(("198.51.100.99", 1), NOW)
    assert error_code(alice.allocate()) == 438


def test_missing_username_with_integrity_gets_400(core: TurnCore) -> None:
    message = StunMessage(a.ALLOCATE, MessageClass.REQUEST, os.urandom(12))
    message.add(a.REQUESTED_TRANSPORT, a.encode_requested_transport(17))
    out = core.receive(encode(message, integrity_key=b"k" * 16), CLIENT, NOW)
    assert error_code(parse(out.data)) == 400


def test_unknown_required_attribute_gets_420(alice: Client) -> None:
    response = alice.allocate((0x0077, b"x"))
    assert error_code(response) == 420
    assert decode_unknown_attributes(response.get(UNKNOWN_ATTRIBUTES)) == (0x0077,)


def test_unknown_optional_attribute_is_ignored(alice: Client) -> None:
    assert alice.allocate((0x8077, b"x")).message_class == MessageClass.SUCCESS


# --- Allocate -------------------------------------------------------------------------------------


def test_retransmitted_allocate_gets_the_same_answer_another_gets_437(alice: Client, pool: FakePool) -> None:
    tid = os.urandom(12)
    first = alice.allocate(transaction_id=tid)
    again = alice.allocate(transaction_id=tid)
    assert encode(first) == encode(again)
    assert len(pool.open_relays) == 1
    assert error_code(alice.allocate()) == 437


@pytest.mark.parametrize(("protocol", "code"), [(6, 442), (132, 442)])
def test_transport_other_than_udp_gets_442(core: TurnCore, protocol: int, code: int) -> None:
    alice = Client(core)
    response = alice.ask(a.ALLOCATE, [(a.REQUESTED_TRANSPORT, a.encode_requested_transport(protocol))])
    assert error_code(response) == code
    assert len(core) == 0


def test_missing_requested_transport_gets_400(alice: Client) -> None:
    assert error_code(alice.ask(a.ALLOCATE)) == 400


def test_ipv6_relay_on_request(alice: Client, pool: FakePool) -> None:
    family = (a.REQUESTED_ADDRESS_FAMILY, a.encode_requested_address_family(a.FAMILY_IPV6))
    response = alice.allocate(family)
    assert alice.relayed(response)[:2] == (socket.AF_INET6, RELAY_V6)


def test_family_without_relay_addresses_gets_440() -> None:
    core = make_core(FakePool(families=[socket.AF_INET]))
    alice = Client(core)
    family = (a.REQUESTED_ADDRESS_FAMILY, a.encode_requested_address_family(a.FAMILY_IPV6))
    assert error_code(alice.allocate(family)) == 440
    unknown = (a.REQUESTED_ADDRESS_FAMILY, a.encode_requested_address_family(3))
    assert error_code(alice.allocate(unknown)) == 440


def test_even_port_without_reservation_is_served_with_one_508(alice: Client, pool: FakePool) -> None:
    assert error_code(alice.allocate((a.EVEN_PORT, a.encode_even_port(True)))) == 508
    assert error_code(alice.allocate((a.RESERVATION_TOKEN, bytes(8)))) == 508
    response = alice.allocate((a.EVEN_PORT, a.encode_even_port(False)))
    assert response.message_class == MessageClass.SUCCESS
    assert pool.asked[-1]["even"] is True


def test_dont_fragment_reaches_the_pool(alice: Client, pool: FakePool) -> None:
    alice.allocate((a.DONT_FRAGMENT, b""))
    assert pool.asked[-1]["dont_fragment"] is True


def test_per_user_quota_gets_486(core: TurnCore) -> None:
    core.user_quota = 2
    for port in (1, 2):
        assert Client(core, ("198.51.100.7", port)).allocate().message_class == MessageClass.SUCCESS
    assert error_code(Client(core, ("198.51.100.7", 3)).allocate()) == 486
    # Another user is not held back by alice's quota.
    assert Client(core, ("198.51.100.7", 4), "bob").allocate().message_class == MessageClass.SUCCESS


def test_total_quota_gets_486(core: TurnCore) -> None:
    core.total_quota = 2
    for port, name in ((1, "a"), (2, "b")):
        Client(core, ("198.51.100.7", port), name).allocate()
    assert error_code(Client(core, ("198.51.100.7", 3), "c").allocate()) == 486


def test_no_free_relay_port_gets_508() -> None:
    pool = FakePool(size=1)
    core = make_core(pool)
    Client(core, ("198.51.100.7", 1)).allocate()
    assert error_code(Client(core, ("198.51.100.7", 2)).allocate()) == 508


# --- lifetimes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("asked", "given"), [(1, 600), (1200, 1200), (10**6, 3600)])
def test_requested_lifetime_is_bounded(alice: Client, asked: int, given: int) -> None:
    response = alice.allocate((a.LIFETIME, a.encode_lifetime(asked)))
    assert a.decode_lifetime(response.get(a.LIFETIME)) == given


def test_allocation_expires_and_frees_its_port(core: TurnCore, alice: Client, pool: FakePool) -> None:
    alice.allocate()
    alice.bind(0x4001, PEER)
    assert core.channel_data(a.encode_channel_data(0x4001, b"x"), CLIENT, NOW + 600) is None
    alice.nonce = core.nonce(CLIENT, NOW + 600)
    assert error_code(alice.ask(a.REFRESH, [], NOW + 600)) == 437  # before the timer came round
    assert len(pool.closed) == 1
    alice.allocate(now=NOW + 600)
    core.expire(NOW + 1199)
    assert len(core) == 1
    core.expire(NOW + 1200)
    assert len(core) == 0 and len(pool.closed) == 2
    assert isinstance(core.events[-1], AllocationEnded) and core.events[-1].reason == "expired"


def test_refresh_extends_and_zero_deletes(core: TurnCore, alice: Client, pool: FakePool) -> None:
    alice.allocate()
    response = alice.ask(a.REFRESH, [(a.LIFETIME, a.encode_lifetime(900))], NOW + 500)
    assert a.decode_lifetime(response.get(a.LIFETIME)) == 900
    core.expire(NOW + 1300)
    assert len(core) == 1
    alice.nonce = core.nonce(CLIENT, NOW + 1300)  # the first one went stale after 600 s
    response = alice.ask(a.REFRESH, [(a.LIFETIME, a.encode_lifetime(0))], NOW + 1300)
    assert response.message_class == MessageClass.SUCCESS
    assert len(core) == 0 and len(pool.closed) == 1
    assert error_code(alice.ask(a.REFRESH, [], NOW + 1301)) == 437


def test_refresh_with_other_credentials_gets_441(core: TurnCore, alice: Client) -> None:
    alice.allocate()
    bob = Client(core, CLIENT, "bob")
    assert error_code(bob.ask(a.REFRESH)) == 441


def test_refresh_with_another_family_gets_443(alice: Client) -> None:
    alice.allocate()
    family = (a.REQUESTED_ADDRESS_FAMILY, a.encode_requested_address_family(a.FAMILY_IPV6))
    assert error_code(alice.ask(a.REFRESH, [family])) == 443


# --- permissions, Send and Data -------------------------------------------------------------------


def test_no_data_from_a_peer_without_permission(core: TurnCore, alice: Client, pool: FakePool) -> None:
    alice.allocate()
    relay = pool.open_relays[0]
    assert core.from_peer(relay, b"knock", PEER, NOW) is None
    assert core.dropped[NO_PERMISSION] == 1


def test_permission_lets_data_both_ways_until_it_expires(
    core: TurnCore, alice: Client, pool: FakePool
) -> None:
    alice.allocate()
    relay = pool.open_relays[0]
    assert alice.permit(PEER[0]).message_class == MessageClass.SUCCESS
    out = alice.send_indication(PEER, b"hello", NOW + 1)
    assert out == ToPeer(relay, PEER, b"hello")
    back = core.from_peer(relay, b"world", PEER, NOW + 2)
    assert back is not None and back[0] == CLIENT
    data = parse(back[1])
    assert (data.method, data.message_class) == (a.DATA_INDICATION, MessageClass.INDICATION)
    assert data.get(a.DATA) == b"world"
    assert a.decode_xor_address(data.get(a.XOR_PEER_ADDRESS), data.transaction_id)[1:] == PEER
    # Permissions are per IP: any port of the peer.
    assert core.from_peer(relay, b"other port", (PEER[0], 7), NOW + 3) is not None
    # ... and last 300 s.
    assert core.from_peer(relay, b"late", PEER, NOW + 300) is None
    assert alice.send_indication(PEER, b"late", NOW + 300) is None
    core.expire(NOW + 300)
    assert core.counts()["permissions"] == 0


def test_ipv6_peer_data_indication(core: TurnCore, alice: Client, pool: FakePool) -> None:
    alice.allocate((a.REQUESTED_ADDRESS_FAMILY, a.encode_requested_address_family(a.FAMILY_IPV6)))
    relay = pool.open_relays[0]
    alice.permit(PEER6[0])
    assert alice.send_indication(PEER6, b"x") == ToPeer(relay, PEER6, b"x")
    back = core.from_peer(relay, b"y", (*PEER6, 0, 0), NOW)
    data = parse(back[1])
    assert a.decode_xor_address(data.get(a.XOR_PEER_ADDRESS), data.transaction_id)[1:] == PEER6


@pytest.mark.parametrize("host", ["127.0.0.1", "10.0.0.1", "0.0.0.0", "::1", "::ffff:127.0.0.1", RELAY_V4])
def test_refused_peer_gets_403_on_permission_and_channel_and_send_is_dropped(
    core: TurnCore, pool: FakePool, host: str
) -> None:
    alice = Client(core)
    v6 = ":" in host
    if v6:
        alice.allocate((a.REQUESTED_ADDRESS_FAMILY, a.encode_requested_address_family(a.FAMILY_IPV6)))
    else:
        alice.allocate()
    relay = pool.open_relays[0]
    assert error_code(alice.permit(host)) == 403
    assert error_code(alice.bind(0x4000, (host, 5000))) == 403
    assert alice.send_indication((host, 5000), b"payload") is None
    assert core.dropped[FORBIDDEN_PEER] == 3
    assert core.counts() == {"allocations": 1, "permissions": 0, "channels": 0}
    assert core.from_peer(relay, b"in", (host, 5000), NOW) is None
    assert core.packets_to_peer == core.packets_to_client == 0


def test_one_refused_peer_refuses_the_whole_create_permission(core: TurnCore, alice: Client) -> None:
    alice.allocate()
    response = alice.ask(
        a.CREATE_PERMISSION, lambda tid: [peer_attribute(*PEER, tid), peer_attribute("192.168.0.1", 1, tid)]
    )
    assert error_code(response) == 403
    assert core.counts()["permissions"] == 0


def test_peer_of_the_other_family_gets_443(alice: Client) -> None:
    alice.allocate()
    assert error_code(alice.permit(PEER6[0])) == 443


def test_create_permission_without_peer_gets_400(alice: Client) -> None:
    alice.allocate()
    assert error_code(alice.ask(a.CREATE_PERMISSION)) == 400


def test_requests_without_allocation_get_437(alice: Client) -> None:
    assert error_code(alice.permit(PEER[0])) == 437
    assert error_code(alice.bind(0x4000, PEER)) == 437


# --- channels -------------------------------------------------------------------------------------


def test_channel_carries_data_both_ways(core: TurnCore, alice: Client, pool: FakePool) -> None:
    alice.allocate()
    relay = pool.open_relays[0]
    assert alice.bind(0x4001, PEER).message_class == MessageClass.SUCCESS
    assert core.counts() == {"allocations": 1, "permissions": 1, "channels": 1}
    assert core.channel_data(a.encode_channel_data(0x4001, b"up"), CLIENT, NOW) == (relay, PEER, b"up")
    # A UDP datagram may carry bytes after the data: they are not relayed.
    assert core.channel_data(b"\x40\x01\x00\x02up\x00\x00", CLIENT, NOW) == (relay, PEER, b"up")
    assert core.from_peer(relay, b"down", PEER, NOW) == (CLIENT, a.encode_channel_data(0x4001, b"down"))
    assert core.packets_to_peer == 2 and core.bytes_to_peer == 4
    assert core.packets_to_client == 1 and core.bytes_to_client == 4


def test_channel_data_over_a_stream_is_padded_and_ends_with_the_connection(
    core: TurnCore, pool: FakePool
) -> None:
    stream = StreamClient(("198.51.100.7", 40001), "tcp")
    alice = Client(core, stream)
    alice.allocate()
    relay = pool.open_relays[0]
    alice.bind(0x4001, PEER)
    assert core.holds(stream)
    assert core.from_peer(relay, b"down!", PEER, NOW) == (
        stream,
        a.encode_channel_data(0x4001, b"down!", stream=True),
    )
    core.client_closed(stream)
    assert not core.holds(stream) and pool.closed == [relay]


def test_unbound_or_malformed_channel_data_is_dropped(core: TurnCore, alice: Client) -> None:
    assert core.channel_data(a.encode_channel_data(0x4001, b"x"), CLIENT, NOW) is None  # no allocation
    alice.allocate()
    alice.bind(0x4001, PEER)
    assert core.channel_data(a.encode_channel_data(0x4002, b"x"), CLIENT, NOW) is None
    assert core.channel_data(b"\x40\x01\x00\x09short", CLIENT, NOW) is None
    assert core.channel_data(b"\x40\x01", CLIENT, NOW) is None
    assert core.packets_to_peer == 0
    assert core.dropped[NO_CHANNEL] == 1


@pytest.mark.parametrize("number", [0x3FFF, 0x8000, 0xFFFF])
def test_channel_number_out_of_range_gets_400(alice: Client, number: int) -> None:
    alice.allocate()
    assert error_code(alice.bind(number, PEER)) == 400


def test_channel_binding_rules(core: TurnCore, alice: Client) -> None:
    alice.allocate()
    other = ("203.0.113.10", 6000)
    assert alice.bind(0x4001, PEER).message_class == MessageClass.SUCCESS
    # Same channel, same peer: a refresh.
    assert alice.bind(0x4001, PEER, NOW + 100).message_class == MessageClass.SUCCESS
    # The channel is bound to another peer, and the peer to another channel.
    assert error_code(alice.bind(0x4001, other)) == 400
    assert error_code(alice.bind(0x4002, PEER)) == 400
    # The same IP at another port is another transport address.
    assert alice.bind(0x4002, (PEER[0], 6001)).message_class == MessageClass.SUCCESS
    # Once expired (600 s after the last refresh), both may be bound anew.
    alice.ask(a.REFRESH, [(a.LIFETIME, a.encode_lifetime(3600))], NOW + 100)
    later = NOW + 100 + 600
    alice.nonce = core.nonce(CLIENT, later)
    assert core.channel_data(a.encode_channel_data(0x4001, b"x"), CLIENT, later) is None
    assert alice.bind(0x4001, other, later).message_class == MessageClass.SUCCESS
    assert alice.bind(0x4003, PEER, later).message_class == MessageClass.SUCCESS
    core.expire(later + 1)
    assert core.counts()["channels"] == 2


def test_channel_needs_its_permission_refreshed(core: TurnCore, alice: Client, pool: FakePool) -> None:
    alice.allocate()
    alice.bind(0x4001, PEER)
    frame = a.encode_channel_data(0x4001, b"x")
    # The binding lasts 600 s but the permission it installed 300 s.
    assert core.channel_data(frame, CLIENT, NOW + 301) is None
    assert core.dropped[NO_PERMISSION] == 1
    alice.permit(PEER[0], NOW + 301)
    assert core.channel_data(frame, CLIENT, NOW + 302) is not None


# --- bandwidth ------------------------------------------------------------------------------------


def test_bandwidth_cap_drops_and_counts(pool: FakePool) -> None:
    core = make_core(pool, bandwidth_kbps=80)  # 10,000 bytes a second, as much in a burst
    alice = Client(core)
    alice.allocate()
    relay = pool.open_relays[0]
    alice.bind(0x4001, PEER)
    frame = a.encode_channel_data(0x4001, bytes(1000))
    sent = sum(core.channel_data(frame, CLIENT, NOW) is not None for _ in range(30))
    assert sent == 10
    assert core.dropped[BANDWIDTH] == 20
    # Tokens come back with time: half a second, half the rate.
    assert sum(core.channel_data(frame, CLIENT, NOW + 0.5) is not None for _ in range(30)) == 5
    # The other direction has its own bucket.
    assert sum(core.from_peer(relay, bytes(1000), PEER, NOW) is not None for _ in range(30)) == 10


# --- robustness -----------------------------------------------------------------------------------


def test_responses_and_other_indications_are_dropped(core: TurnCore, alice: Client) -> None:
    alice.allocate()
    assert core.receive(request(a.ALLOCATE, message_class=MessageClass.SUCCESS), CLIENT, NOW) is None
    assert (
        core.receive(request(a.DATA_INDICATION, message_class=MessageClass.INDICATION), CLIENT, NOW) is None
    )
    assert core.receive(b"\x00\x01\x00\x00not stun", CLIENT, NOW) is None


def test_bad_fingerprint_is_dropped_silently(alice: Client) -> None:
    alice.allocate()
    data = bytearray(request(a.REFRESH))
    data[-1] ^= 1
    assert alice.core.receive(bytes(data), CLIENT, NOW) is None


def test_unknown_method_gets_400(core: TurnCore) -> None:
    out = core.receive(request(0x0FF), CLIENT, NOW)
    assert error_code(parse(out.data)) == 400


@settings(max_examples=300)
@given(st.binary(max_size=200), st.sampled_from([0, 0x40, 0x00]))
def test_core_never_raises_on_random_input(data: bytes, first: int) -> None:
    core = make_core(FakePool())
    alice = Client(core)
    alice.allocate()
    alice.bind(0x4001, PEER)
    if first and data:
        data = bytes([first]) + data[1:]
    for message in (data, request(a.REFRESH)[:20] + data, bytes([0x00, 0x16]) + data[2:]):
        out = core.receive(message, CLIENT, NOW)
        assert out is None or isinstance(out, ToClient | ToPeer)
    core.channel_data(data, CLIENT, NOW)
    core.from_peer(FakeRelay(("192.0.2.1", 1)), data, PEER, NOW)
