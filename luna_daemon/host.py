"""The host process: owns the instance lock, logging, the Daemon and the Monitor.

Both faces that run a daemon -- the tray app and headless ``luna-daemon serve`` -- are a
Host. The monitor (port ``monitor_port``) lives as long as the host, so the dashboard and
log viewer stay reachable while the daemon is stopped or failed: stopping or restarting
the daemon (dashboard, tray menu) never ends the host. A ``serve`` host ends on SIGINT /
SIGTERM, a protocol ``shutdown`` (``luna-daemon stop``) or :meth:`Host.request_exit`.
"""

from __future__ import annotations

import hmac
import logging
import os
import signal
import sys
import threading
from typing import Any, Callable

from luna_daemon import __version__
from luna_daemon.config_watch import HOST_RESTART, ConfigWatcher, split_changes
from luna_daemon.daemon import ERROR, STOPPED, Daemon, DaemonStartError
from luna_daemon.events import EventBus
from luna_daemon.instance import ALREADY_RUNNING, InstanceLock
from luna_daemon.logs import LogTail, set_level, setup_logging
from luna_daemon.settings import Settings, problems_text

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
        # The config file's state (see reload_config): its errors ("" = it loads cleanly),
        # the keys edited since start that wait for a restart, and whether a daemon start
        # was refused because of the errors (then fixing the file starts it).
        self._config_lock = threading.Lock()
        self.config_error = problems_text(settings.problems)
        self._waiting: dict[str, Any] = {}
        self._start_refused = False
        for problem in settings.problems:
            log.error("config: %s", problem)
        self.daemon.before_start = self._before_daemon_start
        self.daemon.status_extra = self.config_status
        self.watcher = ConfigWatcher(settings.config_file, self.reload_config)
        self.monitor: Any = None
        self.lock = InstanceLock(settings.host, settings.lock_port, self._on_lock_message, on_login=self._on_login)
        self._message_handlers: list[Callable[[str], None]] = []
        self._closed = threading.Event()
        self._exit = threading.Event()  # ends serve()

    def acquire(self) -> None:
        """Take the single-instance lock or raise AlreadyRunning (after asking the owner to show)."""
        if not self.lock.acquire():
            reason = self.lock.refusal()
            log.error(reason)
            raise AlreadyRunning(reason)
        self.watcher.start()  # only the lock owner applies edits (a refused launch just exits)

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
            try:
                self.daemon.start()
                log.info("Luna Daemon %s running on %s:%d (log file: %s)", __version__, self.settings.host,
                         self.daemon.address[1], self.settings.log_file)
            except DaemonStartError:
                if not self.config_error:
                    raise
                # A broken config file: the daemon stays in ``error`` (the dashboard shows
                # why) and starts once the file is fixed; the host serves until told to end.
                log.error("the daemon waits for %s to be fixed (dashboard: port %s)", self.settings.config_file,
                          self.settings.monitor_port)
            # A timed wait: a signal handler only runs between bytecodes of the main thread.
            while not self._exit.wait(0.5):
                pass
            return self.close()
        finally:
            self.daemon.on_shutdown = None

    # ------------------------------------------------------------ config file
    def config_status(self) -> dict[str, Any]:
        """``restart_needed`` (sorted keys edited in the file that apply only after a
        restart), ``config_error`` (why the file cannot be used; "" when it loads) and
        ``config_file``. Part of the daemon snapshot (status op, ``/api/status``)."""
        with self._config_lock:
            return {"restart_needed": sorted(self._waiting), "config_error": self.config_error,
                    "config_file": self.settings.config_file}

    @property
    def start_refused(self) -> bool:
        """The last daemon start was refused for a broken config file, not fixed since."""
        with self._config_lock:
            return self._start_refused

    def _before_daemon_start(self) -> None:
        # Every daemon start: refuse while the file is broken (starting on defaults could
        # mean the wrong port or model folders), else take the values that were waiting
        # for this start. Host-level keys keep waiting for a restart of the whole process.
        with self._config_lock:
            if self.config_error:
                self._start_refused = True
                raise DaemonStartError(f"{self.config_error} -- fix the config file; the daemon starts when it is fixed")
            for key in [k for k in self._waiting if k not in HOST_RESTART]:
                setattr(self.settings, key, self._waiting.pop(key))
                self.settings.sources[key] = "file"
        self.events.emit("config", **self.config_status())

    def reload_config(self) -> None:
        """Read the config file again (the watcher calls this on every change) and apply it:
        LIVE keys now, keys that need a restart are listed in ``restart_needed`` (applied
        at the next daemon start; host-level ones at the next start of this process). A
        file with errors changes nothing: the last good values stay, a ``warning`` event
        and ``config_error`` say why. Emits a ``config`` event with :meth:`config_status`."""
        new = self.settings.reload()
        start_now = False
        warning = ""
        with self._config_lock:
            if new.problems:
                text = problems_text(new.problems)
                if text != self.config_error:
                    warning = f"config file not applied, the previous settings stay: {text}"
                self.config_error = text
                log.error("config file changed but cannot be used (the previous settings stay): %s", text)
            else:
                self.config_error = ""
                running = self.daemon.state not in (STOPPED, ERROR)
                apply_now, self._waiting = split_changes(self.settings, new, running)
                for key, value in apply_now.items():
                    setattr(self.settings, key, value)
                    self.settings.sources[key] = new.sources.get(key, "file")
                self._apply_live(apply_now)
                if apply_now or self._waiting:
                    log.info("config file changed: applied %s; restart needed for %s",
                             ", ".join(sorted(apply_now)) or "nothing", ", ".join(sorted(self._waiting)) or "nothing")
                start_now, self._start_refused = self._start_refused and self.daemon.state == ERROR, False
        # Events outside the lock: a subscriber may read config_status() on this thread.
        if warning:
            self.events.emit("warning", level="warning", message=warning)
        self.events.emit("config", **self.config_status())
        if start_now:
            log.info("config file fixed: starting the daemon")
            threading.Thread(target=self._start_quietly, name="luna-config-start", daemon=True).start()

    def _apply_live(self, changed: dict[str, Any]) -> None:
        """Tell the components that cache a LIVE value (the others read it on each use)."""
        if "log_level" in changed:
            set_level(self.settings.log_level)
        registry = self.daemon.registry
        if registry is not None and "model_roots" in changed:
            registry.refresh_roots()

    def _start_quietly(self) -> None:
        try:
            self.daemon.start()
        except DaemonStartError as exc:
            log.error("the daemon did not start after the config fix: %s", exc)  # state=error says so too

    def _on_login(self, token: str, page: str) -> str:
        """A login link for ``luna-daemon dashboard`` (lock port), only for the daemon's token."""
        from luna_daemon.instance import LoginRefused

        expected = self.daemon.token or ""
        if not expected or not hmac.compare_digest(token.encode("utf-8", "replace"), expected.encode("utf-8")):
            raise LoginRefused("token")
        try:
            url = self.dashboard_url(page)
        except ValueError:
            raise LoginRefused("page") from None
        except OSError:  # MonitorError: stopped meanwhile
            raise LoginRefused("monitor") from None
        if url is None:
            raise LoginRefused("monitor")
        return url

    def dashboard_url(self, page: str = "status") -> str | None:
        """URL of a dashboard page with a short-lived login secret, or None without monitor."""
        if self.monitor is None:
            return None
        return self.monitor.url_for(page)

    def close(self, deadline: float | None = None) -> bool:
        """Stop the daemon (clean, with deadline), the monitor, release the lock. Idempotent."""
        if self._closed.is_set():
            return True
        self.watcher.stop()
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
