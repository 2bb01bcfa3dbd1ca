"""Which simulcast layer each video a viewer shows should get: the smallest that covers its size on screen,
stepped down when the viewer's bandwidth cannot carry them all (thumbnails first, the large tile last), and
how much bandwidth that is (`Budget`), from the viewer's loss reports.

No I/O and no clock of its own: the Router calls `allocate` whenever a viewer's sizes, its bandwidth estimate
or a publisher's layer bitrates change, passes the time to `Budget.update`, and applies the result.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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

# Bandwidth: a viewer reporting this much loss is congested. Its layers then stay down for a hold, which
# doubles (up to MAX_HOLD) each time a probe brings loss back and is back to HOLD_AFTER_CONGESTION once one
# passes what failed; after the hold they step up at most once per STEP_UP_INTERVAL. Loss reported within
# SETTLE of a cut is the tail of the loss already acted on (queued packets, the layer switch's keyframe).
# While a failure is remembered, a step must hold for CAREFUL_INTERVAL before the next: a layer that dynacast
# resumes for a probe takes its publisher's encoder about 3 s (3.0-3.7 s measured) to ramp up to its rate,
# and only then does the loss show.
CONGESTION_LOSS = 0.1
HOLD_AFTER_CONGESTION = 8.0
MAX_HOLD = 32.0
STEP_UP_INTERVAL = 4.0
CAREFUL_INTERVAL = 6.0
SETTLE = 2.0
# A probe may skip rungs up to this factor of the budget (a gallery of thumbnails climbs in a few steps, not
# one per thumbnail), but always takes the next one and never passes one that failed.
PROBE_FACTOR = 1.5


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
    for key, layer, total in _descent(requests, chosen):
        if total <= budget:
            break
        chosen[key] = layer
    return chosen


def rungs(requests: Sequence[Request]) -> list[float]:
    """The estimates, lowest first, at which `allocate` gives one layer more than below them: each is what
    the allocation it unlocks costs, over HEADROOM. Everyone's lowest layer needs none (it is never taken)."""
    chosen = {r.key: wanted_layer(r) for r in requests}
    totals = [total for _, _, total in _descent(requests, chosen)]
    return [total / HEADROOM for total in reversed(totals)]


def _descent(
    requests: Sequence[Request], chosen: dict[object, int | None]
) -> Iterator[tuple[object, int, float]]:
    """The steps `allocate` takes down from `chosen` (left unchanged), in order: (key, its layer one lower,
    the total before that step)."""
    shown = [r for r in requests if chosen[r.key] is not None]
    costs = {r.key: _costs(r) for r in shown}
    total = sum(costs[r.key][chosen[r.key]] for r in shown)  # type: ignore[index]
    # Smallest area first; ties by key order of arrival, so the choice is stable from one call to the next.
    for request in sorted(shown, key=lambda r: r.width * r.height):
        layer = chosen[request.key]
        assert layer is not None
        cost = costs[request.key]
        while layer:
            yield request.key, layer - 1, total
            total -= cost[layer] - cost[layer - 1]
            layer -= 1


def _costs(request: Request) -> list[float]:
    """What each layer of `request` costs (bit/s), measured where that is believable. A layer no viewer
    wants is paused by its publisher and its measured rate decays toward zero: one measured at or below the
    layer beneath it is taken at its nominal rate (at least the layer beneath's), or a probe would see a
    paused layer as free and step two layers up at once."""
    costs: list[float] = []
    for layer in range(len(request.widths)):
        measured = float(request.bitrates[layer]) if layer < len(request.bitrates) else 0.0
        floor = costs[-1] if costs else 0.0
        if measured <= floor:
            measured = max(float(NOMINAL_BITRATES[min(layer, len(NOMINAL_BITRATES) - 1)]), floor)
        costs.append(measured)
    return costs


