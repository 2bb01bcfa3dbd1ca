"""The recorder: an internal subscriber of a call's SFU Router that turns what it receives into records.

It joins the Router as a Peer with a `Sink` instead of transports, so it gets every track through the same
Consumers as a browser (rewritten RTP, translated sender reports; the best layer of each video, everyone's
audio) and costs publishers nothing extra. Per track it rebuilds whole frames (VP8 depacketized, Opus as is),
maps their RTP timestamps to the recording clock through the publisher's sender reports, and hands each
record, encoded, to its outputs (the composite worker, the log the per-track writer reads).

All of this runs on the event loop per packet, so it only copies, parses headers and queues; decoding and
muxing happen elsewhere.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from huddle.calls.room import Participant
from huddle.permissions import Permissions
from huddle.recording import records
from huddle.recording.depacketize import OpusDepacketizer, ParticipantClock, Vp8Assembler
from huddle.rtc import rtcp

if TYPE_CHECKING:
    from huddle.sfu.consumer import Consumer
    from huddle.sfu.producer import Producer
    from huddle.sfu.router import Router

log = logging.getLogger("huddle.recording")

# Frames wait for their publisher's first sender report (browsers send one within a second or two), since
# only that puts their audio and video on one clock; after this long they take their arrival times.
SR_WAIT = 3.0
# After the stop, frames captured before it still arrive for this long (network, jitter, a big keyframe):
# the recording keeps them, so that every track ends at the stop, however late its last frames come in.
STOP_GRACE = 0.5


class _NullOutbox:
    """The recorder's Peer never gets signaling messages: it negotiates nothing."""

    def send(self, message: dict) -> None:
        pass

    def close(self, code: int, reason: str) -> None:
        pass


@dataclass(slots=True)
class _Pending:
    clock: str
    timestamp: int
    arrival: float
    keyframe: bool
    data: bytes


@dataclass(slots=True)
class _Tap:
    """One Consumer's packets, arriving at the recorder: a LocalTransport for the Router."""

    recorder: Recorder
    consumer: Consumer
    track_id: str
    participant_id: str
    # Looked up when the track is tapped: its first frames may go out only once its publisher has left.
    name: str
    local: bool  # the track of a participant of this node, not one piped in from another node
    kind: str
    source: str  # microphone, camera, screen or screen_audio
    clock_rate: int
    depacketizer: Vp8Assembler | OpusDepacketizer
    started: bool = False
    pending: list[_Pending] = field(default_factory=list)

    @property
    def clock(self) -> str:
        """Which sender reports map this track's timestamps: a simulcast layer switch rebases the
        forwarded timestamps by an estimate, and only the new layer's own reports, translated by the
        Consumer, map them exactly."""
        return f"{self.track_id}@{self.consumer.current}"

    def send_rtp(self, packet: bytes | bytearray) -> bool:
        frame = self.depacketizer.push(packet)
        while frame is not None:
            self.recorder._frame(self, frame.timestamp, frame.keyframe, frame.data)
            frame = self.depacketizer.pop()
        if self.kind == "video" and self.depacketizer.needs_keyframe:  # type: ignore[union-attr]
            current = self.consumer.current
            if current is not None:
                self.consumer.producer.request_keyframe(current)  # throttled by the Producer
        return True

    def send_rtcp(self, packet: bytes) -> bool:
        try:
            reports = rtcp.parse_compound(packet)
        except rtcp.RtcpError:
            return False
        for report in reports:
            if isinstance(report, rtcp.SenderReport):
                self.recorder._sender_report(self, report.ntp_timestamp, report.rtp_timestamp)
        return True


