"""One Huddle node: signaling over HTTP/WebSocket, the STUN server and the media port, started together."""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
from dataclasses import dataclass

from aiohttp import web

from huddle.calls.registry import Calls
from huddle.config import Settings
from huddle.logs import RateLimit, event
from huddle.metrics import LoopLagMonitor, Metrics
from huddle.recording.manager import Recordings
from huddle.rtc.certificate import Certificate
from huddle.rtc.port import MediaPort
from huddle.rtc.sdp import Candidate
from huddle.sfu.router import Sfu
from huddle.signaling.app import build_app
from huddle.signaling.connections import ConnectionGuard, GuardedSite, HttpErrorLog
from huddle.signaling.session import Context
from huddle.signaling.tokens import weak_secret
from huddle.stun import StunServer

log = logging.getLogger("huddle.node")

# What asyncio logs, with a traceback, for every accept() that fails for want of file descriptors.
ACCEPT_ERROR = "socket.accept() out of system resource"


@dataclass(frozen=True, slots=True)
class Ports:
    http: int
    stun: int
    media: int


class Node:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.media = MediaPort(self.metrics, max_connections_per_address=settings.max_connections_per_address)
        self.sfu: Sfu | None = None
        self.calls = Calls(
            capacity=settings.max_participants,
            reconnect_grace=settings.reconnect_grace,
            sfu_always=settings.sfu_always,
            router_factory=self._router,
        )
        self.metrics.rooms.set_function(lambda: len(self.calls))
        self.metrics.participants.set_function(self.calls.participant_count)
        self.stun = StunServer(self.metrics, max_connections_per_address=settings.max_connections_per_address)
        self.recordings = Recordings.from_settings(self.calls, settings)
        self._runner: web.AppRunner | None = None
        self._lag: LoopLagMonitor | None = None
        accept_errors = self.metrics.errors.labels(kind="accept_error")
        self._accept_errors = RateLimit(ACCEPT_ERROR, on_match=accept_errors.inc)

    async def start(self) -> Ports:
        s = self.settings
        _raise_open_files_limit()
        logging.getLogger("asyncio").addFilter(self._accept_errors)
        self._lag = self.metrics.watch_event_loop(asyncio.get_running_loop())
        stun_port = await self.stun.start(s.host, s.stun_port)
        media_port = await self.media.start(s.host, s.media_port)
        announce = s.announce_ip or (s.host if s.host not in ("0.0.0.0", "::", "") else "127.0.0.1")
        candidates = [Candidate.host(announce, media_port)]
        if self.media.tcp_enabled:
            candidates.append(Candidate.host(announce, media_port, transport="tcp"))
        self.sfu = Sfu(self.media, Certificate.generate(), candidates)
        self.metrics.watch_sfu(self.sfu)
        await self.recordings.start()
        ctx = Context(
            settings=s,
            calls=self.calls,
            metrics=self.metrics,
            stun_port=stun_port,
            recordings=self.recordings,
        )
        self._runner = web.AppRunner(
            build_app(ctx), access_log=None, handle_signals=False, logger=HttpErrorLog(self.metrics)
        )
        await self._runner.setup()
        guard = ConnectionGuard(self.metrics, per_address=s.max_connections_per_address)
        site = GuardedSite(self._runner, s.host, s.port, guard)
        await site.start()
        http_port = next(
            sock.getsockname()[1] for sock in site.sockets if sock.family in (socket.AF_INET, socket.AF_INET6)
        )
        if s.secret and weak_secret(s.secret):
            event(
                log,
                logging.WARNING,
                "the --secret is short: use at least 32 random bytes, e.g. from "
                "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`",
            )
        ports = Ports(http=http_port, stun=stun_port, media=media_port)
        event(
            log,
            logging.INFO,
            "serving",
            url=f"http://{_url_host(s.host)}:{http_port}",
            stun=stun_port,
            media=media_port,
            open_rooms=s.open_rooms,
        )
        return ports

    async def stop(self) -> None:
        # Recordings first, while their calls still run: their files are finished and stay playable.
        await self.recordings.close()
        self.calls.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.sfu is not None:
            await self.sfu.close()
        await self.media.close()
        await self.stun.close()
        if self._lag is not None:
            self._lag.stop()
            self._lag = None
        logging.getLogger("asyncio").removeFilter(self._accept_errors)

    def _router(self, room):
        assert self.sfu is not None, "the node starts its SFU before it admits anyone"
        return self.sfu.router(room, self.calls.remove_participant)


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
