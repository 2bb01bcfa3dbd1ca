"""The compiled per-packet path (huddle/rtc/_fastpath.c) against the pure-Python reference it must match.

The same publisher packets, through the real Producer → Consumer → StreamRewriter → SRTP → MediaPort path to
subscribers on 127.0.0.1, must come out as the same datagrams, byte for byte, in the same order, whichever
path sends them: across sequence number and timestamp wraps (in and out), simulcast layer switches, dropped
temporal layers, and both SRTP profiles. And what comes out must be SRTP a subscriber decrypts into one
continuous stream.
"""

from __future__ import annotations

import itertools
import os
import random
import socket
from collections import Counter
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from huddle.metrics import Metrics
from huddle.rtc import _fastpath, fastpath, srtp
from huddle.rtc.certificate import Certificate
from huddle.rtc.port import MediaPort
from huddle.rtc.rtp import RtpPacket, payload_offset
from huddle.rtc.srtp import SrtpProfile, SrtpSession
from huddle.rtc.transport import WebRtcTransport
from huddle.sfu import _rewrite, offer
from huddle.sfu import consumer as consumer_module
from huddle.sfu import producer as producer_module
from huddle.sfu.consumer import Consumer
from huddle.sfu.producer import UNUSED_EXTENSION_ID, Producer
from huddle.sfu.rewrite import SEQ_WINDOW, StreamRewriter
from huddle.sfu.vp8 import parse_descriptor
from huddle.stun import message as stun

CERTIFICATE = Certificate.generate()
LAYER_SSRCS = (0x11111111, 0x22222222, 0x33333333)
PUBLISHER_TABLE = bytes(offer.ABS_SEND_TIME_ID if i == 3 else UNUSED_EXTENSION_ID for i in range(16))
SUBSCRIBERS = 5
RECEIVE_TIMEOUT = 5.0  # an upper bound only: reading stops as soon as every datagram is in


def test_the_compiled_path_is_the_one_in_use() -> None:
    """`pip install -e .` builds the extension; a build that failed must not pass for a working one."""
    assert os.environ.get("HUDDLE_FASTPATH", "1") != "0", "HUDDLE_FASTPATH=0 forces the reference path"
    assert fastpath.COMPILED
    assert srtp._protect is _fastpath.protect
    assert consumer_module.COMPILED and producer_module.COMPILED
    assert issubclass(consumer_module.Consumer, _rewrite.ConsumerFields)
    assert consumer_module.Rewriter is _rewrite.StreamRewriter
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert isinstance(fastpath.new_batch(sock), _fastpath.Batch)
    finally:
        sock.close()


# --- the compiled protect against pylibsrtp's own ----------------------------------------------------------


@pytest.mark.parametrize("profile", list(SrtpProfile))
def test_protect_view_gives_pylibsrtps_bytes_across_a_sequence_wrap(profile: SrtpProfile) -> None:
    material = os.urandom(profile.keying_material_length)
    compiled = SrtpSession.from_keying(profile, material, True)
    reference = SrtpSession.from_keying(profile, material, True)
    receiver = SrtpSession.from_keying(profile, material, False)
    for i in range(40):
        seq = (0xFFEC + i) & 0xFFFF  # the ROC goes up mid-way
        ts = (0xFFFFFF00 + 3000 * i) & 0xFFFFFFFF
        packet = RtpPacket(
            payload_type=96, seq=seq, timestamp=ts, ssrc=0xCAFE, payload=os.urandom(100 + 23 * i)
        ).serialize()
        out = bytes(compiled.protect_view(packet))
        assert out == reference.protect(packet)
        assert receiver.unprotect(out) == packet


def test_protect_view_refuses_what_libsrtp_refuses() -> None:
    session = SrtpSession.from_keying(
        SrtpProfile.AEAD_AES_128_GCM, bytes(SrtpProfile.AEAD_AES_128_GCM.keying_material_length), True
    )
    with pytest.raises(srtp.SrtpError):
        session.protect_view(bytes(srtp.MAX_PACKET + 1))
    with pytest.raises(srtp.SrtpError):
        session.protect_view(b"\x80\x60")  # shorter than an RTP header


# --- sendmmsg ----------------------------------------------------------------------------------------------


def _sink() -> socket.socket:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(RECEIVE_TIMEOUT)
    return sink


def _receive(sink: socket.socket, count: int) -> list[bytes]:
    return [sink.recv(4096) for _ in range(count)]


def _nothing_more(sink: socket.socket) -> bool:
    sink.settimeout(0.05)
    try:
        sink.recv(4096)
    except TimeoutError:
        return True
    return False


