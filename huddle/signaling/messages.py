"""Typed schemas of the signaling messages a client may send (docs/protocol.md, version 1).

Validation happens in `decode`, before anything acts on a message, and turns every problem into a
`ProtocolError` that carries the error code to answer with.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
)

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
# A subscribe answer mirrors the server's offer, one m-section per track the client receives: up to
# (room capacity - 1) x huddle.sfu.offer.MAX_TRACKS = 396 sections with the default capacity of 100. An
# answer as Chromium writes it takes 527 characters a section (209 kB for 396, test_offer_limits.py), 6.5 %
# more once JSON-escaped; these limits leave room for that and stay within the WebSocket frame limit
# (signaling.app: 4 x MAX_MESSAGE_BYTES).
MAX_ANSWER_SDP = 240_000
MAX_ANSWER_MESSAGE_BYTES = 4 * MAX_MESSAGE_BYTES
ROOM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

RequestId = Annotated[str, StringConstraints(min_length=1, max_length=64)] | int
ParticipantId = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class ProtocolError(Exception):
    def __init__(self, code: str, message: str, request_id: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


class _Message(BaseModel):
    # Strict: "true" is not a boolean and "1" is not a number. Unknown fields are ignored so that newer
    # clients still talk to this server.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    v: Literal[1] | None = None
    id: RequestId | None = None


class Join(_Message):
    type: Literal["join"]
    room: Annotated[str, StringConstraints(max_length=256)]
    name: Annotated[str, StringConstraints(max_length=256)] | None = None
    token: Annotated[str, StringConstraints(max_length=8192)] | None = None
    resume: Annotated[str, StringConstraints(min_length=1, max_length=2048)] | None = None
    # With `resume`: the mode the client was in (a node rebuilding the call starts it there).
    mode: Literal["p2p", "sfu"] | None = None
    # From a `redirect` of the call's home node: seat the joiner here, where the call spills over to.
    ticket: Annotated[str, StringConstraints(min_length=1, max_length=512)] | None = None


class Leave(_Message):
    type: Literal["leave"]


class Offer(_Message):
    type: Literal["offer"]
    to: ParticipantId
    sdp: Annotated[str, StringConstraints(min_length=1, max_length=60_000)]


class Answer(_Message):
    type: Literal["answer"]
    to: ParticipantId
    sdp: Annotated[str, StringConstraints(min_length=1, max_length=60_000)]


class CandidateInit(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    candidate: Annotated[str, StringConstraints(max_length=1024)]
    sdpMid: Annotated[str, StringConstraints(max_length=64)] | None = None
    sdpMLineIndex: Annotated[int, Field(ge=0, le=1024)] | None = None
    usernameFragment: Annotated[str, StringConstraints(max_length=256)] | None = None


class Candidate(_Message):
    type: Literal["candidate"]
    to: ParticipantId
    candidate: CandidateInit | None


# A MediaStream id as browsers make them (a UUID, in braces for Firefox): visible ASCII only, since the
# other participants' pages compare it with their remote streams' ids and show nothing of it.
StreamId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$")]


class Media(_Message):
    type: Literal["media"]
    audio: bool | None = None
    video: bool | None = None
    screen: bool | None = None
    # With `screen: true` in a p2p call: which of the sender's streams is the screen (relayed as is).
    screen_stream: StreamId | None = None


# What a publish offer's m-section carries besides the camera and the microphone.
ScreenSource = Literal["screen", "screen_audio"]
Mid = Annotated[str, StringConstraints(min_length=1, max_length=32)]


class SfuOffer(_Message):
    type: Literal["sfu_offer"]
    pc: Literal["publish"]
    sdp: Annotated[str, StringConstraints(min_length=1, max_length=60_000)]
    # mid → source for the sections that carry a screen share; the others are the camera and microphone.
    sources: Annotated[dict[Mid, ScreenSource], Field(max_length=2)] | None = None

    @field_validator("sources")
    @classmethod
    def _one_of_each(cls, sources: dict[str, str] | None) -> dict[str, str] | None:
        if sources is not None and len(set(sources.values())) != len(sources):
            raise ValueError("at most one 'screen' and one 'screen_audio' section")
        return sources


class SfuAnswer(_Message):
    type: Literal["sfu_answer"]
    pc: Literal["subscribe"]
    sdp: Annotated[str, StringConstraints(min_length=1, max_length=MAX_ANSWER_SDP)]
    revision: Annotated[int, Field(ge=0)]


# [width, height] in device pixels; a JSON array, which strict validation does not take for a tuple.
Size = Annotated[list[Annotated[int, Field(ge=0, le=16384)]], Field(min_length=2, max_length=2)]


class VideoSizes(_Message):
    type: Literal["video_sizes"]
    sizes: Annotated[dict[ParticipantId, Size], Field(max_length=1000)]


class Ping(_Message):
    type: Literal["ping"]


class StartRecording(_Message):
    type: Literal["start_recording"]
    # Both when absent: the speaker-view MP4 and a file per track.
    outputs: Annotated[list[Literal["composite", "tracks"]], Field(min_length=1, max_length=2)] | None = None


class StopRecording(_Message):
    type: Literal["stop_recording"]


MAX_CHAT_CHARS = 1000


class Chat(_Message):
    type: Literal["chat"]
    text: Annotated[str, StringConstraints(min_length=1, max_length=MAX_CHAT_CHARS)]


class Hand(_Message):
    type: Literal["hand"]
    raised: bool


ClientMessage = Annotated[
    Join
    | Leave
    | Offer
    | Answer
    | Candidate
    | Media
    | SfuOffer
    | SfuAnswer
    | VideoSizes
    | Ping
    | StartRecording
    | StopRecording
    | Chat
    | Hand,
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)
MESSAGE_TYPES = frozenset(
    {
        "join",
        "leave",
        "offer",
        "answer",
        "candidate",
        "media",
        "sfu_offer",
        "sfu_answer",
        "video_sizes",
        "ping",
        "start_recording",
        "stop_recording",
        "chat",
        "hand",
    }
)


def decode(text: str) -> ClientMessage:
    """Parse and validate one text frame. Raises ProtocolError with the code to answer with."""
    size = len(text) if len(text) > MAX_ANSWER_MESSAGE_BYTES else len(text.encode())
    if size > MAX_ANSWER_MESSAGE_BYTES:
        raise ProtocolError("too_large", f"message is over {MAX_ANSWER_MESSAGE_BYTES} bytes")
    large = size > MAX_MESSAGE_BYTES
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        if large:
            raise ProtocolError("too_large", f"message is over {MAX_MESSAGE_BYTES} bytes") from None
        raise ProtocolError("bad_json", "message is not valid JSON") from None
    if large and not (isinstance(raw, dict) and raw.get("type") == "sfu_answer"):
        raise ProtocolError("too_large", f"message is over {MAX_MESSAGE_BYTES} bytes (sfu_answer excepted)")
    if not isinstance(raw, dict):
        raise ProtocolError("bad_json", "message must be a JSON object")
    request_id = raw.get("id")
    if not (isinstance(request_id, int | str) and not isinstance(request_id, bool)):
        request_id = None
    elif isinstance(request_id, str) and not 1 <= len(request_id) <= 64:
        request_id = None
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("bad_message", "message needs a string field 'type'", request_id)
    if kind not in MESSAGE_TYPES:
        raise ProtocolError("unknown_type", f"unknown message type {kind[:40]!r}", request_id)
    if raw.get("v", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        raise ProtocolError(
            "unsupported_version", f"protocol version {PROTOCOL_VERSION} is the only one", request_id
        )
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"][1:]) or "message"
        raise ProtocolError("bad_message", f"{kind}: {where}: {first['msg']}", request_id) from None


def valid_room_name(name: str) -> bool:
    return ROOM_NAME.fullmatch(name) is not None


def clean_chat_text(text: str) -> str | None:
    """A chat message as shown to others (line breaks kept, other control characters and surrounding blanks
    removed), or None when nothing is left."""
    lines = ["".join(c for c in line if c.isprintable()).rstrip() for line in text.strip().splitlines()]
    cleaned = "\n".join(lines).strip()
    return cleaned or None


def clean_display_name(name: str | None) -> str | None:
    """The display name as shown to others, or None when it is not acceptable."""
    if name is None:
        return None
    name = " ".join(name.split())
    if not 1 <= len(name) <= 64 or not name.isprintable():
        return None
    return name
