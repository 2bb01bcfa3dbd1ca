"""DTLS-SRTP endpoints handshaking in memory: profiles, keys, fingerprints, loss, fragmentation, garbage.

OpenSSL's DTLS retransmission timer runs on the wall clock, so the two loss tests really wait for it
(about a second each) and use `time.monotonic()` as `now`; everything else runs on a fake clock.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import time
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from huddle.rtc.certificate import Certificate, fingerprint_sha256
from huddle.rtc.dtls import (
    ApplicationData,
    Closed,
    DtlsEndpoint,
    DtlsEvent,
    DtlsState,
    Failed,
    HandshakeComplete,
    check_framing,
    pack_records,
)
from huddle.rtc.srtp import SrtpProfile, SrtpSession

CLIENT_CERT = Certificate.generate()
SERVER_CERT = Certificate.generate()
GCM, CM80 = SrtpProfile.AEAD_AES_128_GCM, SrtpProfile.AES128_CM_SHA1_80

Drop = Callable[[DtlsEndpoint, bytes], bool]


def endpoints(**server_options: object) -> tuple[DtlsEndpoint, DtlsEndpoint]:
    client_options = {k[7:]: v for k, v in server_options.items() if k.startswith("client_")}
    server_only = {k: v for k, v in server_options.items() if not k.startswith("client_")}
    client = DtlsEndpoint(CLIENT_CERT, SERVER_CERT.fingerprint_sha256, "client", **client_options)  # type: ignore[arg-type]
    server = DtlsEndpoint(SERVER_CERT, CLIENT_CERT.fingerprint_sha256, "server", **server_only)  # type: ignore[arg-type]
    return client, server


def pump(a: DtlsEndpoint, b: DtlsEndpoint, now: float = 0.0, drop: Drop | None = None) -> list[bytes]:
    """Move datagrams both ways until both are quiet; returns everything that was sent."""
    sent: list[bytes] = []
    for _ in range(20):
        moved = False
        for src, dst in ((a, b), (b, a)):
            for datagram in src.datagrams_to_send():
                moved = True
                sent.append(datagram)
                if drop is None or not drop(src, datagram):
                    dst.receive_datagram(datagram, now)
        if not moved:
            return sent
    raise AssertionError("endpoints never went quiet")


def events(endpoint: DtlsEndpoint) -> list[DtlsEvent]:
    out = []
    while (event := endpoint.next_event()) is not None:
        out.append(event)
    return out


def handshake(client: DtlsEndpoint, server: DtlsEndpoint) -> tuple[HandshakeComplete, HandshakeComplete]:
    client.start(0.0)
    server.start(0.0)
    pump(client, server)
    client_events, server_events = events(client), events(server)
    assert len(client_events) == 1 and isinstance(client_events[0], HandshakeComplete), client_events
    assert len(server_events) == 1 and isinstance(server_events[0], HandshakeComplete), server_events
    return client_events[0], server_events[0]


def rtp(seq: int, ssrc: int = 0xCAFE) -> bytes:
    return struct.pack("!BBHII", 0x80, 111, seq, seq * 960, ssrc) + os.urandom(120)


# -- the certificate ---------------------------------------------------------------------------------


def test_certificate_is_self_signed_p256_with_an_sdp_fingerprint() -> None:
    cert = Certificate.generate()
    assert isinstance(cert.private_key, ec.EllipticCurvePrivateKey)
    assert isinstance(cert.private_key.curve, ec.SECP256R1)
    assert cert.certificate.issuer == cert.certificate.subject
    der = cert.certificate.public_bytes(serialization.Encoding.DER)
    assert re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", cert.fingerprint_sha256)
    assert cert.fingerprint_sha256.replace(":", "") == hashlib.sha256(der).hexdigest().upper()
    assert fingerprint_sha256(der) == cert.fingerprint_sha256
    assert cert.expires > cert.certificate.not_valid_before_utc
    assert Certificate.generate().fingerprint_sha256 != cert.fingerprint_sha256


# -- handshakes --------------------------------------------------------------------------------------


def test_handshake_completes_with_gcm_and_paired_keys() -> None:
    client, server = endpoints()
    c, s = handshake(client, server)
    assert c.profile is s.profile is GCM
    assert client.state is server.state is DtlsState.CONNECTED
    assert client.profile is server.profile is GCM
    assert c.key_material == s.key_material and len(c.key_material) == 56
    assert (c.keys.local_key, c.keys.local_salt) == (s.keys.remote_key, s.keys.remote_salt)
    assert (c.keys.remote_key, c.keys.remote_salt) == (s.keys.local_key, s.keys.local_salt)
    assert c.keys.local_key != c.keys.remote_key
    assert c.peer_fingerprint == SERVER_CERT.fingerprint_sha256
    assert s.peer_fingerprint == CLIENT_CERT.fingerprint_sha256
    assert client.next_timeout() is None and server.next_timeout() is None


@pytest.mark.parametrize(
    ("client_profiles", "server_profiles", "expected"),
    [
        ((CM80, GCM), (GCM, CM80), GCM),  # the server's preference wins: GCM whenever offered
        ((CM80,), (GCM, CM80), CM80),  # Chromium-like: CM_SHA1_80 only
        ((GCM,), (GCM, CM80), GCM),
        ((GCM, CM80), (CM80,), CM80),
    ],
)
def test_profile_negotiation_and_srtp_both_ways(
    client_profiles: tuple[SrtpProfile, ...], server_profiles: tuple[SrtpProfile, ...], expected: SrtpProfile
) -> None:
    client, server = endpoints(client_profiles=client_profiles, profiles=server_profiles)
    c, s = handshake(client, server)
    assert c.profile is s.profile is expected
    assert len(c.key_material) == expected.keying_material_length
    client_srtp = SrtpSession.from_keying(c.profile, c.key_material, is_server=False)
    server_srtp = SrtpSession(s.keys)
    for seq in (1, 2, 3):
        packet = rtp(seq)
        assert server_srtp.unprotect(client_srtp.protect(packet)) == packet
        assert client_srtp.unprotect(server_srtp.protect(packet)) == packet
    report = struct.pack("!BBHI", 0x80, 201, 1, 0xCAFE)
    assert server_srtp.unprotect_rtcp(client_srtp.protect_rtcp(report)) == report
    assert client_srtp.unprotect_rtcp(server_srtp.protect_rtcp(report)) == report


def test_no_common_srtp_profile_fails_both_sides() -> None:
    client, server = endpoints(client_profiles=(CM80,), profiles=(GCM,))
    client.start(0.0)
    pump(client, server)
    assert client.state is server.state is DtlsState.FAILED
    for endpoint in (client, server):
        (failure,) = events(endpoint)
        assert isinstance(failure, Failed) and "SRTP profile" in failure.reason


def test_lower_case_sdp_fingerprint_is_accepted() -> None:
    client = DtlsEndpoint(CLIENT_CERT, SERVER_CERT.fingerprint_sha256.lower(), "client")
    server = DtlsEndpoint(SERVER_CERT, f" {CLIENT_CERT.fingerprint_sha256.lower()} ", "server")
    handshake(client, server)


def test_server_rejects_a_client_whose_fingerprint_does_not_match() -> None:
    impostor = Certificate.generate()
    client = DtlsEndpoint(impostor, SERVER_CERT.fingerprint_sha256, "client")
    server = DtlsEndpoint(SERVER_CERT, CLIENT_CERT.fingerprint_sha256, "server")
    client.start(0.0)
    pump(client, server)
    assert server.state is DtlsState.FAILED
    (failure,) = events(server)
    assert isinstance(failure, Failed)
    assert "does not match" in failure.reason and impostor.fingerprint_sha256 in failure.reason
    # The alert reaches the client, which fails too instead of waiting for a handshake that never ends.
    assert client.state is DtlsState.FAILED
    assert not any(isinstance(e, HandshakeComplete) for e in events(client))


def test_client_rejects_a_server_whose_fingerprint_does_not_match() -> None:
    client = DtlsEndpoint(CLIENT_CERT, Certificate.generate().fingerprint_sha256, "client")
    server = DtlsEndpoint(SERVER_CERT, CLIENT_CERT.fingerprint_sha256, "server")
    client.start(0.0)
    pump(client, server)
    assert client.state is DtlsState.FAILED
    (failure,) = events(client)
    assert isinstance(failure, Failed) and SERVER_CERT.fingerprint_sha256 in failure.reason
    assert server.state is DtlsState.FAILED


def test_every_datagram_fits_the_mtu() -> None:
    client, server = endpoints(mtu=300, client_mtu=300)
    client.start(0.0)
    sent = pump(client, server)
    assert all(len(d) <= 300 for d in sent)
    assert len(sent) > 6  # flights really were split across datagrams
    assert client.state is server.state is DtlsState.CONNECTED


def test_pack_records_keeps_records_whole() -> None:
    records = [bytes([22, 0xFE, 0xFD]) + bytes(8) + struct.pack("!H", n) + b"x" * n for n in (150, 50, 60)]
    datagrams = pack_records(b"".join(records), 200)
    assert datagrams == [records[0], records[1] + records[2]]
    assert check_framing(datagrams[1]) is None


# -- loss and retransmission ---------------------------------------------------------------------------


def wait_and_retransmit(endpoint: DtlsEndpoint) -> list[bytes]:
    """Sleep until the endpoint's timer is due (on the wall clock, as OpenSSL's is) and fire it."""
    for _ in range(5):
        due = endpoint.next_timeout()
        assert due is not None
        time.sleep(max(0.0, due - time.monotonic()) + 0.01)
        endpoint.handle_timeout(time.monotonic())
        datagrams = endpoint.datagrams_to_send()
        if datagrams:
            return datagrams
    raise AssertionError("no retransmission")


def test_lost_client_hello_is_retransmitted() -> None:
    client, server = endpoints()
    start = time.monotonic()
    client.start(start)
    (hello,) = client.datagrams_to_send()  # lost
    due = client.next_timeout()
    assert due is not None and start < due <= start + 1.1
    client.handle_timeout(start)  # not yet due: nothing happens
    assert client.datagrams_to_send() == []
    retransmitted = wait_and_retransmit(client)
    # The same ClientHello in a record with the next sequence number.
    assert len(retransmitted) == 1 and retransmitted[0][13:] == hello[13:]
    assert retransmitted[0][5:11] != hello[5:11]
    for datagram in retransmitted:
        server.receive_datagram(datagram, time.monotonic())
    pump(client, server, time.monotonic())
    assert client.state is server.state is DtlsState.CONNECTED


def test_lost_final_server_flight_is_recovered() -> None:
    client, server = endpoints()
    client.start(time.monotonic())

    def drop_server_finished(src: DtlsEndpoint, datagram: bytes) -> bool:
        # The server's last flight carries ChangeCipherSpec (content type 20).
        return src is server and 20 in _content_types(datagram)

    pump(client, server, time.monotonic(), drop=drop_server_finished)
    assert server.state is DtlsState.CONNECTED
    assert client.state is DtlsState.CONNECTING
    for datagram in wait_and_retransmit(client):
        server.receive_datagram(datagram, time.monotonic())
    pump(client, server, time.monotonic())
    assert client.state is DtlsState.CONNECTED
    (c,) = events(client)
    (s,) = events(server)
    assert isinstance(c, HandshakeComplete) and isinstance(s, HandshakeComplete)
    assert c.key_material == s.key_material


def _content_types(datagram: bytes) -> list[int]:
    types, offset = [], 0
    while offset + 13 <= len(datagram):
        types.append(datagram[offset])
        offset += 13 + int.from_bytes(datagram[offset + 11 : offset + 13], "big")
    return types


def test_handshake_gives_up_after_its_deadline() -> None:
    client, _server = endpoints(client_handshake_timeout=5.0)
    client.start(100.0)
    client.datagrams_to_send()
    assert client.next_timeout() is not None and client.next_timeout() <= 105.0  # type: ignore[operator]
    client.handle_timeout(105.0)
    assert client.state is DtlsState.FAILED
    (failure,) = events(client)
    assert isinstance(failure, Failed) and "5 s" in failure.reason
    assert client.next_timeout() is None


def test_a_server_that_never_hears_from_its_client_times_out() -> None:
    _client, server = endpoints(handshake_timeout=10.0)
    server.start(0.0)
    assert server.next_timeout() == 10.0
    server.handle_timeout(10.0)
    assert server.state is DtlsState.FAILED


# -- fragmented and DTLS 1.3 ClientHellos -------------------------------------------------------------


class RawClient:
    """A plain pyOpenSSL DTLS client whose ClientHello is padded with ALPN names past the MTU."""

    def __init__(self, mtu: int = 1200) -> None:
        context = SSL.Context(SSL.DTLS_METHOD)
        context.use_certificate(CLIENT_CERT.certificate)
        context.use_privatekey(CLIENT_CERT.private_key)
        context.set_verify(SSL.VERIFY_PEER, lambda *args: True)
        context.set_tlsext_use_srtp(b"SRTP_AES128_CM_SHA1_80:SRTP_AEAD_AES_128_GCM")
        context.set_options(SSL.OP_NO_QUERY_MTU)
        context.set_alpn_protos([bytes([97 + i]) * 200 for i in range(10)])
        self.conn = SSL.Connection(context, None)
        self.conn.set_connect_state()
        self.conn.set_ciphertext_mtu(mtu)
        self.mtu = mtu
        self.done = False

    def step(self, incoming: list[bytes]) -> list[bytes]:
        for datagram in incoming:
            self.conn.bio_write(datagram)
        try:
            self.conn.do_handshake()
            self.done = True
        except SSL.WantReadError:
            pass
        out = b""
        while True:
            try:
                out += self.conn.bio_read(65536)
            except SSL.WantReadError:
                return pack_records(out, self.mtu)


def drive_raw(raw: RawClient, server: DtlsEndpoint) -> None:
    for _ in range(5):
        outgoing = server.datagrams_to_send()
        if not outgoing:
            return
        for datagram in raw.step(outgoing):
            server.receive_datagram(datagram, 0.0)


def test_server_completes_with_a_client_hello_spanning_several_datagrams() -> None:
    raw = RawClient()
    server = DtlsEndpoint(SERVER_CERT, CLIENT_CERT.fingerprint_sha256, "server")
    hello = raw.step([])
    assert len(hello) >= 2 and sum(map(len, hello)) > 2000
    for index, datagram in enumerate(hello):
        server.receive_datagram(datagram, 0.0)
        if index < len(hello) - 1:
            assert server.datagrams_to_send() == []  # waits for the rest of the ClientHello
    drive_raw(raw, server)
    assert raw.done and server.state is DtlsState.CONNECTED
    assert server.profile is GCM  # listed second by that client; still preferred
    (complete,) = events(server)
    assert isinstance(complete, HandshakeComplete)
    assert complete.key_material == raw.conn.export_keying_material(b"EXTRACTOR-dtls_srtp", 56)


def _extension(kind: int, body: bytes) -> bytes:
    return struct.pack("!HH", kind, len(body)) + body


def chromium_like_client_hello() -> bytes:
    """A DTLS 1.3-capable ClientHello body as Chromium 156 sends it: ML-KEM hybrid key share and all."""
    key_shares = struct.pack("!HH", 0x11EC, 1216) + os.urandom(1216)  # X25519MLKEM768
    key_shares += struct.pack("!HH", 0x001D, 32) + os.urandom(32)  # X25519
    groups = [0x11EC, 0x001D, 0x0017, 0x0018]
    sigalgs = [0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601]
    suites = [0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xCCA9, 0xCCA8, 0xC009, 0xC013, 0xC00A, 0xC014]
    extensions = b"".join(
        [
            _extension(0x0017, b""),  # extended_master_secret
            _extension(0xFF01, b"\x00"),  # renegotiation_info
            _extension(0x000A, struct.pack(f"!H{len(groups)}H", 2 * len(groups), *groups)),
            _extension(0x000B, b"\x01\x00"),  # ec_point_formats: uncompressed
            _extension(0x000D, struct.pack(f"!H{len(sigalgs)}H", 2 * len(sigalgs), *sigalgs)),
            _extension(0x000E, struct.pack("!HHHB", 4, 0x0007, 0x0001, 0)),  # use_srtp: GCM, CM_SHA1_80
            _extension(0x0033, struct.pack("!H", len(key_shares)) + key_shares),  # key_share
            _extension(0x002B, b"\x04\xfe\xfc\xfe\xfd"),  # supported_versions: DTLS 1.3, DTLS 1.2
        ]
    )
    return (
        b"\xfe\xfd"
        + os.urandom(32)
        + b"\x00"  # legacy_session_id
        + b"\x00"  # legacy_cookie
        + struct.pack(f"!H{len(suites)}H", 2 * len(suites), *suites)
        + b"\x01\x00"
        + struct.pack("!H", len(extensions))
        + extensions
    )


def fragment_handshake(body: bytes, msg_type: int, pieces: int) -> list[bytes]:
    """One handshake message as `pieces` records, one per datagram, each with its own fragment header."""
    step = -(-len(body) // pieces)
    datagrams = []
    for seq, offset in enumerate(range(0, len(body), step)):
        chunk = body[offset : offset + step]
        handshake = bytes([msg_type]) + len(body).to_bytes(3, "big") + b"\x00\x00"
        handshake += offset.to_bytes(3, "big") + len(chunk).to_bytes(3, "big") + chunk
        header = b"\x16\xfe\xff" + b"\x00\x00" + seq.to_bytes(6, "big") + struct.pack("!H", len(handshake))
        datagrams.append(header + handshake)
    return datagrams


def server_hello_version_and_srtp(datagram: bytes) -> tuple[int, int]:
    assert datagram[0] == 22 and datagram[13] == 2, "first record is not a ServerHello"
    body = datagram[25:]
    version = int.from_bytes(body[0:2], "big")
    offset = 2 + 32
    offset += 1 + body[offset]  # session id
    offset += 2 + 1  # cipher suite, compression method
    end = offset + 2 + int.from_bytes(body[offset : offset + 2], "big")
    offset += 2
    while offset < end:
        kind, length = struct.unpack("!HH", body[offset : offset + 4])
        if kind == 0x000E:
            return version, int.from_bytes(body[offset + 6 : offset + 8], "big")
        offset += 4 + length
    raise AssertionError("no use_srtp in the ServerHello")


@pytest.mark.parametrize("order", ["in order", "reversed"])
def test_dtls13_client_hello_in_two_datagrams_gets_a_dtls12_server_hello(order: str) -> None:
    body = chromium_like_client_hello()
    assert 13 + 12 + len(body) > 1200  # too big for one datagram
    datagrams = fragment_handshake(body, msg_type=1, pieces=2)
    assert len(datagrams) == 2 and all(len(d) <= 1200 for d in datagrams)
    if order == "reversed":
        datagrams.reverse()
    server = DtlsEndpoint(SERVER_CERT, CLIENT_CERT.fingerprint_sha256, "server")
    server.receive_datagram(datagrams[0], 0.0)
    assert server.datagrams_to_send() == [] and server.state is DtlsState.CONNECTING
    server.receive_datagram(datagrams[1], 0.0)
    flight = server.datagrams_to_send()
    assert flight, events(server)
    version, srtp_profile = server_hello_version_and_srtp(flight[0])
    assert version == 0xFEFD  # DTLS 1.2
    assert srtp_profile == 0x0007  # SRTP_AEAD_AES_128_GCM
    assert server.state is DtlsState.CONNECTING and server.ignored_datagrams == 0


# -- garbage, truncation, closing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("datagram", "reason"),
    [
        (b"", "empty"),
        (b"\x00\x01\x00\x00" + bytes(16), "outside DTLS's range"),  # a STUN header
        (b"\x80\x60" + bytes(30), "outside DTLS's range"),  # RTP
        (b"\x16\xfe\xfd\x00", "truncated DTLS record header"),
        (b"\x18\xfe\xfd" + bytes(8) + b"\x00\x00", "content type 24"),
        (b"\x16\x03\x03" + bytes(8) + b"\x00\x00", "not DTLS's 0xfe"),
        (b"\x16\xfe\xfd" + bytes(8) + b"\x01\x00" + b"x" * 10, "longer than its datagram"),
    ],
)
def test_non_dtls_datagrams_are_ignored_with_a_reason(datagram: bytes, reason: str) -> None:
    client, server = endpoints()
    server.receive_datagram(datagram, 0.0)
    assert server.ignored_datagrams == 1 and reason in (server.last_ignored_reason or "")
    assert server.state is DtlsState.NEW and events(server) == []
    handshake(client, server)  # and nothing was spoiled


def test_truncated_client_hello_does_not_raise_or_spoil_the_handshake() -> None:
    client, server = endpoints()
    client.start(0.0)
    (hello,) = client.datagrams_to_send()
    server.receive_datagram(hello[:60], 0.0)  # cut inside the record
    assert server.ignored_datagrams == 1 and server.state is DtlsState.NEW
    server.receive_datagram(hello, 0.0)
    pump(client, server)
    assert client.state is server.state is DtlsState.CONNECTED


def test_first_fragment_of_a_client_hello_alone_waits_for_the_rest() -> None:
    raw = RawClient()
    server = DtlsEndpoint(SERVER_CERT, CLIENT_CERT.fingerprint_sha256, "server")
    first, second = raw.step([])
    server.receive_datagram(first[:700], 0.0)
    assert server.ignored_datagrams == 1
    server.receive_datagram(first, 0.0)
    assert server.datagrams_to_send() == [] and server.state is DtlsState.CONNECTING
    server.receive_datagram(second, 0.0)
    drive_raw(raw, server)
    assert raw.done and server.state is DtlsState.CONNECTED


def test_garbage_after_the_handshake_is_dropped() -> None:
    client, server = endpoints()
    handshake(client, server)
    for garbage in (
        b"\x17\xfe\xfd\x00\x01" + bytes(6) + b"\x00\x20" + os.urandom(32),  # application data, bad MAC
        b"\x16\xfe\xfd\x00\x00" + bytes(6) + b"\x00\x04" + b"\x01\x00\x00\x00",  # stale epoch-0 handshake
        os.urandom(40),
    ):
        server.receive_datagram(garbage, 1.0)
    assert server.state is DtlsState.CONNECTED
    assert [e for e in events(server) if not isinstance(e, ApplicationData)] == []


def test_application_data_both_ways() -> None:
    client, server = endpoints()
    handshake(client, server)
    client.send_application_data(b"hello over SCTP, one day")
    server.send_application_data(b"hi")
    pump(client, server)
    assert events(server) == [ApplicationData(b"hello over SCTP, one day")]
    assert events(client) == [ApplicationData(b"hi")]


def test_close_sends_close_notify() -> None:
    client, server = endpoints()
    handshake(client, server)
    server.close()
    assert server.state is DtlsState.CLOSED
    assert events(server) == [Closed("closed locally")]
    pump(client, server)
    assert client.state is DtlsState.CLOSED
    assert events(client) == [Closed("peer sent close_notify")]
    server.close()  # idempotent
    server.receive_datagram(b"\x15\xfe\xfd" + bytes(8) + b"\x00\x00", 2.0)
    assert server.last_ignored_reason == "association is closed" and events(server) == []
    with pytest.raises(RuntimeError):
        server.send_application_data(b"late")


def test_close_before_the_handshake() -> None:
    client, _server = endpoints()
    client.start(0.0)
    client.close()
    assert client.state is DtlsState.CLOSED and client.next_timeout() is None
    assert events(client) == [Closed("closed locally")]


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError):
        DtlsEndpoint(SERVER_CERT, "AA", "middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DtlsEndpoint(SERVER_CERT, "AA", profiles=())
    with pytest.raises(ValueError):
        DtlsEndpoint(SERVER_CERT, "AA", mtu=100)


# -- generated input -------------------------------------------------------------------------------------

_RECORDS = st.builds(
    lambda kind, version, epoch, seq, body: (
        bytes([kind])
        + version
        + struct.pack("!H", epoch)
        + seq.to_bytes(6, "big")
        + struct.pack("!H", len(body))
        + body
    ),
    st.sampled_from([20, 21, 22, 23]),
    st.sampled_from([b"\xfe\xfd", b"\xfe\xff"]),
    st.integers(0, 2),
    st.integers(0, 2**48 - 1),
    st.one_of(
        st.binary(max_size=300),
        # Handshake-shaped bodies: type, length, message_seq, fragment offset and length, then bytes.
        st.builds(
            lambda t, n, s, o, f, rest: (
                bytes([t])
                + n.to_bytes(3, "big")
                + s.to_bytes(2, "big")
                + o.to_bytes(3, "big")
                + f.to_bytes(3, "big")
                + rest
            ),
            st.integers(0, 255),
            st.integers(0, 2**24 - 1),
            st.integers(0, 3),
            st.integers(0, 2**24 - 1),
            st.integers(0, 2**24 - 1),
            st.binary(max_size=200),
        ),
    ),
)
_DATAGRAMS = st.one_of(st.binary(max_size=1500), st.lists(_RECORDS, min_size=1, max_size=4).map(b"".join))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datagrams=st.lists(_DATAGRAMS, min_size=1, max_size=5), role=st.sampled_from(["client", "server"]))
def test_random_datagrams_never_raise(datagrams: list[bytes], role: str) -> None:
    client, server = endpoints()
    target = server if role == "server" else client
    client.start(0.0)
    for datagram in datagrams:
        target.receive_datagram(datagram, 0.0)
        target.datagrams_to_send()
        target.handle_timeout(0.5)
    seen = events(target)
    assert (target.state is DtlsState.FAILED) == any(isinstance(e, Failed) for e in seen)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datagrams=st.lists(_DATAGRAMS, min_size=1, max_size=5))
def test_random_datagrams_into_a_connected_endpoint_never_raise(datagrams: list[bytes]) -> None:
    client, server = endpoints()
    handshake(client, server)
    for datagram in datagrams:
        server.receive_datagram(datagram, 1.0)
        server.datagrams_to_send()
    assert server.state in (DtlsState.CONNECTED, DtlsState.FAILED, DtlsState.CLOSED)