def test_one_flush_delivers_every_datagram_in_order() -> None:
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink = _sink()
    try:
        batch = _fastpath.Batch(sender.fileno(), fastpath.BATCH_SIZE, fastpath.SLOT)
        datagrams = [i.to_bytes(2, "big") + os.urandom(i * 31 % 1400) for i in range(fastpath.BATCH_SIZE)]
        for i, data in enumerate(datagrams):
            assert batch.add(data, sink.getsockname()) == i + 1
        with pytest.raises(OverflowError):
            batch.add(b"one too many", sink.getsockname())
        assert batch.flush() == (fastpath.BATCH_SIZE, 0, 0)
        assert batch.count == 0
        assert _receive(sink, len(datagrams)) == datagrams
        assert _nothing_more(sink)
    finally:
        sender.close()
        sink.close()


def test_a_refused_datagram_does_not_stop_the_ones_after_it() -> None:
    """sendmmsg stops at the first datagram the kernel refuses; the batch goes on past it, as a loop of
    sendto would (here: a broadcast address without SO_BROADCAST, refused with EACCES)."""
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink = _sink()
    try:
        batch = _fastpath.Batch(sender.fileno(), 8, fastpath.SLOT)
        batch.add(b"first", sink.getsockname())
        batch.add(b"refused", ("255.255.255.255", 9))
        batch.add(b"refused too", ("255.255.255.255", 9))
        batch.add(b"second", sink.getsockname())
        assert batch.flush() == (2, 0, 2)
        assert _receive(sink, 2) == [b"first", b"second"]
        with pytest.raises(ValueError):
            batch.add(b"x", ("not-an-address", 9))
        with pytest.raises(ValueError):
            batch.add(bytes(fastpath.SLOT + 1), sink.getsockname())
        assert batch.count == 0
    finally:
        sender.close()
        sink.close()


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "reference"])
async def test_the_port_sends_what_it_held_in_order_and_counts_refusals(
    monkeypatch: pytest.MonkeyPatch, compiled: bool
) -> None:
    """More datagrams than one sendmmsg takes, held while one datagram is handled, then all out in order;
    one refused on the way is counted as a send error and the rest still go."""
    monkeypatch.setattr(fastpath, "COMPILED", compiled)
    metrics = Metrics()
    port = MediaPort(metrics)
    await port.start("127.0.0.1", 0)
    sink = _sink()
    try:
        datagrams = [i.to_bytes(2, "big") + bytes(1000) for i in range(2 * fastpath.BATCH_SIZE + 7)]
        port.holding = True
        for i, data in enumerate(datagrams):
            port.send_to(memoryview(bytearray(data)), sink.getsockname())
            if i == 70:
                port.send_to(b"refused", ("255.255.255.255", 9))
            if i == 5:
                port.send_to(b"not numeric: sent alone", ("localhost", sink.getsockname()[1]))
        port.flush()
        assert not port.holding
        received = _receive(sink, len(datagrams) + 1)
        assert received[6] == b"not numeric: sent alone"
        assert received[:6] + received[7:] == datagrams
        assert metrics.registry.get_sample_value("huddle_media_dropped_total", {"reason": "send_error"}) == 1
    finally:
        sink.close()
        await port.close()


# --- the whole forwarding path, compiled against the reference ---------------------------------------------


class _Publisher:
    def __init__(self) -> None:
        self.participant = SimpleNamespace(id="publisher")
        self.router = SimpleNamespace(layer_started=lambda producer: None)

    def send_pli(self, media_ssrc: int) -> bool:
        return True


class _Clock:
    """time.monotonic and time.time for the Producer, the same in both runs (switches rebase timestamps by
    the wall time between packets): it moves on by `tick()`, once a packet, so that a path that reads it
    less often (the compiled one skips a voice nobody hears) still sees the same times."""

    def __init__(self) -> None:
        self.now = 1000.0

    def tick(self) -> None:
        self.now += 0.0033

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now


