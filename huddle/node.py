"""One Huddle node: signaling over HTTP/WebSocket, the STUN server and the media port, started together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import secrets
from dataclasses import dataclass, replace
from pathlib import Path

from aiohttp import web

from huddle import tls
from huddle.calls.registry import Calls
from huddle.calls.resume import ResumeKey
from huddle.calls.span import KEY_LABEL, Spans
from huddle.cluster.membership import Membership, NodeInfo, SingleNode
from huddle.config import Settings, turn_ports
from huddle.logs import RateLimit, event
from huddle.metrics import LoopLagMonitor, Metrics
from huddle.recording.manager import Recordings
from huddle.rtc.certificate import Certificate
from huddle.rtc.pipe_port import PipePort
from huddle.rtc.port import MediaPort
from huddle.rtc.sdp import Candidate
from huddle.sfu.router import Sfu
from huddle.signaling.app import build_app
from huddle.signaling.connections import ConnectionGuard, GuardedSite, HttpErrorLog, bind_tcp
from huddle.signaling.session import CLOSE_SERVICE_RESTART, Context, ws_url
from huddle.signaling.tokens import weak_secret
from huddle.stun import StunServer
from huddle.turn.credentials import TurnAccess
from huddle.turn.peers import parse_networks
from huddle.turn.server import TurnServer, relay_addresses

log = logging.getLogger("huddle.node")

# What asyncio logs, with a traceback, for every accept() that fails for want of file descriptors.
ACCEPT_ERROR = "socket.accept() out of system resource"
# How often this node tells its cluster which calls it holds (what /api/cluster shows).
REPORT_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Ports:
    http: int
    stun: int
    media: int
    scheme: str = "http"  # of the HTTP port: "https" with TLS


class Node:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.media = MediaPort(self.metrics, max_connections_per_address=settings.max_connections_per_address)
        self.sfu: Sfu | None = None
        self.calls = Calls(
            capacity=settings.max_participants,
            resume_key=resume_key(settings),
            reconnect_grace=settings.reconnect_grace,
            sfu_always=settings.sfu_always,
            router_factory=self._router,
        )
        self.metrics.rooms.set_function(lambda: len(self.calls))
        self.metrics.participants.set_function(self.calls.participant_count)
        # The TURN relay shares the STUN port; it starts once the secret its credentials hang on is known.
        self.turn = TurnServer(
            self.metrics,
            ports=turn_ports(settings),
            allow=parse_networks(settings.turn_allow_peer),
            user_quota=settings.turn_user_quota,
            total_quota=settings.turn_total_quota,
            bandwidth_kbps=settings.turn_bandwidth_kbps,
        )
        # Each client relayed over TCP or TLS holds a connection for its call: as many as TURN allocations.
        self.stun = StunServer(
            self.metrics,
            max_connections=settings.turn_total_quota + 256,
            max_connections_per_address=settings.max_connections_per_address,
            turn=self.turn,
        )
        # Pipes to the other nodes of calls bigger than one node (calls/span.py).
        self.pipe_port = PipePort(self._count_error)
        self.spans: Spans | None = None
        self.recordings = Recordings.from_settings(self.calls, settings)
        self.metrics.watch_recording_log(self.recordings.log)
        self._runner: web.AppRunner | None = None
        self._lag: LoopLagMonitor | None = None
        self.cluster: Membership | None = None
        self._reporter: asyncio.Task[None] | None = None
        self._releases: set[asyncio.Task[None]] = set()
        accept_errors = self.metrics.errors.labels(kind="accept_error")
        self._accept_errors = RateLimit(ACCEPT_ERROR, on_match=accept_errors.inc)

    async def start(self) -> Ports:
        """Raises TlsError (before it takes any port) when the certificate or key cannot serve."""
        if self.settings.self_signed:
            self.settings = tls.with_self_signed(self.settings)
        s = self.settings
        # A worker of --workers serves plain HTTP to its parent, which serves TLS; the certificate serves
        # its TURN over TLS still.
        certificate = (
            tls.load(s.tls_cert, s.tls_key) if s.tls_cert and s.tls_key and not s.worker_ids else None
        )
        scheme = "https" if certificate is not None else "http"
        _raise_open_files_limit()
        logging.getLogger("asyncio").addFilter(self._accept_errors)
        self._lag = self.metrics.watch_event_loop(asyncio.get_running_loop())
        stun_port = await self.stun.start(s.host, s.stun_port)
        media_port = await self.media.start(s.host, s.media_port)
        await self.pipe_port.start(s.host, 0)
        announce = s.announce_ip or (s.host if s.host not in ("0.0.0.0", "::", "") else "127.0.0.1")
        candidates = [Candidate.host(announce, media_port)]
        if self.media.tcp_enabled:
            candidates.append(Candidate.host(announce, media_port, transport="tcp"))
        self.sfu = Sfu(self.media, Certificate.generate(), candidates)
        self.metrics.watch_sfu(self.sfu)
        # Bound before the cluster hears of this node, listening only once it may take calls.
        http_socket = bind_tcp(s.host, s.port)
        http_port = http_socket.getsockname()[1]
        try:
            me = NodeInfo(
                id=s.node_id,
                url=(s.public_url or f"{scheme}://{_url_host(announce)}:{http_port}").rstrip("/"),
                media=f"{_url_host(announce)}:{media_port}",
                role="standby" if s.standby_for else "active",
                standby_for=s.standby_for,
                serves=None if s.standby_for else s.node_id,
                rooms={},
            )
            self.cluster = self._membership(me)
            await self.cluster.start()
            if not s.secret:
                shared = await self.cluster.shared_secret()
                if shared is not None:
                    self.calls.resume_key = ResumeKey(shared)
        except BaseException:
            http_socket.close()
            raise
        self.spans = Spans(
            self.calls,
            node_id=s.node_id,
            key=self.calls.resume_key.derive(KEY_LABEL),
            port=self.pipe_port,
            announce=announce,
            locate=self._locate,
            count_error=self._count_error,
        )
        # Every node of a cluster and every --workers sibling derives the same secret, so that credentials
        # one hands out work on all of them.
        turn_secret = s.turn_secret.encode() if s.turn_secret else self.calls.resume_key.derive(b"turn")
        # The SFU's media port is the one address of this node a relayed client may reach: a browser whose
        # UDP is blocked gets to the SFU by TURN over TCP.
        self.turn.policy.set_services({(announce, media_port), (s.host, media_port)})
        await self.turn.start(
            secret=turn_secret,
            host=s.host,
            addresses=relay_addresses(s.host, announce),
            stun=self.stun,
            tls_port=s.turn_tls_port if s.tls_cert else None,
            tls_cert=s.tls_cert,
            tls_key=s.tls_key,
        )
        await self.recordings.start()
        ctx = Context(
            settings=s,
            calls=self.calls,
            metrics=self.metrics,
            stun_port=stun_port,
            recordings=self.recordings,
            cluster=self.cluster,
            spans=self.spans,
            turn=TurnAccess(turn_secret, stun_port, self.turn.tls_port),
        )
        self._runner = web.AppRunner(
            build_app(ctx), access_log=None, handle_signals=False, logger=HttpErrorLog(self.metrics)
        )
        await self._runner.setup()
        guard = ConnectionGuard(self.metrics, per_address=s.max_connections_per_address)
        context = certificate.context if certificate is not None else None
        await GuardedSite(self._runner, http_socket, guard, context).start()
        self._reporter = asyncio.get_running_loop().create_task(self._report())
        self.calls.room_closed.append(self._release)
        if s.secret and weak_secret(s.secret):
            event(
                log,
                logging.WARNING,
                "the --secret is short: use at least 32 random bytes, e.g. from "
                "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`",
            )
        ports = Ports(http=http_port, stun=stun_port, media=media_port, scheme=scheme)
        event(
            log,
            logging.INFO,
            "serving",
            url=f"{scheme}://{_url_host(s.host)}:{http_port}",
            stun=stun_port,
            media=media_port,
            open_rooms=s.open_rooms,
            node=s.node_id,
            role=me.role,
        )
        return ports

    def _membership(self, me: NodeInfo) -> Membership:
        s = self.settings
        membership: Membership
        if s.zookeeper:
            from huddle.cluster.zookeeper import ZooKeeperMembership

            membership = ZooKeeperMembership(
                s.zookeeper,
                me=me,
                standby_for=s.standby_for,
                session_timeout=s.zk_session_timeout,
                count_error=self._count_error,
            )
        elif s.worker_ids:
            from huddle.cluster.static import Workers

            membership = Workers(me, tuple(s.worker_ids.split(",")))
        else:
            membership = SingleNode(me)
        membership.on_fenced = self._fenced
        membership.on_serving = self._serving
        return membership

    async def _locate(self, room: str) -> tuple[str, str]:
        """The node id of a call's home (its hub), and the URL of its /pipe for this call."""
        assert self.cluster is not None
        owner = await self.cluster.owner(room)
        # A --workers sibling through the parent's plain door on the loopback: the public URL may be TLS
        # (with a certificate this process need not trust) or a proxy's, out of reach from inside.
        via = replace(owner, url=self.settings.pipe_url) if self.settings.pipe_url else owner
        return owner.id, f"{ws_url(via, '/pipe')}&room={room}"

    def _release(self, room) -> None:
        """An emptied call's placement is forgotten, so that its next start is placed afresh (a fenced node
        releases nothing: its membership knows it serves no slot; a node the call spilled over to holds no
        placement: the home does)."""
        assert self.cluster is not None
        if room.spilled:
            return
        task = asyncio.get_running_loop().create_task(self.cluster.release(room.name))
        self._releases.add(task)
        task.add_done_callback(self._released)

    def _released(self, task: asyncio.Task[None]) -> None:
        self._releases.discard(task)
        if not task.cancelled() and task.exception() is not None:
            event(log, logging.WARNING, "cannot forget a call's placement", error=repr(task.exception()))

    def _count_error(self, kind: str) -> None:
        self.metrics.errors.labels(kind=kind).inc()

    def _fenced(self, why: str) -> None:
        """Another node may serve our calls from now on: forward nothing more, and send every client on."""
        event(log, logging.WARNING, "no longer serving calls", reason=why, rooms=len(self.calls))
        self.calls.drop_all(CLOSE_SERVICE_RESTART, "this node stopped serving the call; reconnecting")
        if self.cluster is not None:
            self.cluster.report(self.calls.rooms())

    def _serving(self, slot: str) -> None:
        event(log, logging.WARNING if slot != self.settings.node_id else logging.INFO, "serving", slot=slot)

    async def _report(self) -> None:
        """Keep the cluster's view of this node's calls current (only when they changed)."""
        assert self.cluster is not None
        last: dict[str, int] | None = None
        while True:
            rooms = self.calls.rooms()
            if rooms != last:
                self.cluster.report(rooms)
                last = rooms
            await asyncio.sleep(REPORT_SECONDS)

    async def stop(self) -> None:
        if self._reporter is not None:
            self._reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reporter
            self._reporter = None
        # Recordings first, while their calls still run: their files are finished and stay playable.
        await self.recordings.close()
        # Let a standby take the calls before their clients come looking for them.
        if self.cluster is not None:
            await self.cluster.stop()
        self.calls.drop_all(CLOSE_SERVICE_RESTART, "the server is restarting; reconnecting")
        if self.spans is not None:
            await self.spans.close()
        self.pipe_port.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.sfu is not None:
            await self.sfu.close()
        await self.media.close()
        await self.turn.close()
        await self.stun.close()
        if self._lag is not None:
            self._lag.stop()
            self._lag = None
        logging.getLogger("asyncio").removeFilter(self._accept_errors)

    def _router(self, room):
        assert self.sfu is not None, "the node starts its SFU before it admits anyone"
        return self.sfu.router(room, self.calls.remove_participant)


