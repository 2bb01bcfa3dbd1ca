"""Rendezvous placement of chat ids over slots: even spread, minimal movement, the same answer everywhere."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest

from huddle.cluster.placement import choose, ranking, score

KEYS = [f"chat-{i}" for i in range(10_000)]


def nodes(n: int) -> list[str]:
    return [f"node-{i}" for i in range(n)]


def place(slots: list[str]) -> dict[str, str | None]:
    return {key: choose(key, slots) for key in KEYS}


@pytest.mark.parametrize("n", range(3, 11))
def test_every_node_gets_its_share_within_ten_percent(n: int) -> None:
    counts = Counter(place(nodes(n)).values())
    share = len(KEYS) / n
    assert set(counts) == set(nodes(n))
    for node, count in counts.items():
        assert 0.9 * share <= count <= 1.1 * share, (node, count, share)


@pytest.mark.parametrize("n", range(3, 10))
def test_a_joining_node_takes_only_the_keys_it_wins(n: int) -> None:
    before = place(nodes(n))
    newcomer = f"node-{n}"
    after = place([*nodes(n), newcomer])
    moved = [key for key in KEYS if before[key] != after[key]]
    # No key moves between nodes that were already there: only to the newcomer.
    assert all(after[key] == newcomer for key in moved)
    assert sum(1 for key in KEYS if after[key] == newcomer) == len(moved)
    share = len(KEYS) / (n + 1)
    assert 0.9 * share <= len(moved) <= 1.1 * share


@pytest.mark.parametrize("n", range(4, 11))
def test_a_leaving_node_hands_over_only_its_own_keys(n: int) -> None:
    before = place(nodes(n))
    gone = "node-1"
    after = place([s for s in nodes(n) if s != gone])
    for key in KEYS:
        if before[key] == gone:
            assert after[key] != gone
        else:
            assert after[key] == before[key]
    # Its keys spread over the others rather than all landing on one neighbour (a ring's failure mode).
    inheritors = Counter(after[key] for key in KEYS if before[key] == gone)
    assert len(inheritors) == n - 1
    assert max(inheritors.values()) < 2 * len(KEYS) / n / (n - 1)


def test_ranking_is_a_full_order_that_starts_with_the_choice() -> None:
    slots = nodes(7)
    for key in KEYS[:500]:
        order = ranking(key, slots)
        assert sorted(order) == sorted(slots)
        assert order[0] == choose(key, slots)
        # The runner-up is where the key goes when the winner leaves.
        assert order[1] == choose(key, [s for s in slots if s != order[0]])
    assert choose("chat", []) is None
    assert ranking("chat", []) == []


def test_the_order_of_the_slot_list_does_not_matter() -> None:
    slots = nodes(6)
    for key in KEYS[:500]:
        assert choose(key, slots) == choose(key, list(reversed(slots)))


SCRIPT = """
import sys
from huddle.cluster.placement import choose
slots = [f"node-{i}" for i in range(5)]
print(",".join(choose(f"chat-{i}", slots) for i in range(2000)))
"""


def test_every_process_places_a_chat_id_on_the_same_node() -> None:
    answers = set()
    for seed in ("1", "2", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=30, check=True
        )
        answers.add(out.stdout.strip())
    assert len(answers) == 1
    assert answers.pop() == ",".join(choose(f"chat-{i}", nodes(5)) or "" for i in range(2000))


def test_placement_is_pinned_across_versions() -> None:
    # Nodes of different releases share a cluster during a rolling upgrade: the hash must never change.
    # Score = the first 8 bytes of blake2b(slot + NUL + key), big-endian.
    assert score("room", "a") == 0xC7D6FD4C04176E5A
    slots = ["a", "b", "c", "d"]
    assert [choose(key, slots) for key in ("room", "standup", "chat-0", "chat-1", "ü")] == [
        "a",
        "b",
        "b",
        "c",
        "a",
    ]
