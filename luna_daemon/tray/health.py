"""The tray's health probes: when each instance is pinged, and the ping itself.

What a caller can rely on:

* :class:`ProbeThreads` runs one ``luna-tray-health-NAME`` thread per instance (at most
  16, ``instances.MAX_INSTANCES``). Each checks its instance every ``interval`` seconds
  and as soon as :meth:`ProbeThreads.want` is called, so an instance that hangs (a
  SIGSTOPped child accepts TCP and never answers) delays only its own probes, never the
  others'. A check of an instance never overlaps another check of it from these threads.
* :func:`ping` is one real supervisor-role ``ping`` (and optionally ``status``) over the
  socket; it never raises for a daemon that is down or hung, it answers why.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from luna_daemon.tray.menu import sharing_changes

log = logging.getLogger(__name__)

# The floor of the probe interval: a tiny health_interval must not spin the threads.
MIN_INTERVAL = 0.2


class ProbeThreads:
    """One thread per instance calling ``check(name, with_status)``.

    ``with_status`` is True for an instance's first check and for its first check after
    ``want(status=True)``: periodic ticks only ping (cheap, the health criterion); a
    status call -- counts and memory for the status line -- is added when something may
    have changed. The threads end once ``quit`` is set and they are woken (:meth:`want`)."""

    def __init__(self, names: Iterable[str], check: Callable[[str, bool], None], *,
                 interval: float, quit: threading.Event):
        self.names = tuple(names)
        self._check = check
        self._interval = max(MIN_INTERVAL, float(interval))
        self._quit = quit
        self._lock = threading.Lock()  # guards _status_wanted
        self._status_wanted = set(self.names)
        self._wake = {name: threading.Event() for name in self.names}
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for name in self.names:
            t = threading.Thread(target=self._loop, args=(name,), name=f"luna-tray-health-{name}", daemon=True)
            t.start()
            self.threads.append(t)

    def want(self, *, status: bool = False) -> None:
        """Check every instance now (an instance whose check is still running: right after it)."""
        if status:
            with self._lock:
                self._status_wanted.update(self.names)
        for wake in self._wake.values():
            wake.set()

    def _loop(self, name: str) -> None:
        wake = self._wake[name]
        while True:
            wake.wait(self._interval)
            wake.clear()
            if self._quit.is_set():
                return
            with self._lock:
                with_status = name in self._status_wanted
                self._status_wanted.discard(name)
            try:
                self._check(name, with_status)
            except Exception:  # a bug in one check must not end this instance's supervision
                log.exception("health check of instance %s failed", name)


@contextlib.contextmanager
def client(host: str, port: int, token: str | None, timeout: float, *, supervisor: bool = True) -> Iterator[Any]:
    """A short-lived DaemonClient, already pinged. ``supervisor``: its connection says so
    first (an authenticated hello), so the daemon keeps the tray's health probes out of its
    client count, request stats, events and log."""
    from luna_daemon.client import DaemonClient

    with DaemonClient(host, port, token=token, timeout=timeout, connect_timeout=min(timeout, 10.0),
                      supervisor=supervisor) as c:
        c.ping()
        yield c


def probe_timeout(health_interval: float) -> float:
    """How long one probe waits for each answer: 2 to 10 s, else the health interval."""
    return min(10.0, max(2.0, float(health_interval)))


def ping(host: str, port: int, token: str | None, timeout: float, *, with_status: bool) -> tuple[bool, Any]:
    """-> (True, the status answer, {} when not asked or it failed) or (False, the reason)."""
    from luna_daemon.client import DaemonError, DaemonUnavailable

    status: dict = {}
    try:
        with client(host, port, token, timeout) as c:  # pings on entry
            if with_status:
                try:
                    status = c.status()
                except DaemonError as exc:  # ping is the health criterion; status is detail
                    log.debug("status after a good ping failed: %s", exc)
    except (DaemonUnavailable, DaemonError, OSError) as exc:
        return False, getattr(exc, "message", None) or str(exc)
    return True, status


def status_changes(status: dict) -> dict:
    """InstanceState fields from a ``status`` answer: models, clients, memory, sharing."""
    mem = sum(int((d or {}).get("models_bytes") or 0) for d in (status.get("devices") or {}).values())
    return dict(models=int(status.get("models") or 0), clients=int(status.get("clients") or 0), memory_bytes=mem,
                **sharing_changes(status))
