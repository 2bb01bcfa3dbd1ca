"""Structured logs: one JSON object per line on stderr, so that machines and people can both read them."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    # Only our own loggers follow --log-level; libraries stay at warning so that debug is still readable.
    logging.getLogger("huddle").setLevel(level.upper())
    # aiohttp logs every access at info; a call page polls nothing, but keep it quiet by default anyway.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def event(logger: logging.Logger, level: int, msg: str, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, msg, extra={"fields": fields})


class RateLimit(logging.Filter):
    """Lets through at most one record per `interval` seconds of those whose message starts with `prefix`.

    Meant for a logger that a library floods: asyncio logs "socket.accept() out of system resource", with a
    traceback, for every attempt while the process is out of file descriptors, which is thousands a second.
    The record that gets through is shortened to its first line and the error, and says how many were
    suppressed since the last one; `on_match` is called for every matching record, suppressed or not.
    """

    def __init__(
        self, prefix: str, *, interval: float = 1.0, on_match: Callable[[], None] | None = None
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.interval = interval
        self.on_match = on_match
        self._last = -interval
        self._suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str) or not record.msg.startswith(self.prefix):
            return True
        if self.on_match is not None:
            self.on_match()
        now = time.monotonic()
        if now - self._last < self.interval:
            self._suppressed += 1
            return False
        error = record.exc_info[1] if record.exc_info else None
        record.msg, record.args = self.prefix, None
        record.exc_info = record.exc_text = None
        record.fields = {"error": str(error) if error is not None else None, "suppressed": self._suppressed}
        self._last = now
        self._suppressed = 0
        return True
