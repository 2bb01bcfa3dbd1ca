"""A viewer's bandwidth budget after congestion, on a fake clock: the layers go down on loss, stay below the
rate that failed until the hold has passed, climb back one rung at a time, and a link that stays thin gets
probed less and less often instead of flapping between the layers that fit and the ones that do not."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from huddle.sfu.allocation import (
    CAREFUL_INTERVAL,
    HOLD_AFTER_CONGESTION,
    MAX_HOLD,
    STEP_UP_INTERVAL,
    Budget,
    Request,
    allocate,
    rungs,
)

# Bob's page in the thin-downlink e2e test: Ada on his stage (her top layer), Cy in a thumbnail twice the
# pixel density (Cy's middle layer). Bitrates as measured there.
STAGE = Request("stage", 1972, 1109, bitrates=(150_000, 450_000, 820_000))
THUMBNAIL = Request("thumbnail", 498, 280, bitrates=(150_000, 300_000, 0))
CALL = [STAGE, THUMBNAIL]
REPORT = 0.2  # seconds between receiver reports
FULL = {"stage": 2, "thumbnail": 1}


def cost(requests: Sequence[Request], chosen: dict[object, int | None]) -> float:
    return sum(r.bitrates[chosen[r.key]] for r in requests if chosen[r.key] is not None)  # type: ignore[index]


def drive(
    budget: Budget, requests: Sequence[Request], capacity: float, start: float, seconds: float
) -> list[tuple[float, float | None, dict[object, int | None], float]]:
    """Receiver reports every REPORT seconds from a link that carries `capacity` bit/s and loses the rest:
    (time, budget, allocation, loss) after each."""
    out = []
    chosen = allocate(requests, budget.value)
    now = start
    while now < start + seconds:
        sent = cost(requests, chosen)
        loss = max(0.0, 1 - capacity / sent) if sent > capacity else 0.0
        value = budget.update(now, sent, None, loss, rungs(requests))
        chosen = allocate(requests, value)
        out.append((now, value, chosen, loss))
        now = round(now + REPORT, 6)
    return out


def congested(budget: Budget, requests: Sequence[Request], capacity: float) -> float:
    """The first report showing loss at the full allocation; the time of the cut."""
    sent = cost(requests, allocate(requests, None))
    budget.update(0.0, sent, None, 1 - capacity / sent, rungs(requests))
    return 0.0


def test_the_ladder_has_one_rung_per_layer_step() -> None:
    ladder = rungs(CALL)
    # Everyone's lowest layer needs no rung; then stage h, stage f, thumbnail h (thumbnails give up first).
    assert [allocate(CALL, rung) for rung in ladder] == [
        {"stage": 1, "thumbnail": 0},
        {"stage": 2, "thumbnail": 0},
        FULL,
    ]
    # Just below a rung, the step below it.
    assert allocate(CALL, ladder[-1] - 1) == {"stage": 2, "thumbnail": 0}


def test_a_paused_layer_whose_measured_rate_decayed_is_not_free() -> None:
    # Cy's middle layer, paused while nobody wanted it, measured 2 kbit/s after 12 s (the failed run): it
    # costs at least its nominal rate, so the budget that just fits the stage's top layer does not bring it.
    stage = Request("stage", 1972, 1109, bitrates=(154_012, 0, 819_711))
    thumbnail = Request("thumbnail", 498, 280, bitrates=(155_209, 2_112, 0))
    assert allocate([stage, thumbnail], 1_199_042) == {"stage": 2, "thumbnail": 0}
    assert len(rungs([stage, thumbnail])) == 3  # three distinct steps, not two rungs at one rate


def test_after_congestion_the_probes_stay_below_the_rate_that_failed_until_the_hold_has_passed() -> None:
    budget = Budget()
    congested(budget, CALL, capacity=800_000)
    failed = rungs(CALL)[-1]  # the full allocation was in use when loss appeared
    cut = budget.value
    assert cut is not None and cut < failed
    # The link is clean again: nothing moves during the hold, then the rung below what failed (within 1.5
    # times what held), and what failed only once that has held for a whole interval.
    timeline = drive(budget, CALL, capacity=10_000_000, start=REPORT, seconds=30)
    changes = [(t, chosen) for (_, _, before, _), (t, _, chosen, _) in pairwise(timeline) if chosen != before]
    assert changes[0][0] >= HOLD_AFTER_CONGESTION
    assert [chosen for _, chosen in changes] == [allocate(CALL, rung) for rung in rungs(CALL) if rung > cut]
    assert all(b - a >= CAREFUL_INTERVAL for (a, _), (b, _) in pairwise(changes))
    assert all(value is not None and value < failed for t, value, _, _ in timeline if t < changes[-1][0])


def test_a_thin_link_is_probed_less_and_less_often_and_never_back_to_what_failed() -> None:
    # 500 kbit/s: only the lowest layers fit (300 kbit/s); the stage's middle layer (600) does not.
    budget = Budget()
    congested(budget, CALL, capacity=500_000)
    timeline = drive(budget, CALL, capacity=500_000, start=REPORT, seconds=120)
    lowest = {"stage": 0, "thumbnail": 0}
    # Every probe is the next rung alone (stage h): never the stage's top layer, never the thumbnail first.
    assert all(chosen in (lowest, {"stage": 1, "thumbnail": 0}) for _, _, chosen, _ in timeline)
    probes = [t for (_, _, before, _), (t, _, chosen, _) in pairwise(timeline) if before != chosen]
    probes = [t for t in probes if next(c for time, _, c, _ in timeline if time == t) != lowest]
    gaps = [round(b - a, 1) for a, b in pairwise([0.0, *probes])]
    # 8 s after the first loss, then each probe failed: 16, 32, 32 s after the one before (one report later).
    assert gaps[:4] == [
        HOLD_AFTER_CONGESTION,
        2 * HOLD_AFTER_CONGESTION + REPORT,
        MAX_HOLD + REPORT,
        MAX_HOLD + REPORT,
    ], gaps


def test_a_probe_that_succeeds_resets_the_hold() -> None:
    budget = Budget()
    congested(budget, CALL, capacity=500_000)
    drive(budget, CALL, capacity=500_000, start=REPORT, seconds=30)  # two probes failed: hold 32 s
    assert budget.hold == MAX_HOLD
    # The limit goes: the next probe holds, the layers climb back to all that is wanted ...
    timeline = drive(budget, CALL, capacity=10_000_000, start=30, seconds=60)
    back = next(t for t, _, chosen, _ in timeline if chosen == FULL)
    assert budget.hold == HOLD_AFTER_CONGESTION
    # ... within the hold that was running, plus one interval per rung.
    assert back - 30 <= MAX_HOLD + len(rungs(CALL)) * STEP_UP_INTERVAL
    # And the next congestion holds the layers down for the short hold again.
    timeline = drive(budget, CALL, capacity=500_000, start=100, seconds=12)
    first_loss = next(t for t, _, _, loss in timeline if loss > 0)
    raised = [
        t for t, _, chosen, _ in timeline if t > first_loss + 1 and chosen != {"stage": 0, "thumbnail": 0}
    ]
    assert raised and raised[0] - first_loss == HOLD_AFTER_CONGESTION


def test_the_tail_of_the_loss_already_acted_on_is_not_another_failure() -> None:
    budget = Budget()
    congested(budget, CALL, capacity=800_000)
    cut = budget.value
    # The reports of the next second still show the loss of the packets queued before the cut.
    for i in range(1, 5):
        budget.update(i * REPORT, 1_270_000, None, 0.4, rungs(CALL))
    assert budget.value == cut
    assert budget.hold == HOLD_AFTER_CONGESTION


def test_a_clean_link_climbs_back_to_the_full_allocation_in_a_bounded_number_of_steps() -> None:
    # A gallery: the speaker and eight thumbnails that each want their middle layer.
    gallery = [STAGE] + [Request(f"t{i}", 498, 280, bitrates=(150_000, 300_000, 0)) for i in range(8)]
    wanted = allocate(gallery, None)
    budget = Budget()
    congested(budget, gallery, capacity=1_000_000)
    timeline = drive(budget, gallery, capacity=100_000_000, start=REPORT, seconds=120)
    back = next(t for t, _, chosen, _ in timeline if chosen == wanted)
    steps = len({value for _, value, _, _ in timeline}) - 1
    # Ten rungs (two for the speaker, one per thumbnail), climbed in fewer probes: it skips rungs well
    # below 1.5 times what held.
    assert len(rungs(gallery)) == 10
    assert steps <= 6, steps
    assert back <= HOLD_AFTER_CONGESTION + steps * CAREFUL_INTERVAL


def test_a_smaller_layout_after_a_failure_keeps_the_budget_meaningful() -> None:
    budget = Budget()
    congested(budget, CALL, capacity=200_000)  # the third rung failed; the budget is below the first
    # Bob unpins Ada: a thumbnail is left, with one rung above its lowest layer, on a link too thin even for
    # that lowest layer; and then the link clears.
    small = [THUMBNAIL]
    timeline = drive(budget, small, capacity=100_000, start=REPORT, seconds=30)
    probes = [
        t
        for (_, _, before, _), (t, _, chosen, _) in pairwise(timeline)
        if chosen != before == {"thumbnail": 0}
    ]
    assert len(probes) <= 2 and timeline[-1][2] == {"thumbnail": 0}
    timeline = drive(budget, small, capacity=10_000_000, start=30, seconds=40)
    assert timeline[-1][2] == {"thumbnail": 1}


def test_a_probed_layer_ramping_up_adds_no_layer_that_was_not_probed() -> None:
    budget = Budget()
    congested(budget, CALL, capacity=500_000)
    timeline = drive(budget, CALL, capacity=10_000_000, start=REPORT, seconds=HOLD_AFTER_CONGESTION)
    assert timeline[-1][2] == {"stage": 1, "thumbnail": 0}  # the probe: the stage's middle layer
    # Ada's encoder resumes that layer and gives it part of her top layer's rate (as measured in the e2e
    # test: 820 -> 666 kbit/s): the top layer looks cheaper now, but it is no more tested than before.
    ramped = [Request("stage", 1972, 1109, bitrates=(150_000, 180_000, 600_000)), THUMBNAIL]
    value = budget.update(HOLD_AFTER_CONGESTION + 1, 330_000, None, 0.0, rungs(ramped))
    assert allocate(ramped, value) == {"stage": 1, "thumbnail": 0}
