"""The first inputs of each target, taken from the unit tests' fixtures (`python -m fuzz seed`).

Seeds are named `seed-<what>`; the fuzzer's own finds are named by their SHA-1, and reproducers of fixed
crashes `crash-<what>`. Writing the seeds again is harmless: same names, same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from huddle.rtc import rtcp, sdp
from huddle.rtc.certificate import Certificate
from huddle.rtc.dtls import DtlsEndpoint
from huddle.stun import message as stun
from tests.unit import test_rtcp, test_rtp, test_stun_message, test_vp8

ROOT = Path(__file__).resolve().parent.parent
SDP_FIXTURES = ROOT / "tests" / "unit" / "sdp"
_PWD = "0123456789abcdefghijklmn"


def _frames(datagrams: list[bytes]) -> bytes:
    return b"".join(len(d).to_bytes(2, "big") + d for d in datagrams)


def _sdp() -> Iterator[tuple[str, bytes]]:
    for path in sorted(SDP_FIXTURES.glob("*.sdp")):
        yield path.stem, path.read_bytes()
    offer = sdp.parse((SDP_FIXTURES / "chromium_simulcast_offer.sdp").read_text())
    answer = sdp.build_answer(offer, ice_ufrag="fuzz", ice_pwd=_PWD, fingerprint_sha256=":".join(["AB"] * 32))
    yield "sfu_answer", sdp.serialize(answer).encode()


def _signaling() -> Iterator[tuple[str, bytes]]:
    offer = (SDP_FIXTURES / "chromium_offer.sdp").read_text()
    messages = {
        "join": {"type": "join", "id": 1, "room": "standup", "name": "Ada", "token": "eyJ...", "v": 1},
        "resume": {"type": "join", "room": "standup", "resume": "r_0123"},
        "leave": {"type": "leave"},
        "offer": {"type": "offer", "to": "p_3f9a1c2b", "sdp": "v=0\r\n..."},
        "candidate": {
            "type": "candidate",
            "to": "p_3f9a1c2b",
            "candidate": {"candidate": "candidate:1 1 udp 1 10.0.0.1 5000 typ host", "sdpMLineIndex": 0},
        },
        "media": {"type": "media", "audio": True, "video": False},
        "ping": {"type": "ping", "id": 7},
        "sfu_offer": {"type": "sfu_offer", "pc": "publish", "sdp": offer},
        "sfu_answer": {"type": "sfu_answer", "pc": "subscribe", "sdp": "v=0\r\n", "revision": 3},
        "video_sizes": {"type": "video_sizes", "sizes": {"p_77d01e4a": [1280, 720]}},
        "start_recording": {"type": "start_recording", "id": "r-1", "outputs": ["composite", "tracks"]},
        "stop_recording": {"type": "stop_recording", "id": "r-2"},
    }
    for name, message in messages.items():
        yield name, json.dumps(message).encode()


def _stun() -> Iterator[tuple[str, bytes]]:
    yield "rfc5769_request", test_stun_message.SAMPLE_REQUEST
    yield "rfc5769_ipv4_response", test_stun_message.SAMPLE_IPV4_RESPONSE
    yield "rfc5769_ipv6_response", test_stun_message.SAMPLE_IPV6_RESPONSE
    check = stun.StunMessage(stun.BINDING, stun.MessageClass.REQUEST, bytes(range(12)))
    check.add(stun.USERNAME, stun.encode_username("fuzz:peer"))
    check.add(stun.PRIORITY, (1853824767).to_bytes(4, "big"))
    check.add(stun.ICE_CONTROLLING, bytes(8))
    check.add(stun.USE_CANDIDATE, b"")
    yield "ice_check", stun.encode(check, integrity_key=_PWD.encode(), fingerprint=True)
    error = stun.StunMessage(stun.BINDING, stun.MessageClass.ERROR, bytes(12))
    error.add(stun.ERROR_CODE, stun.encode_error_code(420, "Unknown Attribute"))
    error.add(stun.UNKNOWN_ATTRIBUTES, stun.encode_unknown_attributes([0x7F00, 0x0003]))
    yield "error_response", stun.encode(error, fingerprint=True)


def _rtp() -> Iterator[tuple[str, bytes]]:
    yield "plain", test_rtp.PLAIN
    yield "one_byte", test_rtp.ONE_BYTE
    yield "two_byte", test_rtp.TWO_BYTE
    yield "padded", test_rtp.PADDED


def _rtcp() -> Iterator[tuple[str, bytes]]:
    yield "sr", test_rtcp.SR_BYTES
    yield "nack", test_rtcp.NACK_BYTES
    yield "remb", test_rtcp.REMB_BYTES
    yield "twcc", test_rtcp.TWCC_BYTES
    yield (
        "compound",
        rtcp.serialize(
            [
                rtcp.ReceiverReport(1, [rtcp.ReportBlock(2, 10, -3, 70000, 5, 6, 7)]),
                rtcp.Sdes.for_cname(1, "fuzz"),
                rtcp.Bye([1, 2], "gone"),
                rtcp.Pli(1, 2),
                rtcp.Fir(1, [(2, 3)]),
            ]
        ),
    )


def _vp8() -> Iterator[tuple[str, bytes]]:
    for name, descriptor in test_vp8.LAYOUTS:
        yield f"{name}_key", descriptor + test_vp8.KEY_HEADER
        yield f"{name}_delta", descriptor + test_vp8.DELTA_HEADER
    yield "in_rtp", test_rtp.ONE_BYTE[: -len(b"payload")] + test_vp8.LAYOUTS[8][1] + test_vp8.KEY_HEADER


def _dtls() -> Iterator[tuple[str, bytes]]:
    """A real client's flights; replayed to a fresh server, the second one fails its Finished check."""
    client_certificate, server_certificate = Certificate.generate(), Certificate.generate()
    client = DtlsEndpoint(client_certificate, server_certificate.fingerprint_sha256, "client")
    server = DtlsEndpoint(server_certificate, client_certificate.fingerprint_sha256, "server")
    client.start(0.0)
    flights = []
    for _ in range(4):
        flight = client.datagrams_to_send()
        if not flight:
            break
        flights.append(flight)
        for datagram in flight:
            server.receive_datagram(datagram, 0.0)
        for datagram in server.datagrams_to_send():
            client.receive_datagram(datagram, 0.0)
    yield "client_hello", _frames(flights[0])
    yield "client_flights", _frames([d for flight in flights for d in flight])


SEEDS = {
    "sdp": _sdp,
    "signaling": _signaling,
    "stun": _stun,
    "rtp": _rtp,
    "rtcp": _rtcp,
    "vp8": _vp8,
    "dtls": _dtls,
}


def write_seeds(corpus: Path) -> None:
    for target, seeds in SEEDS.items():
        folder = corpus / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in seeds():
            (folder / f"seed-{name}").write_bytes(data)
