"""A synthetic participant: Huddle's signaling protocol in SFU mode, spoken by a program that measures.

It joins over the WebSocket, publishes (if it is a publisher) a microphone and a three-layer simulcast camera
on its `publish` connection (it offers; `sfu_offer`), answers the server's offers on its `subscribe`
connection, says what it shows in `video_sizes` for its layout, follows `active_speaker` (the speaker layout
puts the active speaker on the stage) and `publisher_layers` (dynacast: paused layers are not sent). What
arrives is counted by a `huddle.loadtest.stats.Receiver`.

Many participants share one process: one `Shared` holds the HTTP session, the DTLS certificate, the encoded
media and the pacing loop; the process-wide ticker calls `tick()` on every participant.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from huddle.loadtest import layout as layouts
from huddle.loadtest.connection import MediaConnection, ReceivePoller
from huddle.loadtest.media import MediaLibrary
from huddle.loadtest.negotiation import (
    OfferedTrack,
    publish_offer,
    read_publish_answer,
    subscribe_answer,
)
from huddle.loadtest.pacer import Pacer
from huddle.loadtest.sender import AudioSender, TransportSeq, VideoSender
from huddle.loadtest.stats import Receiver, SubscriberResult
from huddle.rtc import rtcp
from huddle.rtc.certificate import Certificate

__all__ = ["LOUDEST", "Shared", "SyntheticParticipant"]

log = logging.getLogger("huddle.loadtest")

LOUDEST = 3  # audio streams the SFU forwards each listener (docs/protocol.md)
REPORT_INTERVAL = 1.0  # seconds between our sender / receiver reports
SIZES_INTERVAL = 0.25  # video_sizes at most this often (docs/protocol.md)
_PSFB = 206
_PLI = 1
_FIR = 4


@dataclass
class Shared:
    """What the synthetic participants of one process share."""

    url: str  # http(s)://host:port of the server
    room: str
    certificate: Certificate
    library: MediaLibrary
    pacer: Pacer
    http: aiohttp.ClientSession
    poller: ReceivePoller | None = None  # None: each socket is read by the event loop
    layout: str = "speaker"
    speaker: int = 0  # index of the participant who talks (loud audio levels)
    decrypt_every: int = 1
    participants: list[SyntheticParticipant] = field(default_factory=list)
    index_of: dict[str, int] = field(default_factory=dict)  # participant id → index, once joined

    @property
    def ws_url(self) -> str:
        base = self.url.rstrip("/")
        if base.startswith("https://"):
            return "wss://" + base[len("https://") :] + "/ws"
        return "ws://" + base.removeprefix("http://") + "/ws"

    @property
    def host_address(self) -> str:
        """The address for our host candidates: the server's host when it is an IP literal."""
        host = urlsplit(self.url).hostname or ""
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            return "0.0.0.0"

    def speaker_id(self) -> str | None:
        if 0 <= self.speaker < len(self.participants):
            return self.participants[self.speaker].id
        return None


