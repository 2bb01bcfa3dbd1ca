"""The geometry of the composite's speaker view, pure and without media: where each tile goes.

The active speaker fills the main area; everyone else is a thumbnail in a strip along the bottom, at most
`max_thumbs` of them. Every rectangle has even coordinates and sizes, so that it maps exactly onto the
half-resolution chroma planes of YUV 4:2:0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

__all__ = ["MAX_THUMBS", "Rect", "SpeakerLayout", "even", "speaker_layout"]

MAX_THUMBS = 6


def even(value: float) -> int:
    """`value` rounded down to an even integer (never below 0)."""
    return max(0, int(value) & ~1)


@dataclass(frozen=True, slots=True)
class Rect:
    x: int
    y: int
    w: int
    h: int

    def fit(self, width: int, height: int) -> Rect:
        """The largest rectangle of `width`:`height` aspect inside this one, centred (letterbox or
        pillarbox), with even coordinates and sizes (at least 2x2)."""
        if width <= 0 or height <= 0:
            return self
        if self.w * height <= self.h * width:  # wider than this rectangle: bars above and below
            w = self.w
            h = max(2, min(self.h, even(round(self.w * height / width))))
        else:
            h = self.h
            w = max(2, min(self.w, even(round(self.h * width / height))))
        return Rect(self.x + even((self.w - w) / 2), self.y + even((self.h - h) / 2), w, h)

    @property
    def half(self) -> Rect:
        """This rectangle on a chroma plane of 4:2:0."""
        return Rect(self.x // 2, self.y // 2, self.w // 2, self.h // 2)


@dataclass(frozen=True, slots=True)
class SpeakerLayout:
    width: int
    height: int
    main: Rect
    thumbs: tuple[Rect, ...]  # left to right


@functools.lru_cache(maxsize=64)
def speaker_layout(width: int, height: int, others: int, max_thumbs: int = MAX_THUMBS) -> SpeakerLayout:
    """The speaker view of a `width`x`height` canvas with `others` people besides the speaker.

    With nobody else the speaker takes the whole canvas. Otherwise a strip at the bottom holds up to
    `max_thumbs` 16:9 thumbnails, sized so that `max_thumbs` of them fit side by side (the strip's height
    does not change with the number of people), centred; the main area is what is left above it."""
    if width < 2 or height < 2 or width % 2 or height % 2:
        raise ValueError(f"canvas must be even and at least 2x2, not {width}x{height}")
    if max_thumbs < 1:
        raise ValueError("max_thumbs must be at least 1")
    count = min(max(0, others), max_thumbs)
    if count == 0:
        return SpeakerLayout(width, height, Rect(0, 0, width, height), ())
    gap = max(2, even(height / 90))
    thumb_w = even((width - (max_thumbs + 1) * gap) / max_thumbs)
    thumb_h = even(thumb_w * 9 / 16)
    if thumb_h > height // 4:  # a tall canvas keeps most of its height for the speaker
        thumb_h = even(height / 4)
        thumb_w = even(thumb_h * 16 / 9)
    strip = thumb_h + 2 * gap
    main = Rect(0, 0, width, height - strip)
    total = count * thumb_w + (count - 1) * gap
    x = even((width - total) / 2)
    y = height - strip + gap
    thumbs = tuple(Rect(x + i * (thumb_w + gap), y, thumb_w, thumb_h) for i in range(count))
    return SpeakerLayout(width, height, main, thumbs)
