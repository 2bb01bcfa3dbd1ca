"""Bad input from one client while a real call runs: counted or answered, and the call keeps its media."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import threading
import time
import urllib.request

import aiohttp

from .conftest import Server, peer_stats, remote_tiles, wait_decoding, wait_for


async def _abuse(server: Server) -> dict[str, str]:
    """Everything a broken or hostile client might send; returns the error codes it was answered with."""
    answers: dict[str, str] = {}
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"ws://127.0.0.1:{server.http}/ws")
        for name, frame in [
            ("malformed", "{oops"),
            ("unknown", '{"type": "teleport"}'),
            ("oversized", json.dumps({"type": "ping", "pad": "x" * 70_000})),
            ("bad_room", '{"type": "join", "room": "no/such room!", "name": "M"}'),
        ]:
            await ws.send_str(frame)
            answers[name] = json.loads((await ws.receive(timeout=5)).data)["code"]
        # The flood: 1,000 messages a second for 2 s from one socket.
        for _ in range(40):
            for _ in range(50):
                await ws.send_str('{"type": "ping"}')
            await asyncio.sleep(0.05)
        await ws.close()

    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for datagram in (
        os.urandom(200),
        b"\x00\x01",
        b"\x00\x01\x00\x08\x21\x12\xa4\x42" + b"\x00" * 8,
        b"",
        b"\xff" * 1400,
    ):
        udp.sendto(datagram, ("127.0.0.1", server.stun))
        udp.sendto(datagram, ("127.0.0.1", server.media))
    udp.close()
    # An HTTP client on the STUN port's TCP side: the server hangs up on it at once, saying nothing.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.stun)
    writer.write(b"GET / HTTP/1.1\r\nHost: huddle\r\n\r\n" + b"x" * 4000)
    await writer.drain()
    started = time.monotonic()
    try:
        # read() returns only at end of file (or raises when the server resets the connection).
        answers["stun_tcp"] = repr(await asyncio.wait_for(reader.read(), 5))
    except ConnectionResetError:
        answers["stun_tcp"] = "reset"
    except TimeoutError:
        answers["stun_tcp"] = "still open after 5 s"
    answers["stun_tcp_closed_after"] = f"{time.monotonic() - started:.3f}"
    writer.close()
    return answers


def _metric(server: Server, name: str) -> float:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_abuse_beside_a_running_call_leaves_its_media_alone(new_page, server: Server) -> None:
    ada = new_page(f"{server.url}/r/beside?name=Ada")
    bob = new_page(f"{server.url}/r/beside?name=Bob")
    wait_for(lambda: remote_tiles(ada) == ["Bob"] and remote_tiles(bob) == ["Ada"], 15, "the call")
    wait_decoding(ada, peers=1, frames=10)
    wait_decoding(bob, peers=1, frames=10)

    # The abuse runs on a thread of its own (Playwright's sync API must stay on this one), while this one
    # samples the call's decoded frames: no stall of over a second on either side.
    not_stun = _metric(server, 'huddle_stun_dropped_total{reason="not_stun",transport="tcp"}')
    answers: dict[str, str] = {}
    abuser = threading.Thread(target=lambda: answers.update(asyncio.run(_abuse(server))))
    samples: list[tuple[float, int, int]] = []
    started = time.monotonic()
    abuser.start()
    while abuser.is_alive() or time.monotonic() - started < 4:
        frames = (peer_stats(ada)[0]["framesDecoded"], peer_stats(bob)[0]["framesDecoded"])
        samples.append((time.monotonic(), *frames))
        time.sleep(0.25)
    abuser.join()

    stun_tcp, closed_after = answers.pop("stun_tcp"), float(answers.pop("stun_tcp_closed_after"))
    assert answers == {
        "malformed": "bad_json",
        "unknown": "unknown_type",
        "oversized": "too_large",
        "bad_room": "invalid_room",
    }
    # The STUN server closed the garbage connection itself (end of file, or a reset when our bytes were still
    # unread), at once rather than after its idle timeout, and counted it under its reason.
    assert stun_tcp in ("b''", "reset"), stun_tcp
    assert closed_after <= 1.0, f"the STUN server kept a garbage connection for {closed_after} s"
    assert _metric(server, 'huddle_stun_dropped_total{reason="not_stun",transport="tcp"}') == not_stun + 1
    for side in (1, 2):
        run, worst = 0.0, 0.0
        for a, b in itertools.pairwise(samples):
            run = run + (b[0] - a[0]) if b[side] == a[side] else 0.0
            worst = max(worst, run)
        assert worst <= 1.0, f"video stalled for {worst:.2f} s"
        assert samples[-1][side] - samples[0][side] >= 60

    assert _metric(server, 'huddle_errors_total{kind="rate_limited"}') >= 1000
    assert _metric(server, 'huddle_errors_total{kind="bad_json"}') >= 1
    assert _metric(server, "huddle_stun_dropped_total") >= 5
    assert _metric(server, "huddle_media_dropped_total") >= 4
    with urllib.request.urlopen(f"{server.url}/healthz", timeout=5) as resp:
        assert resp.status == 200
    assert remote_tiles(ada) == ["Bob"] and remote_tiles(bob) == ["Ada"]
