"""Active speaker and audio forwarding selection from RFC 6464 audio levels (sans-I/O, clock injected).

The SFU feeds every audio packet's ssrc-audio-level value to :meth:`SpeakerDetector.update` and calls
:meth:`SpeakerDetector.tick` about ten times a second. ``tick`` then sets two attributes:

- ``active_speaker``: who speaks (the ``active_speaker`` message of docs/protocol.md); ``None`` until
  someone has spoken. It is held through silence and changes at most once per ``min_switch_interval``.
- ``audible``: the ids whose audio the SFU forwards: the ``loudest`` participants who are speaking,
  anyone who just began to speak, and the active speaker when they speak. A ``frozenset`` that stays the
  same object while its members do not change, so the caller can test ``is``.

How it decides
--------------
Levels are turned into *loudness*: dB above ``silence_level`` (level 127, and anything quieter than
-80 dBov, is 0). A packet only updates its participant's bucket (the loudest and the quietest packet
since the last tick); each tick folds the bucket into:

- a *noise floor*: drops at once to the quietest packet heard, rises by ``noise_rise`` dB a second
  otherwise. Speech has pauses between syllables, so a talker's floor stays low; a steady hum (a fan)
  is absorbed into the floor and then no longer counts as speech.
- a *score*: an envelope of the bucket's loudest packet above the floor, quick to rise (``attack``)
  and slow to fall (``release``), so that pauses between words barely dent it and the 1 s gaps of a
  beeping fake microphone are bridged. It is in dB: scores are compared by difference.
- *speech*: a bucket whose loudest packet is ``silence_level - speech_level`` dB or more above the
  floor. A participant *is speaking* for ``hold`` seconds after their last speech bucket; speech after
  more than ``hold`` without is an *onset*, and the participant is then a newcomer for
  ``newcomer_window``. *Activity* is the moving average (``activity_window``) of speech buckets: near
  1 for a talker, at most ~0.45 for a burst of 0.3 s.

A participant who is speaking with a score of at least ``min_score`` is a *candidate*. A candidate
other than the active speaker takes the floor after it has met the bar for ``takeover`` seconds
without a break (the highest score wins if several have), provided that the last change is at least
``min_switch_interval`` old. While the active speaker is speaking, the bar is a score ``margin`` dB
above theirs and an activity of ``min_activity``: clearly louder, and talking rather than coughing.
When the active speaker has gone quiet (or there is none), the bar is merely ``min_score``: anyone who
makes a sound takes the free floor (so a cough in a long silence does too). Two people who
alternate quickly, or talk at the same level, do not lead each other by ``margin`` for ``takeover``,
so the floor does not flap; a silent speaker keeps the floor rather than dropping to nobody.

The voice-activity flag (V) is accepted but not used: not every sender sets it, and Chromium's fake
microphone (a beep, not a voice) must still count as speaking in our browser tests.

Per packet: one dict lookup, one list index and two integer compares, no allocation. Per tick: three
passes over the participants. tests/unit/test_speaker.py prints both costs for a call of 100.
"""

from __future__ import annotations

import heapq
import math

__all__ = ["SpeakerDetector"]

_NO_PACKET = 1 << 30  # "quietest packet" of an empty bucket


class _Participant:
    __slots__ = (
        "activity",
        "floor",
        "last_speech",
        "lead",
        "low",
        "onset",
        "peak",
        "pid",
        "score",
    )

    def __init__(self, pid: str) -> None:
        self.pid = pid
        # The bucket since the last tick, fed by update(): the loudest and the quietest packet's loudness
        # (dB above silence). Plain compares and stores of small (cached) ints: update() allocates nothing.
        self.peak = 0
        self.low = _NO_PACKET
        # Smoothed state, updated by tick().
        self.floor = 0.0
        self.score = 0.0
        self.last_speech = -math.inf
        self.onset = -math.inf
        self.activity = 0.0  # moving average of "this bucket was speech" (0..1)
        self.lead = 0.0  # how long it has met the bar to take the floor, without a break


