"""The recording log: per-key order, a bounded publish that drops and counts instead of blocking, closing."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from huddle.recording.log import InProcessLog, RecordingLog


async def _drain(log: InProcessLog) -> list[tuple[str, bytes]]:
    return [entry async for entry in log.records()]


def test_in_process_log_is_a_recording_log() -> None:
    assert isinstance(InProcessLog(), RecordingLog)


async def test_keeps_the_order_of_each_key_with_two_keys_interleaved() -> None:
    log = InProcessLog(max_pending=1000)
    expected: dict[str, list[bytes]] = {"room-a": [], "room-b": []}
    for i in range(300):
        key = "room-a" if (i * 7) % 3 else "room-b"  # an irregular interleaving
        value = f"{key}:{i}".encode()
        expected[key].append(value)
        log.publish(key, value)
    await log.close()
    got: dict[str, list[bytes]] = {"room-a": [], "room-b": []}
    for key, value in await _drain(log):
        got[key].append(value)
    assert got == expected
    assert log.stats()["delivered"] == 300
    assert log.dropped == 0


async def test_a_consumer_waiting_gets_entries_as_they_are_published() -> None:
    log = InProcessLog()
    received: list[tuple[str, bytes]] = []

    async def consume() -> None:
        async for entry in log.records():
            received.append(entry)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)
    for i in range(5):
        log.publish("k", bytes([i]))
        await asyncio.sleep(0)
    await log.close()
    await asyncio.wait_for(task, 1)
    assert received == [("k", bytes([i])) for i in range(5)]


async def test_overflow_drops_and_counts_without_blocking(caplog: pytest.LogCaptureFixture) -> None:
    log = InProcessLog(max_pending=10)
    caplog.set_level(logging.WARNING, logger="huddle.recording")
    started = time.perf_counter()
    for i in range(1000):
        log.publish("room", i.to_bytes(4, "big"))  # synchronous: returns at once whether kept or not
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5
    stats = log.stats()
    assert stats["published"] == 10
    assert log.dropped == stats["dropped"] == 990
    assert stats["pending"] == 10
    assert stats["high_water"] == 10
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one warning, however many drops
    # What was kept is the first ten, in order; once the consumer catches up, publishing works again.
    await log.close()
    values = [int.from_bytes(v, "big") for _, v in await _drain(log)]
    assert values == list(range(10))


async def test_the_bound_on_bytes_applies_too() -> None:
    log = InProcessLog(max_pending=1000, max_pending_bytes=10_000)
    for _ in range(20):
        log.publish("room", bytes(1000))
    stats = log.stats()
    assert stats["published"] == 10
    assert stats["dropped"] == 10
    assert stats["dropped_bytes"] == 10_000
    assert stats["pending_bytes"] == 10_000
    await log.close()
    assert len(await _drain(log)) == 10
    assert log.stats()["pending_bytes"] == 0


async def test_space_comes_back_once_the_consumer_has_taken_entries() -> None:
    log = InProcessLog(max_pending=2)
    iterator = log.records()
    log.publish("k", b"1")
    log.publish("k", b"2")
    log.publish("k", b"3")  # dropped: full
    assert await anext(iterator) == ("k", b"1")
    log.publish("k", b"4")  # room again
    await log.close()
    assert [v async for _, v in iterator] == [b"2", b"4"]
    assert log.dropped == 1


async def test_close_delivers_what_was_published_then_ends_and_later_publishes_are_dropped() -> None:
    log = InProcessLog()
    log.publish("k", b"before")
    await log.close()
    log.publish("k", b"after")
    assert await _drain(log) == [("k", b"before")]
    assert log.dropped == 1
    assert await _drain(log) == []  # a later consumer ends at once
    await log.close()  # idempotent


async def test_one_consumer_at_a_time() -> None:
    log = InProcessLog()
    first = log.records()
    log.publish("k", b"x")
    assert await anext(first) == ("k", b"x")
    with pytest.raises(RuntimeError):
        await anext(log.records())
    await log.close()
    assert [e async for e in first] == []


def test_commit_is_a_no_op_that_does_not_block() -> None:
    log = InProcessLog()
    log.publish("k", b"x")
    log.commit()
    assert log.stats()["pending"] == 1
