"""Resume tokens: what one node signs, every node of the deployment reads; nobody else makes or alters one."""

from __future__ import annotations

import dataclasses

import pytest

from huddle.calls.resume import OPEN_ROOM_TTL, ResumeClaims, ResumeKey, ResumeTokenError
from huddle.permissions import Permissions

NOW = 1_800_000_000.0
CLAIMS = ResumeClaims(
    room="board",
    participant="p_1234abcd",
    identity="ada",
    name="Ada Lovelace",
    permissions=Permissions(publish=False, record=True),
    expires=NOW + 600,
    issued=NOW,
)


def test_another_node_with_the_same_secret_reads_the_claims() -> None:
    token = ResumeKey.from_secret("the deployment's secret").issue(CLAIMS)
    assert ResumeKey.from_secret("the deployment's secret").verify(token, "board", NOW + 1) == CLAIMS


def test_each_token_is_different_even_for_the_same_claims() -> None:
    key = ResumeKey(b"k" * 32)
    assert key.issue(CLAIMS) != key.issue(CLAIMS)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # signature
        lambda t: "e" + t[1:] if t[0] != "e" else "f" + t[1:],  # claims
        lambda t: t.replace(".", ""),
        lambda t: t + "." + t,
        lambda t: "x" * 3000,
        lambda t: "",
        lambda t: "%%%." + t.split(".")[1],
    ],
)
def test_an_altered_or_malformed_token_is_refused(tamper) -> None:
    key = ResumeKey(b"k" * 32)
    with pytest.raises(ResumeTokenError):
        key.verify(tamper(key.issue(CLAIMS)), "board", NOW)


def test_another_deployment_and_the_join_secret_itself_do_not_verify() -> None:
    token = ResumeKey.from_secret("one").issue(CLAIMS)
    with pytest.raises(ResumeTokenError, match="not signed"):
        ResumeKey.from_secret("two").verify(token, "board", NOW)
    # The resume key is derived from the secret, never the secret itself: a JWT signer cannot mint these.
    with pytest.raises(ResumeTokenError, match="not signed"):
        ResumeKey(b"one" * 8).verify(ResumeKey.from_secret("one" * 8).issue(CLAIMS), "board", NOW)


def test_a_token_is_for_its_room_and_its_time() -> None:
    key = ResumeKey(b"k" * 32)
    token = key.issue(CLAIMS)
    with pytest.raises(ResumeTokenError, match="another room"):
        key.verify(token, "other", NOW)
    with pytest.raises(ResumeTokenError, match="expired"):
        key.verify(token, "board", NOW + 600)
    open_room = key.issue(dataclasses.replace(CLAIMS, expires=None))
    assert key.verify(open_room, "board", NOW + OPEN_ROOM_TTL - 1).expires is None
    with pytest.raises(ResumeTokenError, match="expired"):
        key.verify(open_room, "board", NOW + OPEN_ROOM_TTL)
