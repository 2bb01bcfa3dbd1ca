"""KafkaLog against a real Kafka-protocol broker (Tansu): per-key order and bytes intact, a frame larger
than a message split and joined again, the broker away for 10 s (publish stays cheap, records wait on
disk and all arrive in order), the disk bound (drops counted, never an exception), and a restart that
sends what the last run kept. Run in a namespace: scripts/in-netns .venv/bin/pytest <this file>"""

from __future__ import annotations

import asyncio
import os
import time
from collections import defaultdict
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from huddle.recording.envelope import Joiner
from huddle.recording.kafka_log import KafkaLog
from huddle.recording.outbox import SUFFIX
from tests.recording.seaweed import free_ports
from tests.recording.tansu import Tansu

TOPIC = "huddle.recording"

# The slowest single publish() allowed. One that waited for the broker or the disk would take the broker's
# timeouts (seconds); a few ms is scheduling on a busy 2-core machine. Its cost: bench/kafka_recording.py.
NEVER_WAITS = 0.05


def murmur2_partition(key: bytes, partitions: int) -> int:
    """The Java client's default partitioner (murmur2, then toPositive, modulo the partition count)."""
    m, h = 0x5BD1E995, (0x9747B28C ^ len(key)) & 0xFFFFFFFF
    whole = len(key) - len(key) % 4
    for i in range(0, whole, 4):
        k = (int.from_bytes(key[i : i + 4], "little") * m) & 0xFFFFFFFF
        k = ((k ^ (k >> 24)) * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    rest = len(key) % 4
    if rest == 3:
        h ^= key[whole + 2] << 16
    if rest >= 2:
        h ^= key[whole + 1] << 8
    if rest >= 1:
        h = ((h ^ key[whole]) * m) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * m) & 0xFFFFFFFF
    h ^= h >> 15
    return (h & 0x7FFFFFFF) % partitions


