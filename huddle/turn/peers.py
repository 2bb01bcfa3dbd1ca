"""Which peers the TURN relay may send to: the public internet, and nothing behind or inside the server.

A relay is a way into whatever network it sits in (coturn's CVE-2020-26262 reached the server's own
loopback through 0.0.0.0 and ::1). So loopback, private, link-local, shared (CGNAT), multicast, reserved and
unspecified addresses are refused, IPv6 forms that carry an IPv4 address (mapped, compatible, translated,
NAT64, 6to4, Teredo) are judged by the IPv4 address inside them, and so are the server's own addresses.
`--turn-allow-peer` CIDRs are let through whatever they are: the operator's explicit word (tests allow
127.0.0.0/8, where the peers and the server itself live) overrides every refusal, the server's own addresses
included.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final

__all__ = ["PeerPolicy", "parse_networks", "refusal"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_V4_REFUSED: Final = tuple(
    (ipaddress.IPv4Network(cidr), why)
    for cidr, why in (
        ("0.0.0.0/8", "unspecified"),  # "this network": Linux delivers 0.0.0.0 to itself
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared"),  # carrier-grade NAT (RFC 6598)
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link_local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved"),  # IETF protocol assignments (RFC 6890)
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "reserved"),  # benchmarking, used inside networks (RFC 2544)
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),  # includes the limited broadcast 255.255.255.255
    )
)

_V6_REFUSED: Final = tuple(
    (ipaddress.IPv6Network(cidr), why)
    for cidr, why in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "reserved"),  # NAT64 for local use (RFC 8215): translates into private networks
        ("100::/64", "reserved"),  # discard-only
        ("fc00::/7", "private"),  # unique local
        ("fe80::/10", "link_local"),
        ("fec0::/10", "link_local"),  # site-local, deprecated but still routed by some
        ("ff00::/8", "multicast"),
    )
)

# IPv6 prefixes whose last 32 bits are an IPv4 address that the packet ends up at.
_EMBEDDING: Final = (
    ipaddress.IPv6Network("::/96"),  # IPv4-compatible (deprecated), which :: and ::1 also fall in
    ipaddress.IPv6Network("::ffff:0:0/96"),  # IPv4-mapped
    ipaddress.IPv6Network("::ffff:0:0:0/96"),  # IPv4-translated (SIIT)
    ipaddress.IPv6Network("64:ff9b::/96"),  # NAT64 well-known prefix
)


def parse_networks(text: str | None) -> tuple[Network, ...]:
    """Comma-separated CIDRs (as --turn-allow-peer takes them); raises ValueError on a bad one."""
    if not text:
        return ()
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip())


def _embedded_v4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    inside: list[ipaddress.IPv4Address] = []
    for prefix in _EMBEDDING:
        if ip in prefix:
            inside.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour is not None:
        inside.append(ip.sixtofour)
    if ip.teredo is not None:
        inside.extend(ip.teredo)  # the Teredo server, and the client behind its NAT
    return inside


def refusal(ip: IPAddress, own: Iterable[Network] = ()) -> str | None:
    """Why the relay must not send to `ip` (a short fixed word), or None if it may."""
    own = tuple(own)
    if isinstance(ip, ipaddress.IPv4Address):
        for network, why in _V4_REFUSED:
            if ip in network:
                return why
    else:
        if ip.scope_id:
            return "link_local"
        for network, why in _V6_REFUSED:
            if ip in network:
                return why
        for inner in _embedded_v4(ip):
            why = refusal(inner, own)
            if why is not None:
                return why
    if any(ip.version == network.version and ip in network for network in own):
        return "own_address"
    return None


_SERVICE: Final = "service"


class PeerPolicy:
    """`permits(host)` and `permits_peer(host, port)` for peer hosts as the kernel writes them; decisions are
    cached, since a Send indication asks once per packet. `own` (the server's addresses, as networks) can
    change at run time: `set_own` replaces it and forgets the cache.

    `services` are endpoints of this node that clients may reach through the relay although the policy
    refuses their address (it is the server's own, or private on a LAN): the SFU's media port, which a
    browser behind a UDP-blocking firewall reaches by TURN over TCP. Only those ports of those hosts."""

    CACHE_SIZE: Final = 4096

    def __init__(
        self,
        allow: Iterable[Network] = (),
        own: Iterable[Network] = (),
        services: Iterable[tuple[str, int]] = (),
    ) -> None:
        self.allow = tuple(allow)
        self._own = tuple(own)
        self._services = frozenset(services)
        self._service_hosts = frozenset(host for host, _ in self._services)
        self._cache: dict[str, bool | str] = {}

    def set_services(self, services: Iterable[tuple[str, int]]) -> None:
        self._services = frozenset(services)
        self._service_hosts = frozenset(host for host, _ in self._services)
        self._cache.clear()

    @property
    def own(self) -> tuple[Network, ...]:
        return self._own

    def set_own(self, own: Iterable[Network]) -> None:
        own = tuple(own)
        if own != self._own:
            self._own = own
            self._cache.clear()

    def permits(self, host: str) -> bool:
        """May a permission for `host` be installed (some port of it may be reachable)?"""
        return self._decide(host) is not False

    def permits_peer(self, host: str, port: int) -> bool:
        """May the relay send to (host, port)?"""
        decision = self._decide(host)
        return decision is True or (decision is _SERVICE and (host, port) in self._services)

    def _decide(self, host: str) -> bool | str:
        decision = self._cache.get(host)
        if decision is None:
            decision = self.reason(host) is None or (_SERVICE if host in self._service_hosts else False)
            if len(self._cache) >= self.CACHE_SIZE:
                self._cache.clear()  # a flood of distinct peers costs a re-check, never unbounded memory
            self._cache[host] = decision
        return decision

    def reason(self, host: str) -> str | None:
        """Why `host` is refused (see `refusal`), or None when it is permitted."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return "not_an_address"
        if any(ip.version == network.version and ip in network for network in self.allow):
            return None
        return refusal(ip, self._own)
