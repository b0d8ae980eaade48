"""The host process: owns the instance lock, logging, the Daemon and the Monitor.

Both faces that run a daemon -- the tray app and headless ``luna-daemon serve`` -- are a
Host. The monitor (port ``monitor_port``) lives as long as the host, so the dashboard and
log viewer stay reachable while the daemon is stopped or failed: stopping or restarting
the daemon (dashboard, tray menu) never ends the host. A ``serve`` host ends on SIGINT /
SIGTERM, a protocol ``shutdown`` (``luna-daemon stop``) or :meth:`Host.request_exit`.

Several instances (``[[instances]]`` in config.toml, luna_daemon.instances): the first
(the primary) is the host's own Daemon (``host.daemon``), each further one a child
process the host supervises (supervisor.ChildInstance); ``host.instances`` holds them all,
in config order, and every face treats them alike. A child process is a
:class:`InstanceHost` (``luna-daemon serve --instance NAME``): no lock, no dashboard, one
Daemon, its own log file; it ends when the host tells it to, when its stdin ends (the
host died) or on a signal.
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
from luna_daemon.config_watch import HOST_RESTART, LIVE, ConfigWatcher, split_changes, split_instance_changes
from luna_daemon.daemon import (
    ERROR,
    STOP_GRACE,
    STOPPED,
    Daemon,
    DaemonStartError,
    overall_state,
)
from luna_daemon.events import EventBus
from luna_daemon.instance import ALREADY_RUNNING, InstanceLock
from luna_daemon.instances import instance_spec, instance_specs
from luna_daemon.logs import LogTail, instance_log_file, set_level, setup_logging
from luna_daemon.settings import Settings, problems_text
from luna_daemon.supervisor import EXIT_SLACK, KILL_WAIT, READY_PREFIX, ChildInstance

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
        self.specs = instance_specs(settings)
        primary = self.specs[0]
        self.log_tail: LogTail = setup_logging(settings, self.events, stderr=log_to_stderr, instance=primary.name)
        # One instance: the daemon runs on the host's own Settings (live config edits are
        # assigned there). Several: the primary runs on its spec's copy (its table's keys
        # applied), kept in step by _assign.
        self.daemon = Daemon(settings if len(self.specs) == 1 else primary.settings, self.events, name=primary.name)
        self.daemon.instances_provider = self.instance_map
        self.instances: dict[str, Daemon | ChildInstance] = {primary.name: self.daemon}
        for spec in self.specs[1:]:
            child = ChildInstance(spec.name, spec.settings, self.events, token=self.daemon.token,
                                  log_sink=self.log_tail.forward)
            child.before_start = self._before_child_start
            child.status_extra = self.config_status
            self.instances[spec.name] = child
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

    # ------------------------------------------------------------ instances
    def instance(self, name: str) -> Daemon | ChildInstance:
        """The instance called ``name``; ValueError naming the configured ones."""
        try:
            return self.instances[name]
        except KeyError:
            raise ValueError(f"no instance named {name!r}; configured: {', '.join(self.instances)}") from None

    def instance_map(self) -> list[dict[str, Any]]:
        """What ``hello`` answers as ``instances``: every instance's public entry
        (instances.InstanceSpec.public, with the port it really listens on), its state and
        the state's reason (``detail``: why a child is down, for ``luna-daemon status``)."""
        out = []
        for spec in self.specs:
            inst = self.instances[spec.name]
            entry = spec.public()
            if inst.address is not None:
                entry["port"] = inst.address[1]
            out.append({**entry, "state": inst.state, "detail": inst.detail})
        return out

    def overall_state(self) -> str:
        """The worst state of all instances (daemon.overall_state): what the tray icon shows."""
        return overall_state(inst.state for inst in self.instances.values())

    def start_all(self, timeout: float = 30.0) -> dict[str, str]:
        """Start every instance: the primary first, then the children (at once). One that
        fails does not stop the others. Returns ``{name: reason}`` of those that failed."""
        failures: dict[str, str] = {}
        try:
            self.daemon.start(timeout)
        except DaemonStartError as exc:
            failures[self.daemon.name] = str(exc)
        failures.update(self._start_children(timeout))
        return failures

    def _start_children(self, timeout: float, only_failed: bool = False) -> dict[str, str]:
        failures: dict[str, str] = {}

        def start(child: ChildInstance) -> None:
            try:
                child.start(timeout)
            except DaemonStartError as exc:
                failures[child.name] = str(exc)

        children = [c for c in self.instances.values() if isinstance(c, ChildInstance)
                    and (not only_failed or c.state == ERROR)]
        threads = [threading.Thread(target=start, args=(c,), name=f"luna-start-{c.name}", daemon=True) for c in children]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + KILL_WAIT * 2 + 5.0)  # start() is bounded by timeout; this only guards
        return failures

    def stop_all(self, deadline: float | None = None) -> bool:
        """Stop every instance at once, each with the clean bounded stop (``deadline``:
        stop_timeout when None); returns whether all stopped cleanly."""
        results: dict[str, bool] = {}

        def stop(inst: Daemon | ChildInstance) -> None:
            results[inst.name] = inst.stop(deadline)

        others = [i for i in self.instances.values() if i is not self.daemon]
        threads = [threading.Thread(target=stop, args=(i,), name=f"luna-stop-{i.name}", daemon=True) for i in others]
        for t in threads:
            t.start()
        stop(self.daemon)
        bound = (self.settings.stop_timeout if deadline is None else deadline) + STOP_GRACE + EXIT_SLACK + 3 * KILL_WAIT
        for t in threads:
            t.join(bound)  # ChildInstance.stop is bounded below this; a wedged one is reported, not waited for
        for inst in others:
            if inst.name not in results:
                log.warning("instance %r did not stop within %gs", inst.name, bound)
        return all(results.get(i.name, False) for i in self.instances.values())

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
            for name, reason in self._start_children(30.0).items():
                log.error("instance %r did not start: %s (the others run)", name, reason)
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

    def _before_child_start(self) -> None:
        # A child reads the same file itself: refused while it is broken, like the primary.
        with self._config_lock:
            if self.config_error:
                self._start_refused = True
                raise DaemonStartError(f"{self.config_error} -- fix the config file; the instance starts when it is fixed")

    def _assign(self, key: str, value: Any, source: str) -> None:
        """A changed value onto the host's settings, and onto the primary's copy when it has
        one (several instances) unless its own [[instances]] table sets that key."""
        targets = [self.settings]
        primary = self.daemon.settings
        if primary is not self.settings and key not in (self.settings.instances[0] if self.settings.instances else {}):
            targets.append(primary)
        for s in targets:
            setattr(s, key, value)
            s.sources[key] = source

    def _before_daemon_start(self) -> None:
        # Every daemon start: refuse while the file is broken (starting on defaults could
        # mean the wrong port or model folders), else take the values that were waiting
        # for this start. Host-level keys keep waiting for a restart of the whole process.
        with self._config_lock:
            if self.config_error:
                self._start_refused = True
                raise DaemonStartError(f"{self.config_error} -- fix the config file; the daemon starts when it is fixed")
            for key in [k for k in self._waiting if k not in HOST_RESTART]:
                self._assign(key, self._waiting.pop(key), "file")
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
                    self._assign(key, value, new.sources.get(key, "file"))
                per_instance = self._assign_instances(new)
                self._apply_live(apply_now)
                # "instances" applied = only LIVE keys of tables changed: named per instance.
                top = sorted(k for k in apply_now if k != "instances")
                tables = "".join(f"; instance {name!r}: {', '.join(sorted(keys))}"
                                 for name, keys in per_instance.items())
                if top or tables or self._waiting:
                    log.info("config file changed: applied %s%s; restart needed for %s", ", ".join(top) or "nothing",
                             tables, ", ".join(sorted(self._waiting)) or "nothing")
                start_now, self._start_refused = self._start_refused and self.daemon.state == ERROR, False
        # Events outside the lock: a subscriber may read config_status() on this thread.
        if warning:
            self.events.emit("warning", level="warning", message=warning)
        self.events.emit("config", **self.config_status())
        if start_now:
            log.info("config file fixed: starting the daemon")
            threading.Thread(target=self._start_quietly, name="luna-config-start", daemon=True).start()

    def _assign_instances(self, new: Settings) -> dict[str, list[str]]:
        """Several instances: each one's LIVE keys as the file now gives them (top-level
        value, or its own table's) onto its settings -- the primary's Daemon copy and the
        host's copy of each child's (its snapshot, the instance map; the child process
        applies them to itself, InstanceHost.reload_config). Returns ``{name: keys}`` of
        what changed. Instances the file no longer has keep theirs (``instances`` waits)."""
        if len(self.specs) == 1:
            return {}  # the daemon runs on self.settings: _assign did it
        changed: dict[str, list[str]] = {}
        for name, inst in self.instances.items():
            apply_now, _, sources = split_instance_changes(inst.settings, new, name, True)
            keys = sorted(k for k in apply_now if k in LIVE)
            for key in keys:
                setattr(inst.settings, key, apply_now[key])
                inst.settings.sources[key] = sources.get(key, "file")
            if keys:
                changed[name] = keys
        return changed

    def _apply_live(self, changed: dict[str, Any]) -> None:
        """Tell the components that cache a LIVE value (the others read it on each use)."""
        apply_live(self.daemon, changed)

    def _start_quietly(self) -> None:
        try:
            self.daemon.start()
        except DaemonStartError as exc:
            log.error("the daemon did not start after the config fix: %s", exc)  # state=error says so too
        for name, reason in self._start_children(30.0, only_failed=True).items():
            log.error("instance %r did not start after the config fix: %s", name, reason)

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
        """Stop every instance (clean, with deadline; children too), the monitor, release
        the lock. Idempotent."""
        if self._closed.is_set():
            return True
        self.watcher.stop()
        clean = self.stop_all(deadline)
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
        return end_process(self.daemon, code)


