"""The aiohttp application: web client, WebSocket signaling, health and metrics."""

from __future__ import annotations

import hmac
import logging
import re
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import WSCloseCode, web

from huddle import config
from huddle.calls.resume import MAX_TOKEN_CHARS
from huddle.logs import event
from huddle.metrics import CONTENT_TYPE_LATEST
from huddle.recording.manager import OUTPUTS, RecordingError
from huddle.signaling.messages import MAX_MESSAGE_BYTES, valid_room_name
from huddle.signaling.session import Context, Session
from huddle.signaling.tokens import OPEN_ROOM, Permissions, TokenError, verify

log = logging.getLogger("huddle.signaling")

WEB_DIR = Path(__file__).resolve().parent.parent / "web"

# Frames up to this size are read and answered with a `too_large` error; beyond it aiohttp closes the
# socket (1009), so that nobody can make the server buffer megabytes.
HARD_FRAME_LIMIT = 4 * MAX_MESSAGE_BYTES
# The server pings every socket when it has been silent this long and drops it when no pong comes within
# half of it: a tab that vanished without closing its socket is gone for the others within 6 s.
HEARTBEAT_SECONDS = 4.0

CONTEXT = web.AppKey("context", Context)
SOCKETS = web.AppKey("sockets", weakref.WeakSet)
ORIGINS = web.AppKey("origins", frozenset)

# What the API key may do: everything a token could allow.
API_KEY_PERMISSIONS = Permissions(record=True, download=True)

# Join tokens travel in page URLs, so no other site may frame the pages, and no page leaks its URL onwards.
# Scripts and styles come from files only; media elements play MediaStreams, which CSP does not govern.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "media-src 'self' blob: data:; connect-src 'self'{websocket}; frame-ancestors 'none'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'"
)
_SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Permissions-Policy": "camera=(self), microphone=(self), display-capture=(self)",
}
# A Host header that can go into the CSP as it is (anything else could add directives of its own).
_PLAIN_HOST = re.compile(r"[A-Za-z0-9.-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")
_STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def build_app(ctx: Context) -> web.Application:
    app = web.Application(client_max_size=1024 * 1024, middlewares=[_check_origin])
    app[CONTEXT] = ctx
    app[SOCKETS] = weakref.WeakSet()
    app[ORIGINS] = config.origins(ctx.settings)
    app.on_response_prepare.append(_security_headers)
    app.router.add_get("/", _page("index.html"))
    app.router.add_get("/r/{room}", _page("call.html"))
    app.router.add_get("/ws", _websocket)
    app.router.add_get("/pipe", _pipe)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/api/cluster", _cluster)
    app.router.add_get("/api/node", _node)
    app.router.add_get("/api/rooms/{room}", _room_stats)
    app.router.add_post("/api/rooms/{room}/leave", _leave)
    app.router.add_get("/r/{room}/recordings", _page("recordings.html"))
    app.router.add_get("/api/rooms/{room}/recordings", _list_recordings)
    app.router.add_post("/api/rooms/{room}/recordings", _start_recording)
    app.router.add_delete("/api/rooms/{room}/recordings/{id}", _stop_recording)
    app.router.add_get("/api/rooms/{room}/recordings/{id}/files/{name:.+}", _download)
    app.router.add_static("/static/", WEB_DIR, append_version=False)
    app.on_shutdown.append(_close_sockets)
    return app


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every response, error pages and static files included (a middleware would miss some of them)."""
    host = request.host
    # Older browsers do not count ws: to this host as 'self'. The cluster's other nodes are where a join is
    # redirected to, and where the page reconnects when this node dies.
    hosts = [host] if _PLAIN_HOST.fullmatch(host) else []
    hosts += sorted({_host_of(url) for url in request.app[CONTEXT].cluster.urls()} - {host, ""})
    websocket = "".join(f" ws://{h} wss://{h}" for h in hosts)
    response.headers.setdefault("Content-Security-Policy", _CSP.format(websocket=websocket))
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def _origin_allowed(request: web.Request) -> bool:
    """A page's own server, or an origin of --allowed-origins. Browsers always send Origin on WebSocket
    upgrades and on POST/DELETE; programs (curl, the load test) need not, and are not what this protects."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    if origin in request.app[ORIGINS]:
        return True
    # A page served by another node of the cluster: its join was redirected here, or it died.
    if any(origin == url.rstrip("/").lower() for url in request.app[CONTEXT].cluster.urls()):
        return True
    # Either scheme: behind a TLS proxy the page is https while the request reaching us is http.
    scheme, sep, host = origin.partition("://")
    return bool(sep) and scheme in ("http", "https") and host == request.host.lower()


