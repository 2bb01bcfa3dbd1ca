"""A STUN Binding server (RFC 8489): a pure decision function, and a thin asyncio layer over it.

`handle` decides, for one incoming message, what to answer and why; it does no I/O, so every case
is tested by feeding it bytes. `StunServer` only moves bytes between sockets and `handle`, on one
port number for both UDP and TCP (RFC 8489 §6.2.2 frames messages on a stream by their own length).

With a `TurnHandler` (the TURN relay, huddle/turn/server.py), everything on the port that is not a Binding
request goes to it: STUN messages of other methods, and ChannelData (first byte 0x40-0x7F, RFC 7983).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Any, Final, Protocol

from huddle.metrics import Metrics
from huddle.stun.message import (
    BINDING,
    ERROR_CODE,
    FINGERPRINT,
    HEADER_SIZE,
    KNOWN_ATTRIBUTES,
    MAGIC_COOKIE,
    MESSAGE_INTEGRITY,
    SOFTWARE,
    UNKNOWN_ATTRIBUTES,
    XOR_MAPPED_ADDRESS,
    MessageClass,
    StunError,
    StunMessage,
    encode,
    encode_error_code,
    encode_software,
    encode_unknown_attributes,
    encode_xor_mapped_address,
    is_stun,
    parse,
    verify_fingerprint,
)

__all__ = ["REASONS", "Outcome", "StunServer", "TurnHandler", "handle"]

logger = logging.getLogger("huddle.stun")

# Every reason is a Prometheus label value, so the set is fixed: input never picks a label.
NOT_STUN: Final = "not_stun"
TRUNCATED: Final = "truncated"
BAD_FINGERPRINT: Final = "bad_fingerprint"
NOT_REQUEST: Final = "not_request"
BAD_REQUEST: Final = "bad_request"
UNKNOWN_ATTRIBUTE: Final = "unknown_attribute"
UNKNOWN_METHOD: Final = "unknown_method"
TOO_LARGE: Final = "too_large"
TOO_MANY_CONNECTIONS: Final = "too_many_connections"
PER_ADDRESS_LIMIT: Final = "per_address_limit"
IDLE_TIMEOUT: Final = "idle_timeout"
INTERNAL_ERROR: Final = "internal_error"
REASONS: Final = frozenset(
    {
        NOT_STUN,
        TRUNCATED,
        BAD_FINGERPRINT,
        NOT_REQUEST,
        BAD_REQUEST,
        UNKNOWN_ATTRIBUTE,
        UNKNOWN_METHOD,
        TOO_LARGE,
        TOO_MANY_CONNECTIONS,
        PER_ADDRESS_LIMIT,
        IDLE_TIMEOUT,
        INTERNAL_ERROR,
    }
)

_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to do with one message: send `reply` (if any); `reason` is set unless it was a success."""

    reply: bytes | None
    reason: str | None = None


def handle(data: bytes, source: tuple[Any, ...], *, software: str) -> Outcome:
    """Decide how to answer one message that arrived from `source` (host, port, ...)."""
    if len(data) < HEADER_SIZE:
        return Outcome(None, TRUNCATED if _could_be_stun_header(data) else NOT_STUN)
    if not is_stun(data):
        return Outcome(None, NOT_STUN)
    if len(data) < HEADER_SIZE + int.from_bytes(data[2:4], "big"):
        return Outcome(None, TRUNCATED)
    message_type = int.from_bytes(data[0:2], "big")
    transaction_id = bytes(data[8:20])
    method = (message_type & 0x000F) | ((message_type >> 1) & 0x0070) | ((message_type >> 2) & 0x0F80)
    # Only requests get answers (RFC 8489 §6.3): answering a response could start a loop.
    if message_type & 0x0110:
        return Outcome(None, NOT_REQUEST)
    try:
        request = parse(data)
    except StunError:
        return _error(method, transaction_id, 400, "Bad Request", software, BAD_REQUEST)
    if request.attributes and request.attributes[-1].type == FINGERPRINT and not verify_fingerprint(data):
        # A wrong FINGERPRINT usually means another protocol's packet on this port: stay silent.
        return Outcome(None, BAD_FINGERPRINT)
    if method != BINDING:
        return _error(method, transaction_id, 400, "Bad Request", software, UNKNOWN_METHOD)
    unknown = _unknown_required(request)
    if unknown:
        return _error(
            method, transaction_id, 420, "Unknown Attribute", software, UNKNOWN_ATTRIBUTE, unknown=unknown
        )
    response = StunMessage(BINDING, MessageClass.SUCCESS, transaction_id)
    host, port = _mapped_address(source)
    response.add(XOR_MAPPED_ADDRESS, encode_xor_mapped_address(host, port, transaction_id))
    response.add(SOFTWARE, encode_software(software))
    return Outcome(encode(response, fingerprint=True))


