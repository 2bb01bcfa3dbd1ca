"""One Huddle node: signaling over HTTP/WebSocket, the STUN server and the media port, started together."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from aiohttp import web

from huddle.calls.registry import Calls
from huddle.config import Settings
from huddle.logs import event
from huddle.metrics import Metrics
from huddle.recording.manager import Recordings
from huddle.rtc.certificate import Certificate
from huddle.rtc.port import MediaPort
from huddle.rtc.sdp import Candidate
from huddle.sfu.router import Sfu
from huddle.signaling.app import build_app
from huddle.signaling.session import Context
from huddle.signaling.tokens import weak_secret
from huddle.stun import StunServer

log = logging.getLogger("huddle.node")


@dataclass(frozen=True, slots=True)
class Ports:
    http: int
    stun: int
    media: int


class Node:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.media = MediaPort(self.metrics)
        self.sfu: Sfu | None = None
        self.calls = Calls(
            capacity=settings.max_participants,
            reconnect_grace=settings.reconnect_grace,
            sfu_always=settings.sfu_always,
            router_factory=self._router,
        )
        self.metrics.rooms.set_function(lambda: len(self.calls))
        self.metrics.participants.set_function(self.calls.participant_count)
        self.stun = StunServer(self.metrics)
        self.recordings = Recordings.from_settings(self.calls, settings)
        self._runner: web.AppRunner | None = None

    async def start(self) -> Ports:
        s = self.settings
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
        self._runner = web.AppRunner(build_app(ctx), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.host, s.port, reuse_address=True)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        http_port = next(
            sock.getsockname()[1]
            for sock in server.sockets
            if sock.family in (socket.AF_INET, socket.AF_INET6)
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

    def _router(self, room):
        assert self.sfu is not None, "the node starts its SFU before it admits anyone"
        return self.sfu.router(room, self.calls.remove_participant)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
