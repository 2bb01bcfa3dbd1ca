from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from tests.cluster.zookeeper_server import ZooKeeperServer

_chroots = itertools.count(1)


@pytest.fixture(scope="session")
def shared_zookeeper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeperServer]:
    server = ZooKeeperServer(tmp_path_factory.mktemp("zookeeper"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def zookeeper(shared_zookeeper: ZooKeeperServer) -> str:
    """`host:port/chroot` of a ZooKeeper shared by the session, with a chroot of this test's own."""
    return f"{shared_zookeeper.hosts}/huddle-test-{next(_chroots)}"


@pytest.fixture
def zookeeper_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeperServer]:
    """A ZooKeeper of this test's own, for tests that kill, pause or restart it."""
    server = ZooKeeperServer(tmp_path_factory.mktemp("zookeeper-own"))
    server.start()
    yield server
    server.stop()
