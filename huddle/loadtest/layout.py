"""What a synthetic participant shows, as the `video_sizes` it sends (pure functions).

- `speaker`: the stage (the active speaker, or whoever was last on it) at 1280x720 and up to 24 others as
  320x180 thumbnails, in the order they joined; the rest are not shown.
- `gallery`: the first page of up to 25 tiles in a 1920x1080 window, all the same size.

`expected_layer` is the layer the SFU should forward for a size: the smallest that covers it
(docs/protocol.md, huddle.sfu.allocation), or the one a publisher without simulcast sends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from huddle.loadtest.media import SINGLE_LAYER
from huddle.sfu.allocation import Request, wanted_layer

__all__ = ["GALLERY_PAGE", "LAYOUTS", "MAX_THUMBNAILS", "STAGE", "THUMBNAIL", "expected_layer", "video_sizes"]

LAYOUTS = ("speaker", "gallery")
WINDOW = (1920, 1080)
STAGE = (1280, 720)
THUMBNAIL = (320, 180)
MAX_THUMBNAILS = 24
GALLERY_PAGE = 25


def video_sizes(layout: str, others: Sequence[str], stage: str | None) -> dict[str, tuple[int, int]]:
    """Sizes by participant id for the videos of `others` (in join order) that are shown."""
    if layout == "gallery":
        shown = list(others[:GALLERY_PAGE])
        if not shown:
            return {}
        columns = math.ceil(math.sqrt(len(shown)))
        rows = math.ceil(len(shown) / columns)
        width = min(WINDOW[0] // columns, WINDOW[1] // rows * 16 // 9)
        size = (width, width * 9 // 16)
        return dict.fromkeys(shown, size)
    if layout != "speaker":
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    if stage not in others:
        stage = others[0] if others else None
    sizes: dict[str, tuple[int, int]] = {}
    if stage is not None:
        sizes[stage] = STAGE
    for pid in others:
        if len(sizes) > MAX_THUMBNAILS:
            break
        sizes.setdefault(pid, THUMBNAIL)
    return sizes


def expected_layer(size: tuple[int, int] | None, *, simulcast: bool = True) -> int | None:
    """The library layer (huddle.loadtest.media.LAYERS, as trailers name it) a video shown at `size` should
    arrive at; None when it is not shown. Without simulcast its publisher sends one layer, whatever the size:
    the SFU's only layer (its layer 0) is the library's SINGLE_LAYER."""
    if size is None:
        return None
    if not simulcast:
        return SINGLE_LAYER
    return wanted_layer(Request(None, size[0], size[1]))