async def read_topic(bootstrap: str, expected: int, timeout: float = 30.0) -> list[tuple[bytes, bytes, int]]:
    """(key, value, partition) of every message on the topic, in each partition's order: reads until
    `expected` messages came, then a little longer so that duplicates would show."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=32 << 20,
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout
        partitions = None
        while not partitions and time.monotonic() < deadline:
            await consumer.topics()
            partitions = consumer.partitions_for_topic(TOPIC)
        assert partitions, "the topic never appeared"
        consumer.assign([TopicPartition(TOPIC, p) for p in partitions])
        out: list[tuple[bytes, bytes, int]] = []
        extra_rounds = 2
        while time.monotonic() < deadline and extra_rounds:
            batches = await consumer.getmany(timeout_ms=300)
            for tp, messages in batches.items():
                out.extend((m.key, m.value, tp.partition) for m in messages)
            if len(out) >= expected:
                extra_rounds -= 1
        return out
    finally:
        await consumer.stop()


def joined_by_key(messages: list[tuple[bytes, bytes, int]]) -> dict[bytes, list[bytes]]:
    joiner = Joiner()
    records: dict[bytes, list[bytes]] = defaultdict(list)
    for key, value, _ in messages:
        record = joiner.feed(key, value)
        if record is not None:
            records[key].append(record)
    assert joiner.abandoned == 0 and joiner.pending == 0
    return dict(records)


def record(key: str, i: int, size: int) -> bytes:
    head = f"{key}#{i:06d}#".encode()
    return head + os.urandom(max(0, size - len(head)))


def segments(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(SUFFIX)] if directory.exists() else []


async def test_records_arrive_in_per_key_order_intact_in_murmur2_partitions(
    kafka: Tansu, tmp_path: Path
) -> None:
    log = KafkaLog(kafka.bootstrap, buffer_dir=tmp_path / "outbox")
    await log.start()
    keys = ["room-a", "room-b", "a-much-longer-room-name"]
    sent: dict[bytes, list[bytes]] = {k.encode(): [] for k in keys}
    for i in range(600):
        key = keys[(i * 7 + i // 5) % 3]  # irregular interleaving
        value = record(key, i, 1 + (i * 131) % 6000)
        sent[key.encode()].append(value)
        log.publish(key, value)
    assert await log.flush(20)
    assert log.stats()["acked"] == 600 and log.state == "live"
    await log.close()

    messages = await read_topic(kafka.bootstrap, 600)
    assert joined_by_key(messages) == sent
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap)
    await consumer.start()
    try:
        await consumer.topics()
        count = len(consumer.partitions_for_topic(TOPIC) or ())
    finally:
        await consumer.stop()
    assert count > 1  # else any partitioner would pass
    for key, _, partition in messages:
        assert partition == murmur2_partition(key, count)  # a Java producer of this topic agrees


async def test_a_3_mib_frame_is_split_and_arrives_whole(kafka: Tansu, tmp_path: Path) -> None:
    log = KafkaLog(kafka.bootstrap, buffer_dir=tmp_path / "outbox")
    await log.start()
    big = os.urandom(3 << 20)
    log.publish("room", b"before")
    log.publish("room", big)
    log.publish("room", b"after")
    assert await log.flush(20)
    assert log.stats()["parts"] == 2 + 4  # 3 MiB in values of at most 1,000,000 bytes
    await log.close()
    messages = await read_topic(kafka.bootstrap, 6)
    assert all(len(value) <= 1_000_000 for _, value, _ in messages)
    assert joined_by_key(messages) == {b"room": [b"before", big, b"after"]}


async def test_broker_away_for_10_s_publish_stays_cheap_and_every_record_arrives_in_order(
    durable_kafka: Tansu, tmp_path: Path
) -> None:
    kafka = durable_kafka
    outbox = tmp_path / "outbox"
    # A small memory queue: the 10 s outage overflows it into the disk buffer, as minutes would at 32 MiB.
    log = KafkaLog(kafka.bootstrap, buffer_dir=outbox, memory_bytes=64 << 10)
    await log.start()
    keys = ["room-a", "room-b", "room-c"]
    sent: dict[bytes, list[bytes]] = {k.encode(): [] for k in keys}
    states: set[str] = set()
    most_buffered = 0
    slowest = 0.0
    i = 0

    async def publish_for(seconds: float) -> None:
        nonlocal i, slowest, most_buffered
        end = time.monotonic() + seconds
        while time.monotonic() < end:  # ~100 records/s
            key = keys[i % 3]
            value = record(key, i, 2000)
            sent[key.encode()].append(value)
            started = time.perf_counter()
            log.publish(key, value)
            slowest = max(slowest, time.perf_counter() - started)
            states.add(log.state)
            most_buffered = max(most_buffered, log.stats()["buffered_entries"])
            i += 1
            await asyncio.sleep(0.01)

    await publish_for(1.0)
    assert await log.flush(10)
    await asyncio.to_thread(kafka.stop)
    await publish_for(10.0)
    assert log.state == "buffering"
    assert log.stats()["acked"] < i  # the outage was real
    await asyncio.to_thread(kafka.start)
    await publish_for(2.0)
    assert await log.flush(60), log.stats()
    assert log.state == "live"
    stats = log.stats()
    await log.close()

    assert slowest < NEVER_WAITS, f"slowest publish call {slowest * 1e3:.2f} ms"
    assert "buffering" in states and most_buffered > 100
    assert stats["dropped"] == 0 and stats["acked"] == stats["parts"] == i
    assert segments(outbox) == []  # all sent, all deleted
    messages = await read_topic(kafka.bootstrap, i, timeout=60)
    assert joined_by_key(messages) == sent  # none lost, none twice, each key in order


async def test_beyond_the_disk_bound_records_are_dropped_and_counted(tmp_path: Path) -> None:
    (port,) = free_ports(1)  # nothing listens: Kafka is away for the whole test
    log = KafkaLog(
        f"127.0.0.1:{port}", buffer_dir=tmp_path / "outbox", memory_bytes=16 << 10, max_buffer_bytes=64 << 10
    )
    await log.start()
    slowest = 0.0
    for i in range(200):
        started = time.perf_counter()
        log.publish("room", record("room", i, 2000))
        slowest = max(slowest, time.perf_counter() - started)
        if i % 20 == 0:
            await asyncio.sleep(0.01)  # let the outbox's writes happen, as a live call would
    stats = log.stats()
    assert log.state == "dropping"
    assert stats["dropped"] > 100 and stats["published"] + stats["dropped"] == 200
    assert stats["buffered_bytes"] <= 64 << 10
    assert slowest < NEVER_WAITS, f"slowest publish call {slowest * 1e3:.2f} ms"
    await log.close(flush_timeout=0.2)
    on_disk = sum(p.stat().st_size for p in segments(tmp_path / "outbox"))
    assert 0 < on_disk <= (64 << 10) + (16 << 10) + 1024  # the outbox, and what librdkafka gave back


async def test_a_closed_log_leaves_its_records_for_the_next_one_which_sends_them_first(
    kafka: Tansu, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox"
    kafka.stop()  # memory storage: nothing is lost by this, nothing was sent yet
    first = KafkaLog(kafka.bootstrap, buffer_dir=outbox, memory_bytes=16 << 10)
    await first.start()
    sent: dict[bytes, list[bytes]] = {b"room-a": [], b"room-b": []}
    for i in range(300):
        key = "room-a" if i % 3 else "room-b"
        value = record(key, i, 1000)
        sent[key.encode()].append(value)
        first.publish(key, value)
        if i % 30 == 0:
            await asyncio.sleep(0.01)
    assert first.state == "buffering"
    await first.close(flush_timeout=0.5)
    assert first.stats()["dropped"] == 0
    assert segments(outbox)

    kafka.start()
    second = KafkaLog(kafka.bootstrap, buffer_dir=outbox)
    await second.start()
    assert second.state == "buffering"  # the old records go first
    for i in range(300, 350):
        key = "room-a" if i % 3 else "room-b"
        value = record(key, i, 1000)
        sent[key.encode()].append(value)
        second.publish(key, value)
    assert await second.flush(30), second.stats()
    assert second.state == "live"
    await second.close()
    assert segments(outbox) == []
    messages = await read_topic(kafka.bootstrap, 350)
    assert joined_by_key(messages) == sent
