"""Prometheus metrics for one Huddle node.

Each server owns its own registry so that several servers (as in the tests) never share counters.
Label values are always from a fixed set: an attacker-chosen string (an unknown message type, say)
is counted under a fixed label, never as a new time series.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "LoopLagMonitor", "Metrics"]

# Node.js samples its event-loop delay at this resolution too: a 20 ms stall shows as a lag of 10 ms or more.
LAG_SAMPLE_INTERVAL = 0.01
LAG_WINDOW = 5.0
LAG_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rooms = Gauge("huddle_rooms", "Rooms with at least one participant", registry=r)
        self.participants = Gauge("huddle_participants", "Participants joined, over all rooms", registry=r)
        self.connections = Gauge("huddle_signaling_connections", "Open signaling WebSockets", registry=r)
        self.messages = Counter(
            "huddle_signaling_messages",
            "Signaling messages received, by type ('invalid' for ones that were not valid JSON objects)",
            ["type"],
            registry=r,
        )
        self.errors = Counter(
            "huddle_errors",
            "Errors and dropped input, by kind (the signaling error code, or stun_* for the STUN server)",
            ["kind"],
            registry=r,
        )
        self.stun_requests = Counter(
            "huddle_stun_requests", "STUN Binding requests answered", ["transport"], registry=r
        )
        self.stun_dropped = Counter(
            "huddle_stun_dropped",
            "STUN input dropped, or refused with an error answer, by reason",
            ["transport", "reason"],
            registry=r,
        )
        self.media_dropped = Counter(
            "huddle_media_dropped",
            "Datagrams dropped on the media port, by reason",
            ["reason"],
            registry=r,
        )
        # process_resident_memory_bytes, process_open_fds, process_max_fds, CPU seconds, ...
        ProcessCollector(registry=r)
        self.tasks = Gauge("huddle_asyncio_tasks", "asyncio tasks alive in the node's event loop", registry=r)
        self.loop_lag = Gauge(
            "huddle_event_loop_lag_seconds",
            f"Largest event-loop lag (how late a timer ran) over the last {LAG_WINDOW:g} to "
            f"{2 * LAG_WINDOW:g} seconds, sampled every {LAG_SAMPLE_INTERVAL * 1000:g} ms",
            registry=r,
        )
        self.loop_lag_samples = Histogram(
            "huddle_event_loop_lag_samples_seconds",
            f"Event-loop lag samples (one every {LAG_SAMPLE_INTERVAL * 1000:g} ms): a stall of 20 ms shows "
            "as a sample of 10 ms or more",
            buckets=LAG_BUCKETS,
            registry=r,
        )

    def watch_event_loop(self, loop: asyncio.AbstractEventLoop) -> LoopLagMonitor:
        """Sample `loop`'s lag and task count until the returned monitor is stopped."""
        self.tasks.set_function(lambda: len(asyncio.all_tasks(loop)))
        return LoopLagMonitor(loop, self.loop_lag, self.loop_lag_samples)

    def watch_media_port(self, port: Any) -> None:
        self.registry.register(_MediaPortCollector(port))

    def watch_sfu(self, source: Any) -> None:
        """`source.sfu_totals()` returns per-node SFU counts: producers, consumers, nacks, plis, ..."""
        self.registry.register(_SfuCollector(source))

    def watch_recording_log(self, recording_log: Any) -> None:
        """The recording log's counters (`stats()`); with Kafka also its `state` and disk buffer."""
        self.registry.register(_RecordingLogCollector(recording_log))

    def watch_turn(self, source: Any) -> None:
        """The TURN relay's counts (`source.turn_totals()`, empty until it starts); label values fixed."""
        self.registry.register(_TurnCollector(source))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _MediaPortCollector(Collector):
    def __init__(self, port: Any) -> None:
        self.port = port

    def collect(self) -> Iterator[CounterMetricFamily]:
        packets = CounterMetricFamily(
            "huddle_media_packets", "Packets on the media port", labels=["direction"]
        )
        packets.add_metric(["in"], self.port.packets_in)
        packets.add_metric(["out"], self.port.packets_out)
        octets = CounterMetricFamily("huddle_media_bytes", "Bytes on the media port", labels=["direction"])
        octets.add_metric(["in"], self.port.bytes_in)
        octets.add_metric(["out"], self.port.bytes_out)
        yield packets
        yield octets


