"""A node that restarts (or takes over another's calls) seats its clients again from their signed resume
tokens: same ids, names and rooms, told `restored` so that they set up media afresh."""

from __future__ import annotations

import tempfile
from dataclasses import replace

import aiohttp

from huddle.config import Settings
from huddle.node import Node

from .conftest import Client


async def _node(settings: Settings) -> tuple[Node, str]:
    node = Node(settings)
    ports = await node.start()
    return node, f"http://127.0.0.1:{ports.http}"


async def _connect(http: aiohttp.ClientSession, base: str) -> Client:
    return Client(await http.ws_connect(base + "/ws"))


async def test_a_restarted_node_takes_its_clients_back_with_the_same_ids() -> None:
    settings = Settings(port=0, stun_port=0, media_port=0, recordings_dir=tempfile.mkdtemp("-recordings"))
    first, base = await _node(settings)
    port = int(base.rsplit(":", 1)[1])
    async with aiohttp.ClientSession() as http:
        ada, bob, cy = [await _connect(http, base) for _ in range(3)]
        joined = {}
        for name, client in (("Ada", ada), ("Bob", bob), ("Cy", cy)):
            joined[name] = await client.join("board", name)
        assert joined["Cy"]["mode"] == "sfu"
        await first.stop()
        for client in (ada, bob, cy):
            assert await client.closed() == 1012  # "come back": no one was told that anyone left

        second, base = await _node(replace(settings, port=port))
        try:
            back = {}
            for name, client in (("Ada", ada), ("Bob", bob)):
                client = await _connect(http, base)
                await client.send(
                    {
                        "type": "join",
                        "id": 1,
                        "room": "board",
                        "resume": joined[name]["resume_token"],
                        "mode": "sfu",
                    }
                )
                back[name] = (client, await client.expect("joined"))
            ada2, ada_back = back["Ada"]
            bob2, bob_back = back["Bob"]
            assert ada_back["self"]["id"] == joined["Ada"]["self"]["id"]
            assert ada_back["self"]["name"] == "Ada"
            assert ada_back["resumed"] is True and ada_back["restored"] is True
            # Straight back on the SFU, not through a p2p detour while people come back one by one.
            assert ada_back["mode"] == "sfu" and bob_back["mode"] == "sfu"
            assert [p["id"] for p in bob_back["participants"]] == [joined["Ada"]["self"]["id"]]
            seen = await ada2.expect("participant_joined")
            assert seen["participant"]["id"] == joined["Bob"]["self"]["id"]
            assert bob_back["doors"][0].startswith(f"ws://127.0.0.1:{port}/ws")

            # Used once: the token Ada came back with is spent; her new one works.
            thief = await _connect(http, base)
            await thief.send(
                {"type": "join", "id": 2, "room": "board", "resume": joined["Ada"]["resume_token"]}
            )
            assert (await thief.expect("error"))["code"] == "resume_failed"

            # Someone who left for good cannot be brought back with an old token on this node.
            await bob2.send({"type": "leave"})
            await bob2.closed()
            again = await _connect(http, base)
            await again.send({"type": "join", "id": 3, "room": "board", "resume": bob_back["resume_token"]})
            assert (await again.expect("error"))["code"] == "resume_failed"
        finally:
            await second.stop()


async def test_a_token_from_another_deployment_is_refused() -> None:
    one = Settings(port=0, stun_port=0, media_port=0, recordings_dir=tempfile.mkdtemp("-recordings"))
    other = replace(one, recordings_dir=tempfile.mkdtemp("-recordings"))
    first, base_one = await _node(one)
    second, base_other = await _node(other)
    try:
        async with aiohttp.ClientSession() as http:
            ada = await _connect(http, base_one)
            token = (await ada.join("board", "Ada"))["resume_token"]
            elsewhere = await _connect(http, base_other)
            await elsewhere.send({"type": "join", "id": 1, "room": "board", "resume": token})
            assert (await elsewhere.expect("error"))["code"] == "resume_failed"
            assert (await _cluster(http, base_other))["nodes"][0]["rooms"] == []
    finally:
        await first.stop()
        await second.stop()


async def _cluster(http: aiohttp.ClientSession, base: str) -> dict:
    async with http.get(base + "/api/cluster") as resp:
        assert resp.status == 200
        return await resp.json()
