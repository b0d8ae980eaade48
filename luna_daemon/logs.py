"""Logging setup: a rotating file in the user log dir, stderr, and an in-memory tail.

``setup_logging`` is called once by a host (``serve``, the tray); library code only
uses ``logging.getLogger(__name__)``. The :class:`LogTail` keeps the last lines with a
sequence number (``/api/logs?since=``) and, when given an event bus, publishes each
record as a ``log`` event for live viewers; each line names the ``instance`` it comes from (the host's own
lines: its primary instance; a child instance's lines, forwarded from its output by
the supervisor: that child). :class:`RateLimitedLog` bounds the lines that
a peer can cause (bad frames, refused requests), so that no local program can flood the
log and rotate the real one away.

Records of the libraries the daemon runs (ComfyUI's ``comfy`` logs to the root logger;
transformers, diffusers) are routed to the same handlers, and :func:`collect_warnings`
gathers the WARNING+ lines logged while one request is served, so that the service can
send them back to the caller (the ``warnings`` result key, docs/protocol.md).
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import itertools
import logging
import logging.handlers
import re
import threading
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# A line in FORMAT, as a child instance writes it to its stderr (LogTail.forward parses it).
_FORMATTED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+(\S+): (.*)$")
MAX_FORWARDED_CHARS = 4000  # one forwarded line (a child could print anything)
_installed: list[logging.Handler] = []

# Libraries the daemon runs that log outside ``luna_daemon``: ComfyUI's ``comfy`` logs
# through the root logger; transformers / diffusers / huggingface_hub have library loggers
# that stop propagation and print to stderr themselves, so the route handler is attached
# to each of them too (a record reaching two of them is routed once).
FOREIGN_LOGGERS = ("", "transformers", "diffusers", "huggingface_hub")
# What one request can carry back in its answer (``warnings``): a few short lines.
MAX_REQUEST_WARNINGS = 16
MAX_WARNING_CHARS = 500


def message_of(text: str) -> str:
    """A line in FORMAT without its time, level and logger; any other text as it is."""
    m = _FORMATTED.match(text)
    return m.group(3) if m else text


class LogTail(logging.Handler):
    """Ring buffer of formatted records; thread-safe; optional ``log`` events.

    Each line: ``seq``, ``level``, ``logger``, ``time``, ``message``, ``text`` and
    ``instance`` (``instance`` for this process's own records; :meth:`forward` adds a
    child instance's lines under the child's name)."""

    def __init__(self, capacity: int = 5000, events: Any = None, instance: str = "main"):
        super().__init__()
        self.instance = instance
        self.setFormatter(logging.Formatter(FORMAT))
        self._lines: collections.deque = collections.deque(maxlen=capacity)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._levels: dict[str, str] = {}  # per forwarded instance: its last record's level
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._local, "busy", False):
            return  # a subscriber logged while handling a log event: do not recurse
        try:
            line = {"level": record.levelname, "logger": record.name, "time": record.created,
                    "message": record.getMessage(), "text": self.format(record), "instance": self.instance}
        except Exception:
            self.handleError(record)
            return
        self._add(line)

    def forward(self, instance: str, text: str) -> dict:
        """Add one output line of the child process running ``instance`` (its log lines
        are in FORMAT; anything else -- a traceback line, a CLI message -- is kept as is,
        with the level of the child's previous record). Returns the line added."""
        text = text.rstrip("\r\n")[:MAX_FORWARDED_CHARS]
        m = _FORMATTED.match(text)
        if m:
            level, logger, message = m.groups()
            self._levels[instance] = level
        else:
            level, logger, message = self._levels.get(instance, "INFO"), "output", text
        return self._add({"level": level, "logger": logger, "time": time.time(), "message": message,
                          "text": text, "instance": instance})

    def _add(self, line: dict) -> dict:
        with self._lock:
            line["seq"] = next(self._seq)
            self._lines.append(line)
        if self.events is not None:
            self._local.busy = True
            try:
                self.events.emit("log", line=line)
            finally:
                self._local.busy = False
        return line

    def since(self, seq: int = 0, limit: int = 1000, instance: str | None = None) -> list[dict]:
        """The last ``limit`` lines after ``seq`` (oldest first), of ``instance`` only if given."""
        with self._lock:
            out = [line for line in self._lines
                   if line["seq"] > seq and (instance is None or line.get("instance") == instance)]
        return out[-limit:]

    def lines(self, since: int = 0, limit: int = 1000, instance: str | None = None) -> list[dict]:
        """:meth:`since` by another name (the multi-instance contract's)."""
        return self.since(since, limit, instance)


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

    def error(self, key: Hashable, msg: str, *args: Any) -> bool:
        return self.log(logging.ERROR, key, msg, *args)

    def exception(self, key: Hashable, msg: str, *args: Any) -> bool:
        """ERROR with the current exception's traceback (call from an ``except`` block)."""
        return self.log(logging.ERROR, key, msg, *args, exc_info=True)


def _key_text(key: Hashable) -> str:
    return " ".join(str(k) for k in key) if isinstance(key, tuple) else str(key)


# ----------------------------------------------------------------- foreign records

class _ForeignRoute(logging.Handler):
    """Hands records of other libraries (ComfyUI's root-logger lines, transformers...) to
    the ``luna_daemon`` handlers, so they reach the log file, the tail (dashboard) and
    stderr. Being a handler on the root logger also keeps ComfyUI's module-level
    ``logging.warning`` from calling ``basicConfig`` (a second stderr handler)."""

    def __init__(self, targets: list[logging.Handler]):
        super().__init__(logging.NOTSET)
        self.targets = targets

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "_luna_routed", False) or record.name.startswith("luna_daemon"):
            return
        record._luna_routed = True  # a library logger that also propagates: route once
        for h in self.targets:
            if record.levelno >= h.level:
                h.handle(record)