@web.middleware
async def _check_origin(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if (request.method in _STATE_CHANGING or request.path == "/ws") and not _origin_allowed(request):
        request.app[CONTEXT].metrics.errors.labels(kind="bad_origin").inc()
        origin = request.headers.get("Origin", "")[:100]
        event(log, logging.DEBUG, "foreign origin refused", origin=origin, path=request.path)
        raise web.HTTPForbidden(
            text=f"pages from {origin} may not use this server; its operator can allow them with "
            "--allowed-origins\n"
        )
    return await handler(request)


def _host_of(url: str) -> str:
    """host[:port] of a node's URL, if it can go into the CSP as it is."""
    host = url.partition("://")[2].split("/", 1)[0]
    return host if _PLAIN_HOST.fullmatch(host) else ""


def _page(filename: str):
    path = WEB_DIR / filename

    async def handler(request: web.Request) -> web.FileResponse:
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    return handler


async def _websocket(request: web.Request) -> web.WebSocketResponse:
    ctx = request.app[CONTEXT]
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT_SECONDS, max_msg_size=HARD_FRAME_LIMIT)
    await ws.prepare(request)
    sockets = request.app[SOCKETS]
    sockets.add(ws)
    ctx.metrics.connections.inc()
    try:
        await Session(ws, ctx, request).run()
    finally:
        ctx.metrics.connections.dec()
        sockets.discard(ws)
    return ws


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _metrics(request: web.Request) -> web.Response:
    _figures_allowed(request, "/metrics")
    body = request.app[CONTEXT].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _figures_allowed(request: web.Request, what: str) -> None:
    """/metrics and /api/cluster: open without --secret; with it, the API key's (load and room names are
    nobody else's business)."""
    settings = request.app[CONTEXT].settings
    if settings.secret:
        if not settings.api_key:
            raise web.HTTPForbidden(text=f"with --secret, {what} needs an API key: start with --api-key\n")
        if not _api_key_ok(request):
            raise _key_needed(what)


async def _cluster(request: web.Request) -> web.Response:
    """Every live node of the cluster, with its role and calls (docs/operations.md, "Cluster")."""
    _figures_allowed(request, "/api/cluster")
    cluster = request.app[CONTEXT].cluster
    return web.json_response(
        {"self": cluster.self_id, "nodes": [node.describe() for node in sorted(cluster.nodes(), key=_by_id)]}
    )


async def _node(request: web.Request) -> web.Response:
    _figures_allowed(request, "/api/node")
    ctx = request.app[CONTEXT]
    return web.json_response({**ctx.cluster.me().describe(), "pipes": ctx.spans.describe()})


async def _pipe(request: web.Request) -> web.StreamResponse:
    """Another node of a call links to this one (calls/span.py); only a node with the cluster key can."""
    return await request.app[CONTEXT].spans.accept(request)


def _by_id(node) -> str:
    return node.id


def _bearer(request: web.Request) -> str:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else ""


def _api_key_ok(request: web.Request) -> bool:
    key = request.app[CONTEXT].settings.api_key
    return bool(key) and hmac.compare_digest(_bearer(request).encode(), key.encode())


def _key_needed(what: str) -> web.HTTPUnauthorized:
    return web.HTTPUnauthorized(
        text=f"{what} needs the API key (--api-key) as 'Authorization: Bearer KEY'\n",
        headers={"WWW-Authenticate": "Bearer"},
    )


_WHAT = {"record": "recording", "download": "downloading recordings"}


def _authorize(request: web.Request, permission: str | None = None) -> tuple[str, Permissions]:
    """The room named in the path and what the request may do in it: the API key may do everything; with
    --secret, a token for the room (query `token` or a Bearer header) what it allows, which must include
    `permission`; open rooms need nothing."""
    ctx = request.app[CONTEXT]
    name = request.match_info["room"]
    if not valid_room_name(name):
        raise web.HTTPBadRequest(text="room name must be 1-64 letters, digits, '-' or '_'\n")
    if _api_key_ok(request):
        return name, API_KEY_PERMISSIONS
    if not ctx.settings.secret:
        return name, OPEN_ROOM
    try:
        grant = verify(ctx.settings.secret, request.query.get("token") or _bearer(request), name)
    except TokenError as exc:
        raise web.HTTPUnauthorized(text=exc.message + "\n") from None
    if permission is not None and not getattr(grant.permissions, permission):
        raise web.HTTPForbidden(text=f"this token does not allow {_WHAT[permission]}\n")
    return name, grant.permissions


