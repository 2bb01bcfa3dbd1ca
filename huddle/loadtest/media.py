"""What synthetic participants send: media encoded once per process, packetized into payload templates.

Video is VP8 at the three simulcast sizes of a 1280x720 camera (rid q, h, f), encoded with libvpx through
PyAV from a synthetic moving picture (a panned pattern with fresh noise, so that the encoder spends its
bitrate as on a real camera) at 30 fps, with three temporal layers (pattern 0, 2, 1, 2, as Chromium sends
them). The clip is `CLIP_SECONDS` long and starts with a keyframe, so looping it gives a keyframe every
`CLIP_SECONDS` (each publisher's first loop ends at a random frame, so that publishers' keyframes come at
phases of their own); a keyframe request restarts a layer's clip. Each frame is cut into RTP payloads per
RFC 7741 (a descriptor with a 15-bit picture id, TL0PICIDX and TID), with room for the picture id, TL0PICIDX
and the trailer to be patched in at send time. Audio is Opus, 20 ms frames: a tone for the speaker and
near-silence for everyone else, at the packet sizes a microphone gives.

Every payload ends with an 8-byte trailer that the receiving synthetic participant reads (the SFU never looks
at payloads past the VP8 header): who sent it, which layer, and when (`TRAILER`).
"""

from __future__ import annotations

import array
import fractions
import functools
import math
import random
import struct
from dataclasses import dataclass

__all__ = [
    "AUDIO_LAYER",
    "CLIP_SECONDS",
    "FPS",
    "LAYERS",
    "MAX_CHUNK",
    "SINGLE_LAYER",
    "TEMPORAL_PATTERN",
    "TRAILER",
    "TRAILER_MAGIC",
    "TRAILER_SIZE",
    "VP8_DESCRIPTOR_SIZE",
    "LayerSpec",
    "MediaLibrary",
    "VideoFrame",
    "build_library",
    "encode_opus",
    "encode_vp8",
    "packetize_vp8",
]


@dataclass(frozen=True, slots=True)
class LayerSpec:
    rid: str
    width: int
    height: int
    bitrate: int


# The simulcast layers of a 1280x720 camera, low to high, at the web client's maxBitrate per encoding.
LAYERS = (
    LayerSpec("q", 320, 180, 150_000),
    LayerSpec("h", 640, 360, 500_000),
    LayerSpec("f", 1280, 720, 1_500_000),
)
AUDIO_LAYER = 3  # the trailer's layer byte for audio
# The library layer a camera without simulcast sends (h, 640x360); its trailers name it, as any layer's do.
SINGLE_LAYER = 1
FPS = 30
CLIP_SECONDS = 2  # also the keyframe interval
TEMPORAL_PATTERN = (0, 2, 1, 2)  # TID of frame i is TEMPORAL_PATTERN[i % 4]
# VP8 bytes per RTP packet at most: with the 12-byte header, ~28 bytes of extensions, the 6-byte descriptor,
# the trailer and SRTP's 16-byte tag, packets stay under Chromium's ~1,200 bytes.
MAX_CHUNK = 1120
VP8_DESCRIPTOR_SIZE = 6  # X, I (15-bit picture id), L (TL0PICIDX), T (TID|Y|KEYIDX)
# (sender index, layer, magic, send time in µs mod 2**32): the last 8 bytes of every payload.
TRAILER = struct.Struct("!HBBI")
TRAILER_SIZE = TRAILER.size
TRAILER_MAGIC = 0x4C
WARMUP_FRAMES = 32  # encoded and thrown away, so that the kept clip starts at the encoder's steady rate
NOISE_AMPLITUDE = 48  # fresh noise per frame (of 256 levels): what makes the encoder spend its bitrate


@dataclass(frozen=True, slots=True)
class VideoFrame:
    keyframe: bool
    tid: int
    # RTP payloads: descriptor (picture id and TL0PICIDX left zero), VP8 bytes, room for the trailer.
    payloads: tuple[bytes, ...]

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.payloads)


