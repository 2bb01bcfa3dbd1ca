"""Prometheus metrics for one Huddle node.

Each server owns its own registry so that several servers (as in the tests) never share counters.
Label values are always from a fixed set: an attacker-chosen string (an unknown message type, say)
is counted under a fixed label, never as a new time series.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


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

    def watch_media_port(self, port: Any) -> None:
        self.registry.register(_MediaPortCollector(port))

    def watch_sfu(self, source: Any) -> None:
        """`source.sfu_totals()` returns per-node SFU counts: producers, consumers, nacks, plis, ..."""
        self.registry.register(_SfuCollector(source))

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
