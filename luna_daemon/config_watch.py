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
* ``[[instances]]`` tables: adding, removing, renaming or reordering them, or editing a
  key of theirs that is not LIVE, is the HOST_RESTART key ``instances``; an edit of only
  LIVE keys in them (a table's ``keep_alive``) applies live, each instance taking its own
  table's values (:func:`split_instance_changes`). Every process that runs an instance
  watches the file: the host for the primary (and its view of the children), each child
  process (``serve --instance NAME``) for itself.
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
    "huge_pages",  # PyTorch fixes it at the process's first big tensor (hugepages.py)
})
POLL_S = 0.5


def file_identity(path: str) -> tuple[int, int, int] | None:
    """(mtime_ns, size, inode) of ``path``, or None when it does not exist (or is unreadable)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _fixed_part(tables: Any) -> list[Any]:
    """The ``instances`` tables without their LIVE keys: what only a host restart changes."""
    return [{k: v for k, v in t.items() if k not in LIVE} if isinstance(t, dict) else t for t in tables or ()]


def split_changes(live: Any, new: Any, daemon_running: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Compare two Settings: (apply now, wait for a restart) as {key: new value}.

    ``live`` holds what runs: keys that wait are never assigned on it, so a key edited
    back to its running value stops waiting. ``instances`` is applied (a new list of
    tables) when its tables differ in LIVE keys only, else it waits for a host restart."""
    apply_now: dict[str, Any] = {}
    waiting: dict[str, Any] = {}
    for key, value in new.public_dict().items():
        if getattr(live, key) == value:
            continue
        if key == "instances" and _fixed_part(live.instances) == _fixed_part(value):
            apply_now[key] = value  # each instance applies its own table's LIVE keys
        elif key in HOST_RESTART:
            waiting[key] = value
        elif key in LIVE or not daemon_running:
            apply_now[key] = value
        else:
            waiting[key] = value
    return apply_now, waiting


def split_instance_changes(live: Any, new: Any, name: str,
                           daemon_running: bool) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """:func:`split_changes` for one instance: ``live`` its running settings (an
    instances.InstanceSpec's), ``new`` a freshly loaded top-level Settings; compared with
    the spec that ``new`` gives instance ``name`` (top-level keys with its table's applied).
    The third item is that spec's ``sources`` (where each new value comes from).

    ``instances`` itself is left out (the host reports it; this instance's own keys are
    compared one by one). An instance that ``new`` no longer has: nothing applies and
    ``instances`` waits (the host process runs what it started with until it restarts)."""
    from luna_daemon.instances import instance_specs

    spec = next((s for s in instance_specs(new) if s.name == name), None)
    if spec is None:
        return {}, {"instances": new.instances}, {}
    apply_now, waiting = split_changes(live, spec.settings, daemon_running)
    apply_now.pop("instances", None)
    waiting.pop("instances", None)
    return apply_now, waiting, spec.settings.sources


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
