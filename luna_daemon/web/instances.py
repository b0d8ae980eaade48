"""The host's daemon instances as the dashboard and ``/metrics`` see them.

A host runs its primary instance in-process (``host.daemon``) and every further instance
as a supervised child process (``host.instances``, issue 14). The primary's numbers are
read from its live objects; a child's come from its ``status`` answer, which the
supervisor's heartbeat already fetches every ``health_interval``
(:meth:`~luna_daemon.supervisor.ChildInstance.last_status`; not asked a second time), and
its ``ps`` answer (the model list), which :class:`ChildPoller` fetches in the background
through a supervisor connection (kept out of the child's request stats and events).

What a caller can rely on:

* :func:`instance_items` is never empty: a host without ``instances`` (or with only the
  primary) is one instance named after the primary daemon (``"main"``).
* :meth:`ChildPoller.get` never blocks on a child and never raises: it returns the last
  good answer (kept while the child is stopped or unreachable, so counters stay
  visible), at most ``health_interval`` old while the child is running and answering.
  A dead or hung child costs the poller thread a bounded timeout, never a page or a
  scrape.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("luna_daemon.web.monitor")

# Seconds one ps fetch from a child may take (connect and answer). Bounded so a hung
# child delays only the next refresh of the other children, by at most this much.
FETCH_TIMEOUT = 2.0


def primary_name(host: Any) -> str:
    return getattr(host.daemon, "name", None) or "main"


def instance_items(host: Any) -> list[tuple[str, Any]]:
    """``(name, instance)`` in config order, primary first; never empty."""
    insts = getattr(host, "instances", None)
    if isinstance(insts, dict) and insts:
        return list(insts.items())
    return [(primary_name(host), host.daemon)]


def is_primary(host: Any, inst: Any) -> bool:
    return inst is host.daemon


def find(host: Any, name: Any) -> tuple[str, Any]:
    """The instance called ``name``; ValueError naming the configured ones otherwise."""
    items = instance_items(host)
    for n, inst in items:
        if n == name:
            return n, inst
    shown = repr(name)[:80] if isinstance(name, str) else f"a {type(name).__name__}"
    raise ValueError(f"no instance named {shown}; configured: {', '.join(n for n, _ in items)}")


def overall_state(host: Any) -> str:
    fn = getattr(host, "overall_state", None)
    return fn() if callable(fn) else host.daemon.state


def log_file_of(host: Any, name: str, inst: Any) -> str:
    """The log file of one instance (logs.instance_log_file: the host's own for the
    primary, ``luna-daemon-<name>.log`` beside it for a child)."""
    from luna_daemon.logs import instance_log_file

    return str(instance_log_file(host.settings, name, is_primary(host, inst)))


class ChildPoller:
    """Every child instance's last ``status`` (the supervisor's heartbeat answer) and
    ``ps`` (fetched here, in the background) answers, cached for pages and scrapes."""

    def __init__(self, host: Any, interval: float | None = None):
        self.host = host
        self.interval = max(0.2, float(interval if interval is not None else host.settings.health_interval))
        self._cache: dict[str, dict[str, Any]] = {}
        self._clients: dict[str, tuple[tuple[str, int], Any]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def children(self) -> list[tuple[str, Any]]:
        return [(n, i) for n, i in instance_items(self.host) if not is_primary(self.host, i)]

    def start(self) -> None:
        """Start the poller thread (none when the host has no children)."""
        if self._thread is not None or not self.children():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="luna-monitor-children", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = FETCH_TIMEOUT + 1.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for _, c in clients:
            c.close()

    def poke(self) -> None:
        """Refresh soon (a child changed state); never blocks."""
        self._wake.set()

    def get(self, name: str) -> dict[str, Any] | None:
        """``{"status": {...}, "time": t, "models": [...], "models_time": t2}``, or None
        before the child's first heartbeat answer. ``status`` is the supervisor's last
        heartbeat answer (``ChildInstance.last_status``, read now: at most one
        ``health_interval`` old while the child runs and answers) and ``time``
        (``time.time()``) when it arrived; ``models`` the last good ``ps`` this poller
        fetched and ``models_time`` when (``[]`` and None until one arrived). Both are
        kept while the child is stopped or unreachable (counters stay visible)."""
        inst = next((i for n, i in self.children() if n == name), None)
        last = None
        if inst is not None and getattr(inst, "state", None) == "running":
            fn = getattr(inst, "last_status", None)
            last = fn() if callable(fn) else None
        with self._lock:
            entry = self._cache.get(name)
            if last is not None and isinstance(last[0], dict):
                entry = self._cache[name] = {"models": [], "models_time": None, **(entry or {}),
                                             "status": last[0], "time": last[1]}
            if entry is None or entry.get("status") is None:
                return None
            return dict(entry)

    # ------------------------------------------------------------ thread
    def _run(self) -> None:
        while not self._stop.is_set():
            for name, inst in self.children():
                if self._stop.is_set():
                    break
                try:
                    self._refresh(name, inst)
                except Exception as exc:  # noqa: BLE001 - a bug here must not end the thread
                    log.debug("child instance %s: ps fetch failed: %s", name, exc)
            self._wake.wait(self.interval)
            self._wake.clear()

    def _client(self, name: str, inst: Any, address: tuple[str, int]) -> Any:
        from luna_daemon.client import DaemonClient

        with self._lock:
            held = self._clients.get(name)
        if held is not None and held[0] == tuple(address):
            return held[1]
        if held is not None:
            held[1].close()  # the child moved (restarted on a free port)
        token = getattr(inst, "token", None) or self.host.daemon.token
        c = DaemonClient(address[0], address[1], token=token, timeout=FETCH_TIMEOUT,
                         connect_timeout=FETCH_TIMEOUT, supervisor=True, shm=False)
        with self._lock:
            self._clients[name] = (tuple(address), c)
        return c

    def _refresh(self, name: str, inst: Any) -> None:
        # Only ps (the model list): the status answer is the supervisor's heartbeat's
        # (get()), so a child gets one status request per interval, not two.
        address = getattr(inst, "address", None)
        if getattr(inst, "state", None) != "running" or not address:
            return  # keep the last answer: the list comes back with the next run
        c = self._client(name, inst, address)
        try:
            models = c.call("ps").get("models") or []
        except Exception as exc:  # noqa: BLE001 - unreachable / hung / restarting child
            log.debug("child instance %s at %s:%s did not answer ps: %s", name, address[0], address[1], exc)
            with self._lock:
                if self._clients.get(name, (None, None))[1] is c:
                    del self._clients[name]
            c.close()
            return
        with self._lock:
            entry = self._cache.setdefault(name, {"status": None, "time": None})
            entry["models"], entry["models_time"] = [m for m in models if isinstance(m, dict)], time.time()
