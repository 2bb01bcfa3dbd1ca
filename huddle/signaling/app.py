"""The aiohttp application: web client, WebSocket signaling, health and metrics."""

from __future__ import annotations

import weakref
from pathlib import Path

from aiohttp import WSCloseCode, web

from huddle.metrics import CONTENT_TYPE_LATEST
from huddle.recording.manager import OUTPUTS, RecordingError
from huddle.signaling.messages import MAX_MESSAGE_BYTES, valid_room_name
from huddle.signaling.session import Context, Session
from huddle.signaling.tokens import TokenError, verify

WEB_DIR = Path(__file__).resolve().parent.parent / "web"

# Frames up to this size are read and answered with a `too_large` error; beyond it aiohttp closes the
# socket (1009), so that nobody can make the server buffer megabytes.
HARD_FRAME_LIMIT = 4 * MAX_MESSAGE_BYTES
# The server pings every socket when it has been silent this long and drops it when no pong comes within
# half of it: a tab that vanished without closing its socket is gone for the others within 6 s.
HEARTBEAT_SECONDS = 4.0

CONTEXT = web.AppKey("context", Context)
SOCKETS = web.AppKey("sockets", weakref.WeakSet)


def build_app(ctx: Context) -> web.Application:
    app = web.Application(client_max_size=1024 * 1024)
    app[CONTEXT] = ctx
    app[SOCKETS] = weakref.WeakSet()
    app.router.add_get("/", _page("index.html"))
    app.router.add_get("/r/{room}", _page("call.html"))
    app.router.add_get("/ws", _websocket)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
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
    body = request.app[CONTEXT].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _authorize(request: web.Request, *, record: bool = False) -> str:
    """The room named in the path, once the request's token (query `token` or a Bearer header) admits to
    it; with `record`, the token must also carry the record permission. Open rooms need no token."""
    ctx = request.app[CONTEXT]
    name = request.match_info["room"]
    if not valid_room_name(name):
        raise web.HTTPBadRequest(text="room name must be 1-64 letters, digits, '-' or '_'\n")
    if ctx.settings.secret:
        token = request.query.get("token") or request.headers.get("Authorization", "").removeprefix("Bearer ")
        try:
            grant = verify(ctx.settings.secret, token, name)
        except TokenError as exc:
            raise web.HTTPUnauthorized(text=exc.message + "\n") from None
        if record and not grant.permissions.record:
            raise web.HTTPForbidden(text="this token does not allow recording\n")
    return name


async def _room_stats(request: web.Request) -> web.Response:
    """Who is in a room, in which mode, and what its SFU Router has forwarded."""
    ctx = request.app[CONTEXT]
    name = _authorize(request)
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
    token = (await request.text())[:256].strip()
    if not ctx.calls.leave_by_token(request.match_info["room"], token):
        raise web.HTTPNotFound(text="no such participant to leave; nothing to do\n")
    return web.Response(status=204)


async def _close_sockets(app: web.Application) -> None:
    for ws in list(app[SOCKETS]):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")


def _recording_error(exc: RecordingError) -> web.Response:
    return web.json_response({"error": exc.code, "message": exc.message}, status=exc.status)


async def _list_recordings(request: web.Request) -> web.Response:
    name = _authorize(request)
    try:
        recordings = await request.app[CONTEXT].recordings.list(name)
    except RecordingError as exc:
        return _recording_error(exc)
    return web.json_response({"room": name, "recordings": recordings})


async def _start_recording(request: web.Request) -> web.Response:
    name = _authorize(request, record=True)
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
    name = _authorize(request, record=True)
    try:
        info = request.app[CONTEXT].recordings.end(name, request.match_info["id"], reason="stopped by api")
    except RecordingError as exc:
        return _recording_error(exc)
    return web.json_response(info.describe())


async def _download(request: web.Request) -> web.StreamResponse:
    name = _authorize(request)
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