class SyntheticParticipant:
    def __init__(self, shared: Shared, index: int, *, publish: bool) -> None:
        self.shared = shared
        self.index = index
        self.name = f"synthetic-{index}"
        self.publishes = publish
        self.speaker = index == shared.speaker
        self.id: str | None = None
        self.mode: str | None = None
        self.errors: list[str] = []
        self.order: list[str] = []  # the others, in the order they joined
        self.tracks: dict[int, OfferedTrack] = {}
        self.stage: str | None = None
        self.active_speaker: str | None = None
        self.sizes: dict[str, tuple[int, int]] = {}
        self.receiver = Receiver(shared.decrypt_every)
        self.publish: MediaConnection | None = None
        self.subscribe: MediaConnection | None = None
        self.video: VideoSender | None = None
        self.audio: AudioSender | None = None
        self.audio_ssrc = random.getrandbits(32) or 1
        self.session_id = random.getrandbits(62)
        self.keyframe_requests = 0
        self.offers = 0
        self.offer_bytes = 0  # size of the last subscribe offer
        self.closed = False
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._sent_sizes: dict[str, tuple[int, int]] | None = None
        self._sizes_at = 0.0
        self._sizes_handle: asyncio.TimerHandle | None = None
        self._next_report = 0.0
        self._rtcp_ssrc = random.getrandbits(32) or 1

    # -- state ----------------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Media connections up: publish (if publishing), and subscribe if anyone else publishes."""
        if self.publishes and (self.publish is None or not self.publish.connected):
            return False
        if self.subscribe is not None and self.subscribe.connected:
            return True
        # Nothing to subscribe to when nobody else publishes.
        return not any(p.publishes and p is not self for p in self.shared.participants)

    @property
    def failed(self) -> str | None:
        for connection in (self.publish, self.subscribe):
            if connection is not None and connection.failed is not None:
                return f"{connection.label}: {connection.failed}"
        return None

    def _audio_publishers(self) -> int:
        return len({t.publisher for t in self.tracks.values() if t.kind == "audio"})

    def results(self) -> SubscriberResult:
        result = self.receiver.results(
            self.id or self.name, self.index, min(LOUDEST, self._audio_publishers())
        )
        if self.video is not None:
            result.layers_sent = [
                rid for rid, on in zip(self.video.rids, self.video.active, strict=True) if on
            ]
        if self.audio is not None:
            result.layers_sent.append("audio")
        return result

    # -- signaling ------------------------------------------------------------------------------------------

    async def join(self, timeout: float = 10.0) -> None:
        self._ws = await self.shared.http.ws_connect(self.shared.ws_url, heartbeat=None, max_msg_size=1 << 20)
        await self._send({"type": "join", "id": 1, "room": self.shared.room, "name": self.name})
        while True:
            msg = await self._ws.receive(timeout=timeout)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise ConnectionError(f"{self.name}: signaling closed before joined ({msg.type.name})")
            message = json.loads(msg.data)
            if message.get("type") == "joined":
                break
            if message.get("type") == "error":
                raise ConnectionError(
                    f"{self.name}: join refused: {message.get('code')}: {message.get('message')}"
                )
        self.id = message["self"]["id"]
        self.shared.index_of[self.id] = self.index
        self.order = [p["id"] for p in message.get("participants", [])]
        self.active_speaker = message.get("active_speaker")
        self.mode = message.get("mode")
        self._reader = asyncio.get_running_loop().create_task(self._read())
        if self.mode == "sfu" and self.publishes:
            await self._start_publishing()

    async def _send(self, message: dict[str, Any]) -> None:
        if self._ws is None or self._ws.closed:
            return
        await self._ws.send_str(json.dumps(message))

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                try:
                    await self._handle(json.loads(msg.data))
                except Exception as exc:  # one bad message must not end the participant's run
                    self.errors.append(f"handling a message: {exc!r}")
                    log.exception("synthetic participant failed on a message")
        except (aiohttp.ClientError, ConnectionError) as exc:
            if not self.closed:
                self.errors.append(f"signaling: {exc!r}")
        if not self.closed:
            self.errors.append(f"signaling closed ({self._ws.close_code})")

    async def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "sfu_offer" and message.get("pc") == "subscribe":
            await self._on_subscribe_offer(message["sdp"], message["revision"])
        elif kind == "sfu_answer" and message.get("pc") == "publish":
            self._on_publish_answer(message["sdp"])
        elif kind == "publisher_layers":
            if self.video is not None:
                self.video.set_active(message.get("active", []))
        elif kind == "active_speaker":
            self.active_speaker = message.get("id")
            self._layout_changed()
        elif kind == "participant_joined":
            pid = message["participant"]["id"]
            if pid not in self.order:
                self.order.append(pid)
        elif kind == "participant_left":
            with contextlib.suppress(ValueError):
                self.order.remove(message["id"])
        elif kind == "mode":
            self.mode = message.get("mode")
            if self.mode == "sfu" and self.publishes and self.publish is None:
                await self._start_publishing()
        elif kind == "error":
            self.errors.append(f"{message.get('code')}: {message.get('message')}")

    # -- publishing -----------------------------------------------------------------------------------------

    def _open_publish(self, connection_class: type[MediaConnection], stream_id: str) -> str:
        """Open the publish connection (of `connection_class`, for servers that need their own) and return
        the offer for it."""
        self.publish = connection_class(
            self.shared.certificate,
            label=f"{self.name}/publish",
            on_rtcp=self._on_publish_rtcp,
            poller=self.shared.poller,
        )
        self.publish.open()
        return publish_offer(
            ufrag=self.publish.ufrag,
            pwd=self.publish.pwd,
            fingerprint=self.shared.certificate.fingerprint_sha256,
            host=(self.shared.host_address, self.publish.local_port),
            session_id=self.session_id,
            stream_id=stream_id,
            audio_ssrc=self.audio_ssrc,
        )

    async def _start_publishing(self) -> None:
        assert self.id is not None
        offer = self._open_publish(MediaConnection, self.id)
        await self._send({"type": "sfu_offer", "pc": "publish", "sdp": offer})

    def _on_publish_answer(self, text: str) -> None:
        connection = self.publish
        if connection is None or self.closed:
            return
        answer = read_publish_answer(text)
        pacer = self.shared.pacer
        if answer.video is not None and self.video is None:
            tseq = self._tseq()
            self.video = VideoSender(
                connection,
                self.shared.library,
                index=self.index,
                pt=answer.video.pt,
                mid=answer.video.mid,
                rids=answer.video.rids or ["q"],
                ids=answer.video.ids,
                tseq=tseq,
            )
            pacer.add(self.video, random.uniform(0, VideoSender.interval))
        if answer.audio is not None and self.audio is None:
            self.audio = AudioSender(
                connection,
                self.shared.library,
                index=self.index,
                pt=answer.audio.pt,
                mid=answer.audio.mid,
                ids=answer.audio.ids,
                tseq=self._tseq(),
                speaker=self.speaker,
                ssrc=self.audio_ssrc,
            )
            pacer.add(self.audio, random.uniform(0, AudioSender.interval))
        t = answer.transport
        connection.start(t.ufrag, t.pwd, t.fingerprint, t.address)

    def _tseq(self) -> TransportSeq:
        # One transport-wide sequence per connection, shared by its audio and video.
        for sender in (self.video, self.audio):
            if sender is not None:
                return sender.tseq
        return TransportSeq()

    def _on_publish_rtcp(self, data: bytes) -> None:
        """Keyframe requests (PLI, FIR) from the SFU; its receiver reports and feedback are not needed."""
        video = self.video
        at, size = 0, len(data)
        while at + 12 <= size:
            packet_type, fmt = data[at + 1], data[at] & 0x1F
            end = at + 4 + ((data[at + 2] << 8) | data[at + 3]) * 4
            if packet_type == _PSFB and video is not None:
                if fmt == _PLI:
                    video.request_keyframe(int.from_bytes(data[at + 8 : at + 12], "big"))
                    self.keyframe_requests += 1
                elif fmt == _FIR:
                    for entry in range(at + 12, min(end, size) - 7, 8):
                        video.request_keyframe(int.from_bytes(data[entry : entry + 4], "big"))
                        self.keyframe_requests += 1
            at = end

    # -- subscribing ----------------------------------------------------------------------------------------

    async def _on_subscribe_offer(self, text: str, revision: int) -> None:
        if self.subscribe is None:
            self.subscribe = MediaConnection(
                self.shared.certificate,
                label=f"{self.name}/subscribe",
                on_rtp=self.receiver.on_rtp,
                on_connected=self._on_subscribe_connected,
                poller=self.shared.poller,
            )
        connection = self.subscribe
        answer, transport, tracks = subscribe_answer(
            text,
            ufrag=connection.ufrag,
            pwd=connection.pwd,
            fingerprint=self.shared.certificate.fingerprint_sha256,
            session_id=self.session_id,
        )
        self.offers += 1
        self.offer_bytes = len(text)
        self.tracks = {t.ssrc: t for t in tracks}
        # Streams of publishers who left: their figures are kept, they stop being reported on.
        self.receiver.retire(self.tracks)
        index_of = self.shared.index_of
        for track in tracks:
            stream = self.receiver.stream(track.ssrc)
            stream.publisher = track.publisher
            stream.kind = track.kind
            stream.publisher_index = index_of.get(track.publisher, -1)
        await self._send({"type": "sfu_answer", "pc": "subscribe", "sdp": answer, "revision": revision})
        connection.start(transport.ufrag, transport.pwd, transport.fingerprint, transport.address)
        self._layout_changed()

    def _on_subscribe_connected(self, connection: MediaConnection) -> None:
        self.receiver.srtp = connection.srtp

    # -- layout ---------------------------------------------------------------------------------------------

    def _layout_changed(self) -> None:
        publishers = {t.publisher for t in self.tracks.values() if t.kind == "video"}
        rank = {pid: i for i, pid in enumerate(self.order)}
        others = sorted(publishers, key=lambda pid: rank.get(pid, len(rank)))
        for candidate in (self.active_speaker, self.stage, self.shared.speaker_id()):
            if candidate is not None and candidate in publishers:
                self.stage = candidate
                break
        else:
            self.stage = others[0] if others else None
        self.sizes = layouts.video_sizes(self.shared.layout, others, self.stage)
        for track in self.tracks.values():
            if track.kind == "video":
                stream = self.receiver.stream(track.ssrc)
                stream.expected_layer = layouts.expected_layer(self.sizes.get(track.publisher))
        if self.sizes != self._sent_sizes:
            self._schedule_sizes()

    def _schedule_sizes(self) -> None:
        if self._sizes_handle is not None:
            return
        wait = self._sizes_at + SIZES_INTERVAL - time.monotonic()
        loop = asyncio.get_running_loop()
        self._sizes_handle = loop.call_later(max(0.0, wait), self._send_sizes)

    def _send_sizes(self) -> None:
        self._sizes_handle = None
        if self.closed or self.sizes == self._sent_sizes:
            return
        self._sent_sizes = dict(self.sizes)
        self._sizes_at = time.monotonic()
        sizes = {pid: list(size) for pid, size in self.sizes.items()}
        task = asyncio.get_running_loop().create_task(self._send({"type": "video_sizes", "sizes": sizes}))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    # -- time -----------------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Called a few times a second: connection timers, and once a second our RTCP reports."""
        for connection in (self.publish, self.subscribe):
            if connection is not None:
                connection.tick(now)
        if now < self._next_report:
            return
        self._next_report = now + REPORT_INTERVAL
        wall = time.time()
        if self.publish is not None and self.publish.connected:
            reports = [r for s in (self.audio, self.video) if s is not None for r in s.sender_reports(wall)]
            if reports:
                self.publish.send_rtcp(b"".join(reports))
        if self.subscribe is not None and self.subscribe.connected:
            blocks = [b for s in self.receiver.streams.values() if (b := s.report_block()) is not None]
            for start in range(0, len(blocks), 31):
                report = rtcp.ReceiverReport(self._rtcp_ssrc, blocks[start : start + 31])
                self.subscribe.send_rtcp(report.serialize())

    # -- leaving --------------------------------------------------------------------------------------------

    async def leave(self, *, vanish: bool = False) -> None:
        """Hang up; or, with `vanish`, disappear as a closed tab or a dead network does: no `leave`, no DTLS
        close_notify, the sockets just go (the server keeps the seat for its reconnect grace)."""
        if self.closed:
            return
        self.closed = True
        for sender in (self.video, self.audio):
            if sender is not None:
                sender.closed = True
        if self._sizes_handle is not None:
            self._sizes_handle.cancel()
        if self.id is not None:
            self.shared.index_of.pop(self.id, None)
        # Media first (DTLS close_notify while the server still knows our addresses), then signaling.
        for connection in (self.publish, self.subscribe):
            if connection is not None:
                connection.close(notify=not vanish)
        if not vanish:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._send({"type": "leave"}), 2)
        if self._ws is not None:
            with contextlib.suppress(Exception):
                # A closed tab says 1001 (going away); hanging up, 1000.
                await asyncio.wait_for(self._ws.close(code=1001 if vanish else 1000), 2)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
