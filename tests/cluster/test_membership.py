"""Cluster membership against a real ZooKeeper: placement, takeover, fencing, restarts and bad input.

Several memberships run in this process, each with its own kazoo client (its own ZooKeeper session), as
separate nodes would; an active that must die abruptly runs in a child process killed with -9.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kazoo.client import KazooClient

from huddle.cluster.membership import ClusterError, ClusterUnavailable, NodeInfo, SingleNode
from huddle.cluster.placement import choose
from huddle.cluster.zookeeper import ZooKeeperMembership, parse_hosts
from tests.cluster.zookeeper_server import Relay, ZooKeeperServer, free_port

REPO = Path(__file__).resolve().parents[2]
FAST = 1.5  # session timeout (s) of the failover tests: the bound is measured with it


class Node:
    """A membership as a node holds it, with what its callbacks were told and when."""

    def __init__(self, hosts: str, node_id: str, standby_for: str | None, timeout: float) -> None:
        self.id = node_id
        self.errors: list[str] = []
        self.fenced: list[tuple[float, str]] = []
        self.served: list[tuple[float, str]] = []
        self.membership = ZooKeeperMembership(
            hosts,
            me=NodeInfo(
                id=node_id, url=f"http://{node_id}.test:8080", media=f"{node_id}.test:40000", role="active"
            ),
            standby_for=standby_for,
            session_timeout=timeout,
            count_error=self.errors.append,
        )
        self.membership.on_fenced = lambda why: self.fenced.append((time.monotonic(), why))
        self.membership.on_serving = lambda slot: self.served.append((time.monotonic(), slot))

    async def owner(self, room: str) -> str:
        return (await self.membership.owner(room)).id

    def sees(self) -> dict[str, tuple[str, str | None]]:
        return {info.id: (info.role, info.serves) for info in self.membership.nodes()}


@pytest.fixture
async def cluster() -> AsyncIterator[Callable[..., Any]]:
    started: list[Node] = []

    async def start(hosts: str, node_id: str, standby_for: str | None = None, timeout: float = FAST) -> Node:
        node = Node(hosts, node_id, standby_for, timeout)
        await node.membership.start()
        started.append(node)
        return node

    yield start
    for node in started:
        await node.membership.stop()


async def until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait until `condition` holds; returns the time it took."""
    begin = time.monotonic()
    while not condition():
        if time.monotonic() - begin > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - begin


