"""Which simulcast layer each video a viewer shows should get: the smallest that covers its size on screen,
stepped down when the viewer's bandwidth cannot carry them all (thumbnails first, the large tile last).

Pure functions: the Router calls `allocate` whenever a viewer's sizes, its bandwidth estimate or a publisher's
layer bitrates change, and applies the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Nominal widths of the layers of a 1280x720 camera (rid q, h, f), used until a keyframe tells the real ones.
NOMINAL_WIDTHS = (320, 640, 1280)
# What a layer costs before we have measured it (bits per second): the client's maxBitrate per encoding.
NOMINAL_BITRATES = (150_000, 500_000, 1_500_000)
# A layer "covers" a tile this much smaller than itself: a 1000-px speaker tile still gets the 1280 layer,
# a 300-px thumbnail the 320 one.
COVER = 0.8
# The share of the estimate the allocation may use, so that audio and RTCP fit and the estimate's noise
# does not make layers flap.
HEADROOM = 0.85


@dataclass(slots=True)
class Request:
    """One video a viewer shows: how wide it is on screen (0: not shown) and what its layers are like."""

    key: object  # whatever the caller uses to tell videos apart (a Consumer)
    width: int
    height: int
    widths: Sequence[int] = NOMINAL_WIDTHS  # per available layer, low to high
    bitrates: Sequence[int] = NOMINAL_BITRATES


def wanted_layer(request: Request) -> int | None:
    """The smallest layer that covers the shown size; None when the video is not shown."""
    if request.width <= 0 or request.height <= 0 or not request.widths:
        return None
    for layer, width in enumerate(request.widths):
        if width >= request.width * COVER:
            return layer
    return len(request.widths) - 1


def allocate(requests: Sequence[Request], estimate: float | None) -> dict[object, int | None]:
    """Layer per request key. With an estimate (bits per second), step layers down until they fit: the
    smallest tiles first, each down to the lowest layer before the next larger one moves, so the large tile
    (the speaker) keeps its quality longest. The lowest layer is never taken away: the call goes on."""
    chosen = {r.key: wanted_layer(r) for r in requests}
    if estimate is None:
        return chosen
    budget = estimate * HEADROOM
    shown = [r for r in requests if chosen[r.key] is not None]

    def cost() -> float:
        return sum(_bitrate(r, chosen[r.key]) for r in shown)

    # Smallest area first; ties by key order of arrival, so the choice is stable from one call to the next.
    order = sorted(shown, key=lambda r: r.width * r.height)
    total = cost()
    for request in order:
        while total > budget and chosen[request.key]:
            layer = chosen[request.key]
            assert layer is not None
            total -= _bitrate(request, layer) - _bitrate(request, layer - 1)
            chosen[request.key] = layer - 1
        if total <= budget:
            break
    return chosen


def _bitrate(request: Request, layer: int | None) -> float:
    if layer is None:
        return 0.0
    if layer < len(request.bitrates) and request.bitrates[layer] > 0:
        return float(request.bitrates[layer])
    return float(NOMINAL_BITRATES[min(layer, len(NOMINAL_BITRATES) - 1)])
