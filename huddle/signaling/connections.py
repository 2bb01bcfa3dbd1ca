"""Admission and deadlines for the HTTP/WebSocket listener, one layer below aiohttp.

aiohttp accepts every connection and, by default, lets one that never finishes its request headers live for an
hour. `ConnectionGuard` sits between the listening socket and aiohttp's per-connection protocol: it refuses
a connection at once when its address already holds `per_address` of them, closes one whose request headers
are not complete `header_timeout` seconds after it opened (or after the first byte of a later request), and
one that has waited `idle_timeout` seconds for its next request. A request in progress, such as a WebSocket
session, is never cut: its own heartbeat and join timeouts look after it. Every closure is counted in
`huddle_errors`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.log import server_logger
from aiohttp.web_protocol import RequestHandler

from huddle.logs import event
from huddle.metrics import Metrics

__all__ = ["ConnectionGuard", "GuardedSite", "HttpErrorLog"]

log = logging.getLogger("huddle.signaling")

HEADER_TIMEOUT: Final = 10.0
IDLE_TIMEOUT: Final = 30.0
# Connections the kernel completes while we are busy: beyond it a client's SYN is dropped and it retries
# only a second later. A call's start brings many joins at once, and a flood must not push them out.
BACKLOG: Final = 1024
# A client that opens a TLS connection and never finishes its handshake holds it this long at most.
HANDSHAKE_TIMEOUT: Final = 10.0
# Label values of huddle_errors{kind=...}.
PER_ADDRESS_LIMIT: Final = "http_per_address_limit"
HEADER_TIMEOUT_KIND: Final = "http_header_timeout"
IDLE_TIMEOUT_KIND: Final = "http_idle_timeout"
BAD_REQUEST_KIND: Final = "http_bad_request"


class HttpErrorLog:
    """The logger aiohttp's request handlers are given (`AppRunner(logger=...)`).

    A request that is not HTTP (TLS or random bytes on the plain port, a header line without a colon) is the
    client's doing: aiohttp answers 400 and closes, and logs it with a traceback at error level, which anyone
    could repeat to fill the logs. Such requests are counted and logged at debug level only; everything else,
    such as an exception in one of our handlers, goes to aiohttp's logger with its traceback as before.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._bad_requests = metrics.errors.labels(kind=BAD_REQUEST_KIND)

    def _client_error(self, exc_info: object, args: tuple[Any, ...]) -> bool:
        if not isinstance(exc_info, HttpProcessingError):
            return False
        self._bad_requests.inc()
        address = args[0] if args else None
        event(log, logging.DEBUG, "bad HTTP request", address=str(address), error=str(exc_info)[:200])
        return True

    def debug(self, msg: str, *args: Any, exc_info: object = None, **kwargs: Any) -> None:
        if not self._client_error(exc_info, args):
            server_logger.debug(msg, *args, exc_info=exc_info, **kwargs)  # type: ignore[arg-type]

    def exception(self, msg: str, *args: Any, exc_info: object = True, **kwargs: Any) -> None:
        if not self._client_error(exc_info, args):
            server_logger.exception(msg, *args, exc_info=exc_info, **kwargs)  # type: ignore[arg-type]