def _vp8(layer: int, i: int, *, keyframe: bool) -> bytes:
    """Packet `i` of a simulcast layer: 15-bit picture ids and TL0PICIDX near their wraps, three temporal
    layers, three packets a frame; sequence numbers and timestamps wrap within the stream."""
    frame, part = divmod(i, 3)
    tid = (0, 2, 1, 2)[frame % 4]
    picture_id = (0x7FF0 + frame + 1000 * layer) & 0x7FFF
    descriptor = bytes(
        (
            0x90 if part == 0 else 0x80,
            0xE0,
            0x80 | (picture_id >> 8),
            picture_id & 0xFF,
            (250 + frame // 4) & 0xFF,
            (tid << 6) | (0x20 if tid == 0 else 0),
        )
    )
    body = bytes.fromhex("5002009d012a8002e001") if keyframe and part == 0 else b"\x31\x02\x00"
    return RtpPacket(
        payload_type=100,
        seq=(0xFFD0 + 7000 * layer + i) & 0xFFFF,
        timestamp=(0xFFFF0000 + 3000 * frame + 12345 * layer) & 0xFFFFFFFF,
        ssrc=LAYER_SSRCS[layer],
        marker=part == 2,
        extensions={3: b"\x00\x00\x00"},
        payload=descriptor + body + bytes((i * 7) % 256 for _ in range(300 + 50 * layer + i % 5)),
    ).serialize()


def _opus(i: int) -> bytes:
    """Packet `i` of a voice: 20 ms apart, sequence numbers and timestamps wrapping within the stream."""
    return RtpPacket(
        payload_type=111,
        seq=(0xFFE0 + i) & 0xFFFF,
        timestamp=(0xFFFFF000 + 960 * i) & 0xFFFFFFFF,
        ssrc=LAYER_SSRCS[0],
        marker=i == 0,
        extensions={3: b"\x00\x00\x00"},
        payload=bytes((i * 13 + k) % 256 for k in range(60 + i % 40)),
    ).serialize()


def _voice_script() -> list[tuple[str, int, int]]:
    """A voice that drops out of every subscriber's loudest (for 40 packets, all at once) and comes back, at
    different times for different subscribers: ("audible", consumer index, 0 or 1) between packets."""
    steps: list[tuple[str, int, int]] = []
    for i in range(160):
        steps.append(("packet", 0, i))
        if i == 20:
            steps += [("audible", n, 0) for n in range(SUBSCRIBERS)]
        if i == 60:
            steps += [("audible", 1, 1), ("audible", 3, 1)]
        if i == 90:
            steps += [("audible", n, 1) for n in range(SUBSCRIBERS)] + [("audible", 2, 0)]
        if i == 130:
            steps += [("audible", 2, 1)]
    return steps


def _script() -> list[tuple[str, int, int]]:
    """What happens, in order: ("packet", layer, i) (a keyframe every 24 packets of each layer),
    ("target", consumer index, layer) and ("max_tid", consumer index, tid)."""
    steps: list[tuple[str, int, int]] = []
    for i in range(150):
        for layer in range(3):
            steps.append(("packet", layer, i))
        if i == 30:
            steps += [("target", 1, 2), ("target", 2, 1), ("max_tid", 3, 0)]
        if i == 80:
            steps += [("target", 1, 0), ("target", 2, 2), ("max_tid", 3, 1), ("target", 4, 2)]
        if i == 110:
            steps += [("max_tid", 3, 2), ("target", 0, 1)]
    return steps


async def _forward(
    profile: SrtpProfile,
    material: bytes,
    monkeypatch: pytest.MonkeyPatch,
    subscribers: int = SUBSCRIBERS,
    steps: list[tuple[str, int, int]] | None = None,
    kind: str = "video",
) -> tuple[list[bytes], list[object]]:
    """Run the script (or `steps`) through the real path; returns every datagram the subscribers' address
    received, and the counters and NACK caches (of rewritten packets, the first SUBSCRIBERS' only) that the
    path keeps on the way. Audio (`kind`) has no NACK cache: its steps are _voice_script()'s."""
    clock = _Clock()
    monkeypatch.setattr(producer_module, "time", clock)
    if kind == "video":
        producer = Producer(_Publisher(), "video", "0", {100: offer.VP8_PT}, PUBLISHER_TABLE, ["q", "h", "f"])  # type: ignore[arg-type]
    else:
        producer = Producer(_Publisher(), "audio", "0", {111: offer.OPUS_PT}, PUBLISHER_TABLE)  # type: ignore[arg-type]
    port = MediaPort(Metrics())
    await port.start("127.0.0.1", 0)
    sink = _sink()
    try:
        for layer in range(producer.layers):
            producer.add_ssrc(LAYER_SSRCS[layer], layer)
        for n in range(subscribers):
            transport = WebRtcTransport(
                port, CERTIFICATE, label=f"s{n}", on_rtp=lambda t, d: None, on_rtcp=lambda t, d: None
            )
            transport.ice.selected = sink.getsockname()  # the ICE pair, then DTLS's keys
            transport.srtp = SrtpSession.from_keying(profile, material, True)
            consumer = Consumer(producer, SimpleNamespace(participant=SimpleNamespace(id=f"s{n}")))  # type: ignore[arg-type]
            # Output counters just below their wraps, the same in both runs.
            consumer.ssrc = 0x5000 + n
            consumer.rewriter = consumer_module.Rewriter(
                consumer.ssrc,
                seq_start=0xFFF0 - 40 * n,
                ts_start=0xFFFFF000 - n,
                picture_id_start=0x7FFA,
                tl0picidx_start=0xFE,
            )
            consumer.transport = transport
            consumer.ready = True
            producer.consumers.append(consumer)
        received: list[bytes] = []
        for what, a, b in _script() if steps is None else steps:
            if what == "packet":
                keyframe = b % 24 == 0 or b % 24 == 1 or b % 24 == 2
                clock.tick()
                port.holding = True
                sent = producer.receive(_vp8(a, b, keyframe=keyframe) if kind == "video" else _opus(b), a)
                port.flush()
                received += _receive(sink, sent)
            elif what == "target":
                producer.consumers[a].set_target(b)
            elif what == "audible":
                producer.consumers[a].audible = bool(b)
            else:
                producer.consumers[a].max_tid = b
        if kind == "audio":
            assert _nothing_more(sink)
            return received, [port.packets_out, port.bytes_out] + [
                (c.packets, c.octets) for c in producer.consumers
            ]
        # A NACK from each subscriber for the last packet it got (and one never sent), answered from cache.
        last = {int.from_bytes(d[8:12], "big"): int.from_bytes(d[2:4], "big") for d in received}
        port.holding = True
        resent = sum(consumer.retransmit([last[consumer.ssrc], 0x1234]) for consumer in producer.consumers)
        port.flush()
        assert resent == subscribers
        received += _receive(sink, resent)
        assert _nothing_more(sink)
        kept: list[object] = [port.packets_out, port.bytes_out]
        for consumer in producer.consumers:
            kept += [consumer.packets, consumer.octets]
        for consumer in producer.consumers[:SUBSCRIBERS]:
            cached = [consumer.cached(seq) for seq in range(0x10000)]
            assert sum(p is not None for p in cached) > (50 if steps is None else 0)
            kept.append(cached)
        return received, kept
    finally:
        # Its deferred keyframe requests must not fire into the next run (and read that run's clock).
        producer.close()
        sink.close()
        await port.close()


async def _forward_on_the_reference(
    profile: SrtpProfile,
    material: bytes,
    monkeypatch: pytest.MonkeyPatch,
    subscribers: int = SUBSCRIBERS,
    steps: list[tuple[str, int, int]] | None = None,
    kind: str = "video",
) -> tuple[list[bytes], list[object]]:
    """_forward with every compiled part replaced by its pure-Python reference."""
    with monkeypatch.context() as reference_path:
        reference_path.setattr(fastpath, "COMPILED", False)
        reference_path.setattr(srtp, "_protect", None)
        reference_path.setattr(consumer_module, "COMPILED", False)
        reference_path.setattr(producer_module, "COMPILED", False)
        reference_path.setattr(consumer_module, "Rewriter", StreamRewriter)
        return await _forward(profile, material, monkeypatch, subscribers, steps, kind)


@pytest.mark.parametrize("profile", list(SrtpProfile))
async def test_compiled_and_reference_paths_send_the_same_bytes(
    monkeypatch: pytest.MonkeyPatch, profile: SrtpProfile
) -> None:
    material = os.urandom(profile.keying_material_length)
    compiled, compiled_kept = await _forward(profile, material, monkeypatch)
    reference, reference_kept = await _forward_on_the_reference(profile, material, monkeypatch)
    assert len(compiled) > 600  # five subscribers, 150 packets of the layer each sees, less dropped frames
    assert compiled == reference
    assert compiled_kept == reference_kept
    assert compiled_kept[0] == len(compiled)

    # And it is what a subscriber can use: each one's stream decrypts, with sequence numbers that go up by
    # one (through 0xFFFF → 0) across every layer switch and dropped temporal layer.
    receivers = {0x5000 + n: SrtpSession.from_keying(profile, material, False) for n in range(SUBSCRIBERS)}
    seqs: dict[int, list[int]] = {ssrc: [] for ssrc in receivers}
    for datagram in compiled[:-SUBSCRIBERS]:  # (the last ones: the NACKed packets again)
        ssrc = int.from_bytes(datagram[8:12], "big")
        packet = RtpPacket.parse(receivers[ssrc].unprotect(datagram))
        seqs[ssrc].append(packet.seq)
    for ssrc, numbers in seqs.items():
        assert numbers, ssrc
        assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(numbers)), ssrc
    assert any(0xFFFF in numbers and 0 in numbers for numbers in seqs.values())


