"""One signaling connection: validates what the client sends and acts on it (docs/protocol.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web

from huddle import outgoing
from huddle.calls.registry import Calls, ResumeFailed
from huddle.calls.resume import ResumeTokenError
from huddle.calls.room import P2P, SFU, Participant, Room, RoomFull
from huddle.calls.span import Spans
from huddle.cluster.membership import ClusterUnavailable, Membership, NodeInfo
from huddle.cluster.placement import spill
from huddle.config import Settings
from huddle.logs import event
from huddle.metrics import Metrics
from huddle.recording.manager import RecordingError, Recordings
from huddle.signaling import messages as m
from huddle.signaling.tokens import OPEN_ROOM, Permissions, TokenError, verify
from huddle.turn.credentials import TurnAccess

log = logging.getLogger("huddle.signaling")

RATE_PER_SECOND = 50.0
RATE_BURST = 200.0
# Chat goes to everyone in the call (and into recordings): a person types a few a minute; a script is cut
# to one a second after a burst.
CHAT_PER_SECOND = 1.0
CHAT_BURST = 10
DROPS_BEFORE_CLOSE = 2000
OUTBOX_LIMIT = 512
# A socket that has not joined by then is closed: an idle one holds a file descriptor and a task for nothing.
JOIN_TIMEOUT = 10.0

CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN = 1013
CLOSE_UNAUTHORIZED = 4001
# This node stops serving its calls (it shuts down, or lost the cluster): resume elsewhere, at once.
CLOSE_SERVICE_RESTART = 1012


@dataclass(slots=True)
class Context:
    """What every session of one server shares."""

    settings: Settings
    calls: Calls
    metrics: Metrics
    stun_port: int
    recordings: Recordings
    cluster: Membership
    spans: Spans
    turn: TurnAccess | None = None  # the node's TURN relay, when it runs one


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "heartbeat_timeout"  # no pong within half the heartbeat: the peer is gone, not misbehaving
    return "too_large" if "size" in str(exc) else "protocol_violation"


def ws_url(node: NodeInfo, path: str = "/ws") -> str:
    """The signaling URL of a node (or its `/pipe`); `node` lets a --workers parent, one URL for all, pick
    the worker."""
    base = node.url.rstrip("/")
    scheme, sep, rest = base.partition("://")
    ws_scheme = "wss" if scheme == "https" else "ws"
    return f"{ws_scheme}://{rest}{path}?node={node.id}" if sep else f"{base}{path}?node={node.id}"


class TokenBucket:
    __slots__ = ("burst", "level", "rate", "stamp")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.level = burst
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.level >= 1.0:
            self.level -= 1.0
            return True
        return False


_CLOSE = object()


class Session:
    def __init__(self, ws: web.WebSocketResponse, ctx: Context, request: web.Request) -> None:
        self.ws = ws
        self.ctx = ctx
        self.request = request
        self.room: Room | None = None
        self.participant: Participant | None = None
        self._left = False
        self._outbox: asyncio.Queue[Any] = asyncio.Queue(OUTBOX_LIMIT)
        self._bucket = TokenBucket(RATE_PER_SECOND, RATE_BURST)
        self._chat_bucket = TokenBucket(CHAT_PER_SECOND, CHAT_BURST)
        self._dropped = 0
        self._last_rate_error = 0.0
        self._closing = False
        self._join_timer: asyncio.TimerHandle | None = None

    # -- Outbox (what calls.room sees) ------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        if self._closing:
            return
        try:
            self._outbox.put_nowait(message)
        except asyncio.QueueFull:
            # A client that does not read its socket must not make the server buffer without bound.
            self._count_error("slow_consumer")
            self._closing = True
            asyncio.get_running_loop().create_task(
                self.ws.close(code=CLOSE_TRY_AGAIN, message=b"not reading fast enough")
            )

    def close(self, code: int, reason: str) -> None:
        """Close after what is already queued has gone out (so an error reaches the client first)."""
        if self._closing:
            return
        self._closing = True
        with contextlib.suppress(asyncio.QueueFull):
            self._outbox.put_nowait((_CLOSE, code, reason))

    async def _write(self) -> None:
        while True:
            item = await self._outbox.get()
            if isinstance(item, tuple) and item[0] is _CLOSE:
                await self.ws.close(code=item[1], message=item[2].encode()[:120])
                return
            try:
                await self.ws.send_str(json.dumps(item, separators=(",", ":")))
            except (ConnectionError, RuntimeError):
                return

    # -- Reading ----------------------------------------------------------------------------------------

    async def run(self) -> None:
        writer = asyncio.create_task(self._write())
        join_timer = self._join_timer = asyncio.get_running_loop().call_later(
            JOIN_TIMEOUT, self._join_timed_out
        )
        try:
            async for msg in self.ws:
                if msg.type == WSMsgType.TEXT:
                    joining = self._receive(msg.data)
                    if joining is not None:
                        # Nothing else is read meanwhile: what the client sends after `join` is about the call
                        # the join leads to.
                        await joining
                elif msg.type == WSMsgType.BINARY:
                    self._error("binary_not_supported", "send JSON in text frames")
                elif msg.type == WSMsgType.ERROR:
                    # aiohttp closes the socket itself (1009 for a frame over max_msg_size).
                    self._count_error(_error_kind(msg.data))
                    break
            else:
                # A missed pong closes the socket while no read waits too; then the loop just ends.
                if isinstance(self.ws.exception(), asyncio.TimeoutError):
                    self._count_error("heartbeat_timeout")
        finally:
            join_timer.cancel()
            self._depart()
            if not self._closing:
                writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, RuntimeError):
                await asyncio.wait_for(writer, timeout=2.0)

    def _receive(self, text: str) -> Awaitable[None] | None:
        if not self._bucket.take():
            self._dropped += 1
            self._count_error("rate_limited")
            now = time.monotonic()
            if now - self._last_rate_error >= 1.0:
                self._last_rate_error = now
                text = f"over {RATE_PER_SECOND:.0f} messages per second; messages are dropped"
                self.send(outgoing.error("rate_limited", text))
            if self._dropped > DROPS_BEFORE_CLOSE:
                self.close(CLOSE_POLICY, "flooding")
            return None
        try:
            message = m.decode(text)
        except m.ProtocolError as exc:
            self.ctx.metrics.messages.labels(type="invalid").inc()
            self._error(exc.code, exc.message, exc.request_id)
            return None
        self.ctx.metrics.messages.labels(type=message.type).inc()
        if isinstance(message, m.Join):
            return self._on_join(message)
        handler = getattr(self, "_on_" + message.type)
        if self.participant is not None and self.participant.outbox is not self:
            # Replaced, resumed elsewhere or removed: this connection speaks for nobody any more.
            self.room = self.participant = None
        if message.type != "ping" and self.participant is None:
            self._error("not_joined", "send 'join' first", message.id)
            return None
        handler(message)
        return None

    def _join_timed_out(self) -> None:
        if self._closing:
            return
        self._count_error("join_timeout")
        self.close(CLOSE_POLICY, f"join within {JOIN_TIMEOUT:.0f} s")

    def _count_error(self, kind: str) -> None:
        self.ctx.metrics.errors.labels(kind=kind).inc()

    def _error(self, code: str, message: str, request_id: Any = None) -> None:
        self._count_error(code)
        event(log, logging.DEBUG, "signaling error", code=code, detail=message, peer=self.request.remote)
        self.send(outgoing.error(code, message, request_id))

    # -- Handlers ---------------------------------------------------------------------------------------

    def _on_ping(self, msg: m.Ping) -> None:
        self.send(outgoing.pong(time.time(), msg.id))

    async def _on_join(self, msg: m.Join) -> None:
        ctx = self.ctx
        if self.participant is not None and self.participant.outbox is self:
            self._error("already_joined", "this socket has joined already; open another one", msg.id)
            return
        if not m.valid_room_name(msg.room):
            self._error("invalid_room", "room name must be 1-64 letters, digits, '-' or '_'", msg.id)
            return
        # Who may join is checked here, at the door, before the call's node is looked up: a node sends on
        # only those its peers would take.
        if msg.resume is not None:
            try:
                ctx.calls.check_resume(msg.room, msg.resume)
            except ResumeFailed as exc:
                self._resume_failed(exc, msg.id)
                return
        else:
            admitted = self._admit(msg)
            if admitted is None:
                return
        try:
            owner = await ctx.cluster.owner(msg.room)
        except ClusterUnavailable as exc:
            self._count_error("cluster_unavailable")
            self._error(
                "try_again", f"the call cannot be placed right now ({exc}); try again shortly", msg.id
            )
            return
        if self._closing:
            return
        spilled = self._ticket_valid(msg) and ctx.cluster.serving()
        if not spilled and (owner.id != ctx.cluster.self_id or not ctx.cluster.serving()):
            self._redirect(owner, msg.id)
            return
        if not spilled and (msg.resume is None or not ctx.calls.holds(msg.resume)):
            # The call's home seats its share and sends the next joiners on to the call's next node.
            target = self._spill_target(msg.room)
            if target is not None:
                ctx.spans.reserve(msg.room, target.id)
                ticket = ctx.calls.resume_key.ticket(msg.room, target.id, time.time())
                self._redirect(target, msg.id, ticket)
                return
        if msg.resume is not None:
            try:
                room, participant, restored = ctx.calls.resume(
                    msg.room, msg.resume, self, msg.mode, spilled=spilled
                )
            except ResumeFailed as exc:
                self._resume_failed(exc, msg.id)
                return
            self._welcome(room, participant, msg.id, resumed=True, restored=restored)
            return
        identity, name, permissions, expires = admitted
        try:
            room, participant = ctx.calls.join(
                msg.room,
                identity=identity,
                name=name,
                permissions=permissions,
                outbox=self,
                expires=expires,
                spilled=spilled,
            )
        except RoomFull:
            self._error("room_full", f"room '{msg.room}' is full ({ctx.calls.capacity} participants)", msg.id)
            return
        self._welcome(room, participant, msg.id, resumed=False, restored=False)

    def _admit(self, msg: m.Join) -> tuple[str, str, Permissions, float | None] | None:
        """Identity, display name, permissions and expiry of a fresh join, or None (the error is sent)."""
        settings = self.ctx.settings
        if not settings.secret:
            name = m.clean_display_name(msg.name)
            if name is None:
                self._error("invalid_name", "a display name of 1-64 printable characters is needed", msg.id)
                return None
            return "guest-" + secrets.token_hex(4), name, OPEN_ROOM, None
        if not msg.token:
            self._refuse("unauthorized", "this server needs a join token; ask for a join link", msg.id)
            return None
        try:
            grant = verify(settings.secret, msg.token, msg.room)
        except TokenError as exc:
            self._refuse(exc.code, exc.message, msg.id)
            return None
        return grant.identity, grant.name, grant.permissions, grant.expires

    def _resume_failed(self, exc: ResumeFailed, request_id: Any) -> None:
        if exc.expired:
            text = "your join link has expired, so the call cannot be resumed; ask for a new link"
        else:
            text = "that call connection is over; join afresh"
        self._error("resume_failed", text, request_id)

    def _ticket_valid(self, msg: m.Join) -> bool:
        """The call's home sent this joiner here (a ticket for this node); a bad ticket is only ignored: the
        join goes on as any other, to the call's home."""
        if msg.ticket is None:
            return False
        ctx = self.ctx
        try:
            ctx.calls.resume_key.check_ticket(msg.ticket, msg.room, ctx.cluster.self_id, time.time())
        except ResumeTokenError as exc:
            self._count_error("bad_ticket")
            event(log, logging.DEBUG, "placement ticket ignored", room=msg.room, error=str(exc))
            return False
        return True

    def _spill_target(self, room_name: str) -> NodeInfo | None:
        """Where this call's next participant goes when this node, its home, seats its limit of them: the next
        node in the chat id's ranking with room for more (None: here)."""
        ctx = self.ctx
        limit = ctx.settings.max_participants_per_node
        counts = ctx.spans.counts(room_name)
        if counts.get(ctx.cluster.self_id, 0) < limit:
            return None
        serving = {n.serves: n for n in ctx.cluster.nodes() if n.serves is not None}
        by_slot = {slot: counts.get(node.id, 0) for slot, node in serving.items()}
        slot = spill(room_name, serving, by_slot, limit)
        if slot is None or serving[slot].id == ctx.cluster.self_id:
            return None
        return serving[slot]

    def _redirect(self, owner: NodeInfo, request_id: Any, ticket: str | None = None) -> None:
        """The call is served by another node: the client sends the same `join` there (docs/protocol.md)."""
        self.ctx.metrics.errors.labels(kind="redirected").inc()
        self.send(outgoing.redirect(ws_url(owner), owner.id, request_id, ticket))

    def _welcome(
        self, room: Room, participant: Participant, request_id: Any, *, resumed: bool, restored: bool
    ) -> None:
        self.room, self.participant = room, participant
        if self._join_timer is not None:
            self._join_timer.cancel()
        reply = outgoing.joined(
            request_id,
            v=m.PROTOCOL_VERSION,
            me=participant.describe(),
            room=room.name,
            participants=[p.describe() for p in room.everyone() if p is not participant],
            mode=room.mode,
            ice_servers=self._ice_servers(),
            permissions=participant.permissions.as_dict(),
            resume_token=participant.resume_token,
            reconnect_grace=self.ctx.calls.reconnect_grace,
            resumed=resumed,
            restored=restored,
            doors=self._doors(),
            active_speaker=room.router.speaker.active_speaker if room.router is not None else None,
            recording=room.recording,
            chat=list(room.chat),
        )
        # The router defers its offers to a later loop turn, so `joined` always goes out first.
        self.send(reply)

    def _doors(self) -> list[str]:
        """Where to reconnect, this node first: if it dies, another door leads to whoever serves the call."""
        cluster = self.ctx.cluster
        me = ws_url(cluster.me())
        others = sorted({ws_url(node) for node in cluster.nodes() if node.id != cluster.self_id} - {me})
        return [me, *others]

    def _refuse(self, code: str, message: str, request_id: Any) -> None:
        self._error(code, message, request_id)
        self.close(CLOSE_UNAUTHORIZED, code)

    def _ice_servers(self) -> list[dict[str, Any]]:
        host = self.request.url.host or self.ctx.settings.host
        if ":" in host:
            host = f"[{host}]"
        servers: list[dict[str, Any]] = [{"urls": [f"stun:{host}:{self.ctx.stun_port}"]}]
        if self.ctx.turn is not None and self.participant is not None:
            servers.append(self.ctx.turn.ice_server(host, self.participant.identity, time.time()))
        return servers

    def _on_leave(self, msg: m.Leave) -> None:
        assert self.room is not None and self.participant is not None
        self._left = True
        self.ctx.calls.leave(self.room, self.participant)
        self.close(CLOSE_NORMAL, "left")

    def _relay(self, msg: m.Offer | m.Answer | m.Candidate, payload: dict[str, Any]) -> None:
        assert self.room is not None and self.participant is not None
        if self.room.mode != P2P:
            self._error("wrong_mode", "this room is in sfu mode: use sfu_offer / sfu_answer", msg.id)
            return
        target = self.room.participants.get(msg.to)
        if target is None or target is self.participant:
            self._error("unknown_participant", f"no participant {msg.to!r} in this room", msg.id)
            return
        target.outbox.send(outgoing.relayed(msg.type, self.participant.id, payload))

    def _on_offer(self, msg: m.Offer) -> None:
        self._relay(msg, {"sdp": msg.sdp})

    def _on_answer(self, msg: m.Answer) -> None:
        self._relay(msg, {"sdp": msg.sdp})

    def _on_candidate(self, msg: m.Candidate) -> None:
        candidate = None if msg.candidate is None else msg.candidate.model_dump(exclude_none=True)
        self._relay(msg, {"candidate": candidate})

    def _on_media(self, msg: m.Media) -> None:
        assert self.room is not None and self.participant is not None
        self.ctx.calls.update_media(
            self.room, self.participant, msg.audio, msg.video, msg.screen, msg.screen_stream
        )

    def _on_chat(self, msg: m.Chat) -> None:
        assert self.room is not None and self.participant is not None
        text = m.clean_chat_text(msg.text)
        if text is None:
            self._error("bad_message", "chat: text: nothing to show", msg.id)
            return
        if not self._chat_bucket.take():
            self._error("rate_limited", f"over {CHAT_BURST} chat messages in a row; wait a little", msg.id)
            return
        self.ctx.calls.post_chat(self.room, self.participant, text)

    def _on_hand(self, msg: m.Hand) -> None:
        assert self.room is not None and self.participant is not None
        self.ctx.calls.raise_hand(self.room, self.participant, msg.raised)

    def _on_sfu_offer(self, msg: m.SfuOffer) -> None:
        router = self._router(msg)
        if router is None:
            return
        assert self.participant is not None
        try:
            answer = router.on_publish_offer(self.participant, msg.sdp, msg.sources or {})
        except ValueError as exc:
            self._error("bad_sdp", f"publish offer not accepted: {exc}", msg.id)
            return
        self.send(outgoing.sfu_answer(answer))

    def _on_sfu_answer(self, msg: m.SfuAnswer) -> None:
        router = self._router(msg)
        if router is None:
            return
        assert self.participant is not None
        try:
            router.on_subscribe_answer(self.participant, msg.sdp, msg.revision)
        except ValueError as exc:
            self._error("bad_sdp", f"subscribe answer not accepted: {exc}", msg.id)

    def _on_video_sizes(self, msg: m.VideoSizes) -> None:
        assert self.room is not None and self.participant is not None
        # In p2p mode there is nothing to choose: remember nothing, refuse nothing (clients send it early).
        if self.room.router is not None:
            self.room.router.set_video_sizes(self.participant, msg.sizes)

    def _on_start_recording(self, msg: m.StartRecording) -> None:
        assert self.room is not None and self.participant is not None
        if not self.participant.permissions.record:
            self._error("forbidden", "your join token does not allow recording", msg.id)
            return
        try:
            self.ctx.recordings.begin(
                self.room.name,
                by=self.participant.id,
                outputs=tuple(msg.outputs or ()) or ("composite", "tracks"),
            )
        except RecordingError as exc:
            self._error(exc.code, exc.message, msg.id)

    def _on_stop_recording(self, msg: m.StopRecording) -> None:
        assert self.room is not None and self.participant is not None
        if not self.participant.permissions.record:
            self._error("forbidden", "your join token does not allow recording", msg.id)
            return
        try:
            self.ctx.recordings.end(self.room.name, reason=f"stopped by {self.participant.id}")
        except RecordingError as exc:
            self._error(exc.code, exc.message, msg.id)

    def _router(self, msg: m.SfuOffer | m.SfuAnswer):
        assert self.room is not None
        if self.room.mode != SFU or self.room.router is None:
            self._error("wrong_mode", "this room is in p2p mode: use offer / answer / candidate", msg.id)
            return None
        return self.room.router

    def _depart(self) -> None:
        """The socket is gone: a participant that did not say `leave` may still come back."""
        room, participant = self.room, self.participant
        self.room = self.participant = None
        if room is not None and participant is not None and not self._left:
            self.ctx.calls.lost(room, participant, self)