class _SfuCollector(Collector):
    def __init__(self, source: Any) -> None:
        self.source = source

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        totals = self.source.sfu_totals()
        for name in ("producers", "consumers", "transports"):
            yield GaugeMetricFamily(f"huddle_sfu_{name}", f"SFU {name} on this node", value=totals[name])
        for name, text in (
            ("rtp_in", "RTP packets received from publishers"),
            ("rtp_out", "RTP packets forwarded to subscribers"),
            ("bytes_in", "RTP bytes received from publishers"),
            ("bytes_out", "RTP bytes forwarded to subscribers"),
            ("nacks_in", "NACKed packets asked for by subscribers"),
            ("retransmits", "packets re-sent from the NACK cache"),
            ("plis_out", "keyframe requests sent to publishers"),
        ):
            yield CounterMetricFamily(f"huddle_sfu_{name}", text, value=totals[name])
        pipes = CounterMetricFamily(
            "huddle_pipe_packets", "RTP packets through pipes to and from other nodes", labels=["direction"]
        )
        pipes.add_metric(["in"], totals["pipe_in"])
        pipes.add_metric(["out"], totals["pipe_out"])
        yield pipes
        yield GaugeMetricFamily(
            "huddle_pipe_layers", "Video layers piped to other nodes now", value=totals["pipe_layers"]
        )


class _TurnCollector(Collector):
    def __init__(self, source: Any) -> None:
        self.source = source

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        totals = self.source.turn_totals()
        if not totals:
            return
        for name, text in (
            ("allocations", "TURN allocations now"),
            ("permissions", "TURN permissions now, over all allocations"),
            ("channels", "TURN channels bound now, over all allocations"),
            ("relay_ports", "UDP ports held for TURN relay addresses"),
        ):
            yield GaugeMetricFamily(f"huddle_turn_{name}", text, value=totals[name])
        for name, label, text in (
            ("requests", "method", "TURN requests received, by method"),
            ("errors", "code", "TURN error responses sent, by error code"),
            ("packets", "direction", "Packets relayed by TURN, to peers and to clients"),
            ("bytes", "direction", "Application bytes relayed by TURN, to peers and to clients"),
            ("dropped", "reason", "TURN messages and relayed packets dropped, by reason"),
        ):
            family = CounterMetricFamily(f"huddle_turn_{name}", text, labels=[label])
            for value, count in totals[name].items():
                family.add_metric([value], count)
            yield family


class _RecordingLogCollector(Collector):
    STATES = ("live", "buffering", "dropping")

    def __init__(self, recording_log: Any) -> None:
        self.log = recording_log

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self.log.stats()
        records = CounterMetricFamily(
            "huddle_recording_log_records",
            "Recording records published to the log, or dropped (log full, or Kafka away and its disk "
            "buffer full); `acked`: Kafka messages acknowledged (a record over 1 MB is several)",
            labels=["outcome"],
        )
        for outcome in ("published", "acked", "dropped"):
            if outcome in stats:
                records.add_metric([outcome], stats[outcome])
        yield records
        yield GaugeMetricFamily(
            "huddle_recording_log_pending",
            "Records not yet taken by the consumer (Kafka: not acknowledged)",
            value=stats.get("pending", 0),
        )
        state = getattr(self.log, "state", None)
        if state is None:
            return
        yield GaugeMetricFamily(
            "huddle_recording_log_buffered_bytes",
            "Bytes of recording records kept on disk while Kafka is slow or away",
            value=stats.get("buffered_bytes", 0),
        )
        gauge = GaugeMetricFamily(
            "huddle_recording_log_state",
            "1 for the Kafka recording log's state: live (sending), buffering (to disk), dropping (full)",
            labels=["state"],
        )
        for name in self.STATES:
            gauge.add_metric([name], 1.0 if state == name else 0.0)
        yield gauge


class LoopLagMonitor:
    """A timer that measures how late it runs: whatever held the event loop held everyone else too.

    The gauge shows the largest lag of the current and the previous window, so that a stall is visible at
    once and for at least one window; the histogram keeps every sample for rates and quantiles.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, gauge: Gauge, histogram: Histogram) -> None:
        self._loop = loop
        self._gauge = gauge
        self._histogram = histogram
        self._window_end = loop.time() + LAG_WINDOW
        self._current = self._previous = 0.0
        self._due = loop.time() + LAG_SAMPLE_INTERVAL
        self._handle: asyncio.TimerHandle | None = loop.call_at(self._due, self._sample)

    def _sample(self) -> None:
        now = self._loop.time()
        lag = max(0.0, now - self._due)
        self._histogram.observe(lag)
        if now >= self._window_end:
            self._previous, self._current = self._current, 0.0
            self._window_end = now + LAG_WINDOW
        if lag > self._current:
            self._current = lag
        self._gauge.set(max(self._current, self._previous))
        self._due = now + LAG_SAMPLE_INTERVAL
        self._handle = self._loop.call_at(self._due, self._sample)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
