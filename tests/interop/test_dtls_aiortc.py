"""Our `DtlsEndpoint` against aiortc's `RTCDtlsTransport`, over an in-memory stand-in for ICE.

aiortc's DTLS transport only needs three things from its ICE transport: a `role`, `_send` and `_recv`.
Both stacks sit on pyOpenSSL, but everything WebRTC-specific is independent code on each side: roles,
the fingerprint check, the RFC 5764 key split, SRTP profile mapping and libsrtp policies. A swapped key
or a mis-formatted fingerprint fails here even where our two endpoints would agree with each other.
"""

from __future__ import annotations

import asyncio
import struct

import pytest
from aiortc.rtcdtlstransport import (
    SRTP_AES128_CM_SHA1_80,
    RTCCertificate,
    RTCDtlsFingerprint,
    RTCDtlsParameters,
    RTCDtlsTransport,
)

from huddle.rtc.certificate import Certificate
from huddle.rtc.dtls import DtlsEndpoint, DtlsEvent, DtlsState, Failed, HandshakeComplete, Role
from huddle.rtc.srtp import SrtpProfile, SrtpSession

OUR_CERT = Certificate.generate()


class MemoryIce:
    """The part of `RTCIceTransport` that `RTCDtlsTransport` uses: a role and a datagram pipe."""

    def __init__(self) -> None:
        self.role = "controlled"
        self.to_aiortc: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.from_aiortc: asyncio.Queue[bytes] = asyncio.Queue()

    async def _send(self, data: bytes) -> None:
        self.from_aiortc.put_nowait(data)

    async def _recv(self) -> bytes:
        data = await self.to_aiortc.get()
        if data is None:
            raise ConnectionError("closed")
        return data


def sha256(certificate: RTCCertificate) -> str:
    return next(f.value for f in certificate.getFingerprints() if f.algorithm == "sha-256")


async def run_endpoint(endpoint: DtlsEndpoint, ice: MemoryIce, until: float = 5.0) -> list[DtlsEvent]:
    """Drive our sans-I/O endpoint the way the real transport will, until it settles or fails."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + until
    seen: list[DtlsEvent] = []
    endpoint.start(loop.time())
    while loop.time() < deadline:
        for datagram in endpoint.datagrams_to_send():
            ice.to_aiortc.put_nowait(datagram)
        while (event := endpoint.next_event()) is not None:
            seen.append(event)
        if endpoint.state is not DtlsState.CONNECTING and endpoint.state is not DtlsState.NEW:
            return seen
        due = endpoint.next_timeout()
        wait = deadline - loop.time() if due is None else max(0.0, due - loop.time())
        try:
            datagram = await asyncio.wait_for(ice.from_aiortc.get(), timeout=wait)
        except TimeoutError:
            endpoint.handle_timeout(loop.time())
        else:
            endpoint.receive_datagram(datagram, loop.time())
    raise AssertionError(f"handshake did not settle: {endpoint!r}")


async def handshake(
    our_role: Role, aiortc_profiles: list | None = None, our_expectation: str | None = None
) -> tuple[DtlsEndpoint, RTCDtlsTransport, MemoryIce, list[DtlsEvent]]:
    ice = MemoryIce()
    their_cert = RTCCertificate.generateCertificate()
    theirs = RTCDtlsTransport(ice, [their_cert])  # type: ignore[arg-type]
    theirs._set_role("client" if our_role == "server" else "server")
    if aiortc_profiles is not None:
        theirs._srtp_profiles = aiortc_profiles
    ours = DtlsEndpoint(OUR_CERT, our_expectation or sha256(their_cert), our_role)
    params = RTCDtlsParameters(fingerprints=[RTCDtlsFingerprint("sha-256", OUR_CERT.fingerprint_sha256)])
    their_start = asyncio.ensure_future(theirs.start(params))
    seen = await run_endpoint(ours, ice)
    await asyncio.wait_for(their_start, timeout=5.0)
    return ours, theirs, ice, seen


def rtp(seq: int, ssrc: int = 0x1234ABCD) -> bytes:
    return struct.pack("!BBHII", 0x80, 96, seq, seq * 3000, ssrc) + bytes(range(200))


def check_srtp_both_ways(complete: HandshakeComplete, our_role: Role, theirs: RTCDtlsTransport) -> None:
    ours = SrtpSession.from_keying(complete.profile, complete.key_material, is_server=our_role == "server")
    for seq in range(1, 4):
        packet = rtp(seq)
        assert ours.unprotect(theirs._tx_srtp.protect(packet)) == packet
        assert theirs._rx_srtp.unprotect(ours.protect(packet)) == packet
    report = struct.pack("!BBHI", 0x80, 201, 1, 0x1234ABCD)
    assert ours.unprotect_rtcp(theirs._tx_srtp.protect_rtcp(report)) == report
    assert theirs._rx_srtp.unprotect_rtcp(ours.protect_rtcp(report)) == report


@pytest.mark.parametrize(
    ("our_role", "aiortc_profiles", "expected"),
    [
        # aiortc offers AES-256-GCM, AES-128-GCM and CM_SHA1_80; we take AES-128-GCM.
        ("server", None, SrtpProfile.AEAD_AES_128_GCM),
        # What Chromium ends up on with us.
        ("server", [SRTP_AES128_CM_SHA1_80], SrtpProfile.AES128_CM_SHA1_80),
        ("client", None, SrtpProfile.AEAD_AES_128_GCM),
    ],
)
async def test_handshake_and_srtp_with_aiortc(
    our_role: Role, aiortc_profiles: list | None, expected: SrtpProfile
) -> None:
    ours, theirs, ice, seen = await handshake(our_role, aiortc_profiles)
    assert theirs.state == "connected"
    assert ours.state is DtlsState.CONNECTED
    (complete,) = seen
    assert isinstance(complete, HandshakeComplete)
    assert complete.profile is expected
    check_srtp_both_ways(complete, our_role, theirs)
    await theirs.stop()
    ice.to_aiortc.put_nowait(None)


async def test_close_notify_reaches_aiortc() -> None:
    ours, theirs, ice, _ = await handshake("server")
    ours.close()
    for datagram in ours.datagrams_to_send():
        ice.to_aiortc.put_nowait(datagram)
    for _ in range(100):
        if theirs.state == "closed":
            break
        await asyncio.sleep(0.01)
    assert theirs.state == "closed"


async def test_we_fail_aiortc_when_its_fingerprint_is_not_the_sdps() -> None:
    ours, theirs, ice, seen = await handshake(
        "server", our_expectation=Certificate.generate().fingerprint_sha256
    )
    assert ours.state is DtlsState.FAILED
    assert isinstance(seen[-1], Failed) and "does not match" in seen[-1].reason
    # Our alert reaches aiortc, which fails instead of waiting out its retransmissions.
    assert theirs.state == "failed"
    ice.to_aiortc.put_nowait(None)
