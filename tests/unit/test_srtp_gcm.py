"""Our AES-GCM protect of one outgoing SSRC (huddle/rtc/_srtp_gcm.c) against libsrtp's, which it replaces on
the compiled forwarding path: the same bytes for the same packets, and the same refusals, for any order of
sequence numbers a forwarder sends (in order, across wraps, repeated for a NACK, late, far too late, after a
jump); and what it protects, a receiver's libsrtp decrypts."""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from huddle.rtc import _srtp_gcm, srtp
from huddle.rtc.srtp import SrtpError, SrtpProfile, SrtpSession

PROFILE = SrtpProfile.AEAD_AES_128_GCM
SSRC = 0x5EED0001


def _packet(seq: int, rng: random.Random, ssrc: int = SSRC) -> bytes:
    csrcs = rng.randrange(3)
    extension = rng.random() < 0.5
    first = 0x80 | (0x10 if extension else 0) | csrcs
    header = bytes([first, 96]) + seq.to_bytes(2, "big") + rng.randbytes(4) + ssrc.to_bytes(4, "big")
    header += rng.randbytes(4 * csrcs)
    if extension:
        words = rng.randrange(3)
        header += b"\xbe\xde" + words.to_bytes(2, "big") + rng.randbytes(4 * words)
    return header + rng.randbytes(rng.randrange(0, 1200))


def _outcome(protect: Callable[[bytes], bytes | memoryview], packet: bytes) -> bytes | None:
    try:
        return bytes(protect(packet))
    except SrtpError:
        return None


def _sessions() -> tuple[SrtpSession, SrtpSession, SrtpSession]:
    """Ours (with its own stream for SSRC), libsrtp's, and a receiver's, all of one association."""
    material = os.urandom(PROFILE.keying_material_length)
    ours = SrtpSession.from_keying(PROFILE, material, True)
    function, _ = ours.stream_handle(SSRC)
    assert function == _srtp_gcm.PROTECT, "the GCM profile's stream is ours, not a libsrtp session"
    reference = SrtpSession.from_keying(PROFILE, material, True)
    return ours, reference, SrtpSession.from_keying(PROFILE, material, False)


# A forwarder's sequence numbers: mostly the next one, sometimes a gap, a repeat (a NACK's answer), one a
# little or a lot behind, or a jump far ahead (a stream switched after a long pause).
STEPS = st.lists(
    st.one_of(
        st.just(1),
        st.integers(2, 40),
        st.just(0),
        st.integers(-1100, -1),
        st.integers(-40000, 40000),
    ),
    min_size=1,
    max_size=300,
)


@settings(max_examples=60, deadline=None)
@given(start=st.integers(0, 0xFFFF), steps=STEPS, seed=st.integers(0, 2**32))
def test_the_same_bytes_and_refusals_as_libsrtp_for_any_order_of_sequence_numbers(
    start: int, steps: list[int], seed: int
) -> None:
    ours, reference, _ = _sessions()
    rng = random.Random(seed)
    seq = start
    for step in steps:
        seq = (seq + step) & 0xFFFF
        packet = _packet(seq, rng)
        mine = _outcome(ours.protect_view, packet)
        assert mine == _outcome(reference.protect, packet), f"seq {seq} after step {step}"


def test_a_long_stream_across_many_wraps_decrypts_at_the_receiver() -> None:
    ours, reference, receiver = _sessions()
    rng = random.Random(7)
    seq = 0xFF00
    for i in range(3 * 0x10000 + 500):
        seq = (seq + 1) & 0xFFFF
        if i % 997:  # every packet protected, one in a thousand checked: the rollover counter must keep up
            packet = _packet(seq, rng)
            ours.protect_view(packet)
            reference.protect(packet)
            continue
        packet = _packet(seq, rng)
        out = bytes(ours.protect_view(packet))
        assert out == reference.protect(packet)
        assert receiver.unprotect(out) == packet


def test_a_packet_far_too_late_or_of_another_ssrc_or_cut_short_is_refused() -> None:
    ours, _, _ = _sessions()
    rng = random.Random(3)
    for seq in range(2000):
        ours.protect_view(_packet(seq, rng))
    with pytest.raises(SrtpError, match="error 10"):  # libsrtp's replay_old: a window or more behind
        ours.protect_view(_packet(1999 - srtp.REPLAY_WINDOW, rng))
    ours.protect_view(_packet(2000 - srtp.REPLAY_WINDOW, rng))  # just inside the window
    stream = _srtp_gcm.GcmStream(SSRC, bytes(16), bytes(12), srtp.REPLAY_WINDOW)
    with pytest.raises(ValueError, match="error 13"):  # no_ctx: not this stream's SSRC
        srtp._protect(_srtp_gcm.PROTECT, stream.handle, _packet(1, rng, ssrc=SSRC + 1), bytearray(2048))
    header_with_extension = bytes([0x90, 96, 0, 1]) + bytes(4) + SSRC.to_bytes(4, "big") + b"\xbe\xde\x00\x09"
    with pytest.raises(ValueError, match="error 2"):  # bad_param: the extension runs past the end
        srtp._protect(_srtp_gcm.PROTECT, stream.handle, header_with_extension + bytes(8), bytearray(2048))


def test_keys_and_window_of_the_wrong_size_are_refused_when_the_stream_is_made() -> None:
    with pytest.raises(ValueError, match="16-byte session key"):
        _srtp_gcm.GcmStream(SSRC, bytes(32), bytes(12), 1024)
    with pytest.raises(ValueError, match="window"):
        _srtp_gcm.GcmStream(SSRC, bytes(16), bytes(12), 10)
    with pytest.raises(ValueError, match="32 bits"):
        _srtp_gcm.GcmStream(2**32, bytes(16), bytes(12), 1024)
