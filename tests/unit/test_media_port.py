"""The media port over real loopback sockets (ICE-TCP limits) and in memory (DTLS it must drop and count)."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import AsyncIterator

import pytest

from huddle.metrics import Metrics
from huddle.rtc.certificate import Certificate
from huddle.rtc.dtls import DtlsEndpoint
from huddle.rtc.port import MediaPort
from huddle.rtc.transport import WebRtcTransport
from huddle.stun import message as stun

SERVER_CERT = Certificate.generate()
CLIENT_CERT = Certificate.generate()
REMOTE_UFRAG = "peer"
TIMEOUT = 5.0  # an upper bound only: each wait ends as soon as what it waits for happens


def dropped(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("huddle_media_dropped_total", {"reason": reason}) or 0.0


def new_transport(port: MediaPort) -> WebRtcTransport:
    return WebRtcTransport(
        port, SERVER_CERT, label="test", on_rtp=lambda t, p: None, on_rtcp=lambda t, p: None
    )


def check(transport: WebRtcTransport, *, ufrag: str | None = None) -> bytes:
    """A connectivity check as a browser sends it; a wrong `ufrag` makes it one for nobody."""
    request = stun.StunMessage(stun.BINDING, stun.MessageClass.REQUEST, os.urandom(12))
    request.add(stun.USERNAME, f"{ufrag or transport.ice.ufrag}:{REMOTE_UFRAG}".encode())
    request.add(stun.ICE_CONTROLLING, os.urandom(8))
    return stun.encode(request, integrity_key=transport.ice.pwd.encode(), fingerprint=True)


def frame(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


class TcpClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, data: bytes) -> None:
        self.writer.write(frame(data))
        await self.writer.drain()

    async def answer(self) -> stun.StunMessage:
        async with asyncio.timeout(TIMEOUT):
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            return stun.parse(await self.reader.readexactly(length))

    async def closed(self, timeout: float = TIMEOUT) -> bool:
        """Whether the server closes the connection within `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(4096):
                    pass
        except TimeoutError:
            return False
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.writer.close()


class Running:
    def __init__(self, port: MediaPort, metrics: Metrics) -> None:
        self.port, self.metrics = port, metrics

    async def connect(self, source: str = "127.0.0.1") -> TcpClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port.port, local_addr=(source, 0))
        return TcpClient(reader, writer)


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    metrics = Metrics()
    port = MediaPort(metrics, max_connections_per_address=3)
    await port.start("127.0.0.1", 0)
    assert port.tcp_enabled
    yield Running(port, metrics)
    await port.close()


# --- ICE-TCP -------------------------------------------------------------------------------------------


async def test_one_address_holds_at_most_its_share_of_ice_tcp_connections(running: Running) -> None:
    transport = new_transport(running.port)
    held = [await running.connect() for _ in range(3)]
    for client in held:  # all three are served: each passes ICE
        await client.send(check(transport))
        assert (await client.answer()).message_class == stun.MessageClass.SUCCESS
    over = [await running.connect() for _ in range(2)]
    for client in over:
        assert await client.closed()
    assert dropped(running.metrics, "tcp_per_address_limit") == 2

    # Another address is not affected, and the first one gets a slot back when it frees one.
    other = await running.connect("127.0.0.2")
    await other.send(check(transport))
    assert (await other.answer()).message_class == stun.MessageClass.SUCCESS
    held.pop().close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while running.port.counts()["tcp_connections"] > 3:
        assert loop.time() < deadline, "the server never noticed the closed connection"
        await asyncio.sleep(0.01)
    again = await running.connect()
    await again.send(check(transport))
    assert (await again.answer()).message_class == stun.MessageClass.SUCCESS
    for client in (*held, *over, other, again):
        client.close()


@pytest.mark.timeout(30)
async def test_an_ice_tcp_connection_that_does_not_pass_ice_within_10_s_is_closed(running: Running) -> None:
    transport = new_transport(running.port)
    silent = await running.connect()
    chatty = await running.connect()  # sends frames, but never a check that passes
    bound = await running.connect()
    opened = time.monotonic()
    await bound.send(check(transport))
    await bound.answer()

    async def chatter() -> None:
        for _ in range(12):
            await chatty.send(b"")
            await chatty.send(check(transport, ufrag="nobody"))
            await asyncio.sleep(1.0)

    async def consent() -> None:
        for _ in range(6):
            await asyncio.sleep(2.0)
            await bound.send(check(transport))
            await bound.answer()

    background = [asyncio.create_task(chatter()), asyncio.create_task(consent())]
    try:
        assert not await silent.closed(9.0)
        assert await silent.closed(2.5)
        assert await chatty.closed(0.5)
        assert 9.5 <= time.monotonic() - opened <= 12.0
        assert dropped(running.metrics, "tcp_ice_timeout") == 2
        # The connection that passed ICE keeps working past the 10 s.
        await background[1]
        assert time.monotonic() - opened > 12.0
        assert not await bound.closed(0.1)
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        for client in (silent, chatty, bound):
            client.close()


# --- DTLS that must be dropped and counted ------------------------------------------------------------


def dtls_record(content_type: int, epoch: int, payload_size: int) -> bytes:
    """A well-framed DTLS 1.2 record whose content is random: it passes every framing check."""
    sequence = int.from_bytes(os.urandom(6), "big")
    header = bytes([content_type, 0xFE, 0xFD]) + epoch.to_bytes(2, "big") + sequence.to_bytes(6, "big")
    return header + payload_size.to_bytes(2, "big") + os.urandom(payload_size)


async def test_dtls_from_an_unknown_source_is_dropped_under_its_own_reason(running: Running) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(dtls_record(22, 0, 60), ("127.0.0.1", running.port.port))
        sock.sendto(b"\x55" + os.urandom(40), ("127.0.0.1", running.port.port))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while running.port.packets_in < 2:
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    assert dropped(running.metrics, "dtls_unknown_source") == 1
    assert dropped(running.metrics, "unknown_source") == 1


async def test_well_formed_dtls_garbage_from_a_bound_address_is_dropped_and_counted() -> None:
    metrics = Metrics()
    port = MediaPort(metrics)
    to_client: list[bytes] = []
    port.send_to = lambda data, addr: to_client.append(data)  # type: ignore[method-assign]
    transport = new_transport(port)
    transport.set_remote(REMOTE_UFRAG, CLIENT_CERT.fingerprint_sha256)
    client = DtlsEndpoint(CLIENT_CERT, SERVER_CERT.fingerprint_sha256, "client")
    addr = ("192.0.2.1", 40000)
    port.receive(check(transport), addr)
    assert port.counts()["addresses"] == 1
    to_client.clear()

    client.start(time.monotonic())
    # Before the handshake is done: application data cannot be genuine yet.
    port.receive(dtls_record(23, 1, 48), addr)
    assert dropped(metrics, "dtls_rejected") == 1
    for _ in range(10):
        for datagram in client.datagrams_to_send():
            port.receive(datagram, addr)
        for datagram in to_client:
            client.receive_datagram(datagram, time.monotonic())
        to_client.clear()
        if transport.connected:
            break
    assert transport.connected
    assert dropped(metrics, "dtls_rejected") == 1  # the handshake itself is not garbage

    # After it: records that do not decrypt (forged, or replayed from another association).
    client.send_application_data(b"hello")
    genuine = client.datagrams_to_send()
    assert len(genuine) == 1
    port.receive(genuine[0], addr)  # genuine application data is taken
    forged = bytearray(genuine[0])
    forged[-1] ^= 0xFF
    for data in (bytes(forged), dtls_record(23, 1, 40), dtls_record(22, 1, 60)):
        port.receive(data, addr)
    assert dropped(metrics, "dtls_rejected") == 4
    assert transport.connected
    transport.close()
