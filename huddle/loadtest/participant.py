"""A synthetic participant: Huddle's signaling protocol in SFU mode, spoken by a program that measures.

It joins over the WebSocket, publishes (if it is a publisher) a microphone and a three-layer simulcast camera
(or, as `Shared` says, no microphone, or a camera without simulcast) on its `publish` connection (it offers;
`sfu_offer`), answers the server's offers on its `subscribe` connection, says what it shows in `video_sizes`
for its layout, follows `active_speaker` (the speaker layout puts the active speaker on the stage) and
`publisher_layers` (dynacast: paused layers are not sent). What arrives is counted by a
`huddle.loadtest.stats.Receiver`.

Many participants share one process: one `Shared` holds the HTTP session, the DTLS certificate, the encoded
media and the pacing loop; the process-wide ticker calls `tick()` on every participant.

Like the web client, a participant gets back into its call by itself when its signaling socket drops (the
node died, restarted, or stops serving with close code 1012): it resumes with its resume token through the
doors of its last `joined` (the node it was on first; after a 1012, another one first), in rounds 0.5, 1 and
2 s apart until the reconnection grace is over, following `redirect` answers as on its first join (a door
that sent it on to a node it could not reach is asked again after 0.2-0.3 s: the standby is about to take
over). When the node rebuilt it from the token (`restored`), its SFU connections start afresh; either way
each drop is kept as a `Reconnection`, with the time until media arrived again.
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
from huddle.loadtest.sender import AudioSender, TransportSeq, VideoSender, now_us
from huddle.loadtest.stats import Receiver, Reconnection, SubscriberResult
from huddle.rtc import rtcp
from huddle.rtc.certificate import Certificate

__all__ = ["LOUDEST", "JoinRefused", "Shared", "SyntheticParticipant"]

log = logging.getLogger("huddle.loadtest")

LOUDEST = 3  # audio streams the SFU forwards each listener (docs/protocol.md)
REPORT_INTERVAL = 1.0  # seconds between our sender / receiver reports
SIZES_INTERVAL = 0.25  # video_sizes at most this often (docs/protocol.md)
_PSFB = 206
_PLI = 1
_FIR = 4
# Reconnection, as the web client does it (docs/protocol.md, "Reconnection"): waits before each round of
# attempts over the doors, the last one repeating until the grace period is over.
RECONNECT_DELAYS = (0.5, 1.0, 2.0)
RESUME_ATTEMPT = 5.0  # seconds one attempt (open, join, redirects) may take
# A door that sends our resume on to a node we cannot reach most likely sends it to the node we lost, whose
# standby takes over as soon as ZooKeeper ends that node's session: ask that door again after this short wait
# (plus up to the jitter, so that a whole call does not come back in step), at most this many times per drop;
# then the rounds as usual.
REDIRECT_RETRY = 0.2
REDIRECT_RETRY_JITTER = 0.1
REDIRECT_RETRIES_MAX = 40
RESUME_LAST_MARGIN = 0.25  # the last attempt starts this long before the grace period is over
DEFAULT_RECONNECT_GRACE = 20.0
MAX_REDIRECTS = 3
CLOSE_SERVICE_RESTART = 1012  # the node stops serving: resume at once, at another door first
# Closes after which resuming cannot help (docs/protocol.md, close codes).
FINAL_CLOSE_CODES = frozenset({1008, 1009, 4001, 4002, 4003, 4004})
# Answers to a resume that end the call for this participant; anything else (try_again) is retried.
RESUME_FATAL = frozenset(
    {
        "resume_failed",
        "unauthorized",
        "token_expired",
        "wrong_room",
        "invalid_room",
        "invalid_name",
        "room_full",
    }
)


class JoinRefused(ConnectionError):
    """The server answered `join` with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"join refused: {code}: {message}")
        self.code = code


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
    # What publishers offer: a simulcast camera (False: one stream of the library's SINGLE_LAYER, as a
    # browser without simulcast sends), and a microphone.
    simulcast: bool = True
    audio: bool = True
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
        self.video_ssrc = random.getrandbits(32) or 1  # named in the offer only without simulcast
        self.session_id = random.getrandbits(62)
        self.keyframe_requests = 0
        self.rtcp_datagrams = 0  # on the subscribe connection
        self.offers = 0
        self.offer_bytes = 0  # size of the last subscribe offer
        self.closed = False
        # From the last `joined`: what resuming needs.
        self.resume_token: str | None = None
        self.doors: list[str] = []
        self.reconnect_grace = DEFAULT_RECONNECT_GRACE
        self.reconnections: list[Reconnection] = []
        self.reconnecting = False
        self._sent_before = (0, 0)  # RTP packets and bytes of publish connections closed by a restart
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._sent_sizes: dict[str, tuple[int, int]] | None = None
        self._sizes_at = 0.0
        self._sizes_handle: asyncio.TimerHandle | None = None
        self._next_report = 0.0
        self._rtcp_ssrc = random.getrandbits(32) or 1
        self._media_lost: Reconnection | None = None  # the drop whose media has not come back yet

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

    def sent(self) -> tuple[int, int]:
        """RTP packets and bytes published so far, over every publish connection we had."""
        packets, sent_bytes = self._sent_before
        if self.publish is not None:
            packets += self.publish.sent
            sent_bytes += self.publish.sent_bytes
        return packets, sent_bytes

    def _audio_publishers(self) -> int:
        return len({t.publisher for t in self.tracks.values() if t.kind == "audio"})

    def results(self) -> SubscriberResult:
        result = self.receiver.results(
            self.id or self.name, self.index, min(LOUDEST, self._audio_publishers())
        )
        result.reconnections = list(self.reconnections)
        result.rtcp_datagrams = self.rtcp_datagrams
        if self.video is not None:
            result.layers_sent = [
                rid for rid, on in zip(self.video.rids, self.video.active, strict=True) if on
            ]
        if self.audio is not None:
            result.layers_sent.append("audio")
        return result

    # -- signaling ------------------------------------------------------------------------------------------

    async def join(self, timeout: float = 10.0) -> None:
        request = {"type": "join", "id": 1, "room": self.shared.room, "name": self.name}
        async with asyncio.timeout(timeout):
            self._ws, message, url = await self._join_following_redirects(self.shared.ws_url, request)
        self.id = message["self"]["id"]
        self.shared.index_of[self.id] = self.index
        self.order = [p["id"] for p in message.get("participants", [])]
        self._joined(message, url)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        if self.mode == "sfu" and self.publishes:
            await self._start_publishing()

    async def _join_following_redirects(
        self, url: str, request: dict[str, Any], hops: list[str] | None = None
    ) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any], str]:
        """Send `join` at `url`, and again wherever a `redirect` sends it (at most MAX_REDIRECTS times, each
        URL appended to `hops`): the socket that answered `joined`, that message and the socket's URL.
        Raises JoinRefused, ConnectionError, OSError."""
        for _ in range(MAX_REDIRECTS + 1):
            ws = await self.shared.http.ws_connect(url, heartbeat=None, max_msg_size=1 << 20)
            try:
                await ws.send_str(json.dumps(request))
                reply = await self._join_reply(ws)
            except BaseException:
                await ws.close()
                raise
            if reply["type"] == "joined":
                return ws, reply, url
            await ws.close(code=1000, message=b"redirected")
            url = reply.get("url")
            if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
                raise ConnectionError(f"{self.name}: redirected to no WebSocket: {url!r}")
            if hops is not None:
                hops.append(url)
            # A call's home sends joiners on to the node the call spills over to, with a ticket for it.
            request = {k: v for k, v in request.items() if k != "ticket"}
            if isinstance(reply.get("ticket"), str):
                request["ticket"] = reply["ticket"]
        raise ConnectionError(f"{self.name}: more than {MAX_REDIRECTS} redirects")

    async def _join_reply(self, ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
        while True:
            msg = await ws.receive()
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise ConnectionError(f"{self.name}: signaling closed before joined ({msg.type.name})")
            message = json.loads(msg.data)
            kind = message.get("type")
            if kind in ("joined", "redirect"):
                return message
            if kind == "error":
                raise JoinRefused(str(message.get("code")), str(message.get("message")))

    def _joined(self, message: dict[str, Any], url: str) -> None:
        """What every `joined` (first or resumed) tells us: the mode, and what resuming needs next time."""
        self.active_speaker = message.get("active_speaker")
        self.mode = message.get("mode")
        self.resume_token = message.get("resume_token") or self.resume_token
        grace = message.get("reconnect_grace")
        if isinstance(grace, int | float) and grace > 0:
            self.reconnect_grace = float(grace)
        doors = message.get("doors")
        if isinstance(doors, list):
            named = [d for d in doors if isinstance(d, str) and d.startswith(("ws://", "wss://"))]
            # The URL we reached this node at goes first: it may be the only way there (a proxy in front).
            self.doors = list(dict.fromkeys([url, *named[1:]]))

    async def _send(self, message: dict[str, Any]) -> None:
        if self._ws is None or self._ws.closed:
            return
        await self._ws.send_str(json.dumps(message))

    async def _read(self) -> None:
        """Handle the server's messages until we leave; a socket that drops is resumed on a new one."""
        while True:
            ws = self._ws
            assert ws is not None
            try:
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    try:
                        await self._handle(json.loads(msg.data))
                    except Exception as exc:  # one bad message must not end the participant's run
                        self.errors.append(f"handling a message: {exc!r}")
                        log.exception("synthetic participant failed on a message")
            except (aiohttp.ClientError, ConnectionError):
                pass
            if self.closed:
                return
            code = ws.close_code  # the server's (1006 when the connection just broke)
            code = None if code is None else int(code)
            await ws.close()
            if code in FINAL_CLOSE_CODES or self.resume_token is None:
                self.errors.append(f"signaling closed ({code})")
                return
            if not await self._resume(code):
                return

    async def _resume(self, close_code: int | None) -> bool:
        """Get back into the call on a new socket, trying the doors in rounds until the grace period is
        over. False when it cannot be done (the error says why)."""
        drop = Reconnection(dropped_us=now_us(), close_code=close_code)
        self.reconnections.append(drop)
        self.reconnecting = True
        self._await_media(drop)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.reconnect_grace
        doors = self.doors or [self.shared.ws_url]
        immediate = close_code == CLOSE_SERVICE_RESTART
        first = 1 if immediate and len(doors) > 1 else 0
        tries = rounds = quick = 0  # door turns taken, rounds begun after a wait, quick tries
        again: str | None = None  # the door to ask again soon
        try:
            while True:
                wait = 0.0  # the next door of a round is tried as soon as the one before failed
                if again is not None:
                    door, again = again, None
                    wait = REDIRECT_RETRY + random.uniform(0, REDIRECT_RETRY_JITTER)
                    quick += 1
                else:
                    if tries % len(doors) == 0 and not (immediate and tries == 0):
                        wait = RECONNECT_DELAYS[min(rounds, len(RECONNECT_DELAYS) - 1)]
                        rounds += 1
                    door = doors[(first + tries) % len(doors)]
                    tries += 1
                # The last attempt comes just before the grace period is over, however the backoff falls.
                left = deadline - loop.time() - RESUME_LAST_MARGIN
                if left < 0:
                    self.errors.append(f"could not resume within {self.reconnect_grace:g} s")
                    return False
                await asyncio.sleep(min(wait, left))
                drop.attempts += 1
                request = {"type": "join", "id": drop.attempts + 1, "room": self.shared.room}
                # The mode we were in: a node that rebuilds the call starts it on the SFU, with no p2p flap.
                request |= {"resume": self.resume_token, "mode": self.mode or "sfu"}
                budget = max(0.5, min(RESUME_ATTEMPT, deadline - loop.time()))
                hops: list[str] = []
                try:
                    async with asyncio.timeout(budget):
                        ws, message, url = await self._join_following_redirects(door, request, hops)
                except JoinRefused as exc:
                    if exc.code in RESUME_FATAL:
                        self.errors.append(f"resume refused: {exc.code}")
                        return False
                    # try_again: the cluster cannot place the call yet
                except (OSError, ConnectionError, aiohttp.ClientError, TimeoutError, ValueError):
                    pass  # a door that is down, or a redirect to a node that is
                else:
                    break
                if hops and quick < REDIRECT_RETRIES_MAX:
                    again = door
            if self.closed:
                await ws.close()
                return False
            self._ws = ws
            if message.get("resumed") is not True or message.get("self", {}).get("id") != self.id:
                self.errors.append("resumed as somebody else")
                return False
            drop.resumed_seconds = round((now_us() - drop.dropped_us) / 1e6, 3)
            drop.restored = message.get("restored") is True
            await self._on_resumed(message, url, restored=drop.restored)
            return True
        finally:
            self.reconnecting = False

    async def _on_resumed(self, message: dict[str, Any], url: str, *, restored: bool) -> None:
        self._joined(message, url)
        present = [p["id"] for p in message.get("participants", [])]
        # Those not back yet keep their place in our order (as tiles 'reconnecting' on a page).
        self.order += [pid for pid in present if pid not in self.order]
        self._sent_sizes = None  # the node may know no sizes of ours (restored), or old ones: say them again
        if restored:
            # The node has no SFU state for us: both connections start afresh, as on entering sfu mode.
            self._restart_sfu()
            if self.mode == "sfu" and self.publishes:
                await self._start_publishing()
        else:
            self._layout_changed()

    def _restart_sfu(self) -> None:
        for sender in (self.video, self.audio):
            if sender is not None:
                sender.closed = True  # the pacer drops it
        self.video = self.audio = None
        self._sent_before = self.sent()
        for connection in (self.publish, self.subscribe):
            if connection is not None:
                connection.close(notify=False)
        self.publish = self.subscribe = None
        self.tracks = {}
        # New connections carry new streams: the old ones keep their figures, retired.
        self.receiver.srtp = None
        self.receiver.retire(())
        self.audio_ssrc = random.getrandbits(32) or 1
        self.video_ssrc = random.getrandbits(32) or 1

    def _await_media(self, drop: Reconnection) -> None:
        """Time the first media packet after `drop` on whichever subscribe connection brings it (the one we
        have, or a new one after a restored resume); no cost per packet once it came."""
        self._media_lost = drop
        if self.subscribe is not None:
            self.subscribe.on_rtp = self._on_rtp_after_drop

    def _on_rtp_after_drop(self, data: bytes, arrival_us: int) -> None:
        self.receiver.on_rtp(data, arrival_us)
        drop = self._media_lost
        if drop is None or arrival_us < drop.dropped_us:  # read after the drop, but arrived before it
            return
        self._media_lost = None
        drop.media_seconds = round((arrival_us - drop.dropped_us) / 1e6, 3)
        if self.subscribe is not None:
            self.subscribe.on_rtp = self.receiver.on_rtp

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
        elif kind == "resume_token":
            # The call's state changed (a recording): the node that resumes us must know it.
            if isinstance(message.get("token"), str):
                self.resume_token = message["token"]
        elif kind == "error":
            self.errors.append(f"{message.get('code')}: {message.get('message')}")

    # -- publishing -----------------------------------------------------------------------------------------

    def _open_publish(self, connection_class: type[MediaConnection], stream_id: str) -> str:
        """Open the publish connection (of `connection_class`, for servers that need their own) and return
        the offer for it: the camera with or without simulcast, and the microphone or not, as `shared`
        says."""
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
            audio=self.shared.audio,
            video_ssrc=None if self.shared.simulcast else self.video_ssrc,
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
                ssrc=None if self.shared.simulcast else self.video_ssrc,
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

    def _on_subscribe_rtcp(self, data: bytes) -> None:
        """The SFU's sender reports on what it forwards us: counted, and kept to check lip sync with."""
        self.rtcp_datagrams += 1
        try:
            packets = rtcp.parse_compound(data)
        except rtcp.RtcpError:
            return
        for packet in packets:
            if isinstance(packet, rtcp.SenderReport):
                self.receiver.on_sender_report(packet.ssrc, packet.ntp_timestamp, packet.rtp_timestamp)

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
                on_rtp=self.receiver.on_rtp if self._media_lost is None else self._on_rtp_after_drop,
                on_connected=self._on_subscribe_connected,
                on_rtcp=self._on_subscribe_rtcp,
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
                stream.expected_layer = layouts.expected_layer(
                    self.sizes.get(track.publisher), simulcast=self.shared.simulcast
                )
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
