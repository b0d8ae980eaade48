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
waits on a stop. ``luna-tray-health`` pings the daemon every ``health_interval`` and on
every menu open. All icon / title / menu changes go through :meth:`TrayApp._update`.

Several instances (``[[instances]]``, ``Host.instances``): the health thread pings every
running instance, the icon shows the worst of them, Start / Stop Daemon act on all and each
instance gets a submenu (Start / Stop / Check Status); notifications name the instance.
One instance: exactly the single-daemon tray.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from luna_daemon.host import AlreadyRunning, Host, install_signal_handlers
from luna_daemon.settings import Settings
from luna_daemon.tray import autostart
from luna_daemon.tray.icons import mark
from luna_daemon.tray.menu import (
    FAILING,
    HEALTHY,
    UNKNOWN,
    InstanceState,
    TrayState,
    View,
    build_view,
    saved_text,
    sharing_changes,
    status_summary,
)
from luna_daemon.tray.notify import Notifier

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
EXIT_UNCLEAN = 4  # headless stop cut work off (as luna-daemon serve, cli.EXIT_UNCLEAN)
ICON_SIZE = 64
_WM_RBUTTONUP = 0x0205  # win32: the right-button release that opens pystray's menu


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
    host = Host(settings, log_to_stderr=_stderr_is_terminal())
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
                pystray = _import_pystray()
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


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def tray_unavailable_reason(env: dict | None = None, platform: str | None = None) -> str | None:
    """Why no tray can be shown here (None if one may be): no display, dummy backend."""
    env = os.environ if env is None else env
    platform = platform or sys.platform
    if env.get("PYSTRAY_BACKEND") == "dummy":
        return "PYSTRAY_BACKEND=dummy has no event loop"
    if platform in ("win32", "darwin"):
        return None
    if not env.get("DISPLAY") and not env.get("WAYLAND_DISPLAY"):
        return "no display (DISPLAY and WAYLAND_DISPLAY are unset)"
    return None


def _import_pystray() -> Any:
    # Imported lazily: at import time pystray picks a backend and connects to the display.
    import pystray

    return pystray


def run_headless(host: Host) -> int:
    """No usable tray: serve like ``luna-daemon serve`` (the caller closes the host)."""
    from luna_daemon.daemon import DaemonStartError

    try:
        return host.end_process(EXIT_OK if host.serve() else EXIT_UNCLEAN)
    except DaemonStartError as exc:
        log.error("Luna Daemon failed to start: %s", exc)
        return EXIT_FAIL


# How long open_target waits for the opener's exit code. xdg-open usually hands over to
# the browser and exits at once (rc 0, or 3/4 when nothing can open the URL); an opener
# still running after this is taken as success (some exec the browser itself).
OPEN_WAIT_S = 10.0


