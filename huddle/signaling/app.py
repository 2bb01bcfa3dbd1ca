"""The aiohttp application: web client, WebSocket signaling, health and metrics."""

from __future__ import annotations

import weakref
from pathlib import Path

from aiohttp import WSCloseCode, web

from huddle.metrics import CONTENT_TYPE_LATEST
from huddle.signaling.messages import MAX_MESSAGE_BYTES
from huddle.signaling.session import Context, Session

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


async def _close_sockets(app: web.Application) -> None:
    for ws in list(app[SOCKETS]):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
