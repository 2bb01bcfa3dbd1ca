"""The composite recording: one MP4 (H.264 + AAC) of the call's speaker view, rebuilt from recording records.

`Compositor` is synchronous and owns everything media: it decodes each track (VP8 with FFmpeg's decoder,
Opus), composes the speaker view straight into the planes of a YUV 4:2:0 canvas with numpy (no RGB round
trip; tiles are scaled by swscale through PyAV), mixes the audio, and encodes with libx264 and FFmpeg's AAC.
`CompositeWorker` (huddle.recording.worker) runs one in a process of its own, fed from the server's event
loop through a pipe that never blocks it.

Timeline. Everything is placed by the records' `time` (seconds on the recording clock). Output video frame
n shows t = n / fps: for each participant the newest decoded frame with time <= t. Audio packets are
summed into a mix at the sample position of their time (kept contiguous by their RTP timestamps; see
`_AudioTrack.position`), silence where nobody spoke. Video pts are frame indexes and audio pts sample
indexes, both integers, so the two cannot drift apart however long the recording. Records arrive out of
order across tracks, so output up to t is written only once the watermark, the latest time seen minus
`latency`, has passed t; what arrives later than that is shown late (video) or dropped and counted (audio).
The output runs from 0 to RecordingStopped.at (or to the latest time seen, at close()).

Crash safety. The MP4 is fragmented (an empty moov up front, then a moof+mdat per fragment, one per
keyframe, every `keyframe_interval` seconds): when the process dies, everything up to the last complete
fragment stays playable. A fragmented file has no edit list, so each track starts at its first packet's
dts: were that negative (B-frames; the AAC encoder's 1024 samples of priming) the muxer would shift that
track alone and break A/V sync (by 45 ms, measured). Hence no B-frames, and the AAC encoder is fed from
sample 1024 on (pts 1024, first packet pts 0): its priming takes the place of the mix's first 21.3 ms, and
every later sample sits exactly at its time.
"""

from __future__ import annotations

import collections
import contextlib
import fractions
import functools
import logging
import math
import zlib
from pathlib import Path
from typing import Any

import av
import av.error
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image, ImageDraw, ImageFont

from huddle.recording.layout import MAX_THUMBS, Rect, speaker_layout
from huddle.recording.records import (
    Frame,
    Record,
    RecordingStarted,
    RecordingStopped,
    SpeakerChanged,
    TrackEnded,
    TrackStarted,
)

__all__ = ["SAMPLE_RATE", "Compositor"]

log = logging.getLogger(__name__)

SAMPLE_RATE = 48_000
AAC_FRAME = 1024  # samples per AAC frame
AAC_PRIMING = 1024  # samples FFmpeg's AAC encoder puts in front (its packets start at pts -1024)
CHANNELS = 2
MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"
BACKGROUND = (24, 128, 128)  # Y, U, V of the canvas around the tiles: near black
TILE_BACKGROUND = (16, 128, 128)  # the letterbox bars inside a tile: black
LABEL_BOX_ALPHA = 0.6  # how dark the box behind a name is
PENDING_VIDEO_FRAMES = 90  # decoded frames a track holds ahead of the composition, at most
# Placeholder tiles (participants without video) get one of these colours, by participant id.
PALETTE = (
    (52, 73, 94),
    (22, 120, 103),
    (112, 58, 143),
    (176, 78, 20),
    (41, 98, 155),
    (152, 47, 43),
    (39, 124, 76),
    (97, 106, 107),
)
FONT_FILES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "DejaVuSans-Bold.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Bold.ttf",
)


# --- text and tiles: rendered once per name and size, cached ------------------------------------------------


@functools.lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for name in FONT_FILES:
        with contextlib.suppress(OSError):
            return ImageFont.truetype(name, size)
    return ImageFont.load_default(size)


