"""Signaling: the aiohttp app, the WebSocket protocol, join tokens."""
