"""The tray's platform glue: pystray, GTK / GLib and the OS opener -- nothing about the daemon.

What a caller can rely on:

* :func:`tray_unavailable_reason` decides, without importing pystray, whether a tray may be
  shown here; :func:`import_pystray` is the one place pystray is imported (at import time
  it picks a backend and connects to the display).
* :func:`icon_class` wraps a backend's ``Icon`` with a menu-open hook
  (``on_menu_open``), the GTK tooltip and ``is_embedded()``.
* :func:`install_glib_signals` and :func:`warn_if_not_embedded` do nothing where GLib is
  not loaded (the win32 / darwin / xorg backends).
* :func:`open_target` opens a file or URL with the OS default application and never leaves
  a zombie opener behind.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_WM_RBUTTONUP = 0x0205  # win32: the right-button release that opens pystray's menu

# How long open_target waits for the opener's exit code. xdg-open usually hands over to
# the browser and exits at once (rc 0, or 3/4 when nothing can open the URL); an opener
# still running after this is taken as success (some exec the browser itself).
OPEN_WAIT_S = 10.0


def stderr_is_terminal() -> bool:
    """Whether a person may be watching stderr (False for pythonw's ``None`` and redirects)."""
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


def import_pystray() -> Any:
    """The pystray module (raises whatever a backend raises when it cannot start)."""
    # Imported lazily: at import time pystray picks a backend and connects to the display.
    import pystray

    return pystray


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


def icon_class(base: type) -> type:
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


def install_glib_signals(on_signal: Callable[[], None]) -> None:
    """Under a GLib loop: SIGINT / SIGTERM call ``on_signal`` on that loop (every time)."""
    # pystray's GTK backends reset SIGINT to SIG_DFL when their loop starts ("do not
    # inhibit Ctrl+C"), which would kill us without a clean stop. GLib's own handler,
    # installed after that, runs on the loop and turns SIGINT/SIGTERM into Exit.
    glib = sys.modules.get("gi.repository.GLib")
    if glib is None or not hasattr(glib, "unix_signal_add") or sys.platform == "win32":
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        def handler(signum: int = signum) -> bool:
            log.info("signal %d: exiting", signum)
            on_signal()
            return True  # keep the source: a second signal must not kill us mid-stop
        glib.unix_signal_add(glib.PRIORITY_DEFAULT, signum, handler)


def warn_if_not_embedded(icon: Any, quit: threading.Event, after: float = 10.0) -> None:
    """Blocks up to ``after`` s (less if ``quit`` is set), then logs a warning if no system
    tray took the GTK icon. Run it on a thread of its own."""
    # Gtk.StatusIcon silently shows nothing when no tray takes it; say so in the log.
    glib = sys.modules.get("gi.repository.GLib")
    if glib is None or quit.wait(after):
        return

    def check() -> bool:  # on the GTK loop: GTK objects are not thread-safe
        try:
            embedded = icon.is_embedded()
        except Exception:
            return False
        if embedded is False:
            log.warning("the tray icon is not embedded: is a system tray (notification area) running? "
                        "The daemon keeps running; use the dashboard or 'luna-daemon status'.")
        return False

    glib.idle_add(check)