def _authorize_control(request: web.Request) -> str:
    """Starting and stopping recordings costs the node a worker process each: in open rooms, where anyone
    may call, only the API key does it over REST (participants still record from the call page)."""
    settings = request.app[CONTEXT].settings
    if not settings.secret and not _api_key_ok(request):
        if not settings.api_key:
            raise web.HTTPForbidden(
                text="recording control over the REST API is off in open mode: start the server with "
                "--api-key KEY and send 'Authorization: Bearer KEY' (participants can still record from "
                "the call page)\n"
            )
        raise _key_needed("recording control")
    name, _ = _authorize(request, "record")
    return name


async def _room_stats(request: web.Request) -> web.Response:
    """Who is in a room, in which mode, and what its SFU Router has forwarded."""
    ctx = request.app[CONTEXT]
    name, _ = _authorize(request)
    room = ctx.calls.get(name)
    if room is None:
        raise web.HTTPNotFound(text=f"nobody is in room {name!r}\n")
    return web.json_response(
        {
            "room": room.name,
            "mode": room.mode,
            "participants": [p.describe() for p in room],
            "sfu": room.router.stats() if room.router is not None else None,
        }
    )


async def _leave(request: web.Request) -> web.Response:
    """`navigator.sendBeacon` from a closing page whose socket is down: the body is its resume token."""
    ctx = request.app[CONTEXT]
    token = (await request.text())[:MAX_TOKEN_CHARS].strip()
    if not ctx.calls.leave_by_token(request.match_info["room"], token):
        raise web.HTTPNotFound(text="no such participant to leave; nothing to do\n")
    return web.Response(status=204)


async def _close_sockets(app: web.Application) -> None:
    for ws in list(app[SOCKETS]):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")


def _recording_error(exc: RecordingError) -> web.Response:
    return web.json_response({"error": exc.code, "message": exc.message}, status=exc.status)


async def _list_recordings(request: web.Request) -> web.Response:
    name, permissions = _authorize(request)
    try:
        recordings = await request.app[CONTEXT].recordings.list(name)
    except RecordingError as exc:
        return _recording_error(exc)
    # The page shows download links only to those they would work for.
    return web.json_response({"room": name, "recordings": recordings, "download": permissions.download})


async def _start_recording(request: web.Request) -> web.Response:
    name = _authorize_control(request)
    outputs: tuple[str, ...] = OUTPUTS
    if request.can_read_body:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "bad_json", "message": "the body is not JSON"}, status=400)
        requested = body.get("outputs") if isinstance(body, dict) else None
        if requested is not None:
            if not isinstance(requested, list) or not all(isinstance(o, str) for o in requested):
                return web.json_response(
                    {"error": "bad_request", "message": f"outputs must be a list of {list(OUTPUTS)}"},
                    status=400,
                )
            outputs = tuple(requested)
    try:
        info = request.app[CONTEXT].recordings.begin(name, by="api", outputs=outputs)
    except RecordingError as exc:
        return _recording_error(exc)
    return web.json_response(info.describe(), status=201)


async def _stop_recording(request: web.Request) -> web.Response:
    name = _authorize_control(request)
    try:
        info = request.app[CONTEXT].recordings.end(name, request.match_info["id"], reason="stopped by api")
    except RecordingError as exc:
        return _recording_error(exc)
    return web.json_response(info.describe())


async def _download(request: web.Request) -> web.StreamResponse:
    name, _ = _authorize(request, "download")
    recording_id, filename = request.match_info["id"], request.match_info["name"]
    try:
        stream = await request.app[CONTEXT].recordings.open(name, recording_id, filename)
    except RecordingError as exc:
        return _recording_error(exc)
    response = web.StreamResponse(
        headers={
            "Content-Type": _CONTENT_TYPES.get(Path(filename).suffix, "application/octet-stream"),
            "Content-Disposition": f'attachment; filename="{name}-{recording_id}-{Path(filename).name}"',
        }
    )
    response.content_length = stream.size
    async with stream:
        await response.prepare(request)
        async for chunk in stream:
            await response.write(chunk)
    await response.write_eof()
    return response


_CONTENT_TYPES = {".mp4": "video/mp4", ".webm": "video/webm", ".json": "application/json"}
