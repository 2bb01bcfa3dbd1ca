"""Rooms and participants: the one place that knows who is in which call."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from huddle.signaling.tokens import Permissions


class Outbox(Protocol):
    """Where messages for one participant go (its signaling connection)."""

    def send(self, message: dict[str, Any]) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


@dataclass(eq=False, slots=True)
class Participant:
    identity: str
    name: str
    outbox: Outbox
    permissions: Permissions = field(default_factory=Permissions)
    id: str = field(default_factory=lambda: "p_" + secrets.token_hex(4))
    audio: bool = True
    video: bool = True
    joined_at: float = field(default_factory=time.time)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "identity": self.identity,
            "name": self.name,
            "audio": self.audio,
            "video": self.video,
        }


class RoomFull(Exception):
    pass


@dataclass(eq=False, slots=True)
class Room:
    name: str
    capacity: int
    # Insertion order is join order, which decides who offers to whom.
    participants: dict[str, Participant] = field(default_factory=dict)
    mode: str = "p2p"

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


class Rooms:
    """All rooms of this node. A room exists while it has participants."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._rooms: dict[str, Room] = {}

    def __len__(self) -> int:
        return len(self._rooms)

    def get(self, name: str) -> Room | None:
        return self._rooms.get(name)

    def get_or_create(self, name: str) -> Room:
        room = self._rooms.get(name)
        if room is None:
            room = self._rooms[name] = Room(name, self.capacity)
        return room

    def discard_if_empty(self, room: Room) -> None:
        if not room.participants and self._rooms.get(room.name) is room:
            del self._rooms[room.name]

    def participant_count(self) -> int:
        return sum(len(r) for r in self._rooms.values())