@dataclass(frozen=True, slots=True)
class MediaLibrary:
    video: tuple[tuple[VideoFrame, ...], ...]  # per layer (q, h, f): the clip's frames
    audio_loud: tuple[bytes, ...]  # Opus payloads (with room for the trailer), one per 20 ms
    audio_quiet: tuple[bytes, ...]

    def bitrate(self, layer: int) -> float:
        """The clip's mean RTP payload bitrate of one layer (bit/s)."""
        frames = self.video[layer]
        return sum(f.size for f in frames) * 8 * FPS / len(frames)

    def describe(self) -> dict[str, object]:
        return {
            "video": {
                spec.rid: {
                    "size": f"{spec.width}x{spec.height}",
                    "kbps": round(self.bitrate(i) / 1000),
                    "keyframe_bytes": self.video[i][0].size,
                    "packets_per_second": round(sum(len(f.payloads) for f in self.video[i]) / CLIP_SECONDS),
                }
                for i, spec in enumerate(LAYERS)
            },
            "audio_bytes": round(sum(len(p) for p in self.audio_loud) / len(self.audio_loud)),
        }


def _pattern(width: int, height: int, rnd: random.Random) -> bytes:
    """A luma plane of soft blocks, to be panned: what motion search finds again from frame to frame."""
    block = max(4, width // 80)
    rows: list[bytes] = []
    for _ in range(height // block + 1):
        values = bytes(rnd.randrange(40, 200) for _ in range(width // block + 1))
        row = b"".join(bytes((v,)) * block for v in values)[:width]
        rows.extend([row] * block)
    return b"".join(rows[:height])


def encode_vp8(
    width: int, height: int, bitrate: int, frames: int, *, seed: int = 1
) -> list[tuple[bytes, bool]]:
    """`frames` VP8 frames (bytes, keyframe) of a moving synthetic picture, the first a keyframe."""
    import av

    codec = av.CodecContext.create("libvpx", "w")
    codec.width, codec.height, codec.pix_fmt = width, height, "yuv420p"
    codec.time_base = fractions.Fraction(1, FPS)
    codec.framerate = FPS
    codec.bit_rate = bitrate
    codec.gop_size = 100_000  # keyframes only where asked: the clip's first frame
    kbps = bitrate // 1000
    codec.options = {
        "deadline": "realtime",
        "cpu-used": "8",
        "lag-in-frames": "0",
        "error-resilient": "1",
        "minrate": str(bitrate),
        "maxrate": str(bitrate),
        "max-intra-rate": "900",
        # Three temporal layers, L1T3 as Chromium encodes: TL0 at 1/4, TL1 at 1/2, TL2 at the full rate.
        "ts-parameters": (
            f"ts_number_layers=3:ts_target_bitrate={kbps * 4 // 10},{kbps * 6 // 10},{kbps}"
            ":ts_rate_decimator=4,2,1:ts_periodicity=4:ts_layer_id=0,2,1,2"
        ),
    }
    rnd = random.Random(seed)
    total = WARMUP_FRAMES + frames
    step = 2  # pixels the pattern moves per frame
    wide = width + step * total
    texture = _pattern(wide, height, rnd)
    noise_table = bytes(i * NOISE_AMPLITUDE // 256 for i in range(256))
    chroma = bytes((128,)) * (width // 2 * height // 2)
    size = width * height
    out: list[tuple[bytes, bool]] = []
    for i in range(total):
        dx = step * i
        luma = b"".join(texture[r * wide + dx : r * wide + dx + width] for r in range(height))
        # Pattern values stay under 200 and noise under NOISE_AMPLITUDE, so adding the planes as big
        # integers adds them byte by byte without a carry.
        noise = rnd.randbytes(size).translate(noise_table)
        luma = (int.from_bytes(luma, "big") + int.from_bytes(noise, "big")).to_bytes(size, "big")
        frame = av.VideoFrame(width, height, "yuv420p")
        frame.planes[0].update(luma)
        frame.planes[1].update(chroma)
        frame.planes[2].update(chroma)
        frame.pts = i
        if i == WARMUP_FRAMES:
            frame.pict_type = av.video.frame.PictureType.I
        for packet in codec.encode(frame):
            if i >= WARMUP_FRAMES:
                out.append((bytes(packet), bool(packet.is_keyframe)))
    for packet in codec.encode(None):
        if len(out) < frames:
            out.append((bytes(packet), bool(packet.is_keyframe)))
    if not out or not out[0][1]:
        raise RuntimeError("libvpx did not start the clip with a keyframe")
    return out


def packetize_vp8(frame: bytes, tid: int, sync: bool = False) -> tuple[bytes, ...]:
    """RTP payloads for one VP8 frame (RFC 7741): equal-sized chunks, each with a descriptor in front and
    trailer room behind. Picture id and TL0PICIDX are zero here: the sender writes them per packet.

    `sync` is the descriptor's Y bit (the frame refers to TL0 frames only); TL2 frames are marked N
    (non-reference)."""
    count = max(1, -(-len(frame) // MAX_CHUNK))
    size, larger = divmod(len(frame), count)  # sizes differ by one byte at most, as Chromium balances them
    tid_byte = ((tid & 0x03) << 6) | (0x20 if sync else 0)
    payloads = []
    at = 0
    for n in range(count):
        first = 0x10 if n == 0 else 0x00  # S: start of the partition, PID 0
        b0 = 0x80 | first | (0x20 if tid == 2 else 0)
        descriptor = bytes((b0, 0xE0, 0x80, 0x00, 0x00, tid_byte))
        end = at + size + (1 if n < larger else 0)
        payloads.append(descriptor + frame[at:end] + bytes(TRAILER_SIZE))
        at = end
    return tuple(payloads)


def encode_opus(loud: bool, packets: int = 50, *, seed: int = 7) -> list[bytes]:
    """`packets` Opus frames of 20 ms at 32 kbit/s: a 440 Hz tone with some noise, or near-silence."""
    import av

    codec = av.CodecContext.create("libopus", "w")
    codec.sample_rate = 48000
    codec.layout = "mono"
    codec.format = "s16"
    codec.bit_rate = 32000
    codec.time_base = fractions.Fraction(1, 48000)
    rnd = random.Random(seed)
    amplitude, noise = (8000, 600) if loud else (0, 30)
    out: list[bytes] = []
    for i in range(packets + 4):
        samples = array.array(
            "h",
            (
                int(amplitude * math.sin(2 * math.pi * 440 * (i * 960 + n) / 48000))
                + rnd.randint(-noise, noise)
                for n in range(960)
            ),
        )
        frame = av.AudioFrame(format="s16", layout="mono", samples=960)
        frame.planes[0].update(samples.tobytes())
        frame.sample_rate = 48000
        frame.pts = i * 960
        out.extend(bytes(p) for p in codec.encode(frame))
    out.extend(bytes(p) for p in codec.encode(None))
    if len(out) < packets:
        raise RuntimeError("libopus returned fewer frames than asked for")
    return [p + bytes(TRAILER_SIZE) for p in out[-packets:]]


@functools.lru_cache(maxsize=2)
def build_library(seconds: int = CLIP_SECONDS) -> MediaLibrary:
    """Encode everything once (about 2 s of CPU for a 2 s clip); cached per process."""
    frames = seconds * FPS
    frames -= frames % len(TEMPORAL_PATTERN)  # so that the temporal pattern runs on across the loop
    video = []
    for index, spec in enumerate(LAYERS):
        clip = []
        for i, (data, keyframe) in enumerate(
            encode_vp8(spec.width, spec.height, spec.bitrate, frames, seed=index)
        ):
            position = i % len(TEMPORAL_PATTERN)
            tid = 0 if keyframe else TEMPORAL_PATTERN[position]
            # In 0, 2, 1, 2 the frames at positions 1 and 2 refer to the TL0 frame before them only.
            clip.append(VideoFrame(keyframe, tid, packetize_vp8(data, tid, sync=position in (1, 2))))
        video.append(tuple(clip))
    return MediaLibrary(
        video=tuple(video),
        audio_loud=tuple(encode_opus(True)),
        audio_quiet=tuple(encode_opus(False)),
    )
