"""Who is in the cluster and which node serves a call: the interface a node builds on, and the single node.

A node serves a *slot* of the placement hashing (its own id, or the id of the dead active it took over from),
so calls placed on a slot move with it on a failover. The implementations: SingleNode here (no cluster),
Workers (cluster/static.py, `--workers N`) and ZooKeeperMembership (cluster/zookeeper.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

__all__ = ["ClusterError", "ClusterUnavailable", "Membership", "NodeInfo", "SingleNode"]


class ClusterError(Exception):
    """The node cannot take its place in the cluster (no ZooKeeper, duplicate id, ...): do not start."""


class ClusterUnavailable(Exception):
    """The cluster cannot place or look up a call right now (the message says why): retry."""


@dataclass(frozen=True, slots=True)
class NodeInfo:
    id: str
    # Public base URL, e.g. http://127.0.0.1:8081; its WebSocket is ws://127.0.0.1:8081/ws?node=ID.
    url: str
    # "host:port" of the node's UDP media port.
    media: str
    role: str
    standby_for: str | None = None
    serves: str | None = None
    # Room name -> participants on this node, as last reported.
    rooms: dict[str, int] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """This node as /api/cluster shows it."""
        return {
            "id": self.id,
            "url": self.url,
            "media": self.media,
            "role": self.role,
            "standby_for": self.standby_for,
            "serves": self.serves,
            "rooms": sorted(self.rooms),
            "participants": sum(self.rooms.values()),
            "room_participants": dict(self.rooms),
        }


class Membership(Protocol):
    self_id: str
    # Fencing epoch of the slot this node serves (0 when it serves none): every takeover bumps it.
    epoch: int
    # Set by the node; both are called on the event loop. on_fenced: stop serving now (argument: why).
    on_fenced: Callable[[str], None]
    # on_serving: this node now serves the slot given as argument.
    on_serving: Callable[[str], None]

    async def start(self) -> None:
        """Take this node's place in the cluster; raises ClusterError with a message for the operator."""
        ...

    async def stop(self) -> None:
        """Graceful leave: give up the slot (its standby takes it at once) and deregister."""
        ...

    def nodes(self) -> list[NodeInfo]:
        """The live nodes, this one included (cached: no I/O)."""
        ...

    def me(self) -> NodeInfo: ...

    def serving(self) -> bool:
        """This node serves a slot now (active and not fenced)."""
        ...

    async def owner(self, room: str) -> NodeInfo:
        """The node that serves this room's slot, placing the room if it has no placement yet.

        Raises ClusterUnavailable when that cannot be known now (no ZooKeeper, a takeover that does not come).
        """
        ...

    async def release(self, room: str) -> None:
        """The room emptied on this node: forget its placement."""
        ...

    def report(self, rooms: dict[str, int]) -> None:
        """This node's rooms and participant counts changed (published with a short debounce)."""
        ...

    async def shared_secret(self) -> bytes | None:
        """Key material all nodes share (signs resume tokens without --secret); None: none to share."""
        ...

    def urls(self) -> set[str]:
        """The public URLs of every node seen in the cluster since this one started, dead ones included:
        pages they served reconnect here when they die."""
        ...


class SingleNode:
    """No cluster: this node serves every call, always."""

    def __init__(self, me: NodeInfo) -> None:
        self.self_id = me.id
        self.epoch = 1
        self._me = replace(me, role="active", standby_for=None, serves=me.id)
        self.on_fenced: Callable[[str], None] = _ignore
        self.on_serving: Callable[[str], None] = _ignore

    async def start(self) -> None:
        self.on_serving(self.self_id)

    async def stop(self) -> None:
        return None

    def nodes(self) -> list[NodeInfo]:
        return [self._me]

    def me(self) -> NodeInfo:
        return self._me

    def serving(self) -> bool:
        return True

    async def owner(self, room: str) -> NodeInfo:
        return self._me

    async def release(self, room: str) -> None:
        return None

    def report(self, rooms: dict[str, int]) -> None:
        self._me = replace(self._me, rooms=dict(rooms))

    async def shared_secret(self) -> bytes | None:
        return None

    def urls(self) -> set[str]:
        return {self._me.url}


def _ignore(_: str) -> None:
    return None
