"""The relay's peer policy: nothing behind or inside the server, unless the operator allows it."""

from __future__ import annotations

import ipaddress

import pytest

from huddle.turn.peers import PeerPolicy, parse_networks


def teredo(server: str, client: str) -> str:
    """A Teredo address (RFC 4380): the client's IPv4 address is stored inverted."""
    value = (0x20010000 << 96) | (int(ipaddress.IPv4Address(server)) << 64)
    value |= int(ipaddress.IPv4Address(client)) ^ 0xFFFFFFFF
    return str(ipaddress.IPv6Address(value))


REFUSED = [
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("10.1.2.3", "private"),
    ("100.64.0.1", "shared"),
    ("100.127.255.254", "shared"),
    ("127.0.0.1", "loopback"),
    ("127.200.0.1", "loopback"),
    ("169.254.169.254", "link_local"),  # the cloud metadata service
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("255.255.255.255", "reserved"),
    ("240.0.0.1", "reserved"),
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("fe80::1", "link_local"),
    ("fe80::1%1", "link_local"),
    ("ff02::1", "multicast"),
    ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
    ("::ffff:10.0.0.1", "private"),
    ("::ffff:0.0.0.0", "unspecified"),
    ("::127.0.0.1", "loopback"),  # IPv4-compatible
    ("::ffff:0:a00:1", "private"),  # IPv4-translated
    ("64:ff9b::7f00:1", "loopback"),  # NAT64
    ("64:ff9b::c0a8:101", "private"),
    ("64:ff9b:1::1", "reserved"),  # NAT64 for local use
    ("2002:7f00:1::1", "loopback"),  # 6to4 of 127.0.0.1
    ("2002:a9fe:a9fe::1", "link_local"),  # 6to4 of 169.254.169.254
    (teredo("65.54.227.120", "10.0.0.1"), "private"),  # Teredo client behind the NAT
    (teredo("127.0.0.1", "8.8.8.8"), "loopback"),  # Teredo server
]

PERMITTED = [
    "8.8.8.8",
    "1.1.1.1",
    "100.63.255.255",
    "100.128.0.0",
    "172.32.0.1",
    "2001:4860:4860::8888",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
    "2002:808:808::1",
    teredo("65.54.227.120", "8.8.4.4"),
]


@pytest.mark.parametrize(("host", "why"), REFUSED)
def test_refused(host: str, why: str) -> None:
    policy = PeerPolicy()
    assert policy.reason(host) == why
    assert not policy.permits(host)


@pytest.mark.parametrize("host", PERMITTED)
def test_public_addresses_are_permitted(host: str) -> None:
    policy = PeerPolicy()
    assert policy.reason(host) is None
    assert policy.permits(host)


def test_the_servers_own_addresses_are_refused() -> None:
    policy = PeerPolicy(own=parse_networks("203.0.113.7/32,2001:db8::7/128"))
    assert policy.reason("203.0.113.7") == "own_address"
    assert policy.reason("2001:db8::7") == "own_address"
    assert policy.reason("::ffff:203.0.113.7") == "own_address"
    assert policy.reason("2002:cb00:7107::1") == "own_address"  # 6to4 form
    assert policy.permits("203.0.113.8")


def test_own_addresses_can_change_and_the_cache_follows() -> None:
    policy = PeerPolicy()
    assert policy.permits("203.0.113.7")
    policy.set_own(parse_networks("203.0.113.0/24"))
    assert not policy.permits("203.0.113.7")


def test_allow_list_overrides_every_refusal() -> None:
    policy = PeerPolicy(allow=parse_networks("127.0.0.0/8, ::1/128"), own=parse_networks("127.0.0.1/32"))
    assert policy.permits("127.0.0.1")
    assert policy.permits("127.0.0.2")
    assert policy.permits("::1")
    # Only what the CIDRs name: other refusals stand.
    assert not policy.permits("10.0.0.1")
    assert not policy.permits("::ffff:10.0.0.1")


def test_garbage_is_refused() -> None:
    policy = PeerPolicy()
    assert policy.reason("not an address") == "not_an_address"
    assert not policy.permits("")


def test_cache_stays_bounded() -> None:
    policy = PeerPolicy()
    for i in range(PeerPolicy.CACHE_SIZE + 10):
        policy.permits(str(ipaddress.IPv4Address(0x08000000 + i)))
    assert len(policy._cache) <= PeerPolicy.CACHE_SIZE


def test_parse_networks_rejects_bad_cidrs() -> None:
    assert parse_networks(None) == ()
    assert parse_networks("10.0.0.0/8,") == (ipaddress.ip_network("10.0.0.0/8"),)
    with pytest.raises(ValueError):
        parse_networks("10.0.0.0/33")


@pytest.mark.parametrize("host", ["203.0.113.7", "192.168.1.10"])  # a public own address, a LAN one
def test_the_nodes_sfu_port_is_the_one_own_endpoint_a_client_may_reach(host: str) -> None:
    own = parse_networks(f"{host}/32")
    policy = PeerPolicy(own=own, services={(host, 7882)})
    assert policy.permits(host)  # a permission for the address: some port of it is reachable
    assert policy.permits_peer(host, 7882)
    for port in (22, 7881, 8080, 3478):  # any other service of the host stays out of reach
        assert not policy.permits_peer(host, port)
    assert not PeerPolicy(own=own).permits(host)
    assert not policy.permits_peer("127.0.0.1", 7882)  # the port, on another refused host: no
