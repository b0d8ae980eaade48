"""Logging setup: a rotating file in the user log dir, stderr, and an in-memory tail.

``setup_logging`` is called once by a host (``serve``, the tray); library code only
uses ``logging.getLogger(__name__)``. The :class:`LogTail` keeps the last lines with a
sequence number (``/api/logs?since=``) and, when given an event bus, publishes each
record as a ``log`` event for live viewers.
"""

from __future__ import annotations

import collections
import itertools
import logging
import logging.handlers
import threading
from pathlib import Path
from typing import Any

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_installed: list[logging.Handler] = []


class LogTail(logging.Handler):
    """Ring buffer of formatted records; thread-safe; optional ``log`` events."""

    def __init__(self, capacity: int = 5000, events: Any = None):
        super().__init__()
        self.setFormatter(logging.Formatter(FORMAT))
        self._lines: collections.deque = collections.deque(maxlen=capacity)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._local = threading.local()
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._local, "busy", False):
            return  # a subscriber logged while handling a log event: do not recurse
        try:
            line = {"level": record.levelname, "logger": record.name, "time": record.created,
                    "message": record.getMessage(), "text": self.format(record)}
        except Exception:
            self.handleError(record)
            return
        with self._lock:
            line["seq"] = next(self._seq)
            self._lines.append(line)
        if self.events is not None:
            self._local.busy = True
            try:
                self.events.emit("log", line=line)
            finally:
                self._local.busy = False

    def since(self, seq: int = 0, limit: int = 1000) -> list[dict]:
        with self._lock:
            out = [line for line in self._lines if line["seq"] > seq]
        return out[-limit:]


def setup_logging(settings, events: Any = None, *, stderr: bool = True) -> LogTail:
    """Install file + stderr + tail handlers on the ``luna_daemon`` logger. Idempotent."""
    root = logging.getLogger("luna_daemon")
    for h in _installed:
        root.removeHandler(h)
        h.close()
    _installed.clear()
    root.setLevel(settings.log_level)
    root.propagate = False
    fmt = logging.Formatter(FORMAT)
    log_file = Path(settings.log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fh = logging.handlers.RotatingFileHandler(log_file, maxBytes=5 * 1024 * 1024, backupCount=3, encoding="utf-8")
    fh.setFormatter(fmt)
    tail = LogTail(events=events)
    handlers: list[logging.Handler] = [fh, tail]
    if stderr:
        sh = logging.StreamHandler()
        sh.setFormatter(fmt)
        handlers.append(sh)
    for h in handlers:
        root.addHandler(h)
        _installed.append(h)
    return tail
