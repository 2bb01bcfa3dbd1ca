"""The SFU's per-packet forwarding path alone: CPU microseconds per forwarded packet, deterministic.

One publisher's packets go through the real Producer → Consumer → StreamRewriter → SRTP protect →
MediaPort.send_to path to N subscribers (real SRTP sessions, a real UDP socket sending to a sink on
127.0.0.1), with no generator, ICE or event-loop scheduling around it. The CPU time of the forwarding thread
alone is measured, so the figure moves only when the hot path does: this is the before/after yardstick for
hot-path changes; `make bench` measures the whole server under load.

Run: .venv/bin/python -m bench.forward [--subscribers 99] [--packets 3000]
HUDDLE_FASTPATH=0 in the environment measures the pure-Python reference path instead of the compiled one
(huddle.rtc.fastpath); alternate the two runs on a busy machine and compare medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import statistics
import time
from types import SimpleNamespace

from huddle.metrics import Metrics
from huddle.rtc.certificate import Certificate
from huddle.rtc.port import MediaPort
from huddle.rtc.rtp import RtpPacket
from huddle.rtc.srtp import SrtpProfile, SrtpSession
from huddle.rtc.transport import WebRtcTransport
from huddle.sfu import offer
from huddle.sfu.consumer import Consumer
from huddle.sfu.producer import UNUSED_EXTENSION_ID, Producer

SSRC = 0x1234ABCD
# What a Chromium publisher's packet carries: abs-send-time (id 3 here, renamed to ours) and a
# transport-wide sequence number (id 5, renamed to the unused id).
PUBLISHER_TABLE = bytes(
    offer.ABS_SEND_TIME_ID if i == 3 else offer.AUDIO_LEVEL_ID if i == 4 else UNUSED_EXTENSION_ID
    for i in range(16)
)


class _Publisher:
    def __init__(self) -> None:
        self.participant = SimpleNamespace(id="publisher")
        self.router = SimpleNamespace(layer_started=lambda producer: None)

    def send_pli(self, media_ssrc: int) -> bool:
        return True


def _vp8_packets(count: int, size: int) -> list[bytes]:
    """A 30 fps VP8 stream with 15-bit picture ids, TL0PICIDX and three temporal layers (as Chromium sends
    simulcast), a keyframe first, `size`-byte payloads, three packets per frame."""
    out = []
    for i in range(count):
        frame, part = divmod(i, 3)
        tid = (0, 2, 1, 2)[frame % 4]
        start = part == 0
        descriptor = bytes(
            (
                0x90 if start else 0x80,  # X, S
                0xE0,  # I L T
                0x80 | ((frame >> 8) & 0x7F),
                frame & 0xFF,
                (frame // 4) & 0xFF,
                (tid << 6) | (0x20 if tid == 0 else 0),
            )
        )
        keyframe = frame == 0 and start
        body = (bytes.fromhex("5002009d012a0005d002") if keyframe else b"\x31\x02\x00") + bytes(size)
        out.append(
            RtpPacket(
                payload_type=100,
                seq=i & 0xFFFF,
                timestamp=(frame * 3000) & 0xFFFFFFFF,
                ssrc=SSRC,
                marker=part == 2,
                extensions={3: b"\x00\x00\x00", 5: (i & 0xFFFF).to_bytes(2, "big")},
                payload=descriptor + body[: size - len(descriptor)],
            ).serialize()
        )
    return out


def _opus_packets(count: int) -> list[bytes]:
    return [
        RtpPacket(
            payload_type=109,
            seq=i & 0xFFFF,
            timestamp=(i * 960) & 0xFFFFFFFF,
            ssrc=SSRC,
            extensions={3: b"\x00\x00\x00", 4: b"\x9e", 5: (i & 0xFFFF).to_bytes(2, "big")},
            payload=bytes(90),
        ).serialize()
        for i in range(count)
    ]


def _drain(sock: socket.socket) -> None:
    """Read the sink until the parent goes (a process of its own: a thread would take the GIL from the
    path measured)."""
    sock.settimeout(0.5)
    parent = os.getppid()
    while os.getppid() == parent:
        try:
            sock.recv(2048)
        except OSError:
            continue


async def measure(kind: str, subscribers: int, packets: int, rounds: int) -> dict[str, float]:
    metrics = Metrics()
    port = MediaPort(metrics)
    await port.start("127.0.0.1", 0)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    sink.bind(("127.0.0.1", 0))
    drainer = multiprocessing.get_context("spawn").Process(target=_drain, args=(sink,), daemon=True)
    drainer.start()
    certificate = Certificate.generate()
    pt_map = {100: offer.VP8_PT} if kind == "video" else {109: offer.OPUS_PT}
    producer = Producer(_Publisher(), kind, "0", pt_map, PUBLISHER_TABLE)  # type: ignore[arg-type]
    producer.add_ssrc(SSRC, 0)
    profile = SrtpProfile.AEAD_AES_128_GCM
    for n in range(subscribers):
        transport = WebRtcTransport(
            port, certificate, label=f"s{n}", on_rtp=lambda t, d: None, on_rtcp=lambda t, d: None
        )
        transport.ice.selected = sink.getsockname()  # the ICE pair, then DTLS's keys
        transport.srtp = SrtpSession.from_keying(profile, os.urandom(profile.keying_material_length), True)
        consumer = Consumer(producer, SimpleNamespace(participant=SimpleNamespace(id=f"s{n}")))  # type: ignore[arg-type]
        consumer.transport = transport
        consumer.ready = True
        producer.consumers.append(consumer)
    total = packets * rounds
    stream = _vp8_packets(total, 1100) if kind == "video" else _opus_packets(total)
    per_packet = []
    for r in range(rounds):
        # The first round also carries the keyframe that starts every consumer.
        sent = 0
        start = time.thread_time()
        for data in stream[r * packets : (r + 1) * packets]:
            # As MediaPort.receive does around each datagram it hands on: the sends go out together.
            port.holding = True
            sent += producer.receive(data, 0)
            port.flush()
        per_packet.append((time.thread_time() - start) / max(sent, 1) * 1e6)
    drainer.kill()
    drainer.join()
    sink.close()
    await port.close()
    return {
        "subscribers": subscribers,
        "packets_in": packets * rounds,
        "us_per_forwarded_packet": statistics.median(per_packet),
        "spread": max(per_packet) - min(per_packet),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=99)
    parser.add_argument("--packets", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results = {}
    for kind in ("video", "audio"):
        results[kind] = asyncio.run(measure(kind, args.subscribers, args.packets, args.rounds))
        r = results[kind]
        print(
            f"{kind}: {r['us_per_forwarded_packet']:.2f} µs per forwarded packet"
            f" (median of {args.rounds} rounds, spread {r['spread']:.2f}),"
            f" {r['subscribers']} subscribers, {r['packets_in']} packets in"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