class ConnectionGuard:
    def __init__(
        self,
        metrics: Metrics,
        *,
        per_address: int,
        header_timeout: float = HEADER_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.per_address = per_address
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self._errors = metrics.errors
        self._open: dict[str, int] = {}
        self._connections: dict[RequestHandler, _Connection] = {}

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """The factory to give `loop.create_server` instead of aiohttp's `server` itself."""
        handle = server.request_handler
        connections = self._connections

        async def request_handler(request: web.BaseRequest) -> web.StreamResponse:
            # aiohttp calls this once a request's headers are complete; it returns before a returned
            # response (a file, say) is written, which the idle deadline allows for (see _Connection._expire).
            connection = connections.get(request.protocol)
            if connection is None:
                return await handle(request)
            connection.busy += 1
            connection.disarm()
            try:
                return await handle(request)
            finally:
                connection.busy -= 1
                if connection.busy == 0:
                    connection.arm(self.idle_timeout, IDLE_TIMEOUT_KIND)

        # Read by each RequestHandler when it is made, so this is set before the first connection.
        server.request_handler = request_handler
        return lambda: _Connection(self, server)

    def _admit(self, address: str) -> bool:
        count = self._open.get(address, 0)
        if count >= self.per_address:
            self._errors.labels(kind=PER_ADDRESS_LIMIT).inc()
            event(log, logging.DEBUG, "connection refused", address=address, open=count)
            return False
        self._open[address] = count + 1
        return True

    def _release(self, address: str) -> None:
        count = self._open[address] - 1
        if count:
            self._open[address] = count
        else:
            del self._open[address]


class _Connection(asyncio.Protocol):
    """Stands in for aiohttp's RequestHandler towards the transport, and hands everything on to it."""

    __slots__ = (
        "_deadline",
        "_guard",
        "_inner",
        "_reason",
        "_server",
        "_timer",
        "_transport",
        "address",
        "busy",
    )

    def __init__(self, guard: ConnectionGuard, server: web.Server) -> None:
        self._guard = guard
        self._server = server
        self._inner: RequestHandler | None = None
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._reason = HEADER_TIMEOUT_KIND
        self.address = ""
        self.busy = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if isinstance(peer, tuple) else ""
        if not self._guard._admit(self.address):
            transport.abort()
            return
        self._transport = transport
        self._inner = inner = self._server()
        self._guard._connections[inner] = self
        inner.connection_made(transport)
        self.arm(self._guard.header_timeout, HEADER_TIMEOUT_KIND)

    def data_received(self, data: bytes) -> None:
        inner = self._inner
        if inner is None:
            return
        if not self.busy and self._reason == IDLE_TIMEOUT_KIND:
            # The first bytes of the next request: its headers get no more time than a new connection's.
            deadline = asyncio.get_running_loop().time() + self._guard.header_timeout
            if deadline < self._deadline:
                self.arm(self._guard.header_timeout, HEADER_TIMEOUT_KIND)
        inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        inner, self._inner = self._inner, None
        if inner is None:
            return
        self.disarm()
        self._guard._connections.pop(inner, None)
        self._guard._release(self.address)
        self._transport = None
        inner.connection_lost(exc)

    def arm(self, delay: float, reason: str) -> None:
        self.disarm()
        if self._inner is None:
            return
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + delay
        self._reason = reason
        self._timer = loop.call_at(self._deadline, self._expire)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None:
            return
        if transport.get_write_buffer_size():
            # The last response is still on its way to a slow reader: that is not idleness.
            self.arm(self._guard.idle_timeout, IDLE_TIMEOUT_KIND)
            return
        self._guard._errors.labels(kind=self._reason).inc()
        event(log, logging.DEBUG, "connection closed", address=self.address, reason=self._reason)
        transport.close()


def bind_tcp(host: str, port: int) -> socket.socket:
    """A bound, not yet listening TCP socket: the port is known (port 0 picks one) before anyone can connect,
    so a node can tell its cluster where it is before it takes its first request."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class GuardedSite(web.BaseSite):
    """A TCP site whose connections pass through a `ConnectionGuard` before they reach aiohttp; with an SSL
    context it speaks TLS, and the guard sees a connection once its handshake is done (HANDSHAKE_TIMEOUT
    bounds it until then)."""

    __slots__ = ("_context", "_guard", "_sock")

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        guard: ConnectionGuard,
        context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner)
        self._sock = sock
        self._guard = guard
        self._context = context

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"{'https' if self._context else 'http'}://{host}:{port}"

    @property
    def sockets(self) -> list[Any]:
        return list(self._server.sockets) if self._server is not None else []

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        tls: dict[str, Any] = {}
        if self._context is not None:
            tls = {"ssl": self._context, "ssl_handshake_timeout": HANDSHAKE_TIMEOUT}
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.protocol_factory(server), sock=self._sock, backlog=BACKLOG, **tls
        )