@pytest.mark.parametrize("profile", list(SrtpProfile))
async def test_a_packet_for_more_subscribers_than_a_batch_holds_reaches_all_as_the_reference_sends_it(
    monkeypatch: pytest.MonkeyPatch, profile: SrtpProfile
) -> None:
    """The batch fills in the middle of one packet's fan-out and sends itself: every subscriber still gets
    the reference's bytes, in order."""
    material = os.urandom(profile.keying_material_length)
    subscribers = fastpath.BATCH_SIZE + 6
    steps = [("packet", 0, i) for i in range(6)]
    compiled, compiled_kept = await _forward(profile, material, monkeypatch, subscribers, steps)
    reference, reference_kept = await _forward_on_the_reference(
        profile, material, monkeypatch, subscribers, steps
    )
    assert len(compiled) == subscribers * (len(steps) + 1)  # each packet to everyone, then one resent each
    assert compiled == reference
    assert compiled_kept == reference_kept


@pytest.mark.parametrize("profile", list(SrtpProfile))
async def test_a_voice_that_leaves_and_rejoins_the_loudest_reaches_each_subscriber_as_the_reference_sends_it(
    monkeypatch: pytest.MonkeyPatch, profile: SrtpProfile
) -> None:
    """While nobody hears a voice the compiled path skips its packets before copying them (Producer.receive,
    _rewrite.taken); what each subscriber then gets is still the reference's bytes, and one stream with no
    gap in its sequence numbers where the voice was away."""
    material = os.urandom(profile.keying_material_length)
    steps = _voice_script()
    compiled, compiled_kept = await _forward(profile, material, monkeypatch, steps=steps, kind="audio")
    reference, reference_kept = await _forward_on_the_reference(
        profile, material, monkeypatch, steps=steps, kind="audio"
    )
    # Packets 0-20 to all five; then 61-159 to #1 and #3, 91-159 to #0 and #4, 131-159 to #2.
    assert len(compiled) == 5 * 21 + 2 * 99 + 2 * 69 + 29
    assert compiled == reference
    assert compiled_kept == reference_kept
    receivers = {0x5000 + n: SrtpSession.from_keying(profile, material, False) for n in range(SUBSCRIBERS)}
    seqs: dict[int, list[int]] = {ssrc: [] for ssrc in receivers}
    for datagram in compiled:
        ssrc = int.from_bytes(datagram[8:12], "big")
        seqs[ssrc].append(RtpPacket.parse(receivers[ssrc].unprotect(datagram)).seq)
    for ssrc, numbers in seqs.items():
        assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(numbers)), ssrc


