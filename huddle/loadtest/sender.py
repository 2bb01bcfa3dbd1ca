"""The publishing side of a synthetic participant: RTP streams built from templates patched in place.

Each outgoing stream (the microphone, and each simulcast layer of the camera, or its one stream without
simulcast) owns one buffer. Its header (fixed part with the SSRC, and the header extension block) is built
once when the publish answer says which extension ids were agreed, in two variants: with MID and RID (a
stream's first `MID_RID_PACKETS` packets, as Chromium sends them until it can assume the SFU learned the
SSRC; a stream without simulcast has no RID) and without. Per packet the header and the pre-packetized
payload are copied into the buffer and the per-packet fields written where they lie: sequence number,
timestamp, marker, abs-send-time, transport-wide sequence number, audio level, VP8 picture id and TL0PICIDX,
and the trailer (sender index, layer, send time). The one copy out of the buffer is the `bytes` that libsrtp
takes.

Senders are paced by `huddle.loadtest.pacer.Pacer`, one loop for the whole process: `VideoSender.fire()`
sends one frame of every active layer, `AudioSender.fire()` one 20 ms packet.
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Sequence

from huddle.loadtest.connection import MediaConnection
from huddle.loadtest.media import (
    AUDIO_LAYER,
    FPS,
    LAYERS,
    SINGLE_LAYER,
    TRAILER,
    TRAILER_MAGIC,
    MediaLibrary,
    VideoFrame,
)
from huddle.rtc import rtcp

__all__ = [
    "MID_RID_PACKETS",
    "AudioSender",
    "ExtensionIds",
    "RtpStream",
    "TransportSeq",
    "VideoSender",
    "now_us",
    "speech_level",
]

MID_RID_PACKETS = 20
BUFFER_SIZE = 1500
_SEQ_TS = struct.Struct("!HI")
_U32 = struct.Struct("!I")
VIDEO_CLOCK = 90000
AUDIO_CLOCK = 48000
AUDIO_INTERVAL = 0.02
# The speaker's level pattern (RFC 6464, -dBov): talk with short pauses, as syllables and breaths make.
# A steady level would be taken for a hum by the SFU's active speaker detection.
SPEECH_PATTERN = (30, 24, 20, 22, 26, 31, 25, 21, 23, 28, 35, 27, 22, 20, 24, 127, 127, 127, 127, 127)
SILENCE = 127


def speech_level(n: int) -> int:
    """The RFC 6464 byte (V bit and level) of the speaker's n-th audio packet."""
    level = SPEECH_PATTERN[n % len(SPEECH_PATTERN)]
    return level if level == SILENCE else 0x80 | level


class ExtensionIds:
    """The header extension ids agreed in the publish answer (None: not agreed, not sent)."""

    __slots__ = ("abs_send_time", "audio_level", "mid", "rid", "transport_cc")

    def __init__(
        self,
        *,
        mid: int | None = None,
        rid: int | None = None,
        abs_send_time: int | None = None,
        transport_cc: int | None = None,
        audio_level: int | None = None,
    ) -> None:
        self.mid = mid
        self.rid = rid
        self.abs_send_time = abs_send_time
        self.transport_cc = transport_cc
        self.audio_level = audio_level