def _could_be_stun_header(data: bytes) -> bool:
    """Whether a too-short datagram starts like a STUN header, so 'truncated' rather than 'not_stun'."""
    if not data or data[0] >= 0x40:
        return False
    return data[4:8] == _COOKIE_BYTES[: max(0, len(data) - 4)]


def _unknown_required(request: StunMessage) -> list[int]:
    # A dict, not a list: one 64 KB datagram holds 16,000 attributes, and a list's `in` made that a second.
    unknown: dict[int, None] = {}
    for attr_type, _ in request.attributes:
        # Attributes after MESSAGE-INTEGRITY are to be ignored (RFC 8489 §14.5), known or not.
        if attr_type == MESSAGE_INTEGRITY:
            break
        if attr_type < 0x8000 and attr_type not in KNOWN_ATTRIBUTES:
            unknown[attr_type] = None
    return list(unknown)


def _mapped_address(source: tuple[Any, ...]) -> tuple[str, int]:
    host, port = str(source[0]), int(source[1])
    ip = ipaddress.ip_address(host)
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; the client knows itself as a.b.c.d.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped), port
    return host, port


def _error(
    method: int,
    transaction_id: bytes,
    code: int,
    phrase: str,
    software: str,
    reason: str,
    *,
    unknown: list[int] | None = None,
) -> Outcome:
    response = StunMessage(method, MessageClass.ERROR, transaction_id)
    response.add(ERROR_CODE, encode_error_code(code, phrase))
    if unknown:
        response.add(UNKNOWN_ATTRIBUTES, encode_unknown_attributes(unknown))
    response.add(SOFTWARE, encode_software(software))
    return Outcome(encode(response, fingerprint=True), reason)


# --- asyncio ------------------------------------------------------------------------------------

UDP: Final = "udp"
TCP: Final = "tcp"
TLS: Final = "tls"
_PORT_ATTEMPTS = 8
_READ_SIZE = 65536
_READ_BATCH = 64  # datagrams read per readiness event before the loop gets a turn
_SOCKET_BUFFER = 4 * 1024 * 1024
# Past this much unsent to a TCP client, the reader waits for it to drain before reading on.
_WRITE_HIGH_WATER = 64 * 1024


class TurnHandler(Protocol):
    """What the STUN port hands its TURN traffic to. The port frames it and knows nothing more of it."""

    def attach_udp(self, sock: socket.socket) -> None:
        """The port's UDP socket, to answer UDP clients and relay data to them."""

    def datagram(self, data: bytes, addr: tuple[Any, ...]) -> None: ...

    def open_stream(self, writer: asyncio.StreamWriter, peer: tuple[Any, ...], transport: str) -> Any:
        """A TCP or TLS connection opened: the handle its frames come with."""

    def stream_frame(self, stream: Any, frame: bytes) -> bool:
        """One whole message; True if it was a valid one (which keeps the connection from idling out)."""

    def holds(self, stream: Any) -> bool:
        """Whether the connection has an allocation: it then lives as long as that does, however quiet."""

    def close_stream(self, stream: Any) -> None: ...


def _is_turn(data: bytes) -> bool:
    """ChannelData, or a STUN message of a method other than Binding."""
    first = data[0]
    if 0x40 <= first <= 0x7F:
        return True
    if first >= 0x40 or len(data) < HEADER_SIZE or data[4:8] != _COOKIE_BYTES:
        return False
    return (((first << 8) | data[1]) & 0x3EEF) != BINDING


