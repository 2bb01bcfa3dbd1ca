"""The TURN relay's asyncio edge: relay sockets, the TLS listener, the expiry timer, and the counters.

The client side shares the node's STUN port (stun/server.py hands over everything there that is not a
Binding request, over UDP and TCP, and over TLS from the listener here). Relay addresses are UDP sockets
bound on the node's host, one per allocation, at a port from --turn-ports; each is read, as the SFU's port
is, in bounded batches straight off the socket. All decisions are `TurnCore`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
import ssl
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from huddle.logs import event
from huddle.metrics import Metrics
from huddle.stun.server import StunServer
from huddle.turn.core import (
    AllocationEnded,
    AllocationStarted,
    Relay,
    StreamClient,
    ToPeer,
    TurnCore,
)
from huddle.turn.peers import Network, PeerPolicy

__all__ = ["EDGE_DROP_REASONS", "TurnServer", "local_networks", "relay_addresses"]

log = logging.getLogger("huddle.turn")

READ_BATCH: Final = 64  # datagrams read per readiness event before the loop gets a turn
RECV_SIZE: Final = 65535  # recvfrom() shrinks the buffer to the datagram: a large one costs nothing extra
TICK_SECONDS: Final = 1.0  # how often expired allocations, permissions and channels are forgotten
OWN_ADDRESSES_SECONDS: Final = 30.0  # how often the server's own addresses are read again
BIND_ATTEMPTS: Final = 32  # random ports tried in a large range before giving up (508)
STREAM_BUFFER_LIMIT: Final = 256 * 1024  # relayed data a TCP client has not read yet, before more is dropped
TLS_HANDSHAKE_TIMEOUT: Final = 10.0
# Linux's values: Python's socket module does not name them.
IP_MTU_DISCOVER: Final = 10
IP_PMTUDISC_DO: Final = 2

SEND_ERROR: Final = "send_error"
CLIENT_BUFFER_FULL: Final = "client_buffer_full"
ICMP_ERROR: Final = "icmp_error"
NOT_READY: Final = "not_ready"
INTERNAL_ERROR: Final = "internal_error"
EDGE_DROP_REASONS: Final = (SEND_ERROR, CLIENT_BUFFER_FULL, ICMP_ERROR, NOT_READY, INTERNAL_ERROR)

Addresses = dict[int, tuple[str, str]]  # socket family -> (host to bind, host to tell clients)


def relay_addresses(host: str, announce: str) -> Addresses:
    """Where relay sockets are bound and what clients are told, from the node's --host and the address it
    announces: the host's family only, or both when the host is "::" (IPv4 then announced as `announce`
    if that is IPv4, IPv6 as `announce` if that is IPv6, else as ::1)."""
    announced = ipaddress.ip_address(announce)
    if host in ("", "0.0.0.0"):
        return {socket.AF_INET: ("0.0.0.0", announce if announced.version == 4 else "127.0.0.1")}
    if host == "::":
        return {
            socket.AF_INET: ("0.0.0.0", announce if announced.version == 4 else "127.0.0.1"),
            socket.AF_INET6: ("::", announce if announced.version == 6 else "::1"),
        }
    bound = ipaddress.ip_address(host)
    family = socket.AF_INET if bound.version == 4 else socket.AF_INET6
    return {family: (host, announce if announced.version == bound.version else host)}


def local_networks(extra: Iterable[str] = ()) -> tuple[Network, ...]:
    """This host's own addresses (what its interfaces answer to), as Linux lists them for the network
    namespace we run in, plus `extra` hosts (the announced ones, which NAT may put elsewhere)."""
    found: dict[Network, None] = {}
    with contextlib.suppress(OSError):
        # IPv4: every route of type LOCAL ("/32 host LOCAL" under the address it belongs to).
        current = None
        for line in Path("/proc/net/fib_trie").read_text().splitlines():
            text = line.strip()
            if text.startswith("|-- "):
                current = text[4:]
            elif current is not None and text.startswith("/") and text.endswith(" LOCAL"):
                with contextlib.suppress(ValueError):
                    found[ipaddress.ip_network(f"{current}{text.split()[0]}", strict=False)] = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            raw = line.split()[0] if line.strip() else ""
            with contextlib.suppress(ValueError):
                found[ipaddress.ip_network(ipaddress.IPv6Address(int(raw, 16)))] = None
    for host in extra:
        with contextlib.suppress(ValueError):
            found[ipaddress.ip_network(host)] = None
    return tuple(found)


class _RelaySocket:
    """One allocation's relay transport address."""

    __slots__ = ("address", "family", "sock")

    def __init__(self, sock: socket.socket, family: int, address: tuple[str, int]) -> None:
        self.sock = sock
        self.family = family
        self.address = address


class _Stream(StreamClient):
    """A TCP or TLS client connection, with what writes to it."""

    __slots__ = ("writer",)

    def __init__(self, address: tuple[Any, ...], transport: str, writer: asyncio.StreamWriter) -> None:
        super().__init__(address, transport)
        self.writer = writer


