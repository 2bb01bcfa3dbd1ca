"""One pacing loop per process for every synthetic sender (not a task per stream): a heap of due times.

A sender has an `interval` (seconds), a `fire()` that sends what is due, and `closed`. Each is fired
at its own phase, so that a hundred cameras do not all send their frames at the same instant. When the loop
falls behind (the process is overloaded), due frames are sent late, back to back, to keep the rates; when it
falls more than `MAX_LAG` behind, the missed ones are skipped and counted.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol

__all__ = ["MAX_LAG", "Pacer", "Sender"]

MAX_LAG = 0.5  # seconds
IDLE = 0.02  # the longest sleep: how soon a newly added sender is noticed


class Sender(Protocol):
    interval: float
    closed: bool

    def fire(self) -> None: ...


class Pacer:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Sender]] = []
        self._order = itertools.count()
        self.fired = 0
        self.skipped = 0  # firings dropped because the loop was more than MAX_LAG behind
        self.late = 0  # firings more than one interval late
        self.busy = 0.0  # seconds spent inside fire()

    def add(self, sender: Sender, phase: float = 0.0) -> None:
        """Fire `sender` every `sender.interval`, the first time `phase` seconds from now."""
        heapq.heappush(self._heap, (time.monotonic() + phase, next(self._order), sender))

    async def run(self) -> None:
        heap = self._heap
        while True:
            wait = heap[0][0] - time.monotonic() if heap else IDLE
            if wait > 0:
                # Short sleeps only, so that a sender added meanwhile is not kept waiting.
                await asyncio.sleep(min(wait, IDLE))
                continue
            started = time.monotonic()
            # Everything due now goes out in this turn of the loop.
            while heap and heap[0][0] <= started:
                due, order, sender = heapq.heappop(heap)
                if sender.closed:
                    continue
                lag = started - due
                if lag > MAX_LAG:
                    missed = int(lag / sender.interval)
                    self.skipped += missed
                    due += missed * sender.interval
                elif lag > sender.interval:
                    self.late += 1
                sender.fire()
                self.fired += 1
                heapq.heappush(heap, (due + sender.interval, order, sender))
            self.busy += time.monotonic() - started
            # Let the sockets be read between bursts.
            await asyncio.sleep(0)
