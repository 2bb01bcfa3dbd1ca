"""What a participant may do in a call: below signaling, calls and the SFU, which all need to know it."""

from __future__ import annotations

from dataclasses import dataclass

PERMISSION_NAMES = ("publish", "subscribe", "record", "download")


@dataclass(frozen=True, slots=True)
class Permissions:
    """Taking part is granted unless a token says otherwise; what costs the node resources or exposes stored
    calls (recording, downloading) only when a token says so."""

    publish: bool = True
    subscribe: bool = True
    record: bool = False
    download: bool = False

    def as_dict(self) -> dict[str, bool]:
        return {name: getattr(self, name) for name in PERMISSION_NAMES}


# Everyone in an open room: whoever knows the room name may do all of it (the cap on recordings bounds it).
OPEN_ROOM = Permissions(record=True, download=True)