def end_process(daemon: Daemon, code: int) -> int:
    """Host.end_process for any host (the child host too)."""
    if not daemon.unclean_stops:
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


def apply_live(daemon: Daemon, changed: dict[str, Any]) -> None:
    """After LIVE keys were assigned on ``daemon.settings``: tell the parts that cache one
    (the log level, the registry's model roots); the others read the value on each use."""
    if "log_level" in changed:
        set_level(daemon.settings.log_level)
    registry = daemon.registry
    if registry is not None and "model_roots" in changed:
        registry.refresh_roots()


class InstanceHost:
    """The host of one further instance, in its own process (``luna-daemon serve
    --instance NAME``, started by supervisor.ChildInstance): no lock, no dashboard; one
    Daemon with the instance's settings, logging to its own file (logs.instance_log_file)
    and stderr (which the supervisor forwards to its viewer).

    While it serves it watches the config file like the host does (config_watch): the
    LIVE keys of its own instance (top-level, or its table's) apply within about a second;
    the others are its ``restart_needed`` (they apply when the host restarts it). A file
    that does not load changes nothing: the previous values stay, logged as an error and
    shown as ``config_error``; both are part of its ``status`` answer.

    With ``supervised_by`` (the supervising host's pid) it also reads control lines on
    stdin -- ``stop <deadline>`` -- and stops when stdin ends (the host is gone, even
    killed) or its parent pid changes; it prints READY_PREFIX + "host port" on stdout
    once its daemon answers. :meth:`serve` raises DaemonStartError if the daemon did not
    start (settings.SettingsError from the constructor: no such instance)."""

    PARENT_POLL = 1.0

    def __init__(self, settings: Settings, name: str, *, supervised_by: int | None = None,
                 log_to_stderr: bool = True):
        spec = instance_spec(settings, name)
        self.loaded = settings  # the top-level settings: reload() reads the same file, env, flags
        self.settings = spec.settings
        self.events = EventBus()
        self.log_tail = setup_logging(self.settings, self.events, stderr=log_to_stderr, instance=name,
                                      log_file=instance_log_file(self.settings, name, spec.primary))
        self.daemon = Daemon(self.settings, self.events, name=name)
        self.daemon.primary = spec.primary
        self._config_lock = threading.Lock()
        self.config_error = ""  # serve --instance starts only on a file that loads cleanly
        self._waiting: dict[str, Any] = {}
        self.daemon.status_extra = self.config_status
        # Constructed now, right after the load: an edit made while the daemon starts counts.
        self.watcher = ConfigWatcher(settings.config_file, self.reload_config)
        self.supervised_by = supervised_by
        self._exit = threading.Event()
        self._deadline: float | None = None

    def request_exit(self, deadline: float | None = None) -> None:
        if deadline is not None:
            self._deadline = deadline
        self._exit.set()

    def config_status(self) -> dict[str, Any]:
        """Host.config_status for this instance: ``restart_needed`` (its keys edited in the
        file that apply only when it is restarted), ``config_error``, ``config_file``."""
        with self._config_lock:
            return {"restart_needed": sorted(self._waiting), "config_error": self.config_error,
                    "config_file": self.settings.config_file}

    def reload_config(self) -> None:
        """Read the config file again (the watcher calls this on every change) and apply
        this instance's LIVE keys now; the rest are listed in ``restart_needed``. A file
        with errors changes nothing (the last good values stay, ``config_error`` says why)."""
        new = self.loaded.reload()
        with self._config_lock:
            if new.problems:
                self.config_error = problems_text(new.problems)
                log.error("config file changed but cannot be used (the previous settings stay): %s", self.config_error)
                return
            self.config_error = ""
            running = self.daemon.state not in (STOPPED, ERROR)
            apply_now, self._waiting, sources = split_instance_changes(self.settings, new, self.daemon.name, running)
            if "instances" in self._waiting:
                log.warning("config file changed: instance %r is no longer in it; it keeps its settings until the "
                            "host restarts", self.daemon.name)
            for key, value in apply_now.items():
                setattr(self.settings, key, value)
                self.settings.sources[key] = sources.get(key, "file")
            apply_live(self.daemon, apply_now)
            if apply_now or self._waiting:
                log.info("config file changed: applied %s; restart needed for %s",
                         ", ".join(sorted(apply_now)) or "nothing", ", ".join(sorted(self._waiting)) or "nothing")

    def _watch_stdin(self) -> None:
        # os.read on the descriptor, not sys.stdin: a daemon thread blocked inside the
        # buffered stdin object holds its lock, and the interpreter's exit then aborts
        # ("could not acquire lock for <stdin> at interpreter shutdown", SIGABRT).
        pending = b""
        try:
            while True:
                chunk = os.read(0, 1024)
                if not chunk:
                    break
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    cmd, _, arg = line.decode("ascii", "replace").strip().partition(" ")
                    if cmd == "stop":
                        try:
                            deadline = max(0.0, float(arg)) if arg else None
                        except ValueError:
                            deadline = None
                        log.info("the supervising host asked this instance to stop")
                        self.request_exit(deadline)
                        return
                pending = pending[-1024:]  # no line is longer: junk cannot grow it
        except OSError:
            pass
        log.warning("the supervising host is gone (stdin closed): stopping")
        self.request_exit()

    def _watch_parent(self) -> None:
        while not self._exit.wait(self.PARENT_POLL):
            if os.getppid() != self.supervised_by:
                log.warning("the supervising host (pid %s) is gone: stopping", self.supervised_by)
                self.request_exit()
                return

    def serve(self) -> bool:
        """Start the daemon, serve until told to end, stop; returns whether the stop was clean."""
        install_signal_handlers(self.request_exit)
        self.daemon.on_shutdown = self.request_exit
        if self.supervised_by:
            for target, what in ((self._watch_stdin, "stdin"), (self._watch_parent, "parent")):
                threading.Thread(target=target, name=f"luna-supervised-{what}", daemon=True).start()
        try:
            self.daemon.start()
        except DaemonStartError:
            self.daemon.stop(2.0)
            raise
        self.watcher.start()
        host, port = self.daemon.address  # type: ignore[misc]
        log.info("Luna Daemon %s instance %r running on %s:%d (log file: %s)", __version__, self.daemon.name, host,
                 port, instance_log_file(self.settings, self.daemon.name, self.daemon.primary))
        if self.supervised_by:
            sys.stdout.write(f"{READY_PREFIX}{host} {port}\n")
            sys.stdout.flush()
        try:
            while not self._exit.wait(0.5):  # timed: signal handlers run between bytecodes only
                pass
        finally:
            self.watcher.stop()
        return self.daemon.stop(self._deadline)

    def end_process(self, code: int) -> int:
        return end_process(self.daemon, code)


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
