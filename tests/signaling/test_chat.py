"""Chat and raised hands over signaling (docs/protocol.md, "chat", "hand"): to everyone in the call, kept for
late joiners, bounded, rate-limited, and stored beside a recording's files."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from huddle.calls.room import CHAT_HISTORY
from huddle.signaling.messages import MAX_CHAT_CHARS
from huddle.signaling.session import CHAT_BURST

from .conftest import Harness


async def test_a_message_reaches_everyone_with_the_senders_name_and_late_joiners_see_it(harness: Harness):
    ada, bob = await harness.connect(), await harness.connect()
    ada_id = (await ada.join("chat", "Ada"))["self"]["id"]
    await bob.join("chat", "Bob")
    await ada.send({"type": "chat", "text": "  hello <script>alert(1)</script>\n  second line\x07  "})
    for client in (ada, bob):  # the sender sees its own message come back, as everyone does
        message = (await client.expect("chat"))["message"]
        assert message["from"] == ada_id and message["name"] == "Ada"
        # Kept as text (pages show it as text), with its line break; control characters and blanks go.
        assert message["text"] == "hello <script>alert(1)</script>\n  second line"
        assert abs(message["at"] - time.time()) < 5
    late = await harness.connect()
    joined = await late.join("chat", "Cy")
    assert [m["text"] for m in joined["chat"]] == ["hello <script>alert(1)</script>\n  second line"]


async def test_bad_chat_gets_clear_errors_and_goes_to_nobody(harness: Harness):
    ada, bob = await harness.connect(), await harness.connect()
    await ada.send({"type": "chat", "text": "before joining"})
    assert (await ada.expect("error"))["code"] == "not_joined"
    await ada.join("bad-chat", "Ada")
    await bob.join("bad-chat", "Bob")
    for text in ("   \n\t ", "x" * (MAX_CHAT_CHARS + 1)):
        await ada.send({"type": "chat", "text": text, "id": "c"})
        error = await ada.expect("error")
        assert error["code"] == "bad_message" and error["id"] == "c"
    await ada.send({"type": "chat", "text": 42})
    assert (await ada.expect("error"))["code"] == "bad_message"
    await ada.send({"type": "chat", "text": "ok"})
    assert (await bob.expect("chat"))["message"]["text"] == "ok"  # nothing else came before it


async def test_a_chat_flood_is_cut_to_a_burst_and_the_history_is_bounded(harness: Harness):
    ada, bob = await harness.connect(), await harness.connect()
    await ada.join("flood", "Ada")
    await bob.join("flood", "Bob")
    for n in range(CHAT_BURST + 5):
        await ada.send({"type": "chat", "text": f"spam {n}", "id": n})
    codes: list[str] = []
    while len(codes) < CHAT_BURST + 5:
        reply = await ada.recv()
        if reply["type"] in ("chat", "error"):
            codes.append(reply["type"] if reply["type"] == "chat" else reply["code"])
    assert codes.count("chat") == CHAT_BURST and codes.count("rate_limited") == 5
    room = harness.node.calls.get("flood")
    for n in range(CHAT_HISTORY + 10):
        harness.node.calls.post_chat(room, next(iter(room)), f"old {n}")
    assert len(room.chat) == CHAT_HISTORY and room.chat[-1]["text"] == f"old {CHAT_HISTORY + 9}"


async def test_a_raised_hand_is_shown_to_the_others_and_lowered_again(harness: Harness):
    ada, bob = await harness.connect(), await harness.connect()
    ada_id = (await ada.join("hands", "Ada"))["self"]["id"]
    await bob.join("hands", "Bob")
    await ada.send({"type": "hand", "raised": True})
    update = (await bob.expect("participant_updated"))["participant"]
    assert update["id"] == ada_id and update["hand"] is True
    late = await harness.connect()
    joined = await late.join("hands", "Cy")
    assert [p["hand"] for p in joined["participants"] if p["id"] == ada_id] == [True]
    await ada.send({"type": "hand", "raised": False})
    assert (await bob.expect("participant_updated"))["participant"]["hand"] is False


async def test_a_recording_keeps_the_chat_beside_its_files(harness: Harness):
    ada, bob = await harness.connect(), await harness.connect()
    await ada.join("rec-chat", "Ada")
    await bob.join("rec-chat", "Bob")
    await ada.send({"type": "chat", "text": "not recorded"})
    await ada.send({"type": "start_recording", "id": 1, "outputs": ["tracks"]})
    await bob.expect("recording")
    await bob.send({"type": "chat", "text": "recorded"})
    await ada.expect("chat")
    await ada.send({"type": "stop_recording", "id": 2})
    stopped = (await ada.expect("recording"))["recording"]
    root = Path(harness.node.settings.recordings_dir) / "rec-chat" / stopped["id"]
    for _ in range(100):
        if (root / "chat.json").exists():
            break
        await asyncio.sleep(0.1)
    chat = json.loads((root / "chat.json").read_text())
    assert [(m["name"], m["text"]) for m in chat["messages"]] == [("Bob", "recorded")]
    assert 0 <= chat["messages"][0]["at"] < 10
