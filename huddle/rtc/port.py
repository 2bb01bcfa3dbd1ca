"""The SFU's one media port: UDP for everyone, plus passive ICE-TCP (RFC 6544) on the same port number.

A datagram from an address that passed ICE goes straight to its transport (one dict lookup per packet).
From any other address only a STUN check is accepted, and it is routed by the ufrag in its USERNAME; once it
passes, its address is bound to that transport. Everything else is dropped and counted by reason.
ICE-TCP frames each packet with a 2-byte length (RFC 4571); a TCP connection is an address of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from huddle.metrics import Metrics
from huddle.rtc.ice import Address, username_ufrag
from huddle.stun import message as stun

if TYPE_CHECKING:
    from huddle.rtc.transport import WebRtcTransport

log = logging.getLogger("huddle.rtc")

TCP_MAX_CONNECTIONS = 512
TCP_IDLE_TIMEOUT = 40.0  # a live ICE-TCP connection carries consent checks every few seconds
_LENGTH = struct.Struct("!H")


def tcp_address(peer: tuple[Any, ...]) -> Address:
    """TCP connections are told apart from UDP addresses by a third element."""
    return (peer[0], peer[1], "tcp")


class MediaPort:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._dropped = {}
        self._by_ufrag: dict[str, WebRtcTransport] = {}
        self._by_addr: dict[Address, WebRtcTransport] = {}
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp_server: asyncio.Server | None = None
        self._tcp: dict[Address, asyncio.StreamWriter] = {}
        self.port = 0
        # Plain integers on the per-packet path; /metrics reads them through a collector.
        self.packets_in = self.packets_out = self.bytes_in = self.bytes_out = 0
        metrics.watch_media_port(self)

    def drop(self, reason: str) -> None:
        counter = self._dropped.get(reason)
        if counter is None:
            counter = self._dropped[reason] = self.metrics.media_dropped.labels(reason=reason)
        counter.inc()

    # -- Life -----------------------------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=(host, port))
        self._udp = udp
        sock = udp.get_extra_info("socket")
        # A 100-person call bursts far beyond Linux's default 208 KiB receive buffer.
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, 4 * 1024 * 1024)
        self.port = udp.get_extra_info("sockname")[1]
        try:
            self._tcp_server = await asyncio.start_server(self._on_tcp, host, self.port, reuse_address=True)
        except OSError as exc:
            # ICE-TCP is the fallback, not the main path: serve UDP alone rather than not at all.
            log.warning("ICE-TCP not available on the media port", extra={"fields": {"error": str(exc)}})
        return self.port

    @property
    def tcp_enabled(self) -> bool:
        return self._tcp_server is not None

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp_server is not None:
            self._tcp_server.close()
            for writer in list(self._tcp.values()):
                writer.close()
            await self._tcp_server.wait_closed()
            self._tcp_server = None

    # -- Transports -----------------------------------------------------------------------------------------

    def register(self, transport: WebRtcTransport) -> None:
        self._by_ufrag[transport.ice.ufrag] = transport

    def rekey(self, transport: WebRtcTransport, old_ufrag: str) -> None:
        # Checks with the old ufrag may still be in flight; both lead to the same transport.
        self._by_ufrag[transport.ice.ufrag] = transport
        self._by_ufrag.setdefault(old_ufrag, transport)

    def bind(self, addr: Address, transport: WebRtcTransport) -> None:
        self._by_addr[addr] = transport

    def unregister(self, transport: WebRtcTransport, addresses: set[Address]) -> None:
        for ufrag in [u for u, t in self._by_ufrag.items() if t is transport]:
            del self._by_ufrag[ufrag]
        for addr in addresses:
            if self._by_addr.get(addr) is transport:
                del self._by_addr[addr]
                writer = self._tcp.get(addr)
                if writer is not None:
                    writer.close()

    def counts(self) -> dict[str, int]:
        return {
            "transports": len(set(self._by_ufrag.values())),
            "addresses": len(self._by_addr),
            "tcp_connections": len(self._tcp),
        }

    # -- Receiving ------------------------------------------------------------------------------------------

    def receive(self, data: bytes, addr: Address) -> None:
        self.packets_in += 1
        self.bytes_in += len(data)
        if not data:
            self.drop("empty")
            return
        transport = self._by_addr.get(addr)
        if data[0] < 4:
            self._receive_stun(data, addr, transport)
            return
        if transport is None:
            self.drop("unknown_source")
            return
        reason = transport.receive(data, addr)
        if reason is not None:
            self.drop(reason)

    def _receive_stun(self, data: bytes, addr: Address, known: WebRtcTransport | None) -> None:
        if not stun.is_stun(data):
            self.drop("not_stun")
            return
        try:
            request = stun.parse(data)
        except stun.StunError:
            self.drop("bad_stun")
            return
        ufrag = username_ufrag(request)
        transport = self._by_ufrag.get(ufrag) if ufrag is not None else None
        if transport is None:
            # Responses and indications for a known address (none expected from browsers) land here too.
            self.drop("unknown_username" if known is None else "unexpected_stun")
            return
        reason = transport.receive_stun(data, request, addr)
        if reason is not None:
            self.drop(reason)

    # -- Sending --------------------------------------------------------------------------------------------

    def send_to(self, data: bytes, addr: Address) -> None:
        self.packets_out += 1
        self.bytes_out += len(data)
        if len(addr) == 3:
            writer = self._tcp.get(addr)
            if writer is not None and not writer.is_closing():
                writer.write(_LENGTH.pack(len(data)) + data)
            return
        if self._udp is not None:
            self._udp.sendto(data, addr)

    # -- ICE-TCP --------------------------------------------------------------------------------------------

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if peer is None or len(self._tcp) >= TCP_MAX_CONNECTIONS:
            self.drop("tcp_refused")
            writer.close()
            return
        addr = tcp_address(peer)
        self._tcp[addr] = writer
        try:
            while True:
                header = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT)
                (length,) = _LENGTH.unpack(header)
                data = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE_TIMEOUT)
                self.receive(data, addr)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        except Exception:  # one connection must never take the port down
            log.exception("ICE-TCP connection failed", extra={"fields": {"peer": str(peer)}})
        finally:
            self._tcp.pop(addr, None)
            transport = self._by_addr.pop(addr, None)
            if transport is not None:
                transport.ice.valid.discard(addr)
            writer.close()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, port: MediaPort) -> None:
        self._receive: Callable[[bytes, Address], None] = port.receive
        self._port = port

    def datagram_received(self, data: bytes, addr: Address) -> None:
        try:
            self._receive(data, addr)
        except Exception:  # a bug on one packet must not stop the port
            self._port.drop("internal_error")
            log.exception("media packet handling failed")

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a participant that went away: nothing to do but count it.
        self._port.drop("icmp_error")