class _Pool:
    """Relay sockets from the configured port range (the `RelayPool` that TurnCore opens and closes)."""

    def __init__(self, server: TurnServer, addresses: Addresses, ports: tuple[int, int]) -> None:
        self._server = server
        self._addresses = addresses
        self._low, self._high = ports
        self._held: set[tuple[int, int]] = set()
        self._loop = asyncio.get_running_loop()
        self.families = frozenset(addresses)

    def __len__(self) -> int:
        return len(self._held)

    def _candidates(self, even: bool) -> Iterable[int]:
        low, high = self._low, self._high
        size = high - low + 1
        if size <= BIND_ATTEMPTS * 2:
            # A small range: every port once, from a random start.
            start = random.randrange(size)
            ports: Iterable[int] = (low + (start + i) % size for i in range(size))
        else:
            ports = (random.randint(low, high) for _ in range(BIND_ATTEMPTS))
        return (port for port in ports if not (even and port & 1))

    def open(self, family: int, *, even: bool, dont_fragment: bool) -> _RelaySocket | None:
        bind_host, announced = self._addresses[family]
        for port in self._candidates(even):
            if (family, port) in self._held:
                continue
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                if family == socket.AF_INET6:
                    # An IPv6 relay reaches IPv6 peers only: no IPv4-mapped way around the peer policy.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    if dont_fragment:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DONTFRAG, 1)
                elif dont_fragment:
                    sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
                sock.bind((bind_host, port))
            except OSError:
                sock.close()
                continue
            relay = _RelaySocket(sock, family, (announced, port))
            self._held.add((family, port))
            self._loop.add_reader(sock.fileno(), self._server._relay_readable, relay)
            return relay
        return None

    def close(self, relay: Relay) -> None:
        assert isinstance(relay, _RelaySocket)
        self._held.discard((relay.family, relay.address[1]))
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(relay.sock.fileno())
        relay.sock.close()