def test_the_script_switches_layers() -> None:
    """A guard on the test above: its script really moves consumers between layers."""
    targets = {(a, b) for what, a, b in _script() if what == "target"}
    assert {b for _, b in targets} == {0, 1, 2}


async def test_holding_ends_with_the_datagram_that_started_it() -> None:
    """A datagram from an unknown source is dropped without leaving the port holding sends back."""
    port = MediaPort(Metrics())
    await port.start("127.0.0.1", 0)
    try:
        port.receive(b"\x80" + bytes(20), ("127.0.0.1", 1))
        assert not port.holding
    finally:
        await port.close()


async def test_a_datagram_handled_by_a_transport_sends_its_replies_before_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a transport sends while handling a received datagram leaves when the handling is over, before
    the port reads on: nothing waits for a later datagram."""
    port = MediaPort(Metrics())
    await port.start("127.0.0.1", 0)
    sink = _sink()
    try:
        transport = WebRtcTransport(
            port, CERTIFICATE, label="t", on_rtp=lambda t, d: None, on_rtcp=lambda t, d: None
        )

        def answer(data: bytes, addr: object) -> None:
            assert port.holding
            port.send_to(b"reply to " + data, sink.getsockname())

        monkeypatch.setattr(transport, "receive", answer)
        port.bind(("127.0.0.1", 7), transport)
        port.receive(b"\x80hello", ("127.0.0.1", 7))
        assert not port.holding
        assert _receive(sink, 1) == [b"reply to \x80hello"]
    finally:
        sink.close()
        await port.close()


# --- the compiled StreamRewriter against the reference ----------------------------------------------------


class _Layer:
    """One source of a randomized stream: its own numbers, started near their wraps."""

    def __init__(self, sid: int, rng: random.Random, *, vp8: bool, pid15: bool) -> None:
        self.sid = sid
        self.vp8 = vp8
        self.pid15 = pid15
        self.seq = (0xFFFF - rng.randrange(300)) & 0xFFFF
        self.ts = (0xFFFFFFFF - rng.randrange(100_000)) & 0xFFFFFFFF
        self.pid = ((0x7FFF if pid15 else 0x7F) - rng.randrange(40)) & (0x7FFF if pid15 else 0x7F)
        self.tl0 = 255 - rng.randrange(20)
        self.frame = 0

    def next_frame(self, rng: random.Random) -> list[tuple[int, int, int, bytes, int]]:
        """(source, seq, ts, packet, tid) for each packet of the next frame."""
        self.frame += 1
        key = rng.random() < 0.15
        tid = 0 if key else (0, 2, 1, 2)[self.frame % 4]
        if tid == 0:
            self.tl0 = (self.tl0 + 1) & 0xFF
        out = []
        for i in range(rng.randint(1, 4)):
            if self.vp8:
                desc = bytearray([0x80 | (0x10 if i == 0 else 0), 0xE0])
                desc += bytes([0x80 | (self.pid >> 8), self.pid & 0xFF]) if self.pid15 else bytes([self.pid])
                desc += bytes([self.tl0, (tid << 6) | (0x20 if key else 0)])
                body = bytes.fromhex("5002009d012a8002e001") if key and i == 0 else b"\x31\x02\x00"
                payload = bytes(desc) + body + bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
            else:
                payload = b"\xfc" + bytes(rng.randrange(256) for _ in range(20))
            packet = RtpPacket(
                payload_type=96,
                seq=self.seq,
                timestamp=self.ts,
                ssrc=0x1000 + self.sid,
                marker=i == 0,
                extensions={3: bytes([self.sid])},
                payload=payload,
            ).serialize()
            out.append((self.sid, self.seq, self.ts, packet, tid))
            self.seq = (self.seq + 1) & 0xFFFF
        if rng.random() < 0.01:
            self.seq = (self.seq + rng.randrange(SEQ_WINDOW, 3 * SEQ_WINDOW)) & 0xFFFF  # a long gap
        if rng.random() < 0.01:
            self.ts = (self.ts - rng.randrange(1, 1 << 20)) & 0xFFFFFFFF  # an encoder restart
        else:
            self.ts = (self.ts + 3000) & 0xFFFFFFFF
        self.pid = (self.pid + 1) & (0x7FFF if self.pid15 else 0x7F)
        return out


def _starts(rng: random.Random) -> dict[str, int]:
    return {
        "seq_start": 0xFFFF - rng.randrange(500),
        "ts_start": 0xFFFFFFFF - rng.randrange(100_000),
        "picture_id_start": 0x7FFF - rng.randrange(50),
        "tl0picidx_start": 255 - rng.randrange(10),
    }


def _randomized(seed: int, *, vp8: bool, pid15: bool, steps: int) -> Iterator[tuple]:
    """A seeded stream of what a Consumer does to its rewriter: packets of three sources lost, reordered and
    duplicated; switches (mostly on keyframes), pauses and resumes; temporal layers dropped; sender
    reports translated. Yields ("rewrite", source, seq, ts, packet, payload_offset, info, now), ("drop",
    source, seq, info), ("switch", source), ("pause",), ("resume",) and ("timestamp_for", source, ts)."""
    rng = random.Random(seed)
    layers = [_Layer(sid, rng, vp8=vp8, pid15=pid15) for sid in range(3)]
    in_flight: list[tuple[int, int, int, bytes, int]] = []
    now = 5000.0
    max_tid = 2
    for _ in range(steps):
        now += rng.choice((0.0, 0.001, 0.01, 0.033)) if rng.random() < 0.99 else rng.uniform(1, 30)
        roll = rng.random()
        if roll < 0.02:
            yield ("switch", rng.randrange(3))
        elif roll < 0.03:
            yield ("pause",)
        elif roll < 0.04:
            yield ("resume",)
        elif roll < 0.08:
            max_tid = rng.randrange(3)
        elif roll < 0.09:
            yield ("timestamp_for", rng.randrange(3), rng.randrange(1 << 32))
        for layer in layers:
            if rng.random() < 0.5:
                in_flight.extend(layer.next_frame(rng))
        while in_flight and rng.random() < 0.8:
            source, seq, ts, packet, tid = in_flight.pop(rng.randrange(min(len(in_flight), 6)))
            if rng.random() < 0.03:
                continue  # lost
            if rng.random() < 0.05:  # a duplicate, later
                in_flight.insert(rng.randrange(len(in_flight) + 1), (source, seq, ts, packet, tid))
            offset = payload_offset(packet)
            info = parse_descriptor(packet, offset) if vp8 else None
            if info is not None and info.is_keyframe and rng.random() < 0.5:
                yield ("switch", source)
            if info is not None and tid > max_tid:
                yield ("drop", source, seq, info)
            else:
                yield ("rewrite", source, seq, ts, packet, offset, info, now)


@pytest.mark.parametrize(
    ("seed", "vp8", "pid15"),
    [(1, True, True), (2, True, False), (3, False, False), (4, True, True), (5, True, False)],
    ids=["vp8-15bit", "vp8-7bit", "audio", "vp8-15bit-2", "vp8-7bit-2"],
)
def test_the_compiled_rewriter_matches_the_reference(seed: int, vp8: bool, pid15: bool) -> None:
    starts = _starts(random.Random(seed))
    reference = StreamRewriter(0xABCDEF01, **starts)
    compiled = _rewrite.StreamRewriter(0xABCDEF01, **starts)
    counts: Counter[str] = Counter()
    for step in _randomized(seed, vp8=vp8, pid15=pid15, steps=20_000):
        what = step[0]
        if what == "rewrite":
            _, source, seq, ts, packet, offset, info, now = step
            clock = 90000 if vp8 else 48000
            a, b = bytearray(packet), bytearray(packet)
            ok = reference.rewrite(a, offset, source, seq, ts, clock, now, info)
            assert compiled.rewrite(b, offset, source, seq, ts, clock, now, info) is ok, step
            assert a == b, step
            counts["forwarded" if ok else "refused"] += 1
        elif what == "drop":
            freed = reference.drop(*step[1:])
            assert compiled.drop(*step[1:]) is freed, step
            counts["freed" if freed else "kept"] += 1
        elif what == "timestamp_for":
            assert compiled.timestamp_for(*step[1:]) == reference.timestamp_for(*step[1:])
        else:
            getattr(reference, what)(*step[1:])
            getattr(compiled, what)(*step[1:])
        assert (compiled.paused, compiled.source) == (reference.paused, reference.source)
        counts[what] += 1
    # A guard on the stream itself: every kind of step happened, many times.
    assert counts["forwarded"] > 3000 and counts["refused"] > 300, counts
    assert counts["switch"] > 100 and counts["pause"] > 50 and counts["resume"] > 50, counts
    if vp8:
        assert counts["freed"] > 100 and counts["kept"] > 0, counts


def test_the_compiled_rewriter_refuses_a_packet_too_short_for_what_it_writes() -> None:
    layer = _Layer(0, random.Random(9), vp8=True, pid15=True)
    source, seq, ts, packet, _tid = layer.next_frame(random.Random(9))[0]
    offset = payload_offset(packet)
    info = parse_descriptor(packet, offset)
    rewriter = _rewrite.StreamRewriter(1)
    rewriter.switch(source)
    for short in (packet[:11], packet[: offset + 4]):
        buf = bytearray(short)
        assert not rewriter.rewrite(buf, offset, source, seq, ts, 90000, 1.0, info)
        assert buf == short
    assert not rewriter.rewrite(bytearray(packet), len(packet), source, seq, ts, 90000, 1.0, info)
    assert not rewriter.rewrite(bytearray(packet), -1, source, seq, ts, 90000, 1.0, info)
    assert rewriter.rewrite(bytearray(packet), offset, source, seq, ts, 90000, 1.0, info)


async def test_a_fan_out_refused_on_the_way_leaves_the_batch_and_the_cache_as_they_were() -> None:
    """A packet libsrtp refuses (a header longer than the packet) is not queued; an address the batch does not
    take is the reference path's to try."""
    profile = SrtpProfile.AEAD_AES_128_GCM
    producer = Producer(_Publisher(), "video", "0", {100: offer.VP8_PT}, PUBLISHER_TABLE, ["q", "h", "f"])  # type: ignore[arg-type]
    port = MediaPort(Metrics())
    await port.start("127.0.0.1", 0)
    sink = _sink()
    try:
        producer.add_ssrc(LAYER_SSRCS[0], 0)
        transport = WebRtcTransport(
            port, CERTIFICATE, label="s", on_rtp=lambda t, d: None, on_rtcp=lambda t, d: None
        )
        transport.ice.selected = sink.getsockname()  # the ICE pair, then DTLS's keys
        transport.srtp = SrtpSession.from_keying(profile, bytes(profile.keying_material_length), True)
        consumer = Consumer(producer, SimpleNamespace(participant=SimpleNamespace(id="s")))  # type: ignore[arg-type]
        consumer.transport = transport
        consumer.ready = True
        producer.consumers.append(consumer)
        port.holding = True
        assert producer.receive(_vp8(0, 0, keyframe=True), 0) == 1
        batch = port.batch
        assert batch is not None and batch.holding and batch.count == 1

        def fan_out(packet: bytes) -> int:
            return _rewrite.fanout(  # type: ignore[no-any-return]
                producer.consumers, bytearray(packet), 12, 0, 1, 0, 90000, 1.0, None, 8
            )

        too_long = b"\x8f\x64" + bytes(14)  # 15 CSRCs said, none there
        assert fan_out(too_long) == 0
        assert batch.count == 1
        # An ICE pair the batch cannot send to (IPv6, for the port's IPv4 socket) turns the route off: the
        # next packet goes the reference way, which sends what the batch held before it fails on its own.
        transport.ice.selected = ("::1", 9)
        transport.update_route()
        assert transport.route is not None and not transport.route.on
        packet = RtpPacket(payload_type=100, seq=2, timestamp=0, ssrc=1, payload=bytes(20)).serialize()
        assert fan_out(packet) == 1
        assert batch.count == 0
        assert len(_receive(sink, 1)) == 1
        assert _nothing_more(sink)
    finally:
        producer.close()
        sink.close()
        await port.close()


