"""Sealed datagrams for the pipes between Huddle nodes: AES-128-GCM, a key per direction of a link (sans-I/O).

A link direction is named by a link id, 8 random bytes the sending side draws when it opens the link. Its key
is derived from the cluster secret and that id, so a node that restarts (and draws a new id) starts a new key
and can never repeat a (key, nonce) pair, although its counter starts again at 1.

Wire format of one datagram (all integers big-endian):

    byte  0        0xF1, the format version. RFC 7983 gives 0-3 to STUN, 20-63 to DTLS, 64-79 to TURN
                   channels and 128-191 to RTP/RTCP; 0xF1 is none of them, so a pipe datagram that reaches a
                   media port (or the other way round) is never taken for media.
    bytes 1-8      link id of the sending side.
    bytes 9-16     packet counter, 1 for the first datagram of a link, +1 for each one after it.
    bytes 17-      the payload encrypted with AES-128-GCM, then its 16-byte tag.

    key   = HMAC-SHA256(cluster_key, b"huddle pipe v1\\0" + link id)[:16]
    nonce = 4 zero bytes + the counter (bytes 9-16)
    AAD   = bytes 0-16 (the whole header), so no header byte can be changed without the tag failing.

The receiving side keeps a window of the last `REPLAY_WINDOW` counters: a counter seen before is refused, one
older than the window is refused, and any other is accepted in whatever order it comes (UDP reorders).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "COUNTER_LIMIT",
    "HEADER_SIZE",
    "LINK_ID_SIZE",
    "MIN_SIZE",
    "REPLAY_WINDOW",
    "TAG_SIZE",
    "VERSION",
    "Opener",
    "PipeError",
    "Sealer",
    "derive_key",
    "link_id_of",
    "new_link_id",
]

VERSION = 0xF1
LINK_ID_SIZE = 8
_COUNTER_AT = 1 + LINK_ID_SIZE
HEADER_SIZE = _COUNTER_AT + 8
TAG_SIZE = 16
MIN_SIZE = HEADER_SIZE + TAG_SIZE  # an empty payload still carries its tag
# Video arrives in bursts (a keyframe is tens of packets) that one pipe carries for several tracks at once;
# 1024 is SRTP's window here too (huddle.rtc.srtp.REPLAY_WINDOW).
REPLAY_WINDOW = 1024
COUNTER_LIMIT = 2**64 - 1  # never sealed: the counter would have nowhere to go after it
_KEY_LABEL = b"huddle pipe v1\0"
_HEADER = struct.Struct("!B8sQ")
_COUNTER = struct.Struct("!Q")
_NONCE = struct.Struct("!4xQ")


class PipeError(Exception):
    """A datagram that does not open, or a link that cannot seal any more.

    `reason` is one short snake_case word, meant for a metrics label: 'short', 'version', 'unknown_link',
    'integrity', 'replay', 'too_old' (and 'exhausted' from `Sealer.seal`).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def new_link_id() -> bytes:
    return secrets.token_bytes(LINK_ID_SIZE)


def link_id_of(data: bytes | bytearray | memoryview) -> bytes | None:
    """The sending side's link id, or None when `data` cannot be a pipe datagram (too short, wrong version).

    Checks the header only: whether the datagram opens is for the `Opener` of that link id to say.
    """
    if len(data) < MIN_SIZE or data[0] != VERSION:
        return None
    return bytes(data[1:_COUNTER_AT])


def derive_key(cluster_key: bytes, link_id: bytes) -> bytes:
    if not cluster_key:
        raise ValueError("pipes need a cluster key")
    if len(link_id) != LINK_ID_SIZE:
        raise ValueError(f"a link id is {LINK_ID_SIZE} bytes, not {len(link_id)}")
    return hmac.new(cluster_key, _KEY_LABEL + link_id, hashlib.sha256).digest()[:16]


class Sealer:
    """The sending end of one direction of one link.

    Exactly one Sealer may exist per link id: a second one would repeat the first one's nonces under the same
    key. `new_link_id()` for every link a process opens guarantees it.
    """

    def __init__(self, cluster_key: bytes, link_id: bytes) -> None:
        self.link_id = bytes(link_id)
        self._aead = AESGCM(derive_key(cluster_key, self.link_id))
        self.counter = 0  # the last counter sealed

    def seal(self, payload: bytes | bytearray | memoryview) -> bytes:
        counter = self.counter + 1
        if counter >= COUNTER_LIMIT:
            raise PipeError("exhausted")
        self.counter = counter
        header = _HEADER.pack(VERSION, self.link_id, counter)
        # Measured: header + encrypt() beats encrypt_into() a preallocated buffer (1.06 µs against 1.6 µs per
        # 1,200-byte payload), the buffer protocol costing more than copying 1.2 kB once.
        return header + self._aead.encrypt(_NONCE.pack(counter), payload, header)


class Opener:
    """The receiving end of one direction of one link: authenticates, decrypts and refuses replays."""

    def __init__(self, cluster_key: bytes, link_id: bytes) -> None:
        self.link_id = bytes(link_id)
        self._aead = AESGCM(derive_key(cluster_key, self.link_id))
        # The window as a ring: slot `c % REPLAY_WINDOW` holds the last counter accepted there. A counter
        # within the window has its slot to itself (the next one to reuse it, c + REPLAY_WINDOW, would put c
        # out of the window), so "seen" is one comparison and accepting is one store, no int built per packet.
        # Counter 0 is never sealed: the zeroed ring refuses it as a replay without a special case.
        self._slots = [0] * REPLAY_WINDOW
        self._highest = 0

    def open(self, data: bytes | bytearray | memoryview) -> bytes:
        """The payload of a datagram sealed by this link's Sealer; raises `PipeError` for anything else."""
        if len(data) < MIN_SIZE:
            raise PipeError("short")
        if data[0] != VERSION:
            raise PipeError("version")
        # Slicing, not a memoryview: for a 1,200-byte datagram the copy costs less than building the view.
        if data[1:_COUNTER_AT] != self.link_id:
            raise PipeError("unknown_link")
        (counter,) = _COUNTER.unpack_from(data, _COUNTER_AT)
        if counter <= self._highest - REPLAY_WINDOW:
            raise PipeError("too_old")
        slot = counter % REPLAY_WINDOW
        slots = self._slots
        if slots[slot] == counter:
            raise PipeError("replay")
        try:
            payload = self._aead.decrypt(_NONCE.pack(counter), data[HEADER_SIZE:], data[:HEADER_SIZE])
        except InvalidTag:
            raise PipeError("integrity") from None
        # Only an authenticated counter moves the window: a forged one must not push real packets out of it.
        slots[slot] = counter
        if counter > self._highest:
            self._highest = counter
        return payload
