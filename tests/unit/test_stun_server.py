"""The STUN server: `handle` fed bytes directly, then the asyncio layer over real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from huddle.metrics import Metrics
from huddle.stun import server as server_module
from huddle.stun.message import (
    BINDING,
    ERROR_CODE,
    SOFTWARE,
    UNKNOWN_ATTRIBUTES,
    XOR_MAPPED_ADDRESS,
    Attribute,
    MessageClass,
    StunMessage,
    decode_error_code,
    decode_software,
    decode_unknown_attributes,
    decode_xor_mapped_address,
    encode,
    parse,
    verify_fingerprint,
)
from huddle.stun.server import REASONS, Outcome, StunServer, handle

SOFTWARE_NAME = "huddle-test"
SOURCE = ("192.0.2.7", 40000)
TIMEOUT = 5.0  # only an upper bound: every wait below ends as soon as the awaited event happens

# RFC 5769 §2.1: an ICE connectivity check (PRIORITY, ICE-CONTROLLED, USERNAME, MESSAGE-INTEGRITY).
RFC5769_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae"
    "802200105354554e207465737420636c69656e74"
    "002400046e0001ff80290008932ff9b151263b36"
    "000600096576746a3a68367659202020"
    "000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"
    "80280004e57a3bcf"
)


def request(
    attributes: Sequence[tuple[int, bytes]] = (),
    *,
    method: int = BINDING,
    message_class: MessageClass = MessageClass.REQUEST,
    fingerprint: bool = True,
    transaction_id: bytes | None = None,
) -> bytes:
    msg = StunMessage(
        method,
        message_class,
        transaction_id or os.urandom(12),
        [Attribute(t, v) for t, v in attributes],
    )
    return encode(msg, fingerprint=fingerprint)


def answer(data: bytes, source: tuple[Any, ...] = SOURCE) -> tuple[Outcome, StunMessage]:
    outcome = handle(data, source, software=SOFTWARE_NAME)
    assert outcome.reply is not None
    assert verify_fingerprint(outcome.reply)
    reply = parse(outcome.reply)
    assert reply.transaction_id == data[8:20]
    assert decode_software(reply.get(SOFTWARE) or b"") == SOFTWARE_NAME
    return outcome, reply


def mapped(reply: StunMessage) -> tuple[str, int]:
    return decode_xor_mapped_address(reply.get(XOR_MAPPED_ADDRESS) or b"", reply.transaction_id)


def error_code(reply: StunMessage) -> int:
    assert reply.message_class == MessageClass.ERROR
    return decode_error_code(reply.get(ERROR_CODE) or b"")[0]


# --- handle ---------------------------------------------------------------------------------------


def broken_fingerprint(data: bytes) -> bytes:
    # Flipped, not zeroed: with a random transaction id, the CRC's last byte is already 0 once in 256 runs.
    return data[:-1] + bytes((data[-1] ^ 0xFF,))


@pytest.mark.parametrize("fingerprint", [True, False])
def test_binding_request_gets_its_address(fingerprint: bool) -> None:
    outcome, reply = answer(request(fingerprint=fingerprint))
    assert outcome.reason is None
    assert (reply.method, reply.message_class) == (BINDING, MessageClass.SUCCESS)
    assert mapped(reply) == SOURCE


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (("2001:db8::5", 3478, 0, 0), ("2001:db8::5", 3478)),
        (("::ffff:192.0.2.9", 5000, 0, 0), ("192.0.2.9", 5000)),
    ],
    ids=["ipv6", "ipv4-mapped"],
)
def test_ipv6_sources(source: tuple[Any, ...], expected: tuple[str, int]) -> None:
    _, reply = answer(request(), source)
    assert mapped(reply) == expected


def test_ice_check_from_rfc5769_is_answered() -> None:
    # PRIORITY is comprehension-required: a server that did not know it would answer 420.
    outcome, reply = answer(RFC5769_REQUEST)
    assert outcome.reason is None
    assert reply.message_class == MessageClass.SUCCESS
    assert mapped(reply) == SOURCE


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\x80\x22\x00\x10abcd", id="attribute-runs-past-end"),
        pytest.param(b"\x00\x08\x00\x04abcd", id="short-message-integrity"),
        pytest.param(b"\x80\x28\x00\x04abcd\x80\x22\x00\x00", id="attribute-after-fingerprint"),
    ],
)
def test_malformed_request_gets_400(body: bytes) -> None:
    header = b"\x00\x01" + len(body).to_bytes(2, "big") + b"\x21\x12\xa4\x42" + os.urandom(12)
    outcome, reply = answer(header + body)
    assert outcome.reason == "bad_request"
    assert reply.method == BINDING
    assert error_code(reply) == 400


def test_datagram_longer_than_its_length_field_gets_400() -> None:
    outcome, reply = answer(request() + b"\x00\x00\x00\x00")
    assert outcome.reason == "bad_request"
    assert error_code(reply) == 400


def test_unknown_comprehension_required_attribute_gets_420() -> None:
    data = request([(0x0077, b"a"), (SOFTWARE, b"x"), (0x7FFF, b""), (0x0077, b"b"), (0x8077, b"")])
    outcome, reply = answer(data)
    assert outcome.reason == "unknown_attribute"
    assert error_code(reply) == 420
    # Each unknown type once, and never the comprehension-optional one.
    assert decode_unknown_attributes(reply.get(UNKNOWN_ATTRIBUTES) or b"") == (0x0077, 0x7FFF)


def test_unknown_comprehension_optional_attribute_is_ignored() -> None:
    outcome, reply = answer(request([(0x8077, b"whatever")]))
    assert outcome.reason is None
    assert reply.message_class == MessageClass.SUCCESS


def test_unknown_attribute_after_message_integrity_is_ignored() -> None:
    # encode() always puts MESSAGE-INTEGRITY last, so build this one by hand.
    body = b"\x00\x08\x00\x14" + bytes(20) + b"\x00\x77\x00\x04late"
    data = b"\x00\x01" + len(body).to_bytes(2, "big") + b"\x21\x12\xa4\x42" + os.urandom(12) + body
    outcome, reply = answer(data)
    assert outcome.reason is None
    assert reply.message_class == MessageClass.SUCCESS


def test_unknown_method_gets_400() -> None:
    outcome, reply = answer(request(method=0x0FF))
    assert outcome.reason == "unknown_method"
    assert reply.method == 0x0FF
    assert error_code(reply) == 400


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"", "not_stun", id="empty"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: stun\r\n\r\n", "not_stun", id="http"),
        pytest.param(bytes.fromhex("16fefd00000000000000000100") + bytes(60), "not_stun", id="dtls"),
        pytest.param(bytes.fromhex("80e01234") + bytes(40), "not_stun", id="rtp"),
        pytest.param(bytes.fromhex("0001000021") + bytes(15), "not_stun", id="no-cookie"),
        pytest.param(bytes.fromhex("0001000021") + bytes(11), "not_stun", id="short-no-cookie"),
        pytest.param(bytes.fromhex("0001000221") + bytes(15) + b"ab", "not_stun", id="odd-length"),
        pytest.param(request()[:12], "truncated", id="short-header"),
        pytest.param(request()[:3], "truncated", id="three-bytes"),
        pytest.param(request([(SOFTWARE, b"abc")])[:-4], "truncated", id="short-body"),
        pytest.param(request(message_class=MessageClass.SUCCESS), "not_request", id="success"),
        pytest.param(request(message_class=MessageClass.ERROR), "not_request", id="error"),
        pytest.param(request(message_class=MessageClass.INDICATION), "not_request", id="indication"),
        pytest.param(broken_fingerprint(request()), "bad_fingerprint", id="bad-fingerprint"),
        pytest.param(
            broken_fingerprint(request(method=0x0FF)), "bad_fingerprint", id="bad-fingerprint-method"
        ),
    ],
)
def test_dropped_without_answer(data: bytes, reason: str) -> None:
    outcome = handle(data, SOURCE, software=SOFTWARE_NAME)
    assert outcome == Outcome(None, reason)
    assert reason in REASONS


def test_handle_never_raises_on_mutations() -> None:
    # A cheap sweep over every single-byte corruption of one request: handle must always decide.
    data = request([(SOFTWARE, b"x"), (0x0024, b"\x00\x00\x00\x01")])
    for index in range(len(data)):
        for flip in (0x01, 0x80, 0xFF):
            corrupted = bytearray(data)
            corrupted[index] ^= flip
            outcome = handle(bytes(corrupted), SOURCE, software=SOFTWARE_NAME)
            assert outcome.reason is None or outcome.reason in REASONS


@given(st.binary(max_size=120) | st.builds(bytes.__add__, st.just(request()[:20]), st.binary(max_size=60)))
def test_handle_decides_on_any_input(data: bytes) -> None:
    outcome = handle(data, SOURCE, software=SOFTWARE_NAME)
    assert outcome.reason is None or outcome.reason in REASONS
    if outcome.reply is not None:
        assert verify_fingerprint(outcome.reply)
        assert parse(outcome.reply).transaction_id == data[8:20]
    else:
        assert outcome.reason is not None


# --- the asyncio server ---------------------------------------------------------------------------


class UdpClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.replies.put_nowait(data)


async def udp_client(port: int) -> tuple[asyncio.DatagramTransport, UdpClient]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(UdpClient, remote_addr=("127.0.0.1", port))
    return transport, protocol


async def read_message(reader: asyncio.StreamReader) -> StunMessage:
    async with asyncio.timeout(TIMEOUT):
        header = await reader.readexactly(20)
        body = await reader.readexactly(int.from_bytes(header[2:4], "big"))
    assert verify_fingerprint(header + body)
    return parse(header + body)


async def assert_disconnected(reader: asyncio.StreamReader) -> None:
    try:
        async with asyncio.timeout(TIMEOUT):
            assert await reader.read() == b""
    except ConnectionResetError:
        pass  # closing with our unread bytes still queued makes the kernel send a reset


def dropped(metrics: Metrics, transport: str, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "huddle_stun_dropped_total", {"transport": transport, "reason": reason}
    )
    return value or 0.0


def answered(metrics: Metrics, transport: str) -> float:
    return metrics.registry.get_sample_value("huddle_stun_requests_total", {"transport": transport}) or 0.0


class Running:
    def __init__(self, server: StunServer, metrics: Metrics, port: int) -> None:
        self.server, self.metrics, self.port = server, metrics, port

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


async def start_server(**options: Any) -> Running:
    metrics = Metrics()
    server = StunServer(metrics, software=SOFTWARE_NAME, **options)
    port = await server.start("127.0.0.1", 0)
    return Running(server, metrics, port)


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    r = await start_server()
    yield r
    await r.server.close()


async def test_udp_binding(running: Running) -> None:
    transport, client = await udp_client(running.port)
    try:
        data = request()
        transport.sendto(data)
        reply = parse(await asyncio.wait_for(client.replies.get(), TIMEOUT))
        assert reply.transaction_id == data[8:20]
        assert reply.message_class == MessageClass.SUCCESS
        host, port = transport.get_extra_info("sockname")
        assert mapped(reply) == (host, port)
        assert answered(running.metrics, "udp") == 1
    finally:
        transport.close()


async def test_udp_garbage_is_dropped_and_counted(running: Running) -> None:
    transport, client = await udp_client(running.port)
    try:
        transport.sendto(b"\x16\xfe\xfd hello, not stun at all")
        transport.sendto(request()[:10])
        transport.sendto(request(message_class=MessageClass.INDICATION))
        good = request()
        transport.sendto(good)
        # Datagrams on one loopback socket are handled in order: when the good one is answered,
        # the three before it have been dropped.
        reply = parse(await asyncio.wait_for(client.replies.get(), TIMEOUT))
        assert reply.transaction_id == good[8:20]
        assert client.replies.empty()
        assert dropped(running.metrics, "udp", "not_stun") == 1
        assert dropped(running.metrics, "udp", "truncated") == 1
        assert dropped(running.metrics, "udp", "not_request") == 1
        assert answered(running.metrics, "udp") == 1
    finally:
        transport.close()


async def test_udp_error_answers_are_counted(running: Running) -> None:
    transport, client = await udp_client(running.port)
    try:
        transport.sendto(request([(0x0077, b"")]))
        reply = parse(await asyncio.wait_for(client.replies.get(), TIMEOUT))
        assert error_code(reply) == 420
        assert answered(running.metrics, "udp") == 1
        assert dropped(running.metrics, "udp", "unknown_attribute") == 1
    finally:
        transport.close()


def fail_once(monkeypatch: pytest.MonkeyPatch) -> None:
    real_handle = server_module.handle
    calls = 0

    def flaky(*args: Any, **kwargs: Any) -> Outcome:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return real_handle(*args, **kwargs)

    monkeypatch.setattr(server_module, "handle", flaky)


async def test_udp_internal_error_is_contained(running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    fail_once(monkeypatch)
    transport, client = await udp_client(running.port)
    try:
        transport.sendto(request())
        good = request()
        transport.sendto(good)
        reply = parse(await asyncio.wait_for(client.replies.get(), TIMEOUT))
        assert reply.transaction_id == good[8:20]
        assert dropped(running.metrics, "udp", "internal_error") == 1
    finally:
        transport.close()


async def test_tcp_internal_error_closes_only_that_connection(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_once(monkeypatch)
    bad_reader, bad_writer = await running.connect()
    bad_writer.write(request())
    await assert_disconnected(bad_reader)
    bad_writer.close()
    assert dropped(running.metrics, "tcp", "internal_error") == 1
    reader, writer = await running.connect()
    writer.write(request())
    await read_message(reader)
    writer.close()


async def test_tcp_binding(running: Running) -> None:
    reader, writer = await running.connect()
    try:
        data = request()
        writer.write(data)
        reply = await read_message(reader)
        assert reply.transaction_id == data[8:20]
        host, port = writer.get_extra_info("sockname")
        assert mapped(reply) == (host, port)
        assert answered(running.metrics, "tcp") == 1
    finally:
        writer.close()


async def test_tcp_two_messages_in_one_write(running: Running) -> None:
    reader, writer = await running.connect()
    try:
        first, second = request(), request([(SOFTWARE, b"client")])
        writer.write(first + second)
        assert (await read_message(reader)).transaction_id == first[8:20]
        assert (await read_message(reader)).transaction_id == second[8:20]
    finally:
        writer.close()


async def test_tcp_message_split_over_two_writes(running: Running) -> None:
    reader, writer = await running.connect()
    try:
        data = request([(SOFTWARE, b"split")])
        for part in (data[:7], data[7:30], data[30:]):
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.01)  # let each part reach the server as its own segment
        reply = await read_message(reader)
        assert reply.transaction_id == data[8:20]
    finally:
        writer.close()


async def test_tcp_garbage_closes_only_that_connection(running: Running) -> None:
    good_reader, good_writer = await running.connect()
    bad_reader, bad_writer = await running.connect()
    try:
        good_writer.write(request())
        await read_message(good_reader)
        bad_writer.write(b"GET / HTTP/1.1\r\nHost: stun.example\r\n\r\n")
        await assert_disconnected(bad_reader)
        assert dropped(running.metrics, "tcp", "not_stun") == 1
        data = request()
        good_writer.write(data)
        assert (await read_message(good_reader)).transaction_id == data[8:20]
    finally:
        good_writer.close()
        bad_writer.close()


async def test_tcp_oversized_message_closes_the_connection(running: Running) -> None:
    reader, writer = await running.connect()
    try:
        header = b"\x00\x01" + (5000).to_bytes(2, "big") + b"\x21\x12\xa4\x42" + os.urandom(12)
        writer.write(header)
        await assert_disconnected(reader)
        assert dropped(running.metrics, "tcp", "too_large") == 1
    finally:
        writer.close()


async def test_tcp_dropped_message_keeps_the_connection(running: Running) -> None:
    reader, writer = await running.connect()
    try:
        writer.write(request(message_class=MessageClass.INDICATION) + request()[:-1] + b"\x00")
        data = request()
        writer.write(data)
        assert (await read_message(reader)).transaction_id == data[8:20]
        assert dropped(running.metrics, "tcp", "not_request") == 1
        assert dropped(running.metrics, "tcp", "bad_fingerprint") == 1
    finally:
        writer.close()


async def test_tcp_idle_connection_is_closed() -> None:
    r = await start_server(idle_timeout=0.1)
    try:
        reader, writer = await r.connect()
        writer.write(request()[:10])  # half a header, then silence
        await assert_disconnected(reader)
        writer.close()
    finally:
        await r.server.close()


async def test_tcp_connection_cap() -> None:
    r = await start_server(max_connections=2)
    try:
        clients = [await r.connect() for _ in range(2)]
        for reader, writer in clients:
            writer.write(request())
            await read_message(reader)  # the server has accepted and counted this one
        reader, writer = await r.connect()
        await assert_disconnected(reader)
        writer.close()
        assert dropped(r.metrics, "tcp", "too_many_connections") == 1
        reader, writer = clients[0]
        writer.write(request())
        await read_message(reader)
        for _, writer in clients:
            writer.close()
    finally:
        await r.server.close()


async def test_close_disconnects_tcp_clients_and_frees_the_port() -> None:
    r = await start_server()
    reader, writer = await r.connect()
    writer.write(request())
    await read_message(reader)
    await r.server.close()
    await assert_disconnected(reader)
    writer.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", r.port))


async def test_port_zero_retries_when_tcp_port_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    taken_port = taken.getsockname()[1]
    real_bind_udp = server_module._bind_udp
    calls: list[int] = []

    def bind_udp(family: int, address: tuple[Any, ...]) -> socket.socket:
        # The first UDP bind "chooses" a port that is busy on TCP, as the kernel may.
        calls.append(address[1])
        if len(calls) == 1:
            return real_bind_udp(family, (address[0], taken_port))
        return real_bind_udp(family, address)

    monkeypatch.setattr(server_module, "_bind_udp", bind_udp)
    metrics = Metrics()
    server = StunServer(metrics)
    try:
        port = await server.start("127.0.0.1", 0)
        assert len(calls) == 2
        assert port != taken_port
        # The UDP socket of the failed attempt was released.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", taken_port))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request())
        await read_message(reader)
        writer.close()
    finally:
        await server.close()
        taken.close()


async def test_fixed_port_busy_on_tcp_fails_cleanly() -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(OSError):
            await StunServer(Metrics()).start("127.0.0.1", port)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", port))
    finally:
        taken.close()


async def test_tcp_one_address_holds_at_most_its_share() -> None:
    r = await start_server(max_connections_per_address=2)
    try:
        clients = [await r.connect() for _ in range(2)]
        for reader, writer in clients:
            writer.write(request())
            await read_message(reader)
        reader, writer = await r.connect()
        await assert_disconnected(reader)
        writer.close()
        assert dropped(r.metrics, "tcp", "per_address_limit") == 1
        # Another address is served; so is the first again once it frees a slot.
        other_reader, other_writer = await asyncio.open_connection(
            "127.0.0.1", r.port, local_addr=("127.0.0.2", 0)
        )
        other_writer.write(request())
        await read_message(other_reader)
        other_writer.close()
        clients[0][1].close()
        await assert_disconnected(clients[0][0])
        for _ in range(100):
            reader, writer = await r.connect()
            writer.write(request())
            try:
                await read_message(reader)
                break
            except (asyncio.IncompleteReadError, ConnectionResetError):
                await asyncio.sleep(0.01)  # the server had not yet seen the close
            finally:
                writer.close()
        else:
            raise AssertionError("the freed slot was never given back")
        assert dropped(r.metrics, "tcp", "per_address_limit") <= 100
    finally:
        for _, writer in clients:
            writer.close()
        await r.server.close()


async def test_tcp_idle_means_no_binding_request_not_no_bytes() -> None:
    r = await start_server(idle_timeout=1.0)
    loop = asyncio.get_running_loop()
    try:
        busy_reader, busy_writer = await r.connect()  # asks for a binding every 0.3 s: stays
        junk_reader, junk_writer = await r.connect()  # sends only what is not a request: goes
        opened = loop.time()

        async def until_closed() -> float:
            with contextlib.suppress(ConnectionResetError):
                while await junk_reader.read(4096):
                    pass  # the error answers to the refused method
            return loop.time() - opened

        junk_closed = asyncio.create_task(until_closed())
        for _ in range(8):
            busy_writer.write(request())
            await read_message(busy_reader)
            if not junk_closed.done():
                junk_writer.write(request(message_class=MessageClass.INDICATION))
                junk_writer.write(request(method=0x003))  # a method we refuse with an error
            await asyncio.sleep(0.3)
        assert 0.9 <= await asyncio.wait_for(junk_closed, TIMEOUT) <= 1.5
        assert dropped(r.metrics, "tcp", "idle_timeout") == 1
        assert loop.time() - opened >= 2.0  # the busy one outlived the idle timeout twice
        busy_writer.write(request())
        await read_message(busy_reader)
        busy_writer.close()
        junk_writer.close()
    finally:
        await r.server.close()
