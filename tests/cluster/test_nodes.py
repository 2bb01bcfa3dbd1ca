"""Real `huddle serve` nodes in a ZooKeeper cluster, driven over signaling as clients drive them: placement by
chat id through any door, graceful hand-over to a standby, kill -9 failover, fencing of a node cut off from
ZooKeeper, a ZooKeeper restart under running calls, and bad input at start and in the znodes.

Open rooms (no --secret): the nodes share the key that signs resume tokens through ZooKeeper, so a token from
one node is taken by any other.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kazoo.client import KazooClient
from prometheus_client.parser import text_string_to_metric_families

from huddle.cluster.placement import choose
from tests.cluster.nodes import (
    SESSION_TIMEOUT,
    JoinFailed,
    Node,
    NodeExited,
    Nodes,
    Participant,
    client_session,
    cluster_view,
    launch,
    ready,
    until,
)
from tests.cluster.zookeeper_server import Relay, free_port

# Long enough that a participant whose socket closed keeps its place through every test's takeover.
ARGS = ("--reconnect-grace", "30")


@pytest.fixture
def nodes(tmp_path: Path, zookeeper: str) -> Iterator[Nodes]:
    started = Nodes(tmp_path, zookeeper, ARGS)
    yield started
    started.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with client_session() as session:
        yield session


async def rooms_shown(http: aiohttp.ClientSession, door: Node) -> dict[str, dict[str, int]]:
    """Node id -> {room: participants} as /api/cluster at `door` shows them."""
    view = await cluster_view(http, door)
    return {n["id"]: n["room_participants"] for n in view["nodes"]}


async def test_calls_land_where_the_hashing_says_through_any_door_and_a_new_node_takes_only_new_calls(
    nodes: Nodes, http: aiohttp.ClientSession
):
    started = await asyncio.gather(*(nodes.start_async(i) for i in ("a", "b", "c")))
    doors = [n.ws for n in started]
    pick = random.Random(11)

    async def all_live(count: int) -> bool:
        view = await cluster_view(http, started[0])
        return len([n for n in view["nodes"] if n["role"] == "active"]) == count

    await until("three active nodes", lambda: all_live(3), 10)
    rooms = [f"chat-{i}" for i in range(30)]
    people: list[Participant] = []
    want: dict[str, dict[str, int]] = {"a": {}, "b": {}, "c": {}}
    for i, room in enumerate(rooms):
        # One or two people per call, each through a door of its own: the counts tell the calls apart.
        for _ in range(1 + i % 2):
            person = Participant(http, room)
            await person.join(pick.choice(doors))
            people.append(person)
            owner = choose(room, ["a", "b", "c"])
            assert person.node == owner, (room, person.door, owner)
            want[owner][room] = want[owner].get(room, 0) + 1
    assert all(want.values()), want  # every node got calls
    for door in started:

        async def placed(door: Node = door) -> bool:
            return await rooms_shown(http, door) == want

        await until(f"/api/cluster at {door.id} shows every call on its node", placed, 5)

    d = await nodes.start_async("d")
    await until("four active nodes", lambda: all_live(4), 10)
    # Live calls stay where they are: a latecomer through any door (d's too) lands on the call's node.
    for room in rooms:
        person = Participant(http, room)
        await person.join(pick.choice([*doors, d.ws]))
        people.append(person)
        assert person.node == choose(room, ["a", "b", "c"]), room
    # New calls are placed over the four.
    fresh = [f"new-{i}" for i in range(40)]
    landed = {"a": 0, "b": 0, "c": 0, "d": 0}
    for room in fresh:
        person = Participant(http, room)
        await person.join(pick.choice([*doors, d.ws]))
        people.append(person)
        assert person.node == choose(room, ["a", "b", "c", "d"]), room
        landed[person.node] += 1
    print(f"\n40 new calls over four nodes: {landed}")
    assert 6 <= landed["d"] <= 16  # about a quarter
    for person in people:
        await person.leave()


def rooms_of(slot: str, slots: list[str], count: int, prefix: str = "call") -> list[str]:
    """`count` room names that the hashing places on `slot`."""
    names = (f"{prefix}-{i}" for i in range(10_000))
    return [
        name for name, _ in zip((n for n in names if choose(n, slots) == slot), range(count), strict=False)
    ]


async def seat(http: aiohttp.ClientSession, room: str, doors: list[str], count: int) -> list[Participant]:
    """`count` participants of one call, each through the next door."""
    people = []
    for i in range(count):
        person = Participant(http, room, name=f"P{i}")
        await person.join(doors[i % len(doors)])
        people.append(person)
    return people


def known(person: Participant) -> set[str]:
    """The other participants this client knows of: those `joined` listed and those who arrived since."""
    return {p["id"] for p in person.joined["participants"]} | {
        m["participant"]["id"] for m in person.heard("participant_joined")
    }


async def test_a_graceful_stop_hands_the_calls_to_the_standby_with_everyone_in_them(
    nodes: Nodes, http: aiohttp.ClientSession
):
    a, b = await asyncio.gather(nodes.start_async("a"), nodes.start_async("b"))
    sa = await nodes.start_async("sa", standby_for="a")
    room = rooms_of("a", ["a", "b"], 1)[0]
    other = rooms_of("b", ["a", "b"], 1)[0]
    # Through every door, the standby's included: all three end up on a.
    people = await seat(http, room, [b.ws, sa.ws, a.ws], 3)
    assert {p.node for p in people} == {"a"}
    ids = {p.id for p in people}
    bystander = (await seat(http, other, [a.ws], 1))[0]
    assert bystander.node == "b"

    a.terminate()
    begin = time.monotonic()
    codes = await asyncio.gather(*(p.wait_closed(5) for p in people))
    assert codes == [1012] * 3
    rejoined = await asyncio.gather(*(p.resume(avoid="a") for p in people))
    took = time.monotonic() - begin
    print(f"\nSIGTERM of a -> its 3 participants seated on its standby: {took:.2f} s")
    assert a.wait(10) == 0, a.stderr()[-2000:]
    for person, joined in zip(people, rejoined, strict=True):
        assert joined["resumed"] is True and joined["restored"] is True
        assert person.node == "sa"
    assert {p.id for p in people} == ids

    # Everyone sees everyone again, and nobody was told that anyone left.
    async def reunited() -> bool:
        return all(known(p) == ids - {p.id} for p in people)

    await until("everyone knows the other two", reunited, 5)
    assert not any(p.heard("participant_left") for p in [*people, bystander])

    async def on_standby() -> bool:
        return (await rooms_shown(http, b)).get("sa") == {room: 3}

    await until("/api/cluster shows the call on the standby", on_standby, 5)
    view = {n["id"]: n for n in (await cluster_view(http, b))["nodes"]}
    assert view["sa"]["role"] == "active" and view["sa"]["serves"] == "a" and "a" not in view
    # The other node's call never noticed.
    await bystander.ping()
    assert bystander.closed is None and bystander.heard("participant_left") == []
    # A newcomer through any door reaches the call on the standby.
    late = (await seat(http, room, [b.ws], 1))[0]
    assert late.node == "sa" and len(late.joined["participants"]) == 3
    for person in [*people, bystander, late]:
        await person.leave()


async def test_kill_9_of_an_active_its_participants_are_back_on_the_standby_within_3_s(
    nodes: Nodes, http: aiohttp.ClientSession
):
    a, b = await asyncio.gather(nodes.start_async("a"), nodes.start_async("b"))
    sa = await nodes.start_async("sa", standby_for="a")
    calls = rooms_of("a", ["a", "b"], 2)
    people = [p for room in calls for p in await seat(http, room, [b.ws, a.ws, sa.ws], 3)]
    assert {p.node for p in people} == {"a"}
    ids = {p.id for p in people}
    # The doors each was given: its node first, then the others (it must survive its node).
    assert all(p.doors[0] == a.ws and set(p.doors) == {a.ws, b.ws, sa.ws} for p in people)

    a.kill()
    killed = time.monotonic()

    async def back(person: Participant) -> float:
        await person.wait_closed(5)
        joined = await person.resume(avoid="a", timeout=10)
        assert joined["resumed"] is True and joined["restored"] is True, joined
        return time.monotonic() - killed

    times = await asyncio.gather(*(back(p) for p in people))
    shown = ", ".join(f"{t:.2f}" for t in times)
    print(f"\nkill -9 of a -> joined on its standby, per participant (s): {shown}")
    assert {p.node for p in people} == {"sa"} and {p.id for p in people} == ids
    assert max(times) < 3.0, times
    assert not any(p.heard("participant_left") for p in people)
    for person in people:
        await person.leave()


async def test_a_node_cut_off_from_zookeeper_drops_its_calls_before_its_standby_serves_and_stays_standby(
    tmp_path: Path, zookeeper: str, shared_zookeeper: Any, http: aiohttp.ClientSession
):
    relay = Relay(shared_zookeeper)
    nodes = Nodes(tmp_path, zookeeper, ARGS)
    try:
        chroot = zookeeper[zookeeper.index("/") :]
        a = await nodes.start_async("a", zookeeper=relay.hosts + chroot)
        b = await nodes.start_async("b")
        sa = await nodes.start_async("sa", standby_for="a")
        room = rooms_of("a", ["a", "b"], 1)[0]
        people = await seat(http, room, [b.ws, sa.ws, a.ws], 3)
        assert {p.node for p in people} == {"a"}

        relay.pause()
        begin = time.monotonic()
        closed: list[float] = []

        async def close(person: Participant) -> int:
            code = await person.wait_closed(SESSION_TIMEOUT + 3)
            closed.append(time.monotonic() - begin)
            return code

        async def standby_serves() -> float:
            async def serves() -> bool:
                me = next(n for n in (await cluster_view(http, sa))["nodes"] if n["id"] == "sa")
                return me["role"] == "active"

            await until("the standby serves", serves, SESSION_TIMEOUT + 5, interval=0.02)
            return time.monotonic() - begin

        codes, took_over = await asyncio.gather(asyncio.gather(*(close(p) for p in people)), standby_serves())
        print(
            f"\na cut off from ZooKeeper: its clients closed after {max(closed):.2f} s, "
            f"its standby served after {took_over:.2f} s"
        )
        assert codes == [1012] * 3
        # No split brain: a stopped before sa started, and within its session timeout.
        assert max(closed) < took_over and max(closed) < SESSION_TIMEOUT + 0.3
        for person in people:
            joined = await person.resume(avoid="a")
            assert joined["restored"] is True and person.node == "sa"

        relay.resume()

        async def a_is_standby() -> bool:
            view = {n["id"]: n for n in (await cluster_view(http, sa))["nodes"]}
            return "a" in view and view["a"]["role"] == "standby" and view["a"]["standby_for"] == "a"

        await until("a back in the cluster as a standby", a_is_standby, 10)

        async def a_holds_nothing() -> bool:
            # Its own view too; the calls it dropped leave it with its next load report (within 1 s).
            me = next(n for n in (await cluster_view(http, a))["nodes"] if n["id"] == "a")
            return me["role"] == "standby" and me["rooms"] == []

        await until("a shows no call", a_holds_nothing, 2)
        # A join at a is sent to the call's node now; a itself serves nothing.
        late = Participant(http, room)
        await late.join(a.ws)
        assert late.redirects == ["sa"] and late.node == "sa"
        assert len(late.joined["participants"]) == 3
        await people[0].ping()
        for person in [*people, late]:
            await person.leave()
    finally:
        nodes.close()
        relay.stop()


async def test_calls_go_on_while_zookeeper_restarts(
    tmp_path: Path, zookeeper_server: Any, http: aiohttp.ClientSession
):
    nodes = Nodes(tmp_path, f"{zookeeper_server.hosts}/huddle", ARGS)
    try:
        a, b = await asyncio.gather(
            nodes.start_async("a", session_timeout=6.0), nodes.start_async("b", session_timeout=6.0)
        )
        calls = {slot: rooms_of(slot, ["a", "b"], 1)[0] for slot in ("a", "b")}
        people = [p for room in calls.values() for p in await seat(http, room, [a.ws, b.ws], 2)]
        ids = [p.id for p in people]
        want = {slot: {room: 2} for slot, room in calls.items()}

        shown: dict[str, Any] = {}

        async def listed() -> bool:
            shown.update(a=await rooms_shown(http, a), b=await rooms_shown(http, b))
            return shown["a"] == want and shown["b"] == want

        await until("both calls in /api/cluster", listed, 5)
        begin = time.monotonic()
        # Killed, then started 2 s later (as a restart of its machine's service would take): the connections
        # are reset at once, while the sessions live on for their 6 s.
        await asyncio.to_thread(zookeeper_server.restart, 2.0)
        print(f"\nZooKeeper down for {time.monotonic() - begin:.2f} s")
        for person in people:
            await person.ping()
            assert person.closed is None
        assert [p.id for p in people] == ids
        assert not any(p.heard("participant_left") for p in people)
        # New calls are placed again once the nodes are back in touch (meanwhile a door answers try_again, on
        # which clients retry).
        fresh = Participant(http, "after-restart")

        async def placed() -> bool:
            try:
                await fresh.join(b.ws)
            except JoinFailed as exc:
                assert exc.code == "try_again", exc
                return False
            return True

        await until("a new call placed", placed, 10, interval=0.2)
        print(f"a new call placed {time.monotonic() - begin:.2f} s after the kill")
        assert fresh.node == choose("after-restart", ["a", "b"])
        # What each node tells ZooKeeper reaches the others again: every door lists every call.
        want[fresh.node]["after-restart"] = 1
        try:
            await until("the three calls in /api/cluster at both doors", listed, 5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: want {want}, the doors listed {shown}") from None
        for person in [*people, fresh]:
            await person.leave()
    finally:
        nodes.close()


def test_a_node_that_cannot_reach_zookeeper_exits_naming_the_address(tmp_path: Path):
    port = free_port()
    begin = time.monotonic()
    node = launch(tmp_path, f"127.0.0.1:{port}", "a", args=ARGS)
    with pytest.raises(NodeExited):
        ready(node, timeout=SESSION_TIMEOUT + 5)
    took = time.monotonic() - begin
    print(f"\nunreachable ZooKeeper: huddle serve exited {node.proc.returncode} after {took:.2f} s")
    assert node.proc.returncode not in (0, None)
    assert took < SESSION_TIMEOUT + 2.0
    errors = node.stderr()
    assert f"cannot reach ZooKeeper at 127.0.0.1:{port}" in errors, errors
    assert "Traceback" not in errors, errors


def test_a_second_node_with_a_live_id_and_a_standby_of_a_standby_are_refused(nodes: Nodes):
    nodes.start("a")
    nodes.start("sa", standby_for="a")
    twin = launch(nodes.directory / "twin", nodes.zookeeper, "a", args=ARGS)
    with pytest.raises(NodeExited):
        ready(twin, timeout=SESSION_TIMEOUT + 6)
    assert twin.proc.returncode not in (0, None)
    assert "another live node has --node-id a" in twin.stderr(), twin.stderr()
    chain = launch(nodes.directory, nodes.zookeeper, "ssa", standby_for="sa", args=ARGS)
    with pytest.raises(NodeExited):
        ready(chain, timeout=10)
    assert chain.proc.returncode not in (0, None)
    assert "sa is itself a standby" in chain.stderr(), chain.stderr()
    for refused in (twin, chain):
        assert "Traceback" not in refused.stderr(), refused.stderr()
    # The first a never noticed.
    assert nodes["a"].alive() and nodes["sa"].alive()


async def bad_znodes(http: aiohttp.ClientSession, node: Node) -> float:
    async with http.get(node.base + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "huddle_errors_total" and sample.labels.get("kind") == "bad_znode"
    )


async def test_garbage_in_the_znodes_is_ignored_and_counted(
    nodes: Nodes, zookeeper: str, http: aiohttp.ClientSession
):
    a, b = await asyncio.gather(nodes.start_async("a"), nodes.start_async("b"))
    room = "garbled"
    client = KazooClient(hosts=zookeeper)
    await asyncio.to_thread(client.start, 10)
    try:
        await asyncio.to_thread(client.create, f"/rooms/{room}", b"\xff\x00 not json")
        await asyncio.to_thread(client.create, "/nodes/junk", b'{"id": "junk", ')
    finally:
        await asyncio.to_thread(client.stop)
        await asyncio.to_thread(client.close)

    async def counted() -> bool:
        return await bad_znodes(http, a) >= 1 and await bad_znodes(http, b) >= 1

    # Every node watches /nodes: each one sees the junk there.
    await until("huddle_errors_total{kind=bad_znode} counts the junk node", counted, 5)
    view = await cluster_view(http, a)
    assert [n["id"] for n in view["nodes"]] == ["a", "b"]
    # The garbled placement is replaced: the call starts where the hashing says, through either door.
    for door in (b, a):
        person = Participant(http, room)
        await person.join(door.ws)
        assert person.node == choose(room, ["a", "b"])
        await person.leave()
    assert await bad_znodes(http, a) + await bad_znodes(http, b) >= 3
    # Logged with the znode's path, for the operator to clean up.
    logs = a.stderr() + b.stderr()
    assert "not what Huddle writes" in logs and f"/rooms/{room}" in logs and "/nodes/junk" in logs
