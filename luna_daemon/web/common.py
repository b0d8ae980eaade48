"""Small pieces shared by the monitor's HTTP routes and its WebSocket hub."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

log = logging.getLogger("luna_daemon.web.monitor")

PAGES = ("status", "models", "logs", "settings")


def to_json(obj: Any) -> str:
    """Every JSON the dashboard sends (values JSON cannot hold, e.g. paths, as text)."""
    return json.dumps(obj, default=str)


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, for a log record that must not carry a traceback."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__


class Throttle:
    """Log a kind of message at most once per ``interval`` seconds (with a count of the
    suppressed ones), so a hostile page retrying in a loop cannot flood the log file."""

    def __init__(self, interval: float = 10.0):
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def log(self, level: int, kind: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -1e9) < self.interval:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return
            self._last[kind] = now
            n = self._suppressed.pop(kind, 0)
        log.log(level, msg + (f" ({n} more like this suppressed)" if n else ""), *args)

    def warning(self, kind: str, msg: str, *args: Any) -> None:
        self.log(logging.WARNING, kind, msg, *args)

    def error(self, kind: str, msg: str, *args: Any) -> None:
        self.log(logging.ERROR, kind, msg, *args)
