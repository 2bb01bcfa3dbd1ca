"""The media port's per-packet path: compiled (huddle/rtc/_fastpath.c) or the pure-Python reference.

Two things per forwarded packet cost more in Python than the work itself: protecting it (cffi's conversions
around libsrtp's srtp_protect) and sending it (one sendto system call per datagram). The compiled module
protects with the same libsrtp (pylibsrtp's own, called through its cffi function pointer, so the bytes
cannot differ) and sends the datagrams one incoming packet fans out to with one sendmmsg(2). A Consumer's
compiled StreamRewriter (huddle/sfu/_rewrite.c) writes its packets straight into the batch, which protects
them there with that same function (see huddle.sfu.consumer).

Which path is in use is decided once, at import: the compiled one whenever the extension was built (every
`pip install` builds it; setup.py), unless HUDDLE_FASTPATH=0 asks for the reference (to compare the two).
A missing extension is no secret: `COMPILED` says so, the server logs it at start, and the tests fail on a
machine where it is missing.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Any, Protocol

from pylibsrtp._binding import ffi, lib

try:
    from huddle.rtc import _fastpath
except ImportError:  # a checkout used without `pip install -e .`: the reference path below
    _fastpath = None

if TYPE_CHECKING:
    from huddle.rtc.ice import Address

__all__ = [
    "BATCH_SIZE",
    "COMPILED",
    "PROTECT",
    "Batch",
    "PyBatch",
    "Route",
    "new_batch",
    "new_route",
    "protect",
]

COMPILED = _fastpath is not None and os.environ.get("HUDDLE_FASTPATH", "1") != "0"
# Datagrams a flush sends at most: one packet fanned out to a 100-person call goes in two system calls, and
# the first viewers need not wait for the last ones' copies.
BATCH_SIZE = 64
SLOT = 2048  # longer than any datagram the port sends (MTU-bound RTP, DTLS flights of ~1,200 bytes)
# libsrtp's srtp_protect, as pylibsrtp's cffi module has it: the compiled path calls it through this.
PROTECT = int(ffi.cast("uintptr_t", ffi.addressof(lib, "srtp_protect")))
# protect(PROTECT, session, packet, out) -> length: srtp_protect a copy of `packet` in the writable buffer
# `out` (with room for the longest trailer) for the libsrtp session at address `session`; ValueError when
# libsrtp refuses (a replay, say) or `out` is too short. None on the reference path (cffi calls instead).
protect = _fastpath.protect if COMPILED else None  # type: ignore[union-attr]


class Batch(Protocol):
    """Datagrams for one UDP socket, queued by `add` (which returns how many are queued; ValueError for an
    address or size it does not take) and sent in order by `flush` -> (sent, would_block, failed).
    `packets` and `octets` count every datagram queued since it was made; `holding` says whether the port
    holds its sends for the next flush (the compiled forward queues into a batch only then)."""

    holding: bool

    @property
    def count(self) -> int: ...

    @property
    def packets(self) -> int: ...

    @property
    def octets(self) -> int: ...

    def add(self, data: bytes | bytearray | memoryview, addr: Address) -> int: ...

    def flush(self) -> tuple[int, int, int]: ...


class PyBatch:
    """The reference the compiled Batch must match: a copy of each datagram, then a loop of sendto."""

    __slots__ = ("_queue", "_sock", "holding", "octets", "packets")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._queue: list[tuple[bytes, Any]] = []
        self.packets = self.octets = 0
        self.holding = False

    @property
    def count(self) -> int:
        return len(self._queue)

    def add(self, data: bytes | bytearray | memoryview, addr: Address) -> int:
        if len(data) > SLOT:
            raise ValueError("datagram longer than a slot")
        self._queue.append((bytes(data), addr))
        self.packets += 1
        self.octets += len(data)
        return len(self._queue)

    def flush(self) -> tuple[int, int, int]:
        queue, self._queue = self._queue, []
        sent = blocked = failed = 0
        for data, addr in queue:
            try:
                self._sock.sendto(data, addr)
                sent += 1
            except BlockingIOError:
                blocked += 1
            except OSError:
                failed += 1
        return sent, blocked, failed


class Route(Protocol):
    """Where a transport's RTP goes the compiled way: `set(batch, srtp, address)` -> whether it can."""

    @property
    def on(self) -> bool: ...

    def set(self, batch: Batch | None, srtp: object, address: Address | None) -> bool: ...


def new_route() -> Route | None:
    """A transport's Route on the compiled path; None on the reference path, which needs none."""
    return _fastpath.Route() if COMPILED else None  # type: ignore[union-attr, no-any-return]


def new_batch(sock: socket.socket, *, compiled: bool = COMPILED) -> Batch:
    if compiled:
        if _fastpath is None:
            raise RuntimeError("huddle.rtc._fastpath is not built (pip install -e .)")
        return _fastpath.Batch(sock.fileno(), BATCH_SIZE, SLOT, PROTECT)  # type: ignore[no-any-return]
    return PyBatch(sock)
