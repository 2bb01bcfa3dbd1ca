"""The benchmark's scenarios against Janus's VideoRoom, driven by the loadtest's own synthetic media.

Janus is set up as its operators would set it up on this machine (bench.janus.harness: `event_loops` = the
core count, ICE-lite on the namespace's veth) and told what the media is rather than left to guess: the
publishers' rids are offered lowest first, as Chromium offers them, and the offer says so (`rid_order:
"lmh"`), so Janus's substream 0 is our `q`; each subscriber sets `substream` and `temporal` explicitly for
every video, and the receivers check the layer of every packet (the trailer the generator writes), which
is the "layers ok" column.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aiohttp

from bench.table import Row
from huddle import stun
from huddle.loadtest import layout as layouts
from huddle.loadtest.connection import MediaConnection, ReceivePoller
from huddle.loadtest.media import SINGLE_LAYER, build_library
from huddle.loadtest.negotiation import subscribe_answer
from huddle.loadtest.pacer import Pacer
from huddle.loadtest.participant import Shared, SyntheticParticipant
from huddle.loadtest.run import TICK, LoadtestResult, _collect, _cpu, _every
from huddle.loadtest.sender import now_us
from huddle.rtc.certificate import Certificate
from huddle.stun.message import encode_xor_mapped_address

__all__ = ["JANUS_DIFFERS", "run_janus"]

ALL_TEMPORAL_LAYERS = 2  # the generator's VP8 has three temporal layers (0, 1, 2): forward them all

JANUS_DIFFERS = (
    "Janus differs in the adaptive scenarios: each subscriber's layer is set once with configure (no "
    "video_sizes, no dynacast: publishers send all 3 layers all the time), and every subscribed audio is "
    "forwarded (ours: the 3 loudest)"
)


class JanusConnection(MediaConnection):
    """The loadtest's connection, answering connectivity checks too: Janus's libnice, even in ICE-lite mode,
    checks the pair back (a triggered check) and brings its side up only when that check is answered."""

    def _receive_stun(self, data: bytes) -> None:
        try:
            message = stun.parse(data)
        except stun.StunError:
            return
        if message.message_class != stun.MessageClass.REQUEST or message.method != stun.BINDING:
            super()._receive_stun(data)
            return
        if self.sock is None or not stun.verify_integrity(data, self.pwd.encode()):
            return
        host, port = self.sock.getsockname()[:2]
        response = stun.StunMessage(
            stun.BINDING,
            stun.MessageClass.SUCCESS,
            message.transaction_id,
            [
                stun.Attribute(
                    stun.XOR_MAPPED_ADDRESS,
                    encode_xor_mapped_address(host, port, message.transaction_id),
                )
            ],
        )
        self._send(stun.encode(response, integrity_key=self.pwd.encode(), fingerprint=True))


class JanusParticipant(SyntheticParticipant):
    """A synthetic participant whose signaling is Janus's VideoRoom API instead of our WebSocket.

    Media is the loadtest's own: the same MediaConnection (ICE, DTLS client, SRTP), the same senders and the
    same Receiver. Janus has no `video_sizes` and no dynacast, so each subscriber picks its layers with
    `configure(substream=..., temporal=...)` for its layout, once.
    """

    async def publish_to(self, janus: Any, room: int) -> None:
        handle = await janus.attach()
        offer = self._open_publish(JanusConnection, self.name)
        # Our DTLS is always the client: offer `active`, so that Janus answers `passive` (DTLS server).
        offer = offer.replace("a=setup:actpass", "a=setup:active")
        answer = await handle.publish(room, offer, display=self.name, rid_order="lmh")
        await janus.trickle(handle.id)  # our one candidate is in the offer: Janus waits for this before ICE
        self.id = str(handle.feed_id)
        self.shared.index_of[self.id] = self.index
        self.mode = "sfu"
        self._on_publish_answer(answer)

    async def subscribe_to(self, janus: Any, room: int, feeds: list[str], fixed_layer: int | None) -> None:
        """Subscribe to every feed but our own; `fixed_layer` (no simulcast) is the one layer they send."""
        if self.id is None:
            self.id = f"viewer-{self.index}"
        others = [f for f in feeds if f != self.id]
        if not others:
            return
        handle = await janus.attach()
        offer = await handle.subscribe(room, [int(f) for f in others])
        self.subscribe = JanusConnection(
            self.shared.certificate,
            label=f"{self.name}/subscribe",
            on_rtp=self.receiver.on_rtp,
            on_connected=self._on_subscribe_connected,
            poller=self.shared.poller,
        )
        answer, transport, tracks = subscribe_answer(
            offer,
            ufrag=self.subscribe.ufrag,
            pwd=self.subscribe.pwd,
            fingerprint=self.shared.certificate.fingerprint_sha256,
            session_id=self.session_id,
        )
        feed_of = {str(s.get("mid")): str(s.get("feed_id")) for s in handle.streams}
        self.order = others
        stage = self.shared.speaker_id()
        self.stage = stage if stage in others else others[0]
        self.sizes = layouts.video_sizes(self.shared.layout, others, self.stage)
        layers = []
        for track in tracks:
            publisher = feed_of.get(track.mid, "?")
            self.tracks[track.ssrc] = track
            stream = self.receiver.stream(track.ssrc)
            stream.publisher = publisher
            stream.kind = track.kind
            stream.publisher_index = self.shared.index_of.get(publisher, -1)
            if track.kind != "video":
                continue
            shown = self.sizes.get(publisher)
            if fixed_layer is not None:
                stream.expected_layer = fixed_layer if shown is not None else None
                continue
            stream.expected_layer = layouts.expected_layer(shown)
            # Janus cannot stop a stream it was asked for: a video not shown gets the lowest layer.
            substream = 0 if stream.expected_layer is None else stream.expected_layer
            layers.append({"mid": track.mid, "substream": substream, "temporal": ALL_TEMPORAL_LAYERS})
        await handle.start(answer)
        await janus.trickle(handle.id)
        self.subscribe.start(transport.ufrag, transport.pwd, transport.fingerprint, transport.address)
        if layers:
            await handle.request({"request": "configure", "streams": layers})

    def _layout_changed(self) -> None:  # no video_sizes to send: layers were chosen by `configure`
        pass

    def _tracks_publishers(self) -> int:
        return len({t.publisher for t in self.tracks.values() if t.kind == "audio"})


async def _until(condition: Any, timeout: float) -> None:
    """Poll `condition` every 50 ms until it holds or `timeout` seconds pass (bounded either way)."""
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)


async def _bounded(items: list[Any], action: Any, limit: int = 8) -> list[BaseException | None]:
    gate = asyncio.Semaphore(limit)

    async def one(item: Any) -> BaseException | None:
        async with gate:
            try:
                await action(item)
            except Exception as exc:  # one refusal is a row note, not the end of the run
                return exc
            return None

    return list(await asyncio.gather(*(one(i) for i in items)))


async def run_janus(scenario: Any, say: Any, run: int = 0) -> Row:
    """One run of `scenario` (bench.run.Scenario) against a fresh Janus."""
    from bench.janus.harness import JanusClient, JanusServer

    row = Row("janus", scenario.name, scenario.participants, scenario.publishers, run=run)
    result = LoadtestResult(config={"room": scenario.name, "layout": scenario.layout}, participants=0)
    result.participants = scenario.participants
    result.publishers = scenario.publishers
    library = await asyncio.to_thread(build_library)
    pacer, poller = Pacer(), ReceivePoller()
    server = JanusServer()
    tasks: list[asyncio.Task[Any]] = []
    people: list[JanusParticipant] = []
    fixed_layer = None if scenario.simulcast else SINGLE_LAYER
    try:
        await server.start()
        row.address = server.media_ip or ""
        say(f"  {scenario.name}: janus up (pid {server.pid}, media on {server.media_ip})")
        async with aiohttp.ClientSession() as http, JanusClient(server.url) as janus:
            shared = Shared(
                url=f"http://{server.media_ip}:1",
                room=scenario.name,
                certificate=Certificate.generate(),
                library=library,
                pacer=pacer,
                http=http,
                poller=poller,
                layout=scenario.layout,
                simulcast=scenario.simulcast,
                audio=scenario.audio,
                decrypt_every=scenario.decrypt_every,
            )
            people = [
                JanusParticipant(shared, i, publish=i < scenario.publishers)
                for i in range(scenario.participants)
            ]
            shared.participants = people  # type: ignore[assignment]
            loop = asyncio.get_running_loop()
            tasks = [
                loop.create_task(pacer.run()),
                loop.create_task(poller.run()),
                loop.create_task(_every(TICK, lambda now: [p.tick(now) for p in people])),
            ]
            admin = await janus.attach()
            room = await admin.create_room(publishers=max(10, scenario.publishers))
            say(f"  {scenario.name}: publishing {scenario.publishers}")
            started = time.monotonic()
            publishers = [p for p in people if p.publishes]
            for error in await _bounded(publishers, lambda p: p.publish_to(janus, room)):
                if error is not None:
                    result.errors.append(f"publish: {error!r}")
            await _until(
                lambda: all(
                    p.publish is not None and (p.publish.connected or p.publish.failed) for p in publishers
                ),
                30,
            )
            await asyncio.sleep(1.0)  # Janus turns a publisher into a feed at webrtcup
            feeds = [p.id for p in publishers if p.id is not None]
            say(f"  {scenario.name}: subscribing {scenario.participants}")
            for error in await _bounded(people, lambda p: p.subscribe_to(janus, room, feeds, fixed_layer)):
                if error is not None:
                    result.errors.append(f"subscribe: {error!r}")
            await _until(lambda: all(p.connected or p.failed for p in people), 45)
            result.joined = sum(1 for p in people if p.id is not None)
            result.connected = sum(1 for p in people if p.connected)
            result.connect_seconds = round(time.monotonic() - started, 2)
            for person in people:
                if person.failed:
                    result.errors.append(person.failed)
            say(f"  {scenario.name}: warming up for {scenario.warmup:g} s")
            await asyncio.sleep(scenario.warmup)
            say(f"  {scenario.name}: measuring for {scenario.duration:g} s")
            sent_before = sum(p.publish.sent for p in publishers if p.publish is not None)
            cpu_before, at_before, generator_before = server.cpu_seconds(), time.monotonic(), _cpu()
            stamp = now_us()
            for person in people:
                person.receiver.start_window(stamp)
            await asyncio.sleep(scenario.duration)
            stamp = now_us()
            for person in people:
                person.receiver.stop_window(stamp)
            cpu_after, at_after, generator_after = server.cpu_seconds(), time.monotonic(), _cpu()
            sent_after = sum(p.publish.sent for p in publishers if p.publish is not None)
            result.packets_sent = sent_after - sent_before
            result.window_seconds = round(at_after - at_before, 3)
            result.cpu_seconds = round(generator_after - generator_before, 3)
            _collect(result, people)  # type: ignore[arg-type]
            row.take_loadtest(result)
            row.fill(
                window=at_after - at_before,
                cpu=cpu_after - cpu_before,
                rss=server.rss_bytes(),
                sent=result.packets_sent,
                forwarded=result.packets_received + result.lost,
            )
            row.srtp_profiles = result.srtp_profiles
            for person in people:
                with contextlib.suppress(Exception):
                    await person.leave()
    except Exception as exc:  # Janus not there, not starting, or refusing: the row says so
        row.notes.append(f"janus: {exc!r}"[:300])
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for person in people:
            with contextlib.suppress(Exception):
                await person.leave()
        with contextlib.suppress(Exception):
            await server.stop()
    return row
