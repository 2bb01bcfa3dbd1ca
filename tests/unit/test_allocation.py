"""Layer choice per viewer: size on screen, then bandwidth, thumbnails stepping down before the speaker."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from huddle.sfu.allocation import NOMINAL_BITRATES, Request, allocate, wanted_layer


def test_a_thumbnail_gets_the_small_layer_and_the_speaker_the_large_one() -> None:
    assert wanted_layer(Request("thumb", 240, 135)) == 0
    assert wanted_layer(Request("thumb", 320, 180)) == 0
    assert wanted_layer(Request("mid", 600, 338)) == 1
    assert wanted_layer(Request("speaker", 1000, 562)) == 2
    assert wanted_layer(Request("huge", 2560, 1440)) == 2  # the largest there is


def test_a_hidden_video_gets_nothing() -> None:
    assert wanted_layer(Request("hidden", 0, 0)) is None
    assert allocate([Request("hidden", 0, 0)], estimate=10_000_000) == {"hidden": None}


def test_with_two_layers_only_the_largest_available_is_chosen() -> None:
    assert wanted_layer(Request("speaker", 1280, 720, widths=(320, 640))) == 1


def test_enough_bandwidth_changes_nothing() -> None:
    requests = [Request("speaker", 1280, 720), Request("t1", 320, 180), Request("t2", 320, 180)]
    assert allocate(requests, estimate=5_000_000) == {"speaker": 2, "t1": 0, "t2": 0}


def test_thumbnails_step_down_before_the_speaker() -> None:
    # Wanted: f + h + h = 1.5 + 0.5 + 0.5 Mbps; 85 % of the estimate may be used.
    requests = [Request("speaker", 1280, 720), Request("t1", 640, 360), Request("t2", 640, 360)]
    assert allocate(requests, estimate=2_700_000) == {"speaker": 2, "t1": 0, "t2": 1}
    assert allocate(requests, estimate=2_500_000) == {"speaker": 2, "t1": 0, "t2": 0}
    # Only once both thumbnails are at the lowest layer does the speaker step down.
    assert allocate(requests, estimate=1_200_000) == {"speaker": 1, "t1": 0, "t2": 0}


def test_on_a_very_thin_link_everyone_keeps_the_lowest_layer() -> None:
    requests = [Request("speaker", 1280, 720), Request("t1", 320, 180)]
    assert allocate(requests, estimate=100_000) == {"speaker": 0, "t1": 0}


def test_measured_bitrates_are_used_when_known() -> None:
    cheap = (60_000, 200_000, 700_000)
    requests = [Request("speaker", 1280, 720, bitrates=cheap), Request("t1", 640, 360, bitrates=cheap)]
    assert allocate(requests, estimate=1_200_000) == {"speaker": 2, "t1": 1}


def test_recovery_brings_the_layers_back() -> None:
    requests = [Request("speaker", 1280, 720), Request("t1", 640, 360)]
    assert allocate(requests, estimate=900_000) == {"speaker": 1, "t1": 0}
    assert allocate(requests, estimate=4_000_000) == {"speaker": 2, "t1": 1}


@given(
    st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 3000)), max_size=30),
    st.one_of(st.none(), st.floats(0, 1e8)),
)
def test_allocation_never_exceeds_the_wanted_layer_and_fits_when_it_can(sizes, estimate) -> None:
    requests = [Request(i, w, h) for i, (w, h) in enumerate(sizes)]
    chosen = allocate(requests, estimate)
    for request in requests:
        wanted = wanted_layer(request)
        assert (chosen[request.key] is None) == (wanted is None)
        if wanted is not None:
            assert 0 <= chosen[request.key] <= wanted
    if estimate is not None:
        total = sum(NOMINAL_BITRATES[layer] for layer in chosen.values() if layer is not None)
        floor = sum(NOMINAL_BITRATES[0] for layer in chosen.values() if layer is not None)
        assert total <= max(estimate * 0.85, floor) + 1e-6
