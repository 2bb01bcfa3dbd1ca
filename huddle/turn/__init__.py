"""The TURN relay (RFC 8656) on the node's STUN port: credentials, the peer policy, the allocation state
machine (sans-I/O) and its asyncio edge."""
