"""What the SFU needs of a call and its members, and nothing more: it must not know rooms or signaling."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from huddle.permissions import Permissions


class Outbox(Protocol):
    """Where messages for one member go (its signaling connection, as the layer above decides)."""

    def send(self, message: Mapping[str, Any]) -> None: ...


class Member(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def permissions(self) -> Permissions: ...

    @property
    def joined_at(self) -> float: ...

    @property
    def outbox(self) -> Outbox: ...


class Call(Protocol):
    @property
    def name(self) -> str: ...

    def broadcast(self, message: dict[str, Any], *, exclude: Any = None) -> None: ...
