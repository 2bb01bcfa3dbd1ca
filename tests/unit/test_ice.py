"""ICE-lite: connectivity checks built with huddle.stun, answered (or refused with the right reason),
nomination, consent freshness and ICE restart; generated and damaged messages never make `check` raise."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from huddle.rtc.ice import CONSENT_TIMEOUT, CheckResult, IceLite, new_credentials, username_ufrag
from huddle.stun import message as stun

LOCAL_UFRAG, LOCAL_PWD = "sfu1", "localpasswordlocalpassword"
REMOTE_UFRAG, REMOTE_PWD = "brw1", "remotepasswordremotepass"
TID = bytes(range(12))

CLIENT_V4 = ("192.0.2.10", 50000)
OTHER_V4 = ("198.51.100.7", 61000)
CLIENT_V6 = ("2001:db8::1", 50002, 0, 0)

REFUSALS = {
    "not_binding_request",
    "unknown_username",
    "bad_integrity",
    "bad_fingerprint",
    "role_conflict",
}


def request(
    *,
    username: bytes | None = f"{LOCAL_UFRAG}:{REMOTE_UFRAG}".encode(),
    key: bytes | None = LOCAL_PWD.encode(),
    role: int | None = stun.ICE_CONTROLLING,
    use_candidate: bool = False,
    fingerprint: bool = True,
    message_class: stun.MessageClass = stun.MessageClass.REQUEST,
    method: int = stun.BINDING,
    tid: bytes = TID,
) -> tuple[bytes, stun.StunMessage]:
    """A connectivity check as a browser sends it (RFC 8445 §7.1.1), and its parsed form."""
    attributes = []
    if username is not None:
        attributes.append(stun.Attribute(stun.USERNAME, username))
    if role is not None:
        attributes.append(stun.Attribute(role, (0x0123456789ABCDEF).to_bytes(8, "big")))  # tie-breaker
    attributes.append(stun.Attribute(stun.PRIORITY, struct.pack(">I", 0x6E7F1EFF)))
    if use_candidate:
        attributes.append(stun.Attribute(stun.USE_CANDIDATE, b""))
    msg = stun.StunMessage(method, message_class, tid, attributes)
    data = stun.encode(msg, integrity_key=key, fingerprint=fingerprint)
    return data, stun.parse(data)


def agent(remote_ufrag: str | None = REMOTE_UFRAG) -> IceLite:
    return IceLite(LOCAL_UFRAG, LOCAL_PWD, remote_ufrag)


def assert_refused(result: CheckResult, reason: str) -> None:
    assert result.error == reason
    assert result.response is None
    assert result.nominated is False


# --- the answer ---------------------------------------------------------------------------------------------


def test_new_credentials_fit_ice_char_rules():
    ufrag, pwd = new_credentials()
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/")
    assert len(ufrag) >= 4 and len(pwd) >= 22
    assert set(ufrag) <= allowed and set(pwd) <= allowed
    assert new_credentials() != (ufrag, pwd)


@pytest.mark.parametrize(
    ("addr", "mapped"),
    [
        (CLIENT_V4, CLIENT_V4),
        (CLIENT_V6, ("2001:db8::1", 50002)),
        # A dual-stack socket reports IPv4 peers as IPv4-mapped IPv6: the answer names the IPv4 address.
        (("::ffff:192.0.2.10", 50000, 0, 0), CLIENT_V4),
    ],
    ids=["ipv4", "ipv6", "ipv4-mapped"],
)
def test_valid_check_is_answered_with_signed_success_and_the_source_address(addr, mapped):
    ice = agent()
    data, msg = request()
    result = ice.check(data, msg, addr, now=1.0)
    assert result.error is None
    assert result.response is not None
    response = stun.parse(result.response)
    assert response.method == stun.BINDING
    assert response.message_class == stun.MessageClass.SUCCESS
    assert response.transaction_id == TID
    # Signed with OUR password (the one the browser learnt from our SDP), and fingerprinted.
    assert stun.verify_integrity(result.response, LOCAL_PWD.encode())
    assert not stun.verify_integrity(result.response, REMOTE_PWD.encode())
    assert stun.has_fingerprint(result.response) and stun.verify_fingerprint(result.response)
    value = response.get(stun.XOR_MAPPED_ADDRESS)
    assert value is not None
    assert stun.decode_xor_mapped_address(value, TID) == mapped
    assert addr in ice.valid


def test_use_candidate_selects_the_address_and_reports_nomination():
    ice = agent()
    ice.check(*request(), OTHER_V4, now=0.0)  # an earlier, unnominated check from another candidate
    data, msg = request(use_candidate=True)
    result = ice.check(data, msg, CLIENT_V4, now=1.0)
    assert result.error is None and result.nominated is True
    assert ice.selected == CLIENT_V4
    assert ice.valid == {CLIENT_V4, OTHER_V4}


def test_unnominated_check_does_not_move_an_existing_selection():
    ice = agent()
    ice.check(*request(use_candidate=True), CLIENT_V4, now=0.0)
    result = ice.check(*request(), OTHER_V4, now=1.0)
    assert result.error is None and result.nominated is False
    assert result.response is not None  # still answered: the browser is checking a backup pair
    assert ice.selected == CLIENT_V4


def test_later_nomination_of_another_address_moves_selected():
    # Path change (Wi-Fi → cellular) or an ICE restart: the browser nominates a new pair.
    ice = agent()
    ice.check(*request(use_candidate=True), CLIENT_V4, now=0.0)
    assert ice.selected == CLIENT_V4
    result = ice.check(*request(use_candidate=True), CLIENT_V6, now=5.0)
    assert result.nominated and ice.selected == CLIENT_V6
    ice.check(*request(use_candidate=True), CLIENT_V4, now=6.0)
    assert ice.selected == CLIENT_V4


def test_check_without_fingerprint_is_accepted():
    # FINGERPRINT is mandatory for ICE, but the integrity check already proves who sent it.
    result = agent().check(*request(fingerprint=False), CLIENT_V4, now=0.0)
    assert result.error is None


def test_any_remote_ufrag_is_accepted_before_the_answer_names_it():
    ice = agent(remote_ufrag=None)
    result = ice.check(*request(username=f"{LOCAL_UFRAG}:whoever".encode()), CLIENT_V4, now=0.0)
    assert result.error is None


# --- refusals -----------------------------------------------------------------------------------------------


def test_wrong_message_integrity_is_bad_integrity():
    ice = agent()
    assert_refused(ice.check(*request(key=b"not the password"), CLIENT_V4, 0.0), "bad_integrity")
    # Keyed with the browser's own password instead of ours: a classic mix-up.
    assert_refused(ice.check(*request(key=REMOTE_PWD.encode()), CLIENT_V4, 0.0), "bad_integrity")
    assert ice.selected is None and not ice.valid and ice.last_consent is None


def test_missing_message_integrity_is_refused():
    ice = agent()
    assert_refused(ice.check(*request(key=None), CLIENT_V4, 0.0), "bad_integrity")
    assert_refused(ice.check(*request(key=None, use_candidate=True), CLIENT_V4, 0.0), "bad_integrity")
    assert ice.selected is None and not ice.valid


def test_tampered_attribute_breaks_integrity():
    data, _ = request()
    # Flip a bit inside PRIORITY (covered by the HMAC), then refresh the FINGERPRINT so only integrity fails.
    at = data.index(struct.pack(">I", 0x6E7F1EFF))
    damaged = bytearray(data)
    damaged[at] ^= 0x01
    damaged[-4:] = struct.pack(">I", zlib.crc32(damaged[:-8]) ^ 0x5354554E)
    damaged = bytes(damaged)
    assert stun.verify_fingerprint(damaged)
    assert_refused(agent().check(damaged, stun.parse(damaged), CLIENT_V4, 0.0), "bad_integrity")


@pytest.mark.parametrize(
    "username",
    [
        b"nobody:" + REMOTE_UFRAG.encode(),  # another transport's (or no) ufrag
        LOCAL_UFRAG.encode() + b"x:" + REMOTE_UFRAG.encode(),  # ours as a prefix only
        LOCAL_UFRAG.encode() + b":someone-else",  # our ufrag, wrong remote ufrag
        LOCAL_UFRAG.encode() + b":",  # remote ufrag missing
        LOCAL_UFRAG.encode(),  # no colon at all
        REMOTE_UFRAG.encode() + b":" + LOCAL_UFRAG.encode(),  # swapped (the browser's own view)
        None,  # no USERNAME
    ],
    ids=["unknown-ufrag", "prefix", "wrong-remote", "empty-remote", "no-colon", "swapped", "absent"],
)
def test_unknown_username_is_refused(username):
    ice = agent()
    result = ice.check(*request(username=username, use_candidate=True), CLIENT_V4, 0.0)
    assert_refused(result, "unknown_username")
    assert ice.selected is None and not ice.valid


def test_controlled_peer_is_a_role_conflict():
    ice = agent()
    data, msg = request(role=stun.ICE_CONTROLLED, use_candidate=True)
    assert_refused(ice.check(data, msg, CLIENT_V4, 0.0), "role_conflict")
    assert_refused(ice.check(*request(role=None), CLIENT_V4, 0.0), "role_conflict")
    assert ice.selected is None and not ice.valid


@pytest.mark.parametrize(
    "message_class", [stun.MessageClass.SUCCESS, stun.MessageClass.ERROR, stun.MessageClass.INDICATION]
)
def test_response_or_indication_is_not_a_binding_request(message_class):
    ice = agent()
    result = ice.check(*request(message_class=message_class, use_candidate=True), CLIENT_V4, 0.0)
    assert_refused(result, "not_binding_request")
    assert ice.selected is None


def test_other_method_is_not_a_binding_request():
    assert_refused(agent().check(*request(method=0x003), CLIENT_V4, 0.0), "not_binding_request")


def test_bad_fingerprint_is_refused():
    data, _ = request(use_candidate=True)
    damaged = data[:-1] + bytes([data[-1] ^ 0xFF])  # the CRC itself: MESSAGE-INTEGRITY still verifies
    msg = stun.parse(damaged)
    assert stun.verify_integrity(damaged, LOCAL_PWD.encode())
    ice = agent()
    assert_refused(ice.check(damaged, msg, CLIENT_V4, 0.0), "bad_fingerprint")
    assert ice.selected is None and not ice.valid


# --- consent freshness (RFC 7675) ---------------------------------------------------------------------------


def test_consent_without_checks_lasts_thirty_seconds_from_start():
    ice = agent()
    assert CONSENT_TIMEOUT == 30.0
    assert not ice.consent_expired(100.0 + 29.0, started=100.0)
    assert ice.consent_expired(100.0 + 31.0, started=100.0)


def test_check_on_selected_address_refreshes_consent():
    ice = agent()
    ice.check(*request(use_candidate=True), CLIENT_V4, now=10.0)
    assert ice.last_consent == 10.0
    for t in (25.0, 50.0, 75.0):  # browsers re-check the nominated pair every few seconds
        ice.check(*request(), CLIENT_V4, now=t)
    assert ice.last_consent == 75.0
    assert not ice.consent_expired(75.0 + 29.0, started=0.0)
    assert ice.consent_expired(75.0 + 31.0, started=0.0)


def test_checks_on_other_addresses_do_not_refresh_consent():
    ice = agent()
    ice.check(*request(use_candidate=True), CLIENT_V4, now=0.0)
    ice.check(*request(), OTHER_V4, now=20.0)  # a backup pair is alive; the media path is not
    assert ice.last_consent == 0.0
    assert ice.consent_expired(31.0, started=0.0)


def test_refused_checks_do_not_refresh_consent():
    ice = agent()
    ice.check(*request(use_candidate=True), CLIENT_V4, now=0.0)
    ice.check(*request(key=b"wrong"), CLIENT_V4, now=20.0)
    assert ice.consent_expired(31.0, started=0.0)


# --- ICE restart --------------------------------------------------------------------------------------------


def test_restart_switches_credentials_and_refuses_the_old_ones():
    ice = agent()
    ice.check(*request(use_candidate=True), CLIENT_V4, now=0.0)
    new_ufrag, new_pwd = "sfu2", "anotherpasswordanotherpw"
    ice.restart(new_ufrag, new_pwd, "brw2")
    assert (ice.ufrag, ice.pwd, ice.remote_ufrag) == (new_ufrag, new_pwd, "brw2")

    # The old credentials are refused from now on...
    assert_refused(ice.check(*request(), CLIENT_V4, 1.0), "unknown_username")
    old_pwd_new_user = request(username=b"sfu2:brw2", key=LOCAL_PWD.encode())
    assert_refused(ice.check(*old_pwd_new_user, CLIENT_V4, 1.0), "bad_integrity")
    old_remote = request(username=b"sfu2:" + REMOTE_UFRAG.encode(), key=new_pwd.encode())
    assert_refused(ice.check(*old_remote, CLIENT_V4, 1.0), "unknown_username")
    # ...while media keeps flowing on the old path until the browser nominates a new one.
    assert ice.selected == CLIENT_V4

    result = ice.check(*request(username=b"sfu2:brw2", key=new_pwd.encode()), OTHER_V4, 2.0)
    assert result.error is None and ice.selected == CLIENT_V4
    assert stun.verify_integrity(result.response, new_pwd.encode())
    assert not stun.verify_integrity(result.response, LOCAL_PWD.encode())
    result = ice.check(
        *request(username=b"sfu2:brw2", key=new_pwd.encode(), use_candidate=True), OTHER_V4, 3.0
    )
    assert result.nominated and ice.selected == OTHER_V4


# --- username_ufrag -----------------------------------------------------------------------------------------


def _msg(username: bytes | None) -> stun.StunMessage:
    attrs = [] if username is None else [stun.Attribute(stun.USERNAME, username)]
    return stun.StunMessage(stun.BINDING, stun.MessageClass.REQUEST, TID, attrs)


@pytest.mark.parametrize(
    ("username", "expected"),
    [
        (b"sfu1:brw1", "sfu1"),
        (b"sfu1:", "sfu1"),
        (b"sfu1:a:b", "sfu1"),
        (None, None),
        (b"", None),
        (b"sfu1", None),
        (b":brw1", None),
        ("été:brw1".encode(), None),
        (b"\xff\xfe:brw1", None),
    ],
    ids=[
        "normal",
        "empty-remote",
        "two-colons",
        "none",
        "empty",
        "no-colon",
        "empty-local",
        "utf8",
        "binary",
    ],
)
def test_username_ufrag(username, expected):
    assert username_ufrag(_msg(username)) == expected


# --- generated input ----------------------------------------------------------------------------------------

_ATTR_TYPES = st.sampled_from(
    [
        stun.USERNAME,
        stun.ICE_CONTROLLING,
        stun.ICE_CONTROLLED,
        stun.USE_CANDIDATE,
        stun.PRIORITY,
        stun.XOR_MAPPED_ADDRESS,
        stun.SOFTWARE,
        0x7FFF,
        0xC001,
    ]
)
_USERNAMES = st.one_of(
    st.just(f"{LOCAL_UFRAG}:{REMOTE_UFRAG}".encode()),
    st.just(f"{LOCAL_UFRAG}:".encode()),
    st.binary(max_size=24),
    st.text(max_size=12).map(str.encode),
)


@st.composite
def _messages(draw) -> bytes:
    attributes = []
    for attr_type in draw(st.lists(_ATTR_TYPES, max_size=6)):
        value = draw(_USERNAMES) if attr_type == stun.USERNAME else draw(st.binary(max_size=12))
        attributes.append(stun.Attribute(attr_type, value))
    msg = stun.StunMessage(
        draw(st.sampled_from([stun.BINDING, 0x003, 0x000, 0xFFF])),
        draw(st.sampled_from(list(stun.MessageClass))),
        draw(st.binary(min_size=12, max_size=12)),
        attributes,
    )
    key = draw(st.sampled_from([None, LOCAL_PWD.encode(), b"wrong"]))
    return stun.encode(msg, integrity_key=key, fingerprint=draw(st.booleans()))


def _check_never_raises(data: bytes, addr) -> None:
    try:
        msg = stun.parse(data)
    except stun.StunError:
        return
    ice = agent()
    result = ice.check(data, msg, addr, now=0.0)
    assert isinstance(result, CheckResult)
    if result.error is None:
        assert result.response is not None
        assert stun.verify_integrity(result.response, LOCAL_PWD.encode())
        assert ice.selected is not None
    else:
        assert result.error in REFUSALS and result.response is None
        assert ice.selected is None
    username_ufrag(msg)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_messages(), st.sampled_from([CLIENT_V4, CLIENT_V6]))
def test_check_never_raises_on_generated_messages(data, addr):
    _check_never_raises(data, addr)


_VALID, _ = request(use_candidate=True)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(-8, 8),
)
def test_check_never_raises_on_damaged_bytes(edits, cut):
    data = bytearray(_VALID)
    for at, value in edits:
        data[at] = value
    if cut < 0:
        del data[cut:]
    elif cut > 0:
        data += bytes(cut)
    _check_never_raises(bytes(data), CLIENT_V4)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=20, max_size=80))
def test_check_never_raises_on_arbitrary_bytes(data):
    # Most of these are not STUN at all; give the rest a real header so that parse sometimes succeeds.
    framed = data[:2] + struct.pack(">H", len(data) - 20) + stun.MAGIC_COOKIE.to_bytes(4, "big") + data[8:]
    _check_never_raises(bytes(data), CLIENT_V4)
    _check_never_raises(bytes([framed[0] & 0x3F]) + framed[1:], CLIENT_V4)
