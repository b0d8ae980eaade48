"""Further daemon instances (``[[instances]]`` after the first) as supervised child processes.

A :class:`ChildInstance` runs ``luna-daemon serve --instance NAME`` (the child host,
host.InstanceHost) and shows the same face surface as a :class:`~luna_daemon.daemon.Daemon`
(``name``, ``settings``, ``state``, ``detail``, ``address``, ``start``, ``stop``,
``snapshot``, ``token``, ``unclean_stops``; ``state`` events with ``instance``), so that
the host and its faces treat every instance alike.

What a caller can rely on:

* ``start(timeout)`` returns once the child reported its address **and** answered a real
  ``ping`` (supervisor role, the shared install token): state ``running``. Otherwise the
  child is gone (killed if it still ran), the state is ``error`` with the reason -- "exited
  with code 1: <its last output line>" (a port already taken names its holder there) --
  and :class:`DaemonStartError` is raised.
* While it runs, a heartbeat (``status``, supervisor role: not counted as client traffic)
  every ``health_interval`` keeps the snapshot's models / clients / queue fresh, and
  :meth:`ChildInstance.last_status` hands that answer to the faces (the dashboard's poller
  reads it instead of asking the child again: one ``status`` per child per interval); a child
  that fails HEALTH_FAILURES heartbeats in a row is killed. An unexpected exit turns the
  state ``error`` with the exit reason ("killed by signal 9 (SIGKILL)") and the child is
  restarted after a backoff (1, 2, 4, ... BACKOFF_MAX s; back to 1 s after HEALTHY_RESET s
  of healthy running), on the same port. A child that exits 0 by itself was told to
  (a ``shutdown`` sent to its port): it is ``stopped``, not restarted.
* ``stop(deadline)`` tells the child through its stdin to stop with that deadline (the
  same bounded clean stop as a Daemon's), waits for it, then terminates / kills it:
  it returns within ``deadline + STOP_GRACE + EXIT_SLACK + 2 * KILL_WAIT``. True = clean.
* The child never outlives the host: its stdin is a pipe only the host holds, and the
  child stops when it reads EOF there (the host died, even by SIGKILL) or when its parent
  pid changes (a second guard).
* Its output (its log lines in logs.FORMAT, on stderr) is forwarded line by line to
  ``log_sink(name, line)`` -- the host's LogTail.forward -- while the child also writes its
  own log file ``luna-daemon-<name>.log``.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from luna_daemon import logs
from luna_daemon.daemon import (
    ERROR,
    RUNNING,
    STARTING,
    STOP_GRACE,
    STOPPED,
    STOPPING,
    DaemonStartError,
)
from luna_daemon.events import EventBus
from luna_daemon.settings import Settings, load_or_create_token

log = logging.getLogger(__name__)

# The line a supervised child prints on stdout once its daemon answers (host.InstanceHost).
READY_PREFIX = "luna-instance-ready "
HEALTH_FAILURES = 3
BACKOFF_START, BACKOFF_MAX, HEALTHY_RESET = 1.0, 30.0, 60.0
# A child's stop ends with its interpreter's exit (torch teardown, log flush): this long
# past the stop deadline before it is terminated.
EXIT_SLACK = 3.0
KILL_WAIT = 2.0  # after terminate, after kill
START_TIMEOUT = 30.0  # a restart's (an explicit start() passes its own)
LAST_LINES = 20  # output lines kept per run, for the exit reason


def exit_reason(code: int, last_line: str = "") -> str:
    """How a child ended, for people: "killed by signal 9 (SIGKILL)", "exited with code 1: ..."."""
    if code < 0:
        try:
            name = f" ({signal.Signals(-code).name})"
        except ValueError:
            name = ""
        return f"killed by signal {-code}{name}"
    return f"exited with code {code}" + (f": {last_line}" if last_line else "")


def child_command(name: str, settings: Settings, parent_pid: int | None = None) -> list[str]:
    """The child's command line: the same config file and the same overrides as the host
    (its flags, or a program's ``Settings.load(overrides=...)``), so the child computes the
    same instance settings the host did."""
    cmd = [sys.executable, "-m", "luna_daemon", "serve", "--instance", name, "--config", str(settings.config_file),
           "--supervised-by", str(parent_pid or os.getpid())]
    overrides = {k: v for k, v in (settings.loaded_with.get("overrides") or {}).items() if v is not None}
    if overrides:
        cmd += ["--instance-overrides", json.dumps(overrides, default=str)]
    return cmd


def child_env(settings: Settings) -> dict[str, str]:
    """This process's environment, with the ``LUNA_*`` variables the settings were loaded
    with (a program may load them from its own mapping instead of os.environ)."""
    env = dict(os.environ)
    given = settings.loaded_with.get("env")
    if given is not None:
        for key in [k for k in env if k.startswith("LUNA_")]:
            del env[key]
        env.update({k: str(v) for k, v in given.items() if k.startswith("LUNA_")})
    env["PYTHONUNBUFFERED"] = "1"  # its log lines reach the host's viewer as they are written
    return env


class _Cancelled(Exception):
    """A start given up because stop() was called meanwhile."""


class _Run:
    """One child process and what its output reader learned."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.ready = threading.Event()  # the ready line arrived, or the output ended
        self.address: tuple[str, int] | None = None
        self.last: collections.deque[str] = collections.deque(maxlen=LAST_LINES)
        self.reader: threading.Thread | None = None
        self.client: Any = None
        self.healthy_since: float | None = None
        self.failures = 0
        self.kill_reason = ""
        self.stopping = False

    def last_message(self) -> str:
        """The child's last output line without its log prefix (its last word, usually why)."""
        for text in reversed(self.last):
            message = logs.message_of(text).strip()
            if message:
                return message[:500]
        return ""


class ChildInstance:
    """A further instance running as a supervised child process (see the module docstring)."""

    def __init__(self, name: str, settings: Settings, events: EventBus | None = None, *, token: str | None = None,
                 log_sink: Callable[[str, str], Any] | None = None, command: list[str] | None = None):
        self.name = name
        self.settings = settings
        self.events = events or EventBus()
        self.token = token if token is not None else load_or_create_token(settings)
        self.log_sink = log_sink
        self.command = command  # None: child_command() at each launch
        self.state = STOPPED
        self.detail = ""
        self.address: tuple[str, int] | None = None
        self.started_at: float | None = None
        self.primary = False
        self.restarts = 0
        self.exit_reason = ""
        self.unclean_stops = 0
        # Like Daemon's: a host's checks before every start and extra snapshot keys.
        self.before_start: Callable[[], None] | None = None
        self.status_extra: Callable[[], dict[str, Any]] | None = None
        # The in-process parts of a Daemon do not exist here (faces check for None).
        self.server = self.registry = self.service = self.engine = None
        self._run: _Run | None = None
        # The current run's last heartbeat answer and its time.time() (None: none yet in
        # this run, or no run); read and written under _state_lock (last_status()).
        self._last: tuple[dict[str, Any], float] | None = None
        self._wanted = False  # running is wanted: an exit is unexpected (restart it)
        self._wake = threading.Event()  # ends a restart backoff early (stop)
        self._delay: float | None = None
        self._last_stop_clean = True
        self._lifecycle = threading.RLock()
        self._state_lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    # ------------------------------------------------------------ state
    def _set_state(self, state: str, detail: str = "") -> None:
        with self._state_lock:
            self.state, self.detail = state, detail
        (log.error if state == ERROR else log.info)("instance %r %s%s", self.name, state, f": {detail}" if detail else "")
        self.events.emit("state", state=state, detail=detail, instance=self.name)

    def _warn(self, message: str, level: str) -> None:
        self.events.emit("warning", message=message, level=level, instance=self.name)

    @property
    def pid(self) -> int | None:
        run = self._run
        return run.proc.pid if run is not None and run.proc.poll() is None else None

    def last_status(self) -> tuple[dict[str, Any], float] | None:
        """The last heartbeat's ``status`` answer of the current run and the wall-clock
        time (``time.time()``) it arrived; thread-safe, never blocks, never does I/O.

        None before the first answer of a run (during a start or a restart) and once the
        run has ended (stopped, exited, killed): an answer of a process that is gone is
        never handed out as current. A failed heartbeat keeps the previous answer (a child
        that stopped answering shows its last numbers until it is killed), so the time can
        be up to ``HEALTH_FAILURES`` intervals old. The dict is a new object per heartbeat
        that nothing modifies afterwards; treat it as read-only. Callers that want a
        stopped child's counters to stay visible keep their own copy (web.instances)."""
        with self._state_lock:
            return self._last

    def _set_last(self, last: tuple[dict[str, Any], float] | None) -> None:
        with self._state_lock:
            self._last = last

    def snapshot(self) -> dict[str, Any]:
        """Daemon.snapshot()'s keys (models, clients, in_flight, engine from the last
        heartbeat) plus ``pid``, ``restarts`` and ``exit_reason``."""
        with self._state_lock:
            state, detail, last = self.state, self.detail, self._last
        st = last[0] if state == RUNNING and last is not None else {}
        s = self.settings
        return {
            "state": state, "detail": detail,
            "uptime": (time.time() - self.started_at) if self.started_at and state == RUNNING else 0.0,
            "host": s.host, "port": self.address[1] if self.address else s.port,
            "clients": st.get("clients", 0), "in_flight": st.get("in_flight", 0), "models": st.get("models", 0),
            "engine": st.get("engine"), "queue": st.get("queue", 0),
            "instance": self.name, "service": s.service, "primary": self.primary,
            "devices": {"vae": s.vae_device, "clip": s.clip_device},
            **(self.status_extra() if self.status_extra is not None else {}),
            "pid": self.pid, "restarts": self.restarts, "exit_reason": self.exit_reason,
        }

    # ------------------------------------------------------------ start
    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the child (see the module docstring); a no-op while it runs."""
        with self._lifecycle:
            if self.state == RUNNING:
                return
            self._wanted = True
            self._wake.clear()
            self._delay = None
            self._launch(timeout)
        self._ensure_watcher()

    def _launch(self, timeout: float) -> None:
        """One launch (the caller holds ``_lifecycle``): running, or error + DaemonStartError."""
        self._set_state(STARTING)
        self._set_last(None)  # a new run: the previous one's answer is not its answer
        run: _Run | None = None
        t_end = time.monotonic() + timeout
        try:
            if self.before_start is not None:
                self.before_start()
            run = self._spawn()
            self._run = run
            address = self._await_ready(run, t_end, timeout)
            self._await_ping(run, address, t_end)
        except _Cancelled:
            self._abandon(run)
            self._set_state(STOPPED)
            raise DaemonStartError(f"start of instance {self.name!r} cancelled: it was stopped") from None
        except Exception as exc:
            reason = str(exc) if isinstance(exc, DaemonStartError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, (DaemonStartError, OSError)):
                log.exception("instance %r failed to start", self.name)
            self._abandon(run)
            self.exit_reason = reason
            self._set_state(ERROR, reason)
            self._warn(f"instance {self.name!r} failed to start: {reason}", "error")
            raise DaemonStartError(reason) from None
        from luna_daemon.client import DaemonClient

        run.client = DaemonClient(*address, token=self.token, timeout=max(2.0, self.settings.health_interval),
                                  connect_timeout=2.0, supervisor=True, shm=False)
        run.healthy_since = time.monotonic()
        self.address = address
        self.started_at = time.time()
        self._heartbeat(run)
        self._set_state(RUNNING)

    def _spawn(self) -> _Run:
        cmd = self.command or child_command(self.name, self.settings)
        kw: dict[str, Any] = {}
        if sys.platform == "win32":
            kw["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        else:
            # Its own session: a Ctrl-C in the host's terminal reaches the host only, which
            # then stops its children in order (instead of every process at once).
            kw["start_new_session"] = True
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=child_env(self.settings), close_fds=True, **kw)
        run = _Run(proc)
        run.reader = threading.Thread(target=self._read_output, args=(run,), name=f"luna-child-{self.name}-output",
                                      daemon=True)
        run.reader.start()
        log.info("instance %r: started child process %d", self.name, proc.pid)
        return run

    def _read_output(self, run: _Run) -> None:
        # The only reader of the child's output: it must keep reading, or a child that logs
        # a lot blocks on a full pipe.
        try:
            for raw in iter(run.proc.stdout.readline, b""):  # type: ignore[union-attr]
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                if text.startswith(READY_PREFIX) and run.address is None:
                    host, _, port = text[len(READY_PREFIX):].rpartition(" ")
                    try:
                        run.address = (host or self.settings.host, int(port))
                    except ValueError:
                        pass
                    run.ready.set()
                    continue
                if not text.strip():
                    continue
                run.last.append(text)
                if self.log_sink is not None:
                    try:
                        self.log_sink(self.name, text)
                    except Exception:  # a viewer's failure must not stop the reading
                        log.debug("instance %r: log line not forwarded", self.name, exc_info=True)
        except (OSError, ValueError):
            pass
        finally:
            run.ready.set()

    def _await_ready(self, run: _Run, t_end: float, timeout: float) -> tuple[str, int]:
        while not run.ready.wait(0.1):
            if not self._wanted:
                raise _Cancelled
            if time.monotonic() >= t_end:
                raise DaemonStartError(f"instance {self.name!r} did not start within {timeout:g}s "
                                       f"(its log: luna-daemon-{self.name}.log)")
        if run.address is None:  # the output ended: the process is gone (or going)
            raise DaemonStartError(self._reason_of(run))
        return run.address

    def _await_ping(self, run: _Run, address: tuple[str, int], t_end: float) -> None:
        from luna_daemon.client import DaemonUnavailable, wait_for_daemon

        last: Exception | None = None
        while True:
            if not self._wanted:
                raise _Cancelled
            if run.proc.poll() is not None:
                raise DaemonStartError(self._reason_of(run))
            try:  # short tries: a stop() must not wait for the whole start timeout
                wait_for_daemon(*address, min(1.0, max(0.1, t_end - time.monotonic())), token=self.token,
                                supervisor=True, proc=run.proc)
                return
            except DaemonUnavailable as exc:
                last = exc
            if time.monotonic() >= t_end:
                raise DaemonStartError(f"instance {self.name!r} did not answer ping on {address[0]}:{address[1]}: {last}")

    def _reason_of(self, run: _Run) -> str:
        try:
            code = run.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            return f"closed its output but still runs (pid {run.proc.pid})"
        if run.reader is not None:
            run.reader.join(1.0)  # its last lines, for the reason
        return run.kill_reason or exit_reason(code, run.last_message())

    def _abandon(self, run: _Run | None) -> None:
        """End a run that failed to start (bounded)."""
        if run is None:
            return
        _kill(run.proc)
        _close_run(run)
        if self._run is run:
            self._run = None
        self.address = None
        self._set_last(None)

    # ------------------------------------------------------------ supervision
    def _ensure_watcher(self) -> None:
        with self._state_lock:
            if self._watcher is not None and self._watcher.is_alive():
                return
            self._watcher = threading.Thread(target=self._watch, name=f"luna-child-{self.name}-watch", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        while self._wanted:
            run = self._run
            if run is None:
                if not self._wake.wait(0.2):
                    continue
                return
            try:
                code = run.proc.wait(max(0.2, min(self.settings.health_interval, 5.0)))
            except subprocess.TimeoutExpired:
                if self._wanted and not run.stopping and self._run is run:
                    self._heartbeat(run)
                continue
            if not self._wanted or run.stopping or self._run is not run:
                continue  # stop() (or a new start) owns it
            self._on_exit(run, code)

    def _heartbeat(self, run: _Run) -> None:
        from luna_daemon.client import DaemonError, DaemonUnavailable

        try:
            answer = dict(run.client.status())
            # Checked and stored in one step: whoever ends a run sets _run first and
            # clears _last after, so a late answer of an ended run never looks current.
            with self._state_lock:
                if self._run is run:
                    self._last = (answer, time.time())
            run.failures = 0
        except (DaemonUnavailable, DaemonError, OSError) as exc:
            run.failures += 1
            log.warning("instance %r: health check %d failed: %s", self.name, run.failures, exc)
            if run.failures >= HEALTH_FAILURES and not run.stopping:
                run.kill_reason = f"stopped answering ({run.failures} health checks failed: {exc}); killed"
                _kill(run.proc)  # the watcher sees the exit and restarts it

    def _on_exit(self, run: _Run, code: int) -> None:
        reason = self._reason_of(run)
        _close_run(run)
        with self._lifecycle:
            if self._run is not run or not self._wanted:
                return
            self._run = None
            self.address = None
            self.started_at = None
            self._set_last(None)
            self.exit_reason = reason
            if code == 0 and not run.kill_reason:
                # It was told to (a ``shutdown`` on its own port): respected, not restarted.
                self._wanted = False
                self._set_state(STOPPED, "stopped by a shutdown request to its port")
                return
            healthy = run.healthy_since is not None and time.monotonic() - run.healthy_since >= HEALTHY_RESET
            delay = BACKOFF_START if self._delay is None or healthy else min(self._delay * 2, BACKOFF_MAX)
            self._delay = delay
            self._set_state(ERROR, reason)
            self._warn(f"instance {self.name!r} {reason}; restarting in {delay:g}s", "error")
        while self._wanted:
            if self._wake.wait(delay) or not self._wanted:
                return
            with self._lifecycle:
                if not self._wanted or self._run is not None:
                    return  # stopped, or started by someone else meanwhile
                try:
                    self._launch(START_TIMEOUT)
                    self.restarts += 1
                    return
                except DaemonStartError:
                    delay = self._delay = min((self._delay or BACKOFF_START) * 2, BACKOFF_MAX)
                    log.error("instance %r: restart failed; next try in %gs", self.name, delay)

    # ------------------------------------------------------------ stop
    def stop(self, deadline: float | None = None) -> bool:
        """Stop the child (see the module docstring); True if it stopped cleanly. No-op
        (True / how the last stop went) when no child runs; cancels a pending restart."""
        deadline = self.settings.stop_timeout if deadline is None else deadline
        self._wanted = False
        self._wake.set()
        with self._lifecycle:
            run = self._run
            if run is None:
                return self._last_stop_clean if self.state == STOPPED else True
            run.stopping = True
            self._set_state(STOPPING)
            clean, why = self._stop_run(run, deadline)
            _close_run(run)
            self._run = None
            self.address = None
            self.started_at = None
            self._set_last(None)
            self._last_stop_clean = clean
            if clean:
                self._set_state(STOPPED)
                return True
            self.unclean_stops += 1
            message = f"instance {self.name!r}: {why}"
            log.warning(message)
            self._set_state(STOPPED, why)
            self._warn(message, "warning")
            return False

    def _stop_run(self, run: _Run, deadline: float) -> tuple[bool, str]:
        t_end = time.monotonic() + deadline + STOP_GRACE + EXIT_SLACK
        try:  # the child's stdin control line (host.InstanceHost): stop with our deadline
            run.proc.stdin.write(f"stop {deadline:g}\n".encode())  # type: ignore[union-attr]
            run.proc.stdin.flush()  # type: ignore[union-attr]
        except (OSError, ValueError):
            pass  # already gone: the wait below returns at once
        try:
            code = run.proc.wait(max(0.0, t_end - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill(run.proc)
            return False, (f"stop deadline of {deadline:g}s exceeded: the child process did not exit, it was killed "
                           f"(its log: luna-daemon-{self.name}.log)")
        if code == 0:
            return True, ""
        if code == 4:  # the child's own stop cut work off (its log names it; cli.EXIT_UNCLEAN)
            return False, f"stop deadline of {deadline:g}s exceeded; unfinished work was cut off (see its log)"
        return False, f"the child process {exit_reason(code, run.last_message())} while stopping"

    def wait_stopped(self, timeout: float | None = None) -> bool:
        end = None if timeout is None else time.monotonic() + timeout
        while self._run is not None:
            if end is not None and time.monotonic() >= end:
                return False
            time.sleep(0.05)
        return True


def _kill(proc: subprocess.Popen) -> None:
    """Terminate, then kill; bounded (KILL_WAIT each)."""
    if proc.poll() is not None:
        return
    for step in (proc.terminate, proc.kill):
        try:
            step()
        except OSError:
            return
        try:
            proc.wait(KILL_WAIT)
            return
        except subprocess.TimeoutExpired:
            continue


def _close_run(run: _Run) -> None:
    """Release a run whose process has ended (or was killed)."""
    if run.client is not None:
        run.client.close()
    if run.reader is not None and run.reader is not threading.current_thread():
        run.reader.join(1.0)  # reads to EOF first: closing a pipe under a reader can block
    streams = [run.proc.stdin] + ([run.proc.stdout] if run.reader is None or not run.reader.is_alive() else [])
    for stream in streams:
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass
