"""Prometheus metrics for one Huddle node.

Each server owns its own registry so that several servers (as in the tests) never share counters.
Label values are always from a fixed set: an attacker-chosen string (an unknown message type, say)
is counted under a fixed label, never as a new time series.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

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

    def render(self) -> bytes:
        return generate_latest(self.registry)
