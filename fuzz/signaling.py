"""WebSocket text frames from clients (huddle/signaling/messages.py `decode`).

Documented error: ProtocolError only. The WebSocket layer hands over valid Unicode, so bytes that are not
UTF-8 are replaced rather than passed through as surrogates.
"""

from __future__ import annotations

from huddle.signaling import messages

MAX_LEN = 8192


def one_input(data: bytes) -> None:
    try:
        messages.decode(data.decode("utf-8", "replace"))
    except messages.ProtocolError:
        pass