def open_target(target: str, wait: float = OPEN_WAIT_S) -> None:
    """Open a file or URL with the OS default application.

    Raises OSError when the opener is missing, cannot start, or exits non-zero within
    ``wait`` seconds. The child is always reaped: by this call, or by a daemon thread
    that waits for an opener that outlives ``wait`` (no zombie is left behind)."""
    if sys.platform == "win32":
        os.startfile(target)  # type: ignore[attr-defined]
        return
    opener = "open" if sys.platform == "darwin" else "xdg-open"
    # Silent: the opener must not write into our terminal. Its own session, so a Ctrl-C
    # in our terminal does not reach the browser it starts.
    proc = subprocess.Popen([opener, target], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    try:
        rc = proc.wait(wait)
    except subprocess.TimeoutExpired:
        threading.Thread(target=proc.wait, name="luna-tray-opener-reaper", daemon=True).start()
        return
    if rc != 0:
        raise OSError(f"{opener} exited with code {rc}")


# ----------------------------------------------------------------------------- icon class
def _icon_class(base: type) -> type:
    """pystray's backend Icon plus two hooks pystray lacks: menu-open and a GTK tooltip."""

    class LunaIcon(base):  # type: ignore[misc, valid-type]
        on_menu_open: Callable[[], None] | None = None

        def _create_menu(self, *args: Any, **kwargs: Any) -> Any:
            menu = super()._create_menu(*args, **kwargs)
            # GTK / AppIndicator: a Gtk.Menu emits "show" each time it pops up.
            if menu is not None and hasattr(menu, "connect") and hasattr(menu, "popup"):
                menu.connect("show", lambda *_: self._menu_opened())
            return menu

        def _menu_opened(self) -> None:
            if self.on_menu_open is not None:
                try:
                    self.on_menu_open()
                except Exception:
                    log.exception("menu-open hook failed")

        if hasattr(base, "_on_notify"):  # win32: the menu opens on right-button release
            def _on_notify(self, wparam: Any, lparam: Any) -> Any:
                if lparam == _WM_RBUTTONUP:
                    self._menu_opened()
                return super()._on_notify(wparam, lparam)

        def _update_title(self) -> None:
            super()._update_title()
            # Gtk.StatusIcon shows its tooltip, not its title, on hover; pystray sets only
            # the title. Both run on the GTK loop (pystray marshals via idle_add).
            status_icon = getattr(self, "_status_icon", None)
            if status_icon is not None:
                from gi.repository import GLib

                title = self.title
                GLib.idle_add(lambda: status_icon.set_tooltip_text(title) and False)

        def _show(self) -> None:
            super()._show()
            # pystray's GTK backend applies the title only on change, never on show.
            self._update_title()

        def is_embedded(self) -> bool | None:
            status_icon = getattr(self, "_status_icon", None)
            return None if status_icon is None else bool(status_icon.is_embedded())

    LunaIcon.__name__ = f"LunaIcon[{base.__module__}]"
    return LunaIcon


# ----------------------------------------------------------------------------- the app
class TrayApp:
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
            port=self.settings.port,
            dashboard=host.monitor is not None,
            autostart=autostart.is_enabled(),
            restart_needed=tuple(host.config_status()["restart_needed"]),
            # A broken config file: red from the first frame (the daemon will not start).
            **broken,
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
        self._probe_wanted = threading.Event()
        self._status_wanted = True  # next probe also asks for status (counts, memory)
        self._actions: queue.Queue[str | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._tray_failed = False
        self._exit_requested = threading.Event()
        self._unsubscribe: Callable[[], None] | None = None

        self.icon = _icon_class(pystray.Icon)(
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
        """Apply changes to one instance; the primary's also become the top-level fields
        (what the single-daemon view shows)."""
        with self._lock:
            instances = tuple(i.with_(**changes) if i.name == name else i for i in self._state.instances)
            self._update(instances=instances, **(changes if name == self.primary else {}))

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

    def _do_start(self) -> None:
        from luna_daemon.daemon import DaemonStartError

        if self._exit_requested.is_set():
            return
        if self.multi:
            # Primary first, then the children; one that fails does not keep the others
            # down (each failure is a state=error event, notified there).
            for name, reason in self.host.start_all().items():
                log.error("start of %s failed: %s", name, reason)
            return
        try:
            self.host.daemon.start()
        except DaemonStartError as exc:
            log.error("start failed: %s", exc)  # state=error already notified

    def _do_start_one(self, name: str) -> None:
        from luna_daemon.daemon import DaemonStartError

        if self._exit_requested.is_set():
            return
        try:
            self._instance(name).start()
        except DaemonStartError as exc:
            log.error("start of %s failed: %s", name, exc)  # state=error already notified

    def _do_stop(self) -> None:
        # In-flight requests finish (up to stop_timeout), models are unloaded, connections
        # closed; a missed deadline arrives as a ``warning`` event and is notified there.
        if self.multi:  # all at once, each with the same bounded clean stop
            self.host.stop_all(self.settings.stop_timeout)
            return
        self.host.daemon.stop(self.settings.stop_timeout)

    def _do_stop_one(self, name: str) -> None:
        self._instance(name).stop(self.settings.stop_timeout)

    def _do_check(self, title: str = "Luna Daemon status") -> None:
        """A real ``status`` call; the answer as a notification, the colour updated."""
        if self.multi:  # every instance, one line each
            lines = [f"{n}: {self._check_text(n)}" for n in self._instances()]
            saved = saved_text(self.state)  # the host total (refreshed by the status calls above)
            self.notifier.reply("\n".join(lines + ([saved] if saved else [])), title=title)
            return
        st = self.host.daemon.snapshot()
        if st["state"] != "running":
            self.notifier.reply(self.view.detail, title=title)  # the full reason, not the short row
            return
        ok, result = self._probe(self.primary, st, with_status=True)
        self.notifier.reply(status_summary(result) if ok else f"Not responding: {result}", title=title)

    def _do_check_one(self, name: str) -> None:
        self.notifier.reply(self._check_text(name), title=f"Luna Daemon status: {name}")

    def _check_text(self, name: str) -> str:
        """One instance's Check Status answer: a real status call when it runs, else its
        state with the whole reason."""
        from luna_daemon.tray.menu import instance_text

        st = self._instance(name).snapshot()
        if st["state"] != "running":
            return instance_text(self.instance_state(name), short=False)
        ok, result = self._probe(name, st, with_status=True)
        return status_summary(result) if ok else f"Not responding: {result}"

    def _do_show(self) -> None:
        # Another launch was refused: tell the user where the running one is.
        self._do_check(title="Luna Daemon is already running")

    def _do_unload(self) -> None:
        running = [st for st in (inst.snapshot() for inst in self._instances().values()) if st["state"] == "running"]
        if not running:
            return
        done = 0
        for st in running:  # every running instance
            # A user's action, counted like the CLI's (not supervision).
            with self._client(st["port"], self.settings.stop_timeout, supervisor=False) as c:
                done += len(c.unload(all=True))
        self.notifier.reply(f"Unloaded {done} model(s)", title="Luna Daemon")
        self._want_probe(status=True)

    def _do_logs(self) -> None:
        url = self.host.dashboard_url("logs")
        self._open(url or str(self.settings.log_file), "the log viewer" if url else "the log file",
                   also=f"; the log file is {self.settings.log_file}" if url else "")

    def _do_dashboard(self) -> None:
        self._open_dashboard("status")

    def _do_settings(self) -> None:
        self._open_dashboard("settings")

    def _open_dashboard(self, page: str) -> None:
        url = self.host.dashboard_url(page)
        if url is None:
            self.notifier.reply("The dashboard is not running; see the log file: " + str(self.settings.log_file))
            return
        self._open(url, f"the dashboard ({page})")

    def _open(self, target: str, what: str, also: str = "") -> None:
        shown = target.split("#", 1)[0].split("?", 1)[0]  # the log never gets the login secret
        log.info("opening %s: %s", what, shown)
        try:
            open_target(target)
        except OSError as exc:
            log.warning("could not open %s: %s", what, exc)
            # The full target (a dashboard URL logs the user in once), so it works by hand.
            kind = "a browser" if "://" in target else "a file viewer"
            self.notifier.reply(f"Could not open {kind} ({exc}): open {target} by hand{also}",
                                title=f"Luna Daemon: could not open {what}",
                                logged=f"Could not open {kind} ({exc}): open {shown} by hand{also}")

    def _do_autostart(self) -> None:
        want = not autostart.is_enabled()
        try:
            if want:
                path = autostart.enable(config=self.config)
                log.info("start at login enabled: %s", path)
            else:
                autostart.disable()
                log.info("start at login disabled")
        except autostart.AutostartError as exc:
            self.notifier.reply(f"Start at Login: {exc}")
        self._refresh_autostart()

    def _do_exit(self) -> None:
        self._update(busy="exiting")
        clean = self.host.close(self.settings.stop_timeout)
        if not clean:
            log.warning("exit: stop deadline of %.0fs exceeded", self.settings.stop_timeout)
        self._quit.set()
        self._probe_wanted.set()
        try:
            self.icon.stop()
        except Exception:
            log.exception("stopping the tray icon failed")

    # ------------------------------------------------------------ health
    def _want_probe(self, *, status: bool = False) -> None:
        with self._lock:
            self._status_wanted = self._status_wanted or status
        self._probe_wanted.set()

    def _health_loop(self) -> None:
        # Periodic ticks only ping (cheap, the health criterion); a status call -- counts
        # and memory for the status line -- is added when something may have changed.
        interval = max(0.2, float(self.settings.health_interval))
        while True:
            self._probe_wanted.wait(interval)
            self._probe_wanted.clear()
            if self._quit.is_set():
                return
            with self._lock:
                with_status, self._status_wanted = self._status_wanted, False
            # Each running instance gets its own real ping: green needs all of them. In turn:
            # a hung one delays the others' probe by at most its timeout (10 s).
            for name, inst in self._instances().items():
                if self._quit.is_set():
                    return
                st = inst.snapshot()
                if st["state"] == "running":
                    self._probe(name, st, with_status=with_status)

    @contextlib.contextmanager
    def _client(self, port: int, timeout: float, *, supervisor: bool = True) -> Iterator[Any]:
        """A short-lived DaemonClient, already pinged. ``supervisor``: its connection says
        so first (an authenticated hello), so the daemon keeps the tray's health probes out
        of its client count, request stats, events and log."""
        from luna_daemon.client import DaemonClient

        with DaemonClient(self.settings.host, port, token=self.host.daemon.token, timeout=timeout,
                          connect_timeout=min(timeout, 10.0), supervisor=supervisor) as c:
            c.ping()
            yield c

    def _probe(self, name: str, snapshot: dict, *, with_status: bool) -> tuple[bool, Any]:
        """A real ping (and status) of instance ``name`` over the socket; updates colour.
        -> (ok, status|reason)."""
        from luna_daemon.client import DaemonError, DaemonUnavailable

        with self._lock:
            generation = self._generation[name]
        timeout = min(10.0, max(2.0, float(self.settings.health_interval)))
        status: dict = {}
        try:
            with self._client(snapshot["port"], timeout) as c:  # pings on entry
                if with_status:
                    try:
                        status = c.status()
                    except DaemonError as exc:  # ping is the health criterion; status is detail
                        log.debug("status after a good ping failed: %s", exc)
        except (DaemonUnavailable, DaemonError, OSError) as exc:
            reason = getattr(exc, "message", None) or str(exc)
            self._health_result(name, generation, False, reason, {}, snapshot["port"])
            return False, reason
        self._health_result(name, generation, True, "", status, snapshot["port"])
        return True, status or {"state": "running", "port": snapshot["port"]}

    def _health_result(self, name: str, generation: int, ok: bool, reason: str, status: dict, port: int) -> None:
        with self._lock:
            current = self.instance_state(name)
            if generation != self._generation[name] or current.daemon != "running":
                return  # the daemon changed state while we probed: this answer is stale
            was = current.health
            changes: dict[str, Any] = {"health": HEALTHY if ok else FAILING, "health_detail": reason}
            if status:
                mem = sum(int((d or {}).get("models_bytes") or 0) for d in (status.get("devices") or {}).values())
                changes.update(models=int(status.get("models") or 0), clients=int(status.get("clients") or 0), memory_bytes=mem,
                               **sharing_changes(status))
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
        for name, target in (("luna-tray-actions", self._action_loop), ("luna-tray-health", self._health_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        if self.settings.autostart_daemon:
            t = threading.Thread(target=self._autostart, name="luna-tray-autostart", daemon=True)
            t.start()
        elif self.host.config_error:
            # (With autostart, the refused start's state=error notification says this.)
            self.notifier.alert(f"Config file error: {self.host.config_error}")
        threading.Thread(target=self._check_embedded, name="luna-tray-embed-check", daemon=True).start()
        self._glib_signals()
        log.info("tray icon shown (backend %s)", type(icon).__mro__[1].__module__)

    def _glib_signals(self) -> None:
        # pystray's GTK backends reset SIGINT to SIG_DFL when their loop starts ("do not
        # inhibit Ctrl+C"), which would kill us without a clean stop. GLib's own handler,
        # installed after that, runs on the loop and turns SIGINT/SIGTERM into Exit.
        glib = sys.modules.get("gi.repository.GLib")
        if glib is None or not hasattr(glib, "unix_signal_add") or sys.platform == "win32":
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            def on_signal(signum: int = signum) -> bool:
                log.info("signal %d: exiting", signum)
                self.request_exit()
                return True  # keep the source: a second signal must not kill us mid-stop
            glib.unix_signal_add(glib.PRIORITY_DEFAULT, signum, on_signal)

    def _autostart(self) -> None:
        if not self._quit.wait(max(0.0, float(self.settings.autostart_delay))) and not self._exit_requested.is_set():
            self._enqueue("start")

    def _check_embedded(self) -> None:
        # Gtk.StatusIcon silently shows nothing when no tray takes it; say so in the log.
        glib = sys.modules.get("gi.repository.GLib")
        if glib is None or self._quit.wait(10.0):
            return

        def check() -> bool:  # on the GTK loop: GTK objects are not thread-safe
            try:
                embedded = self.icon.is_embedded()
            except Exception:
                return False
            if embedded is False:
                log.warning("the tray icon is not embedded: is a system tray (notification area) running? "
                            "The daemon keeps running; use the dashboard or 'luna-daemon status'.")
            return False

        glib.idle_add(check)

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
        for t in self._threads:
            t.join(timeout=5.0)
        log.info("tray exited")
        return EXIT_OK

    def _fail_tray(self) -> None:
        self._tray_failed = True
        self._quit.set()
        self._probe_wanted.set()
        self._actions.put(None)
        # pystray's setup thread is a non-daemon thread blocked until the backend reports
        # ready; a backend that failed before that would keep the process alive forever.
        try:
            self.icon._mark_ready()
        except Exception:
            pass
