"""Logging setup: a rotating file in the user log dir, stderr, and an in-memory tail.

``setup_logging`` is called once by a host (``serve``, the tray); library code only
uses ``logging.getLogger(__name__)``. The :class:`LogTail` keeps the last lines with a
sequence number (``/api/logs?since=``) and, when given an event bus, publishes each
record as a ``log`` event for live viewers. :class:`RateLimitedLog` bounds the lines that
a peer can cause (bad frames, refused requests), so that no local program can flood the
log and rotate the real one away.
"""

from __future__ import annotations

import collections
import itertools
import logging
import logging.handlers
import threading
import time
from collections.abc import Callable, Hashable
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


class RateLimitedLog:
    """Log lines that outside input can trigger, rate-limited per key.

    Each key (a category such as ``"bad_frame"``, or a (category, peer host) pair) has a
    token bucket: ``burst`` lines at once, refilled at ``per_minute`` lines a minute.
    Lines over the limit are counted, not written; the next line of that key that passes
    is preceded by one "N similar messages suppressed" line. At most ``max_keys`` keys are
    kept (least recently used dropped, with their pending count), so neither the log nor
    this object can grow without bound. Thread-safe.
    """

    def __init__(self, logger: logging.Logger, *, burst: int = 10, per_minute: float = 6.0,
                 max_keys: int = 64, clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.burst = burst
        self.rate = per_minute / 60.0
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: collections.OrderedDict[Hashable, list] = collections.OrderedDict()  # key -> [tokens, last, suppressed]

    def _take(self, key: Hashable) -> int | None:
        """None: suppress this line; else the number of lines suppressed before it."""
        now = self._clock()
        with self._lock:
            b = self._buckets.get(key)
            if b is None:
                b = self._buckets[key] = [float(self.burst), now, 0]
                while len(self._buckets) > self.max_keys:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
                b[0] = min(float(self.burst), b[0] + (now - b[1]) * self.rate)
                b[1] = now
            if b[0] < 1.0:
                b[2] += 1
                return None
            b[0] -= 1.0
            suppressed, b[2] = b[2], 0
            return suppressed

    def log(self, level: int, key: Hashable, msg: str, *args: Any, exc_info: bool = False) -> bool:
        """Log ``msg % args`` at ``level`` unless ``key`` is over its limit; True if written."""
        if not self.logger.isEnabledFor(level):
            return False
        suppressed = self._take(key)
        if suppressed is None:
            return False
        if suppressed:
            self.logger.log(level, "%d similar messages (%s) suppressed", suppressed, _key_text(key))
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def info(self, key: Hashable, msg: str, *args: Any) -> bool:
        return self.log(logging.INFO, key, msg, *args)

    def warning(self, key: Hashable, msg: str, *args: Any) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def exception(self, key: Hashable, msg: str, *args: Any) -> bool:
        """ERROR with the current exception's traceback (call from an ``except`` block)."""
        return self.log(logging.ERROR, key, msg, *args, exc_info=True)


def _key_text(key: Hashable) -> str:
    return " ".join(str(k) for k in key) if isinstance(key, tuple) else str(key)


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
