"""All calls of this node: joining, resuming within the grace period, leaving, and the p2p → SFU switch."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from huddle import outgoing
from huddle.calls.resume import RecordingClaim, ResumeClaims, ResumeKey, ResumeTokenError
from huddle.calls.room import ELSEWHERE, P2P, SFU, Outbox, Participant, Room, RoomFull
from huddle.logs import event
from huddle.permissions import Permissions

if TYPE_CHECKING:
    from huddle.sfu.router import Router

log = logging.getLogger("huddle.calls")

__all__ = ["Calls", "ResumeFailed", "RoomFull"]

# Participants who left here, so that their old resume tokens cannot seat them again on this node; bounded,
# oldest forgotten first (a token outlives this memory only on a node that restarted, see calls/resume.py).
DEPARTED_REMEMBERED = 65_536


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
        resume_key: ResumeKey,
        sfu_always: bool = False,
        router_factory: Callable[[Room], Router] | None = None,
    ) -> None:
        self.capacity = capacity
        self.resume_key = resume_key
        self.reconnect_grace = reconnect_grace
        self.sfu_always = sfu_always
        self._router_factory = router_factory
        self._rooms: dict[str, Room] = {}
        self._resumable: dict[str, tuple[Room, Participant]] = {}
        self._departed: OrderedDict[str, None] = OrderedDict()
        # Called with a room as its last participant leaves, before its Router closes (recordings stop).
        self.room_closed: list[Callable[[Room], None]] = []
        # Called when a call is rebuilt here from a token that says this recording was running in it, and
        # nothing records the call here: the recording goes on (it sets `room.recording` if it does).
        self.recording_restored: list[Callable[[Room, RecordingClaim], None]] = []
        # Called when another node of a call says it started or stopped recording it (`state` as `recording`
        # shows it, None when it stopped).
        self.recording_elsewhere: list[Callable[[Room, dict[str, Any] | None], None]] = []
        # Called with every chat message of a call, from this node or another (recordings keep them).
        self.chat_posted: list[Callable[[Room, dict[str, Any]], None]] = []
        # A call over several nodes: told of every change to the call's roster (a `participant` or `left`
        # message, see calls/span.py) with the node it came from (None: this one), to tell the others.
        self.roster_changed: list[Callable[[Room, dict[str, Any], str | None], None]] = []
        # Called when this node opens a room for participants its home node sent here (spill-over).
        self.room_spilled: list[Callable[[Room], None]] = []

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
        spilled: bool = False,
    ) -> tuple[Room, Participant]:
        """Seat a newcomer (`spilled`: sent here by the call's home node, which holds the rest of it)."""
        room = self._room(room_name, spilled)
        previous = room.by_identity(identity)
        if previous is not None:
            # The same person joining again (a second device, a reloaded tab): the newest wins.
            self._remove(room, previous, "replaced")
            previous.outbox.close(4002, "joined again from elsewhere")
        participant = Participant(
            identity=identity, name=name, outbox=outbox, permissions=permissions, expires=expires
        )
        self._seat(room, participant)
        self._arrived(room, participant, "participant joined", sfu=False)
        return room, participant

    def _room(self, name: str, spilled: bool) -> Room:
        room = self._rooms.get(name)
        if room is None:
            room = self._rooms[name] = Room(name, self.capacity, spilled=spilled)
            if spilled:
                for listener in self.room_spilled:
                    listener(room)
        return room

    def hub_room(self, name: str) -> Room:
        """The room of a call whose other nodes link to this one, its home (opened for them if need be): on
        the SFU, since its media crosses nodes."""
        room = self._room(name, spilled=False)
        self.move_to_sfu(room)
        return room

    def _arrived(self, room: Room, participant: Participant, what: str, *, sfu: bool) -> None:
        """Tell the others and connect the newcomer's media; `sfu`: its client was on the SFU already."""
        room.broadcast(outgoing.participant_joined(participant.describe()), exclude=participant)
        if room.mode == P2P and (room.size() > 2 or self.sfu_always or sfu or room.spilled or room.remote):
            self._switch_to_sfu(room, newcomer=participant)
        elif room.router is not None:
            room.router.add_peer(participant)
        self._tell_nodes(room, participant)
        size, mode = len(room), room.mode
        event(log, logging.INFO, what, room=room.name, participant=participant.id, size=size, mode=mode)

    def _tell_nodes(self, room: Room, participant: Participant, origin: str | None = None) -> None:
        message = {"t": "participant", "p": {**participant.describe(), "joined_at": participant.joined_at}}
        self._roster(room, message, origin)

    def _roster(self, room: Room, message: dict[str, Any], origin: str | None) -> None:
        for listener in self.roster_changed:
            listener(room, message, origin)

    def holds(self, token: str) -> bool:
        """This node seats the participant of this resume token now (it resumes here, wherever the call)."""
        return token in self._resumable

    def _seat(self, room: Room, participant: Participant) -> None:
        try:
            room.add(participant)
        except RoomFull:
            self._discard_if_empty(room)
            raise
        self._issue_resume_token(room, participant)

    def _issue_resume_token(self, room: Room, participant: Participant) -> None:
        self._resumable.pop(participant.resume_token, None)
        running = room.recording
        recording = None
        if running is not None and running.get("state") == "recording":
            recording = RecordingClaim(
                id=running["id"],
                outputs=tuple(running["outputs"]),
                started_at=running["started_at"],
                started_by=running["started_by"],
            )
        participant.resume_token = self.resume_key.issue(
            ResumeClaims(
                room=room.name,
                participant=participant.id,
                identity=participant.identity,
                name=participant.name,
                permissions=participant.permissions,
                expires=participant.expires,
                issued=time.time(),
                recording=recording,
            )
        )
        self._resumable[participant.resume_token] = (room, participant)

    def reissue_resume_tokens(self, room: Room) -> None:
        """Give everyone in the call a token that says what is recorded now (a recording started, stopped or
        went on here), so that whichever node rebuilds the call from their tokens knows it too."""
        for participant in room:
            if participant.connection != "connected":
                # Its socket is down, the message would be lost and its token with it; the `joined` that
                # answers its resume carries the new state.
                continue
            self._issue_resume_token(room, participant)
            participant.outbox.send(outgoing.resume_token(participant.resume_token))

    def check_resume(self, room_name: str, token: str) -> None:
        """Raise ResumeFailed unless some node of this deployment could take this token (a door checks it
        before sending the client on to the call's node)."""
        if token in self._resumable:
            return
        try:
            self.resume_key.verify(token, room_name, time.time())
        except ResumeTokenError as exc:
            raise ResumeFailed(room_name, expired=str(exc) == "expired") from None

    def resume(
        self, room_name: str, token: str, outbox: Outbox, mode: str | None = None, spilled: bool = False
    ) -> tuple[Room, Participant, bool]:
        """Give a participant whose signaling dropped a new connection, keeping everything else. The token is
        used up: the participant gets a new one (sent in `joined`), so a copy of the old one is worthless.

        A participant this node does not know (it restarted, or took over a dead node's calls) is seated again
        from the token's signed claims, with the same id: the third value is then True, and the client must
        set up its media with this node afresh. `mode` is the mode its client was in: a call that was on the
        SFU starts there again rather than flapping through p2p while its people come back one by one."""
        found = self._resumable.get(token)
        if found is None:
            return self._restore(room_name, token, outbox, mode, spilled)
        room, participant = found
        if room.name != room_name:
            raise ResumeFailed(room_name)
        if participant.expires is not None and time.time() >= participant.expires:
            raise ResumeFailed(room_name, expired=True)
        self._issue_resume_token(room, participant)
        if participant.grace_timer is not None:
            participant.grace_timer.cancel()
            participant.grace_timer = None
        old = participant.outbox
        participant.outbox = outbox
        if old is not outbox:
            old.close(4003, "resumed on another connection")
        if participant.connection != "connected":
            participant.connection = "connected"
            room.broadcast(outgoing.participant_updated(participant.describe()), exclude=participant)
            self._tell_nodes(room, participant)
        if room.router is not None:
            room.router.restart_ice(participant)
        event(log, logging.INFO, "participant resumed", room=room.name, participant=participant.id)
        return room, participant, False

    def _restore(
        self, room_name: str, token: str, outbox: Outbox, mode: str | None, spilled: bool
    ) -> tuple[Room, Participant, bool]:
        try:
            claims = self.resume_key.verify(token, room_name, time.time())
        except ResumeTokenError as exc:
            raise ResumeFailed(room_name, expired=str(exc) == "expired") from None
        room = self._rooms.get(room_name)
        if claims.participant in self._departed or (
            room is not None
            and (claims.participant in room.participants or room.by_identity(claims.identity) is not None)
        ):
            # Left here, already back with a newer token, or the same person joined afresh since.
            raise ResumeFailed(room_name)
        room = self._room(room_name, spilled)
        away = room.remote.pop(claims.participant, None)
        if away is not None:
            # Known here as on another node of the call, which it lost: from now on it is on this one.
            self._forget_remote(room, away)
        participant = Participant(
            identity=claims.identity,
            name=claims.name,
            outbox=outbox,
            permissions=claims.permissions,
            expires=claims.expires,
            id=claims.participant,
        )
        if claims.recording is not None and room.recording is None and len(room) < room.capacity:
            # Before seating the newcomer, so that its token (in `joined`) carries the recording as it goes on
            # here; those restored before it without one get a new token.
            for listener in self.recording_restored:
                try:
                    listener(room, claims.recording)
                except Exception:  # the participant comes back whatever becomes of the recording
                    log.exception("recording_restored listener failed", extra={"fields": {"room": room.name}})
            if room.recording is not None:
                self.reissue_resume_tokens(room)
        try:
            self._seat(room, participant)
        except RoomFull:
            raise ResumeFailed(room_name) from None
        self._arrived(room, participant, "participant restored", sfu=mode == SFU)
        return room, participant, True

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
        room.broadcast(outgoing.mode(SFU), exclude=newcomer)
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
        room.broadcast(outgoing.participant_updated(participant.describe()), exclude=participant)
        self._tell_nodes(room, participant)
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
        self._departed[participant.id] = None
        if len(self._departed) > DEPARTED_REMEMBERED:
            self._departed.popitem(last=False)
        if room.router is not None:
            room.router.remove_peer(participant)
        room.broadcast(outgoing.participant_left(participant.id, reason))
        self._roster(room, {"t": "left", "id": participant.id, "reason": reason}, None)
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

    def update_media(
        self,
        room: Room,
        participant: Participant,
        audio: bool | None,
        video: bool | None,
        screen: bool | None = None,
        screen_stream: str | None = None,
    ) -> None:
        """A participant muted or unmuted its microphone or camera, or began or stopped sharing its screen."""
        if audio is not None:
            participant.audio = audio
        if video is not None:
            participant.video = video
        if screen is not None:
            participant.screen = screen
        if not participant.screen:
            participant.screen_stream = None
        elif screen_stream is not None:
            participant.screen_stream = screen_stream
        room.broadcast(outgoing.participant_updated(participant.describe()))
        self._tell_nodes(room, participant)

    def post_chat(self, room: Room, participant: Participant, text: str) -> None:
        """A chat message from a participant of this node: to everyone in the call, on every node."""
        entry = {
            "id": "m_" + secrets.token_hex(6),
            "from": participant.id,
            "name": participant.name,
            "text": text,
            "at": round(time.time(), 3),
        }
        self._chat(room, entry, None)

    def remote_chat(self, room: Room, entry: dict[str, Any], origin: str) -> None:
        """A chat message posted on another node of the call."""
        fields = ("id", "from", "name", "text")
        strings = all(isinstance(entry.get(k), str) for k in fields)
        if not strings or not isinstance(entry.get("at"), int | float) or len(entry["text"]) > 4000:
            raise ValueError("bad chat message")
        if any(known["id"] == entry["id"] for known in room.chat):
            return
        self._chat(room, {k: entry[k] for k in (*fields, "at")}, origin)

    def _chat(self, room: Room, entry: dict[str, Any], origin: str | None) -> None:
        room.chat.append(entry)
        room.broadcast(outgoing.chat(entry))
        self._roster(room, {"t": "chat", "entry": entry}, origin)
        for listener in self.chat_posted:
            try:
                listener(room, entry)
            except Exception:
                log.exception("chat_posted listener failed", extra={"fields": {"room": room.name}})

    def raise_hand(self, room: Room, participant: Participant, raised: bool) -> None:
        if participant.hand == raised:
            return
        participant.hand = raised
        room.broadcast(outgoing.participant_updated(participant.describe()))
        self._tell_nodes(room, participant)

    def announce_recording(self, room: Room, state: dict[str, Any]) -> None:
        """A recording of the call started or stopped here (`state` as `recording` shows it): everyone hears
        it, on every node, and holds a resume token that says so."""
        room.broadcast(outgoing.recording(state))
        if room.recording is None:
            self.reissue_resume_tokens(room)
        self._roster(room, {"t": "recording", "state": state}, None)

    # -- The call's other nodes (calls/span.py tells of them) ----------------------------------------------

    def remote_recording(self, room: Room, state: dict[str, Any], origin: str) -> None:
        """Another node of the call records it, or stopped."""
        if not isinstance(state, dict) or not isinstance(state.get("state"), str):
            raise ValueError("bad recording state")
        room.recording = state if state["state"] == "recording" else None
        room.broadcast(outgoing.recording(state))
        self.reissue_resume_tokens(room)
        self._roster(room, {"t": "recording", "state": state}, origin)
        for listener in self.recording_elsewhere:
            try:
                listener(room, room.recording)
            except Exception:  # the call goes on whatever becomes of this node's part of the recording
                log.exception("recording_elsewhere listener failed", extra={"fields": {"room": room.name}})

    def remote_participant(self, room: Room, info: dict[str, Any], node: str) -> None:
        """A participant on node `node` (or reached through it) joined the call or changed."""
        pid = str(info["id"])
        if pid in room.participants:
            return  # it is here now: whatever the other node says of it is older
        fields = {
            "audio": bool(info.get("audio", True)),
            "video": bool(info.get("video", True)),
            "connection": "reconnecting" if info.get("connection") == "reconnecting" else "connected",
            "hand": bool(info.get("hand", False)),
            "screen": bool(info.get("screen", False)),
            "screen_stream": _stream_id(info.get("screen_stream")),
        }
        known = room.remote.get(pid)
        if known is None:
            if room.size() >= room.capacity:
                raise ValueError(f"room {room.name} is full")
            known = Participant(
                identity=str(info["identity"])[:128],
                name=str(info["name"])[:64],
                outbox=ELSEWHERE,
                id=pid,
                joined_at=float(info.get("joined_at") or time.time()),
                **fields,
            )
            room.remote[pid] = known
            room.node_of[pid] = node
            room.broadcast(outgoing.participant_joined(known.describe()))
        else:
            if known.grace_timer is not None:
                known.grace_timer.cancel()
                known.grace_timer = None
            for name, value in fields.items():
                setattr(known, name, value)
            if room.node_of.get(pid) != node and room.router is not None:
                room.router.remove_peer(known)  # back on another node: its tracks come through that one
            room.node_of[pid] = node
            room.broadcast(outgoing.participant_updated(known.describe()))
        if room.router is not None and node in room.router.pipes:
            room.router.add_peer(known, pipe=room.router.pipes[node])
        self._tell_nodes(room, known, origin=node)

    def remote_left(self, room: Room, participant_id: str, reason: str, origin: str | None) -> None:
        known = room.remote.pop(participant_id, None)
        if known is None:
            return
        self._forget_remote(room, known)
        room.broadcast(outgoing.participant_left(participant_id, reason))
        self._roster(room, {"t": "left", "id": participant_id, "reason": reason}, origin)
        self._discard_if_empty(room)

    def node_lost(self, room: Room, node: str) -> None:
        """The link to node `node` broke: the participants on it (or reached through it) are reconnecting,
        their tracks gone until they are back, on that node or another; gone for good after the grace."""
        loop = asyncio.get_running_loop()
        for pid, known in list(room.remote.items()):
            if room.node_of.get(pid) != node:
                continue
            if room.router is not None:
                room.router.remove_peer(known)
            if known.connection != "reconnecting":
                known.connection = "reconnecting"
                room.broadcast(outgoing.participant_updated(known.describe()))
                self._tell_nodes(room, known, origin=node)
            if known.grace_timer is None:
                known.grace_timer = loop.call_later(
                    self.reconnect_grace, self.remote_left, room, pid, "timeout", None
                )
        self._discard_if_empty(room)  # a home whose last other node left for good

    def _forget_remote(self, room: Room, known: Participant) -> None:
        if known.grace_timer is not None:
            known.grace_timer.cancel()
            known.grace_timer = None
        room.node_of.pop(known.id, None)
        if room.router is not None:
            room.router.remove_peer(known)

    def _discard_if_empty(self, room: Room) -> None:
        # A call's home stays open while other nodes hold some of it: it links them.
        if room.participants or (room.remote and not room.spilled):
            return
        if self._rooms.get(room.name) is room:
            del self._rooms[room.name]
            self._close(room)

    def _close(self, room: Room) -> None:
        """A room gone from this node: its listeners hear of it (recordings stop), then its Router ends."""
        for known in list(room.remote.values()):
            self._forget_remote(room, known)
        room.remote.clear()
        for listener in self.room_closed:
            try:
                listener(room)
            except Exception:  # the room must close whatever a listener does
                log.exception("room_closed listener failed", extra={"fields": {"room": room.name}})
        if room.router is not None:
            room.router.close()
            room.router = None

    def drop_all(self, code: int, reason: str) -> None:
        """Stop serving every call here without telling anyone that anyone left: the clients are closed with
        `code` and resume on whichever node serves their call next (this one restarted, or a standby)."""
        rooms = list(self._rooms.values())
        self._rooms.clear()
        self._resumable.clear()
        for room in rooms:
            for participant in room:
                if participant.grace_timer is not None:
                    participant.grace_timer.cancel()
                    participant.grace_timer = None
                room.remove(participant)
                participant.outbox.close(code, reason)
            self._close(room)
        if rooms:
            event(log, logging.INFO, "calls dropped", rooms=len(rooms), reason=reason)

    def rooms(self) -> dict[str, int]:
        """Room name -> participants here, for the cluster's view of this node."""
        return {name: len(room) for name, room in self._rooms.items()}


def _stream_id(value: Any) -> str | None:
    """A screen's stream id as another node of the call tells it (None when it is not a short string)."""
    return value if isinstance(value, str) and 0 < len(value) <= 64 else None
