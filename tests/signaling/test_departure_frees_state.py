"""A participant who leaves takes its SFU state with it at once, not at the next full garbage collection.

Python frees an object when its last reference goes, except objects that refer to each other in a loop: those
wait for the cyclic collector, whose full passes a busy node runs rarely. `make soak` showed each departure
holding about 1.3 MB (its Peer, transports, OpenSSL objects and its consumers' packet caches) that way, so the
node's memory grew with churn. With the collector off, nothing of a departed participant may stay alive.
"""

from __future__ import annotations

import gc
import weakref

import pytest

from huddle.config import Settings
from tests.signaling.conftest import Harness
from tests.signaling.test_offer_limits import chromium_like_answer, publish_message


@pytest.fixture
def settings() -> Settings:
    return Settings(reconnect_grace=0, sfu_always=True)


async def test_a_participant_who_leaves_is_freed_without_the_cyclic_collector(harness: Harness) -> None:
    ada = await harness.connect()
    await ada.join("free", "Ada")
    bob = await harness.connect()
    await bob.join("free", "Bob")
    await bob.send(publish_message("bob"))
    await bob.expect("sfu_answer")
    offer = await ada.expect("sfu_offer")
    # Ada takes Bob's tracks, as a browser would: her consumers of them are then in use.
    await ada.send(
        {
            "type": "sfu_answer",
            "pc": "subscribe",
            "sdp": chromium_like_answer(offer["sdp"]),
            "revision": offer["revision"],
        }
    )
    room = harness.node.calls.get("free")
    assert room is not None and room.router is not None
    [bob_id] = [pid for pid, p in room.participants.items() if p.name == "Bob"]
    peer = room.router.peers[bob_id]
    assert peer.publish is not None and len(peer.producers) == 2
    gone = {"peer": weakref.ref(peer), "transport": weakref.ref(peer.publish)}
    del peer

    gc.collect()
    gc.disable()
    try:
        await bob.send({"type": "leave"})
        await ada.expect("participant_left")
        await bob.ws.close()
        assert gone["peer"]() is None, "the departed participant's Peer waits for the cyclic collector"
        assert gone["transport"]() is None, "its transport (and OpenSSL objects) wait for the collector"
        [viewer] = room.router.peers.values()
        assert viewer.consumers == {}
    finally:
        gc.enable()
