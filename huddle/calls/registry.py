"""All calls of this node: joining, resuming within the grace period, leaving, and the p2p → SFU switch."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from huddle.calls.room import P2P, SFU, Outbox, Participant, Room, RoomFull, new_resume_token
from huddle.logs import event
from huddle.permissions import Permissions

if TYPE_CHECKING:
    from huddle.sfu.router import Router

log = logging.getLogger("huddle.calls")

__all__ = ["Calls", "ResumeFailed", "RoomFull"]


class ResumeFailed(Exception):
    """`expired`: the join token behind it has expired (else the resume token is unknown or used up)."""

    def __init__(self, room: str, *, expired: bool = False) -> None:
        super().__init__(room)
        self.expired = expired


class Calls:
    def __init__(
        self,
        *,
        capacity: int,
        reconnect_grace: float,
        sfu_always: bool = False,
        router_factory: Callable[[Room], Router] | None = None,
    ) -> None:
        self.capacity = capacity
        self.reconnect_grace = reconnect_grace
        self.sfu_always = sfu_always
        self._router_factory = router_factory
        self._rooms: dict[str, Room] = {}
        self._resumable: dict[str, tuple[Room, Participant]] = {}
        # Called with a room as its last participant leaves, before its Router closes (recordings stop).
        self.room_closed: list[Callable[[Room], None]] = []

    def __len__(self) -> int:
        return len(self._rooms)

    def get(self, name: str) -> Room | None:
        return self._rooms.get(name)

    def participant_count(self) -> int:
        return sum(len(r) for r in self._rooms.values())

    # -- Arriving -------------------------------------------------------------------------------------------

    def join(
        self,
        room_name: str,
        *,
        identity: str,
        name: str,
        permissions: Permissions,
        outbox: Outbox,
        expires: float | None = None,
    ) -> tuple[Room, Participant]:
        room = self._rooms.get(room_name)
        if room is None:
            room = self._rooms[room_name] = Room(room_name, self.capacity)
        previous = room.by_identity(identity)
        if previous is not None:
            # The same person joining again (a second device, a reloaded tab): the newest wins.
            self._remove(room, previous, "replaced")
            previous.outbox.close(4002, "joined again from elsewhere")
        participant = Participant(
            identity=identity, name=name, outbox=outbox, permissions=permissions, expires=expires
        )
        try:
            room.add(participant)
        except RoomFull:
            self._discard_if_empty(room)
            raise
        self._resumable[participant.resume_token] = (room, participant)
        room.broadcast(
            {"type": "participant_joined", "participant": participant.describe()}, exclude=participant
        )
        if room.mode == P2P and (len(room) > 2 or self.sfu_always):
            self._switch_to_sfu(room, newcomer=participant)
        elif room.router is not None:
            room.router.add_peer(participant)
        event(
            log,
            logging.INFO,
            "participant joined",
            room=room.name,
            participant=participant.id,
            size=len(room),
            mode=room.mode,
        )
        return room, participant

    def resume(self, room_name: str, token: str, outbox: Outbox) -> tuple[Room, Participant]:
        """Give a participant whose signaling dropped a new connection, keeping everything else. The token is
        used up: the participant gets a new one (sent in `joined`), so a copy of the old one is worthless."""
        found = self._resumable.get(token)
        if found is None or found[0].name != room_name:
            raise ResumeFailed(room_name)
        room, participant = found
        if participant.expires is not None and time.time() >= participant.expires:
            raise ResumeFailed(room_name, expired=True)
        del self._resumable[token]
        participant.resume_token = new_resume_token()
        self._resumable[participant.resume_token] = (room, participant)
        if participant.grace_timer is not None:
            participant.grace_timer.cancel()
            participant.grace_timer = None
        old = participant.outbox
        participant.outbox = outbox
        if old is not outbox:
            old.close(4003, "resumed on another connection")
        if participant.connection != "connected":
            participant.connection = "connected"
            room.broadcast(
                {"type": "participant_updated", "participant": participant.describe()}, exclude=participant
            )
        if room.router is not None:
            room.router.restart_ice(participant)
        event(log, logging.INFO, "participant resumed", room=room.name, participant=participant.id)
        return room, participant

    def leave_by_token(self, room_name: str, token: str) -> bool:
        """A page closed while reconnecting has no socket to say `leave` on, so it sends its resume token."""
        found = self._resumable.get(token)
        if found is None or found[0].name != room_name:
            return False
        room, participant = found
        self._remove(room, participant, "left")
        participant.outbox.close(1000, "left")
        return True

    def move_to_sfu(self, room: Room) -> Router | None:
        """Put a call on the SFU now (recording needs it), if it is not there yet."""
        if room.mode == P2P:
            self._switch_to_sfu(room, newcomer=None)
        return room.router

    def _switch_to_sfu(self, room: Room, newcomer: Participant | None) -> None:
        if self._router_factory is None:
            return
        room.mode = SFU
        room.router = self._router_factory(room)
        room.broadcast({"type": "mode", "mode": SFU}, exclude=newcomer)
        for p in room:
            room.router.add_peer(p)
        event(log, logging.INFO, "room moved to the SFU", room=room.name, size=len(room))

    # -- Leaving --------------------------------------------------------------------------------------------

    def leave(self, room: Room, participant: Participant, reason: str = "left") -> None:
        self._remove(room, participant, reason)

    def lost(self, room: Room, participant: Participant, outbox: Outbox) -> None:
        """The signaling connection `outbox` dropped without a word: hold the seat for the grace period."""
        if participant.outbox is not outbox or room.participants.get(participant.id) is not participant:
            return  # resumed on another connection already, or gone
        if self.reconnect_grace <= 0:
            self._remove(room, participant, "disconnected")
            return
        participant.connection = "reconnecting"
        room.broadcast(
            {"type": "participant_updated", "participant": participant.describe()}, exclude=participant
        )
        loop = asyncio.get_running_loop()
        participant.grace_timer = loop.call_later(
            self.reconnect_grace, self._remove, room, participant, "timeout"
        )

    def _remove(self, room: Room, participant: Participant, reason: str) -> None:
        if participant.grace_timer is not None:
            participant.grace_timer.cancel()
            participant.grace_timer = None
        self._resumable.pop(participant.resume_token, None)
        if not room.remove(participant):
            return
        if room.router is not None:
            room.router.remove_peer(participant)
        room.broadcast({"type": "participant_left", "id": participant.id, "reason": reason})
        event(
            log,
            logging.INFO,
            "participant left",
            room=room.name,
            participant=participant.id,
            reason=reason,
            size=len(room),
        )
        self._discard_if_empty(room)

    def remove_participant(self, participant_id: str, reason: str) -> None:
        """Remove wherever it is (the SFU calls this when a transport loses ICE consent)."""
        for room in self._rooms.values():
            participant = room.participants.get(participant_id)
            if participant is not None:
                self._remove(room, participant, reason)
                participant.outbox.close(4004, reason)
                return

    def _discard_if_empty(self, room: Room) -> None:
        if not room.participants and self._rooms.get(room.name) is room:
            del self._rooms[room.name]
            for listener in self.room_closed:
                try:
                    listener(room)
                except Exception:  # the room must close whatever a listener does
                    log.exception("room_closed listener failed", extra={"fields": {"room": room.name}})
            if room.router is not None:
                room.router.close()
                room.router = None

    def close(self) -> None:
        for room in list(self._rooms.values()):
            for participant in room:
                self._remove(room, participant, "shutdown")
