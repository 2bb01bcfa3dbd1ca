"""Resume tokens that any node of the cluster can verify: who a participant was, signed, kept by the client.

A node that dies takes its memory with it; the token lets the node that takes over (or the same one restarted)
seat the participant again with the same id, name and permissions. The format is ours, not a JWT: a join token
is a credential from the operator's systems, this one a receipt from Huddle to its own nodes, and keeping them
apart means neither can be replayed as the other.

    base64url(JSON claims) "." base64url(HMAC-SHA256(key, claims part))
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass

from huddle.permissions import PERMISSION_NAMES, Permissions

# The longest token a node issues: claims are bounded (names 64 characters, ids 64, a recording's id and
# outputs), so a longer one is junk.
MAX_TOKEN_CHARS = 2048
# A token of an open room (no join token to expire with) stops seating anyone this long after it was issued:
# every resume issues a fresh one, so only a participant gone for so long loses the right.
OPEN_ROOM_TTL = 12 * 3600.0
_CONTEXT = b"huddle resume token v1"
# A placement ticket (a call's home node sends a joiner on to another node of the call) is good this long: the
# client uses it at once, so a stolen one is worth little.
TICKET_TTL = 30.0
_TICKET_CONTEXT = b"huddle placement ticket v1"


class ResumeTokenError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class RecordingClaim:
    """The recording running in the call when the token was issued: a node that rebuilds the call from its
    clients' tokens goes on with it (same id), since the node that made it may be gone."""

    id: str
    outputs: tuple[str, ...]
    started_at: float  # Unix time
    started_by: str


@dataclass(frozen=True, slots=True)
class ResumeClaims:
    room: str
    participant: str
    identity: str
    name: str
    permissions: Permissions
    # The join token's expiry (seconds since the epoch), or None in open rooms.
    expires: float | None
    issued: float
    recording: RecordingClaim | None = None


class ResumeKey:
    """Signs and verifies resume tokens. Every node of one deployment must hold the same key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("a resume key needs at least 16 bytes")
        self._key = key

    @classmethod
    def from_secret(cls, secret: str) -> ResumeKey:
        # Never the join tokens' secret itself: a resume token must not verify as a JWT, nor the reverse.
        return cls(hmac.new(secret.encode(), _CONTEXT, hashlib.sha256).digest())

    def issue(self, claims: ResumeClaims) -> str:
        body = {
            "r": claims.room,
            "p": claims.participant,
            "i": claims.identity,
            "n": claims.name,
            "g": [name for name in PERMISSION_NAMES if getattr(claims.permissions, name)],
            "x": claims.expires,
            "t": round(claims.issued, 3),
            # Two tokens issued in the same millisecond still differ, so "used once" is about one token.
            "k": secrets.token_hex(6),
        }
        if claims.recording is not None:
            rec = claims.recording
            body["rec"] = {"id": rec.id, "o": list(rec.outputs), "t": rec.started_at, "b": rec.started_by}
        part = _b64(json.dumps(body, separators=(",", ":")).encode())
        return part + "." + _b64(self._sign(part))

    def verify(self, token: str, room: str, now: float) -> ResumeClaims:
        """The claims of a token this deployment issued for `room`, or ResumeTokenError naming why not."""
        if len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
            raise ResumeTokenError("not a resume token")
        part, _, signature = token.partition(".")
        try:
            given = _unb64(signature)
        except ValueError:
            raise ResumeTokenError("not a resume token") from None
        if not hmac.compare_digest(given, self._sign(part)):
            raise ResumeTokenError("resume token not signed by this deployment")
        try:
            body = json.loads(_unb64(part))
            claims = ResumeClaims(
                room=_text(body["r"]),
                participant=_text(body["p"]),
                identity=_text(body["i"]),
                name=_text(body["n"]),
                permissions=Permissions(**{name: name in body["g"] for name in PERMISSION_NAMES}),
                expires=None if body["x"] is None else float(body["x"]),
                issued=float(body["t"]),
                recording=_recording(body.get("rec")),
            )
        except (ValueError, KeyError, TypeError):
            # Signed by us yet unreadable: only a key shared with something else could do that.
            raise ResumeTokenError("resume token unreadable") from None
        if claims.room != room:
            raise ResumeTokenError("resume token of another room")
        deadline = claims.expires if claims.expires is not None else claims.issued + OPEN_ROOM_TTL
        if now >= deadline:
            raise ResumeTokenError("expired")
        return claims

    def _sign(self, part: str, key: bytes | None = None) -> bytes:
        return hmac.new(key or self._key, part.encode(), hashlib.sha256).digest()

    def derive(self, label: bytes) -> bytes:
        """Key material for another purpose (a ticket, the pipes between nodes), never the key itself."""
        return hmac.new(self._key, label, hashlib.sha256).digest()

    def ticket(self, room: str, node: str, now: float) -> str:
        """What lets `node` seat a joiner of `room` although the call's home is another node."""
        part = _b64(json.dumps({"r": room, "n": node, "x": round(now + TICKET_TTL, 3)}).encode())
        return part + "." + _b64(self._sign(part, self.derive(_TICKET_CONTEXT)))

    def check_ticket(self, ticket: str, room: str, node: str, now: float) -> None:
        """Raise ResumeTokenError unless `ticket` sends a joiner of `room` to `node` and is still good."""
        part, dot, signature = ticket.partition(".")
        try:
            given = _unb64(signature)
            if not dot or not hmac.compare_digest(given, self._sign(part, self.derive(_TICKET_CONTEXT))):
                raise ValueError("unsigned")
            body = json.loads(_unb64(part))
            room_given, node_given, deadline = body["r"], body["n"], float(body["x"])
        except (ValueError, KeyError, TypeError):
            raise ResumeTokenError("not a placement ticket of this deployment") from None
        if room_given != room or node_given != node:
            raise ResumeTokenError("placement ticket for another call or node")
        if now >= deadline:
            raise ResumeTokenError("placement ticket expired")


def _recording(value: object) -> RecordingClaim | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value["o"], list):
        raise ValueError("not a recording")
    return RecordingClaim(
        id=_text(value["id"]),
        outputs=tuple(_text(output) for output in value["o"]),
        started_at=float(value["t"]),
        started_by=_text(value["b"]),
    )


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("not a string")
    return value


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("bad base64") from None
