"""The fuzzers' findings, kept: every committed corpus input and crash reproducer replayed through its target.

`make fuzz` runs the targets in fuzz/ under atheris; here the same `one_input` functions get each file of
fuzz/corpus/<target>/ and fuzz/crashes/<target>-*. A target swallows only its parser's documented error
(SdpError, StunError, RtpError, RtcpError, ProtocolError, or none at all), so anything escaping it is the bug
coming back, and so is an input that takes a second. The corpus holds a reproducer of every crash fixed
(`crash-*`). A 60 KB SDP of one line repeated must parse in well under the 20 ms one message may block the
event loop for: a parser that is quadratic in any kind of line fails that.
"""

from __future__ import annotations

import asyncio
import importlib
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from fuzz import TARGETS
from huddle.metrics import Metrics
from huddle.rtc import rtcp, sdp
from huddle.stun import message as stun
from huddle.stun.server import StunServer, handle

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
HANG_SECONDS = 1.0


def _inputs(target: str) -> list[Path]:
    corpus = sorted((FUZZ / "corpus" / target).glob("*"))
    crashes = sorted((FUZZ / "crashes").glob(f"{target}-*"))
    return [path for path in corpus + crashes if path.is_file()]


def test_every_target_has_a_corpus():
    for target in TARGETS:
        assert len(_inputs(target)) >= 3, target


@pytest.mark.parametrize("target", TARGETS)
def test_corpus_and_crash_reproducers_replay_cleanly(target):
    harness = importlib.import_module(f"fuzz.{target}")
    failures = []
    for path in _inputs(target):
        started = time.perf_counter()
        try:
            harness.one_input(path.read_bytes())
        except Exception as exc:  # anything the harness lets through is a bug in the parser
            failures.append(f"{path.name}: {type(exc).__name__}: {exc}"[:300])
            continue
        elapsed = time.perf_counter() - started
        if elapsed > HANG_SECONDS:
            failures.append(f"{path.name}: took {elapsed:.2f} s")
    assert not failures, "\n".join(failures)


_FINGERPRINT = ":".join(["AB"] * 32)
_HEAD = (
    "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96 97\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=rtpmap:96 VP8/90000\r\n"
    "a=rtpmap:97 rtx/90000\r\na=fmtp:97 apt=96\r\na=ice-ufrag:abcd\r\na=ice-pwd:0123456789abcdefghijklmn\r\n"
    f"a=fingerprint:sha-256 {_FINGERPRINT}\r\na=setup:actpass\r\na=rtcp-mux\r\n"
)
# One kind of line each, repeated (numbered where a repeat would be refused) up to 60 KB.
_REPEATED = {
    "ssrc": "a=ssrc:{i} cname:x",
    "ssrc-attribute": "a=ssrc:1 k{i}:v",
    "rid": "a=rid:r{i} send",
    "candidate": "a=candidate:{i} 1 udp 1 10.0.0.1 9 typ host",
    "extmap": "a=extmap:{j} urn:x:{i}",
    "fingerprint": f"a=fingerprint:sha-256 {_FINGERPRINT}",
    "msid": "a=msid:s{i} t{i}",
    "ssrc-group": "a=ssrc-group:FID {i} {j}",
    "rtcp-fb": "a=rtcp-fb:96 nack{i}",
    "unknown-attribute": "a=x-unknown:{i}",
    "m-section": "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:a{i}\r\na=rtpmap:111 opus/48000/2\r\na=rtcp-mux",
    "rejected-m-section": "m=audio 0 UDP/TLS/RTP/SAVPF 0",
}
# One line, long: lists inside a line must not be quadratic either.
_LONG = {
    "simulcast": "a=simulcast:send " + ";".join(f"r{i}" for i in range(12_000)),
    "fmtp": "a=fmtp:96 " + ";".join(f"k{i}=v" for i in range(10_000)),
    "rid-payload-types": "a=rid:r send pt=" + ",".join(["96"] * 30_000),
    "m-line-payload-types": "m=audio 9 UDP/TLS/RTP/SAVPF " + " ".join(["111"] * 30_000),
}
_SIZE = 60_000