def _fit_text(text: str, font: Any, max_width: int) -> str:
    """`text`, shortened with an ellipsis until it is at most `max_width` pixels wide."""
    if font.getlength(text) <= max_width:
        return text
    while text and font.getlength(text + "…") > max_width:
        text = text[:-1]
    return text + "…" if text else ""


class _Label:
    """A name in a dark translucent box, as per-pixel (multiply, add) pairs on the three planes, so that
    blending it onto the canvas is `(plane * mul + add) >> 8` in uint16 (never overflows: mul + add / 235
    stays within 256)."""

    __slots__ = ("add_c", "add_y", "h", "mul_c", "mul_y", "w")

    def __init__(self, text: str, size: int, max_width: int) -> None:
        font = _font(size)
        pad = max(2, size // 3)
        text = _fit_text(text, font, max(1, max_width - 2 * pad))
        left, top, right, bottom = font.getbbox(text or " ")
        w = min(max(2, (right - left + 2 * pad + 1) & ~1), max(2, max_width & ~1))
        h = (bottom - top + 2 * pad + 1) & ~1
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).text((pad - left, pad - top), text, font=font, fill=255)
        text_a = np.asarray(mask, dtype=np.float32) / 255.0
        box_a = LABEL_BOX_ALPHA
        keep = (1.0 - box_a) * (1.0 - text_a)  # weight of what is under the label
        self.w, self.h = w, h
        self.mul_y = np.floor(keep * 256).astype(np.uint16)
        self.add_y = np.floor((16.0 * box_a * (1.0 - text_a) + 235.0 * text_a) * 256).astype(np.uint16)
        keep_c = keep.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
        self.mul_c = np.floor(keep_c * 256).astype(np.uint16)
        self.add_c = (128 * (256 - self.mul_c)).astype(np.uint16)


@functools.lru_cache(maxsize=256)
def _label(text: str, size: int, max_width: int) -> _Label:
    return _Label(text, size, max_width)


def _blend(region: np.ndarray, mul: np.ndarray, add: np.ndarray) -> None:
    mixed = region.astype(np.uint16)
    mixed *= mul
    mixed += add
    mixed >>= 8
    region[...] = mixed


