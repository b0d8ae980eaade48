"""Watching ``config.toml`` while a host runs: which keys apply live, and the poller.

What a caller can rely on:

* :data:`LIVE` keys are read by the daemon each time they are used, so a new value takes
  effect at once (for the next load, budget check, log line or notice); the host assigns
  them on its one live :class:`~luna_daemon.settings.Settings` object (one attribute
  assignment each -- atomic; every reader reads a field once per use).
* :data:`HOST_RESTART` keys are fixed for the life of the tray / ``serve`` process (its
  ports, folders, log file); every other key is read when the daemon starts and applies at
  the next daemon start (Stop + Start, or Restart). Both kinds, while they wait, are
  listed as ``restart_needed``.
* :class:`ConfigWatcher` polls the file's identity (mtime, size, inode) and calls
  ``on_change`` on its own thread once a change has been stable for one poll, so an editor
  still writing the file is not read half-way. A missing file is a state like any other
  (its removal and its re-creation are changes).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

LIVE = frozenset({
    "model_roots", "keep_alive", "max_model_bytes", "lora_cache_bytes", "log_level", "notifications",
    "vae_device", "clip_device", "vae_dtype", "clip_dtype",  # defaults of the next load
})
HOST_RESTART = frozenset({
    "host", "monitor_port", "lock_port", "config_dir", "log_dir", "state_dir", "allowed_origins",
    "instances",  # which daemons (threads / child processes) the host runs: fixed at its start
})
POLL_S = 0.5


def file_identity(path: str) -> tuple[int, int, int] | None:
    """(mtime_ns, size, inode) of ``path``, or None when it does not exist (or is unreadable)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def split_changes(live: Any, new: Any, daemon_running: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Compare two Settings: (apply now, wait for a restart) as {key: new value}.

    ``live`` holds what runs: keys that wait are never assigned on it, so a key edited
    back to its running value stops waiting."""
    apply_now: dict[str, Any] = {}
    waiting: dict[str, Any] = {}
    for key, value in new.public_dict().items():
        if getattr(live, key) == value:
            continue
        if key in HOST_RESTART:
            waiting[key] = value
        elif key in LIVE or not daemon_running:
            apply_now[key] = value
        else:
            waiting[key] = value
    return apply_now, waiting


class ConfigWatcher:
    """Calls ``on_change()`` (on thread ``luna-config-watch``) after ``path`` changed."""

    def __init__(self, path: str, on_change: Callable[[], None], interval: float = POLL_S):
        self.path = path
        self.on_change = on_change
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Taken here, when the host has just loaded the file: a change before start() counts.
        self._seen = file_identity(path)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="luna-config-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        t, self._thread = self._thread, None
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    def _loop(self) -> None:
        seen = last = self._seen
        while not self._stop.wait(self.interval):
            now = file_identity(self.path)
            # Act when the identity differs from what was handled AND did not move since
            # the previous poll: a file being written changes size/mtime between polls.
            if now != seen and now == last:
                seen = now
                try:
                    self.on_change()
                except Exception:  # never let a reload kill the watcher
                    log.exception("applying the changed config file %s failed", self.path)
            last = now
