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
  releases memory, closes connections, joins threads, ends ``stopped``. Idempotent and
  callable from any thread (concurrent calls wait for the same stop).
* Every state change is an event ``state`` on ``events`` with ``state`` and ``detail``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from luna_daemon.events import EventBus
from luna_daemon.models.engines import select_engine
from luna_daemon.models.lora import LoraCache
from luna_daemon.models.registry import Registry, release_memory
from luna_daemon.netutil import PortInUse
from luna_daemon.server import Server
from luna_daemon.service import Service
from luna_daemon.settings import Settings, load_or_create_token

log = logging.getLogger(__name__)

STOPPED, STARTING, RUNNING, STOPPING, ERROR = "stopped", "starting", "running", "stopping", "error"
STATES = (STOPPED, STARTING, RUNNING, STOPPING, ERROR)
# The colour every face shows for a state (the tray additionally needs its own ping to
# succeed before it shows green).
STATE_COLOURS = {STOPPED: "gray", STARTING: "yellow", RUNNING: "green", STOPPING: "yellow", ERROR: "red"}


class DaemonStartError(RuntimeError):
    """start() failed; ``str(exc)`` is the user-facing reason (also the state detail)."""


class Daemon:
    def __init__(self, settings: Settings, events: EventBus | None = None):
        self.settings = settings
        self.events = events or EventBus()
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
        self._lifecycle = threading.RLock()  # serialises start/stop
        self._state_lock = threading.Lock()
        self._stopped = threading.Event()
        self._stopped.set()

    # ------------------------------------------------------------ state
    def _set_state(self, state: str, detail: str = "") -> None:
        with self._state_lock:
            self.state, self.detail = state, detail
        (log.error if state == ERROR else log.info)("daemon %s%s", state, f": {detail}" if detail else "")
        self.events.emit("state", state=state, detail=detail)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-safe summary for faces (state, uptime, address, clients, models)."""
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
        }

    # ------------------------------------------------------------ start
    def start(self, timeout: float = 30.0) -> None:
        with self._lifecycle:
            if self.state == RUNNING:
                return
            self._set_state(STARTING)
            self._stopped.clear()
            try:
                self._start_components()
                self._verify_ping(timeout)
                self.started_at = time.time()
                self._set_state(RUNNING)
            except Exception as exc:
                reason = str(exc) if isinstance(exc, (PortInUse, DaemonStartError)) else f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, (PortInUse, DaemonStartError)):
                    log.exception("daemon failed to start")
                self._teardown(deadline=2.0)
                self._set_state(ERROR, reason)
                self.events.emit("warning", message=f"daemon failed to start: {reason}", level="error")
                raise DaemonStartError(reason) from None
        self._after_start()

    def _start_components(self) -> None:
        self.engine = select_engine(self.settings)
        self.registry = Registry(self.settings, self.engine, self.events)
        self.lora_cache = LoraCache(self.settings, self.registry, self.events)
        self.service = Service(
            self.settings, self.registry, self.events, self.token,
            status_provider=self.snapshot, on_shutdown=self.request_stop, lora_cache=self.lora_cache,
        )
        self.server = Server(self.settings, self.service, self.events)
        self.address = self.server.start()

    def _verify_ping(self, timeout: float) -> None:
        # Green only after a real protocol round-trip over the socket (not "port open").
        from luna_daemon.client import DaemonUnavailable, wait_for_daemon

        host, port = self.address  # type: ignore[misc]
        try:
            wait_for_daemon(host, port, timeout, token=self.token)
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
    def request_stop(self) -> None:
        """Stop from a request handler without deadlocking on our own in-flight request."""
        threading.Thread(target=self.stop, name="luna-stop", daemon=True).start()

    def stop(self, deadline: float | None = None) -> bool:
        """Stop cleanly. Returns True if in-flight work finished within ``deadline``."""
        deadline = self.settings.stop_timeout if deadline is None else deadline
        with self._lifecycle:
            if self.state in (STOPPED,):
                return True
            if self.state == ERROR and self.server is None:
                return True
            self._set_state(STOPPING)
            clean = self._teardown(deadline)
            self.started_at = None
            self._set_state(STOPPED, "" if clean else f"stop deadline of {deadline:.0f}s exceeded; unfinished requests were cut off")
            if not clean:
                self.events.emit("warning", message=f"stop deadline of {deadline:.0f}s exceeded", level="warning")
            return clean

    def _teardown(self, deadline: float) -> bool:
        t_end = time.monotonic() + deadline
        clean = True
        server, self.server = self.server, None
        if server is not None:
            server.close_listener()
            clean = server.wait_idle(max(0.0, t_end - time.monotonic()))
        if self.registry is not None:
            try:
                self._remember_models()
            finally:
                self.registry.close(max(0.5, t_end - time.monotonic()))
        if self.lora_cache is not None:
            self.lora_cache.clear()
        if server is not None:
            server.close_connections()
        if self.engine is not None:
            self.engine.close()
        self.registry = self.service = self.engine = self.lora_cache = None
        release_memory()
        self._stopped.set()
        return clean

    def _remember_models(self) -> None:
        if self.settings.warm_start and self.registry is not None:
            from luna_daemon.models.residency import save_loaded

            save_loaded(self)

    def wait_stopped(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)
