"""The TURN server (RFC 8656) as a sans-I/O state machine: fed bytes, addresses and time, it returns what to
send where; relay ports come from a pool it is given, and it never touches a socket or a clock.

Three ways in, as the asyncio edge (turn/server.py) meets them:
- `receive(data, client, now)`: a STUN-framed message from a client (Allocate, Refresh, CreatePermission,
  ChannelBind requests; Send indications). Returns a `ToClient` (the response) or a `ToPeer` (the data of a
  Send indication), or None.
- `channel_data(data, client, now)`: a ChannelData message from a client (first byte 0x40-0x7F).
- `from_peer(relay, data, peer, now)`: a datagram that arrived on a relay port.
The last two are the relay path, run once per relayed packet: no STUN parsing, a few dict lookups, and a
plain tuple back (`(relay, peer, payload)` and `(client, frame)`, shaped like ToPeer and ToClient).
`expire(now)` forgets what has expired; requests and the relay path check expiry themselves, so a late
timer only delays the freeing of ports and quotas.

A client is its 5-tuple: a UDP source address (the tuple the socket reports), or a `StreamClient` per TCP or
TLS connection. `now` is Unix time in seconds, since time-limited usernames expire on the wall clock.

Every request but a retransmitted Allocate is authenticated with long-term credentials in the time-limited
form (credentials.py): no MESSAGE-INTEGRITY → 401 with REALM and NONCE; a nonce that is not ours or is
older than `nonce_lifetime` → 438 Stale Nonce with a fresh one; an expired username or a wrong
MESSAGE-INTEGRITY → 401. Nonces are stateless (an HMAC of their expiry and the client's IP), so that a
restarted process, or a sibling sharing the secret, takes them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import zlib
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, Protocol

from huddle.stun import message as stun
from huddle.turn import attributes as attr
from huddle.turn.credentials import REALM, expired, long_term_key
from huddle.turn.peers import PeerPolicy

__all__ = [
    "CHANNEL_LIFETIME",
    "DEFAULT_LIFETIME",
    "DROP_REASONS",
    "ERROR_CODES",
    "MAX_LIFETIME",
    "PERMISSION_LIFETIME",
    "AllocationEnded",
    "AllocationStarted",
    "Relay",
    "RelayPool",
    "StreamClient",
    "ToClient",
    "ToPeer",
    "TurnCore",
]

DEFAULT_LIFETIME: Final = 600
MAX_LIFETIME: Final = 3600
PERMISSION_LIFETIME: Final = 300
CHANNEL_LIFETIME: Final = 600
NONCE_LIFETIME: Final = 600.0
# Per allocation: a browser asks for one permission per remote candidate address and one channel per remote
# candidate, a few dozen at most; the caps bound what one client can make the server hold.
MAX_PERMISSIONS: Final = 64
MAX_CHANNELS: Final = 256
# A burst of this many seconds at the allocation's rate passes at once (a keyframe), and never less than
# one full-size datagram.
BURST_SECONDS: Final = 1.0
MIN_BURST_BYTES: Final = 1500.0

# Fixed label values: why a message or a relayed packet went nowhere.
NOT_TURN: Final = "not_turn"
MALFORMED: Final = "malformed"
BAD_FINGERPRINT: Final = "bad_fingerprint"
NOT_REQUEST: Final = "not_request"
NO_ALLOCATION: Final = "no_allocation"
NO_CHANNEL: Final = "no_channel"
NO_PERMISSION: Final = "no_permission"
FORBIDDEN_PEER: Final = "forbidden_peer"
WRONG_FAMILY: Final = "wrong_family"
UNKNOWN_ATTRIBUTE: Final = "unknown_attribute"
BANDWIDTH: Final = "bandwidth"
TOO_LARGE: Final = "too_large"
DROP_REASONS: Final = (
    NOT_TURN,
    MALFORMED,
    BAD_FINGERPRINT,
    NOT_REQUEST,
    NO_ALLOCATION,
    NO_CHANNEL,
    NO_PERMISSION,
    FORBIDDEN_PEER,
    WRONG_FAMILY,
    UNKNOWN_ATTRIBUTE,
    BANDWIDTH,
    TOO_LARGE,
)
ERROR_CODES: Final = (400, 401, 403, 420, 437, 438, 440, 441, 442, 443, 486, 508)
METHOD_NAMES: Final = {
    attr.ALLOCATE: "allocate",
    attr.REFRESH: "refresh",
    attr.CREATE_PERMISSION: "create_permission",
    attr.CHANNEL_BIND: "channel_bind",
}

_REASON_PHRASES: Final = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    420: "Unknown Attribute",
    437: "Allocation Mismatch",
    438: "Stale Nonce",
    440: "Address Family not Supported",
    441: "Wrong Credentials",
    442: "Unsupported Transport Protocol",
    443: "Peer Address Family Mismatch",
    486: "Allocation Quota Reached",
    508: "Insufficient Capacity",
}
_CHANNEL_HEADER = struct.Struct(">HH")
_FINGERPRINT_XOR = 0x5354554E
_PADDING = (b"", b"\x00\x00\x00", b"\x00\x00", b"\x00")  # by length & 3, to a multiple of 4
# The transaction id of every Data indication: it is never answered, and a fixed one lets an IPv6 peer's
# XOR-PEER-ADDRESS (XORed with it) be made once per peer rather than once per packet.
_DATA_TRANSACTION_ID: Final = os.urandom(12)
_FAMILIES: Final = {attr.FAMILY_IPV4: socket.AF_INET, attr.FAMILY_IPV6: socket.AF_INET6}

Address = tuple[str, int]
Client = Hashable


class StreamClient:
    """One TCP or TLS connection, a 5-tuple of its own (compared by identity). The edge may subclass it to
    keep its writer."""

    __slots__ = ("address", "transport")

    def __init__(self, address: tuple[Any, ...], transport: str) -> None:
        self.address = address
        self.transport = transport


class Relay(Protocol):
    """A relay transport address, as the pool hands it out: `address` is what clients are told."""

    @property
    def address(self) -> Address: ...


class RelayPool(Protocol):
    @property
    def families(self) -> frozenset[int]:
        """The socket families (AF_INET, AF_INET6) there are relay addresses for."""
        ...

    def open(self, family: int, *, even: bool, dont_fragment: bool) -> Relay | None:
        """A new relay address of `family` (an even port if asked), or None when no port is free."""
        ...

    def close(self, relay: Relay) -> None: ...


class ToClient(NamedTuple):
    client: Client
    data: bytes


class ToPeer(NamedTuple):
    relay: Relay
    peer: Address
    data: bytes


@dataclass(frozen=True, slots=True)
class AllocationStarted:
    client: Client
    relay: Address
    identity: str


@dataclass(frozen=True, slots=True)
class AllocationEnded:
    client: Client
    relay: Address
    identity: str
    reason: str  # "expired", "deleted" (Refresh with 0), "closed" (its connection ended), "shutdown"


class _Channel:
    __slots__ = ("expires", "number", "peer")

    def __init__(self, number: int, peer: Address, expires: float) -> None:
        self.number = number
        self.peer = peer
        self.expires = expires


class _Allocation:
    __slots__ = (
        "by_peer",
        "channels",
        "client",
        "dont_fragment",
        "down_time",
        "down_tokens",
        "expires",
        "family",
        "identity",
        "peer_values",
        "permissions",
        "relay",
        "response",
        "stream",
        "transaction_id",
        "up_time",
        "up_tokens",
        "username",
    )

    def __init__(
        self, client: Client, relay: Relay, username: str, family: int, now: float, burst: float
    ) -> None:
        self.client = client
        self.relay = relay
        self.username = username
        self.identity = username.partition(":")[2]
        self.family = family
        self.stream = not isinstance(client, tuple)
        self.expires = now
        self.transaction_id = b""
        self.response = b""
        self.dont_fragment = False
        self.permissions: dict[str, float] = {}  # peer IP -> expiry
        self.channels: dict[int, _Channel] = {}
        self.by_peer: dict[Address, _Channel] = {}
        # XOR-PEER-ADDRESS values for Data indications, made once per peer.
        self.peer_values: dict[Address, bytes] = {}
        self.up_tokens = self.down_tokens = burst
        self.up_time = self.down_time = now


def _address_of(client: Client) -> tuple[Any, ...]:
    return client if isinstance(client, tuple) else client.address  # type: ignore[attr-defined]


class TurnCore:
    def __init__(
        self,
        *,
        secret: bytes,
        pool: RelayPool,
        policy: PeerPolicy,
        user_quota: int = 10,
        total_quota: int = 1000,
        bandwidth_kbps: int = 10_000,
        realm: str = REALM,
        software: str = "huddle",
        nonce_lifetime: float = NONCE_LIFETIME,
    ) -> None:
        self.secret = secret
        self.pool = pool
        self.policy = policy
        self.user_quota = user_quota
        self.total_quota = total_quota
        self.rate = bandwidth_kbps * 125.0  # bytes per second
        self.burst = max(self.rate * BURST_SECONDS, MIN_BURST_BYTES)
        self.realm = realm
        self._realm_value = realm.encode()
        self._software = stun.encode_software(software)
        self.nonce_lifetime = nonce_lifetime
        self._nonce_key = hmac.new(secret, b"huddle turn nonce", hashlib.sha256).digest()
        self._allocations: dict[Client, _Allocation] = {}
        self._by_relay: dict[Relay, _Allocation] = {}
        self._per_user: dict[str, int] = {}
        self.events: deque[AllocationStarted | AllocationEnded] = deque(maxlen=1024)
        # Plain integers on the relay path; /metrics reads them through a collector.
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.errors = dict.fromkeys(ERROR_CODES, 0)
        self.requests = dict.fromkeys(METHOD_NAMES.values(), 0)
        self.packets_to_peer = self.bytes_to_peer = 0
        self.packets_to_client = self.bytes_to_client = 0

    # -- State --------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._allocations)

    def holds(self, client: Client) -> bool:
        """Whether `client` has an allocation (a TCP connection with one is kept however quiet it is)."""
        return client in self._allocations

    def relay_of(self, client: Client) -> Address | None:
        allocation = self._allocations.get(client)
        return None if allocation is None else allocation.relay.address

    def counts(self) -> dict[str, int]:
        allocations = self._allocations.values()
        return {
            "allocations": len(self._allocations),
            "permissions": sum(len(a.permissions) for a in allocations),
            "channels": sum(len(a.channels) for a in allocations),
        }

    def expire(self, now: float) -> None:
        """Forget what has expired: allocations (their relay ports go back to the pool), permissions and
        channels. The relay path checks expiry itself, so this only needs to run now and then."""
        for allocation in list(self._allocations.values()):
            if allocation.expires <= now:
                self._delete(allocation, "expired")
                continue
            permissions = allocation.permissions
            if any(expiry <= now for expiry in permissions.values()):
                allocation.permissions = {ip: e for ip, e in permissions.items() if e > now}
            stale = [channel for channel in allocation.channels.values() if channel.expires <= now]
            for channel in stale:
                del allocation.channels[channel.number]
                del allocation.by_peer[channel.peer]
            if len(allocation.peer_values) > MAX_CHANNELS:
                allocation.peer_values.clear()

    def client_closed(self, client: Client) -> None:
        """A TCP or TLS connection ended: so does its allocation (RFC 8656 §3.1)."""
        allocation = self._allocations.get(client)
        if allocation is not None:
            self._delete(allocation, "closed")

    def close(self) -> None:
        for allocation in list(self._allocations.values()):
            self._delete(allocation, "shutdown")

    def _delete(self, allocation: _Allocation, reason: str) -> None:
        del self._allocations[allocation.client]
        del self._by_relay[allocation.relay]
        held = self._per_user[allocation.identity] - 1
        if held:
            self._per_user[allocation.identity] = held
        else:
            del self._per_user[allocation.identity]
        self.pool.close(allocation.relay)
        self.events.append(
            AllocationEnded(allocation.client, allocation.relay.address, allocation.identity, reason)
        )

    # -- The relay path -------------------------------------------------------------------------------------

    def channel_data(self, data: bytes, client: Client, now: float) -> tuple[Relay, Address, bytes] | None:
        """ChannelData from a client: (relay, peer, payload) to send, or None (dropped and counted)."""
        allocation = self._allocations.get(client)
        if allocation is None or allocation.expires <= now:
            self.dropped[NO_ALLOCATION] += 1
            return None
        size = len(data) - 4
        if size < 0:
            self.dropped[MALFORMED] += 1
            return None
        channel = allocation.channels.get((data[0] << 8) | data[1])
        if channel is None or channel.expires <= now:
            self.dropped[NO_CHANNEL] += 1
            return None
        length = (data[2] << 8) | data[3]
        if length > size:
            self.dropped[MALFORMED] += 1
            return None
        peer = channel.peer
        if allocation.permissions.get(peer[0], 0.0) <= now:
            self.dropped[NO_PERMISSION] += 1
            return None
        tokens = allocation.up_tokens + (now - allocation.up_time) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        allocation.up_time = now
        if tokens < length:
            allocation.up_tokens = tokens
            self.dropped[BANDWIDTH] += 1
            return None
        allocation.up_tokens = tokens - length
        self.packets_to_peer += 1
        self.bytes_to_peer += length
        return allocation.relay, peer, data[4 : 4 + length]

    def from_peer(
        self, relay: Relay, data: bytes, peer: tuple[Any, ...], now: float
    ) -> tuple[Client, bytes] | None:
        """A datagram from `peer` on a relay address: (client, frame) to send, or None (dropped, counted)."""
        allocation = self._by_relay.get(relay)
        if allocation is None or allocation.expires <= now:
            self.dropped[NO_ALLOCATION] += 1
            return None
        if allocation.permissions.get(peer[0], 0.0) <= now:
            self.dropped[NO_PERMISSION] += 1
            return None
        key = peer if len(peer) == 2 else (peer[0], peer[1])
        size = len(data)
        tokens = allocation.down_tokens + (now - allocation.down_time) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        allocation.down_time = now
        if tokens < size:
            allocation.down_tokens = tokens
            self.dropped[BANDWIDTH] += 1
            return None
        channel = allocation.by_peer.get(key)
        if channel is not None and channel.expires > now:
            if size > 0xFFFF:
                self.dropped[TOO_LARGE] += 1
                return None
            frame = _CHANNEL_HEADER.pack(channel.number, size) + data
            if allocation.stream and size & 3:
                frame += _PADDING[size & 3]
        else:
            value = allocation.peer_values.get(key)
            if value is None:
                value = allocation.peer_values[key] = attr.encode_xor_address(
                    key[0], key[1], _DATA_TRANSACTION_ID
                )
            try:
                frame = attr.encode_data_indication(_DATA_TRANSACTION_ID, value, data)
            except stun.StunError:
                self.dropped[TOO_LARGE] += 1
                return None
        allocation.down_tokens = tokens - size
        self.packets_to_client += 1
        self.bytes_to_client += size
        return allocation.client, frame

    # -- STUN-framed messages -------------------------------------------------------------------------------

    def receive(self, data: bytes, client: Client, now: float) -> ToClient | ToPeer | None:
        """A TURN message from a client (whole: the edge frames streams). None: dropped, and counted."""
        if not stun.is_stun(data):
            self.dropped[NOT_TURN] += 1
            return None
        message_type = (data[0] << 8) | data[1]
        method = (message_type & 0x000F) | ((message_type >> 1) & 0x0070) | ((message_type >> 2) & 0x0F80)
        if message_type & 0x0110 == 0x0010:
            if method == attr.SEND:
                return self._send_indication(data, client, now)
            self.dropped[NOT_REQUEST] += 1
            return None
        if message_type & 0x0110:
            # Only requests get answers (RFC 8489 §6.3): answering a response could start a loop.
            self.dropped[NOT_REQUEST] += 1
            return None
        try:
            request = stun.parse(data)
        except stun.StunError:
            self.dropped[MALFORMED] += 1
            return self._error(client, method, bytes(data[8:20]), 400, None, fingerprint=True)
        fingerprint = bool(request.attributes) and request.attributes[-1].type == stun.FINGERPRINT
        if fingerprint and not stun.verify_fingerprint(data):
            # A wrong FINGERPRINT usually means another protocol's packet on this port: stay silent.
            self.dropped[BAD_FINGERPRINT] += 1
            return None
        name = METHOD_NAMES.get(method)
        if name is None:
            return self._error(client, method, request.transaction_id, 400, None, fingerprint)
        self.requests[name] += 1
        existing = self._allocations.get(client)
        if existing is not None and existing.expires <= now:
            self._delete(existing, "expired")  # the timer has not come round to it yet
            existing = None
        if method == attr.ALLOCATE:
            if existing is not None and existing.transaction_id == request.transaction_id:
                # A retransmission: the first answer got lost (RFC 8656 §7.2).
                return ToClient(client, existing.response)
        auth = self._authenticate(request, data, client, now, fingerprint)
        if isinstance(auth, ToClient):
            return auth
        username, key = auth
        unknown = _unknown_required(request)
        if unknown:
            return self._error(
                client,
                method,
                request.transaction_id,
                420,
                key,
                fingerprint,
                [(stun.UNKNOWN_ATTRIBUTES, stun.encode_unknown_attributes(unknown))],
            )
        try:
            if method == attr.ALLOCATE:
                return self._allocate(request, client, username, key, now, fingerprint)
            allocation = self._allocations.get(client)
            if allocation is None:
                return self._error(client, method, request.transaction_id, 437, key, fingerprint)
            if allocation.username != username:
                return self._error(client, method, request.transaction_id, 441, key, fingerprint)
            if method == attr.REFRESH:
                return self._refresh(request, allocation, key, now, fingerprint)
            if method == attr.CREATE_PERMISSION:
                return self._create_permission(request, allocation, key, now, fingerprint)
            return self._channel_bind(request, allocation, key, now, fingerprint)
        except stun.StunError:
            # An attribute we needed did not decode.
            self.dropped[MALFORMED] += 1
            return self._error(client, method, request.transaction_id, 400, key, fingerprint)

    # -- Authentication (RFC 8489 §9.2.4) -------------------------------------------------------------------

    def nonce(self, client: Client, now: float) -> str:
        expiry = f"{int(now + self.nonce_lifetime) & 0xFFFFFFFF:08x}"
        return expiry + self._nonce_mac(expiry, client)

    def _nonce_mac(self, expiry: str, client: Client) -> str:
        host = str(_address_of(client)[0])
        return hmac.new(self._nonce_key, f"{expiry}/{host}".encode(), hashlib.sha256).hexdigest()[:16]

    def _nonce_valid(self, nonce: bytes, client: Client, now: float) -> bool:
        if len(nonce) != 24:
            return False
        try:
            text = nonce.decode("ascii")
            expiry = int(text[:8], 16)
        except (UnicodeDecodeError, ValueError):
            return False
        return expiry > now and hmac.compare_digest(text[8:], self._nonce_mac(text[:8], client))

    def _authenticate(
        self, request: stun.StunMessage, data: bytes, client: Client, now: float, fingerprint: bool
    ) -> tuple[str, bytes] | ToClient:
        method, transaction_id = request.method, request.transaction_id
        if request.get(stun.MESSAGE_INTEGRITY) is None:
            return self._challenge(client, method, transaction_id, 401, now, fingerprint)
        username_value = request.get(stun.USERNAME)
        realm = request.get(stun.REALM)
        nonce = request.get(stun.NONCE)
        if username_value is None or realm is None or nonce is None:
            return self._error(client, method, transaction_id, 400, None, fingerprint)
        try:
            username = stun.decode_username(username_value)
        except stun.StunError:
            return self._error(client, method, transaction_id, 400, None, fingerprint)
        if realm != self._realm_value:
            return self._challenge(client, method, transaction_id, 401, now, fingerprint)
        if not self._nonce_valid(nonce, client, now):
            return self._challenge(client, method, transaction_id, 438, now, fingerprint)
        if expired(username, now):
            return self._challenge(client, method, transaction_id, 401, now, fingerprint)
        key = long_term_key(username, self.realm, self.secret)
        if not stun.verify_integrity(data, key):
            return self._challenge(client, method, transaction_id, 401, now, fingerprint)
        return username, key

    def _challenge(
        self, client: Client, method: int, transaction_id: bytes, code: int, now: float, fingerprint: bool
    ) -> ToClient:
        return self._error(
            client,
            method,
            transaction_id,
            code,
            None,
            fingerprint,
            [(stun.REALM, self._realm_value), (stun.NONCE, self.nonce(client, now).encode())],
        )

    # -- Responses ----------------------------------------------------------------------------------------

    def _success(
        self,
        client: Client,
        request: stun.StunMessage,
        key: bytes,
        fingerprint: bool,
        attributes: Sequence[tuple[int, bytes]] = (),
    ) -> ToClient:
        response = stun.StunMessage(request.method, stun.MessageClass.SUCCESS, request.transaction_id)
        for kind, value in attributes:
            response.add(kind, value)
        response.add(stun.SOFTWARE, self._software)
        return ToClient(client, stun.encode(response, integrity_key=key, fingerprint=fingerprint))

    def _error(
        self,
        client: Client,
        method: int,
        transaction_id: bytes,
        code: int,
        key: bytes | None,
        fingerprint: bool,
        attributes: Sequence[tuple[int, bytes]] = (),
    ) -> ToClient:
        """An error response, signed when the request was authenticated (all but 400, 401 and 438)."""
        self.errors[code] += 1
        response = stun.StunMessage(method, stun.MessageClass.ERROR, transaction_id)
        response.add(stun.ERROR_CODE, stun.encode_error_code(code, _REASON_PHRASES[code]))
        for kind, value in attributes:
            response.add(kind, value)
        response.add(stun.SOFTWARE, self._software)
        return ToClient(client, stun.encode(response, integrity_key=key, fingerprint=fingerprint))

    # -- Methods ------------------------------------------------------------------------------------------

    def _lifetime(self, request: stun.StunMessage) -> int:
        """RFC 8656 §7.2 and §7.3: what the client asks for within the maximum, never below the default;
        0 (Refresh only) deletes."""
        value = request.get(attr.LIFETIME)
        if value is None:
            return DEFAULT_LIFETIME
        asked = attr.decode_lifetime(value)
        if asked == 0:
            return 0
        return max(DEFAULT_LIFETIME, min(asked, MAX_LIFETIME))

    def _allocate(
        self,
        request: stun.StunMessage,
        client: Client,
        username: str,
        key: bytes,
        now: float,
        fingerprint: bool,
    ) -> ToClient:
        tid, method = request.transaction_id, request.method
        if client in self._allocations:
            return self._error(client, method, tid, 437, key, fingerprint)
        transport = request.get(attr.REQUESTED_TRANSPORT)
        if transport is None:
            return self._error(client, method, tid, 400, key, fingerprint)
        if attr.decode_requested_transport(transport) != attr.TRANSPORT_UDP:
            return self._error(client, method, tid, 442, key, fingerprint)
        token = request.get(attr.RESERVATION_TOKEN)
        even_port = request.get(attr.EVEN_PORT)
        family_value = request.get(attr.REQUESTED_ADDRESS_FAMILY)
        if token is not None and (even_port is not None or family_value is not None):
            return self._error(client, method, tid, 400, key, fingerprint)
        # No port is ever kept for a later Allocate, so a token is never one we gave (RFC 8656 §7.2: 508),
        # and neither is a reservation of the next port.
        if token is not None or (even_port is not None and attr.decode_even_port(even_port)):
            return self._error(client, method, tid, 508, key, fingerprint)
        family = socket.AF_INET
        if family_value is not None:
            family = _FAMILIES.get(attr.decode_requested_address_family(family_value), -1)
        if family not in self.pool.families:
            return self._error(client, method, tid, 440, key, fingerprint)
        lifetime = self._lifetime(request) or DEFAULT_LIFETIME
        identity = username.partition(":")[2]
        held = self._per_user.get(identity, 0)
        if held >= self.user_quota or len(self._allocations) >= self.total_quota:
            return self._error(client, method, tid, 486, key, fingerprint)
        dont_fragment = request.get(attr.DONT_FRAGMENT) is not None
        relay = self.pool.open(family, even=even_port is not None, dont_fragment=dont_fragment)
        if relay is None:
            return self._error(client, method, tid, 508, key, fingerprint)
        allocation = _Allocation(client, relay, username, family, now, self.burst)
        allocation.expires = now + lifetime
        allocation.dont_fragment = dont_fragment
        allocation.transaction_id = tid
        host, port = _address_of(client)[:2]
        reply = self._success(
            client,
            request,
            key,
            fingerprint,
            [
                (attr.XOR_RELAYED_ADDRESS, attr.encode_xor_address(*relay.address, tid)),
                (attr.LIFETIME, attr.encode_lifetime(lifetime)),
                (stun.XOR_MAPPED_ADDRESS, attr.encode_xor_address(_unmapped(str(host)), int(port), tid)),
            ],
        )
        allocation.response = reply.data
        self._allocations[client] = allocation
        self._by_relay[relay] = allocation
        self._per_user[identity] = held + 1
        self.events.append(AllocationStarted(client, relay.address, identity))
        return reply

    def _refresh(
        self, request: stun.StunMessage, allocation: _Allocation, key: bytes, now: float, fingerprint: bool
    ) -> ToClient:
        family_value = request.get(attr.REQUESTED_ADDRESS_FAMILY)
        if family_value is not None:
            family = _FAMILIES.get(attr.decode_requested_address_family(family_value), -1)
            if family != allocation.family:
                return self._error(
                    allocation.client, request.method, request.transaction_id, 443, key, fingerprint
                )
        lifetime = self._lifetime(request)
        if lifetime == 0:
            self._delete(allocation, "deleted")
        else:
            allocation.expires = now + lifetime
        return self._success(
            allocation.client, request, key, fingerprint, [(attr.LIFETIME, attr.encode_lifetime(lifetime))]
        )

    def _peers(
        self, request: stun.StunMessage, allocation: _Allocation, key: bytes, fingerprint: bool
    ) -> list[Address] | ToClient:
        """The request's XOR-PEER-ADDRESSes, or the error that refuses them all (none is installed)."""
        tid, method, client = request.transaction_id, request.method, allocation.client
        peers: list[Address] = []
        for kind, value in request.attributes:
            if kind == stun.MESSAGE_INTEGRITY:
                break
            if kind != attr.XOR_PEER_ADDRESS:
                continue
            family, host, port = attr.decode_xor_address(value, tid)
            # A permission is for an address, a channel for one port of it (RFC 8656 9, 12).
            if not (
                self.policy.permits(host)
                if method == attr.CREATE_PERMISSION
                else self.policy.permits_peer(host, port)
            ):
                self.dropped[FORBIDDEN_PEER] += 1
                return self._error(client, method, tid, 403, key, fingerprint)
            if family != allocation.family:
                return self._error(client, method, tid, 443, key, fingerprint)
            peers.append((host, port))
        if not peers:
            return self._error(client, method, tid, 400, key, fingerprint)
        return peers

    def _create_permission(
        self, request: stun.StunMessage, allocation: _Allocation, key: bytes, now: float, fingerprint: bool
    ) -> ToClient:
        peers = self._peers(request, allocation, key, fingerprint)
        if isinstance(peers, ToClient):
            return peers
        permissions = allocation.permissions
        if len(permissions.keys() | {host for host, _ in peers}) > MAX_PERMISSIONS:
            return self._error(
                allocation.client, request.method, request.transaction_id, 508, key, fingerprint
            )
        for host, _ in peers:
            permissions[host] = now + PERMISSION_LIFETIME
        return self._success(allocation.client, request, key, fingerprint)

    def _channel_bind(
        self, request: stun.StunMessage, allocation: _Allocation, key: bytes, now: float, fingerprint: bool
    ) -> ToClient:
        tid, method, client = request.transaction_id, request.method, allocation.client
        number_value = request.get(attr.CHANNEL_NUMBER)
        if number_value is None:
            return self._error(client, method, tid, 400, key, fingerprint)
        number = attr.decode_channel_number(number_value)
        if not attr.CHANNEL_MIN <= number <= attr.CHANNEL_MAX:
            return self._error(client, method, tid, 400, key, fingerprint)
        peers = self._peers(request, allocation, key, fingerprint)
        if isinstance(peers, ToClient):
            return peers
        peer = peers[0]
        # RFC 8656 §12.2: a channel stays bound to one peer, and a peer to one channel, until it expires.
        channel = allocation.channels.get(number)
        if channel is not None and channel.expires > now and channel.peer != peer:
            return self._error(client, method, tid, 400, key, fingerprint)
        other = allocation.by_peer.get(peer)
        if other is not None and other.expires > now and other.number != number:
            return self._error(client, method, tid, 400, key, fingerprint)
        if channel is None or channel.peer != peer:
            if channel is not None:
                del allocation.by_peer[channel.peer]
            if other is not None:
                del allocation.channels[other.number]
            if len(allocation.channels) >= MAX_CHANNELS:
                return self._error(client, method, tid, 508, key, fingerprint)
            channel = allocation.channels[number] = allocation.by_peer[peer] = _Channel(number, peer, now)
        channel.expires = now + CHANNEL_LIFETIME
        allocation.permissions[peer[0]] = now + PERMISSION_LIFETIME
        return self._success(client, request, key, fingerprint)

    def _send_indication(self, data: bytes, client: Client, now: float) -> ToPeer | None:
        """RFC 8656 §11.2, without building a StunMessage: Send indications carry the data of clients that
        use no channels (Firefox's among them), one per packet."""
        allocation = self._allocations.get(client)
        if allocation is None or allocation.expires <= now:
            self.dropped[NO_ALLOCATION] += 1
            return None
        end = len(data)
        if end != 20 + ((data[2] << 8) | data[3]):
            self.dropped[MALFORMED] += 1
            return None
        peer_value = payload = None
        offset = 20
        while offset < end:
            if end - offset < 4:
                self.dropped[MALFORMED] += 1
                return None
            kind = (data[offset] << 8) | data[offset + 1]
            size = (data[offset + 2] << 8) | data[offset + 3]
            start = offset + 4
            stop = start + size
            if stop > end:
                self.dropped[MALFORMED] += 1
                return None
            if kind == attr.XOR_PEER_ADDRESS:
                if peer_value is None:
                    peer_value = data[start:stop]
            elif kind == attr.DATA:
                if payload is None:
                    payload = data[start:stop]
            elif kind == stun.FINGERPRINT:
                if size != 4 or stop != end:
                    self.dropped[MALFORMED] += 1
                    return None
                if zlib.crc32(data[:offset]) ^ _FINGERPRINT_XOR != int.from_bytes(data[start:stop], "big"):
                    self.dropped[BAD_FINGERPRINT] += 1
                    return None
            elif kind == attr.DONT_FRAGMENT:
                # Only an allocation made with DONT-FRAGMENT has its relay socket set to never fragment.
                if not allocation.dont_fragment:
                    self.dropped[UNKNOWN_ATTRIBUTE] += 1
                    return None
            elif kind < 0x8000 and kind not in attr.KNOWN_TURN_ATTRIBUTES:
                self.dropped[UNKNOWN_ATTRIBUTE] += 1
                return None
            offset = stop + (-size & 3)
        if peer_value is None or payload is None:
            self.dropped[MALFORMED] += 1
            return None
        try:
            family, host, port = attr.decode_xor_address(peer_value, data[8:20])
        except stun.StunError:
            self.dropped[MALFORMED] += 1
            return None
        if not self.policy.permits_peer(host, port):
            self.dropped[FORBIDDEN_PEER] += 1
            return None
        if family != allocation.family:
            self.dropped[WRONG_FAMILY] += 1
            return None
        if allocation.permissions.get(host, 0.0) <= now:
            self.dropped[NO_PERMISSION] += 1
            return None
        size = len(payload)
        tokens = allocation.up_tokens + (now - allocation.up_time) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        allocation.up_time = now
        if tokens < size:
            allocation.up_tokens = tokens
            self.dropped[BANDWIDTH] += 1
            return None
        allocation.up_tokens = tokens - size
        self.packets_to_peer += 1
        self.bytes_to_peer += size
        return ToPeer(allocation.relay, (host, port), payload)


def _unknown_required(request: stun.StunMessage) -> list[int]:
    unknown: dict[int, None] = {}  # a dict: ordered, and `in` stays cheap on a message of 16,000 attributes
    for kind, _ in request.attributes:
        # Attributes after MESSAGE-INTEGRITY are to be ignored (RFC 8489 §14.5), known or not.
        if kind == stun.MESSAGE_INTEGRITY:
            break
        if kind < 0x8000 and kind not in attr.KNOWN_TURN_ATTRIBUTES:
            unknown[kind] = None
    return list(unknown)


def _unmapped(host: str) -> str:
    # A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; the client knows itself as a.b.c.d.
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host
