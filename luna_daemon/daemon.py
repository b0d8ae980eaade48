"""The Daemon: lifecycle state machine around server + service + registry.

States and the colour a face shows for them::

    stopped (gray) -> starting (yellow) -> running (green) -> stopping (yellow) -> stopped
    any -> error (red, with ``detail``)

What a caller can rely on:

* ``start()`` returns only once the listener is bound **and** a real ``ping`` over the
  socket succeeded (state ``running``), or the state is ``error`` (it then raises
  :class:`DaemonStartError` with the reason). Calling it while running is a no-op.
* ``stop(deadline)``: closes the listener, answers ``stopping`` to new requests, lets
  in-flight requests finish (up to ``deadline`` seconds), unloads every model and
  releases memory, closes connections, joins threads, ends ``stopped``. It returns within
  ``deadline + STOP_GRACE`` (+ the final memory release) whatever is stuck: every wait
  after the in-flight one shares that one deadline, and what still runs then (a model
  call inside C code, which cannot be interrupted) is abandoned -- daemon threads, named
  in a WARNING log line, its model's memory not freed until the call returns. Returns
  False (unclean) if anything was cut off. Idempotent and callable from any thread
  (concurrent calls wait for the same stop).
* The protocol ``shutdown`` op calls ``on_shutdown`` if a host set it (``serve`` ends
  itself), otherwise it stops the daemon in the background.
* Every state change is an event ``state`` on ``events`` with ``state``, ``detail`` and
  ``instance`` (the daemon's ``name``); every ``warning`` event carries ``instance`` too.
* ``name``: the instance it runs (``[[instances]]``, luna_daemon.instances); ``"main"``
  when config.toml has none. ``snapshot()`` names it, its service and devices.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from luna_daemon import hugepages
from luna_daemon.events import EventBus
from luna_daemon.models.engines import select_engine
from luna_daemon.models.lora import LoraCache
from luna_daemon.models.devices import release_memory
from luna_daemon.models.registry import Registry
from luna_daemon.netutil import PortInUse, port_holder
from luna_daemon.server import Server
from luna_daemon.service import Service
from luna_daemon.settings import Settings, load_or_create_token

log = logging.getLogger(__name__)

STOPPED, STARTING, RUNNING, STOPPING, ERROR = "stopped", "starting", "running", "stopping", "error"
STATES = (STOPPED, STARTING, RUNNING, STOPPING, ERROR)
# The colour every face shows for a state (the tray additionally needs its own ping to
# succeed before it shows green).
STATE_COLOURS = {STOPPED: "gray", STARTING: "yellow", RUNNING: "green", STOPPING: "yellow", ERROR: "red"}


def overall_state(states: Iterable[str]) -> str:
    """The one state faces show for several instances (the tray icon): ``error`` if any
    is in error, else ``starting`` if any is starting or stopping, else ``running`` if all
    run, ``stopped`` if all are stopped; a mix of running and stopped (some stopped on
    purpose) is ``running``. No states at all is ``stopped``."""
    found = set(states)
    if ERROR in found:
        return ERROR
    if found & {STARTING, STOPPING}:
        return STARTING
    if found and found <= {STOPPED}:
        return STOPPED
    return RUNNING if RUNNING in found else STOPPED

# How long past its deadline a stop may take for unloading models, closing connections and
# joining threads -- one shared deadline for all of them; what still runs then is abandoned.
STOP_GRACE = 1.5
# Executors were all told to stop at once, so an idle one ends in milliseconds; a stop whose
# in-flight deadline is already spent still gives them this long before abandoning them.
EXECUTOR_GRACE = 0.5
# The cleanup thread's own steps end by the shared deadline; this covers what is not a wait
# (engine close, gc + emptying device caches) before the stop stops waiting for it.
CLEANUP_SLACK = 0.5


class DaemonStartError(RuntimeError):
    """start() failed; ``str(exc)`` is the user-facing reason (also the state detail)."""


class Daemon:
    def __init__(self, settings: Settings, events: EventBus | None = None, *, name: str | None = None):
        self.settings = settings
        self.events = events or EventBus()
        self.name = name or getattr(settings, "instance_name", "") or "main"
        # Set by a host with several instances: whether this is the primary (the host's own
        # daemon thread) and the live instance map its ``hello`` answers (None: the static
        # map from the settings).
        self.primary = True
        self.instances_provider: Callable[[], list[dict]] | None = None
        self.state = STOPPED
        self.detail = ""
        self.started_at: float | None = None
        self.address: tuple[str, int] | None = None
        self.token = load_or_create_token(settings)
        self.server: Server | None = None
        self.registry: Registry | None = None
        self.service: Service | None = None
        self.engine: Any = None
        self.lora_cache: Any = None
        # The protocol ``shutdown`` op's action; None = stop the daemon (see _on_shutdown_op).
        self.on_shutdown: Callable[[], None] | None = None
        # Set by a host (config file state, host.py): ``before_start`` runs first in every
        # start (may raise DaemonStartError: a broken config file); ``status_extra`` adds
        # keys to snapshot() (``restart_needed``, ``config_error``).
        self.before_start: Callable[[], None] | None = None
        self.status_extra: Callable[[], dict[str, Any]] | None = None
        self.unclean_stops = 0  # stops that cut something off (Host.end_process reads it)
        self._last_stop_clean = True  # what stop() answers once stopped (concurrent callers)
        self._lifecycle = threading.RLock()  # serialises start/stop
        self._state_lock = threading.Lock()
        self._stopped = threading.Event()
        self._stopped.set()

    # ------------------------------------------------------------ state
    def _set_state(self, state: str, detail: str = "") -> None:
        with self._state_lock:
            self.state, self.detail = state, detail
        who = "daemon" if self.name == "main" else f"daemon {self.name!r}"
        (log.error if state == ERROR else log.info)("%s %s%s", who, state, f": {detail}" if detail else "")
        self.events.emit("state", state=state, detail=detail, instance=self.name)

    def _warn(self, message: str, level: str) -> None:
        self.events.emit("warning", message=message, level=level, instance=self.name)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-safe summary for faces (state, uptime, address, clients, models; the
        instance's name, service, devices and whether it is the primary)."""
        with self._state_lock:
            state, detail = self.state, self.detail
        return {
            "state": state, "detail": detail,
            "uptime": (time.time() - self.started_at) if self.started_at and state == RUNNING else 0.0,
            "host": self.settings.host, "port": self.address[1] if self.address else self.settings.port,
            "clients": self.server.connection_count if self.server else 0,
            "in_flight": self.server.in_flight if self.server else 0,
            "models": len(self.registry.entries()) if self.registry else 0,
            "engine": self.engine.name if self.engine is not None else None,
            "instance": self.name, "service": self.settings.service, "primary": self.primary,
            "devices": {"vae": self.settings.vae_device, "clip": self.settings.clip_device},
            **(self.status_extra() if self.status_extra is not None else {}),
        }

    def _status_fields(self) -> dict[str, Any]:
        # The ``status`` op merges these into its answer, which has its own ``devices``
        # (memory per device, read by the CLI and the tray): the configured ones stay out.
        snap = self.snapshot()
        snap.pop("devices", None)
        snap["huge_pages"] = hugepages.state()
        return snap

    def _instances(self) -> list[dict] | None:
        provider = self.instances_provider  # read per call: a host sets it after start
        return provider() if provider is not None else None

    # ------------------------------------------------------------ start
    def start(self, timeout: float = 30.0) -> None:
        with self._lifecycle:
            if self.state == RUNNING:
                return
            self._set_state(STARTING)
            self._stopped.clear()
            self._last_stop_clean = True
            try:
                if self.before_start is not None:
                    self.before_start()
                self._start_components()
                self._verify_ping(timeout)
                self.started_at = time.time()
                self._set_state(RUNNING)
            except Exception as exc:
                reason = str(exc) if isinstance(exc, (PortInUse, DaemonStartError)) else f"{type(exc).__name__}: {exc}"
                if isinstance(exc, PortInUse):
                    reason += _held_by(self.settings.port)
                if not isinstance(exc, (PortInUse, DaemonStartError)):
                    log.exception("daemon failed to start")
                self._teardown(deadline=2.0)  # what a failed start cut off does not matter
                self._set_state(ERROR, reason)
                self._warn(f"daemon {self.name!r} failed to start: {reason}" if self.name != "main"
                           else f"daemon failed to start: {reason}", "error")
                raise DaemonStartError(reason) from None
        self._after_start()

    def _start_components(self) -> None:
        # Before the engine exists: PyTorch fixes its choice at the first big tensor.
        hugepages.configure(self.settings.huge_pages)
        self.engine = select_engine(self.settings)
        self.registry = Registry(self.settings, self.engine, self.events)
        self.lora_cache = LoraCache(self.settings, self.registry, self.events)
        self.service = Service(
            self.settings, self.registry, self.events, self.token,
            status_provider=self._status_fields, on_shutdown=self._on_shutdown_op, lora_cache=self.lora_cache,
            instance_name=self.name, instances_provider=self._instances,
        )
        self.server = Server(self.settings, self.service, self.events)
        self.address = self.server.start()

    def _verify_ping(self, timeout: float) -> None:
        # Green only after a real protocol round-trip over the socket (not "port open").
        from luna_daemon.client import DaemonUnavailable, wait_for_daemon

        host, port = self.address  # type: ignore[misc]
        try:
            wait_for_daemon(host, port, timeout, token=self.token, supervisor=True)
        except DaemonUnavailable as exc:
            raise DaemonStartError(str(exc)) from None

    def _after_start(self) -> None:
        """Preload / warm start in the background so start() stays fast."""
        paths = list(self.settings.preload)
        if not paths and not self.settings.warm_start:
            return
        threading.Thread(target=self._preload, args=(paths,), name="luna-preload", daemon=True).start()

    def _preload(self, entries: list[str]) -> None:
        from luna_daemon.models.residency import restore_previous, preload

        try:
            preload(self, entries)
            if self.settings.warm_start:
                restore_previous(self)
        except Exception:
            log.exception("preload failed")

    # ------------------------------------------------------------ stop
    def _on_shutdown_op(self) -> None:
        # Read at call time: a host may set or clear on_shutdown while the daemon runs.
        hook = self.on_shutdown
        if hook is not None:
            hook()
        else:
            self.request_stop()

    def request_stop(self) -> None:
        """Stop from a request handler without deadlocking on our own in-flight request."""
        threading.Thread(target=self.stop, name="luna-stop", daemon=True).start()

    def stop(self, deadline: float | None = None) -> bool:
        """Stop (see the module docstring). Returns True if clean; False if something was
        cut off -- then a WARNING log line and a ``warning`` event name what, and the
        ``stopped`` state's detail says so. On a stopped daemon it returns how its last
        stop went (a caller that raced another stop -- a signal during the dashboard's
        Stop -- learns the truth about it)."""
        deadline = self.settings.stop_timeout if deadline is None else deadline
        with self._lifecycle:
            if self.state in (STOPPED,):
                return self._last_stop_clean
            if self.state == ERROR and self.server is None:
                return True
            self._set_state(STOPPING)
            cut = self._teardown(deadline)
            self.started_at = None
            self._last_stop_clean = not cut
            if not cut:
                self._set_state(STOPPED)
                return True
            self.unclean_stops += 1
            message = f"stop deadline of {deadline:g}s exceeded; cut off: " + "; ".join(cut)
            log.warning(message)
            self._set_state(STOPPED, f"stop deadline of {deadline:g}s exceeded; unfinished work was cut off (see the log)")
            self._warn(message, "warning")
            return False

    def _teardown(self, deadline: float) -> list[str]:
        """Close everything: in-flight requests get ``deadline`` seconds, everything after
        them shares one deadline ``STOP_GRACE`` later. Returns what was cut off (empty if
        the stop was clean)."""
        t_soft = time.monotonic() + deadline
        t_hard = t_soft + STOP_GRACE
        cut: list[str] = []
        server, self.server = self.server, None
        if server is not None:
            server.close_listener()
            if not server.wait_idle(_left(t_soft)):
                cut += server.in_flight_requests() or ["requests still in flight"]
        registry, lora_cache, engine = self.registry, self.lora_cache, self.engine
        step = ["starting"]

        def run(name: str, fn: Callable[[], Any]) -> None:
            step[0] = name
            try:
                fn()
            except Exception as exc:
                log.exception("stop: %s failed", name)
                cut.append(f"{name} failed ({type(exc).__name__}: {exc})")

        def cleanup() -> None:
            # Its own thread: a step can block on something a stuck call holds (ComfyUI's
            # process-wide lock, a model's executor), and the stop must not wait past t_hard.
            leaked: list[str] = []
            run("saving the loaded-model list", self._remember_models)
            if registry is not None:
                run("unloading models", lambda: leaked.extend(self._close_registry(registry, t_soft, t_hard)))
                cut.extend(leaked)
            if lora_cache is not None:
                run("clearing the LoRA cache", lora_cache.clear)
            if server is not None and not server.close_connections(_left(t_hard)):
                cut.append("connection threads still busy, left behind")
            if not leaked:
                # Not while a call is stuck: the engine's close takes the lock it may hold,
                # and the stuck model's own late release runs release_memory (a full gc, a
                # second or more under load) once the call returns.
                if engine is not None:
                    run("closing the engine", engine.close)
                run("releasing memory", release_memory)
            step[0] = "done"

        worker = threading.Thread(target=cleanup, name="luna-stop-cleanup", daemon=True)
        worker.start()
        worker.join(_left(t_hard) + CLEANUP_SLACK)
        if worker.is_alive():
            cut.append(f"cleanup still {step[0]} at the deadline, left running in the background")
            if server is not None:
                server.close_connections(0)  # at least every socket is shut (idempotent)
        self.registry = self.service = self.engine = self.lora_cache = None
        self._stopped.set()
        return list(cut)

    @staticmethod
    def _close_registry(registry: Registry | None, t_soft: float, t_hard: float) -> list[str]:
        """Unload every model (until t_soft, at least EXECUTOR_GRACE, never past t_hard);
        returns the models whose call was still running (abandoned, memory not freed)."""
        if registry is None:
            return []
        timeout = min(max(_left(t_soft), EXECUTOR_GRACE), _left(t_hard))
        return [f"model {Path(r['paths'][0]).name} ({r['id']}) still running a call: unloaded, memory not freed"
                for r in registry.close(timeout) if not r["freed"]]

    def _remember_models(self) -> None:
        if self.settings.warm_start and self.registry is not None:
            from luna_daemon.models.residency import save_loaded

            save_loaded(self)

    def wait_stopped(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)


def _held_by(port: int) -> str:
    """`` Port N is held by NAME (pid P).`` -- who to close (psutil), or "" when unknown."""
    holder = port_holder(port) if port else None
    if holder is None or holder.pid is None:
        return ""
    return f" Port {port} is held by {holder}{' (a Luna Daemon)' if holder.is_luna else ''}."


def _left(end: float) -> float:
    return max(0.0, end - time.monotonic())
