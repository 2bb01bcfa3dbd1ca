"""A node's UDP port for pipes: sealed datagrams to and from other Huddle nodes (see huddle.rtc.pipe).

Incoming datagrams are routed by the link id in their header to that link's `Opener`; what opens goes to the
link's handler. Anything else (garbage, a link nobody registered, a bad tag, a replay, a datagram from another
address than the link's peer) is dropped and counted through `count_drop("pipe_<reason>")`, and so is a
handler that raises: one bad datagram or one bad handler never stops the port.

Addresses are numeric (an IP address as the socket reports it, and a port): the port compares them as they
are, and `send` would resolve a host name on every datagram.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable

from huddle.rtc.pipe import MIN_SIZE, Opener, PipeError, link_id_of

__all__ = ["PipePort"]

log = logging.getLogger("huddle.rtc")

READ_BATCH = 64  # datagrams read per readiness event before the loop gets a turn
# The largest UDP payload: measured here, recvfrom() costs the same for 64 KiB as for 2 KiB (the buffer is
# shrunk to the datagram), and a datagram cut short would only fail its tag.
RECV_SIZE = 65535
SOCKET_BUFFER = 4 * 1024 * 1024  # a keyframe on every piped track at once bursts past Linux's default 208 KiB

Address = tuple[str, int]


class PipePort:
    def __init__(self, count_drop: Callable[[str], None]) -> None:
        self.count_drop = count_drop
        self.counts = {"in": 0, "out": 0}  # datagrams received (all of them) and handed to the kernel
        self._links: dict[bytes, tuple[Opener, Callable[[bytes], None], Address | None]] = {}
        self._sock: socket.socket | None = None
        self._handler_errors_logged: set[type[BaseException]] = set()

    # -- Life -----------------------------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        if self._sock is not None:
            raise RuntimeError("the pipe port is already started")
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            sock.bind(address)
            asyncio.get_running_loop().add_reader(sock.fileno(), self._on_readable)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        return self.address[1]

    @property
    def address(self) -> Address:
        if self._sock is None:
            raise RuntimeError("the pipe port is not started")
        host, port = self._sock.getsockname()[:2]
        return host, port

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(RuntimeError):  # the loop may already be closed at shutdown
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()

    # -- Links ----------------------------------------------------------------------------------------------

    def add_link(
        self, opener: Opener, on_datagram: Callable[[bytes], None], peer: Address | None = None
    ) -> None:
        """Datagrams of `opener`'s link id are opened and their payload handed to `on_datagram`; with `peer`,
        only those from that address. A link added again replaces the one before (a peer that moved)."""
        if peer is not None:
            # The canonical text of the address is what the socket reports; a host name would never match.
            peer = (str(ipaddress.ip_address(peer[0])), peer[1])
        self._links[opener.link_id] = (opener, on_datagram, peer)

    def remove_link(self, link_id: bytes) -> None:
        self._links.pop(link_id, None)

    # -- Receiving ------------------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        """Drain the socket, a bounded batch at a time, so that a busy pipe cannot starve the loop."""
        sock = self._sock
        for _ in range(READ_BATCH):
            if sock is None or self._sock is not sock:  # closed, perhaps by a handler of this batch
                return
            try:
                data, addr = sock.recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # A UDP socket reports only ICMP errors here: a datagram we sent found no one at the far end.
                self.count_drop("pipe_send")
                continue
            self.counts["in"] += 1
            self.receive(data, addr)

    def receive(self, data: bytes, addr: tuple[str, int] | tuple[str, int, int, int]) -> None:
        link_id = link_id_of(data)
        if link_id is None:
            self.count_drop("pipe_short" if len(data) < MIN_SIZE else "pipe_version")
            return
        link = self._links.get(link_id)
        if link is None:
            self.count_drop("pipe_unknown_link")
            return
        opener, on_datagram, peer = link
        if peer is not None and (addr[1] != peer[1] or addr[0] != peer[0]):
            self.count_drop("pipe_address")
            return
        try:
            payload = opener.open(data)
        except PipeError as exc:
            self.count_drop("pipe_" + exc.reason)
            return
        try:
            on_datagram(payload)
        except Exception as exc:  # a bug in one handler must not stop the port, nor flood the log
            self.count_drop("pipe_handler")
            kind = type(exc)
            if kind not in self._handler_errors_logged:
                self._handler_errors_logged.add(kind)
                log.exception(
                    "pipe datagram handler failed (further %s not logged)",
                    kind.__name__,
                    extra={"fields": {"link_id": link_id.hex()}},
                )

    # -- Sending --------------------------------------------------------------------------------------------

    def send(self, data: bytes, address: Address) -> None:
        """Sends one sealed datagram; a failure is loss, as on the wire: counted, never raised."""
        sock = self._sock
        if sock is None:
            self.count_drop("pipe_send")
            return
        try:
            sock.sendto(data, address)
        except OSError:  # a full buffer (BlockingIOError, ENOBUFS), an unreachable network, a bad address
            self.count_drop("pipe_send")
            return
        self.counts["out"] += 1
