"""Rooms and participants: the one place that knows who is in which call, and in which mode."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from huddle.permissions import Permissions

if TYPE_CHECKING:
    from huddle.sfu.router import Router

P2P = "p2p"
SFU = "sfu"
CHAT_HISTORY = 100  # messages a call keeps for late joiners (each at most 1,000 characters)


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
    hand: bool = False  # a raised hand
    screen: bool = False  # sharing a screen, window or tab
    # In a p2p call, the id of the sender's MediaStream that carries the screen (its peer tells it apart).
    screen_stream: str | None = None
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
            "hand": self.hand,
            "screen": self.screen,
            "screen_stream": self.screen_stream,
        }


class RoomFull(Exception):
    pass


class Elsewhere:
    """The outbox of a participant on another node of the call: its own node talks to it, never this one."""

    def send(self, message: Mapping[str, Any]) -> None:
        return None

    def close(self, code: int, reason: str) -> None:
        return None


ELSEWHERE = Elsewhere()


@dataclass(eq=False, slots=True)
class Room:
    name: str
    capacity: int
    # This node's participants. Insertion order is join order, which decides who offers to whom in p2p mode.
    participants: dict[str, Participant] = field(default_factory=dict)
    mode: str = P2P
    router: Router | None = None
    # The recording running in this call, as participants are told about it (None: not recorded).
    recording: dict[str, Any] | None = None
    # A call bigger than one node: the participants of its other nodes, and which node each is on.
    remote: dict[str, Participant] = field(default_factory=dict)
    node_of: dict[str, str] = field(default_factory=dict)
    # This node took some of the call's participants from its home node (the hub), which holds the rest.
    spilled: bool = False
    # The call's chat, oldest first, for late joiners (bounded: the oldest messages go first).
    chat: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=CHAT_HISTORY))

    def __len__(self) -> int:
        """Participants on this node (its share of the call: what its media costs here)."""
        return len(self.participants)

    def __iter__(self) -> Iterator[Participant]:
        """This node's participants: whom it sends messages to."""
        return iter(tuple(self.participants.values()))

    def everyone(self) -> list[Participant]:
        """Every participant of the call, on whichever node."""
        return [*self.participants.values(), *self.remote.values()]

    def size(self) -> int:
        return len(self.participants) + len(self.remote)

    def by_identity(self, identity: str) -> Participant | None:
        for p in self.participants.values():
            if p.identity == identity:
                return p
        return None

    def add(self, participant: Participant) -> None:
        if self.size() >= self.capacity:
            raise RoomFull(self.name)
        self.participants[participant.id] = participant

    def remove(self, participant: Participant) -> bool:
        return self.participants.pop(participant.id, None) is not None

    def broadcast(self, message: dict[str, Any], *, exclude: Participant | None = None) -> None:
        for p in self:
            if p is not exclude:
                p.outbox.send(message)