async def answered(node: Node, room: str, timeout: float) -> str:
    """The owner of `room` as soon as the node can tell (it cannot while it has no ZooKeeper connection)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await node.owner(room)
        except ClusterUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


@pytest.fixture
def zk_client(shared_zookeeper: ZooKeeperServer) -> Iterator[KazooClient]:
    client = KazooClient(hosts=shared_zookeeper.hosts, timeout=5)
    client.start(timeout=10)
    yield client
    client.stop()
    client.close()


def chroot(hosts: str) -> str:
    return parse_hosts(hosts)[1]


async def test_three_actives_place_thirty_rooms_as_the_hashing_says_and_agree(
    zookeeper: str, cluster: Any
) -> None:
    nodes = [await cluster(zookeeper, node_id) for node_id in ("a", "b", "c")]
    everyone = {"a": ("active", "a"), "b": ("active", "b"), "c": ("active", "c")}
    await until(lambda: all(node.sees() == everyone for node in nodes), 5, "every node sees the 3 actives")
    rooms = [f"room-{i}" for i in range(30)]
    placed = {}
    for i, room in enumerate(rooms):
        placed[room] = await nodes[i % 3].owner(room)
        assert placed[room] == choose(room, ["a", "b", "c"])
    for node in nodes:
        assert {room: await node.owner(room) for room in rooms} == placed
    assert set(placed.values()) == {"a", "b", "c"}

    # What each node hosts reaches the others (for /api/cluster) shortly after it changes.
    nodes[0].membership.report({"room-0": 2, "room-3": 1})
    await until(
        lambda: nodes[2].membership.nodes()[0].rooms == {"room-0": 2, "room-3": 1}, 3, "c sees a's load"
    )
    assert nodes[2].membership.nodes()[0].describe()["participants"] == 3


async def test_a_fourth_node_keeps_live_calls_and_takes_its_share_of_new_ones(
    zookeeper: str, cluster: Any
) -> None:
    nodes = [await cluster(zookeeper, node_id) for node_id in ("a", "b", "c")]
    # A door that serves nothing: a standby. It is restarted below and must still give the same answers.
    door = await cluster(zookeeper, "door", standby_for="a")
    await until(lambda: len(door.sees()) == 4, 5, "the door sees everyone")
    live = [f"live-{i}" for i in range(30)]
    placed = {room: await door.owner(room) for room in live}
    d = await cluster(zookeeper, "d")
    await until(lambda: all("d" in node.sees() for node in [*nodes, door]), 5, "every node sees d")

    would_move = [room for room in live if choose(room, ["a", "b", "c", "d"]) == "d"]
    assert would_move, "the test needs live calls that d would win if they were new"
    for node in [*nodes, d, door]:
        assert {room: await node.owner(room) for room in live} == placed

    await door.membership.stop()
    door = await cluster(zookeeper, "door", standby_for="a")
    assert {room: await door.owner(room) for room in live} == placed

    new = [f"new-{i}" for i in range(40)]
    owners = [await nodes[i % 3].owner(room) for i, room in enumerate(new)]
    assert owners == [choose(room, ["a", "b", "c", "d"]) for room in new]
    share = owners.count("d") / len(new)
    print(f"d took {owners.count('d')} of {len(new)} new calls ({share:.0%}; its share is 25 %)")
    assert 0.1 <= share <= 0.4


async def test_release_forgets_a_placement_only_on_the_node_that_serves_it(
    zookeeper: str, cluster: Any
) -> None:
    a = await cluster(zookeeper, "a")
    b = await cluster(zookeeper, "b")
    await until(lambda: len(a.sees()) == 2, 5, "a sees b")
    room = next(f"r{i}" for i in range(100) if choose(f"r{i}", ["a", "b"]) == "a")
    assert await b.owner(room) == "a"
    c = await cluster(zookeeper, "c")
    await until(lambda: "c" in b.sees(), 5, "b sees c")
    await b.membership.release(room)
    assert await b.owner(room) == "a"
    await a.membership.release(room)
    assert await b.owner(room) == choose(room, ["a", "b", "c"])
    assert c.errors == a.errors == b.errors == []


async def test_a_graceful_stop_hands_the_slot_to_the_standby_at_once(zookeeper: str, cluster: Any) -> None:
    a = await cluster(zookeeper, "a")
    standby = await cluster(zookeeper, "sa", standby_for="a")
    b = await cluster(zookeeper, "b")
    await until(lambda: len(b.sees()) == 3, 5, "b sees everyone")
    assert standby.sees()["sa"] == ("standby", None)
    rooms = [f"r{i}" for i in range(20) if choose(f"r{i}", ["a", "b"]) == "a"]
    assert rooms and all([await b.owner(room) == "a" for room in rooms])
    epoch = a.membership.epoch

    begin = time.monotonic()
    await a.membership.stop()
    await until(lambda: bool(standby.served), 2, "the standby serves")
    took = standby.served[0][0] - begin
    print(f"graceful handover: the standby served slot a {took * 1000:.0f} ms after stop() began")
    assert standby.served[0][1] == "a"
    # Far below the session timeout: the standby did not wait for a's session to end.
    assert took < FAST / 2
    assert standby.membership.epoch == epoch + 1
    assert [await b.owner(room) for room in rooms] == ["sa"] * len(rooms)
    await until(lambda: b.sees() == {"b": ("active", "b"), "sa": ("active", "a")}, 5, "b sees the handover")


CHILD = """
import asyncio, sys
from huddle.cluster.membership import NodeInfo
from huddle.cluster.zookeeper import ZooKeeperMembership


async def main():
    hosts, node_id, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
    me = NodeInfo(id=node_id, url="http://child.test:8080", media="child.test:40000", role="active")
    membership = ZooKeeperMembership(
        hosts, me=me, standby_for=None, session_timeout=timeout, count_error=lambda kind: None
    )
    await membership.start()
    print(membership.serving(), membership.epoch, flush=True)
    await asyncio.sleep(60)