def resume_key(settings: Settings) -> ResumeKey:
    """The key every node of this deployment signs resume tokens with: derived from --secret when there is
    one; else kept in the recordings folder, so that a restarted node (or a --workers sibling, which shares
    the folder) still takes its clients' tokens."""
    if settings.secret:
        return ResumeKey.from_secret(settings.secret)
    path = Path(settings.recordings_dir) / ".resume-key"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # Written whole under another name, then linked: a sibling starting at the same time reads the one
        # key that won, never a half-written file.
        draft = path.with_name(f".resume-key.{os.getpid()}")
        draft.write_text(secrets.token_hex(32) + "\n")
        draft.chmod(0o600)
        with contextlib.suppress(FileExistsError):
            os.link(draft, path)
        draft.unlink()
    key = path.read_text().strip()
    try:
        return ResumeKey(bytes.fromhex(key))
    except ValueError:
        raise ValueError(f"{path} does not hold a resume key; delete it and a new one is made") from None


def _raise_open_files_limit() -> None:
    """Every connection, call and recording costs descriptors; the usual soft limit of 1,024 is a few hundred
    participants. The hard limit is what the administrator allows, so take all of it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:
            event(
                log,
                logging.WARNING,
                "cannot raise the open files limit",
                soft=soft,
                hard=hard,
                error=str(exc),
            )
    event(log, logging.INFO, "open files limit", soft=soft, hard=hard)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
