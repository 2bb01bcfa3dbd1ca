"""Active speaker and audible set from RFC 6464 levels, in simulated time: 50 packets a second per
participant, a tick every 100 ms, as the SFU runs it.

Talkers are syllables with pauses, not a constant level. The fake microphone of our browser tests is
modelled twice: coarsely, as a tone of 0.2-0.5 s every second, and as Chromium really sends it. The
latter was measured with Chromium 156 (two RTCPeerConnections in one page, polling the receiver's
getSynchronizationSources(), whose audioLevel comes from the ssrc-audio-level extension): a 20 ms beep
every 0.5 s. With the default audio processing (our client's `audio: true`) the beep's packet (level
8) is followed by a tail rising from 12 to ~95 over 350 ms; without processing there are 1-2 packets
at level 6 and silence between.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from huddle.sfu.speaker import SpeakerDetector

PACKET = 0.02  # Opus 20 ms frames
PACKETS_PER_TICK = 5  # a tick every 100 ms
SILENCE = 127

Source = Callable[[float], "int | None"]  # level of the packet sent at t, or None when none is sent


def silent(t: float) -> int:
    return SILENCE


def no_packets(t: float) -> None:
    return None


def talker(level: int, seed: int, start: float = 0.0, end: float = math.inf) -> Source:
    """Speech: syllables of 120-300 ms around ``level`` (+-6 dB), pauses of 40-120 ms 30+ dB quieter."""
    rng = random.Random(seed)
    levels: list[int] = []

    def src(t: float) -> int:
        if not start <= t < end:
            return SILENCE
        k = round((t - start) / PACKET)
        while len(levels) <= k:
            levels.extend(max(0, min(127, level + rng.randint(-6, 6))) for _ in range(rng.randint(6, 15)))
            levels.extend(rng.randint(min(127, level + 30), 127) for _ in range(rng.randint(2, 6)))
        return levels[k]

    return src


def tone(level: int, length: float, period: float, start: float = 0.0) -> Source:
    """The coarse model of the fake microphone: ``length`` seconds at ``level`` every ``period``."""

    def src(t: float) -> int:
        return level if t >= start and (t - start) % period < length - 1e-9 else SILENCE

    return src


# Measured from Chromium's fake microphone, one packet every 20 ms from the beep on (period 0.5 s).
CHROMIUM_PROCESSED = [8, 12, 28, 34, 38, 41, 44, 48, 51, 54, 58, 63, 66, 71, 76, 83, 90, 97]
CHROMIUM_RAW = [6, 6]


def beep(pattern: list[int], period: float = 0.5, start: float = 0.0) -> Source:
    def src(t: float) -> int:
        if t < start:
            return SILENCE
        k = round((t - start) / PACKET) % round(period / PACKET)
        return pattern[k] if k < len(pattern) else SILENCE

    return src


def burst(level: int, at: float, length: float) -> Source:
    return lambda t: level if at <= t < at + length - 1e-9 else SILENCE


def alternate(a: Source, b: Source, every: float) -> tuple[Source, Source]:
    """Two sources that take turns: ``a`` speaks in even slots of ``every`` seconds, ``b`` in odd ones."""

    def turn(t: float) -> int:
        return int(t / every + 1e-9) % 2

    return (lambda t: a(t) if turn(t) == 0 else SILENCE), (lambda t: b(t) if turn(t) == 1 else SILENCE)


@dataclass
class Tick:
    now: float
    changed: bool
    active: str | None
    audible: frozenset[str]


def simulate(
    det: SpeakerDetector,
    sources: dict[str, Source],
    end: float,
    start: float = 0.0,
    on_tick: Callable[[Tick], None] | None = None,
) -> list[Tick]:
    ticks = []
    for k in range(round((end - start) / PACKET)):
        t = start + k * PACKET
        for pid, src in sources.items():
            level = src(t)
            if level is not None:
                det.update(pid, level, None, t)
        if k % PACKETS_PER_TICK == PACKETS_PER_TICK - 1:
            now = start + (k + 1) * PACKET
            ticks.append(Tick(now, det.tick(now), det.active_speaker, det.audible))
            if on_tick is not None:
                on_tick(ticks[-1])
    return ticks


def changes(ticks: list[Tick]) -> list[tuple[float, str | None]]:
    return [(tk.now, tk.active) for tk in ticks if tk.changed]


def assert_no_flapping(ticks: list[Tick], interval: float = 1.0) -> None:
    times = [t for t, _ in changes(ticks)]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g >= interval - 1e-9 for g in gaps), gaps


def crowd(n: int, muted: Source = silent, prefix: str = "m") -> dict[str, Source]:
    """Participants who send only silence (level 127), or with ``no_packets`` nothing at all."""
    return {f"{prefix}{i}": muted for i in range(n)}


# --- detection ------------------------------------------------------------------------------------------

SPEAKERS = {
    "talker": talker(30, seed=1, start=5.0),
    "quiet-talker": talker(45, seed=2, start=5.0),
    "tone-0.2s-every-1s": tone(25, 0.2, 1.0, start=5.0),
    "tone-0.5s-every-1s": tone(30, 0.5, 1.0, start=5.0),
    "chromium-beep-processed": beep(CHROMIUM_PROCESSED, start=5.0),
    "chromium-beep-raw": beep(CHROMIUM_RAW, start=5.0),
}


@pytest.mark.parametrize("kind", list(SPEAKERS))
def test_one_speaker_among_silent_ones_is_detected_within_2s_and_kept(kind):
    det = SpeakerDetector()
    sources = {**crowd(6), **crowd(3, no_packets, "q"), "s": SPEAKERS[kind]}
    lowest = math.inf

    def watch(tk: Tick) -> None:
        nonlocal lowest
        if tk.now >= 6.0:
            lowest = min(lowest, det.score("s"))

    ticks = simulate(det, sources, 15.0, on_tick=watch)
    assert lowest >= 10 * det.min_score  # far from silence, even at the end of a gap
    assert all(tk.active is None and not tk.audible for tk in ticks if tk.now <= 5.0)
    assert [who for _, who in changes(ticks)] == ["s"]
    found = changes(ticks)[0][0]
    assert 5.0 < found <= 7.0
    # Kept (and forwarded) between beeps and pauses; nobody else, muted or silent, is ever forwarded.
    assert all(tk.active == "s" and tk.audible == {"s"} for tk in ticks if tk.now >= found)
    assert all(det.score(pid) == 0.0 for pid in sources if pid != "s")
    print(f"{kind}: detected after {found - 5.0:.1f} s, lowest score after it {lowest:.1f} dB")


def test_speaker_changes_when_another_starts_and_the_first_stops():
    det = SpeakerDetector()
    sources = {**crowd(5), "a": talker(30, 1, 0.0, 6.0), "b": talker(34, 2, 6.0, 14.0)}
    ticks = simulate(det, sources, 14.0)
    (t_a, a), (t_b, b) = changes(ticks)
    assert (a, b) == ("a", "b")
    assert t_a <= 2.0
    assert 6.0 < t_b <= 8.0
    print(f"a found after {t_a:.1f} s; b took over {t_b - 6.0:.1f} s after a stopped")


def test_speaker_changes_to_a_quieter_one_once_the_loud_one_stops():
    det = SpeakerDetector()
    sources = {"a": talker(20, 1, 0.0, 6.0), "b": talker(48, 2, 6.0, 14.0)}
    assert [who for _, who in changes(simulate(det, sources, 14.0))] == ["a", "b"]
    assert det.changed_at <= 8.0


def test_the_loudest_is_detected_when_several_start_together():
    det = SpeakerDetector()
    sources = {"a": talker(40, 1), "b": talker(22, 2), "c": talker(44, 3)}
    ticks = simulate(det, sources, 5.0)
    assert [who for _, who in changes(ticks)] == ["b"]


# --- no flapping ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("every", [0.1, 0.2, 0.4, 0.7])
def test_no_flapping_when_two_speak_alternately_fast(every):
    det = SpeakerDetector()
    a, b = alternate(talker(30, 1), talker(30, 2), every)
    ticks = simulate(det, {**crowd(3), "a": a, "b": b}, 20.0)
    assert_no_flapping(ticks)
    assert len(changes(ticks)) <= 20 / 1.0
    print(f"alternating every {every} s: {len(changes(ticks))} change(s) in 20 s")


def test_no_flapping_when_two_speak_at_the_same_level():
    det = SpeakerDetector()
    ticks = simulate(det, {"a": talker(30, 1), "b": talker(30, 2), **crowd(3)}, 20.0)
    assert len(changes(ticks)) == 1  # the first detection, then the floor stays
    assert ticks[-1].audible == {"a", "b"}


def test_two_fake_microphones_do_not_flap():
    # Every page of a browser test has the same beeping microphone.
    det = SpeakerDetector()
    sources = {"a": beep(CHROMIUM_PROCESSED), "b": beep(CHROMIUM_PROCESSED, start=0.24), **crowd(2)}
    ticks = simulate(det, sources, 20.0)
    assert len(changes(ticks)) == 1
    assert ticks[-1].audible == {"a", "b"}


def test_a_wanted_switch_waits_for_min_switch_interval():
    det = SpeakerDetector(min_switch_interval=2.0)
    ticks = simulate(det, {"a": talker(30, 1, 0.0, 0.6), "b": talker(30, 2, 0.6, 6.0)}, 6.0)
    (t_a, a), (t_b, b) = changes(ticks)
    assert (a, b) == ("a", "b")
    assert t_a + 2.0 <= t_b <= t_a + 2.0 + 0.15  # b was ready earlier; it gets the floor as soon as allowed


def test_a_brief_cough_does_not_take_the_floor():
    for cough_level in (0, 10, 25):
        det = SpeakerDetector()
        sources = {**crowd(4), "a": talker(35, 1), "c": burst(cough_level, at=5.0, length=0.1)}
        ticks = simulate(det, sources, 10.0)
        assert [who for _, who in changes(ticks)] == ["a"]
        # The cough is forwarded while it is new (a newcomer's first syllable), then dropped.
        heard = [tk.now for tk in ticks if "c" in tk.audible]
        assert heard and heard[0] <= 5.2 and heard[-1] <= 5.0 + 1.5 + 0.15


def test_a_louder_interruption_takes_the_floor_and_gives_it_back():
    det = SpeakerDetector()
    sources = {"a": talker(35, 1), "b": talker(25, 2, start=5.0, end=8.0)}
    ticks = simulate(det, sources, 11.0)
    (_, a), (t_b, b), (t_a, a2) = changes(ticks)
    assert (a, b, a2) == ("a", "b", "a")  # a never stopped talking
    assert 5.0 < t_b <= 7.0 and 8.0 < t_a <= 10.0


def test_silence_keeps_the_last_speaker():
    det = SpeakerDetector()
    ticks = simulate(det, {"a": talker(30, 1, 0.0, 3.0), **crowd(4)}, 60.0)
    assert [who for _, who in changes(ticks)] == ["a"]
    assert ticks[-1].active == "a"
    assert ticks[-1].audible == frozenset()  # nothing to forward


def test_a_steady_hum_stops_counting_as_speech():
    det = SpeakerDetector()
    sources = {"hum": lambda t: 35, "b": talker(40, 2, start=20.0)}
    ticks = simulate(det, sources, 25.0)
    assert [who for _, who in changes(ticks)] == ["hum", "b"]
    # 45 dB above silence, less the 30 dB that make speech, at 1 dB/s: after ~15 s it is only noise.
    assert not any("hum" in tk.audible for tk in ticks if 18.0 <= tk.now)
    assert changes(ticks)[1][0] <= 22.0


# --- audible set ----------------------------------------------------------------------------------------


def test_audible_is_the_top_three_plus_a_new_speaker():
    det = SpeakerDetector()
    talkers = {"c1": talker(25, 1), "c2": talker(30, 2), "c3": talker(35, 3)}
    sources = {**talkers, **crowd(5), "q": no_packets, "n": talker(42, 4, start=6.0)}
    ticks = simulate(det, sources, 12.0)
    top3 = set(talkers)
    assert all(tk.audible == top3 for tk in ticks if 1.0 <= tk.now <= 6.0)
    just_started = [tk for tk in ticks if 6.1 < tk.now <= 7.3]
    assert just_started and all(tk.audible == top3 | {"n"} for tk in just_started)
    assert all(tk.audible == top3 for tk in ticks if tk.now >= 7.8)
    assert all(len(tk.audible) <= 4 and not tk.audible & {"q", *crowd(5)} for tk in ticks)


def test_a_loud_newcomer_ends_up_in_the_top_three():
    det = SpeakerDetector()
    sources = {"c1": talker(25, 1), "c2": talker(30, 2), "c3": talker(35, 3), "n": talker(20, 4, start=6.0)}
    ticks = simulate(det, sources, 12.0)
    assert any(tk.audible == {"c1", "c2", "c3", "n"} for tk in ticks)
    assert ticks[-1].audible == {"c1", "c2", "n"}
    assert ticks[-1].active == "n"


def test_audible_keeps_its_identity_while_unchanged():
    det = SpeakerDetector()
    ticks = simulate(det, {"a": talker(30, 1), "b": talker(35, 2, start=3.0), **crowd(3)}, 8.0)
    distinct_objects = len({id(tk.audible) for tk in ticks})
    distinct_sets = 1 + sum(1 for x, y in itertools.pairwise(ticks) if x.audible != y.audible)
    assert distinct_objects == distinct_sets
    for x, y in itertools.pairwise(ticks):
        assert (x.audible is y.audible) == (x.audible == y.audible)


def test_newcomers_beyond_the_cap_compete_for_the_top_ranks():
    det = SpeakerDetector(loudest=3, max_newcomers=2)
    laughers = {f"l{i}": talker(20 + 3 * i, 10 + i, start=2.0) for i in range(20)}
    ticks = simulate(det, {"a": talker(30, 1), **laughers}, 4.0)
    assert max(len(tk.audible) for tk in ticks) <= 3 + 2 + 1  # + the active speaker, if not ranked
    assert {"l0", "l1"} <= ticks[-1].audible


def test_level_spellings():
    # 0..127 as in the header, the raw byte with the V bit, and negative dBov as rtp.audio_level gives it.
    scores = []
    for spell in (lambda lv: lv, lambda lv: 0x80 | lv, lambda lv: -lv):
        det = SpeakerDetector()
        for k in range(50):
            det.update("a", spell(30 if k % 10 else 127), True, k * PACKET)
            if k % 5 == 4:
                det.tick((k + 1) * PACKET)
        scores.append(det.score("a"))
    assert scores[0] > 10 and scores == [scores[0]] * 3
    det = SpeakerDetector()
    for level in (-1000, 300, 1 << 70, 12.7, float("nan"), None):
        det.update("x", level, None, 0.0)  # type: ignore[arg-type]
    det.tick(0.1)


def test_a_tick_at_the_same_time_keeps_the_packets():
    det = SpeakerDetector()
    det.tick(0.0)
    for _ in range(5):
        det.update("a", 20, None, 0.05)
    assert det.tick(0.0) is False
    assert det.score("a") == 0.0
    det.tick(0.1)
    assert det.score("a") > 0.0


# --- remove ---------------------------------------------------------------------------------------------


def test_remove_the_speaker_hands_over_to_whoever_speaks():
    det = SpeakerDetector()
    simulate(det, {"a": talker(25, 1), "b": talker(35, 2), **crowd(3)}, 5.0)
    assert det.active_speaker == "a" and "a" in det.audible
    det.remove("a")
    assert det.active_speaker == "b" and "a" not in det.audible and "a" not in det
    assert det.tick(5.1) is True
    assert det.tick(5.2) is False


def test_remove_the_speaker_in_silence_falls_back_to_the_previous_speaker():
    det = SpeakerDetector()
    simulate(det, {"a": talker(30, 1, 0.0, 3.0), "b": talker(30, 2, 3.0, 6.0), **crowd(3)}, 10.0)
    assert det.active_speaker == "b"
    det.remove("b")
    assert det.active_speaker == "a"
    assert det.tick(10.1) is True
    det.remove("a")
    assert det.active_speaker is None
    assert det.tick(10.2) is True
    det.remove("nobody")
    det.remove("m0")
    assert len(det) == 2


def test_remove_before_any_tick():
    det = SpeakerDetector()
    det.update("a", 20, None, 0.0)
    det.remove("a")
    assert det.tick(0.1) is False
    assert det.active_speaker is None and det.audible == frozenset()


# --- cost -----------------------------------------------------------------------------------------------


def test_cost_with_100_participants():
    rng = random.Random(7)
    ids = [f"p_{i:08x}" for i in range(100)]
    det = SpeakerDetector()
    # Random levels, a third of them silence: most of the 100 count as speaking, the costly case.
    calls = [
        (ids[rng.randrange(100)], rng.choice((127, rng.randrange(128), rng.randrange(128))))
        for _ in range(100_000)
    ]
    update = det.update
    per_call = baseline = math.inf
    for _ in range(3):
        start = time.perf_counter()
        for pid, level in calls:
            update(pid, level, None, 1.0)
        per_call = min(per_call, (time.perf_counter() - start) / len(calls))
        start = time.perf_counter()
        for pid, level in calls:
            _noop(pid, level, None, 1.0)
        baseline = min(baseline, (time.perf_counter() - start) / len(calls))
    # 30 s of the call: each tick, 5 packets from each of the 100.
    tick_costs = []
    now = 1.0
    for k in range(300):
        for j in range(500):
            pid, level = calls[(k * 500 + j) % len(calls)]
            update(ids[j % 100], level, None, now)
        now += 0.1
        start = time.perf_counter()
        det.tick(now)
        tick_costs.append(time.perf_counter() - start)
    tick_costs.sort()
    print(
        f"\nupdate: {per_call * 1e9:.0f} ns/call, of which {baseline * 1e9:.0f} ns is calling a function that"
        f" does nothing; tick with 100 participants ({len(det.audible)} audible): median"
        f" {tick_costs[150] * 1e6:.0f} us, max {tick_costs[-1] * 1e6:.0f} us"
    )
    assert det.active_speaker in ids and det.audible <= set(ids)


def _noop(participant_id: str, level: int, voice: bool | None, now: float) -> None:
    pass


# --- properties -----------------------------------------------------------------------------------------

PIDS = [f"p{i}" for i in range(5)]
ops = st.one_of(
    st.tuples(
        st.just("update"),
        st.sampled_from(PIDS),
        st.one_of(st.integers(0, 127), st.integers(-400, 400)),
        st.sampled_from([None, True, False]),
        st.sampled_from([0.0, 0.0, 0.01, 0.02, 0.1]),
    ),
    st.tuples(st.just("tick"), st.sampled_from([0.0, 0.05, 0.1, 0.1, 0.3, 2.0])),
    st.tuples(st.just("remove"), st.sampled_from([*PIDS, "stranger"])),
    st.tuples(st.just("talk"), st.sampled_from(PIDS), st.integers(0, 60), st.integers(1, 30)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(ops, max_size=80), st.floats(0.0, 1e6))
def test_any_interleaving_keeps_the_invariants(script, start):
    det = SpeakerDetector()
    known: set[str] = set()
    now = start
    last_change = -math.inf
    speaker_removed = False
    for op in script:
        if op[0] == "update":
            _, pid, level, voice, dt = op
            now += dt
            det.update(pid, level, voice, now)
            known.add(pid)
        elif op[0] == "talk":  # a burst of packets at a speech level, ticking as the SFU would
            _, pid, level, packets = op
            for k in range(packets):
                now += PACKET
                det.update(pid, level, None, now)
                if k % PACKETS_PER_TICK == PACKETS_PER_TICK - 1:
                    changed = det.tick(now)
                    if changed and not speaker_removed:
                        assert now - last_change >= det.min_switch_interval - 1e-6
                    if changed:
                        last_change, speaker_removed = now, False
            known.add(pid)
        elif op[0] == "tick":
            now += op[1]
            changed = det.tick(now)
            assert isinstance(changed, bool)
            if changed and not speaker_removed:
                assert now - last_change >= det.min_switch_interval - 1e-6
            if changed:
                last_change, speaker_removed = now, False
        else:
            pid = op[1]
            speaker_removed |= det.active_speaker == pid
            det.remove(pid)
            known.discard(pid)
        assert det.active_speaker is None or det.active_speaker in known
        assert isinstance(det.audible, frozenset) and det.audible <= known
        assert all(pid in det for pid in known) and len(det) == len(known)
