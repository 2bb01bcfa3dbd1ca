"""Interop with a second WebRTC stack (aiortc) in one process, without sockets."""
