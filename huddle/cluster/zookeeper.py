"""Membership through ZooKeeper (kazoo): live nodes, who serves which slot, sticky placement of calls.

Znodes under the chroot (default /huddle):
  /nodes/<id>          ephemeral, JSON NodeInfo of a live node (rewritten when its role or load changes)
  /slots/<slot>        persistent, JSON {"epoch": N, "node": ID}: fencing epoch, bumped by each new server
  /slots/<slot>/owner  ephemeral, data = the id of the node that serves the slot
  /rooms/<room>        persistent, JSON {"slot": S, "epoch": N}: where a call was placed, while it lives
  /resume-key          persistent, 32 random bytes: signs resume tokens when the nodes have no --secret

Threads: kazoo runs its own threads and calls watches and listeners there. Everything here that touches this
object's state runs on the asyncio loop: kazoo's callbacks only hop over with call_soon_threadsafe, and
requests use kazoo's *_async calls, whose results hop back the same way, so no request blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    BadVersionError,
    KazooException,
    NodeExistsError,
    NoNodeError,
    OperationTimeoutError,
)
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.states import ZnodeStat
from kazoo.recipe.watchers import ChildrenWatch, DataWatch
from kazoo.retry import KazooRetry

from huddle.cluster.membership import ClusterError, ClusterUnavailable, NodeInfo
from huddle.cluster.placement import choose
from huddle.logs import event

__all__ = ["ZooKeeperMembership", "parse_hosts"]

log = logging.getLogger("huddle.cluster")
# Kazoo warns on every failed reconnection attempt (several a second while ZooKeeper is away); this module
# logs the state changes that matter once each, so kazoo keeps to its errors.
_kazoo_log = logging.getLogger("huddle.cluster.kazoo")
_kazoo_log.setLevel(logging.ERROR)

DEFAULT_CHROOT = "/huddle"
# Load reports are coalesced: a call filling up rewrites the node's znode at most twice a second.
REPORT_DELAY = 0.5
# How often a start waits out a node znode left by this id's previous, dead process (kill -9 and restart).
REGISTER_POLL = 0.1
# ZooKeeper may end a session (and let a standby serve) one session timeout after it last heard from the
# client, never sooner: a node cut off stops serving at that point, less this margin for a busy loop's late
# timer. Counting from when kazoo reports the cut instead would drop every call on a ZooKeeper restart, whose
# reset connections are reported at once, although the session lives on.
FENCE_MARGIN = 0.05
# An idle node asks ZooKeeper something this often (in session timeouts), so that it knows how recently the
# server heard from it when the connection goes.
HEARTBEAT = 1 / 6
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def parse_hosts(hosts: str) -> tuple[str, str]:
    """`HOST:PORT[,HOST:PORT...][/chroot]` -> (servers, chroot without a trailing slash; '' for the root)."""
    servers, slash, chroot = hosts.strip().partition("/")
    if not servers or any(not part.strip() for part in servers.split(",")):
        raise ClusterError(f"--zookeeper {hosts!r}: expected HOST:PORT[,HOST:PORT...][/chroot]")
    return servers, ("/" + chroot).rstrip("/") if slash else DEFAULT_CHROOT


@dataclass(frozen=True, slots=True)
class _Placement:
    slot: str
    epoch: int


class ZooKeeperMembership:
    """A node's place in a ZooKeeper cluster: an active serving its own slot, or a standby waiting for one."""

    def __init__(
        self,
        hosts: str,
        *,
        me: NodeInfo,
        standby_for: str | None,
        session_timeout: float,
        count_error: Callable[[str], None],
    ) -> None:
        self.self_id = me.id
        self.epoch = 0
        self.on_fenced: Callable[[str], None] = _ignore
        self.on_serving: Callable[[str], None] = _ignore
        self._servers, root = parse_hosts(hosts)
        self._nodes_path = f"{root}/nodes"
        self._slots_path = f"{root}/slots"
        self._rooms_path = f"{root}/rooms"
        # Pages loaded from a node that died resume here: its origin stays a cluster origin.
        self._seen_urls: set[str] = {me.url}
        self._key_path = f"{root}/resume-key"
        self._url = me.url
        self._media = me.media
        self._rooms = dict(me.rooms)
        self._standby_for = standby_for
        # The slot this node serves or waits for: its own as an active, the active's as a standby.
        self._target = standby_for or me.id
        self._timeout = session_timeout
        self._count_error = count_error

        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: KazooClient | None = None
        self._session: int | None = None
        self._connected = False
        # This session has this node's znode: a claim needs it (a duplicate id must not take a slot).
        self._registered = False
        self._started = False
        self._closed = False
        # The slot whose owner znode this session holds, and whether it serves it now: a node cut off from
        # ZooKeeper stops serving (fenced) before its session may end, yet holds the znode until it does.
        self._slot: str | None = None
        self._slot_epoch = 0
        self._serving = False
        self._claim_lock = asyncio.Lock()
        self._fence_timer: asyncio.TimerHandle | None = None
        # time.monotonic() at which the last request that ZooKeeper answered was sent: the server heard from
        # this session after it, so the session lasts at least a session timeout beyond.
        self._heard = 0.0
        self._report_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Live nodes as their znodes say (other than this one), kept by watches.
        self._nodes: dict[str, NodeInfo] = {}
        # Node znodes with a DataWatch (touched on kazoo's thread only).
        self._watched: set[str] = set()
        # Znode path -> mzxid of the garbage last reported there: logged and counted once per version.
        self._bad: dict[str, int] = {}

    # ----- the Membership interface -----

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            client = KazooClient(
                hosts=self._servers,
                timeout=self._timeout,
                logger=_kazoo_log,
                # Reconnect soon after ZooKeeper comes back: a restart shorter than the fencing grace goes
                # unnoticed by the calls.
                connection_retry=KazooRetry(
                    max_tries=-1,
                    delay=0.05,
                    backoff=1.5,
                    max_jitter=0.05,
                    max_delay=max(0.1, self._timeout / 12),
                ),
            )
        except ValueError as error:
            raise ClusterError(f"--zookeeper {self._servers}: {error}") from None
        client.add_listener(self._on_state)
        self._client = client
        try:
            await asyncio.to_thread(client.start, self._timeout)
        except KazooTimeoutError:
            self._client = None
            raise ClusterError(
                f"cannot reach ZooKeeper at {self._servers} within {self._timeout:g} s"
            ) from None
        self._session = client.client_id[0]
        self._connected = True
        try:
            for path in (self._nodes_path, self._slots_path, self._rooms_path):
                await self._call(client.ensure_path_async, path)
            if self._standby_for is not None:
                await self._check_active(self._standby_for)
            await self._register()
            await asyncio.to_thread(self._watch)
            self._started = True
            self._spawn(self._heartbeat())
            await self._claim()
        except BaseException as error:
            self._closed = True
            await asyncio.to_thread(_close, client)
            if isinstance(error, KazooException):
                raise ClusterError(f"ZooKeeper at {self._servers} failed during start: {error!r}") from error
            raise
        event(
            log, logging.INFO, "cluster joined", node=self.self_id, serving=self._serving, slot=self._target
        )

    def urls(self) -> set[str]:
        return set(self._seen_urls)

    async def shared_secret(self) -> bytes:
        """Key material every node of this cluster reads alike: the first node to ask makes it."""
        client = self._require_client()
        with contextlib.suppress(NodeExistsError):
            await self._call(client.create_async, self._key_path, secrets.token_bytes(32))
        data, _ = await self._call(client.get_async, self._key_path)
        if len(data) < 16:
            raise ClusterError(f"ZooKeeper's {self._key_path} holds no key; delete it and a new one is made")
        return data

    async def stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        for timer in (self._fence_timer, self._report_timer):
            if timer is not None:
                timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        client = self._client
        if client is None:
            return
        slot, self._slot, self._serving, self.epoch = self._slot, None, False, 0
        if self._connected:
            # The owner znode first: the standby takes the slot now instead of after a session timeout.
            paths = ([f"{self._slots_path}/{slot}/owner"] if slot is not None else []) + [self._node_path]
            for path in paths:
                try:
                    await self._call(client.delete_async, path)
                except KazooException as error:
                    event(log, logging.DEBUG, "cluster leave: delete failed", path=path, error=repr(error))
        await asyncio.to_thread(_close, client)
        event(log, logging.INFO, "cluster left", node=self.self_id, slot=slot)

    def nodes(self) -> list[NodeInfo]:
        others = [info for node_id, info in self._nodes.items() if node_id != self.self_id]
        return sorted([self.me(), *others], key=lambda info: info.id)

    def me(self) -> NodeInfo:
        serving = self._serving
        return NodeInfo(
            id=self.self_id,
            url=self._url,
            media=self._media,
            role="active" if serving else "standby",
            standby_for=None if serving and self._standby_for is None else self._target,
            serves=self._slot if serving else None,
            rooms=dict(self._rooms),
        )

    def serving(self) -> bool:
        return self._serving

    async def owner(self, room: str) -> NodeInfo:
        client = self._client
        if client is None or not self._started or self._closed:
            raise ClusterUnavailable("this node is not in the cluster")
        loop = asyncio.get_running_loop()
        # A takeover ends at most a session timeout after the death, plus the standby's own steps.
        deadline = loop.time() + self._timeout + 2.0
        path = f"{self._rooms_path}/{room}"
        try:
            while True:
                if not self._connected:
                    raise ClusterUnavailable("no connection to ZooKeeper")
                if loop.time() > deadline:
                    raise ClusterUnavailable(f"call {room}: its node's standby has not taken over yet")
                try:
                    data, stat = await self._call(client.get_async, path)
                except NoNodeError:
                    data, stat = None, None
                placement = None if stat is None else self._placement(path, data, stat)
                if placement is None:
                    await self._place(room, stat)
                    continue
                node_id, watched = await self._slot_owner(placement.slot)
                if node_id is not None:
                    info = await self._node(node_id)
                    if info is not None:
                        return info
                    await asyncio.sleep(REGISTER_POLL)
                elif self._standby_waits(placement.slot):
                    await _wait(watched, max(0.0, min(0.5, deadline - loop.time())))
                else:
                    # Its node is gone and nobody stands by for it: the call starts afresh somewhere live.
                    await self._place(room, stat, dead=placement.slot)
        except KazooException as error:
            raise ClusterUnavailable(f"ZooKeeper: {type(error).__name__}") from error

    async def release(self, room: str) -> None:
        client = self._client
        if client is None or not self._serving or not self._connected:
            return
        path = f"{self._rooms_path}/{room}"
        try:
            data, stat = await self._call(client.get_async, path)
            placement = self._placement(path, data, stat)
            if placement is not None and placement.slot == self._slot:
                await self._call(client.delete_async, path, version=stat.version)
        except (NoNodeError, BadVersionError):
            # Gone already, or placed again meanwhile: either way not this node's record to remove.
            return
        except KazooException as error:
            event(log, logging.DEBUG, "release failed", room=room, error=repr(error))

    def report(self, rooms: dict[str, int]) -> None:
        self._rooms = dict(rooms)
        if self._loop is None or self._closed or self._report_timer is not None:
            return
        self._report_timer = self._loop.call_later(REPORT_DELAY, self._flush_report)

    # ----- joining: registration and the slot -----

    @property
    def _node_path(self) -> str:
        return f"{self._nodes_path}/{self.self_id}"

    async def _check_active(self, active: str) -> None:
        """Refuse to stand by for a standby: a chain of standbys would leave a slot without a server."""
        client = self._require_client()
        path = f"{self._nodes_path}/{active}"
        try:
            data, stat = await self._call(client.get_async, path)
        except NoNodeError:
            # The active may start after its standby, or be dead already: the slot is waited for either way.
            return
        info = self._node_info(path, active, data, stat)
        if info is not None and info.standby_for not in (None, info.id):
            raise ClusterError(
                f"--standby-for {active}: node {active} is itself a standby (for {info.standby_for}); "
                "a standby must follow an active node"
            )

    async def _register(self) -> None:
        """Create this node's znode; a live one with the same id stops the start after session timeout + 1 s.

        The wait lets a node killed and restarted at once replace its own previous znode, which ZooKeeper
        removes only when the dead process's session times out.
        """
        client = self._require_client()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout + 1.0
        while True:
            try:
                await self._call(client.create_async, self._node_path, self._encoded_me(), ephemeral=True)
                self._registered = True
                return
            except NodeExistsError:
                pass
            stat = await self._call(client.exists_async, self._node_path)
            if stat is not None and stat.ephemeralOwner == self._session:
                self._registered = True
                await self._publish()
                return
            if loop.time() >= deadline:
                raise ClusterError(
                    f"another live node has --node-id {self.self_id} (its znode {self._node_path} "
                    f"stayed for {self._timeout + 1.0:g} s)"
                )
            await asyncio.sleep(REGISTER_POLL)

    async def _claim(self) -> None:
        """Serve the target slot if nobody does: create its owner znode, then bump its fencing epoch."""
        async with self._claim_lock:
            client = self._client
            if client is None or self._closed or not self._started or not self._connected:
                return
            if self._slot is not None or not self._registered:
                return
            slot = self._target
            slot_path = f"{self._slots_path}/{slot}"
            owner_path = f"{slot_path}/owner"
            try:
                await self._call(client.create_async, slot_path, _json({"epoch": 0, "node": self.self_id}))
            except NodeExistsError:
                pass
            try:
                await self._call(client.create_async, owner_path, self.self_id.encode(), ephemeral=True)
            except NodeExistsError:
                try:
                    _, stat = await self._call(client.get_async, owner_path)
                except NoNodeError:
                    # Freed just now: the owner watch fires and claims again.
                    return
                # Held by this session already when an earlier claim was cut short before its epoch bump.
                if stat.ephemeralOwner != self._session:
                    await self._publish()
                    return
            epoch = await self._bump(slot_path)
            self._slot, self._slot_epoch, self._serving, self.epoch = slot, epoch, True, epoch
            # A standby taking over is worth a line in the log; an active taking its own slot at start is not.
            level = logging.INFO if slot == self.self_id else logging.WARNING
            event(log, level, "serving slot", node=self.self_id, slot=slot, epoch=epoch)
            await self._publish()
            self.on_serving(slot)

    async def _bump(self, slot_path: str) -> int:
        client = self._require_client()
        for _ in range(10):
            data, stat = await self._call(client.get_async, slot_path)
            epoch = self._epoch(slot_path, data, stat)
            # Every write of the slot znode is a bump, so its version never falls behind an epoch: garbage
            # there cannot take the epoch back to one that an earlier server already used.
            new = max(epoch, stat.version) + 1
            try:
                await self._call(
                    client.set_async,
                    slot_path,
                    _json({"epoch": new, "node": self.self_id}),
                    version=stat.version,
                )
            except BadVersionError:
                continue
            return new
        raise OperationTimeoutError(f"{slot_path}: the epoch kept changing under this node")

    async def _rejoin(self) -> None:
        """A new session after the old one ended: register again and take the slot if it is still free."""
        try:
            await self._register()
            await self._claim()
        except (ClusterError, KazooException) as error:
            event(log, logging.ERROR, "cluster rejoin failed, retrying", node=self.self_id, error=str(error))
            if self._loop is not None and not self._closed:
                self._loop.call_later(self._timeout, self._spawn_rejoin)

    def _spawn_rejoin(self) -> None:
        # Not connected: the next connection joins.
        if not self._closed and self._connected and not self._registered:
            self._spawn(self._rejoin())

    async def _resume(self, session: int) -> None:
        """The connection came back within the session after this node fenced itself: the slot is still
        its own unless the znode says otherwise, so it serves again."""
        client = self._require_client()
        slot = self._slot
        if slot is None or self._serving:
            return
        try:
            _, stat = await self._call(client.get_async, f"{self._slots_path}/{slot}/owner")
        except NoNodeError:
            stat = None
        except KazooException:
            return
        if self._closed or self._session != session or self._slot != slot or self._serving:
            return
        if stat is None or stat.ephemeralOwner != session:
            self._slot = None
            self._spawn(self._claim())
            return
        self._serving, self.epoch = True, self._slot_epoch
        event(log, logging.WARNING, "serving slot again", slot=slot, epoch=self.epoch)
        await self._publish()
        self.on_serving(slot)

    # ----- session state (called on the loop) -----

    def _on_state(self, state: KazooState) -> None:
        # Kazoo's connection thread: read the session now, act on the loop.
        client = self._client
        session = client.client_id[0] if client is not None and client.client_id else None
        self._hop(self._state_changed, state, session)

    def _state_changed(self, state: KazooState, session: int | None) -> None:
        if self._closed or not self._started:
            return
        if state == KazooState.SUSPENDED:
            self._connected = False
            event(log, logging.WARNING, "ZooKeeper connection lost", node=self.self_id, serving=self._serving)
            if self._serving and self._fence_timer is None:
                assert self._loop is not None
                self._fence_timer = self._loop.call_later(
                    max(0.0, self._heard + self._timeout - FENCE_MARGIN - time.monotonic()),
                    self._fence,
                    "lost ZooKeeper connection for too long",
                )
        elif state == KazooState.LOST:
            self._connected = False
            self._cancel_fence_timer()
            self._session = None
            self._registered = False
            self._fence("lost ZooKeeper session")
            self._slot = None
        elif state == KazooState.CONNECTED:
            self._connected = True
            self._cancel_fence_timer()
            if session != self._session:
                self._session = session
                self._registered = False
                self._slot = None
                event(log, logging.WARNING, "new ZooKeeper session: joining again", node=self.self_id)
                self._spawn(self._rejoin())
                return
            event(log, logging.INFO, "ZooKeeper connection back", node=self.self_id)
            # A report made while the connection was away, or lost on its way out, was dropped: the calls
            # that others list for this node must not stay stale until the next change of them.
            self.report(self._rooms)
            if not self._registered:
                self._spawn(self._rejoin())
            elif self._slot is None:
                self._spawn(self._claim())
            elif not self._serving and session is not None:
                self._spawn(self._resume(session))

    def _fence(self, why: str) -> None:
        self._cancel_fence_timer()
        if not self._serving:
            return
        self._serving, self.epoch = False, 0
        event(log, logging.ERROR, "fenced: stopped serving", node=self.self_id, slot=self._slot, why=why)
        self.on_fenced(why)

    def _cancel_fence_timer(self) -> None:
        if self._fence_timer is not None:
            self._fence_timer.cancel()
            self._fence_timer = None

    # ----- watches (set up on a worker thread; their callbacks hop to the loop) -----

    def _watch(self) -> None:
        client = self._require_client()
        ChildrenWatch(client, self._nodes_path, self._children_seen)
        DataWatch(client, f"{self._slots_path}/{self._target}/owner", self._target_owner_seen)

    def _children_seen(self, children: list[str]) -> None:
        client = self._client
        if client is None or self._closed:
            return
        for name in children:
            if name not in self._watched:
                self._watched.add(name)
                # Kept for the life of the client, also while the znode is away: a node that leaves and comes
                # back between two reads of the children still has a watch on its data.
                DataWatch(client, f"{self._nodes_path}/{name}", partial(self._node_seen, name))
        self._hop(self._children_changed, frozenset(children))

    def _node_seen(
        self, name: str, data: bytes | None, stat: ZnodeStat | None, _event: object = None
    ) -> None:
        self._hop(self._node_changed, name, data, stat)

    def _target_owner_seen(self, data: bytes | None, stat: ZnodeStat | None, _event: object = None) -> None:
        self._hop(self._target_owner_changed, stat)

    def _children_changed(self, children: frozenset[str]) -> None:
        for name in [name for name in self._nodes if name not in children]:
            del self._nodes[name]

    def _node_changed(self, name: str, data: bytes | None, stat: ZnodeStat | None) -> None:
        if self._closed:
            return
        info = (
            None
            if data is None or stat is None
            else self._node_info(f"{self._nodes_path}/{name}", name, data, stat)
        )
        if info is None:
            self._nodes.pop(name, None)
        else:
            self._nodes[name] = info
            self._seen_urls.add(info.url)

    def _target_owner_changed(self, stat: ZnodeStat | None) -> None:
        if self._closed or not self._started or not self._connected:
            return
        if self._slot is None:
            if stat is None:
                self._spawn(self._claim())
        elif stat is None or stat.ephemeralOwner != self._session:
            # Events may trail this node's own claim; the znode itself says whether the slot is still its own.
            self._spawn(self._verify_slot())

    async def _verify_slot(self) -> None:
        client = self._require_client()
        slot, session = self._slot, self._session
        if slot is None:
            return
        try:
            _, stat = await self._call(client.get_async, f"{self._slots_path}/{slot}/owner")
        except NoNodeError:
            stat = None
        except KazooException:
            return
        if self._slot != slot or self._session != session:
            return
        if stat is None or stat.ephemeralOwner != session:
            self._fence(f"slot {slot} is no longer this node's")
            self._slot = None
            await self._claim()

    # ----- placement -----

    async def _place(self, room: str, stat: ZnodeStat | None, dead: str | None = None) -> None:
        """Record a placement over the live slots (create, or replace the version `stat` read)."""
        client = self._require_client()
        slot = choose(room, self._live_slots() - {dead})
        if slot is None:
            raise ClusterUnavailable("no active node serves calls")
        if slot == self._slot:
            epoch = self._slot_epoch
        else:
            slot_path = f"{self._slots_path}/{slot}"
            try:
                epoch = self._epoch(slot_path, *await self._call(client.get_async, slot_path))
            except NoNodeError:
                epoch = 0
        data = _json({"slot": slot, "epoch": epoch})
        path = f"{self._rooms_path}/{room}"
        try:
            if stat is None:
                await self._call(client.create_async, path, data)
            else:
                await self._call(client.set_async, path, data, version=stat.version)
        except (NodeExistsError, BadVersionError, NoNodeError):
            # Another door placed it first: its placement stands (read again by the caller).
            return

    def _live_slots(self) -> set[str]:
        slots = {
            info.serves
            for node_id, info in self._nodes.items()
            if node_id != self.self_id and info.role == "active" and info.serves
        }
        if self._serving and self._slot is not None:
            slots.add(self._slot)
        return slots

    def _standby_waits(self, slot: str) -> bool:
        """Some live node stands by for `slot` (this one included) and will serve it shortly."""
        if not self._serving and self._target == slot:
            return True
        return any(
            info.role == "standby" and info.standby_for == slot
            for node_id, info in self._nodes.items()
            if node_id != self.self_id
        )

    async def _slot_owner(self, slot: str) -> tuple[str | None, asyncio.Event]:
        """The id of the node serving `slot` (None: nobody), and an event set when that may have changed."""
        client = self._require_client()
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()
        path = f"{self._slots_path}/{slot}/owner"

        def watch(_: object) -> None:
            try:
                loop.call_soon_threadsafe(changed.set)
            except RuntimeError:
                return

        stat = await self._call(client.exists_async, path, watch=watch)
        if stat is None:
            return None, changed
        try:
            data, stat = await self._call(client.get_async, path)
        except NoNodeError:
            return None, changed
        node_id = data.decode(errors="replace")
        if not _NAME.fullmatch(node_id):
            self._bad_znode(path, stat, "not a node id")
            raise ClusterUnavailable(f"slot {slot}: its owner znode does not name a node")
        return node_id, changed

    async def _node(self, node_id: str) -> NodeInfo | None:
        if node_id == self.self_id:
            return self.me()
        info = self._nodes.get(node_id)
        if info is not None:
            return info
        # Its watch has not reported it yet (a node that has just registered).
        client = self._require_client()
        path = f"{self._nodes_path}/{node_id}"
        try:
            data, stat = await self._call(client.get_async, path)
        except NoNodeError:
            return None
        return self._node_info(path, node_id, data, stat)

    # ----- znode contents -----

    def _encoded_me(self) -> bytes:
        info = self.me()
        return _json(
            {
                "id": info.id,
                "url": info.url,
                "media": info.media,
                "role": info.role,
                "standby_for": info.standby_for,
                "serves": info.serves,
                "rooms": info.rooms,
            }
        )

    async def _publish(self) -> None:
        client = self._client
        if client is None or self._closed or not self._connected:
            return
        try:
            await self._call(client.set_async, self._node_path, self._encoded_me())
        except KazooException as error:
            # Not registered in this session yet (registration writes it afresh), or the connection went (its
            # return publishes again).
            event(log, logging.DEBUG, "node znode not written", error=repr(error))

    def _flush_report(self) -> None:
        self._report_timer = None
        if not self._closed:
            self._spawn(self._publish())

    def _node_info(self, path: str, name: str, data: bytes, stat: ZnodeStat) -> NodeInfo | None:
        try:
            raw = json.loads(data)
            info = NodeInfo(
                id=_str(raw["id"]),
                url=_str(raw["url"]),
                media=_str(raw["media"]),
                role=_str(raw["role"]),
                standby_for=_optional_str(raw["standby_for"]),
                serves=_optional_str(raw["serves"]),
                rooms=_rooms(raw["rooms"]),
            )
            if info.id != name or info.role not in ("active", "standby"):
                raise ValueError("id or role")
        except (ValueError, TypeError, KeyError) as error:
            self._bad_znode(path, stat, str(error) or type(error).__name__)
            return None
        return info

    def _placement(self, path: str, data: bytes, stat: ZnodeStat) -> _Placement | None:
        try:
            raw = json.loads(data)
            placement = _Placement(slot=_str(raw["slot"]), epoch=_int(raw["epoch"]))
            if not _NAME.fullmatch(placement.slot):
                raise ValueError("slot")
        except (ValueError, TypeError, KeyError) as error:
            self._bad_znode(path, stat, str(error) or type(error).__name__)
            return None
        return placement

    def _epoch(self, path: str, data: bytes, stat: ZnodeStat) -> int:
        try:
            return _int(json.loads(data)["epoch"])
        except (ValueError, TypeError, KeyError) as error:
            self._bad_znode(path, stat, str(error) or type(error).__name__)
            return 0

    def _bad_znode(self, path: str, stat: ZnodeStat, why: str) -> None:
        if self._bad.get(path) == stat.mzxid:
            return
        self._bad[path] = stat.mzxid
        event(
            log, logging.WARNING, "ignored a znode that is not what Huddle writes", path=path, why=why[:200]
        )
        self._count_error("bad_znode")

    # ----- plumbing -----

    def _require_client(self) -> KazooClient:
        if self._client is None:
            raise ClusterUnavailable("this node is not in the cluster")
        return self._client

    async def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a kazoo *_async request without blocking the loop, bounded by the session timeout."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        sent = time.monotonic()

        def settle(result: Any) -> None:
            if result.successful() or isinstance(result.exception, _ANSWERS):
                self._heard = max(self._heard, sent)
            if future.done():
                return
            if result.successful():
                future.set_result(result.value)
            else:
                future.set_exception(result.exception)

        def done(result: Any) -> None:
            try:
                loop.call_soon_threadsafe(settle, result)
            except RuntimeError:
                return

        method(*args, **kwargs).rawlink(done)
        try:
            return await asyncio.wait_for(future, self._timeout)
        except TimeoutError:
            raise OperationTimeoutError(f"no answer from ZooKeeper within {self._timeout:g} s") from None

    async def _heartbeat(self) -> None:
        """Keep `_heard` fresh while nothing else talks to ZooKeeper (kazoo's own pings say nothing)."""
        client = self._require_client()
        while not self._closed:
            if self._connected:
                with contextlib.suppress(KazooException):
                    await self._call(client.exists_async, self._nodes_path)
            await asyncio.sleep(self._timeout * HEARTBEAT)

    def _hop(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or self._closed:
            return
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            # The loop has closed: nobody is left to tell.
            return

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            event(log, logging.WARNING, "cluster step failed", node=self.self_id, error=repr(error))


# Errors that are ZooKeeper's answer to a request it received.
_ANSWERS = (NoNodeError, NodeExistsError, BadVersionError)


async def _wait(changed: asyncio.Event, timeout: float) -> None:
    try:
        await asyncio.wait_for(changed.wait(), timeout)
    except TimeoutError:
        return


def _close(client: KazooClient) -> None:
    client.stop()
    client.close()


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _optional_str(value: object) -> str | None:
    return None if value is None else _str(value)


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError("expected a count")
    return value


def _rooms(value: object) -> dict[str, int]:
    if not isinstance(value, dict):
        raise TypeError("rooms: expected an object")
    return {_str(name): _int(count) for name, count in value.items()}


def _ignore(_: str) -> None:
    return None