class SpeakerDetector:
    """Picks the active speaker and the audible set from per-packet audio levels. No I/O, no clock.

    Tunables (all times in seconds, levels in -dBov as carried by RFC 6464, 0 loudest, 127 silence):

    - ``loudest`` (3): how many of the loudest speaking participants are forwarded (docs/protocol.md).
    - ``min_switch_interval`` (1.0): the active speaker changes at most this often (docs/protocol.md).
    - ``attack`` (0.1) and ``release`` (0.8): time constants of the score's envelope. A talker's score
      is up within two or three ticks; a speaker who stops loses 6 dB in ~0.1 s, so whoever speaks
      next overtakes them quickly, yet a score falls only to ~30% across a 1 s gap between beeps.
    - ``activity_window`` (0.5) and ``min_activity`` (0.5): needed to challenge a speaker who speaks. A
      burst of up to 0.3 s (a cough, a knock, a laugh) reaches ~0.45; a talker passes 0.5 after 0.4 s.
    - ``takeover`` (0.5): how long a challenger must meet the bar without a break. Longer than a turn
      in fast alternation (0.2-0.4 s), so such exchanges keep one speaker; a real handover still takes
      under a second (about 0.8 s once the speaker stops).
    - ``margin`` (6.0): dB a challenger must lead the active speaker by while the speaker still speaks:
      clearly louder (twice the amplitude), far above the ripple between equal alternating talkers.
    - ``audible_margin`` (3.0): dB by which a participant outside the audible set must outscore one inside
      to take their place among the ``loudest``, so that the 3rd and 4th loudest do not swap every tick.
    - ``hold`` (1.5): a participant counts as speaking this long after their last speech-level packet.
      Bridges pauses between words and 1 s gaps between beeps of a fake microphone.
    - ``newcomer_window`` (1.5): after an onset, the participant is forwarded regardless of rank for
      this long, so that a new speaker's first syllables are heard before their score ranks them.
    - ``max_newcomers`` (3): at most this many newcomers (the loudest) on top of ``loudest``, so that a
      room of 100 bursting out laughing does not forward 100 streams.
    - ``speech_level`` (50): a packet this loud (-50 dBov) or louder, above the noise floor, is speech.
      Talk is typically -20..-45 dBov; a quiet room with noise suppression sits far below. The speech
      level does not make the score: a quiet talker is still ranked by how loud they are.
    - ``silence_level`` (80): packets at or below -80 dBov count as silence (loudness 0).
    - ``min_score`` (1.0): the smallest score that is not silence. A muted microphone (level 127, or no
      packets) scores exactly 0; between beeps, Chromium's fake microphone stays above ~35 (with or
      without audio processing) and a 0.2 s tone every 1 s above ~18.
    - ``noise_rise`` (1.0): dB per second by which the noise floor creeps up while no quieter packet
      comes; a steady hum 40 dB above silence stops counting as speech after ~10 s.
    - ``tick_interval`` (0.1): the nominal tick period: the first tick's bucket is taken to cover this
      long, and a late tick counts for at most twice this towards a takeover.
    """

    def __init__(
        self,
        *,
        loudest: int = 3,
        min_switch_interval: float = 1.0,
        attack: float = 0.1,
        release: float = 0.8,
        activity_window: float = 0.5,
        min_activity: float = 0.5,
        takeover: float = 0.5,
        margin: float = 6.0,
        audible_margin: float = 3.0,
        hold: float = 1.5,
        newcomer_window: float = 1.5,
        max_newcomers: int = 3,
        speech_level: int = 50,
        silence_level: int = 80,
        min_score: float = 1.0,
        noise_rise: float = 1.0,
        tick_interval: float = 0.1,
    ) -> None:
        if loudest < 0 or max_newcomers < 0:
            raise ValueError("loudest and max_newcomers must not be negative")
        if min(attack, release, activity_window, tick_interval) <= 0:
            raise ValueError("attack, release, activity_window and tick_interval must be positive")
        if not 0 <= speech_level < silence_level <= 127:
            raise ValueError("need 0 <= speech_level < silence_level <= 127")
        self.loudest = loudest
        self.min_switch_interval = min_switch_interval
        self.attack = attack
        self.release = release
        self.activity_window = activity_window
        self.min_activity = min_activity
        self.takeover = takeover
        self.margin = margin
        self.audible_margin = audible_margin
        self.hold = hold
        self.newcomer_window = newcomer_window
        self.max_newcomers = max_newcomers
        self.speech_level = speech_level
        self.silence_level = silence_level
        self.min_score = min_score
        self.noise_rise = noise_rise
        self.tick_interval = tick_interval
        self._speech_loudness = silence_level - speech_level

        # Loudness by level, laid out so that one list index serves the three spellings update() takes:
        # 0..127 first, then 128..255 (the byte with the V bit), then -128..-1 (Python's negative index
        # reads from the end). Anything else takes the slow path in _loudness().
        def loud(level: int) -> int:
            return max(0, silence_level - min(level, 127))

        self._loud = (
            [loud(x) for x in range(128)]
            + [loud(x) for x in range(128)]
            + [loud(x) for x in range(128, 0, -1)]
        )

        self._participants: dict[str, _Participant] = {}
        self._last_tick: float | None = None
        self._now = -math.inf  # time of the last tick that moved the clock
        self._reported: str | None = None
        self._recent: list[str] = []  # earlier speakers, most recent last (successors on remove())

        self.active_speaker: str | None = None
        self.changed_at = -math.inf  # tick time of the last change of active_speaker
        self.audible: frozenset[str] = frozenset()

    # --- per packet ---------------------------------------------------------------------------------------

    def update(self, participant_id: str, level: int, voice: bool | None, now: float) -> None:
        """One audio packet's RFC 6464 level: 0 (0 dBov, loudest) .. 127 (-127 dBov, silence).

        Also accepted as is: the raw extension byte (128..255 when the V bit is set) and the negative
        dBov that huddle.rtc.rtp.audio_level returns (-127..0). Anything else is clamped, or read as
        silence. ``voice`` (the V flag) is not used (see the module docstring) and ``now`` is not needed:
        a packet counts in the bucket of the next tick. An unknown id joins; call remove() when its
        producer closes, or a late packet brings the id back.
        """
        p = self._participants.get(participant_id)
        if p is None:
            p = self._participants[participant_id] = _Participant(participant_id)
        try:
            loud = self._loud[level]
        except (IndexError, TypeError):
            loud = self._loudness(level)
        if loud > p.peak:
            p.peak = loud
        if loud < p.low:
            p.low = loud

    def _loudness(self, level: object) -> int:
        """Slow path for levels outside the table: clamp, and read nonsense as silence."""
        try:
            lv = round(level)  # type: ignore[call-overload]
        except (TypeError, ValueError, OverflowError):
            return 0
        lv = -lv if lv < 0 else lv
        return max(0, self.silence_level - lv) if lv <= 127 else 0

    # --- membership ---------------------------------------------------------------------------------------

    def remove(self, participant_id: str) -> None:
        """Forget a participant. If they were the active speaker, the loudest participant who is speaking
        takes over at once, else the most recent earlier speaker still here, else nobody; the next tick
        reports the change."""
        if self._participants.pop(participant_id, None) is None:
            return
        if participant_id in self._recent:
            self._recent.remove(participant_id)
        if participant_id in self.audible:
            self.audible = self.audible - {participant_id}
        if self.active_speaker == participant_id:
            best = self._best_candidate(self._now)
            if best is not None:
                self.active_speaker = best.pid
            else:
                self.active_speaker = self._recent[-1] if self._recent else None
            if self.active_speaker in self._recent:
                self._recent.remove(self.active_speaker)
            self._restart_challenges()

    def __contains__(self, participant_id: object) -> bool:
        return participant_id in self._participants

    def __len__(self) -> int:
        return len(self._participants)

    def score(self, participant_id: str) -> float:
        """The smoothed loudness above the noise floor (dB), for metrics and tests; 0.0 if unknown."""
        p = self._participants.get(participant_id)
        return p.score if p is not None else 0.0

    # --- per tick -----------------------------------------------------------------------------------------

    def tick(self, now: float) -> bool:
        """Fold the packets since the last tick in, then decide. Returns True when ``active_speaker``
        changed since the previous tick (by this tick's decision or by a remove() in between): send
        ``active_speaker`` to everyone. ``audible`` is a new object exactly when its members changed.

        A tick whose ``now`` is not after the previous one's only reports changes made by remove();
        packets keep accumulating for the next.
        """
        last = self._last_tick
        dt = self.tick_interval if last is None else now - last
        if dt > 0:
            self._last_tick = now
            self._now = now
            self._fold(now, dt)
            self._decide(now, dt)
            self._select(now)
        if self.active_speaker == self._reported:
            return False
        self._reported = self.active_speaker
        self.changed_at = now
        return True

    def _fold(self, now: float, dt: float) -> None:
        rising = math.exp(-dt / self.attack)
        falling = math.exp(-dt / self.release)
        active = math.exp(-dt / self.activity_window)
        rise = self.noise_rise * dt
        speech = self._speech_loudness
        hold = self.hold
        for p in self._participants.values():
            low = p.low
            if low != _NO_PACKET:
                floor = p.floor + rise
                if low < floor:
                    floor = float(low)
                p.floor = floor
                x = p.peak - floor
                p.peak = 0
                p.low = _NO_PACKET
                if x >= speech:
                    if now - p.last_speech > hold:
                        p.onset = now
                    p.last_speech = now
                    p.activity = 1.0 + (p.activity - 1.0) * active
                else:
                    p.activity *= active
            else:
                x = 0.0  # no packets: muted, or the producer is gone; the floor stays where it was
                p.activity *= active
            score = p.score
            p.score = x + (score - x) * (rising if x > score else falling)

    def _best_candidate(self, now: float) -> _Participant | None:
        """The participant with the highest score among those speaking with at least ``min_score``."""
        best = None
        best_score = self.min_score
        hold = self.hold
        for p in self._participants.values():
            if p.score >= best_score and now - p.last_speech <= hold:
                best = p
                best_score = p.score
        return best

    def _decide(self, now: float, dt: float) -> None:
        current = self.active_speaker
        cur = self._participants.get(current) if current is not None else None
        hold = self.hold
        if cur is not None and now - cur.last_speech <= hold:
            # Against someone speaking: clearly louder, and talking rather than a cough or a knock.
            threshold = max(cur.score + self.margin, self.min_score)
            min_activity = self.min_activity
        else:
            # Nobody, or a speaker gone quiet: anyone who makes a sound may take the free floor.
            threshold = self.min_score
            min_activity = 0.0
        # Each challenger has its own clock, so that two who take turns at the top (two beeping fake
        # microphones out of phase) do not restart each other's. A late tick (a stalled loop) counts
        # for at most two.
        takeover = self.takeover
        step = min(dt, 2 * self.tick_interval)
        ready = None
        for p in self._participants.values():
            if (
                p.score >= threshold
                and p.activity >= min_activity
                and now - p.last_speech <= hold
                and p is not cur
            ):
                p.lead += step
                if p.lead >= takeover - 1e-9 and (ready is None or p.score > ready.score):
                    ready = p
            else:
                p.lead = 0.0
        if ready is None or now - self.changed_at < self.min_switch_interval:
            return
        if current is not None:
            self._recent.append(current)
            if len(self._recent) > 8:
                del self._recent[0]
        if ready.pid in self._recent:
            self._recent.remove(ready.pid)
        self.active_speaker = ready.pid
        self._restart_challenges()

    def _restart_challenges(self) -> None:
        """A new active speaker sets a new bar: every challenger has to lead it for ``takeover`` afresh."""
        for p in self._participants.values():
            p.lead = 0.0

    def _select(self, now: float) -> None:
        hold = self.hold
        window = self.newcomer_window
        min_score = self.min_score
        speaking = []
        newcomers = []
        for p in self._participants.values():
            if now - p.last_speech <= hold:
                if now - p.onset <= window:
                    newcomers.append(p)
                elif p.score >= min_score:
                    speaking.append(p)
        score = _score_of
        if len(newcomers) > self.max_newcomers:
            # The loudest newcomers get the extra places; the others still compete for the top ranks.
            newcomers.sort(key=score, reverse=True)
            speaking.extend(p for p in newcomers[self.max_newcomers :] if p.score >= min_score)
            del newcomers[self.max_newcomers :]
        if len(speaking) > self.loudest:
            members, bonus = self.audible, self.audible_margin
            speaking = heapq.nlargest(
                self.loudest, speaking, key=lambda p: p.score + bonus if p.pid in members else p.score
            )
        chosen = {p.pid for p in speaking}
        chosen.update(p.pid for p in newcomers)
        active = self.active_speaker
        if active is not None and active not in chosen:
            a = self._participants.get(active)
            if a is not None and now - a.last_speech <= hold and a.score >= min_score:
                chosen.add(active)
        if chosen != self.audible:
            self.audible = frozenset(chosen)


