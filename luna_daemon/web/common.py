"""Small pieces shared by the monitor's HTTP routes and its WebSocket hub."""

from __future__ import annotations

import json
import logging
from typing import Any

from luna_daemon.logs import RateLimitedLog

log = logging.getLogger("luna_daemon.web.monitor")

PAGES = ("status", "models", "logs", "settings")


def to_json(obj: Any) -> str:
    """Every JSON the dashboard sends (values JSON cannot hold, e.g. paths, as text)."""
    return json.dumps(obj, default=str)


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, for a log record that must not carry a traceback."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__


def refusal_log() -> RateLimitedLog:
    """The log of what a page or a local program can trigger (refused requests, failed
    routes and messages): at most one line per kind every 10 s, with a count of the ones
    suppressed, so a hostile page retrying in a loop cannot flood the log file. The same
    limiter as the daemon's wire log, with a burst of one."""
    return RateLimitedLog(log, burst=1, per_minute=6.0)
