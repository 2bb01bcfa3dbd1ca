"""Every message a server sends to a client, typed in one place (docs/protocol.md is their reference).

Below calls/, sfu/ and signaling/, which all speak to clients: each builds its messages here, so a field
renamed or forgotten is one edit and a type error, not a silent change of the protocol. They stay plain dicts
on the way out (JSON objects), and `request_id` adds the `id` of the request a message answers.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict


class Message(TypedDict):
    type: str
    id: NotRequired[Any]


def _answering(message: Any, request_id: Any) -> Any:
    if request_id is not None:
        message["id"] = request_id
    return message


class ParticipantMessage(Message):
    participant: dict[str, Any]


def participant_joined(participant: dict[str, Any]) -> ParticipantMessage:
    return {"type": "participant_joined", "participant": participant}


def participant_updated(participant: dict[str, Any]) -> ParticipantMessage:
    return {"type": "participant_updated", "participant": participant}


class ParticipantLeft(Message):
    reason: str


def participant_left(participant_id: str, reason: str) -> ParticipantLeft:
    return {"type": "participant_left", "id": participant_id, "reason": reason}


class Mode(Message):
    mode: Literal["p2p", "sfu"]


def mode(value: Literal["p2p", "sfu"]) -> Mode:
    return {"type": "mode", "mode": value}


class Chat(Message):
    message: dict[str, Any]


def chat(entry: dict[str, Any]) -> Chat:
    return {"type": "chat", "message": entry}


class Recording(Message):
    recording: dict[str, Any] | None


def recording(state: dict[str, Any] | None) -> Recording:
    return {"type": "recording", "recording": state}


class PublisherLayers(Message):
    active: list[str]


def publisher_layers(active: list[str]) -> PublisherLayers:
    return {"type": "publisher_layers", "active": active}


class SfuOffer(Message):
    pc: Literal["subscribe"]
    sdp: str
    revision: int


def sfu_offer(sdp: str, revision: int) -> SfuOffer:
    return {"type": "sfu_offer", "pc": "subscribe", "sdp": sdp, "revision": revision}


class SfuAnswer(Message):
    pc: Literal["publish"]
    sdp: str


def sfu_answer(sdp: str) -> SfuAnswer:
    return {"type": "sfu_answer", "pc": "publish", "sdp": sdp}


class ActiveSpeaker(Message):
    pass


def active_speaker(participant_id: str | None) -> ActiveSpeaker:
    return {"type": "active_speaker", "id": participant_id}


class Relayed(Message, total=False):
    sdp: str
    candidate: dict[str, Any] | None


def relayed(kind: Literal["offer", "answer", "candidate"], sender: str, payload: dict[str, Any]) -> Relayed:
    """A p2p offer, answer or candidate passed on from `sender` as it came."""
    return {"type": kind, "from": sender, **payload}  # type: ignore[typeddict-item]


class ResumeToken(Message):
    token: str


def resume_token(token: str) -> ResumeToken:
    """A newer resume token (what it says about the call changed, e.g. a recording started)."""
    return {"type": "resume_token", "token": token}


class Error(Message):
    code: str
    message: str


def error(code: str, text: str, request_id: Any = None) -> Error:
    return _answering({"type": "error", "code": code, "message": text}, request_id)


class Pong(Message):
    time: float


def pong(now: float, request_id: Any = None) -> Pong:
    return _answering({"type": "pong", "time": now}, request_id)


class Redirect(Message):
    url: str
    node: str
    ticket: NotRequired[str]


def redirect(url: str, node: str, request_id: Any = None, ticket: str | None = None) -> Redirect:
    message: dict[str, Any] = {"type": "redirect", "url": url, "node": node}
    if ticket is not None:
        message["ticket"] = ticket
    return _answering(message, request_id)


class Joined(Message):
    v: int
    self: dict[str, Any]
    room: str
    participants: list[dict[str, Any]]
    mode: str
    ice_servers: list[dict[str, Any]]
    permissions: dict[str, bool]
    resume_token: str
    reconnect_grace: float
    resumed: bool
    restored: bool
    doors: list[str]
    active_speaker: str | None
    recording: dict[str, Any] | None
    chat: list[dict[str, Any]]


def joined(
    request_id: Any,
    *,
    v: int,
    me: dict[str, Any],
    room: str,
    participants: list[dict[str, Any]],
    mode: str,
    ice_servers: list[dict[str, Any]],
    permissions: dict[str, bool],
    resume_token: str,
    reconnect_grace: float,
    resumed: bool,
    restored: bool,
    doors: list[str],
    active_speaker: str | None,
    recording: dict[str, Any] | None,
    chat: list[dict[str, Any]],
) -> Joined:
    message: Joined = {
        "type": "joined",
        "v": v,
        "self": me,
        "room": room,
        "participants": participants,
        "mode": mode,
        "ice_servers": ice_servers,
        "permissions": permissions,
        "resume_token": resume_token,
        "reconnect_grace": reconnect_grace,
        "resumed": resumed,
        "restored": restored,
        "doors": doors,
        "active_speaker": active_speaker,
        "recording": recording,
        "chat": chat,
    }
    return _answering(message, request_id)
