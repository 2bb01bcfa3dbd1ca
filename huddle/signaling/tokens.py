"""Join tokens: JWTs signed with HS256 that admit one identity to one room."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import jwt
from jwt.warnings import InsecureKeyLengthWarning

ALGORITHM = "HS256"
DEFAULT_TTL = 6 * 3600
# RFC 7518 §3.2: an HS256 key should have at least as many bits as the hash.
RECOMMENDED_SECRET_BYTES = 32

# PyJWT would warn on every join with a short key; the node warns once at start instead (weak_secret).
warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)


def weak_secret(secret: str) -> bool:
    return len(secret.encode()) < RECOMMENDED_SECRET_BYTES


@dataclass(frozen=True, slots=True)
class Permissions:
    publish: bool = True
    subscribe: bool = True
    record: bool = True

    def as_dict(self) -> dict[str, bool]:
        return {"publish": self.publish, "subscribe": self.subscribe, "record": self.record}


@dataclass(frozen=True, slots=True)
class Grant:
    room: str
    identity: str
    name: str
    permissions: Permissions = field(default_factory=Permissions)


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
    raw = claims.get("permissions") or {}
    if not isinstance(raw, dict):
        raise TokenError("unauthorized", "join token's 'permissions' claim must be an object")
    permissions = Permissions(**{k: bool(raw.get(k, True)) for k in ("publish", "subscribe", "record")})
    display = name.strip()[:64] if isinstance(name, str) and name.strip() else identity[:64]
    return Grant(room=room, identity=identity, name=display, permissions=permissions)
