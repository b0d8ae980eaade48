"""The tray's menu actions: what Start, Stop, Check Status, Unload, the "open" items and
Start at Login do (Exit and the dispatch are :class:`~luna_daemon.tray.app.TrayApp`'s).

:class:`TrayActions` is a mixin of ``TrayApp``: each ``_do_KEY`` (``_do_ACTION_one(name)``
for an instance's submenu item ``ACTION:NAME``) runs on the ``luna-tray-actions`` worker or
a short-lived thread, never on the UI thread, and may block. It uses these ``TrayApp``
members: ``host``, ``settings``, ``config``, ``multi``, ``primary``, ``notifier``,
``state``, ``view``, ``_exit_requested``, ``_instances()``, ``_instance(name)``,
``instance_state(name)``, ``_probe(...)``, ``_want_probe(...)``, ``_refresh_autostart()``.
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import TYPE_CHECKING, Any

from luna_daemon.tray import autostart, health
from luna_daemon.tray.menu import instance_text, saved_text, status_summary
from luna_daemon.tray.platform import open_target

if TYPE_CHECKING:
    import threading

    from luna_daemon.host import Host
    from luna_daemon.settings import Settings
    from luna_daemon.tray.menu import InstanceState, TrayState, View
    from luna_daemon.tray.notify import Notifier

log = logging.getLogger(__name__)


class TrayActions:
    """The menu actions of a TrayApp (see the module docstring for what they rely on)."""

    if TYPE_CHECKING:  # provided by TrayApp
        host: Host
        settings: Settings
        config: str | None
        multi: bool
        primary: str
        notifier: Notifier
        _exit_requested: threading.Event

        @property
        def state(self) -> TrayState: ...
        @property
        def view(self) -> View: ...
        def _instances(self) -> dict[str, Any]: ...
        def _instance(self, name: str) -> Any: ...
        def instance_state(self, name: str) -> InstanceState: ...
        def _probe(self, name: str, snapshot: dict, *, with_status: bool) -> tuple[bool, Any]: ...
        def _want_probe(self, *, status: bool = False) -> None: ...
        def _refresh_autostart(self) -> None: ...

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
            # Asked at once: a hung instance costs its probe timeout once, not once per
            # instance after it (the queued menu actions wait behind this one).
            names = list(self._instances())
            with concurrent.futures.ThreadPoolExecutor(len(names), thread_name_prefix="luna-tray-check") as pool:
                texts = list(pool.map(self._check_text, names))
            lines = [f"{n}: {t}" for n, t in zip(names, texts)]
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
            with health.client(self.settings.host, st["port"], self.host.daemon.token, self.settings.stop_timeout,
                               supervisor=False) as c:
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

