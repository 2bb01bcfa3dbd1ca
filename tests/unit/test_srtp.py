"""SRTP/SRTCP through `SrtpSession`: both profiles, tampering, replay, reordering, many SSRCs."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from huddle.rtc.srtp import DEFAULT_PROFILES, SrtpError, SrtpKeys, SrtpProfile, SrtpSession

PROFILES = list(SrtpProfile)
# Bytes SRTP adds: CM_SHA1_80 an 80-bit tag; GCM a 128-bit tag. SRTCP adds the E flag + index (4) too.
RTP_OVERHEAD = {SrtpProfile.AES128_CM_SHA1_80: 10, SrtpProfile.AEAD_AES_128_GCM: 16}


def rtp(seq: int, ssrc: int = 0x11223344, timestamp: int = 90000, payload: bytes = b"\x10" * 160) -> bytes:
    return struct.pack("!BBHII", 0x80, 96, seq & 0xFFFF, timestamp, ssrc) + payload


def rtcp_rr(ssrc: int = 0x55667788) -> bytes:
    # Receiver report with no report blocks: V=2, RC=0, PT=201, length=1 (two 32-bit words).
    return struct.pack("!BBHI", 0x80, 201, 1, ssrc)


def pair(profile: SrtpProfile) -> tuple[SrtpSession, SrtpSession]:
    """(client, server) sessions keyed from one exporter output, as the two DTLS ends would be."""
    material = os.urandom(profile.keying_material_length)
    return (
        SrtpSession.from_keying(profile, material, is_server=False),
        SrtpSession.from_keying(profile, material, is_server=True),
    )


def test_gcm_is_preferred() -> None:
    assert DEFAULT_PROFILES[0] is SrtpProfile.AEAD_AES_128_GCM
    assert set(DEFAULT_PROFILES) == set(SrtpProfile)


@pytest.mark.parametrize(
    ("name", "profile"),
    [
        ("SRTP_AEAD_AES_128_GCM", SrtpProfile.AEAD_AES_128_GCM),
        (b"SRTP_AES128_CM_SHA1_80", SrtpProfile.AES128_CM_SHA1_80),
    ],
)
def test_profile_from_openssl_name(name: str | bytes, profile: SrtpProfile) -> None:
    assert SrtpProfile.from_openssl_name(name) is profile


def test_unknown_openssl_name() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        SrtpProfile.from_openssl_name(b"SRTP_AES128_CM_SHA1_32")


def test_keying_material_split_follows_rfc5764() -> None:
    # client key | server key | client salt | server salt
    profile = SrtpProfile.AES128_CM_SHA1_80
    material = bytes(range(60))
    server = SrtpKeys.from_keying_material(profile, material, is_server=True)
    client = SrtpKeys.from_keying_material(profile, material, is_server=False)
    assert client.local_key == bytes(range(0, 16)) == server.remote_key
    assert server.local_key == bytes(range(16, 32)) == client.remote_key
    assert client.local_salt == bytes(range(32, 46)) == server.remote_salt
    assert server.local_salt == bytes(range(46, 60)) == client.remote_salt
    assert "00" not in repr(server)  # no key bytes in logs


def test_gcm_split_uses_twelve_byte_salts() -> None:
    profile = SrtpProfile.AEAD_AES_128_GCM
    keys = SrtpKeys.from_keying_material(profile, bytes(range(56)), is_server=True)
    assert (keys.local_key, keys.local_salt) == (bytes(range(16, 32)), bytes(range(44, 56)))
    assert (keys.remote_key, keys.remote_salt) == (bytes(range(0, 16)), bytes(range(32, 44)))


@pytest.mark.parametrize("profile", PROFILES)
def test_wrong_keying_material_length(profile: SrtpProfile) -> None:
    with pytest.raises(SrtpError, match="keying material"):
        SrtpSession.from_keying(profile, b"\x00" * 10, is_server=True)


@pytest.mark.parametrize("profile", PROFILES)
def test_rtp_round_trip_both_ways(profile: SrtpProfile) -> None:
    client, server = pair(profile)
    for seq in range(5):
        packet = rtp(seq)
        protected = client.protect(packet)
        assert len(protected) == len(packet) + RTP_OVERHEAD[profile]
        assert protected[:12] == packet[:12]  # the header stays readable for routing
        assert protected[12:] != packet[12:]
        assert server.unprotect(protected) == packet
        assert client.unprotect(server.protect(packet)) == packet


@pytest.mark.parametrize("profile", PROFILES)
def test_rtcp_round_trip_both_ways(profile: SrtpProfile) -> None:
    client, server = pair(profile)
    for _ in range(3):
        packet = rtcp_rr()
        protected = client.protect_rtcp(packet)
        assert len(protected) == len(packet) + 4 + RTP_OVERHEAD[profile]
        assert server.unprotect_rtcp(protected) == packet
        assert client.unprotect_rtcp(server.protect_rtcp(packet)) == packet


@pytest.mark.parametrize("profile", PROFILES)
def test_own_packets_do_not_unprotect_with_our_inbound_key(profile: SrtpProfile) -> None:
    client, _ = pair(profile)
    with pytest.raises(SrtpError):
        client.unprotect(client.protect(rtp(1)))


@pytest.mark.parametrize("profile", PROFILES)
def test_tampered_tag_is_rejected(profile: SrtpProfile) -> None:
    client, server = pair(profile)
    protected = bytearray(client.protect(rtp(1)))
    protected[-1] ^= 0x01
    with pytest.raises(SrtpError, match=r"authentication failure|cipher failure"):
        server.unprotect(bytes(protected))


@pytest.mark.parametrize("profile", PROFILES)
def test_tampered_payload_is_rejected(profile: SrtpProfile) -> None:
    client, server = pair(profile)
    protected = bytearray(client.protect(rtp(1)))
    protected[20] ^= 0x80
    with pytest.raises(SrtpError):
        server.unprotect(bytes(protected))


@pytest.mark.parametrize("profile", PROFILES)
def test_tampered_rtcp_is_rejected(profile: SrtpProfile) -> None:
    client, server = pair(profile)
    protected = bytearray(client.protect_rtcp(rtcp_rr()))
    protected[-1] ^= 0x01
    with pytest.raises(SrtpError):
        server.unprotect_rtcp(bytes(protected))


@pytest.mark.parametrize("profile", PROFILES)
def test_replayed_packet_is_rejected(profile: SrtpProfile) -> None:
    client, server = pair(profile)
    protected = client.protect(rtp(7))
    server.unprotect(protected)
    with pytest.raises(SrtpError, match="replay"):
        server.unprotect(protected)


@pytest.mark.parametrize("profile", PROFILES)
def test_replayed_rtcp_is_rejected(profile: SrtpProfile) -> None:
    client, server = pair(profile)
    protected = client.protect_rtcp(rtcp_rr())
    server.unprotect_rtcp(protected)
    with pytest.raises(SrtpError, match="replay"):
        server.unprotect_rtcp(protected)


@pytest.mark.parametrize("profile", PROFILES)
def test_reordering_within_the_window_is_tolerated(profile: SrtpProfile) -> None:
    client, server = pair(profile)
    protected = [client.protect(rtp(seq)) for seq in range(700)]
    # 600 packets late: libsrtp's default 128-packet window would call this "index too old".
    assert server.unprotect(protected[650]) == rtp(650)
    assert server.unprotect(protected[50]) == rtp(50)
    assert server.unprotect(protected[649]) == rtp(649)


@pytest.mark.parametrize("profile", PROFILES)
def test_the_same_packet_can_be_protected_again_for_a_nack(profile: SrtpProfile) -> None:
    client, server = pair(profile)
    first = client.protect(rtp(42))
    for seq in range(43, 60):
        client.protect(rtp(seq))
    again = client.protect(rtp(42))
    assert again == first
    assert server.unprotect(again) == rtp(42)


@pytest.mark.parametrize("profile", PROFILES)
def test_many_ssrcs_through_one_session(profile: SrtpProfile) -> None:
    client, server = pair(profile)
    ssrcs = [0x1000 + 97 * i for i in range(60)]
    for seq in range(4):
        for ssrc in ssrcs:
            packet = rtp(60000 + seq, ssrc=ssrc, payload=ssrc.to_bytes(4, "big") * 20)
            assert server.unprotect(client.protect(packet)) == packet
            assert client.unprotect(server.protect(packet)) == packet


@pytest.mark.parametrize("profile", PROFILES)
def test_sequence_number_wrap_keeps_working(profile: SrtpProfile) -> None:
    client, server = pair(profile)
    for seq in range(65530, 65545):
        assert server.unprotect(client.protect(rtp(seq))) == rtp(seq)


def test_oversized_and_wrong_type_packets_raise_srtp_error() -> None:
    client, _ = pair(SrtpProfile.AEAD_AES_128_GCM)
    with pytest.raises(SrtpError):
        client.protect(rtp(1, payload=b"\x00" * 1490))
    with pytest.raises(SrtpError):
        client.protect(bytearray(rtp(1)))  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=1400), profile=st.sampled_from(PROFILES), rtcp=st.booleans())
def test_garbage_only_ever_raises_srtp_error(data: bytes, profile: SrtpProfile, rtcp: bool) -> None:
    _, server = pair(profile)
    try:
        (server.unprotect_rtcp if rtcp else server.unprotect)(data)
    except SrtpError:
        pass


@pytest.mark.parametrize("profile", PROFILES)
def test_protect_view_matches_protect_and_is_read_by_the_peer(profile: SrtpProfile) -> None:
    # Two sessions with the same keys: the forwarding path's protect_view must produce exactly what
    # pylibsrtp's protect does, for bytes and for the bytearray the rewriter patched in place.
    material = os.urandom(profile.keying_material_length)
    fast = SrtpSession.from_keying(profile, material, is_server=True)
    slow = SrtpSession.from_keying(profile, material, is_server=True)
    peer = SrtpSession.from_keying(profile, material, is_server=False)
    for seq in range(70_000, 70_010):  # across a sequence number wrap
        packet = rtp(seq, payload=bytes(range(256)) * 4)
        view = fast.protect_view(bytearray(packet))
        assert bytes(view) == slow.protect(packet)
        assert peer.unprotect(bytes(view)) == packet


def test_protect_view_refuses_a_packet_longer_than_a_datagram() -> None:
    client, _ = pair(SrtpProfile.AEAD_AES_128_GCM)
    with pytest.raises(SrtpError, match="longer than"):
        client.protect_view(rtp(1, payload=b"\x00" * 1500))
    assert len(client.protect_view(rtp(2, payload=b"\x00" * 1400))) == 12 + 1400 + 16
