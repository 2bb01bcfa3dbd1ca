"""ICE-lite (RFC 8445 §2.5), as a state machine with no I/O.

The SFU is the lite side: it never sends checks, it answers the client's. A check is a STUN Binding request
whose USERNAME is "<our ufrag>:<their ufrag>" and whose MESSAGE-INTEGRITY is keyed with our password. The
address a valid check comes from is a usable path; the one the client nominates (USE-CANDIDATE) is where we
send media. Consent freshness (RFC 7675) comes for free: browsers keep checking the nominated pair every few
seconds, so a pair with no valid check for 30 s has lost consent and the participant is gone.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from huddle.stun import message as stun

CONSENT_TIMEOUT = 30.0

Address = tuple[Any, ...]


def new_credentials() -> tuple[str, str]:
    """A fresh ufrag (≥ 4 chars) and password (≥ 22 chars), from the ice-char set (RFC 8839 §5.4)."""
    return secrets.token_hex(4), secrets.token_urlsafe(18).replace("-", "+").replace("_", "/")


def username_ufrag(request: stun.StunMessage) -> str | None:
    """Our ufrag, from the USERNAME of a check, to find whose transport it is for."""
    value = request.get(stun.USERNAME)
    if value is None:
        return None
    local, sep, _ = value.partition(b":")
    if not sep or not local:
        return None
    try:
        return local.decode("ascii")
    except UnicodeDecodeError:
        return None


@dataclass(slots=True)
class CheckResult:
    response: bytes | None  # what to send back to the address the check came from
    error: str | None  # why the check was refused (a metrics label), None when accepted
    nominated: bool = False


class IceLite:
    def __init__(self, ufrag: str, pwd: str, remote_ufrag: str | None = None) -> None:
        self.ufrag = ufrag
        self.pwd = pwd
        self.remote_ufrag = remote_ufrag
        self._key = pwd.encode()
        self.selected: Address | None = None
        self.last_consent: float | None = None
        # Addresses that passed a check; media from anywhere else is not ours.
        self.valid: set[Address] = set()

    def restart(self, ufrag: str, pwd: str, remote_ufrag: str | None) -> None:
        """ICE restart: new credentials; the old path keeps working until a new one is nominated."""
        self.ufrag, self.pwd, self.remote_ufrag = ufrag, pwd, remote_ufrag
        self._key = pwd.encode()

    def check(self, data: bytes, request: stun.StunMessage, addr: Address, now: float) -> CheckResult:
        if request.method != stun.BINDING or request.message_class != stun.MessageClass.REQUEST:
            return CheckResult(None, "not_binding_request")
        username = request.get(stun.USERNAME)
        expected_prefix = self.ufrag.encode() + b":"
        if username is None or not username.startswith(expected_prefix):
            return CheckResult(None, "unknown_username")
        if self.remote_ufrag is not None and username[len(expected_prefix) :] != self.remote_ufrag.encode():
            return CheckResult(None, "unknown_username")
        if request.get(stun.MESSAGE_INTEGRITY) is None or not stun.verify_integrity(data, self._key):
            return CheckResult(None, "bad_integrity")
        if stun.has_fingerprint(data) and not stun.verify_fingerprint(data):
            return CheckResult(None, "bad_fingerprint")
        if request.get(stun.ICE_CONTROLLING) is None:
            # We are lite, so the other side must be controlling (RFC 8445 §6.1.1); a controlled peer
            # would be another lite agent or a role conflict we cannot resolve.
            return CheckResult(None, "role_conflict")

        self.valid.add(addr)
        nominated = request.get(stun.USE_CANDIDATE) is not None
        if nominated or self.selected is None:
            self.selected = addr
        if addr == self.selected:
            self.last_consent = now
        host, port = addr[0], addr[1]
        if host.startswith("::ffff:"):
            host = host[7:]
        response = stun.StunMessage(
            stun.BINDING,
            stun.MessageClass.SUCCESS,
            request.transaction_id,
            [
                stun.Attribute(
                    stun.XOR_MAPPED_ADDRESS,
                    stun.encode_xor_mapped_address(host, port, request.transaction_id),
                )
            ],
        )
        return CheckResult(stun.encode(response, integrity_key=self._key, fingerprint=True), None, nominated)

    def consent_expired(self, now: float, started: float) -> bool:
        last = self.last_consent if self.last_consent is not None else started
        return now - last > CONSENT_TIMEOUT
