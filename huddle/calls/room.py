"""Rooms and participants: the one place that knows who is in which call, and in which mode."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from huddle.permissions import Permissions

if TYPE_CHECKING:
    from huddle.sfu.router import Router

P2P = "p2p"
SFU = "sfu"


class Outbox(Protocol):
    """Where messages for one participant go (its signaling connection)."""

    def send(self, message: Mapping[str, Any]) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


@dataclass(eq=False, slots=True)
class Participant:
    identity: str
    name: str
    outbox: Outbox
    permissions: Permissions = field(default_factory=Permissions)
    id: str = field(default_factory=lambda: "p_" + secrets.token_hex(4))
    # Signed by the calls registry as soon as it seats the participant (calls/resume.py).
    resume_token: str = ""
    # When the join token that admitted it expires (seconds since the epoch; None in open rooms): a resume
    # must not keep a seat that the invite no longer gives.
    expires: float | None = None
    audio: bool = True
    video: bool = True
    connection: str = "connected"  # or "reconnecting": signaling lost, within the grace period
    joined_at: float = field(default_factory=time.time)
    grace_timer: asyncio.TimerHandle | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "identity": self.identity,
            "name": self.name,
            "audio": self.audio,
            "video": self.video,
            "connection": self.connection,
        }


class RoomFull(Exception):
    pass


@dataclass(eq=False, slots=True)
class Room:
    name: str
    capacity: int
    # Insertion order is join order, which decides who offers to whom in p2p mode.
    participants: dict[str, Participant] = field(default_factory=dict)
    mode: str = P2P
    router: Router | None = None
    # The recording running in this call, as participants are told about it (None: not recorded).
    recording: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.participants)

    def __iter__(self) -> Iterator[Participant]:
        return iter(tuple(self.participants.values()))

    def by_identity(self, identity: str) -> Participant | None:
        for p in self.participants.values():
            if p.identity == identity:
                return p
        return None

    def add(self, participant: Participant) -> None:
        if len(self.participants) >= self.capacity:
            raise RoomFull(self.name)
        self.participants[participant.id] = participant

    def remove(self, participant: Participant) -> bool:
        return self.participants.pop(participant.id, None) is not None

    def broadcast(self, message: dict[str, Any], *, exclude: Participant | None = None) -> None:
        for p in self:
            if p is not exclude:
                p.outbox.send(message)