class StunServer:
    """STUN over UDP and TCP on one port number (and over TLS, on connections handed to `serve_stream`).

    A TCP connection lives `idle_timeout` seconds after it opened or after its last answered Binding request
    (or valid TURN message), whatever else it sends: bytes that are not a valid request do not keep a slot;
    one that holds a TURN allocation lives as long as that. One client address holds at most
    `max_connections_per_address` of the `max_connections`.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        software: str = "huddle",
        idle_timeout: float = 30.0,
        max_connections: int = 256,
        max_connections_per_address: int = 200,
        max_message_size: int = 4096,
        turn: TurnHandler | None = None,
    ) -> None:
        encode_software(software)  # fail at construction, not on the first request
        self._metrics = metrics
        self._software = software
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
        self._max_per_address = max_connections_per_address
        self._per_address: dict[str, int] = {}
        self._max_message_size = max_message_size
        self._turn = turn
        self._udp: socket.socket | None = None
        self._tcp: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._port: int | None = None
        self._closing = False

    @property
    def port(self) -> int | None:
        return self._port

    async def start(self, host: str, port: int) -> int:
        """Listen on UDP and TCP `port` (0: a port free for both); return the port number."""
        if self._udp is not None:
            raise RuntimeError("StunServer already started")
        self._closing = False
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        udp_sock, tcp_sock = _bind_pair(family, sockaddr, port)
        # TURN relays media through this socket: a burst of a few calls' packets overruns Linux's 208 KiB.
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                udp_sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
        try:
            loop.add_reader(udp_sock.fileno(), self._on_readable)
            self._udp = udp_sock
            self._tcp = await asyncio.start_server(self._on_connection, sock=tcp_sock)
        except BaseException:
            if self._udp is not None:
                loop.remove_reader(udp_sock.fileno())
                self._udp = None
            udp_sock.close()
            tcp_sock.close()
            raise
        if self._turn is not None:
            self._turn.attach_udp(udp_sock)
        self._port = int(udp_sock.getsockname()[1])
        logger.info("STUN listening on %s port %d (udp, tcp)", sockaddr[0], self._port)
        return self._port

    async def close(self) -> None:
        """Stop listening and close every TCP connection."""
        self._closing = True
        udp, self._udp = self._udp, None
        if udp is not None:
            asyncio.get_running_loop().remove_reader(udp.fileno())
            udp.close()
        tcp, self._tcp = self._tcp, None
        if tcp is not None:
            tcp.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if tcp is not None:
            await tcp.wait_closed()

    def _count(self, transport: str, outcome: Outcome) -> None:
        if outcome.reply is not None:
            self._metrics.stun_requests.labels(transport=transport).inc()
        if outcome.reason is not None:
            self._metrics.stun_dropped.labels(transport=transport, reason=outcome.reason).inc()

    def _drop(self, transport: str, reason: str) -> None:
        self._metrics.stun_dropped.labels(transport=transport, reason=reason).inc()

    def _on_readable(self) -> None:
        """Drain the UDP socket, a bounded batch at a time (as the SFU's port does): one readiness event per
        batch rather than per datagram, since TURN relays media through here."""
        for _ in range(_READ_BATCH):
            sock = self._udp
            if sock is None:
                return
            try:
                data, addr = sock.recvfrom(_READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # ICMP errors for earlier replies (port unreachable and the like): nothing to do.
                logger.debug("udp: %s", e)
                continue
            self._on_datagram(data, addr, sock)

    def _on_datagram(self, data: bytes, addr: tuple[Any, ...], sock: socket.socket) -> None:
        turn = self._turn
        # TURN first: its ChannelData is the relay path, and carries up to 64 KB by its own length field.
        if turn is not None and data and _is_turn(data):
            try:
                turn.datagram(data, addr)
            except Exception:
                logger.debug("udp %s: failed to handle a TURN datagram", addr, exc_info=True)
                self._drop(UDP, INTERNAL_ERROR)
            return
        # The same bound as over TCP: a 64 KB datagram of 16,000 attributes takes 20 ms to read.
        if len(data) > self._max_message_size:
            self._drop(UDP, TOO_LARGE)
            return
        try:
            outcome = handle(data, addr, software=self._software)
            if outcome.reply is not None:
                with contextlib.suppress(BlockingIOError):  # a full send buffer: loss, as on the wire
                    sock.sendto(outcome.reply, addr)
            self._count(UDP, outcome)
            logger.debug("udp %s: %d bytes, %s", addr, len(data), outcome.reason or "answered")
        except Exception:
            logger.debug("udp %s: failed to handle a datagram", addr, exc_info=True)
            self._drop(UDP, INTERNAL_ERROR)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.serve_stream(reader, writer, TCP)

    async def serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, transport: str
    ) -> None:
        """Serve one accepted connection (`transport`: "tcp", or "tls" for TURN over TLS) until it ends."""
        peer = writer.get_extra_info("peername")
        if self._closing:
            # Accepted just before close() but started after it cancelled the others.
            writer.transport.abort()
            return
        if len(self._connections) >= self._max_connections:
            logger.debug("%s %s: refused, %d connections open", transport, peer, len(self._connections))
            self._drop(transport, TOO_MANY_CONNECTIONS)
            writer.transport.abort()
            return
        address = str(peer[0]) if isinstance(peer, tuple) else ""
        held = self._per_address.get(address, 0)
        if held >= self._max_per_address:
            logger.debug("%s %s: refused, %d connections open from that address", transport, peer, held)
            self._drop(transport, PER_ADDRESS_LIMIT)
            writer.transport.abort()
            return
        self._per_address[address] = held + 1
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        stream = None
        try:
            if self._turn is not None and isinstance(peer, tuple):
                stream = self._turn.open_stream(writer, peer, transport)
            await self._serve(reader, writer, peer, transport, stream)
        except OSError as e:
            logger.debug("%s %s: %s", transport, peer, e)
        except Exception:
            logger.debug("%s %s: failed to serve a connection", transport, peer, exc_info=True)
            self._drop(transport, INTERNAL_ERROR)
        finally:
            if stream is not None:
                assert self._turn is not None
                self._turn.close_stream(stream)
            self._connections.discard(task)
            held = self._per_address[address] - 1
            if held:
                self._per_address[address] = held
            else:
                del self._per_address[address]
            if writer.transport.get_write_buffer_size():
                # A peer that stopped reading must not keep the socket alive until the data drains.
                writer.transport.abort()
            else:
                writer.close()

    def _frame_size(self, buffer: bytearray, stream: Any, transport: str) -> int:
        """The size of the message at the head of `buffer`; 0 if more bytes are needed to know; -1 if the
        stream must be closed (counted). Framing relies on headers alone (RFC 8489 §6.2.2, RFC 8656 §12.5)."""
        if stream is not None and 0x40 <= buffer[0] <= 0x7F:
            assert self._turn is not None
            if not self._turn.holds(stream):
                self._drop(transport, NOT_STUN)  # ChannelData means nothing before an allocation
                return -1
            if len(buffer) < 4:
                return 0
            length = (buffer[2] << 8) | buffer[3]
            return 4 + length + (-length & 3)
        if len(buffer) < HEADER_SIZE:
            return 0
        if not is_stun(buffer[:HEADER_SIZE]):
            self._drop(transport, NOT_STUN)
            return -1
        size = HEADER_SIZE + ((buffer[2] << 8) | buffer[3])
        if size > self._max_message_size:
            self._drop(transport, TOO_LARGE)
            return -1
        return size

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: Any,
        transport: str,
        stream: Any,
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._idle_timeout
        buffer = bytearray()
        turn = self._turn
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await reader.read(_READ_SIZE)
            except TimeoutError:
                if stream is not None and turn is not None and turn.holds(stream):
                    deadline = loop.time() + self._idle_timeout
                    continue
                logger.debug("%s %s: no valid request for %g s, closing", transport, peer, self._idle_timeout)
                self._drop(transport, IDLE_TIMEOUT)
                return
            if not chunk:
                if buffer:
                    self._drop(transport, TRUNCATED)
                return
            buffer += chunk
            while buffer:
                size = self._frame_size(buffer, stream, transport)
                if size < 0:
                    logger.debug("%s %s: not a message we frame, closing", transport, peer)
                    return
                if size == 0 or len(buffer) < size:
                    break
                frame = bytes(buffer[:size])
                del buffer[:size]
                if stream is not None and turn is not None and _is_turn(frame):
                    if turn.stream_frame(stream, frame):
                        deadline = loop.time() + self._idle_timeout
                    continue
                outcome = handle(frame, peer, software=self._software)
                self._count(transport, outcome)
                logger.debug("%s %s: %d bytes, %s", transport, peer, size, outcome.reason or "answered")
                if outcome.reason is None:
                    deadline = loop.time() + self._idle_timeout
                if outcome.reply is not None:
                    writer.write(outcome.reply)
            if writer.transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
                async with asyncio.timeout(self._idle_timeout):
                    await writer.drain()


def _with_port(sockaddr: tuple[Any, ...], port: int) -> tuple[Any, ...]:
    return (sockaddr[0], port, *sockaddr[2:])


def _bind_udp(family: int, address: tuple[Any, ...]) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_tcp(family: int, address: tuple[Any, ...]) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Lets a restarted server bind while its old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setblocking(False)
        sock.bind(address)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_pair(family: int, sockaddr: tuple[Any, ...], port: int) -> tuple[socket.socket, socket.socket]:
    """Bind UDP then TCP on the same port; with port 0, retry when the UDP-chosen port is taken on TCP."""
    attempts = _PORT_ATTEMPTS if port == 0 else 1
    for attempt in range(1, attempts + 1):
        udp = _bind_udp(family, _with_port(sockaddr, port))
        chosen = int(udp.getsockname()[1])
        try:
            tcp = _bind_tcp(family, _with_port(sockaddr, chosen))
        except OSError as e:
            udp.close()
            if port != 0 or e.errno != errno.EADDRINUSE or attempt == attempts:
                raise
            logger.debug("port %d is free on UDP but not TCP, trying another", chosen)
            continue
        return udp, tcp
    raise AssertionError("unreachable")