asyncio.run(main())
"""


def start_child(hosts: str, node_id: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, hosts, node_id, str(FAST)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    if not ready:
        proc.kill()
        raise AssertionError("the child node did not start")
    serving, epoch = proc.stdout.readline().split()
    assert serving == "True"
    return proc, int(epoch)


async def test_the_standby_takes_over_when_the_active_is_killed(zookeeper: str, cluster: Any) -> None:
    proc, epoch = start_child(zookeeper, "a")
    try:
        standby = await cluster(zookeeper, "sa", standby_for="a")
        b = await cluster(zookeeper, "b")
        await until(lambda: len(b.sees()) == 3, 5, "b sees everyone")
        assert not standby.served and not standby.membership.serving()
        room = next(f"r{i}" for i in range(100) if choose(f"r{i}", ["a", "b"]) == "a")
        assert await b.owner(room) == "a"

        proc.kill()
        killed = time.monotonic()
        # A door asked all through the takeover: the dead node until its session ends, then its standby,
        # never a third node (the call does not move).
        answers = [await b.owner(room)]
        while answers[-1] != "sa" and time.monotonic() - killed < 5:
            await asyncio.sleep(0.05)
            answers.append(await b.owner(room))
        answered = time.monotonic() - killed
        assert set(answers) == {"a", "sa"} and answers[-1] == "sa"
        await until(lambda: bool(standby.served), 5, "the standby serves")
    finally:
        proc.kill()
        proc.wait()
    took = standby.served[0][0] - killed
    print(f"kill -9 of the active -> its standby serves: {took:.2f} s (session timeout {FAST} s)")
    print(f"a door asking all along named the standby {answered:.2f} s after the kill")
    assert took < 3.0
    assert standby.served[0][1] == "a"
    assert standby.membership.epoch == epoch + 1
    assert standby.sees()["sa"] == ("active", "a")

    # The killed node starts again: its slot is taken, so it stands by for it instead of serving it.
    again = await cluster(zookeeper, "a")
    assert not again.membership.serving() and not again.served
    assert again.sees()["a"] == ("standby", None)
    assert again.membership.me().standby_for == "a"
    assert await again.owner(room) == "sa"
    await standby.membership.stop()
    await until(lambda: bool(again.served), 2, "the restarted active takes its slot back")
    assert again.membership.epoch == epoch + 2


async def test_a_node_cut_off_from_zookeeper_stops_serving_before_its_standby_starts(
    zookeeper: str, shared_zookeeper: ZooKeeperServer, cluster: Any
) -> None:
    relay = Relay(shared_zookeeper)
    try:
        a = await cluster(f"{relay.hosts}{chroot(zookeeper)}", "a")
        standby = await cluster(zookeeper, "sa", standby_for="a")
        await until(lambda: len(standby.sees()) == 2, 5, "the standby sees a")
        relay.pause()
        cut = time.monotonic()
        await until(lambda: bool(a.fenced), FAST + 1, "a fences itself")
        await until(lambda: bool(standby.served), FAST + 2, "the standby serves")
        fenced, served = a.fenced[0][0] - cut, standby.served[0][0] - cut
        print(f"cut off: a stopped serving after {fenced:.2f} s, its standby served after {served:.2f} s")
        assert fenced < served, "both served slot a at the same time"
        assert not a.membership.serving() and a.membership.epoch == 0

        relay.resume()
        await until(lambda: standby.sees().get("a") == ("standby", None), 10, "a is back, as a standby")
        await asyncio.sleep(0.5)
        assert not a.membership.serving() and len(a.served) == 1
        assert standby.membership.serving()
        assert await a.owner("any-room") == "sa"
    finally:
        relay.stop()


async def test_a_paused_zookeeper_fences_the_active_and_one_node_serves_after(
    zookeeper_server: ZooKeeperServer, cluster: Any
) -> None:
    hosts = f"{zookeeper_server.hosts}/huddle"
    a = await cluster(hosts, "a")
    standby = await cluster(hosts, "sa", standby_for="a")
    await until(lambda: len(standby.sees()) == 2, 5, "the standby sees a")
    zookeeper_server.pause()
    paused = time.monotonic()
    try:
        await until(lambda: bool(a.fenced), FAST + 1, "a fences itself")
        print(f"ZooKeeper paused: a stopped serving after {a.fenced[0][0] - paused:.2f} s")
        await asyncio.sleep(max(0.0, paused + FAST + 0.5 - time.monotonic()))
    finally:
        zookeeper_server.resume()

    def one_serves() -> bool:
        assert not (a.membership.serving() and standby.membership.serving()), "both serve slot a"
        return a.membership.serving() != standby.membership.serving()

    await until(one_serves, 10, "one node serves slot a again")
    await asyncio.sleep(1.0)
    assert one_serves()


async def test_nodes_keep_serving_and_placements_stay_across_a_zookeeper_restart(
    zookeeper_server: ZooKeeperServer, cluster: Any
) -> None:
    hosts = f"{zookeeper_server.hosts}/huddle"
    # The default session timeout: a restart must not cost the calls anything.
    a = await cluster(hosts, "a", timeout=6.0)
    b = await cluster(hosts, "b", timeout=6.0)
    await until(lambda: len(a.sees()) == 2 and len(b.sees()) == 2, 5, "a and b see each other")
    rooms = [f"r{i}" for i in range(10)]
    placed = {room: await a.owner(room) for room in rooms}
    c = await cluster(hosts, "c", timeout=6.0)
    await until(lambda: "c" in a.sees(), 5, "a sees c")

    begin = time.monotonic()
    await asyncio.to_thread(zookeeper_server.restart)
    restarted = time.monotonic() - begin
    # ZooKeeper 3.8 sometimes leaves a connection made during its own startup unanswered (an exception in
    # its NIO connection cleanup): that node waits out the session timeout for the handshake and comes back.
    for node in (a, b, c):
        await answered(node, "r0", 6.0 + 3)
    await until(lambda: all(n.membership.serving() for n in (a, b, c)), 3, "every node serves again")
    fenced = [node.id for node in (a, b, c) if node.fenced]
    print(
        f"ZooKeeper down {restarted:.2f} s; nodes answer {time.monotonic() - begin:.2f} s after the kill; "
        f"fenced meanwhile: {fenced or 'none'}"
    )
    for node in (a, b, c):
        assert node.sees()[node.id] == ("active", node.id)
    assert {room: await b.owner(room) for room in rooms} == placed
    assert await a.owner("after-restart") == choose("after-restart", ["a", "b", "c"])


async def test_a_node_fenced_by_a_zookeeper_outage_serves_again_when_its_session_survives(
    zookeeper: str, shared_zookeeper: ZooKeeperServer, cluster: Any
) -> None:
    relay = Relay(shared_zookeeper)
    try:
        a = await cluster(f"{relay.hosts}{chroot(zookeeper)}", "a")
        standby = await cluster(zookeeper, "sa", standby_for="a")
        await until(lambda: len(standby.sees()) == 2, 5, "the standby sees a")
        epoch = a.membership.epoch
        # a's way to ZooKeeper goes down (connections reset) for longer than a node may serve without
        # ZooKeeper, but shorter than its session: nobody took slot a over, so a serves it again.
        begin = time.monotonic()
        relay.stop()
        await until(lambda: bool(a.fenced), FAST, "a fences itself")
        await asyncio.sleep(max(0.0, begin + FAST / 2 - time.monotonic()))
        relay = await asyncio.to_thread(Relay, shared_zookeeper, relay.port)
        await until(lambda: len(a.served) == 2, 3, "a serves again")
    finally:
        relay.stop()
    print(
        f"ZooKeeper away {FAST / 2:.2f} s: a stopped serving after {a.fenced[0][0] - begin:.2f} s, "
        f"served again after {a.served[1][0] - begin:.2f} s"
    )
    assert len(a.fenced) == 1 and a.fenced[0][0] < a.served[1][0]
    assert a.membership.serving() and a.membership.epoch == epoch
    assert not standby.served and not standby.membership.serving()
    assert await standby.owner("r") == "a"


async def test_an_unreachable_zookeeper_stops_the_start_with_its_address(cluster: Any) -> None:
    port = free_port()
    begin = time.monotonic()
    with pytest.raises(ClusterError, match=f"cannot reach ZooKeeper at 127.0.0.1:{port}"):
        await cluster(f"127.0.0.1:{port}", "a")
    assert time.monotonic() - begin < FAST + 1.0

    # A server that accepts connections and never answers (a hung machine) is refused the same way.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        begin = time.monotonic()
        with pytest.raises(ClusterError, match=f"cannot reach ZooKeeper at {address}"):
            await cluster(address, "a")
        assert time.monotonic() - begin < FAST + 1.0


async def test_a_second_live_node_with_the_same_id_refuses_to_start(zookeeper: str, cluster: Any) -> None:
    first = await cluster(zookeeper, "a")
    begin = time.monotonic()
    with pytest.raises(ClusterError, match="another live node has --node-id a"):
        await cluster(zookeeper, "a")
    assert time.monotonic() - begin < FAST + 2.5
    assert first.membership.serving() and first.fenced == []
    assert first.sees()["a"] == ("active", "a")


async def test_a_standby_for_a_standby_is_refused(zookeeper: str, cluster: Any) -> None:
    await cluster(zookeeper, "a")
    await cluster(zookeeper, "sa", standby_for="a")
    with pytest.raises(ClusterError, match="sa is itself a standby"):
        await cluster(zookeeper, "ssa", standby_for="sa")


async def test_garbage_in_the_znodes_is_ignored_and_counted(
    zookeeper: str, zk_client: KazooClient, cluster: Any
) -> None:
    root = chroot(zookeeper)
    a = await cluster(zookeeper, "a")
    standby = await cluster(zookeeper, "sa", standby_for="a")
    b = await cluster(zookeeper, "b")
    await until(lambda: len(b.sees()) == 3, 5, "b sees everyone")

    def write_garbage() -> None:
        zk_client.create(f"{root}/rooms/x", b"\x00\xff not json")
        zk_client.create(f"{root}/rooms/wrong-types", json.dumps({"slot": 7, "epoch": "one"}).encode())
        zk_client.create(f"{root}/nodes/y", b'{"id": "y", ')
        zk_client.set(f"{root}/slots/a", b"[garbage]")

    await asyncio.to_thread(write_garbage)
    await until(lambda: "bad_znode" in b.errors, 5, "b counts the bad node znode")
    assert "y" not in b.sees() and len(b.sees()) == 3

    for room in ("x", "wrong-types"):
        assert await b.owner(room) == choose(room, ["a", "b"])
        assert await a.owner(room) == choose(room, ["a", "b"])
    data, _ = await asyncio.to_thread(zk_client.get, f"{root}/rooms/x")
    assert json.loads(data)["slot"] == choose("x", ["a", "b"])
    # Once per znode version: asking again about the same garbage does not count it again.
    counted = len(b.errors)
    await asyncio.to_thread(zk_client.set, f"{root}/nodes/y", b"still garbage")
    await until(lambda: len(b.errors) == counted + 1, 5, "b counts the new version of /nodes/y")
    await asyncio.sleep(0.2)
    assert len(b.errors) == counted + 1 and set(b.errors) == {"bad_znode"}

    # The fencing epoch still goes up past the garbage written over it.
    epoch = a.membership.epoch
    await a.membership.stop()
    await until(lambda: bool(standby.served), 2, "the standby serves")
    assert standby.membership.epoch > epoch
    assert "bad_znode" in standby.errors


async def test_a_single_node_serves_every_call_itself() -> None:
    me = NodeInfo(id="local", url="http://127.0.0.1:8080", media="127.0.0.1:40000", role="active")
    node = SingleNode(me)
    served: list[str] = []
    node.on_serving = served.append
    await node.start()
    assert served == ["local"] and node.serving() and node.epoch == 1
    assert (await node.owner("any")).id == "local"
    node.report({"b": 2, "a": 3})
    assert node.me().describe() == {
        "id": "local",
        "url": "http://127.0.0.1:8080",
        "media": "127.0.0.1:40000",
        "role": "active",
        "standby_for": None,
        "serves": "local",
        "rooms": ["a", "b"],
        "participants": 5,
        "room_participants": {"b": 2, "a": 3},
    }
    assert node.nodes() == [node.me()]
    await node.stop()