def _connectivity_check(transport: WebRtcTransport, remote_ufrag: str, nominate: bool) -> tuple[bytes, Any]:
    """A browser's connectivity check for `transport` (RFC 8445 §7.1.1), and its parsed form."""
    attributes = [
        stun.Attribute(stun.USERNAME, f"{transport.ice.ufrag}:{remote_ufrag}".encode()),
        stun.Attribute(stun.ICE_CONTROLLING, bytes(8)),
        stun.Attribute(stun.PRIORITY, (0x6E7F1EFF).to_bytes(4, "big")),
    ]
    if nominate:
        attributes.append(stun.Attribute(stun.USE_CANDIDATE, b""))
    message = stun.StunMessage(stun.BINDING, stun.MessageClass.REQUEST, os.urandom(12), attributes)
    data = stun.encode(message, integrity_key=transport.ice.pwd.encode(), fingerprint=True)
    return data, stun.parse(data)


async def test_the_compiled_forward_follows_the_pair_the_browser_nominates() -> None:
    """A browser that moves to another candidate pair (a network change) nominates it with a connectivity
    check: the compiled forward sends there from the next packet, and nowhere before a pair is chosen."""
    profile = SrtpProfile.AEAD_AES_128_GCM
    material = os.urandom(profile.keying_material_length)
    producer = Producer(_Publisher(), "video", "0", {100: offer.VP8_PT}, PUBLISHER_TABLE, ["q", "h", "f"])  # type: ignore[arg-type]
    port = MediaPort(Metrics())
    await port.start("127.0.0.1", 0)
    first, second = _sink(), _sink()
    receiver = SrtpSession.from_keying(profile, material, False)
    try:
        producer.add_ssrc(LAYER_SSRCS[0], 0)
        transport = WebRtcTransport(
            port, CERTIFICATE, label="s", on_rtp=lambda t, d: None, on_rtcp=lambda t, d: None
        )
        transport.set_remote("brw1", "")
        transport.srtp = SrtpSession.from_keying(profile, material, True)
        assert transport.route is not None and not transport.route.on  # no pair yet
        consumer = Consumer(producer, SimpleNamespace(participant=SimpleNamespace(id="s")))  # type: ignore[arg-type]
        consumer.transport = transport
        consumer.ready = True
        producer.consumers.append(consumer)

        def forward(seq: int) -> None:
            port.holding = True
            producer.receive(_vp8(0, seq, keyframe=seq == 0), 0)
            port.flush()

        forward(0)  # nowhere to go yet
        for sink, nominate in ((first, False), (second, True)):
            data, request = _connectivity_check(transport, "brw1", nominate)
            assert transport.receive_stun(data, request, sink.getsockname()) is None
            sink.recv(4096)  # the check's answer
            forward(1 if sink is first else 2)
            packet = RtpPacket.parse(receiver.unprotect(sink.recv(4096)))
            assert packet.ssrc == consumer.ssrc
            # Sent the compiled way: its cache keeps (publisher's packet, rewritten head), not a copy.
            compiled = sum(isinstance(entry, tuple) for entry in consumer.cache or [])
            assert compiled == (1 if sink is first else 2)
        assert _nothing_more(first) and _nothing_more(second)
    finally:
        producer.close()
        first.close()
        second.close()
        await port.close()
