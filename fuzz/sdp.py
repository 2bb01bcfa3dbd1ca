"""SDP offers and answers from participants (huddle/rtc/sdp.py), as the SFU handles a publish offer.

Documented errors: `parse` raises SdpError only; `build_answer`, `bundle_extmap` and `check_answer` raise
SdpError or ValueError (signaling answers any ValueError with `bad_sdp`). Also checked: the promise that
`parse(serialize(x)) == x` for anything `parse` returned, and that every answer we build parses again.
"""

from __future__ import annotations

from huddle.rtc import sdp

MAX_LEN = 16384
_UFRAG = "fuzz"
_PWD = "0123456789abcdefghijklmn"
_FINGERPRINT = ":".join(["AB"] * 32)
_CANDIDATES = (
    sdp.Candidate.host("10.77.0.1", 40000),
    sdp.Candidate.host("10.77.0.1", 40000, transport="tcp"),
)


def one_input(data: bytes) -> None:
    try:
        desc = sdp.parse(data.decode("utf-8", "replace"))
    except sdp.SdpError:
        return
    if sdp.parse(sdp.serialize(desc)) != desc:
        raise AssertionError("parse(serialize(x)) differs from x")
    try:
        answer = sdp.build_answer(
            desc, ice_ufrag=_UFRAG, ice_pwd=_PWD, fingerprint_sha256=_FINGERPRINT, candidates=_CANDIDATES
        )
        sdp.bundle_extmap(answer)
        sdp.check_answer(answer, desc)
    except ValueError:
        return
    sdp.parse(sdp.serialize(answer))