def _yuv_planes(frame: av.VideoFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views (no copy) of a yuv420p frame's planes, without the line padding."""
    planes = []
    for plane in frame.planes[:3]:
        rows = np.frombuffer(plane, np.uint8)[: plane.line_size * plane.height]
        planes.append(rows.reshape(plane.height, plane.line_size)[:, : plane.width])
    return planes[0], planes[1], planes[2]


def _placeholder(key: str, name: str, w: int, h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A tile for someone without video: a colour of their own, their initials in a disc and their name."""
    colour = PALETTE[zlib.crc32(key.encode()) % len(PALETTE)]
    image = Image.new("RGB", (w, h), colour)
    draw = ImageDraw.Draw(image)
    radius = min(w, h) // 5
    cx, cy = w // 2, h // 2 - (radius // 3 if h >= 60 else 0)
    if radius >= 6:
        disc = tuple(min(255, c + 60) for c in colour)
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=disc)
        initials = "".join(part[:1] for part in name.split()[:2]).upper() or "?"
        font = _font(max(6, radius))
        draw.text((cx, cy), initials, font=font, fill=(255, 255, 255), anchor="mm")
    size = max(8, min(40, h // 9))
    font = _font(size)
    text = _fit_text(name, font, w - 8)
    y = min(h - size // 2 - 4, cy + radius + size)
    draw.text((w // 2, y), text, font=font, fill=(255, 255, 255), anchor="mm")
    frame = av.VideoFrame.from_image(image).reformat(format="yuv420p")
    return tuple(np.ascontiguousarray(p) for p in _yuv_planes(frame))  # type: ignore[return-value]


def _is_vp8_keyframe(data: bytes) -> bool:
    return len(data) >= 10 and not data[0] & 1 and data[3:6] == b"\x9d\x01\x2a"


# --- per-track state --------------------------------------------------------------------------------------


class _Track:
    __slots__ = ("ended_at", "id", "kind", "participant_id", "screen", "started_at")

    def __init__(self, record: TrackStarted) -> None:
        self.id = record.track_id
        self.participant_id = record.participant_id
        self.kind = record.kind
        self.screen = record.source in ("screen", "screen_audio")  # a screen share, not a camera or mic
        self.started_at = record.at
        self.ended_at = math.inf

    def active(self, t: float) -> bool:
        return self.started_at <= t < self.ended_at


class _VideoTrack(_Track):
    __slots__ = ("current", "decoder", "pending", "scaled", "scaler", "serial", "waiting_keyframe")

    def __init__(self, record: TrackStarted) -> None:
        super().__init__(record)
        self.decoder = av.CodecContext.create("vp8", "r")
        self.decoder.thread_count = 1  # one frame out per frame in, at once: the times stay matched
        self.pending: collections.deque[tuple[float, av.VideoFrame]] = collections.deque()
        self.current: av.VideoFrame | None = None
        self.serial = 0  # counts frames made current: what the composition's change detection keys on
        self.scaled: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        # One scaler per track keeps its swscale context from frame to frame (setting one up costs ten
        # times the scaling of a thumbnail); one thread, as the whole compositor has one core.
        self.scaler = VideoReformatter()
        self.waiting_keyframe = True

    def advance(self, t: float) -> None:
        """Make the newest decoded frame with time <= t current."""
        newest = None
        while self.pending and self.pending[0][0] <= t:
            newest = self.pending.popleft()[1]
        if newest is not None:
            self.current = newest
            self.serial += 1
            self.scaled.clear()

    def planes(self, w: int, h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The current frame scaled to w x h (cached until the next frame)."""
        planes = self.scaled.get((w, h))
        if planes is None:
            assert self.current is not None
            frame = self.scaler.reformat(
                self.current, w, h, format="yuv420p", interpolation="BILINEAR", threads=1
            )
            planes = self.scaled[(w, h)] = _yuv_planes(frame)
        return planes


class _AudioTrack(_Track):
    __slots__ = ("anchor_position", "anchor_timestamp", "clock_rate", "decoder")

    def __init__(self, record: TrackStarted) -> None:
        super().__init__(record)
        self.decoder = av.CodecContext.create("opus", "r")
        self.decoder.sample_rate = SAMPLE_RATE
        self.decoder.layout = "stereo"
        self.clock_rate = record.clock_rate or SAMPLE_RATE
        self.anchor_timestamp: int | None = None
        self.anchor_position = 0

    def position(self, frame: Frame, resync: int) -> tuple[int, bool]:
        """The output sample at which this packet starts.

        Consecutive packets follow each other by their RTP timestamps, so that rounding `time` to samples
        never opens a one-sample gap or overlap between them; when the timestamps and `time` disagree by
        more than `resync` samples (a gap in the stream, a new sender-report mapping, clock drift between
        the sender and the recording), the track is re-anchored on `time`."""
        by_time = round(frame.time * SAMPLE_RATE)
        if self.anchor_timestamp is not None:
            by_timestamp = self.anchor_position + round(
                (frame.timestamp - self.anchor_timestamp) * SAMPLE_RATE / self.clock_rate
            )
            if abs(by_timestamp - by_time) <= resync:
                return by_timestamp, False
        resynced = self.anchor_timestamp is not None
        self.anchor_timestamp, self.anchor_position = frame.timestamp, by_time
        return by_time, resynced


class _Participant:
    __slots__ = ("id", "last_spoke", "name", "order")

    def __init__(self, participant_id: str, name: str, order: int) -> None:
        self.id = participant_id
        self.name = name
        self.order = order
        self.last_spoke = -math.inf


# --- the compositor ---------------------------------------------------------------------------------------


class Compositor:
    """Builds the speaker-view MP4 at `path` from recording records: `feed` each record, then `close`.

    Options: `latency` (s) is how long records may lag the newest one and still make it in; `preset`,
    `crf` and `threads` go to libx264 (threads=0: libx264's choice), `aac_coder` to FFmpeg's AAC encoder;
    `keyframe_interval` (s) is also the fragment length, hence what an abrupt kill can lose; `audio_resync`
    (s): see `_AudioTrack.position`; `max_jump` (s): a time further than this beyond the newest one is
    taken for garbage and skipped. Records are not filtered by recording id: one Compositor, one
    recording. Counters of what was written and skipped are in `stats`."""

    def __init__(
        self,
        path: Path | str,
        width: int = 1280,
        height: int = 720,
        fps: int = 30,
        *,
        latency: float = 0.4,
        max_thumbs: int = MAX_THUMBS,
        preset: str = "veryfast",
        crf: int = 23,
        threads: int = 1,
        keyframe_interval: float = 2.0,
        audio_bitrate: int = 128_000,
        aac_coder: str = "fast",
        audio_resync: float = 0.010,
        max_jump: float = 300.0,
    ) -> None:
        if width % 2 or height % 2 or width < 16 or height < 16:
            raise ValueError(f"width and height must be even and at least 16, not {width}x{height}")
        if not 1 <= fps <= 60 or int(fps) != fps:
            raise ValueError(f"fps must be a whole number from 1 to 60, not {fps}")
        self.path = Path(path)
        self.width, self.height, self.fps = width, height, int(fps)
        self.latency = latency
        self.max_thumbs = max_thumbs
        self.max_jump = max_jump
        self._resync = round(audio_resync * SAMPLE_RATE)
        self.stats: collections.Counter[str] = collections.Counter()

        self._tracks: dict[str, _Track] = {}
        self._ended: set[str] = set()  # tracks gone from _tracks: their late frames are not "unknown"
        self._participants: dict[str, _Participant] = {}
        self._speaker_events: list[tuple[float, int, str | None]] = []  # (at, seq, participant), by at
        self._speaker: str | None = None
        self._event_seq = 0
        self._latest = 0.0  # the newest time seen
        self._end: float | None = None  # RecordingStopped.at
        self._frames = 0  # output video frames written: the next one shows t = _frames / fps
        self._closed = False

        # The canvas: one buffer laid out as a yuv420p frame, composed in place.
        self._canvas = np.empty((height * 3 // 2, width), np.uint8)
        self._y = self._canvas[:height]
        chroma = self._canvas[height:].reshape(-1)
        self._u = chroma[: width * height // 4].reshape(height // 2, width // 2)
        self._v = chroma[width * height // 4 :].reshape(height // 2, width // 2)
        self._signature: tuple[Any, ...] | None = None
        self._placeholders: dict[tuple[str, str, int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

        # The mix: samples from _mix_base on (the first sample not yet encoded), grown as needed.
        self._mix = np.zeros((CHANNELS, SAMPLE_RATE), np.float32)
        self._mix_base = 0
        self._mix_used = 0  # samples of _mix holding anything

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(
            str(self.path), "w", format="mp4", options={"movflags": MOVFLAGS, "flush_packets": "1"}
        )
        try:
            keyint = max(1, round(keyframe_interval * fps))
            self._video = self._container.add_stream("libx264", rate=self.fps)
            self._video.width, self._video.height, self._video.pix_fmt = width, height, "yuv420p"
            self._video.time_base = fractions.Fraction(1, self.fps)
            context = self._video.codec_context
            context.gop_size = keyint
            context.thread_count = threads
            # Fixed keyframe spacing makes fixed fragments; the VUI says BT.601, which is what VP8 carries.
            context.options = {
                "preset": preset,
                "crf": str(crf),
                # No B-frames: the first packet's dts is then its pts, 0 (see the module's docstring).
                "x264-params": (
                    f"keyint={keyint}:min-keyint={keyint}:scenecut=0:bframes=0"
                    ":colorprim=smpte170m:transfer=smpte170m:colormatrix=smpte170m"
                ),
            }
            self._audio = self._container.add_stream("aac", rate=SAMPLE_RATE, layout="stereo")
            self._audio.time_base = fractions.Fraction(1, SAMPLE_RATE)
            self._audio.codec_context.bit_rate = audio_bitrate
            # FFmpeg's default AAC coder (twoloop) takes ~0.9 ms per 1024 samples of speech-like audio, the
            # fast one ~0.14 ms: 4 % of a core against 0.7 %, for a difference nobody hears in a call.
            self._audio.codec_context.options = {"aac_coder": aac_coder}
        except BaseException:
            self._container.close()
            raise

    # --- input -------------------------------------------------------------------------------------------

    @property
    def position(self) -> float:
        """Seconds of video written so far."""
        return self._frames / self.fps

    def feed(self, record: Record) -> None:
        """Take one record. Never raises on bad media: what cannot be used is skipped, counted in `stats`."""
        if self._closed:
            raise RuntimeError("compositor is closed")
        self.stats["records"] += 1
        if isinstance(record, Frame):
            self._on_frame(record)
        elif isinstance(record, TrackStarted):
            if self._saw(record.at):
                self._on_track_started(record)
        elif isinstance(record, TrackEnded):
            if self._saw(record.at):
                track = self._tracks.get(record.track_id)
                if track is not None:
                    track.ended_at = min(track.ended_at, record.at)
        elif isinstance(record, SpeakerChanged):
            if self._saw(record.at):
                self._event_seq += 1
                event = (record.at, self._event_seq, record.participant_id)
                events = self._speaker_events
                events.append(event)
                if len(events) > 1 and events[-2] > event:
                    events.sort()
        elif isinstance(record, RecordingStopped):
            if math.isfinite(record.at):
                self._end = max(0.0, record.at)
        elif isinstance(record, RecordingStarted):
            pass
        else:
            self.stats["unknown_records"] += 1

    def _saw(self, time: float) -> bool:
        """Move the watermark on with a time from a record; False if the time is garbage."""
        if not math.isfinite(time) or time > self._latest + self.max_jump:
            self.stats["bad_times"] += 1
            return False
        if time > self._latest:
            self._latest = time
            self._advance(time - self.latency)
        return True

    def _on_track_started(self, record: TrackStarted) -> None:
        participant = self._participants.get(record.participant_id)
        if participant is None:
            participant = self._participants[record.participant_id] = _Participant(
                record.participant_id, record.name, len(self._participants)
            )
        participant.name = record.name or participant.name
        if record.track_id in self._tracks:
            self.stats["duplicate_tracks"] += 1
            return
        codec = record.codec.lower()
        if record.kind == "video" and codec == "vp8":
            self._tracks[record.track_id] = _VideoTrack(record)
        elif record.kind == "audio" and codec == "opus":
            self._tracks[record.track_id] = _AudioTrack(record)
        else:
            self.stats["unsupported_tracks"] += 1
            return
        self._ended.discard(record.track_id)

    def _on_frame(self, frame: Frame) -> None:
        track = self._tracks.get(frame.track_id)
        if track is None:
            self.stats["ended_track_frames" if frame.track_id in self._ended else "unknown_track_frames"] += 1
            return
        if frame.time >= track.ended_at:
            self.stats["ended_track_frames"] += 1
            return
        if not self._saw(frame.time):
            return
        if not frame.data:  # an empty packet would put the decoder into draining, for good
            self.stats[f"corrupt_{track.kind}_frames"] += 1
            return
        if isinstance(track, _VideoTrack):
            self._on_video(track, frame)
        elif isinstance(track, _AudioTrack):
            self._on_audio(track, frame)

    def _on_video(self, track: _VideoTrack, frame: Frame) -> None:
        keyframe = _is_vp8_keyframe(frame.data)
        if track.waiting_keyframe:
            if not keyframe:
                self.stats["video_frames_before_keyframe"] += 1
                return
            track.waiting_keyframe = False
        try:
            decoded = track.decoder.decode(av.Packet(frame.data))
        except (av.error.FFmpegError, ValueError, MemoryError):
            # Later frames refer to what this one would have built: freeze until the next keyframe.
            self.stats["corrupt_video_frames"] += 1
            track.waiting_keyframe = True
            return
        self.stats["video_frames_decoded"] += len(decoded)
        if frame.time <= self._frames / self.fps - 1 / self.fps:
            self.stats["late_video_frames"] += 1
        for picture in decoded:
            track.pending.append((frame.time, picture))
        while len(track.pending) > PENDING_VIDEO_FRAMES:
            track.pending.popleft()
            self.stats["video_frames_overflowed"] += 1

    def _on_audio(self, track: _AudioTrack, frame: Frame) -> None:
        try:
            decoded = track.decoder.decode(av.Packet(frame.data))
        except (av.error.FFmpegError, ValueError, MemoryError):
            self.stats["corrupt_audio_frames"] += 1
            return
        position, resynced = track.position(frame, self._resync)
        if resynced:
            self.stats["audio_resyncs"] += 1
        for piece in decoded:
            samples = piece.to_ndarray()
            if piece.format.name != "fltp" or piece.sample_rate != SAMPLE_RATE:
                self.stats["audio_format_mismatches"] += 1
                break
            self._mix_in(position, samples)
            position += piece.samples

    def _mix_in(self, position: int, samples: np.ndarray) -> None:
        count = samples.shape[1]
        start = position - self._mix_base
        if start < 0:  # (partly) before what is already encoded: too late
            self.stats["late_audio_frames"] += 1
            samples = samples[:, -start:]
            start = 0
            if not samples.shape[1]:
                return
            count = samples.shape[1]
        end = start + count
        if end > self._mix.shape[1]:
            grown = np.zeros((CHANNELS, max(end, 2 * self._mix.shape[1])), np.float32)
            grown[:, : self._mix_used] = self._mix[:, : self._mix_used]
            self._mix = grown
        self._mix[:, start:end] += samples  # a mono packet (one row) adds to both channels
        self._mix_used = max(self._mix_used, end)

    # --- output ------------------------------------------------------------------------------------------

    def _advance(self, watermark: float, final: bool = False) -> None:
        """Write the video frames and audio samples that the watermark has passed (all of them, up to the
        end, if `final`)."""
        if self._end is not None:
            watermark = min(watermark, self._end)
        if watermark < 0:
            return
        last = math.floor(watermark * self.fps + 1e-9)  # the last frame index whose t <= watermark
        if self._end is not None:  # frames 0 .. ceil(end * fps) - 1 cover the recording
            last = min(last, math.ceil(self._end * self.fps - 1e-9) - 1)
        if final:
            last = max(0, last, math.ceil(watermark * self.fps - 1e-9) - 1)
        while self._frames <= last:
            self._write_video(self._frames)
        self._write_audio(math.floor(watermark * SAMPLE_RATE + 1e-6), final)

    def _write_video(self, index: int) -> None:
        t = index / self.fps
        self._compose(t)
        frame = av.VideoFrame.from_numpy_buffer(self._canvas, format="yuv420p")
        frame.pts = index
        for packet in self._video.encode(frame):
            self._container.mux(packet)
        self._frames = index + 1
        self.stats["output_video_frames"] += 1
        self._drop_ended(t)

    def _write_audio(self, until: int, final: bool) -> None:
        # The encoder's priming stands for the mix's first AAC_PRIMING samples: its packets then start at
        # pts 0 like the video's, and neither stream is shifted by the muxer (see the module's docstring).
        start = max(self._mix_base, AAC_PRIMING)
        count = until - start
        frames = count // AAC_FRAME
        if final and count % AAC_FRAME:
            frames += 1
        if frames <= 0:
            return
        encoded = min(count, frames * AAC_FRAME)
        consumed = start - self._mix_base + encoded  # samples leaving the mix
        if consumed > self._mix.shape[1]:
            grown = np.zeros((CHANNELS, consumed), np.float32)
            grown[:, : self._mix_used] = self._mix[:, : self._mix_used]
            self._mix = grown
        offset = start - self._mix_base
        for i in range(frames):
            first = offset + i * AAC_FRAME
            last = min(offset + encoded, first + AAC_FRAME)
            chunk = np.clip(self._mix[:, first:last], -1.0, 1.0)
            piece = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
            piece.sample_rate = SAMPLE_RATE
            piece.pts = start + i * AAC_FRAME
            for packet in self._audio.encode(piece):
                self._mux_audio(packet)
        # Shift what is left to the front of the mix.
        left = max(0, self._mix_used - consumed)
        if left:
            self._mix[:, :left] = self._mix[:, consumed : consumed + left]
        self._mix[:, left : max(left, self._mix_used)] = 0.0
        self._mix_used = left
        self._mix_base += consumed
        self.stats["output_audio_samples"] += encoded

    def _mux_audio(self, packet: av.Packet) -> None:
        if packet.pts is not None and packet.pts < 0 and not self.stats["audio_negative_pts"]:
            log.warning(
                "composite %s: AAC priming is not %d samples: A/V sync is off", self.path, AAC_PRIMING
            )
            self.stats["audio_negative_pts"] += 1
        self._container.mux(packet)

    def _drop_ended(self, t: float) -> None:
        """Forget tracks that ended before t (their decoders and frames)."""
        for track_id in [tid for tid, track in self._tracks.items() if track.ended_at <= t]:
            del self._tracks[track_id]
            self._ended.add(track_id)

    def _current_speaker(self, t: float, present: dict[str, _Participant]) -> str | None:
        events = self._speaker_events
        while events and events[0][0] <= t:
            at, _, participant_id = events.pop(0)
            self._speaker = participant_id
            if participant_id in self._participants:
                self._participants[participant_id].last_spoke = at
        if self._speaker in present:
            return self._speaker
        # Nobody named, or they left: whoever spoke last, else the first with video, else the first.
        spoken = [p for p in present.values() if p.last_spoke > -math.inf]
        if spoken:
            return max(spoken, key=lambda p: p.last_spoke).id
        return next(iter(present), None)

    def _compose(self, t: float) -> None:
        present: dict[str, _Participant] = {}
        videos: dict[str, _VideoTrack] = {}  # each participant's camera
        screen: _VideoTrack | None = None  # the latest screen shared, of those showing anything
        for track in self._tracks.values():
            if isinstance(track, _VideoTrack):
                track.advance(t)
            if not track.active(t):
                continue
            present[track.participant_id] = self._participants[track.participant_id]
            if not isinstance(track, _VideoTrack) or track.current is None:
                continue
            if track.screen:
                if screen is None or track.started_at >= screen.started_at:
                    screen = track
                continue
            shown = videos.get(track.participant_id)
            if shown is None or track.started_at >= shown.started_at:
                videos[track.participant_id] = track
        # Join order; with video first, so that the default speaker is the first participant with video.
        ordered = dict(sorted(present.items(), key=lambda item: (item[1].id not in videos, item[1].order)))
        speaker = self._current_speaker(t, ordered)
        # A shared screen takes the main area, over the speaker, who leads the strip.
        strip = [p for p in present.values() if screen is not None or p.id != speaker]
        if len(strip) > self.max_thumbs:  # the most recent speakers keep their thumbnails
            keep = sorted(strip, key=lambda p: (p.id != speaker, -p.last_spoke, p.order))[: self.max_thumbs]
            strip = [p for p in strip if p in keep]
        strip.sort(key=lambda p: (p.id != speaker, p.order) if screen is not None else p.order)
        layout = speaker_layout(self.width, self.height, len(strip), self.max_thumbs)
        # (whose tile, where, its video or None for a placeholder, the name shown on it)
        tiles: list[tuple[_Participant, Rect, _VideoTrack | None, str]] = []
        if screen is not None:
            sharer = self._participants[screen.participant_id]
            tiles.append((sharer, layout.main, screen, f"{sharer.name} (screen)"))
        elif speaker is not None:
            tiles.append((present[speaker], layout.main, videos.get(speaker), present[speaker].name))
        tiles += [(p, rect, videos.get(p.id), p.name) for p, rect in zip(strip, layout.thumbs, strict=False)]
        signature = tuple(
            (p.id, name, rect, id(video), video.serial if video is not None else -1)
            for p, rect, video, name in tiles
        )
        if signature == self._signature:
            return  # nothing on screen changed: the canvas is still right
        self._signature = signature
        self._y.fill(BACKGROUND[0])
        self._u.fill(BACKGROUND[1])
        self._v.fill(BACKGROUND[2])
        for participant, rect, video, name in tiles:
            if video is None:
                self._paste_placeholder(participant, rect)
            else:
                self._paste_label(name, self._paste_video(video, rect))

    def _paste_video(self, track: _VideoTrack, rect: Rect) -> Rect:
        current = track.current
        assert current is not None
        inner = rect.fit(current.width, current.height)
        if inner != rect:
            self._fill(rect, TILE_BACKGROUND)
        y, u, v = track.planes(inner.w, inner.h)
        half = inner.half
        self._y[inner.y : inner.y + inner.h, inner.x : inner.x + inner.w] = y
        self._u[half.y : half.y + half.h, half.x : half.x + half.w] = u[: half.h, : half.w]
        self._v[half.y : half.y + half.h, half.x : half.x + half.w] = v[: half.h, : half.w]
        return inner

    def _paste_placeholder(self, participant: _Participant, rect: Rect) -> None:
        key = (participant.id, participant.name, rect.w, rect.h)
        planes = self._placeholders.get(key)
        if planes is None:
            if len(self._placeholders) > 64:
                self._placeholders.clear()
            planes = self._placeholders[key] = _placeholder(participant.id, participant.name, rect.w, rect.h)
        y, u, v = planes
        half = rect.half
        self._y[rect.y : rect.y + rect.h, rect.x : rect.x + rect.w] = y
        self._u[half.y : half.y + half.h, half.x : half.x + half.w] = u[: half.h, : half.w]
        self._v[half.y : half.y + half.h, half.x : half.x + half.w] = v[: half.h, : half.w]

    def _paste_label(self, name: str, rect: Rect) -> None:
        size = max(9, min(24, rect.h // 9))
        margin = max(2, (size // 3) & ~1)
        label = _label(name, size, rect.w - 2 * margin)
        if label.h + 2 * margin > rect.h:
            return
        x = rect.x + margin
        y = (rect.y + rect.h - margin - label.h) & ~1
        _blend(self._y[y : y + label.h, x : x + label.w], label.mul_y, label.add_y)
        cy, cx, ch, cw = y // 2, x // 2, label.h // 2, label.w // 2
        _blend(self._u[cy : cy + ch, cx : cx + cw], label.mul_c, label.add_c)
        _blend(self._v[cy : cy + ch, cx : cx + cw], label.mul_c, label.add_c)

    def _fill(self, rect: Rect, yuv: tuple[int, int, int]) -> None:
        half = rect.half
        self._y[rect.y : rect.y + rect.h, rect.x : rect.x + rect.w] = yuv[0]
        self._u[half.y : half.y + half.h, half.x : half.x + half.w] = yuv[1]
        self._v[half.y : half.y + half.h, half.x : half.x + half.w] = yuv[2]

    def close(self) -> None:
        """Write everything up to the end (RecordingStopped.at, or the newest time seen) and finish the
        file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            end = self._end if self._end is not None else self._latest
            self._advance(end, final=True)
            for packet in self._video.encode(None):
                self._container.mux(packet)
            for packet in self._audio.encode(None):
                self._mux_audio(packet)
        finally:
            self._container.close()
            self._tracks.clear()

    def __enter__(self) -> Compositor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