def _big_sdps() -> dict[str, str]:
    out = {}
    for name, template in _REPEATED.items():
        lines, size, i = [_HEAD], len(_HEAD), 0
        while size < _SIZE:
            line = template.format(i=i, j=i % 255 + 1) + "\r\n"
            lines.append(line)
            size += len(line)
            i += 1
        out[name] = "".join(lines)
    for name, line in _LONG.items():
        out[name] = _HEAD + line[: _SIZE - len(_HEAD)] + "\r\n"
    group = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE "
    out["bundle-group"] = group + " ".join(str(i) for i in range(_SIZE // 5)) + "\r\n"
    return out


@pytest.mark.parametrize(("name", "text"), list(_big_sdps().items()), ids=list(_big_sdps()))
def test_a_60_kb_sdp_parses_in_well_under_20_ms(name, text):
    assert len(text) >= _SIZE - 100
    best = float("inf")
    # CPU time, best of a few: the machine is shared, and waiting for a core is not the parser's doing.
    for _ in range(5):
        started = time.thread_time()
        try:
            sdp.parse(text)
        except sdp.SdpError:
            pass
        best = min(best, time.thread_time() - started)
    assert best < 0.015, f"{name}: {best * 1000:.1f} ms"


def test_transport_cc_reporting_65535_lost_packets_parses_in_under_1_5_ms():
    # 40 bytes of run-length chunks say 65535 packets were not received. Walking them one by one in Python
    # cost 4.5 ms per packet, so a participant sending a few hundred of them a second stalled the node.
    data = (FUZZ / "corpus" / "rtcp" / "slow-twcc-65535-not-received").read_bytes()
    assert len(data) == 40
    best = float("inf")
    for _ in range(5):
        started = time.thread_time()
        (feedback,) = rtcp.parse_compound(data)
        best = min(best, time.thread_time() - started)
    assert isinstance(feedback, rtcp.TransportCC) and feedback.packet_status_count == 65535
    assert best < 0.0015, f"{best * 1000:.2f} ms"


def _unknown_attributes_request(size: int) -> bytes:
    """A Binding request of `size` bytes: nothing but distinct unknown comprehension-required attributes."""
    attributes = b"".join(struct.pack(">HH", 0x4000 + i, 0) for i in range((size - stun.HEADER_SIZE) // 4))
    return struct.pack(">HHI12s", stun.BINDING, len(attributes), stun.MAGIC_COOKIE, bytes(12)) + attributes


def test_a_64_kb_stun_request_of_16000_unknown_attributes_is_answered_in_linear_time():
    # Collecting the unknown attributes for the 420 answer checked each against a list: 0.95 s for this one.
    data = _unknown_attributes_request(65504)
    best = float("inf")
    for _ in range(3):
        started = time.thread_time()
        outcome = handle(data, ("192.0.2.1", 3478), software="huddle")
        best = min(best, time.thread_time() - started)
    assert outcome.reason == "unknown_attribute"
    assert (
        len(stun.decode_unknown_attributes(stun.parse(outcome.reply).get(stun.UNKNOWN_ATTRIBUTES))) == 16371
    )
    assert best < 0.1, f"{best * 1000:.0f} ms"


class _Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.replies.put_nowait(data)


async def test_stun_over_udp_drops_a_datagram_over_the_message_size_limit_as_tcp_does():
    metrics = Metrics()
    server = StunServer(metrics)
    port = await server.start("127.0.0.1", 0)
    transport, client = await asyncio.get_running_loop().create_datagram_endpoint(
        _Client, remote_addr=("127.0.0.1", port)
    )
    try:
        transport.sendto(_unknown_attributes_request(65504))
        good = stun.encode(stun.StunMessage(stun.BINDING, stun.MessageClass.REQUEST, b"fuzz-regress"))
        transport.sendto(good)
        # One socket, handled in order: when the small request is answered the large one has been dealt with.
        reply = stun.parse(await asyncio.wait_for(client.replies.get(), 5.0))
        assert reply.transaction_id == b"fuzz-regress"
        assert client.replies.empty()
        dropped = metrics.registry.get_sample_value(
            "huddle_stun_dropped_total", {"transport": "udp", "reason": "too_large"}
        )
        assert dropped == 1
    finally:
        transport.close()
        await server.close()
