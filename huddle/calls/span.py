"""A call bigger than one node: the links between its nodes, and what crosses them.

The call's home node (where placement puts the chat id) is its hub. A node that seats participants the home
sent on (spill-over) links to the hub; the hub links to every such node and relays between them, so each
node of the call has one link per other node it exchanges with, and a track crosses to each node once
(B -> hub -> C for two spill nodes: a hop more than a full mesh, for far fewer links and one place that
decides who speaks). A link is:

- control: a WebSocket from the spill node to the hub's `/pipe`, carrying JSON messages in order: the roster
  (`participant`, `left`: calls/registry.py makes them), the SFU's `track`, `untrack`, `wants` and `speaker`
  (sfu/pipe.py), the recording state (`recording`, `record`), and the chat (`chat`, history included);
- media: RTP and RTCP as UDP datagrams between the nodes' pipe ports (rtc/pipe_port.py).

Every control frame and datagram is sealed (rtc/pipe.py: AES-128-GCM under keys derived from the cluster key
and a random id per link and direction), so only a node holding the cluster key can open a link, and nothing
that crosses can be read, forged or replayed. The first frame each way is a `hello` naming the node, the call,
the node's pipe address and the id of the key its datagrams are sealed with.

When a link breaks, the participants on the other side are `reconnecting` here (their tracks end) and leave
after the reconnection grace unless they come back, on that node or another. A spill node redials its hub
(wherever placement now says it is: a restarted worker, a standby) for as long as it holds participants.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from huddle.calls.registry import Calls
from huddle.calls.room import Room
from huddle.logs import event
from huddle.rtc.pipe import Opener, PipeError, Sealer, link_id_of, new_link_id
from huddle.rtc.pipe_port import PipePort

__all__ = ["Spans"]

log = logging.getLogger("huddle.calls")

KEY_LABEL = b"huddle pipes v1"
# A hello older than this (or from further in the future) is refused: a recorded one cannot be replayed later.
HELLO_WINDOW = 30.0
HELLO_TIMEOUT = 5.0
# Seconds between a spill node's tries to reach its hub, the last one repeated.
REDIAL = (0.1, 0.3, 0.6, 1.0)
MAX_FRAME = 1 << 20
# Places the hub reserved on a node for joiners it sent there, until they arrive (or this many seconds).
RESERVATION = 10.0
# What a hub answers with, by closing the link: the dialer looks for the hub again.
CLOSE_NOT_HUB = 4010
CLOSE_REPLACED = 4011

# Where a call's hub is: (its node id, the WebSocket URL of its /pipe for this call).
Locate = Callable[[str], Awaitable[tuple[str, str]]]


class LinkRefused(Exception):
    pass


class Link:
    """One call's link to one other node."""

    def __init__(
        self,
        spans: Spans,
        room: Room,
        node: str,
        ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        control: Sealer,
        opener: Opener,
    ) -> None:
        self.spans = spans
        self.room = room
        self.node = node
        self.ws = ws
        self._control = control
        self._opener = opener
        self._media = Sealer(spans.key, new_link_id())
        self._peer_media: bytes | None = None
        self._address: tuple[str, int] | None = None
        self._outgoing: list[bytes] = []
        self._wake = asyncio.Event()
        self._closing = False
        self.pipe: Any = None

    # -- PipeIO ---------------------------------------------------------------------------------------------

    def send_rtp(self, packet: bytes | bytearray) -> bool:
        if self._address is None:
            return False
        self.spans.port.send(self._media.seal(packet), self._address)
        return True

    def send_rtcp(self, packet: bytes) -> bool:
        return self.send_rtp(packet)

    def send(self, message: dict[str, Any]) -> None:
        if not self._closing:
            self._outgoing.append(self._control.seal(json.dumps(message, separators=(",", ":")).encode()))
            self._wake.set()

    # -- Life -----------------------------------------------------------------------------------------------

    def hello(self) -> bytes:
        host, port = self.spans.port_address()
        return self._control.seal(
            json.dumps(
                {
                    "t": "hello",
                    "node": self.spans.node_id,
                    "room": self.room.name,
                    "time": time.time(),
                    "media": self._media.link_id.hex(),
                    "pipe": [host, port],
                }
            ).encode()
        )

    def accept_hello(self, hello: dict[str, Any]) -> None:
        """The other side's hello: where its datagrams come from, and the key they are sealed with."""
        host, port = hello["pipe"]
        self._address = (str(host), int(port))
        self._peer_media = bytes.fromhex(str(hello["media"]))
        if len(self._peer_media) != 8:
            raise ValueError("bad media link id")

    async def run(self) -> None:
        """Exchange until the link breaks: roster first, then the SFU's pipe (its tracks follow)."""
        spans, room = self.spans, self.room
        assert self._peer_media is not None and self._address is not None
        spans.port.add_link(Opener(spans.key, self._peer_media), self._on_datagram, peer=self._address)
        writer = asyncio.get_running_loop().create_task(self._write())
        try:
            for participant in room.everyone():
                if room.node_of.get(participant.id) != self.node:
                    info = {**participant.describe(), "joined_at": participant.joined_at}
                    self.send({"t": "participant", "p": info})
            if not room.spilled and room.recording is not None:
                self.send({"t": "recording", "state": room.recording})
            if not room.spilled:
                for entry in room.chat:  # the history, for the other node's late joiners
                    self.send({"t": "chat", "entry": entry})
            router = spans.calls.move_to_sfu(room)
            if router is not None:
                self.pipe = router.add_pipe(self.node, self)
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                self._on_frame(msg.data)
        finally:
            self._closing = True
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, RuntimeError):
                await writer
            spans.port.remove_link(self._peer_media)
            if room.router is not None:
                room.router.remove_pipe(self.node)
            spans.calls.node_lost(room, self.node)

    async def _write(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            frames, self._outgoing = self._outgoing, []
            try:
                for frame in frames:
                    await self.ws.send_bytes(frame)
            except (ConnectionError, RuntimeError):
                # The socket went while writing: closing it ends the reader too, and the link with it.
                await self.ws.close()
                return

    async def flush_and_close(self) -> None:
        """The call ended on this node: what was said reaches the other side before the link closes."""
        for _ in range(50):
            if not self._outgoing:
                break
            await asyncio.sleep(0.01)
        self._closing = True
        await self.ws.close()

    def _on_frame(self, frame: bytes) -> None:
        try:
            message = json.loads(self._opener.open(frame))
            self._dispatch(message)
        except PipeError as exc:
            self.spans.count_error(f"pipe_{exc.reason}")
        except (ValueError, KeyError, TypeError) as exc:
            self.spans.count_error("pipe_message")
            event(log, logging.DEBUG, "pipe message refused", room=self.room.name, error=str(exc))

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["t"]
        calls, room = self.spans.calls, self.room
        if kind == "participant":
            calls.remote_participant(room, message["p"], self.node)
        elif kind == "left":
            calls.remote_left(room, str(message["id"]), str(message.get("reason", "left"))[:32], self.node)
        elif kind == "recording":
            calls.remote_recording(room, message["state"], self.node)
        elif kind == "chat":
            calls.remote_chat(room, message["entry"], self.node)
        elif self.pipe is not None:
            self.pipe.on_message(message)

    def _on_datagram(self, data: bytes) -> None:
        pipe = self.pipe
        if pipe is None or len(data) < 12:
            return
        if 192 <= data[1] <= 223:  # RTCP packet types 192-223 (RFC 5761)
            pipe.on_rtcp(data)
        else:
            pipe.on_rtp(data)


class Spans:
    """This node's links for the calls it shares with other nodes."""

    def __init__(
        self,
        calls: Calls,
        *,
        node_id: str,
        key: bytes,
        port: PipePort,
        announce: str,
        locate: Locate,
        count_error: Callable[[str], None],
    ) -> None:
        self.calls = calls
        self.node_id = node_id
        self.key = key
        self.port = port
        self._announce = announce
        self._locate = locate
        self.count_error = count_error
        self._links: dict[tuple[str, str], Link] = {}
        self._dialers: dict[str, asyncio.Task[None]] = {}
        self._reserved: dict[str, list[tuple[str, float]]] = {}
        # Control link ids seen lately: a hello replayed within its window opens no second link.
        self._seen: dict[bytes, float] = {}
        self._http: aiohttp.ClientSession | None = None
        self._closing: set[asyncio.Task[None]] = set()
        calls.roster_changed.append(self._roster)
        calls.room_spilled.append(self._spilled)
        calls.room_closed.append(self._room_closed)

    def port_address(self) -> tuple[str, int]:
        return self._announce, self.port.address[1]

    # -- Placement (the hub's side) -------------------------------------------------------------------------

    def counts(self, room_name: str) -> dict[str, int]:
        """Participants of the call by node, this one's included, and places reserved for joiners sent on."""
        room = self.calls.get(room_name)
        counts: dict[str, int] = {self.node_id: len(room) if room is not None else 0}
        if room is not None:
            for pid in room.remote:
                node = room.node_of.get(pid, "")
                counts[node] = counts.get(node, 0) + 1
        now = time.monotonic()
        reserved = [(node, until) for node, until in self._reserved.get(room_name, []) if until > now]
        if reserved:
            self._reserved[room_name] = reserved
        else:
            self._reserved.pop(room_name, None)
        for node, _ in reserved:
            counts[node] = counts.get(node, 0) + 1
        return counts

    def reserve(self, room_name: str, node: str) -> None:
        self._reserved.setdefault(room_name, []).append((node, time.monotonic() + RESERVATION))

    def _arrived(self, room_name: str, node: str) -> None:
        reserved = self._reserved.get(room_name)
        if reserved:
            for i, (where, _) in enumerate(reserved):
                if where == node:
                    del reserved[i]
                    break

    # -- Roster out -----------------------------------------------------------------------------------------

    def _roster(self, room: Room, message: dict[str, Any], origin: str | None) -> None:
        if message["t"] == "participant" and origin is not None:
            self._arrived(room.name, origin)
        for (name, node), link in self._links.items():
            if name == room.name and node != origin:
                link.send(message)

    # -- Spill node: dial the hub ---------------------------------------------------------------------------

    def _spilled(self, room: Room) -> None:
        if room.name not in self._dialers:
            task = asyncio.get_running_loop().create_task(self._dial(room))
            self._dialers[room.name] = task

    async def _dial(self, room: Room) -> None:
        attempt = 0
        try:
            while self.calls.get(room.name) is room:
                try:
                    hub, url = await self._locate(room.name)
                    if hub != self.node_id:
                        await self._connect(room, hub, url)
                        attempt = 0
                except (LinkRefused, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                    event(log, logging.DEBUG, "cannot reach the call's hub", room=room.name, error=str(exc))
                except Exception as exc:  # the cluster's lookup failed (ClusterUnavailable...): try again
                    event(log, logging.DEBUG, "cannot locate the call's hub", room=room.name, error=repr(exc))
                await asyncio.sleep(REDIAL[min(attempt, len(REDIAL) - 1)])
                attempt += 1
        finally:
            if self._dialers.get(room.name) is asyncio.current_task():
                del self._dialers[room.name]

    async def _connect(self, room: Room, hub: str, url: str) -> None:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        control = Sealer(self.key, new_link_id())
        async with self._http.ws_connect(
            url, max_msg_size=MAX_FRAME, heartbeat=2.0, timeout=aiohttp.ClientWSTimeout(ws_close=1.0)
        ) as ws:
            link = Link(self, room, hub, ws, control, Opener(self.key, b"\0" * 8))
            await ws.send_bytes(link.hello())
            msg = await asyncio.wait_for(ws.receive(), HELLO_TIMEOUT)
            if msg.type != aiohttp.WSMsgType.BINARY:
                raise LinkRefused(f"the hub closed the link ({ws.close_code})")
            link._opener, hello = self._open_hello(msg.data, room.name)
            if hello["node"] != hub:
                raise LinkRefused(f"{hub}'s pipe answered as {hello['node']}")
            link.accept_hello(hello)
            await self._serve(link)

    # -- Hub: accept a link ---------------------------------------------------------------------------------

    async def accept(self, request: web.Request) -> web.StreamResponse:
        """GET /pipe: another node of a call links to this one, the call's hub."""
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME, heartbeat=2.0)
        await ws.prepare(request)
        try:
            msg = await asyncio.wait_for(ws.receive(), HELLO_TIMEOUT)
            if msg.type != aiohttp.WSMsgType.BINARY:
                return ws
            room_name = request.query.get("room", "")
            opener, hello = self._open_hello(msg.data, room_name)
            node = str(hello["node"])
            if node == self.node_id:
                raise LinkRefused("a node cannot link to itself")
            try:
                hub, _ = await self._locate(room_name)
            except Exception as exc:  # the cluster cannot say where the call lives now: the dialer retries
                event(log, logging.INFO, "pipe link deferred", room=room_name, error=repr(exc))
                await ws.close(code=1013, message=b"try again")
                return ws
            if hub != self.node_id:
                await ws.close(code=CLOSE_NOT_HUB, message=b"not the call's hub")
                return ws
        except (PipeError, LinkRefused, ValueError, KeyError, TypeError, TimeoutError) as exc:
            self.count_error("pipe_hello")
            event(log, logging.INFO, "pipe link refused", peer=request.remote, error=str(exc))
            await ws.close(code=4003, message=b"refused")
            return ws
        room = self.calls.hub_room(room_name)
        link = Link(self, room, node, ws, Sealer(self.key, new_link_id()), opener)
        link.accept_hello(hello)
        await ws.send_bytes(link.hello())
        old = self._links.get((room_name, node))
        if old is not None:
            await old.ws.close(code=CLOSE_REPLACED, message=b"replaced")
        await self._serve(link)
        return ws

    def _open_hello(self, frame: bytes, room_name: str) -> tuple[Opener, dict[str, Any]]:
        link_id = link_id_of(frame)
        if link_id is None:
            raise LinkRefused("not a sealed frame")
        now = time.time()
        self._seen = {k: v for k, v in self._seen.items() if v > now}
        if link_id in self._seen:
            raise LinkRefused("a hello seen before")
        opener = Opener(self.key, link_id)
        hello = json.loads(opener.open(frame))
        if hello.get("t") != "hello" or hello.get("room") != room_name:
            raise LinkRefused("not a hello for this call")
        if abs(float(hello["time"]) - now) > HELLO_WINDOW:
            raise LinkRefused("a stale hello")
        self._seen[link_id] = now + 2 * HELLO_WINDOW
        return opener, hello

    async def _serve(self, link: Link) -> None:
        key = (link.room.name, link.node)
        self._links[key] = link
        event(log, logging.INFO, "call linked", room=link.room.name, node=link.node)
        try:
            await link.run()
        finally:
            if self._links.get(key) is link:
                del self._links[key]
            event(log, logging.INFO, "call unlinked", room=link.room.name, node=link.node)

    # -- Ending ---------------------------------------------------------------------------------------------

    def _room_closed(self, room: Room) -> None:
        links = [link for (name, _), link in self._links.items() if name == room.name]
        for link in links:
            # Its last words (who left) reach the other side first; a dialer then sees the room gone.
            task = asyncio.get_running_loop().create_task(link.flush_and_close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        dialer = self._dialers.get(room.name)
        if dialer is not None and not links:
            dialer.cancel()

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"room": name, **link.pipe.describe()}
            for (name, _), link in self._links.items()
            if link.pipe is not None
        ]

    async def close(self) -> None:
        for task in list(self._dialers.values()):
            task.cancel()
        for link in list(self._links.values()):
            with contextlib.suppress(Exception):
                await link.ws.close()
        self._dialers.clear()
        if self._http is not None:
            await self._http.close()
            self._http = None