class Budget:
    """The bit rate one viewer's layers may use: None (all they want) until its downlink first shows
    congestion, then probed back up the allocation's `rungs`, about one at a time.

    Loss over CONGESTION_LOSS cuts the budget to what got through (or the viewer's REMB estimate, if lower)
    and remembers the rung that was in use as failed: no probe reaches it again before the hold has passed
    and the rungs below it have held for a CAREFUL_INTERVAL each. A probe that brings loss back doubles the
    hold. The budget is kept as a number of rungs, not a rate: a layer's measured rate moves with what its
    publisher sends (a paused layer falls back to its nominal rate, a resumed one ramps up and takes from the
    others), so a fixed rate would let such moves add or take layers that no probe tested.
    (REMB alone cannot drive the climb: a browser's receive-side estimate stays near what it receives and
    reads low for seconds after every change.)
    """

    def __init__(self) -> None:
        self.value: float | None = None  # as of the last update
        self.level: int | None = None  # rungs allowed; None: all
        self.failed: int | None = None  # the lowest rung (1 = the first) that brought loss, until passed
        self.hold = HOLD_AFTER_CONGESTION
        self.cut_at = float("-inf")
        self.next_probe = 0.0
        self.probing = False  # the last step up has not held for a whole interval yet

    def update(
        self, now: float, sent: float, estimate: float | None, loss: float, ladder: Sequence[float]
    ) -> float | None:
        """The budget at `now`, given what we send the viewer (bit/s), its estimate, the loss in its latest
        receiver report and the allocation's `rungs`."""
        if loss > CONGESTION_LOSS and sent > 0:
            if now - self.cut_at >= SETTLE:
                self._cut(now, sent * (1 - loss), estimate, ladder)
        elif self.level is not None and now >= self.next_probe:
            self._probe(now, ladder)
        self.value = None if self.level is None else _rate(ladder, self.level)
        return self.value

    def _cut(self, now: float, through: float, estimate: float | None, ladder: Sequence[float]) -> None:
        if self.probing:
            self.hold = min(self.hold * 2, MAX_HOLD)
        in_use = len(ladder) if self.level is None else min(self.level, len(ladder))
        if in_use:
            self.failed = in_use if self.failed is None else min(self.failed, in_use)
        level = _level(ladder, min(through, estimate) if estimate else through)
        self.level = level if self.failed is None else min(level, self.failed - 1)
        self.cut_at = now
        self.next_probe = now + self.hold
        self.probing = False

    def _probe(self, now: float, ladder: Sequence[float]) -> None:
        assert self.level is not None
        level = min(self.level, len(ladder))
        if self.probing and (self.failed is None or level >= self.failed):
            # The link carried the rung that failed, or more: the failure is history.
            self.failed = None
            self.hold = HOLD_AFTER_CONGESTION
        self.probing = False
        if level >= len(ladder):
            if self.failed is None:
                self.level = None  # all that is wanted holds: no limit until loss comes back
            return
        target = max(level + 1, _level(ladder, _rate(ladder, level) * PROBE_FACTOR))
        if self.failed is not None:
            # Up to the rung below what failed; that one alone, once everything below it has held.
            target = self.failed if level + 1 >= self.failed else min(target, self.failed - 1)
        self.level = target
        self.next_probe = now + (STEP_UP_INTERVAL if self.failed is None else CAREFUL_INTERVAL)
        self.probing = True


def _level(ladder: Sequence[float], value: float) -> int:
    """How many rungs `value` allows."""
    return sum(1 for rung in ladder if rung <= value)


def _rate(ladder: Sequence[float], level: int) -> float:
    """A budget that allows `level` rungs (or all there are now), midway to the next; above the top one, by
    PROBE_FACTOR."""
    level = min(level, len(ladder))  # a layout with fewer rungs than when one failed
    low = ladder[level - 1] if level else 0.0
    return (low + ladder[level]) / 2 if level < len(ladder) else low * PROBE_FACTOR
