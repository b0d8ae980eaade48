"""The host process: owns the instance lock, logging, the Daemon and the Monitor.

Both faces that run a daemon -- the tray app and headless ``luna-daemon serve`` -- are a
Host. The monitor (port ``monitor_port``) lives as long as the host, so the dashboard and
log viewer stay reachable while the daemon is stopped or failed: stopping or restarting
the daemon (dashboard, tray menu) never ends the host. A ``serve`` host ends on SIGINT /
SIGTERM, a protocol ``shutdown`` (``luna-daemon stop``) or :meth:`Host.request_exit`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any, Callable

from luna_daemon import __version__
from luna_daemon.daemon import Daemon
from luna_daemon.events import EventBus
from luna_daemon.instance import ALREADY_RUNNING, InstanceLock
from luna_daemon.logs import LogTail, setup_logging
from luna_daemon.settings import Settings

log = logging.getLogger(__name__)

# The monitor's share of a host's close: its loop stops in milliseconds unless wedged, and a
# close must stay within stop_timeout + ~3 s (daemon: + STOP_GRACE + slack, see daemon.py).
MONITOR_STOP_TIMEOUT = 1.0


class AlreadyRunning(RuntimeError):
    """The lock port is held: by another Luna host, or by a foreign program (``str()`` says which)."""

    def __init__(self, message: str = ALREADY_RUNNING) -> None:
        super().__init__(message)


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
        self._exit = threading.Event()  # ends serve()

    def acquire(self) -> None:
        """Take the single-instance lock or raise AlreadyRunning (after asking the owner to show)."""
        if not self.lock.acquire():
            reason = self.lock.refusal()
            log.error(reason)
            raise AlreadyRunning(reason)

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

    def request_exit(self) -> None:
        """End :meth:`serve` (from any thread): what SIGINT / SIGTERM and ``luna-daemon stop`` do."""
        self._exit.set()

    def serve(self) -> bool:
        """Start the daemon and serve until SIGINT / SIGTERM, a protocol ``shutdown``
        (``luna-daemon stop``) or :meth:`request_exit`, then close. Stopping the daemon
        alone (the dashboard's Stop / Restart) does not end it: the dashboard and the lock
        stay up and the daemon can be started again. Returns whether the final stop was
        clean; raises DaemonStartError if the daemon did not start (the caller closes)."""
        install_signal_handlers(self.request_exit)
        # In a serve host ``luna-daemon stop`` ends the host, not just the daemon; the
        # close below then stops the daemon and reports whether that was clean.
        self.daemon.on_shutdown = self.request_exit
        try:
            self.daemon.start()
            log.info("Luna Daemon %s running on %s:%d (log file: %s)", __version__, self.settings.host,
                     self.daemon.address[1], self.settings.log_file)
            # A timed wait: a signal handler only runs between bytecodes of the main thread.
            while not self._exit.wait(0.5):
                pass
            return self.close()
        finally:
            self.daemon.on_shutdown = None

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
            self.monitor.stop(MONITOR_STOP_TIMEOUT)
            self.monitor = None
        self.lock.release()
        self._closed.set()
        return clean

    def end_process(self, code: int) -> int:
        """The last call of a face's entry point, after :meth:`close`: returns ``code``.

        If a stop in this process was unclean and left threads running (a model call stuck
        in C code), it flushes the logs and ends the process here with ``code``
        (``os._exit``): a normal interpreter exit kills such daemon threads inside torch's
        C++ code, which aborts the process ("terminate called without an active
        exception", exit -6) or hangs in library destructors."""
        if not self.daemon.unclean_stops:
            return code
        me = threading.current_thread()
        busy = sorted(t.name for t in threading.enumerate() if t is not me and t.name.startswith("luna-") and t.is_alive())
        if not busy:
            return code
        log.warning("exiting with code %d while %d thread(s) of an unclean stop still run (%s): ending the process now",
                    code, len(busy), ", ".join(busy[:5]))
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


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
