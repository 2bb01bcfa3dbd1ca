"""The TURN relay over real sockets on loopback: what it relays, what it refuses, and its limits.

Run inside `scripts/in-netns`: every socket here is on 127.0.0.1 or ::1 of a namespace of its own.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from huddle.config import Settings
from huddle.metrics import Metrics
from huddle.stun.message import ERROR_CODE, NONCE, MessageClass, StunMessage, decode_error_code, parse
from huddle.stun.server import StunServer
from huddle.turn import attributes as a
from huddle.turn.credentials import issue
from huddle.turn.peers import parse_networks
from huddle.turn.server import TurnServer, local_networks
from tests.signaling.conftest import Harness
from tests.unit.test_turn_core import request

SECRET = b"socket-test-secret"
TIMEOUT = 5.0
QUIET = 0.3  # how long "nothing arrived" is watched for; the relay answers loopback within a millisecond
ADDRESSES = {socket.AF_INET: ("127.0.0.1", "127.0.0.1"), socket.AF_INET6: ("::1", "::1")}
V6 = (a.REQUESTED_ADDRESS_FAMILY, a.encode_requested_address_family(a.FAMILY_IPV6))


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Relay:
    """A StunServer with a TurnServer behind it, started on 127.0.0.1."""

    def __init__(self, metrics: Metrics, stun: StunServer, turn: TurnServer, port: int) -> None:
        self.metrics, self.stun, self.turn, self.port = metrics, stun, turn, port

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    async def close(self) -> None:
        await self.turn.close()
        await self.stun.close()


async def start_relay(
    allow: str | None = None,
    ports: tuple[int, int] = (49152, 65535),
    tls: tuple[Path, Path] | None = None,
    **options: Any,
) -> Relay:
    metrics = Metrics()
    turn = TurnServer(metrics, ports=ports, allow=parse_networks(allow), **options)
    stun = StunServer(metrics, turn=turn)
    port = await stun.start("127.0.0.1", 0)
    await turn.start(
        secret=SECRET,
        host="127.0.0.1",
        addresses=ADDRESSES,
        stun=stun,
        tls_port=0 if tls else None,
        tls_cert=str(tls[0]) if tls else None,
        tls_key=str(tls[1]) if tls else None,
    )
    return Relay(metrics, stun, turn, port)


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    r = await start_relay()
    yield r
    await r.close()


@pytest.fixture
async def open_relay() -> AsyncIterator[Relay]:
    r = await start_relay("127.0.0.0/8,::1/128")
    yield r
    await r.close()


class TurnClient:
    """A TURN client over UDP or a stream, answering challenges (401 with a nonce, 438) as clients do."""

    def __init__(self, identity: str = "alice", password: str | None = None) -> None:
        self.username, real = issue(SECRET, identity, 0, 10**10)
        self.password = password or real
        self.nonce = ""
        self.messages: asyncio.Queue[bytes] = asyncio.Queue()
        self._send: Callable[[bytes], None] = lambda data: None
        self._closers: list[Callable[[], None]] = []
        self.stream = False

    async def udp(self, port: int) -> TurnClient:
        client = self

        class Protocol(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                client.messages.put_nowait(data)

        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            Protocol, remote_addr=("127.0.0.1", port)
        )
        self._send = transport.sendto
        self._closers.append(transport.close)
        return self

    async def connect(self, port: int, context: ssl.SSLContext | None = None) -> TurnClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        self.stream = True
        self._send = writer.write
        task = asyncio.get_running_loop().create_task(self._read(reader))
        self._closers += [task.cancel, writer.close]
        return self

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            head = await reader.readexactly(4)
            if a.is_channel_data(head):
                rest = await reader.readexactly(a.channel_data_size(head, stream=True) - 4)
            else:
                rest = await reader.readexactly(16 + int.from_bytes(head[2:4], "big"))
            self.messages.put_nowait(head + rest)

    def close(self) -> None:
        for closer in self._closers:
            closer()

    def send(self, data: bytes) -> None:
        self._send(data)

    async def next(self, timeout: float = TIMEOUT) -> bytes:
        return await asyncio.wait_for(self.messages.get(), timeout)

    async def ask(
        self, method: int, attributes: Callable[[bytes], Sequence[tuple[int, bytes]]] = lambda tid: ()
    ) -> StunMessage:
        """A signed request; on 401 with a nonce, or 438, asks again with the new nonce (once)."""
        for _ in range(2):
            tid = os.urandom(12)
            data = request(
                method,
                attributes(tid),
                username=self.username,
                password=self.password,
                nonce=self.nonce,
                transaction_id=tid,
            )
            self.send(data)
            while True:
                response = parse(await self.next())
                if response.transaction_id == tid:
                    break
            code = error_code(response)
            nonce = response.get(NONCE)
            if code in (401, 438) and nonce is not None and nonce.decode() != self.nonce:
                self.nonce = nonce.decode()
                continue
            return response
        return response

    async def allocate(self, *extra: tuple[int, bytes]) -> StunMessage:
        transport = (a.REQUESTED_TRANSPORT, a.encode_requested_transport(a.TRANSPORT_UDP))
        return await self.ask(a.ALLOCATE, lambda tid: [transport, *extra])

    async def permit(self, host: str) -> StunMessage:
        return await self.ask(a.CREATE_PERMISSION, lambda tid: [peer(host, 9, tid)])

    async def bind(self, number: int, host: str, port: int) -> StunMessage:
        return await self.ask(
            a.CHANNEL_BIND,
            lambda tid: [(a.CHANNEL_NUMBER, a.encode_channel_number(number)), peer(host, port, tid)],
        )

    def send_indication(self, host: str, port: int, data: bytes) -> None:
        tid = os.urandom(12)
        self.send(
            request(
                a.SEND,
                [peer(host, port, tid), (a.DATA, data)],
                transaction_id=tid,
                message_class=MessageClass.INDICATION,
            )
        )


def peer(host: str, port: int, tid: bytes) -> tuple[int, bytes]:
    return a.XOR_PEER_ADDRESS, a.encode_xor_address(host, port, tid)


def error_code(message: StunMessage) -> int | None:
    value = message.get(ERROR_CODE)
    return None if value is None else decode_error_code(value)[0]


def relayed(response: StunMessage) -> tuple[str, int]:
    assert response.message_class == MessageClass.SUCCESS, error_code(response)
    value = response.get(a.XOR_RELAYED_ADDRESS)
    assert value is not None
    return a.decode_xor_address(value, response.transaction_id)[1:]


class Listener:
    """A UDP peer that records what reaches it."""

    def __init__(self, family: int, host: str) -> None:
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    async def received(self, within: float) -> list[tuple[bytes, Any]]:
        got = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            try:
                got.append(self.sock.recvfrom(65535))
            except BlockingIOError:
                await asyncio.sleep(0.01)
        return got

    def close(self) -> None:
        self.sock.close()


REFUSED_V4 = [
    "127.0.0.1",
    "127.1.2.3",
    "0.0.0.0",
    "10.77.0.1",  # the namespace's own veth address, private too
    "10.0.0.1",
    "100.64.0.1",
    "169.254.169.254",
    "172.16.0.1",
    "192.168.0.1",
    "224.0.0.1",
    "255.255.255.255",
    "240.0.0.1",
]
REFUSED_V6 = [
    "::1",
    "::",
    "::ffff:127.0.0.1",
    "::127.0.0.1",
    "::ffff:10.0.0.1",
    "64:ff9b::7f00:1",
    "2002:7f00:1::1",
    "fe80::1",
    "fc00::1",
    "fd00::1",
    "ff02::1",
]


@pytest.mark.parametrize(("family", "hosts"), [(socket.AF_INET, REFUSED_V4), (socket.AF_INET6, REFUSED_V6)])
async def test_every_refused_peer_gets_403_and_nothing_is_relayed(
    relay: Relay, family: int, hosts: list[str]
) -> None:
    listener = Listener(family, "127.0.0.1" if family == socket.AF_INET else "::1")
    client = await TurnClient().udp(relay.port)
    try:
        relayed(await client.allocate(*([V6] if family == socket.AF_INET6 else [])))
        for number, host in enumerate(hosts, start=0x4000):
            assert error_code(await client.permit(host)) == 403, host
            assert error_code(await client.bind(number, host, listener.port)) == 403, host
            client.send_indication(host, listener.port, b"let me in")
            client.send(a.encode_channel_data(number, b"let me in"))
        assert await listener.received(QUIET) == []
        assert relay.metric("huddle_turn_dropped_total", reason="forbidden_peer") == 3 * len(hosts)
        assert relay.metric("huddle_turn_packets_total", direction="to_peer") == 0
        assert relay.metric("huddle_turn_permissions") == relay.metric("huddle_turn_channels") == 0
    finally:
        client.close()
        listener.close()


@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
async def test_allowed_peer_is_relayed_both_ways(open_relay: Relay, family: int, host: str) -> None:
    # The same steps as above against a relay whose operator allowed loopback: the listener hears it all,
    # so the silence above is the policy's doing.
    listener = Listener(family, host)
    client = await TurnClient().udp(open_relay.port)
    try:
        relay_address = relayed(await client.allocate(*([V6] if family == socket.AF_INET6 else [])))
        assert (await client.permit(host)).message_class == MessageClass.SUCCESS
        client.send_indication(host, listener.port, b"by indication")
        assert (await client.bind(0x4000, host, listener.port)).message_class == MessageClass.SUCCESS
        client.send(a.encode_channel_data(0x4000, b"by channel"))
        got = await listener.received(QUIET)
        assert [data for data, _ in got] == [b"by indication", b"by channel"]
        assert got[0][1][:2] == relay_address
        listener.sock.sendto(b"answer", relay_address)
        assert await client.next() == a.encode_channel_data(0x4000, b"answer")
    finally:
        client.close()
        listener.close()


async def test_wrong_password_gets_401_and_no_relay(relay: Relay) -> None:
    for connect in ("udp", "tcp"):
        client = TurnClient(password="not-the-password")
        await (client.udp(relay.port) if connect == "udp" else client.connect(relay.port))
        try:
            assert error_code(await client.allocate()) == 401
        finally:
            client.close()
    assert relay.metric("huddle_turn_relay_ports") == 0
    assert relay.metric("huddle_turn_allocations") == 0


async def test_stale_nonce_gets_438_then_a_fresh_one_works(relay: Relay) -> None:
    assert relay.turn.core is not None
    relay.turn.core.nonce_lifetime = 1.0
    client = await TurnClient().udp(relay.port)
    try:
        relayed(await client.allocate())
        await asyncio.sleep(1.1)
        old = client.nonce
        tid = os.urandom(12)
        client.send(
            request(
                a.REFRESH,
                [],
                username=client.username,
                password=client.password,
                nonce=old,
                transaction_id=tid,
            )
        )
        response = parse(await client.next())
        assert error_code(response) == 438
        assert response.get(NONCE) not in (None, old.encode())
        assert (await client.ask(a.REFRESH)).message_class == MessageClass.SUCCESS
    finally:
        client.close()


async def test_quotas_and_ports() -> None:
    r = await start_relay(user_quota=1, total_quota=2)
    clients = []
    try:
        for identity, expected in (("alice", None), ("alice", 486), ("bob", None), ("carol", 486)):
            client = await TurnClient(identity).udp(r.port)
            clients.append(client)
            assert error_code(await client.allocate()) == expected
        assert r.metric("huddle_turn_errors_total", code="486") == 2
    finally:
        for client in clients:
            client.close()
        await r.close()
    port = free_udp_port()
    r = await start_relay(ports=(port, port))
    try:
        first = await TurnClient("a").udp(r.port)
        second = await TurnClient("b").udp(r.port)
        clients = [first, second]
        assert relayed(await first.allocate()) == ("127.0.0.1", port)
        assert error_code(await second.allocate()) == 508
        # Refresh with 0 frees the port at once.
        assert (
            await first.ask(a.REFRESH, lambda tid: [(a.LIFETIME, a.encode_lifetime(0))])
        ).message_class == (MessageClass.SUCCESS)
        assert relayed(await second.allocate()) == ("127.0.0.1", port)
    finally:
        for client in clients:
            client.close()
        await r.close()


async def test_bandwidth_cap_drops_over_the_rate() -> None:
    r = await start_relay("127.0.0.0/8", bandwidth_kbps=80)  # 10,000 bytes a second
    listener = Listener(socket.AF_INET, "127.0.0.1")
    client = await TurnClient().udp(r.port)
    try:
        relayed(await client.allocate())
        await client.bind(0x4000, "127.0.0.1", listener.port)
        for _ in range(40):
            client.send(a.encode_channel_data(0x4000, bytes(1000)))
        got = await listener.received(QUIET)
        assert 10 <= len(got) <= 14  # the burst, and what the rate refilled meanwhile
        assert r.metric("huddle_turn_dropped_total", reason="bandwidth") == 40 - len(got)
    finally:
        client.close()
        listener.close()
        await r.close()


async def test_tcp_allocation_relays_and_ends_with_the_connection(open_relay: Relay) -> None:
    listener = Listener(socket.AF_INET, "127.0.0.1")
    client = await TurnClient().connect(open_relay.port)
    try:
        relay_address = relayed(await client.allocate())
        await client.bind(0x4000, "127.0.0.1", listener.port)
        client.send(a.encode_channel_data(0x4000, b"odd", stream=True))
        client.send(a.encode_channel_data(0x4000, b"even", stream=True))
        assert [data for data, _ in await listener.received(QUIET)] == [b"odd", b"even"]
        listener.sock.sendto(b"back", relay_address)
        assert await client.next() == a.encode_channel_data(0x4000, b"back", stream=True)
        assert open_relay.metric("huddle_turn_allocations") == 1
    finally:
        client.close()
        listener.close()
    for _ in range(100):
        if open_relay.metric("huddle_turn_allocations") == 0:
            break
        await asyncio.sleep(0.02)
    assert open_relay.metric("huddle_turn_relay_ports") == 0


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


async def test_turn_over_tls(tmp_path: Path) -> None:
    r = await start_relay("127.0.0.0/8", tls=self_signed(tmp_path))
    listener = Listener(socket.AF_INET, "127.0.0.1")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    assert r.turn.tls_port
    client = await TurnClient().connect(r.turn.tls_port, context)
    try:
        relayed(await client.allocate())
        await client.bind(0x4000, "127.0.0.1", listener.port)
        client.send(a.encode_channel_data(0x4000, b"over tls", stream=True))
        assert [data for data, _ in await listener.received(QUIET)] == [b"over tls"]
    finally:
        client.close()
        listener.close()
        await r.close()


def test_own_addresses_are_read_from_the_namespace() -> None:
    own = local_networks(["203.0.113.7"])
    hosts = {str(network) for network in own}
    assert "127.0.0.0/8" in hosts or "127.0.0.1/32" in hosts
    assert "::1/128" in hosts
    assert "203.0.113.7/32" in hosts


@pytest.fixture
def settings() -> Settings:
    return Settings(reconnect_grace=0, turn_allow_peer="127.0.0.0/8", turn_secret="node-secret")


async def test_joined_participant_gets_turn_credentials_that_work(harness: Harness) -> None:
    client = await harness.connect()
    joined = await client.join("turn-room", "Ann")
    servers = joined["ice_servers"]
    turn = next(server for server in servers if any(url.startswith("turn:") for url in server["urls"]))
    port = harness.ports.stun
    assert f"turn:127.0.0.1:{port}?transport=udp" in turn["urls"]
    assert f"turn:127.0.0.1:{port}?transport=tcp" in turn["urls"]
    user = TurnClient()
    user.username, user.password = turn["username"], turn["credential"]
    await user.udp(port)
    try:
        relayed(await user.allocate())
    finally:
        user.close()