def _score_of(p: _Participant) -> float:
    return p.score


class SpeakerFollower:
    """Another node's decision (the hub of a call spread over several nodes), for a node of that call: every
    node must show the same speaker and forward the same loudest voices, so only the hub, which hears every
    microphone's levels, decides. Same face as SpeakerDetector for the Router."""

    def __init__(self) -> None:
        self.active_speaker: str | None = None
        self.audible: frozenset[str] = frozenset()
        self.changed_at = 0.0
        self._rank: dict[str, int] = {}
        self._reported: str | None = None

    def set(self, active: str | None, ranked: list[str], audible: list[str]) -> None:
        """The hub's speaker, its loudest first (as many as it ranks), and who just began to speak."""
        self.active_speaker = active
        self._rank = {pid: len(ranked) - i for i, pid in enumerate(ranked)}
        audible_now = frozenset(audible)
        if audible_now != self.audible:
            self.audible = audible_now

    def update(self, participant_id: str, level: int, voice: bool | None, now: float) -> None:
        return None  # levels are the hub's to weigh

    def remove(self, participant_id: str) -> None:
        self._rank.pop(participant_id, None)

    def score(self, participant_id: str) -> float:
        """The hub's order as a score: the loudest ranks highest, the unranked score 0."""
        return float(self._rank.get(participant_id, 0))

    def tick(self, now: float) -> bool:
        if self.active_speaker == self._reported:
            return False
        self._reported = self.active_speaker
        self.changed_at = now
        return True
