"""`huddle serve --workers N`: N node processes on this machine behind one public HTTP port.

The parent owns the public port and nothing else: it starts N ordinary `huddle serve` children (the workers
w0..wN-1), proxies HTTP and WebSocket traffic to them, and restarts one that dies. Calls are placed over the
workers by the same rendezvous hashing as a cluster (`placement.choose`); a worker that gets a join for a call
it does not own redirects it to `/ws?node=wI`, which this proxy sends to that worker. Media never passes
through the parent: each worker has its own STUN and media ports.

With TLS (--tls-cert/--tls-key or --self-signed) the parent serves HTTPS and WSS on the public port and talks
plain HTTP to its workers; each worker serves TURN over TLS itself with the same certificate. The workers
reach each other's /pipe through the parent's plain door on the loopback, never the public URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, fields
from typing import Final

import aiohttp
from aiohttp import web
from prometheus_client import generate_latest

from huddle import config, tls
from huddle.cluster.placement import choose
from huddle.config import Settings
from huddle.logs import event
from huddle.metrics import CONTENT_TYPE_LATEST, Metrics
from huddle.node import Ports, resume_key
from huddle.signaling.app import HARD_FRAME_LIMIT
from huddle.signaling.connections import ConnectionGuard, GuardedSite, HttpErrorLog, bind_tcp

__all__ = ["WorkerFailed", "Workers"]

log = logging.getLogger("huddle.workers")

# The parent applies --max-connections-per-address on the public port; every connection a worker sees comes
# from the parent, so a worker's own cap must never bite.
WORKER_MAX_CONNECTIONS: Final = 1_000_000
READY_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 5.0
# A worker that dies within this many seconds of being ready (or before) is restarted after a growing delay,
# so that one that cannot run (a broken disk, say) does not spin a core; one that ran longer, at once.
HEALTHY_SECONDS: Final = 5.0
RESTART_DELAYS: Final = (0.5, 1.0, 2.0, 4.0, 8.0)
NODE_TIMEOUT: Final = aiohttp.ClientTimeout(total=2.0)
CONNECT_TIMEOUT: Final = aiohttp.ClientTimeout(total=None, sock_connect=2.0)
# Headers that belong to one hop (RFC 9110 7.6.1) or to the WebSocket handshake of one hop.
_HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-accept",
        "sec-websocket-protocol",
    }
)
# Close codes a peer may receive but nobody may send (RFC 6455 7.4.1).
_RESERVED_CLOSE_CODES: Final = frozenset({1005, 1006, 1015})
CLOSE_GOING_AWAY: Final = 1001
CLOSE_SERVICE_RESTART: Final = 1012


class WorkerFailed(Exception):
    """A worker could not start; the message says which and why."""


@dataclass(slots=True)
class _Worker:
    id: str
    stun_port: int  # what it is started with: base + index, or 0
    media_port: int
    turn_tls_port: int
    process: asyncio.subprocess.Process | None = None
    http: int | None = None  # its HTTP port while it is up and ready
    stun: int = 0  # as bound (its ready line)
    media: int = 0
    started: float = 0.0
    restarts: int = 0
    quick_deaths: int = 0


class Workers:
    """The parent process of `huddle serve --workers N`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        count = config.worker_count(settings)
        self.ids = tuple(f"w{i}" for i in range(count))
        self._workers = {
            wid: _Worker(
                wid,
                _offset(settings.stun_port, i),
                _offset(settings.media_port, i),
                _offset(settings.turn_tls_port, i),
            )
            for i, wid in enumerate(self.ids)
        }
        self.metrics = Metrics()
        self.public_url = ""
        self.pipe_url = ""
        self._dial = _dial_host(settings.host)
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self._watchers: list[asyncio.Task[None]] = []

    async def start(self) -> Ports:
        """Raises TlsError (before it takes any port) when the certificate or key cannot serve."""
        if self.settings.self_signed:
            # Made here, once; the workers are given it as --tls-cert/--tls-key.
            self.settings = tls.with_self_signed(self.settings)
        s = self.settings
        certificate = tls.load(s.tls_cert, s.tls_key) if s.tls_cert and s.tls_key else None
        scheme = "https" if certificate is not None else "http"
        # Bound first: a port in use is reported before any worker starts, and the workers learn the URL.
        sock = bind_tcp(s.host, s.port)
        port = sock.getsockname()[1]
        try:
            door = bind_tcp("127.0.0.1", 0)
        except BaseException:
            sock.close()
            raise
        self.pipe_url = f"http://127.0.0.1:{door.getsockname()[1]}"
        announce = s.announce_ip or (s.host if s.host not in ("0.0.0.0", "::", "") else "127.0.0.1")
        self.public_url = (s.public_url or f"{scheme}://{_url_host(announce)}:{port}").rstrip("/")
        try:
            # Made here, once: workers that start together would race to create it.
            resume_key(s)
            results = await asyncio.gather(
                *(self._spawn(w) for w in self._workers.values()), return_exceptions=True
            )
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                raise failed[0]
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                timeout=CONNECT_TIMEOUT,
            )
            self._runner = web.AppRunner(
                self._app(), access_log=None, handle_signals=False, logger=HttpErrorLog(self.metrics)
            )
            await self._runner.setup()
            guard = ConnectionGuard(self.metrics, per_address=s.max_connections_per_address)
            context = certificate.context if certificate is not None else None
            await GuardedSite(self._runner, sock, guard, context).start()
            # Only this machine's processes reach the door, the workers' links above all: no cap per address.
            door_guard = ConnectionGuard(self.metrics, per_address=WORKER_MAX_CONNECTIONS)
            await GuardedSite(self._runner, door, door_guard).start()
        except BaseException:
            sock.close()
            door.close()
            await self.stop()
            raise
        loop = asyncio.get_running_loop()
        self._watchers = [loop.create_task(self._watch(w)) for w in self._workers.values()]
        event(log, logging.INFO, "serving", url=self.public_url, workers=len(self.ids))
        first = self._workers[self.ids[0]]
        return Ports(http=port, stun=first.stun, media=first.media, scheme=scheme)

    async def stop(self) -> None:
        for task in self._watchers:
            task.cancel()
        for task in self._watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._watchers = []
        # The proxy keeps running meanwhile, so that the workers' goodbyes (close 1012) reach their clients.
        await asyncio.gather(*(self._terminate(w) for w in self._workers.values()))
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    # Workers

    def _command(self, w: _Worker) -> list[str]:
        return [
            sys.executable,
            "-m",
            "huddle",
            "serve",
            "--workers",
            "1",
            "--host",
            self.settings.host,
            "--port",
            "0",
            "--node-id",
            w.id,
            "--worker-ids",
            ",".join(self.ids),
            "--public-url",
            self.public_url,
            "--pipe-url",
            self.pipe_url,
            "--stun-port",
            str(w.stun_port),
            "--media-port",
            str(w.media_port),
            "--turn-tls-port",
            str(w.turn_tls_port),
            "--max-connections-per-address",
            str(WORKER_MAX_CONNECTIONS),
        ]

    def _environment(self) -> dict[str, str]:
        """Every other setting, through the environment: the secret must not show in `ps`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("HUDDLE_")}
        for f in fields(Settings):
            value = getattr(self.settings, f.name)
            # The secret is passed as read; the file may be gone or unreadable to a restarted worker.
            if value is None or f.name == "secret_file":
                continue
            env[config.env_name(f.name)] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        return env

    async def _spawn(self, w: _Worker) -> None:
        """Start the worker and wait for its ready line; raise WorkerFailed if it does not get there."""
        loop = asyncio.get_running_loop()
        w.started = loop.time()
        # Its own session: a Ctrl-C in a terminal reaches the parent alone, which stops the workers in order.
        process = await asyncio.create_subprocess_exec(
            *self._command(w),
            env=self._environment(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        w.process = process
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), READY_TIMEOUT)
        except TimeoutError:
            await _kill(process)
            raise WorkerFailed(f"worker {w.id} was not ready within {READY_TIMEOUT:g} s") from None
        try:
            ready = json.loads(line)
            http, stun, media = int(ready["http"]), int(ready["stun"]), int(ready["media"])
        except (ValueError, KeyError, TypeError):
            code = await _kill(process) if line else await process.wait()
            raise WorkerFailed(
                f"worker {w.id} exited with code {code} before it was ready (its error is above)"
            ) from None
        w.http, w.stun, w.media = http, stun, media
        w.started = loop.time()
        event(log, logging.DEBUG, "worker ready", worker=w.id, pid=process.pid, http=http)

    async def _watch(self, w: _Worker) -> None:
        """Restart the worker whenever it exits, with the same id and UDP ports."""
        loop = asyncio.get_running_loop()
        while True:
            process = w.process
            assert process is not None and process.stdout is not None
            # Nothing but the ready line is expected; read on so that the pipe never fills.
            while await process.stdout.read(4096):
                pass
            code = await process.wait()
            w.http = None
            ran = loop.time() - w.started
            w.quick_deaths = w.quick_deaths + 1 if ran < HEALTHY_SECONDS else 0
            delay = RESTART_DELAYS[min(w.quick_deaths, len(RESTART_DELAYS)) - 1] if w.quick_deaths else 0.0
            w.restarts += 1
            self.metrics.errors.labels(kind="worker_restart").inc()
            event(
                log,
                logging.WARNING,
                "worker exited; restarting it",
                worker=w.id,
                pid=process.pid,
                code=code,
                up_seconds=round(ran, 1),
                restarts=w.restarts,
                delay=delay,
            )
            await asyncio.sleep(delay)
            try:
                await self._spawn(w)
            except WorkerFailed as exc:
                event(log, logging.ERROR, "worker restart failed", worker=w.id, error=str(exc))

    async def _terminate(self, w: _Worker) -> None:
        process, w.process, w.http = w.process, None, None
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            event(log, logging.WARNING, "worker did not stop; killing it", worker=w.id, pid=process.pid)
            await _kill(process)

    # Proxy

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_route("*", "/ws", self._websocket)
        # Links of calls spread over several workers (their control: media goes from worker to worker).
        app.router.add_route("*", "/pipe", self._websocket)
        app.router.add_get("/api/cluster", self._cluster)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_route("*", "/api/rooms/{room}", self._room)
        app.router.add_route("*", "/api/rooms/{room}/{tail:.*}", self._room)
        app.router.add_route("*", "/{tail:.*}", self._default)
        return app

    def _base(self, wid: str) -> str:
        port = self._workers[wid].http
        if port is None:
            raise web.HTTPServiceUnavailable(
                text=f"worker {wid} is restarting; try again in a moment\n", headers={"Retry-After": "1"}
            )
        return f"http://{_url_host(self._dial)}:{port}"

    async def _default(self, request: web.Request) -> web.StreamResponse:
        return await self._forward(request, self.ids[0])

    async def _room(self, request: web.Request) -> web.StreamResponse:
        wid = choose(request.match_info["room"], self.ids)
        assert wid is not None
        return await self._forward(request, wid)

    async def _forward(self, request: web.Request, wid: str) -> web.StreamResponse:
        assert self._http is not None
        url = self._base(wid) + request.rel_url.raw_path_qs
        body = await request.read() if request.body_exists else None
        try:
            async with self._http.request(
                request.method, url, headers=_upstream_headers(request), data=body, allow_redirects=False
            ) as upstream:
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for name, value in upstream.headers.items():
                    if name.lower() not in _HOP_BY_HOP:
                        response.headers.add(name, value)
                if upstream.content_length is not None:
                    response.content_length = upstream.content_length
                await response.prepare(request)
                async for chunk in upstream.content.iter_chunked(65536):
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            if request.transport is None or request.transport.is_closing():
                raise
            event(log, logging.DEBUG, "worker unreachable", worker=wid, error=str(exc))
            raise web.HTTPServiceUnavailable(
                text=f"worker {wid} is restarting; try again in a moment\n", headers={"Retry-After": "1"}
            ) from None

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        wid = request.query.get("node") or self.ids[0]
        if wid not in self._workers:
            raise web.HTTPNotFound(text=f"no worker {wid!r} here\n")
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return await self._forward(request, wid)
        assert self._http is not None
        protocols = [
            p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
        ]
        try:
            upstream = await self._http.ws_connect(
                self._base(wid) + request.rel_url.raw_path_qs,
                headers=_upstream_headers(request),
                protocols=protocols,
                autoclose=False,
                autoping=False,
                max_msg_size=0,
                compress=0,
            )
        except aiohttp.WSServerHandshakeError as exc:
            # The worker refused it (origin, say): the browser gets the worker's answer.
            return web.Response(status=exc.status, text=f"{exc.message}\n")
        except (aiohttp.ClientConnectionError, TimeoutError):
            raise web.HTTPServiceUnavailable(
                text=f"worker {wid} is restarting; try again in a moment\n", headers={"Retry-After": "1"}
            ) from None
        # Pings and pongs pass through, so that the worker's heartbeat measures the browser, not the parent.
        ws = web.WebSocketResponse(
            autoclose=False,
            autoping=False,
            max_msg_size=HARD_FRAME_LIMIT,
            compress=False,
            protocols=(upstream.protocol,) if upstream.protocol else (),
        )
        try:
            await ws.prepare(request)
        except BaseException:
            await upstream.close()
            raise
        down = asyncio.ensure_future(_pump(upstream, ws, CLOSE_SERVICE_RESTART, "the worker stopped"))
        up = asyncio.ensure_future(_pump(ws, upstream, CLOSE_GOING_AWAY, "the client went away"))
        try:
            await asyncio.wait((down, up), return_when=asyncio.FIRST_COMPLETED)
            # The other pump ends once its source is closed (it reads CLOSING or CLOSED).
            await asyncio.wait((down, up), timeout=STOP_TIMEOUT)
        finally:
            for task in (down, up):
                task.cancel()
            await asyncio.gather(down, up, return_exceptions=True)
            if not upstream.closed:
                await upstream.close()
            if not ws.closed:
                await ws.close()
        return ws

    async def _ask_all(self, request: web.Request, path: str) -> list[tuple[_Worker, bytes]] | web.Response:
        """GET `path` of every live worker with the client's credentials: the answers of those that answered,
        or the first refusal (every worker applies the same rule, e.g. the API key with --secret)."""
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        live = [w for w in self._workers.values() if w.http is not None]

        async def ask(w: _Worker) -> tuple[int, bytes, dict[str, str]] | None:
            assert self._http is not None
            url = f"http://{_url_host(self._dial)}:{w.http}{path}"
            try:
                async with self._http.get(url, headers=headers, timeout=NODE_TIMEOUT) as resp:
                    return resp.status, await resp.read(), dict(resp.headers)
            except (aiohttp.ClientError, TimeoutError):
                return None  # it died meanwhile: the parent restarts it

        bodies = []
        for w, answer in zip(live, await asyncio.gather(*(ask(w) for w in live)), strict=True):
            if answer is None:
                continue
            status, body, answer_headers = answer
            if status != 200:
                keep = {k: v for k, v in answer_headers.items() if k.lower() not in _HOP_BY_HOP}
                return web.Response(status=status, body=body, headers=keep)
            bodies.append((w, body))
        return bodies

    async def _cluster(self, request: web.Request) -> web.Response:
        """Every live worker's own view of itself (GET /api/node), as a node answers GET /api/cluster."""
        answers = await self._ask_all(request, "/api/node")
        if isinstance(answers, web.Response):
            return answers
        nodes = []
        for w, body in answers:
            try:
                node = json.loads(body)
            except ValueError:
                continue
            node["pid"] = w.process.pid if w.process is not None else None
            node["restarts"] = w.restarts
            nodes.append(node)
        return web.json_response({"self": "workers", "nodes": nodes})

    async def _metrics(self, request: web.Request) -> web.Response:
        """Every live worker's metrics, labelled worker="wI", and the parent's (worker="parent")."""
        answers = await self._ask_all(request, "/metrics")
        if isinstance(answers, web.Response):
            return answers
        merged = _MergedMetrics()
        for w, body in answers:
            merged.add(w.id, body.decode("utf-8", "replace"))
        # The parent's own: its process, and its errors (the public port's connection guard, restarts).
        merged.add("parent", generate_latest(self.metrics.registry).decode(), ("process_", "huddle_errors"))
        return web.Response(body=merged.render().encode(), headers={"Content-Type": CONTENT_TYPE_LATEST})