class Recorder:
    """Records one call from its Router until `stop()`. `emit` receives every record, encoded; `emit_local`
    the records of this node's own participants' tracks only (and those of no track: start, speaker, stop).

    `emit_local` is for Kafka: every node of a call spread over several publishes its own participants'
    tracks there (the others' reach it through pipes, and are published by their own nodes), while a
    composite made here needs everyone's. Only the node that started the recording says it stopped
    (`announce_stop`): one stop record ends the recording for the consumer.
    """

    def __init__(
        self,
        recording_id: str,
        router: Router,
        emit: Callable[[bytes], None] | None,
        *,
        started_at: float,
        outputs: tuple[str, ...],
        names: Callable[[str], str],
        emit_local: Callable[[bytes], None] | None = None,
        announce_stop: bool = True,
    ) -> None:
        self.recording_id = recording_id
        self.router = router
        self._emit = emit
        self._emit_local = emit_local
        self.announce_stop = announce_stop
        self.started_at = started_at
        self._names = names
        self._taps: dict[int, _Tap] = {}  # by id(consumer)
        self._clocks: dict[str, ParticipantClock] = {}
        self._counter = 0
        self.stop_at: float | None = None  # set by stop(): the end of the recording, on its clock
        self.stopped = False  # set by finish(): nothing more goes out
        self.participant = Participant(
            identity="recorder",
            name="Recording",
            outbox=_NullOutbox(),
            permissions=Permissions(publish=False, subscribe=True, record=False),
            id="rec_" + recording_id,
        )
        self._publish(records.RecordingStarted(recording_id, router.room.name, started_at, outputs))
        router.add_peer(self.participant, sink=self)
        self.active_speaker(router.speaker.active_speaker)

    def now(self) -> float:
        """The recording clock: seconds since the recording started."""
        return time.time() - self.started_at

    # -- Sink (called by the Router) ------------------------------------------------------------------------

    def takes(self, producer: Producer) -> bool:
        return self._emit is not None or producer.peer.pipe is None

    def transport_for(self, consumer: Consumer) -> _Tap:
        producer = consumer.producer
        self._counter += 1
        depacketizer: Vp8Assembler | OpusDepacketizer
        depacketizer = Vp8Assembler() if producer.kind == "video" else OpusDepacketizer()
        tap = _Tap(
            self,
            consumer,
            track_id=f"{producer.id}#{self._counter}",
            participant_id=producer.peer.participant.id,
            name=self._names(producer.peer.participant.id),
            local=producer.peer.pipe is None,
            kind=producer.kind,
            source=producer.track_source,
            clock_rate=producer.clock_rate,
            depacketizer=depacketizer,
        )
        self._taps[id(consumer)] = tap
        return tap

    def consumer_removed(self, consumer: Consumer) -> None:
        tap = self._taps.pop(id(consumer), None)
        if tap is not None:
            self._end(tap)

    def active_speaker(self, participant_id: str | None) -> None:
        if self.stop_at is None:
            self._publish(records.SpeakerChanged(self.recording_id, participant_id, self.now()))

    # -- Frames ---------------------------------------------------------------------------------------------

    def _clock(self, participant_id: str) -> ParticipantClock:
        clock = self._clocks.get(participant_id)
        if clock is None:
            clock = self._clocks[participant_id] = ParticipantClock()
        return clock

    def _sender_report(self, tap: _Tap, ntp: int, rtp_ts: int) -> None:
        self._clock(tap.participant_id).on_sender_report(tap.clock, ntp, rtp_ts, tap.clock_rate, time.time())
        if tap.pending:
            self._release(tap)

    def _frame(self, tap: _Tap, timestamp: int, keyframe: bool, data: bytes) -> None:
        if self.stopped:
            return
        arrival = time.time()
        clock = tap.clock
        if tap.pending:
            # Frames wait for their sender report (at the start, or after a layer switch); in order.
            tap.pending.append(_Pending(clock, timestamp, arrival, keyframe, data))
            self._release(tap, force=arrival - tap.pending[0].arrival > SR_WAIT)
            return
        at = self._clock(tap.participant_id).time_of(clock, timestamp)
        if at is None:
            tap.pending.append(_Pending(clock, timestamp, arrival, keyframe, data))
            return
        self._publish_frame(tap, timestamp, at - self.started_at, keyframe, data)

    def _release(self, tap: _Tap, force: bool = False) -> None:
        """Held frames go out, oldest first, as far as their sender reports map them; with `force`, all of
        them, on their arrival times where no report came."""
        clock = self._clock(tap.participant_id)
        done = 0
        for p in tap.pending:
            at = clock.time_of(p.clock, p.timestamp)
            if at is None:
                if not force:
                    break
                at = p.arrival
            self._publish_frame(tap, p.timestamp, at - self.started_at, p.keyframe, p.data)
            done += 1
        del tap.pending[:done]

    def _publish_frame(self, tap: _Tap, timestamp: int, at: float, keyframe: bool, data: bytes) -> None:
        if self.stop_at is not None and at > self.stop_at:
            return  # captured after the stop
        if not tap.started:
            tap.started = True
            codec = "vp8" if tap.kind == "video" else "opus"
            self._publish(
                records.TrackStarted(
                    self.recording_id,
                    tap.track_id,
                    tap.participant_id,
                    tap.name,
                    tap.kind,  # type: ignore[arg-type]
                    codec,
                    tap.clock_rate,
                    at,
                    tap.source,
                ),
                tap.local,
            )
        frame = records.Frame(self.recording_id, tap.track_id, timestamp, at, keyframe, data)
        self._publish(frame, tap.local)

    def _end(self, tap: _Tap) -> None:
        if self.stopped:
            return
        for frame in tap.depacketizer.flush():
            self._frame(tap, frame.timestamp, frame.keyframe, frame.data)
        if tap.pending:
            self._release(tap, force=True)
        if tap.started:
            at = self.now() if self.stop_at is None else min(self.now(), self.stop_at)
            self._publish(records.TrackEnded(self.recording_id, tap.track_id, at), tap.local)

    def _publish(self, record: records.Record, local: bool = True) -> None:
        data = records.encode(record)
        if self._emit is not None:
            self._emit(data)
        if local and self._emit_local is not None:
            self._emit_local(data)

    # -- End ------------------------------------------------------------------------------------------------

    def stop(self) -> float:
        """End the recording now; frames captured before this moment are still taken until `finish()`
        (STOP_GRACE later). Returns the recording's duration."""
        if self.stop_at is None:
            self.stop_at = self.now()
        return self.stop_at

    def finish(self) -> None:
        """Close every track, say the recording stopped and leave the Router."""
        at = self.stop()
        for tap in list(self._taps.values()):
            self._end(tap)
        self._taps.clear()
        self.stopped = True
        if self.announce_stop:
            self._publish(records.RecordingStopped(self.recording_id, at))
        if not self.router.closed:
            self.router.remove_peer(self.participant)
        return at
