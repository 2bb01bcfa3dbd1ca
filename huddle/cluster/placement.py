"""Where a call lives: rendezvous (highest random weight) hashing of the chat id over the slots.

Rendezvous rather than a ring with virtual nodes: the spread over 3-10 slots is even without a virtual-node
count to tune, a slot's arrival moves exactly the keys it wins and its departure exactly the keys it held, and
`ranking` gives each chat id its own order of slots (the next one to spill to) with no ring state to keep in
sync between nodes. The score is a keyed cryptographic hash, not Python's hash(), so that every process of the
cluster computes the same placement.
"""

from __future__ import annotations

from collections.abc import Iterable
from hashlib import blake2b

__all__ = ["choose", "ranking", "score", "spill"]


def score(key: str, slot: str) -> int:
    """The weight of `slot` for `key`: the first 8 bytes of blake2b(slot + NUL + key), big-endian."""
    return int.from_bytes(blake2b(f"{slot}\0{key}".encode()).digest()[:8], "big")


def ranking(key: str, slots: Iterable[str]) -> list[str]:
    """The slots in this key's order of preference, best first (a 64-bit tie goes by name)."""
    return sorted(set(slots), key=lambda slot: (-score(key, slot), slot))


def choose(key: str, slots: Iterable[str]) -> str | None:
    """The slot that serves `key`, or None when there is no slot."""
    best: str | None = None
    best_score = -1
    for slot in slots:
        s = score(key, slot)
        if s > best_score or (s == best_score and best is not None and slot < best):
            best, best_score = slot, s
    return best


def spill(key: str, slots: Iterable[str], counts: dict[str, int], limit: int) -> str | None:
    """Where the next participant of call `key` goes when each slot may seat `limit` of its participants
    (`counts`: how many each holds now): the first slot in the key's ranking below the limit; when all are
    full, the one holding fewest (a call over every node's limit still takes people: the room's own
    capacity is the limit that refuses). None when there is no slot."""
    order = ranking(key, slots)
    for slot in order:
        if counts.get(slot, 0) < limit:
            return slot
    return min(order, key=lambda slot: counts.get(slot, 0), default=None)
