"""The system-tray app: one icon whose colour tells the truth about the daemon.

Entry point :func:`main` (``python luna_daemon/tray_app.py``, ``luna-daemon tray``, the
launchers). What a caller can rely on:

* The single-instance lock is taken first (:meth:`Host.acquire`). A second launch writes
  ``Luna Daemon is already running!`` to stdout, logs it, asks the running instance to
  show its status (it answers with a notification) and returns 1.
* Without a display, or without a usable tray backend, the reason is logged and the
  daemon runs headless under the same lock, monitor included -- like ``luna-daemon serve``.
* Exit (menu, SIGTERM, SIGINT) stops the daemon cleanly within ``stop_timeout``, stops
  the monitor, releases the lock, and :func:`main` returns 0; all three ports are free.

Threads: pystray's loop owns the main thread. Menu callbacks only hand work to the
``luna-tray-actions`` worker (or a short-lived thread for "open" actions), so the UI never
waits on a stop. One ``luna-tray-health-NAME`` thread per instance pings it every
``health_interval`` and on every menu open (``health.ProbeThreads``), so a hung instance
never delays another's colour. All icon / title / menu changes go through
:meth:`TrayApp._update`.

Several instances (``[[instances]]``, ``Host.instances``): each running instance gets its
own real ping, the icon shows the worst of them, Start / Stop Daemon act on all and each
instance gets a submenu (Start / Stop / Check Status); notifications name the instance.
One instance: exactly the single-daemon tray.

Split: this module is the app logic (state, events, health results, lifecycle);
``actions`` the menu actions, ``health`` the probe threads and the ping, ``platform`` the
pystray / GTK / OS glue (re-exported here: :func:`open_target`,
:func:`tray_unavailable_reason`), ``menu`` the pure view model.
"""

from __future__ import annotations

import functools
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from luna_daemon.host import AlreadyRunning, Host, install_signal_handlers
from luna_daemon.settings import Settings
from luna_daemon.tray import autostart, health
from luna_daemon.tray.actions import TrayActions
from luna_daemon.tray.icons import mark
from luna_daemon.tray.menu import (
    FAILING,
    HEALTHY,
    UNKNOWN,
    InstanceState,
    TrayState,
    View,
    build_view,
)
from luna_daemon.tray.notify import Notifier
from luna_daemon.tray.platform import (  # noqa: F401  (OPEN_WAIT_S, open_target: importable from here, as before)
    OPEN_WAIT_S,
    icon_class,
    import_pystray,
    install_glib_signals,
    open_target,
    stderr_is_terminal,
    tray_unavailable_reason,
    warn_if_not_embedded,
)

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
EXIT_UNCLEAN = 4  # headless stop cut work off (as luna-daemon serve, cli.EXIT_UNCLEAN)
ICON_SIZE = 64
# How long run() waits, in all, for its worker threads after the tray loop ended.
JOIN_TIMEOUT = 5.0


# ----------------------------------------------------------------------------- entry point
def main(config: str | None = None) -> int:
    """Run the tray (or headless daemon) until Exit. Returns the process exit code."""
    # Tolerant: a broken config.toml must not make a login-launched tray vanish. The Host
    # logs each problem to the log file (its path is known: a bad log_dir keeps the
    # default), the icon starts red naming file, line and key, and the daemon stays
    # stopped until the file is fixed (Host.reload_config then starts it).
    settings = Settings.load(config, tolerant=True)
    # A tray is a GUI app: it logs to its file (``luna-daemon logs``), and to stderr only
    # when a person watches a terminal. Detached launches (the launchers, autostart,
    # pythonw with sys.stderr None) must not fill an unrotated redirect file.
    host = Host(settings, log_to_stderr=stderr_is_terminal())
    try:
        host.acquire()
    except AlreadyRunning as exc:
        # The one message that must reach a person at a terminal (Host already logged it).
        if sys.stdout is not None:
            sys.stdout.write(f"{exc}\n")
            sys.stdout.flush()
        return EXIT_FAIL
    try:
        host.start_monitor()
        reason = tray_unavailable_reason()
        pystray = None
        if reason is None:
            try:
                pystray = import_pystray()
            except Exception as exc:  # ImportError, Xlib DisplayNameError, gi errors...
                reason = f"no usable system-tray backend ({type(exc).__name__}: {exc})"
        if pystray is None:
            log.warning("%s: running the daemon headless (like 'luna-daemon serve'); log file %s", reason, settings.log_file)
            return run_headless(host)
        try:
            app = TrayApp(host, pystray, config=config)
        except Exception as exc:  # e.g. the backend cannot create its icon object
            log.warning("the system tray could not be created (%s: %s): running the daemon headless",
                        type(exc).__name__, exc)
            return run_headless(host)
        code = app.run()
        if code is None:  # the tray failed to come up: keep serving without it
            return run_headless(host)
        return host.end_process(code)
    finally:
        host.close(settings.stop_timeout)