_route = _ForeignRoute([])


# ----------------------------------------------------------------- per-request warnings

_request_warnings: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("luna_request_warnings",
                                                                                    default=None)


class _RequestWarnings(logging.Handler):
    """Collects WARNING+ records, from any logger, into the current request's list (see
    :func:`collect_warnings`); outside a request it does nothing."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        sink = _request_warnings.get()
        if sink is None or getattr(record, "_luna_collected", None) is sink:
            return
        record._luna_collected = sink  # seen by the root and a library logger: once
        try:
            text = record.getMessage().strip()
        except Exception:  # noqa: BLE001 - a bad format string must not break the request
            text = str(record.msg)
        if len(text) > MAX_WARNING_CHARS:
            text = text[:MAX_WARNING_CHARS] + "..."
        if text and text not in sink and len(sink) < MAX_REQUEST_WARNINGS:
            sink.append(text)


_collector = _RequestWarnings()


def install_capture() -> None:
    """Attach the request-warning collector (and the foreign-record route) to the
    ``luna_daemon``, root and library loggers. Idempotent; :func:`setup_logging` and the
    service call it."""
    for name in ("luna_daemon", *FOREIGN_LOGGERS):
        logger = logging.getLogger(name)
        for h in (_collector, _route) if name != "luna_daemon" else (_collector,):
            if h not in logger.handlers:
                logger.addHandler(h)


@contextlib.contextmanager
def collect_warnings():
    """``with collect_warnings() as found:`` -- WARNING+ records logged in this context
    (this thread, and work run with :func:`contextvars.copy_context` from it, e.g. a
    model's executor thread) are appended to ``found`` as message strings: at most
    MAX_REQUEST_WARNINGS, each cut to MAX_WARNING_CHARS, duplicates dropped."""
    found: list[str] = []
    reset = _request_warnings.set(found)
    try:
        yield found
    finally:
        _request_warnings.reset(reset)


def instance_log_file(settings, name: str, primary: bool) -> Path:
    """The log file of an instance: the primary keeps ``luna-daemon.log``, a further
    instance (a child process) writes ``luna-daemon-<name>.log`` beside it."""
    return Path(settings.log_file) if primary else Path(settings.log_dir) / f"luna-daemon-{name}.log"


def setup_logging(settings, events: Any = None, *, stderr: bool = True, log_file: Path | str | None = None,
                  instance: str = "main") -> LogTail:
    """Install file + stderr + tail handlers on the ``luna_daemon`` logger, and route
    WARNING+ records of ComfyUI (root logger) and transformers / diffusers to them.
    ``log_file`` defaults to ``settings.log_file``; ``instance`` names this process's
    lines in the tail. Idempotent."""
    root = logging.getLogger("luna_daemon")
    for h in _installed:
        root.removeHandler(h)
        h.close()
    _installed.clear()
    root.setLevel(settings.log_level)
    root.propagate = False
    fmt = logging.Formatter(FORMAT)
    log_file = Path(log_file or settings.log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fh = logging.handlers.RotatingFileHandler(log_file, maxBytes=5 * 1024 * 1024, backupCount=3, encoding="utf-8")
    fh.setFormatter(fmt)
    tail = LogTail(events=events, instance=instance)
    handlers: list[logging.Handler] = [fh, tail]
    if stderr:
        sh = logging.StreamHandler()
        sh.setFormatter(fmt)
        handlers.append(sh)
    for h in handlers:
        root.addHandler(h)
        _installed.append(h)
    _route.targets = list(handlers)
    install_capture()
    return tail


def set_level(level: str) -> None:
    """Change the ``luna_daemon`` log level while running (``log_level`` applies live)."""
    logging.getLogger("luna_daemon").setLevel(level)
