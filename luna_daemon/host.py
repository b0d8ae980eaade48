"""The host process: owns the instance lock, logging, the Daemon and the Monitor.

Both faces that run a daemon -- the tray app and headless ``luna-daemon serve`` -- are a
Host. The monitor (port ``monitor_port``) lives as long as the host, so the dashboard and
log viewer stay reachable while the daemon is stopped or failed.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable

from luna_daemon import __version__
from luna_daemon.daemon import Daemon
from luna_daemon.events import EventBus
from luna_daemon.instance import ALREADY_RUNNING, InstanceLock, notify_running
from luna_daemon.logs import LogTail, setup_logging
from luna_daemon.settings import Settings

log = logging.getLogger(__name__)


class AlreadyRunning(RuntimeError):
    def __init__(self) -> None:
        super().__init__(ALREADY_RUNNING)


class Host:
    def __init__(self, settings: Settings, *, log_to_stderr: bool = True):
        self.settings = settings
        self.events = EventBus()
        self.log_tail: LogTail = setup_logging(settings, self.events, stderr=log_to_stderr)
        self.daemon = Daemon(settings, self.events)
        self.monitor: Any = None
        self.lock = InstanceLock(settings.host, settings.lock_port, self._on_lock_message)
        self._message_handlers: list[Callable[[str], None]] = []
        self._closed = threading.Event()

    def acquire(self) -> None:
        """Take the single-instance lock or raise AlreadyRunning (after poking the owner)."""
        if not self.lock.acquire():
            log.error(ALREADY_RUNNING)
            notify_running(self.settings.host, self.settings.lock_port, "show")
            raise AlreadyRunning()

    def on_lock_message(self, fn: Callable[[str], None]) -> None:
        self._message_handlers.append(fn)

    def _on_lock_message(self, msg: str) -> None:
        log.info("another launch asked this instance to %s", msg)
        for fn in list(self._message_handlers):
            fn(msg)

    def start_monitor(self) -> None:
        """Start the web monitor; failures are logged, not fatal (the daemon runs without it)."""
        try:
            from luna_daemon.web.monitor import Monitor

            self.monitor = Monitor(self)
            self.monitor.start()
        except Exception as exc:
            log.error("monitor could not start on port %s: %s", self.settings.monitor_port, exc)
            self.events.emit("warning", message=f"dashboard could not start: {exc}", level="error")
            self.monitor = None

    def serve(self) -> bool:
        """Start the daemon and serve until SIGINT / SIGTERM or a protocol ``shutdown``
        (``luna-daemon stop``), then close. Returns whether the stop was clean; raises
        DaemonStartError if the daemon did not start (the caller closes)."""
        stop = threading.Event()
        install_signal_handlers(stop.set)
        unsubscribe = self.events.subscribe(
            lambda e: stop.set() if e.type == "state" and e.data.get("state") == "stopped" else None)
        try:
            self.daemon.start()
            log.info("Luna Daemon %s running on %s:%d (log file: %s)", __version__, self.settings.host,
                     self.daemon.address[1], self.settings.log_file)
            while not stop.wait(0.5):
                pass
            return self.close()
        finally:
            unsubscribe()

    def dashboard_url(self, page: str = "status") -> str | None:
        """URL of a dashboard page with a short-lived login secret, or None without monitor."""
        if self.monitor is None:
            return None
        return self.monitor.url_for(page)

    def close(self, deadline: float | None = None) -> bool:
        """Stop the daemon (clean, with deadline), the monitor, release the lock. Idempotent."""
        if self._closed.is_set():
            return True
        clean = self.daemon.stop(deadline)
        if self.monitor is not None:
            self.monitor.stop()
            self.monitor = None
        self.lock.release()
        self._closed.set()
        return clean


def install_signal_handlers(fn: Callable[[], None]) -> None:
    """SIGINT / SIGTERM call ``fn`` (Python allows handlers in the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        fn()

    signal.signal(signal.SIGINT, handler)
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, handler)
