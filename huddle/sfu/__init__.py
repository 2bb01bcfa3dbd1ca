"""Selective forwarding: Routers, Producers, Consumers (mediasoup's words), never decoding media."""
