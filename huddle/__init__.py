"""Huddle: self-hosted video calls."""

__version__ = "0.1.0"
