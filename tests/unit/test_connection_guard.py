"""The HTTP connection guard in front of a small aiohttp app, over real loopback sockets, with short timeouts;
and the filter that keeps asyncio's accept() errors from flooding the logs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from huddle.logs import RateLimit
from huddle.metrics import Metrics
from huddle.signaling.connections import ConnectionGuard, GuardedSite, bind_tcp

TIMEOUT = 5.0  # an upper bound only
REQUEST = b"GET /ok HTTP/1.1\r\nHost: test\r\n\r\n"


class Served:
    def __init__(self, guard: ConnectionGuard, metrics: Metrics, port: int) -> None:
        self.guard, self.metrics, self.port = guard, metrics, port

    def errors(self, kind: str) -> float:
        return self.metrics.registry.get_sample_value("huddle_errors_total", {"kind": kind}) or 0.0

    async def connect(self, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port, local_addr=(source, 0))


async def ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(1.0)
    return web.Response(text="slow")


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        await ws.send_str(message.data)
    return ws


@contextlib.asynccontextmanager
async def serve(**options: float) -> AsyncIterator[Served]:
    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/slow", slow)
    app.router.add_get("/ws", websocket)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    metrics = Metrics()
    guard = ConnectionGuard(metrics, **options)  # type: ignore[arg-type]
    site = GuardedSite(runner, bind_tcp("127.0.0.1", 0), guard)
    await site.start()
    try:
        yield Served(guard, metrics, site.sockets[0].getsockname()[1])
    finally:
        await runner.cleanup()


async def response(reader: asyncio.StreamReader) -> bytes:
    """One whole response to a GET of ours (all carry a Content-Length)."""
    async with asyncio.timeout(TIMEOUT):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        return head + await reader.readexactly(length)


async def closed_after(reader: asyncio.StreamReader) -> float:
    """Seconds until the server closes the connection (whatever it sent before)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with asyncio.timeout(TIMEOUT):
        with contextlib.suppress(ConnectionResetError):
            while await reader.read(4096):
                pass
    return loop.time() - start


async def test_one_address_holds_at_most_its_share_and_others_are_served() -> None:
    async with serve(per_address=3) as served:
        held = [await served.connect() for _ in range(3)]
        over = [await served.connect() for _ in range(2)]
        for reader, _ in over:
            assert await closed_after(reader) < 1.0
        assert served.errors("http_per_address_limit") == 2
        for reader, writer in held:  # the first three are served
            writer.write(REQUEST)
            assert (await response(reader)).startswith(b"HTTP/1.1 200")
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(f"http://127.0.0.1:{served.port}/ok") as reply,
        ):
            assert reply.status == 200
        # A closed connection gives its slot back.
        held[0][1].close()
        await closed_after(held[0][0])
        for _ in range(50):
            reader, writer = await served.connect()
            writer.write(REQUEST)
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionResetError):
                assert (await response(reader)).startswith(b"HTTP/1.1 200")
                writer.close()
                break
            writer.close()
            await asyncio.sleep(0.02)  # the server had not yet seen the close
        else:
            raise AssertionError("the freed slot was never given back")
        for _, writer in held + over:
            writer.close()


async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
    """Send REQUEST a byte every 0.1 s (3 s for all of it); the seconds until the server closed on us."""
    closed = asyncio.create_task(closed_after(reader))
    for byte in REQUEST:
        if closed.done():
            break
        writer.write(bytes([byte]))
        await asyncio.sleep(0.1)
    return await closed


async def test_headers_sent_too_slowly_are_cut_off() -> None:
    async with serve(per_address=10, header_timeout=0.5, idle_timeout=5.0) as served:
        reader, writer = await served.connect()
        assert 0.4 <= await trickle(reader, writer) <= 0.8
        assert served.errors("http_header_timeout") == 1
        writer.close()


async def test_an_idle_keep_alive_connection_is_closed_and_so_is_a_slow_second_request() -> None:
    async with serve(per_address=10, header_timeout=0.5, idle_timeout=1.0) as served:
        reader, writer = await served.connect()
        writer.write(REQUEST)
        await response(reader)
        assert 0.9 <= await closed_after(reader) <= 1.4
        assert served.errors("http_idle_timeout") == 1
        writer.close()

        # The next request's headers get no more time than a new connection's, counted from its first byte.
        reader, writer = await served.connect()
        writer.write(REQUEST)
        await response(reader)
        await asyncio.sleep(0.3)
        assert 0.4 <= await trickle(reader, writer) <= 0.8
        assert served.errors("http_header_timeout") == 1
        writer.close()


async def test_requests_in_progress_are_not_cut_whatever_they_last() -> None:
    async with serve(per_address=10, header_timeout=0.3, idle_timeout=0.3) as served:
        url = f"http://127.0.0.1:{served.port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/slow") as reply:
                assert reply.status == 200 and await reply.text() == "slow"
            async with session.ws_connect(url + "/ws") as ws:
                await asyncio.sleep(1.0)  # a quiet WebSocket: its session decides, not the guard
                await ws.send_str("still here")
                assert (await ws.receive(timeout=TIMEOUT)).data == "still here"
        assert served.errors("http_header_timeout") == served.errors("http_idle_timeout") == 0


# --- accept() errors in the logs ----------------------------------------------------------------------


def test_accept_errors_are_logged_at_most_once_a_second_with_a_count_of_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    counted: list[int] = []
    limit = RateLimit("socket.accept() out of system resource", on_match=lambda: counted.append(1))
    logger = logging.getLogger("asyncio")
    logger.addFilter(limit)
    error = OSError(24, "Too many open files")

    def flood(times: int) -> None:
        # What asyncio's default exception handler logs for each failed accept().
        for _ in range(times):
            logger.error(
                "socket.accept() out of system resource\nsocket: <socket fd=7>\nexception: %r",
                error,
                exc_info=(OSError, error, None),
            )

    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            flood(1000)
            logger.error("something else from asyncio")
            assert [r.getMessage() for r in caplog.records] == [
                "socket.accept() out of system resource",
                "something else from asyncio",
            ]
            first = caplog.records[0]
            assert first.exc_info is None  # no traceback: it says nothing about the cause
            assert first.fields == {"error": "[Errno 24] Too many open files", "suppressed": 0}
            caplog.clear()
            time.sleep(1.05)
            flood(10)
            assert len(caplog.records) == 1
            assert caplog.records[0].fields["suppressed"] == 999
        assert len(counted) == 1010
    finally:
        logger.removeFilter(limit)
