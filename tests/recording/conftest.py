"""Fixtures for the recording tests: a real SeaweedFS (one per session: it takes 3 to 7 s to start) and
stores on it or on a temporary folder."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from huddle.recording.store import LocalStore, S3Store
from tests.recording.seaweed import SeaweedS3, free_ports, running_seaweed
from tests.recording.tansu import Tansu, running_tansu

# Tests share one bucket and keep apart by key prefix: SeaweedFS gives every new bucket 7 volumes.
BUCKET = "huddle-tests"


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    with running_seaweed(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture
def s3_factory(seaweed: SeaweedS3) -> Callable[..., S3Store]:
    """Build S3Stores on the session's SeaweedFS: s3_factory(bucket=..., multipart_threshold=...)."""

    def make(bucket: str = BUCKET, **kwargs: Any) -> S3Store:
        options: dict[str, Any] = {
            "access_key": seaweed.access_key,
            "secret_key": seaweed.secret_key,
            "region": seaweed.region,
            **kwargs,
        }
        return S3Store(seaweed.endpoint, bucket, **options)

    return make


@pytest.fixture
def s3_store(s3_factory: Callable[..., S3Store]) -> S3Store:
    return s3_factory()


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "recordings")


@pytest.fixture
def prefix() -> str:
    """A key prefix of the test's own, so that tests sharing the bucket don't see each other's objects."""
    return f"t-{uuid.uuid4().hex[:10]}/"


@pytest.fixture
def dead_endpoint() -> str:
    """An S3 URL where nothing listens: connections are refused at once."""
    (port,) = free_ports(1)
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def kafka(tmp_path: Path) -> Iterator[Tansu]:
    """A Kafka-protocol broker of the test's own, on memory storage (lost when it stops)."""
    with running_tansu(tmp_path / "tansu") as broker:
        yield broker


@pytest.fixture
def durable_kafka(tmp_path: Path, seaweed: SeaweedS3) -> Iterator[Tansu]:
    """A broker whose topics and offsets live in SeaweedFS: they survive kill() and start() again."""
    with running_tansu(tmp_path / "tansu", s3=seaweed) as broker:
        yield broker
