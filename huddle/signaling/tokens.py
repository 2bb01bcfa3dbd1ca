"""Join tokens: JWTs signed with HS256 that admit one identity to one room."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field

import jwt
from jwt.warnings import InsecureKeyLengthWarning

from huddle.permissions import OPEN_ROOM, PERMISSION_NAMES, Permissions

__all__ = ["OPEN_ROOM", "PERMISSION_NAMES", "Grant", "Permissions", "TokenError", "issue", "verify"]

ALGORITHM = "HS256"
DEFAULT_TTL = 6 * 3600
# RFC 7518 §3.2: an HS256 key should have at least as many bits as the hash.
RECOMMENDED_SECRET_BYTES = 32

# PyJWT would warn on every join with a short key; the node warns once at start instead (weak_secret).
warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)


def weak_secret(secret: str) -> bool:
    return len(secret.encode()) < RECOMMENDED_SECRET_BYTES


@dataclass(frozen=True, slots=True)
class Grant:
    room: str
    identity: str
    name: str
    permissions: Permissions = field(default_factory=Permissions)
    expires: float | None = None  # the token's `exp`: a resume after it is refused


class TokenError(Exception):
    """A token that admits nobody; `code` is the signaling error code to answer with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def issue(
    secret: str,
    *,
    room: str,
    identity: str,
    name: str | None = None,
    ttl: int = DEFAULT_TTL,
    permissions: Permissions | None = None,
    now: float | None = None,
) -> str:
    issued = int(time.time() if now is None else now)
    claims = {
        "room": room,
        "sub": identity,
        "name": name or identity,
        "permissions": (permissions or Permissions()).as_dict(),
        "iat": issued,
        "exp": issued + ttl,
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify(secret: str, token: str, room: str) -> Grant:
    """Check signature, expiry and room; raise TokenError naming what is wrong."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["exp", "sub", "room"]},
        )
    except jwt.ExpiredSignatureError:
        raise TokenError("token_expired", "this join link has expired; ask for a new one") from None
    except jwt.InvalidTokenError as exc:
        raise TokenError("unauthorized", f"invalid join token ({exc}); ask for a new join link") from None
    identity, token_room, name = claims.get("sub"), claims.get("room"), claims.get("name")
    if not isinstance(identity, str) or not identity or not isinstance(token_room, str):
        raise TokenError("unauthorized", "join token lacks a valid 'sub' or 'room' claim")
    if token_room != room:
        raise TokenError("wrong_room", f"this join link is for room '{token_room}', not '{room}'")
    permissions = _permissions(claims.get("permissions", {}))
    display = name.strip()[:64] if isinstance(name, str) and name.strip() else identity[:64]
    return Grant(
        room=room, identity=identity, name=display, permissions=permissions, expires=float(claims["exp"])
    )


def _permissions(raw: object) -> Permissions:
    """Only JSON booleans count: a signer that wrote "false" or 0 meant something, and guessing it wrong would
    grant what was withheld, so such a token admits nobody."""
    if not isinstance(raw, dict):
        raise TokenError("unauthorized", "join token's 'permissions' claim must be an object of booleans")
    granted = {}
    for key in PERMISSION_NAMES:
        if key not in raw:
            continue
        value = raw[key]
        if not isinstance(value, bool):
            raise TokenError(
                "unauthorized",
                f"join token's permission '{key}' must be true or false, not {json.dumps(value)[:20]}; "
                "ask for a new join link",
            )
        granted[key] = value
    return Permissions(**granted)
