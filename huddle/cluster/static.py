"""Membership of a worker of `huddle serve --workers N`: a fixed set of active nodes, known from the start.

The workers share one public URL (the parent's), which routes `/ws?node=ID` to worker ID, so a worker knows
where each of its siblings is without asking anyone. What the siblings hold is the parent's business: it
answers `/api/cluster` itself from every worker's `/api/node`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from huddle.cluster.membership import NodeInfo
from huddle.cluster.placement import choose

__all__ = ["Workers"]


class Workers:
    """The Membership of one worker: every id in `ids` is an active node that serves its own slot."""

    def __init__(self, me: NodeInfo, ids: tuple[str, ...]) -> None:
        if me.id not in ids:
            raise ValueError(f"--node-id {me.id} is not one of --worker-ids {','.join(ids)}")
        self.self_id = me.id
        # Nobody else can take a worker's slot: the parent restarts the worker under the same id.
        self.epoch = 1
        self.ids = ids
        self._me = me
        self._others = {
            wid: NodeInfo(id=wid, url=me.url, media="", role="active", standby_for=None, serves=wid, rooms={})
            for wid in ids
            if wid != me.id
        }
        self.on_fenced: Callable[[str], None] = _ignore
        self.on_serving: Callable[[str], None] = _ignore

    async def start(self) -> None:
        self.on_serving(self.self_id)

    async def stop(self) -> None:
        return None

    def nodes(self) -> list[NodeInfo]:
        return [self._me if wid == self.self_id else self._others[wid] for wid in self.ids]

    def me(self) -> NodeInfo:
        return self._me

    def serving(self) -> bool:
        return True

    async def owner(self, room: str) -> NodeInfo:
        wid = choose(room, self.ids)
        return self._me if wid == self.self_id or wid is None else self._others[wid]

    async def release(self, room: str) -> None:
        # Placement is a pure function of the room name and the fixed ids: nothing is recorded to forget.
        return None

    def report(self, rooms: dict[str, int]) -> None:
        self._me = replace(self._me, rooms=dict(rooms))

    def urls(self) -> set[str]:
        return {self._me.url}

    async def shared_secret(self) -> bytes | None:
        # Workers share the recordings folder, where the node keeps its key.
        return None


def _ignore(_: str) -> None:
    return None