def _header(pt: int, ssrc: int, elements: Sequence[tuple[int, bytes]]) -> tuple[bytes, dict[int, int]]:
    """A fixed RTP header with an RFC 8285 one-byte extension block: (bytes, value offset by element id)."""
    block = bytearray()
    offsets: dict[int, int] = {}
    for ext_id, value in elements:
        block.append((ext_id << 4) | (len(value) - 1))
        offsets[ext_id] = 16 + len(block)
        block += value
    block += bytes(-len(block) % 4)
    fixed = bytearray(12)
    fixed[0] = 0x90 if block else 0x80
    fixed[1] = pt & 0x7F
    _U32.pack_into(fixed, 8, ssrc)
    if not block:
        return bytes(fixed), {}
    return bytes(fixed) + b"\xbe\xde" + struct.pack("!H", len(block) // 4) + bytes(block), offsets


class RtpStream:
    """One SSRC: its buffer, header variants, counters, and the offsets of the fields patched per packet."""

    __slots__ = (
        "buf",
        "clock_rate",
        "first_header",
        "first_offsets",
        "header",
        "ids",
        "layer",
        "octets",
        "offsets",
        "packets",
        "seq",
        "ssrc",
        "ts",
        "ts_at",
        "view",
    )

    def __init__(
        self, pt: int, ssrc: int, mid: str, rid: str | None, ids: ExtensionIds, kind: str, layer: int
    ) -> None:
        self.ssrc = ssrc
        self.ids = ids
        self.layer = layer
        self.seq = random.getrandbits(16)
        self.ts = random.getrandbits(32)
        # When `ts` was last stepped (Unix time) and its clock: an SR maps "now", which lies after it.
        self.ts_at = 0.0
        self.clock_rate = AUDIO_CLOCK if kind == "audio" else VIDEO_CLOCK
        self.packets = 0
        self.octets = 0
        common: list[tuple[int, bytes]] = []
        if kind == "audio" and ids.audio_level is not None:
            common.append((ids.audio_level, bytes(1)))
        if ids.abs_send_time is not None:
            common.append((ids.abs_send_time, bytes(3)))
        if ids.transport_cc is not None:
            common.append((ids.transport_cc, bytes(2)))
        first = list(common)
        if ids.mid is not None:
            first.append((ids.mid, mid.encode()))
        if rid is not None and ids.rid is not None:
            first.append((ids.rid, rid.encode()))
        self.header, self.offsets = _header(pt, ssrc, common)
        self.first_header, self.first_offsets = _header(pt, ssrc, first)
        self.buf = bytearray(BUFFER_SIZE)
        self.view = memoryview(self.buf)

    def build(
        self,
        payload: bytes,
        marker: bool,
        tseq: int,
        sender: int,
        level: int = -1,
        picture_id: int = -1,
        tl0picidx: int = 0,
    ) -> bytes:
        """The next packet of this stream with `payload` (whose trailer room gets the trailer), as bytes.

        `level`: the RFC 6464 byte for audio; `picture_id` and `tl0picidx`: the VP8 descriptor's fields.
        """
        now_us = time.time_ns() // 1000  # per packet: the trailer says when this very packet left
        if self.packets < MID_RID_PACKETS:
            header, offsets = self.first_header, self.first_offsets
        else:
            header, offsets = self.header, self.offsets
        buf = self.buf
        start = len(header)
        end = start + len(payload)
        buf[0:start] = header
        buf[start:end] = payload
        if marker:
            buf[1] |= 0x80
        _SEQ_TS.pack_into(buf, 2, self.seq, self.ts & 0xFFFFFFFF)
        ids = self.ids
        if ids.abs_send_time is not None:
            # 6.18 fixed-point seconds, wrapping every 64 s.
            value = (now_us << 18) // 1_000_000
            at = offsets[ids.abs_send_time]
            buf[at] = (value >> 16) & 0xFF
            buf[at + 1] = (value >> 8) & 0xFF
            buf[at + 2] = value & 0xFF
        if ids.transport_cc is not None:
            at = offsets[ids.transport_cc]
            buf[at] = (tseq >> 8) & 0xFF
            buf[at + 1] = tseq & 0xFF
        if level >= 0 and ids.audio_level is not None:
            buf[offsets[ids.audio_level]] = level
        if picture_id >= 0:
            buf[start + 2] = 0x80 | (picture_id >> 8)
            buf[start + 3] = picture_id & 0xFF
            buf[start + 4] = tl0picidx
        TRAILER.pack_into(buf, end - 8, sender, self.layer, TRAILER_MAGIC, now_us & 0xFFFFFFFF)
        self.seq = (self.seq + 1) & 0xFFFF
        self.packets += 1
        self.octets += len(payload)
        return bytes(self.view[:end])

    def sender_report(self, now: float) -> bytes:
        """An RTCP SR for this stream: our clock against the RTP timestamp it stands for now (recorders
        line tracks up by it, so it counts the time since the last frame too)."""
        ts = self.ts + round(max(0.0, now - self.ts_at) * self.clock_rate) if self.ts_at else self.ts
        return rtcp.SenderReport(
            self.ssrc,
            rtcp.ntp_from_unix(now),
            ts & 0xFFFFFFFF,
            self.packets & 0xFFFFFFFF,
            self.octets & 0xFFFFFFFF,
        ).serialize()


class TransportSeq:
    """The transport-wide sequence number of one connection (shared by its audio and video)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = random.getrandbits(16)

    def next(self) -> int:
        value = self.value
        self.value = (value + 1) & 0xFFFF
        return value


class VideoSender:
    """The camera: one RtpStream per simulcast layer (or one without simulcast), one frame per layer per
    `fire()` (30 fps)."""

    interval = 1.0 / FPS

    def __init__(
        self,
        connection: MediaConnection,
        library: MediaLibrary,
        *,
        index: int,
        pt: int,
        mid: str,
        rids: Sequence[str],
        ids: ExtensionIds,
        tseq: TransportSeq,
        ssrc: int | None = None,
    ) -> None:
        """`ssrc`: send no simulcast but one stream, the SSRC the offer named, of the library's SINGLE_LAYER
        and without RID (`rids` is then not used)."""
        self.connection = connection
        self.library = library
        self.index = index
        self.tseq = tseq
        if ssrc is None:
            # The clip of each rid the server receives (q, h, f: the library's sizes, low to high); the
            # trailer names the library's layer, so that a receiver knows the size whatever the server
            # accepted.
            known = {spec.rid: i for i, spec in enumerate(LAYERS)}
            library_layers = [known.get(rid, min(i, len(LAYERS) - 1)) for i, rid in enumerate(rids)]
            self.streams = [
                RtpStream(pt, random.getrandbits(32) or 1, mid, rid, ids, "video", layer)
                for rid, layer in zip(rids, library_layers, strict=True)
            ]
            self.rids = list(rids)
        else:
            library_layers = [SINGLE_LAYER]
            self.streams = [RtpStream(pt, ssrc, mid, None, ids, "video", SINGLE_LAYER)]
            # Named after the layer it is, for `layers_sent`; the SFU sends no `publisher_layers` for a
            # track without simulcast, so nothing pauses it.
            self.rids = [LAYERS[SINGLE_LAYER].rid]
        self.clips = [library.video[i] for i in library_layers]
        self.active = [True] * len(self.streams)
        # Per layer: the clip frame to send next, and whether the layer restarts with a keyframe.
        self.position = [random.randrange(len(clip)) for clip in self.clips]
        self.restart = [True] * len(self.streams)
        # Where each layer's clip first wraps (then at its end): a keyframe phase of this publisher's own, as
        # cameras switched on at different moments have, shared by its layers as one encoder's are.
        # Publishers who joined together would otherwise send their keyframes together, every CLIP_SECONDS.
        first_wrap = random.randrange(1, len(self.clips[0]) + 1)
        self.wrap = [min(first_wrap, len(clip)) for clip in self.clips]
        self.picture_id = [random.getrandbits(15) for _ in self.streams]
        self.tl0picidx = [random.getrandbits(8) for _ in self.streams]
        self.frames = 0
        self.keyframes_requested = 0
        self.closed = False

    def set_active(self, rids: Sequence[str]) -> None:
        """publisher_layers: send these layers only; one that comes back starts with a keyframe."""
        for layer, rid in enumerate(self.rids):
            on = rid in rids
            if on and not self.active[layer]:
                self.restart[layer] = True
            self.active[layer] = on

    def request_keyframe(self, ssrc: int) -> None:
        for layer, stream in enumerate(self.streams):
            if stream.ssrc == ssrc:
                self.restart[layer] = True
                self.keyframes_requested += 1

    def fire(self) -> None:
        connection = self.connection
        ready = connection.srtp is not None and not connection.closed
        now = time.time()
        for layer, stream in enumerate(self.streams):
            stream.ts += VIDEO_CLOCK // FPS  # time passes for paused layers too, as on a camera
            stream.ts_at = now
            if not ready or not self.active[layer]:
                continue
            clip = self.clips[layer]
            if self.restart[layer]:
                self.restart[layer] = False
                self.position[layer] = 0
            frame = clip[self.position[layer]]
            self.position[layer] += 1
            if self.position[layer] >= self.wrap[layer]:
                self.position[layer] = 0
                self.wrap[layer] = len(clip)
            self._send_frame(layer, stream, frame)
        self.frames += 1

    def _send_frame(self, layer: int, stream: RtpStream, frame: VideoFrame) -> None:
        picture_id = self.picture_id[layer] = (self.picture_id[layer] + 1) & 0x7FFF
        if frame.tid == 0:
            self.tl0picidx[layer] = (self.tl0picidx[layer] + 1) & 0xFF
        tl0 = self.tl0picidx[layer]
        payloads = frame.payloads
        last = len(payloads) - 1
        send = self.connection.send_rtp
        tseq = self.tseq
        index = self.index
        for n, payload in enumerate(payloads):
            send(stream.build(payload, n == last, tseq.next(), index, -1, picture_id, tl0))

    def sender_reports(self, now: float) -> list[bytes]:
        return [
            s.sender_report(now) for layer, s in enumerate(self.streams) if self.active[layer] and s.packets
        ]


class AudioSender:
    """The microphone: one Opus packet per `fire()` (every 20 ms) with its RFC 6464 audio level."""

    interval = AUDIO_INTERVAL

    def __init__(
        self,
        connection: MediaConnection,
        library: MediaLibrary,
        *,
        index: int,
        pt: int,
        mid: str,
        ids: ExtensionIds,
        tseq: TransportSeq,
        speaker: bool,
        ssrc: int,
    ) -> None:
        self.connection = connection
        self.index = index
        self.tseq = tseq
        self.speaker = speaker
        self.payloads = library.audio_loud if speaker else library.audio_quiet
        self.stream = RtpStream(pt, ssrc, mid, None, ids, "audio", AUDIO_LAYER)
        self.count = 0
        self.closed = False

    def fire(self) -> None:
        stream = self.stream
        stream.ts += AUDIO_CLOCK // 50
        stream.ts_at = time.time()
        n = self.count
        self.count = n + 1
        connection = self.connection
        if connection.srtp is None or connection.closed:
            return
        level = speech_level(n) if self.speaker else SILENCE
        payload = self.payloads[n % len(self.payloads)]
        connection.send_rtp(stream.build(payload, n == 0, self.tseq.next(), self.index, level))

    def sender_reports(self, now: float) -> list[bytes]:
        return [self.stream.sender_report(now)] if self.stream.packets else []


def now_us() -> int:
    """The send and receive clock: the kernel's receive timestamps are on the real-time clock, so this is
    too (µs since the epoch); senders and receivers share it because they share the process."""
    return time.time_ns() // 1000
