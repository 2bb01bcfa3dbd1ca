"""TURN long-term credentials in the common time-limited form ("TURN REST API", coturn's `use-auth-secret`).

The username is `<expiry unix time>:<identity>` and the password base64(HMAC-SHA1(secret, username)): the
signaling server hands both to a joined participant, and the TURN server checks them with the same secret,
with nothing stored per user. MESSAGE-INTEGRITY then uses the long-term key MD5(username:realm:password)
(RFC 8489 9.2.2).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

__all__ = ["REALM", "TurnAccess", "expired", "issue", "long_term_key", "password"]

REALM = "huddle"
# A participant's credentials last a day: allocations are refreshed with them for the whole call, and a
# client that resumes (or rejoins) gets new ones.
DEFAULT_TTL = 24 * 3600.0


def password(secret: bytes, username: str) -> str:
    return base64.b64encode(hmac.new(secret, username.encode(), hashlib.sha1).digest()).decode()


def issue(secret: bytes, identity: str, now: float, ttl: float) -> tuple[str, str]:
    """(username, password) valid until now + ttl. `identity` names the user in quotas and logs; a colon in
    it is kept (only the first one separates the expiry)."""
    username = f"{int(now + ttl)}:{identity}"
    return username, password(secret, username)


def expired(username: str, now: float) -> bool:
    """True when the username's expiry has passed, or it has no expiry at all (not one we issued)."""
    expiry, colon, _ = username.partition(":")
    if not colon or not expiry.isdigit() or len(expiry) > 12:
        return True
    return int(expiry) <= now


def long_term_key(username: str, realm: str, secret: bytes) -> bytes:
    """The MESSAGE-INTEGRITY key for a time-limited username."""
    return hashlib.md5(f"{username}:{realm}:{password(secret, username)}".encode()).digest()


@dataclass(frozen=True, slots=True)
class TurnAccess:
    """What signaling hands a joined participant to reach this node's relay: `ice_server(...)` is one entry
    of `ice_servers` (RTCIceServer: URLs for UDP, TCP and, when configured, TLS, with credentials)."""

    secret: bytes
    port: int  # UDP and TCP: the STUN port
    tls_port: int | None = None
    ttl: float = DEFAULT_TTL

    def ice_server(self, host: str, identity: str, now: float) -> dict[str, Any]:
        urls = [f"turn:{host}:{self.port}?transport=udp", f"turn:{host}:{self.port}?transport=tcp"]
        if self.tls_port is not None:
            urls.append(f"turns:{host}:{self.tls_port}?transport=tcp")
        username, credential = issue(self.secret, identity, now, self.ttl)
        return {"urls": urls, "username": username, "credential": credential}
