"""The SFU's one media port: UDP for everyone, plus passive ICE-TCP (RFC 6544) on the same port number.

A datagram from an address that passed ICE goes straight to its transport (one dict lookup per packet).
From any other address only a STUN check is accepted, and it is routed by the ufrag in its USERNAME; once it
passes, its address is bound to that transport. Everything else is dropped and counted by reason.
ICE-TCP frames each packet with a 2-byte length (RFC 4571); a TCP connection is an address of its own. A
connection must pass ICE (be bound to a transport) within TCP_ICE_TIMEOUT whatever it sends meanwhile, and one
client address holds at most `max_connections_per_address` of them.
While one received datagram is handled (one packet fanned out to every subscriber, say), UDP datagrams sent
are held in a batch and go out together when it is done, with one sendmmsg(2) per BATCH_SIZE datagrams
(huddle.rtc.fastpath).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from huddle.metrics import Metrics
from huddle.rtc import fastpath
from huddle.rtc.ice import Address, username_ufrag
from huddle.stun import message as stun

if TYPE_CHECKING:
    from huddle.rtc.transport import WebRtcTransport

log = logging.getLogger("huddle.rtc")

TCP_MAX_CONNECTIONS = 512
READ_BATCH = 64  # datagrams read per readiness event before the loop gets a turn
RECV_SIZE = 2048  # larger than any packet a browser sends (it keeps under ~1,200 bytes)
# Linux's values (asm-generic); Python's socket module does not name them.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SCM_TIMESTAMPNS = getattr(socket, "SCM_TIMESTAMPNS", SO_TIMESTAMPNS)
_TIMESPEC = struct.Struct("@qq")
ANCILLARY_SIZE = socket.CMSG_SPACE(_TIMESPEC.size)
TCP_IDLE_TIMEOUT = 40.0  # a live ICE-TCP connection carries consent checks every few seconds
TCP_ICE_TIMEOUT = 10.0  # a browser's first check follows the connection at once
_LENGTH = struct.Struct("!H")


def tcp_address(peer: tuple[Any, ...]) -> Address:
    """TCP connections are told apart from UDP addresses by a third element."""
    return (peer[0], peer[1], "tcp")


class MediaPort:
    def __init__(self, metrics: Metrics, *, max_connections_per_address: int = 200) -> None:
        self.metrics = metrics
        self.max_connections_per_address = max_connections_per_address
        self._dropped = {}
        self._by_ufrag: dict[str, WebRtcTransport] = {}
        self._by_addr: dict[Address, WebRtcTransport] = {}
        self._sock: socket.socket | None = None
        self._batch: fastpath.Batch | None = None
        self._holding = False
        # When the kernel received the datagram being handled (its SO_TIMESTAMPNS, in µs): transport-wide
        # congestion feedback must report arrival times that the event loop's own delays do not distort,
        # or the publisher's bandwidth estimate reads our scheduling jitter as network congestion.
        self.arrival_us = 0
        self._tcp_server: asyncio.Server | None = None
        self._tcp: dict[Address, asyncio.StreamWriter] = {}
        self._tcp_per_host: dict[str, int] = {}
        self.port = 0
        # Plain integers on the per-packet path; /metrics reads them through a collector. What goes out
        # through the batch, the batch counts (the compiled forward queues without a Python frame here).
        self.packets_in = self.bytes_in = self._packets_out = self._bytes_out = 0
        metrics.watch_media_port(self)

    @property
    def holding(self) -> bool:
        """True while a received datagram is handled: UDP sends wait in the batch until flush()."""
        return self._holding

    @holding.setter
    def holding(self, value: bool) -> None:
        self._holding = value
        # The batch keeps it too: send_to and the compiled forward (along the transports' routes, see
        # huddle.rtc.transport) queue into the batch only while it holds.
        if self._batch is not None:
            self._batch.holding = value

    @property
    def batch(self) -> fastpath.Batch | None:
        """The batch of the open socket, None when closed: transports route the compiled forward into it."""
        return self._batch

    @property
    def packets_out(self) -> int:
        batch = self._batch
        return self._packets_out + (batch.packets if batch is not None else 0)

    @property
    def bytes_out(self) -> int:
        batch = self._batch
        return self._bytes_out + (batch.octets if batch is not None else 0)

    def drop(self, reason: str, count: int = 1) -> None:
        counter = self._dropped.get(reason)
        if counter is None:
            counter = self._dropped[reason] = self.metrics.media_dropped.labels(reason=reason)
        counter.inc(count)

    # -- Life -----------------------------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        # A 100-person call bursts far beyond Linux's default 208 KiB buffers.
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, 4 * 1024 * 1024)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.bind(address)
        self._sock = sock
        self._batch = fastpath.new_batch(sock)
        self.port = sock.getsockname()[1]
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_readable)
        try:
            self._tcp_server = await asyncio.start_server(self._on_tcp, host, self.port, reuse_address=True)
        except OSError as exc:
            # ICE-TCP is the fallback, not the main path: serve UDP alone rather than not at all.
            log.warning("ICE-TCP not available on the media port", extra={"fields": {"error": str(exc)}})
        return self.port

    def _on_readable(self) -> None:
        """Drain the socket, a bounded batch at a time, so that one busy port cannot starve the loop."""
        sock = self._sock
        if sock is None:
            return
        for _ in range(READ_BATCH):
            try:
                data, ancillary, _flags, addr = sock.recvmsg(RECV_SIZE, ANCILLARY_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # ICMP port unreachable from a participant that went away: nothing to do but count it.
                self.drop("icmp_error")
                continue
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS and len(value) >= 16:
                    seconds, nanoseconds = _TIMESPEC.unpack_from(value)
                    self.arrival_us = seconds * 1_000_000 + nanoseconds // 1000
                    break
            else:
                self.arrival_us = time.time_ns() // 1000
            try:
                self.receive(data, addr)
            except Exception:  # a bug on one packet must not stop the port
                self.drop("internal_error")
                log.exception("media packet handling failed")

    @property
    def tcp_enabled(self) -> bool:
        return self._tcp_server is not None

    async def close(self) -> None:
        if self._sock is not None:
            self.flush()
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            if self._batch is not None:
                self._packets_out += self._batch.packets
                self._bytes_out += self._batch.octets
                self._batch = None
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
            self.drop("dtls_unknown_source" if 19 < data[0] < 64 else "unknown_source")
            return
        self.holding = True
        try:
            reason = transport.receive(data, addr)
        finally:
            self.flush()
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

    def send_to(self, data: bytes | bytearray | memoryview, addr: Address) -> None:
        """Send a datagram (copied before this returns): now, or with the batch when `holding`."""
        batch = self._batch
        if batch is not None and batch.holding and len(addr) != 3:
            try:
                if batch.add(data, addr) >= fastpath.BATCH_SIZE:
                    self._send_batch(batch)
                return
            except ValueError:
                # An address or a size the batch does not take: alone, after what is queued.
                self._send_batch(batch)
        self._packets_out += 1
        self._bytes_out += len(data)
        if len(addr) == 3:
            writer = self._tcp.get(addr)
            if writer is not None and not writer.is_closing():
                writer.write(_LENGTH.pack(len(data)) + data)
            return
        if self._sock is None:
            return
        try:
            self._sock.sendto(data, addr)
        except BlockingIOError:
            self.drop("send_buffer_full")  # UDP: a full buffer means loss, as on the wire
        except OSError:
            self.drop("send_error")

    def flush(self) -> None:
        """Send what is held, and stop holding: the end of handling one received datagram."""
        self.holding = False
        batch = self._batch
        if batch is not None and batch.count:
            self._send_batch(batch)

    def _send_batch(self, batch: fastpath.Batch) -> None:
        _sent, blocked, failed = batch.flush()
        if blocked:
            self.drop("send_buffer_full", blocked)
        if failed:
            self.drop("send_error", failed)

    # -- ICE-TCP --------------------------------------------------------------------------------------------

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if peer is None or len(self._tcp) >= TCP_MAX_CONNECTIONS:
            self.drop("tcp_refused")
            writer.transport.abort()
            return
        host = str(peer[0])
        held = self._tcp_per_host.get(host, 0)
        if held >= self.max_connections_per_address:
            self.drop("tcp_per_address_limit")
            writer.transport.abort()
            return
        self._tcp_per_host[host] = held + 1
        addr = tcp_address(peer)
        self._tcp[addr] = writer
        loop = asyncio.get_running_loop()
        bound = False
        try:
            async with asyncio.timeout(TCP_ICE_TIMEOUT) as deadline:
                while True:
                    header = await reader.readexactly(2)
                    (length,) = _LENGTH.unpack(header)
                    data = await reader.readexactly(length)
                    self.receive(data, addr)
                    if addr in self._by_addr:
                        # Past ICE: from now on only silence ends it (and the transport's consent checks).
                        # Moving the deadline only when half of it is gone keeps timers off the packet path.
                        bound = True
                        now = loop.time()
                        when = deadline.when()
                        if when is None or when - now < TCP_IDLE_TIMEOUT / 2:
                            deadline.reschedule(now + TCP_IDLE_TIMEOUT)
        except TimeoutError:
            self.drop("tcp_idle_timeout" if bound else "tcp_ice_timeout")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:  # one connection must never take the port down
            log.exception("ICE-TCP connection failed", extra={"fields": {"peer": str(peer)}})
        finally:
            self._tcp.pop(addr, None)
            held = self._tcp_per_host[host] - 1
            if held:
                self._tcp_per_host[host] = held
            else:
                del self._tcp_per_host[host]
            transport = self._by_addr.pop(addr, None)
            if transport is not None:
                transport.ice.valid.discard(addr)
            writer.close()