class _MergedMetrics:
    """Prometheus text expositions of several processes as one: each family once, its samples from all of
    them, each sample labelled with the process it came from."""

    def __init__(self) -> None:
        self._meta: dict[str, dict[str, str]] = {}  # family -> its HELP and TYPE lines
        self._samples: dict[str, list[str]] = {}

    def add(self, source: str, text: str, families: tuple[str, ...] = ("",)) -> None:
        """Add the families of `text` whose names start with one of `families`."""
        label = f'worker="{source}"'
        family: list[str] | None = None
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                name = line.split(" ", 3)[2]
                if not name.startswith(families):
                    family = None
                    continue
                self._meta.setdefault(name, {}).setdefault(line[2:6], line)
                family = self._samples.setdefault(name, [])
            elif line and not line.startswith("#") and family is not None:
                name, brace, rest = line.partition("{")
                if not brace:
                    name, _, rest = line.partition(" ")
                    rest = "} " + rest
                family.append(f"{name}{{{label}{'' if rest.startswith('}') else ','}{rest}")

    def render(self) -> str:
        lines = []
        for name, samples in self._samples.items():
            lines += self._meta[name].values()
            lines += samples
        return "\n".join(lines) + "\n"


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    lost_code: int,
    lost_reason: str,
) -> None:
    """Copy frames from `source` to `sink` until `source` closes, then close `sink` the same way."""
    WS = aiohttp.WSMsgType
    while True:
        msg = await source.receive()
        try:
            if msg.type is WS.TEXT:
                await sink.send_str(msg.data)
            elif msg.type is WS.BINARY:
                await sink.send_bytes(msg.data)
            elif msg.type is WS.PING:
                await sink.ping(msg.data)
            elif msg.type is WS.PONG:
                await sink.pong(msg.data)
            elif msg.type is WS.CLOSE:
                code = (
                    msg.data if isinstance(msg.data, int) and msg.data not in _RESERVED_CLOSE_CODES else 1000
                )
                reason = (msg.extra or "").encode()[:123]
                await source.close(code=code, message=reason)
                await sink.close(code=code, message=reason)
                return
            elif msg.type is WS.CLOSING:
                # The other pump is closing `source`: it has told `sink` already.
                return
            else:
                # CLOSED or ERROR: `source` went away without a close frame.
                await sink.close(code=lost_code, message=lost_reason.encode())
                return
        except (ConnectionError, RuntimeError, aiohttp.ClientError):
            # `sink` is gone; its own pump tells `source`.
            return


def _upstream_headers(request: web.Request) -> dict[str, str]:
    """The browser's headers as it sent them (Host and Origin too: the worker checks the public origin),
    plus X-Forwarded-For."""
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    if isinstance(peer, tuple):
        prior = request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{prior}, {peer[0]}" if prior else str(peer[0])
    return headers


async def _kill(process: asyncio.subprocess.Process) -> int:
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    return await process.wait()


def _offset(base: int, index: int) -> int:
    """Worker `index`'s port from a base port: 0 (any free port) stays 0."""
    return base + index if base else 0


def _dial_host(host: str) -> str:
    """Where the parent reaches a worker that listens on `host`."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