def run_headless(host: Host) -> int:
    """No usable tray: serve like ``luna-daemon serve`` (the caller closes the host)."""
    from luna_daemon.daemon import DaemonStartError

    try:
        return host.end_process(EXIT_OK if host.serve() else EXIT_UNCLEAN)
    except DaemonStartError as exc:
        log.error("Luna Daemon failed to start: %s", exc)
        return EXIT_FAIL


# ----------------------------------------------------------------------------- the app
class TrayApp(TrayActions):
    """The tray face of a :class:`Host`. ``run()`` blocks on the main thread until Exit."""

    def __init__(self, host: Host, pystray: Any, *, config: str | None = None):
        self.host = host
        self.settings = host.settings
        self.config = config
        self._pystray = pystray
        self._lock = threading.RLock()  # guards _state, _view and the push to the icon
        self.primary = host.daemon.name
        broken = {"daemon": "error", "detail": f"config file: {host.config_error}"} if host.config_error else {}
        self._state = TrayState(
            dashboard=host.monitor is not None,
            autostart=autostart.is_enabled(),
            restart_needed=tuple(host.config_status()["restart_needed"]),
            # A broken config file: red from the first frame (the daemon will not start).
            # (The primary's port is settings.port: instances.align_primary_port.)
            instances=tuple(
                InstanceState(name, service=inst.settings.service, port=inst.settings.port,
                              **(broken if name == self.primary else {}))
                for name, inst in self._instances().items()),
        )
        self.multi = self._state.multi
        self._view: View = build_view(self._state)
        self._pushed: View | None = None
        # Per instance, bumped on every state change of it: stale probes are dropped.
        self._generation: dict[str, int] = {i.name: 0 for i in self._state.instances}
        self._quit = threading.Event()
        # One thread per instance: a hung one (SIGSTOPped child) delays only its own probes.
        self._probes = health.ProbeThreads(list(self._generation), self._check_instance,
                                           interval=self.settings.health_interval, quit=self._quit)
        self._actions: queue.Queue[str | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._tray_failed = False
        self._exit_requested = threading.Event()
        self._unsubscribe: Callable[[], None] | None = None

        self.icon = icon_class(pystray.Icon)(
            "luna-daemon", icon=mark(self._view.colour, ICON_SIZE), title=self._view.title, menu=self._build_menu())
        self.icon.on_menu_open = self._on_menu_open
        if not getattr(pystray.Icon, "HAS_MENU", True):
            # pystray's plain-X11 backend: the dot shows the colour, but nothing is clickable.
            log.warning("this tray backend (%s) has no menu; install PyGObject for the GTK/AppIndicator "
                        "backends (see docs/tray.md). Meanwhile use the dashboard or the luna-daemon CLI.",
                        pystray.Icon.__module__)
        self.notifier = Notifier(self.icon, enabled=lambda: self.settings.notifications)

    def _instances(self) -> dict[str, Any]:
        """name -> Daemon | ChildInstance in config order, primary first."""
        return dict(self.host.instances)

    def _instance(self, name: str) -> Any:
        return self._instances()[name]

    # ------------------------------------------------------------ menu (pystray objects)
    def _build_menu(self, items: tuple | None = None) -> Any:
        # The structure is fixed for the host's life (its instances do not change); labels,
        # enabled and checked are read from the current view each time the menu is shown.
        P = self._pystray
        entries = []
        for spec in self._view.items if items is None else items:
            if spec.separator:
                entries.append(P.Menu.SEPARATOR)
                continue
            key = spec.key
            kwargs: dict[str, Any] = {"enabled": functools.partial(self._enabled, key)}
            if spec.submenu:
                entries.append(P.MenuItem(functools.partial(self._label, key), self._build_menu(spec.submenu), **kwargs))
                continue
            kwargs["default"] = key == "check"  # left click on the icon = Check Status (GTK, Windows)
            if spec.checked is not None:
                kwargs["checked"] = functools.partial(self._checked, key)
            # functools.partial has no __code__, so pystray calls it as action(icon, item).
            entries.append(P.MenuItem(functools.partial(self._label, key), functools.partial(self._clicked, key), **kwargs))
        return P.Menu(*entries)

    def _label(self, key: str, _item: Any) -> str:
        return self._view.item(key).label

    def _enabled(self, key: str, _item: Any) -> bool:
        return self._view.item(key).enabled

    def _checked(self, key: str, _item: Any) -> bool:
        return bool(self._view.item(key).checked)

    # ------------------------------------------------------------ the one place that draws
    def _update(self, **changes: Any) -> None:
        """Apply state changes and push what changed to the icon. Any thread; quick."""
        with self._lock:
            new = self._state.with_(**changes)
            self._state = new
            view = build_view(new)
            self._view = view
            old = self._pushed
            if old == view:
                return
            self._pushed = view
            icon = self.icon
            if old is None or old.colour != view.colour:
                icon.icon = mark(view.colour, ICON_SIZE)
                log.info("tray icon %s: %s", view.colour, view.title)
            if old is None or old.title != view.title:
                icon.title = view.title
            if old is None or old.items != view.items:
                try:
                    icon.update_menu()
                except NotImplementedError:  # backends without menus (xorg)
                    pass

    def _update_instance(self, name: str, **changes: Any) -> None:
        """Apply changes to one instance (the primary's are what the single-daemon view shows)."""
        with self._lock:
            self._update(instances=tuple(i.with_(**changes) if i.name == name else i for i in self._state.instances))

    def instance_state(self, name: str) -> InstanceState:
        with self._lock:
            return next(i for i in self._state.instances if i.name == name)

    def _who(self, name: str) -> str:
        """"Daemon", or with several instances "Daemon 'vae'": notifications name it."""
        return f"Daemon '{name}'" if self.multi else "Daemon"

    @property
    def state(self) -> TrayState:
        with self._lock:
            return self._state

    @property
    def view(self) -> View:
        with self._lock:
            return self._view

    # ------------------------------------------------------------ events from the daemon
    def _on_event(self, e: Any) -> None:
        # Runs on the emitting daemon thread: record and hand off, never block.
        # Events without an instance come from the primary (the host's own daemon).
        name = str(e.data.get("instance") or self.primary)
        if name not in self._generation:
            return  # not one of ours (an instance this host does not run)
        if e.type == "state":
            st, detail = e.data.get("state", ""), e.data.get("detail", "")
            with self._lock:
                self._generation[name] += 1
                changes: dict[str, Any] = {"daemon": st, "detail": detail, "health": UNKNOWN, "health_detail": ""}
                if st != "running":
                    changes.update(models=0, clients=0, memory_bytes=0)
                self._update_instance(name, **changes)
            if st == "running":
                self._want_probe(status=True)  # green only after our own ping succeeds
            elif st == "error":
                self.notifier.alert(f"{self._who(name)} error: {detail or 'unknown'}")
            elif st == "stopped" and detail:
                log.warning("daemon %s stopped: %s", name, detail)
        elif e.type == "warning":
            msg = str(e.data.get("message") or "warning")
            # Start failures (and a child's exit) come as state=error too, emitted just
            # before: notify once, not twice.
            if msg.startswith("daemon failed to start"):
                return
            if e.data.get("instance") and e.data.get("level") == "error" and self.instance_state(name).daemon == "error":
                return
            if self.multi and f"'{name}'" not in msg:
                msg = f"{name}: {msg}"
            self.notifier.alert(msg, title="Luna Daemon warning")
        elif e.type in ("model_loaded", "model_unloaded"):
            self._want_probe(status=True)  # refresh models / memory in the status line
        elif e.type == "config":
            self._update(restart_needed=tuple(e.data.get("restart_needed") or ()))
        elif e.type in ("client_connected", "client_disconnected"):
            # Our probes are supervision: the daemon neither counts nor announces them.
            clients = e.data.get("clients")
            with self._lock:
                if isinstance(clients, int) and self.instance_state(name).daemon == "running":
                    self._update_instance(name, clients=max(0, clients))

    def _on_lock_message(self, msg: str) -> None:
        if msg == "show":
            self._enqueue("show")

    def _on_menu_open(self) -> None:
        # GTK thread: only cheap work here. The probe runs on the health thread.
        self._want_probe(status=True)
        threading.Thread(target=self._refresh_autostart, name="luna-tray-autostart-check", daemon=True).start()

    def _refresh_autostart(self) -> None:
        self._update(autostart=autostart.is_enabled())

    # ------------------------------------------------------------ clicks
    def _clicked(self, key: str, _icon: Any = None, _item: Any = None) -> None:
        log.info("menu: %s", key)
        if key.startswith("instance:"):
            return  # a submenu row: opening it is all
        if key in ("logs", "dashboard", "settings", "autostart"):
            # Not queued behind a long Stop: these never touch the daemon's lifecycle.
            threading.Thread(target=self._run_action, args=(key,), name=f"luna-tray-{key}", daemon=True).start()
        elif key == "exit":
            self.request_exit()
        else:
            self._enqueue(key)

    def click(self, key: str) -> None:
        """Activate a menu item by key, as a user would (used by tests and the lock message)."""
        self._clicked(key)

    def request_exit(self) -> None:
        """Begin a clean exit (any thread, idempotent)."""
        if self._exit_requested.is_set():
            return
        self._exit_requested.set()
        self._update(busy="exiting")
        self._enqueue("exit")

    def _enqueue(self, key: str) -> None:
        self._actions.put(key)

    def _action_loop(self) -> None:
        while True:
            key = self._actions.get()
            if key is None:
                return
            self._run_action(key)
            if key == "exit":
                return

    def _run_action(self, key: str) -> None:
        # "start:vae" = an instance's submenu item: _do_start_one("vae").
        action, _, name = key.partition(":")
        try:
            if name:
                getattr(self, f"_do_{action}_one")(name)
            else:
                getattr(self, f"_do_{key}")()
        except Exception as exc:
            log.exception("tray action %s failed", key)
            self.notifier.alert(f"{key} failed: {exc}")

    def _do_exit(self) -> None:
        self._update(busy="exiting")
        clean = self.host.close(self.settings.stop_timeout)
        if not clean:
            log.warning("exit: stop deadline of %.0fs exceeded", self.settings.stop_timeout)
        self._quit.set()
        self._probes.want()  # wakes them to end
        try:
            self.icon.stop()
        except Exception:
            log.exception("stopping the tray icon failed")

    # ------------------------------------------------------------ health
    def _want_probe(self, *, status: bool = False) -> None:
        self._probes.want(status=status)

    def _check_instance(self, name: str, with_status: bool) -> None:
        # On the instance's own health thread. Each running instance gets its own real
        # ping: green needs all of them.
        st = self._instance(name).snapshot()
        if st["state"] == "running":
            self._probe(name, st, with_status=with_status)

    def _probe(self, name: str, snapshot: dict, *, with_status: bool) -> tuple[bool, Any]:
        """A real ping (and status) of instance ``name`` over the socket; updates colour.
        -> (ok, status|reason)."""
        with self._lock:
            generation = self._generation[name]
        ok, result = health.ping(self.settings.host, snapshot["port"], self.host.daemon.token,
                                 health.probe_timeout(self.settings.health_interval), with_status=with_status)
        if not ok:
            self._health_result(name, generation, False, result, {}, snapshot["port"])
            return False, result
        self._health_result(name, generation, True, "", result, snapshot["port"])
        return True, result or {"state": "running", "port": snapshot["port"]}

    def _health_result(self, name: str, generation: int, ok: bool, reason: str, status: dict, port: int) -> None:
        with self._lock:
            current = self.instance_state(name)
            if generation != self._generation[name] or current.daemon != "running":
                return  # the daemon changed state while we probed: this answer is stale
            was = current.health
            changes: dict[str, Any] = {"health": HEALTHY if ok else FAILING, "health_detail": reason}
            if status:
                changes.update(health.status_changes(status))
            if self.multi:  # the port it really listens on (port = 0: a free one); one instance: settings.port
                changes["port"] = int(port)
            self._update_instance(name, **changes)
        label = f"daemon {name}" if self.multi else "daemon"
        if ok and was == FAILING:
            log.info("%s answers ping again", label)
        elif not ok and was != FAILING:
            log.error("%s is not responding: %s", label, reason)
            self.notifier.alert(f"{self._who(name)} is not responding: {reason}")

    # ------------------------------------------------------------ lifecycle
    def _setup(self, icon: Any) -> None:
        # pystray's setup thread: must return quickly (pystray joins it on stop()).
        if self._tray_failed:
            return
        icon.visible = True
        self._update()
        t = threading.Thread(target=self._action_loop, name="luna-tray-actions", daemon=True)
        t.start()
        self._threads.append(t)
        self._probes.start()
        if self.settings.autostart_daemon:
            t = threading.Thread(target=self._autostart, name="luna-tray-autostart", daemon=True)
            t.start()
        elif self.host.config_error:
            # (With autostart, the refused start's state=error notification says this.)
            self.notifier.alert(f"Config file error: {self.host.config_error}")
        threading.Thread(target=warn_if_not_embedded, args=(self.icon, self._quit), name="luna-tray-embed-check",
                         daemon=True).start()
        install_glib_signals(self.request_exit)
        log.info("tray icon shown (backend %s)", type(icon).__mro__[1].__module__)

    def _autostart(self) -> None:
        if not self._quit.wait(max(0.0, float(self.settings.autostart_delay))) and not self._exit_requested.is_set():
            self._enqueue("start")

    def run(self) -> int | None:
        """Block until Exit; returns 0, or None if the tray could not be shown at all."""
        self._unsubscribe = self.host.events.subscribe(self._on_event)
        self.host.on_lock_message(self._on_lock_message)
        install_signal_handlers(self.request_exit)
        try:
            self.icon.run(setup=self._setup)
        except Exception as exc:
            if self._quit.is_set():
                # e.g. GTK closing its notification without a notification service: harmless now.
                log.debug("tray loop ended with %s after exit", exc)
            else:
                log.error("the system tray failed (%s: %s); running the daemon headless", type(exc).__name__, exc)
                self._fail_tray()
                return None
        finally:
            if self._unsubscribe is not None:
                self._unsubscribe()
        if not self._quit.is_set():
            # The loop ended without Exit (backend quit on its own): still stop cleanly.
            log.warning("tray loop ended unexpectedly; stopping")
            self._do_exit()
        end = time.monotonic() + JOIN_TIMEOUT  # one bound for all: a probe may hang up to its timeout
        for t in self._threads + self._probes.threads:
            t.join(timeout=max(0.0, end - time.monotonic()))
        log.info("tray exited")
        return EXIT_OK

    def _fail_tray(self) -> None:
        self._tray_failed = True
        self._quit.set()
        self._probes.want()
        self._actions.put(None)
        # pystray's setup thread is a non-daemon thread blocked until the backend reports
        # ready; a backend that failed before that would keep the process alive forever.
        try:
            self.icon._mark_ready()
        except Exception:
            pass