class TurnServer:
    """The TURN relay of one node. Hand it to `StunServer(turn=...)` before that starts; `start` it once the
    secret is known (credentials from before then are not taken); `close` it before the STUN server."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        ports: tuple[int, int],
        allow: Iterable[Network] = (),
        user_quota: int = 10,
        total_quota: int = 1000,
        bandwidth_kbps: int = 10_000,
        software: str = "huddle",
    ) -> None:
        self.ports = ports
        self.policy = PeerPolicy(allow)
        self.user_quota = user_quota
        self.total_quota = total_quota
        self.bandwidth_kbps = bandwidth_kbps
        self.software = software
        self.core: TurnCore | None = None
        self.tls_port: int | None = None
        self._pool: _Pool | None = None
        self._udp: socket.socket | None = None
        self._tls: asyncio.Server | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._own_extra: tuple[str, ...] = ()
        self._own_read = 0.0
        self.dropped = dict.fromkeys(EDGE_DROP_REASONS, 0)
        metrics.watch_turn(self)

    async def start(
        self,
        *,
        secret: bytes,
        host: str,
        addresses: Addresses,
        stun: StunServer,
        tls_port: int | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        """Relay from `addresses` (see `relay_addresses`); serve TURN over TLS on `host` (the node's, "::" or
        "": every address) port `tls_port` (0: any) with `tls_cert` and `tls_key`, connections then served by
        `stun` as over TCP."""
        if self.core is not None:
            raise RuntimeError("TurnServer already started")
        loop = asyncio.get_running_loop()
        self._pool = _Pool(self, addresses, self.ports)
        self._own_extra = tuple(announced for _, announced in addresses.values())
        self._refresh_own(time.monotonic())
        self.core = TurnCore(
            secret=secret,
            pool=self._pool,
            policy=self.policy,
            user_quota=self.user_quota,
            total_quota=self.total_quota,
            bandwidth_kbps=self.bandwidth_kbps,
            software=self.software,
        )
        if tls_cert and tls_key and tls_port is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(tls_cert, tls_key)
            self._tls = await asyncio.start_server(
                lambda reader, writer: stun.serve_stream(reader, writer, "tls"),
                None if host in ("", "::") else host,
                tls_port,
                ssl=context,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
                reuse_address=True,
            )
            self.tls_port = int(self._tls.sockets[0].getsockname()[1])
        self._tick = loop.call_later(TICK_SECONDS, self._on_tick)
        event(
            log,
            logging.INFO,
            "TURN relay",
            relay=",".join(announced for _, announced in addresses.values()),
            ports=f"{self.ports[0]}-{self.ports[1]}",
            tls_port=self.tls_port,
        )

    async def close(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        if self._tls is not None:
            self._tls.close()
            await self._tls.wait_closed()
            self._tls = None
        if self.core is not None:
            self.core.close()
            self._log_events()

    # -- Timers -------------------------------------------------------------------------------------------

    def _on_tick(self) -> None:
        try:
            assert self.core is not None
            self.core.expire(time.time())
            self._refresh_own(time.monotonic())
            self._log_events()
        finally:
            self._tick = asyncio.get_running_loop().call_later(TICK_SECONDS, self._on_tick)

    def _refresh_own(self, now: float) -> None:
        if now - self._own_read >= OWN_ADDRESSES_SECONDS or not self._own_read:
            self.policy.set_own(local_networks(self._own_extra))
            self._own_read = now

    def _log_events(self) -> None:
        assert self.core is not None
        events = self.core.events
        while events:
            item = events.popleft()
            if isinstance(item, AllocationStarted):
                event(log, logging.DEBUG, "TURN allocation", relay=item.relay, user=item.identity)
            elif isinstance(item, AllocationEnded):
                event(log, logging.DEBUG, "TURN allocation ended", relay=item.relay, reason=item.reason)

    # -- From clients (the STUN port's TurnHandler) -------------------------------------------------------

    def attach_udp(self, sock: socket.socket) -> None:
        self._udp = sock

    def datagram(self, data: bytes, addr: tuple[Any, ...]) -> None:
        core = self.core
        if core is None:
            self.dropped[NOT_READY] += 1
            return
        if 0x40 <= data[0] <= 0x7F:
            out = core.channel_data(data, addr, time.time())
            if out is not None:
                self._to_peer(*out)
            return
        self._deliver(core.receive(data, addr, time.time()))

    def open_stream(self, writer: asyncio.StreamWriter, peer: tuple[Any, ...], transport: str) -> _Stream:
        return _Stream(peer, transport, writer)

    def stream_frame(self, stream: _Stream, frame: bytes) -> bool:
        core = self.core
        if core is None:
            self.dropped[NOT_READY] += 1
            return False
        if 0x40 <= frame[0] <= 0x7F:
            out = core.channel_data(frame, stream, time.time())
            if out is None:
                return False
            self._to_peer(*out)
            return True
        reply = core.receive(frame, stream, time.time())
        self._deliver(reply)
        return reply is not None

    def holds(self, stream: _Stream) -> bool:
        return self.core is not None and self.core.holds(stream)

    def close_stream(self, stream: _Stream) -> None:
        if self.core is not None:
            self.core.client_closed(stream)
            self._log_events()

    def _deliver(self, out: Any) -> None:
        if out is None:
            return
        if isinstance(out, ToPeer):
            self._to_peer(*out)
        else:
            self._to_client(*out)
            self._log_events()

    def _to_peer(self, relay: Any, peer: tuple[str, int], payload: bytes) -> None:
        try:
            relay.sock.sendto(payload, peer)
        except OSError:  # a full buffer, an unreachable network: loss, as on the wire
            self.dropped[SEND_ERROR] += 1

    def _to_client(self, client: Any, frame: bytes) -> None:
        if type(client) is tuple:
            udp = self._udp
            if udp is None:
                self.dropped[SEND_ERROR] += 1
                return
            try:
                udp.sendto(frame, client)
            except BlockingIOError:
                self.dropped[CLIENT_BUFFER_FULL] += 1
            except OSError:
                self.dropped[SEND_ERROR] += 1
            return
        transport = client.writer.transport
        if transport.is_closing():
            self.dropped[SEND_ERROR] += 1
        elif transport.get_write_buffer_size() > STREAM_BUFFER_LIMIT:
            self.dropped[CLIENT_BUFFER_FULL] += 1
        else:
            transport.write(frame)

    # -- From peers ---------------------------------------------------------------------------------------

    def _relay_readable(self, relay: _RelaySocket) -> None:
        """Drain a relay socket, a bounded batch at a time, so that one busy peer cannot starve the loop."""
        core = self.core
        if core is None:
            return
        sock = relay.sock
        now = time.time()
        for _ in range(READ_BATCH):
            try:
                data, peer = sock.recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # ICMP unreachable for something we relayed: the peer is not there.
                self.dropped[ICMP_ERROR] += 1
                continue
            try:
                out = core.from_peer(relay, data, peer, now)
                if out is not None:
                    self._to_client(*out)
            except Exception:  # a bug on one packet must not stop the relay
                self.dropped[INTERNAL_ERROR] += 1
                log.exception("TURN relay packet handling failed")

    # -- Metrics ------------------------------------------------------------------------------------------

    def turn_totals(self) -> dict[str, Any]:
        """What /metrics shows (metrics.watch_turn): all keys and label values fixed."""
        core = self.core
        if core is None:
            return {}
        counts = core.counts()
        return {
            **counts,
            "relay_ports": len(self._pool) if self._pool is not None else 0,
            "requests": dict(core.requests),
            "errors": {str(code): count for code, count in core.errors.items()},
            "packets": {"to_peer": core.packets_to_peer, "to_client": core.packets_to_client},
            "bytes": {"to_peer": core.bytes_to_peer, "to_client": core.bytes_to_client},
            "dropped": {**core.dropped, **self.dropped},
        }
