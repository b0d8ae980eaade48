"""A throw-away desktop on a virtual screen: Xvfb + a session D-Bus + trayer + dunst.

Used by the end-to-end tray test and by ``luna-daemon bench --startup`` to run the real
tray app (pystray GTK backend) and look at it the way a user does: screenshots, pixel
colours of the docked icon, mouse and keyboard through xdotool, notifications as seen on
the bus (``dbus-monitor``). Linux only; :func:`missing_tools` says what is not installed.

What a caller can rely on:

* :meth:`XSession.start` picks a free display number itself (``Xvfb -displayfd``), so
  sessions never collide with each other or with a real desktop; ``env()`` gives the
  ``DISPLAY`` and ``DBUS_SESSION_BUS_ADDRESS`` to pass to the app.
* Every wait is bounded and raises :class:`XSessionError` with what was last seen.
* :meth:`XSession.stop` ends every process it started (by pid) and is idempotent.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TOOLS = ("Xvfb", "trayer", "dbus-daemon", "dunst", "xdotool", "import", "dbus-monitor")


class XSessionError(RuntimeError):
    pass


def missing_tools() -> list[str]:
    """Programs (and Python modules) the virtual session needs that are not available."""
    out = [t for t in TOOLS if shutil.which(t) is None]
    try:
        import Xlib.display  # noqa: F401  (python-xlib, installed with pystray on Linux)
    except ImportError:
        out.append("python-xlib")
    try:
        import gi

        gi.require_version("Gtk", "3.0")
    except (ImportError, ValueError):
        out.append("PyGObject with GTK 3 (pip install 'PyGObject<3.51' pycairo; gir1.2-gtk-3.0)")
    return out


@dataclass(frozen=True)
class Rect:
    x: int
    y: int
    w: int
    h: int

    @property
    def centre(self) -> tuple[int, int]:
        return self.x + self.w // 2, self.y + self.h // 2


@dataclass(frozen=True)
class Window:
    id: int
    name: str
    wm_class: tuple[str, ...]
    rect: Rect
    depth: int  # 0 = child of the root
    parent_ids: tuple[int, ...]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    """Poll ``predicate`` until truthy; raise XSessionError naming ``what`` on timeout."""
    end = time.monotonic() + timeout
    last: object = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= end:
            raise XSessionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


class XSession:
    def __init__(self, workdir: str | os.PathLike | None = None, width: int = 640, height: int = 480):
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="luna-xsession-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.width, self.height = width, height
        self.display = ""
        self.bus = ""
        self._procs: list[subprocess.Popen] = []
        self._x = None
        self.notify_log = self.workdir / "notifications.log"

    # ------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 20.0) -> XSession:
        missing = missing_tools()
        if missing:
            raise XSessionError("missing: " + ", ".join(missing))
        try:
            self._start_xvfb(timeout)
            self._start_bus(timeout)
            env = self.env()
            self._spawn(["trayer", "--edge", "top", "--align", "right", "--widthtype", "request", "--height", "32",
                         "--tint", "0x404040", "--transparent", "false"], env, "trayer")
            wait_for(lambda: self.find_windows(name="panel"), timeout, "the trayer panel")
            self._spawn(["dunst"], env, "dunst")
            wait_for(lambda: self._bus_has("org.freedesktop.Notifications"), timeout, "dunst on the session bus")
            self._spawn(["dbus-monitor", "interface='org.freedesktop.Notifications',member='Notify'"],
                        env, "dbus-monitor", stdout=self.notify_log)
            wait_for(lambda: self.notify_log.exists() and self.notify_log.stat().st_size > 0, timeout, "dbus-monitor")
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, argv: list[str], env: dict, name: str, stdout: Path | None = None,
               pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
        out = open(stdout or self.workdir / f"{name}.log", "wb")
        try:
            p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 pass_fds=pass_fds, start_new_session=True)
        finally:
            out.close()
        self._procs.append(p)
        return p

    def _start_xvfb(self, timeout: float) -> None:
        r, w = os.pipe()
        try:
            p = self._spawn(["Xvfb", "-displayfd", str(w), "-screen", "0", f"{self.width}x{self.height}x24",
                             "-nolisten", "tcp", "-noreset"], dict(os.environ), "xvfb", pass_fds=(w,))
        finally:
            os.close(w)
        buf = b""
        end = time.monotonic() + timeout
        try:
            while not buf.endswith(b"\n"):
                if time.monotonic() > end or p.poll() is not None:
                    raise XSessionError(f"Xvfb did not report a display: {(self.workdir / 'xvfb.log').read_text(errors='replace')[-500:]}")
                import select

                ready, _, _ = select.select([r], [], [], 0.2)
                if ready:
                    chunk = os.read(r, 64)
                    if not chunk:
                        break
                    buf += chunk
        finally:
            os.close(r)
        self.display = ":" + buf.decode().strip()
        from Xlib import display as xdisplay

        self._x = wait_for(lambda: self._try_connect(xdisplay), timeout, f"X server {self.display}")

    def _try_connect(self, xdisplay) -> object:
        try:
            return xdisplay.Display(self.display)
        except Exception:
            return None

    def _start_bus(self, timeout: float) -> None:
        sock = self.workdir / "bus"
        self._spawn(["dbus-daemon", "--session", "--nofork", "--nopidfile", f"--address=unix:path={sock}"],
                    dict(os.environ), "dbus")
        wait_for(sock.exists, timeout, "the session bus socket")
        self.bus = f"unix:path={sock}"

    def _bus_has(self, name: str) -> bool:
        try:
            out = subprocess.run(
                ["dbus-send", "--session", "--print-reply", "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
                 "org.freedesktop.DBus.NameHasOwner", f"string:{name}"],
                env=self.env(), capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return "boolean true" in out.stdout

    def env(self, base: dict | None = None) -> dict:
        """``base`` (default: os.environ) with this session's DISPLAY and bus address."""
        env = dict(os.environ if base is None else base)
        env.pop("WAYLAND_DISPLAY", None)
        env.update(DISPLAY=self.display, DBUS_SESSION_BUS_ADDRESS=self.bus, NO_AT_BRIDGE="1")
        return env

    def stop(self) -> None:
        if self._x is not None:
            try:
                self._x.close()
            except Exception:
                pass
            self._x = None
        for p in reversed(self._procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)  # our own session (start_new_session)
                except OSError:
                    pass
        for p in reversed(self._procs):
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        self._procs.clear()

    def __enter__(self) -> XSession:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ looking
    def windows(self) -> list[Window]:
        """Every window on the screen (depth-first), with absolute geometry."""
        assert self._x is not None, "session not started"
        x = self._x
        root = x.screen().root
        out: list[Window] = []

        def walk(win, depth: int, parents: tuple[int, ...]) -> None:
            try:
                children = win.query_tree().children
            except Exception:
                return
            for child in children:
                try:
                    geo = child.get_geometry()
                    pos = child.translate_coords(root, 0, 0)
                    name = child.get_wm_name() or ""
                    cls = child.get_wm_class() or ()
                    attrs = child.get_attributes()
                except Exception:
                    continue  # windows come and go while we walk
                if isinstance(name, bytes):
                    name = name.decode("utf-8", "replace")
                viewable = attrs.map_state == 2
                if viewable:
                    # translate_coords gives root->child offset; negate for the child's origin.
                    out.append(Window(child.id, name, tuple(cls), Rect(-pos.x, -pos.y, geo.width, geo.height), depth, parents))
                    walk(child, depth + 1, parents + (child.id,))

        walk(root, 0, ())
        x.sync()
        return out

    def find_windows(self, name: str | None = None, wm_class: str | None = None,
                     min_size: int = 2, top_level: bool | None = None) -> list[Window]:
        out = []
        for w in self.windows():
            if name is not None and w.name != name:
                continue
            if wm_class is not None and wm_class not in w.wm_class:
                continue
            if w.rect.w < min_size or w.rect.h < min_size:
                continue
            if top_level is not None and (w.depth == 0) != top_level:
                continue
            out.append(w)
        return out

    def panel(self) -> Window | None:
        found = self.find_windows(name="panel", top_level=True)
        return found[0] if found else None

    def docked_icons(self, wm_class: str) -> list[Window]:
        """Icon windows of ``wm_class`` embedded in the trayer panel (i.e. docked)."""
        panel = self.panel()
        if panel is None:
            return []
        return [w for w in self.find_windows(wm_class=wm_class, min_size=8) if panel.id in w.parent_ids]

    def menus(self, wm_class: str, min_size: int = 100) -> list[Window]:
        """Top-level popup windows of ``wm_class`` at least ``min_size`` px both ways (menus)."""
        return [w for w in self.find_windows(wm_class=wm_class, min_size=min_size, top_level=True)
                if w.rect.w < self.width or w.rect.h < self.height]

    def grab(self, rect: Rect):
        """The pixels of ``rect`` on screen as a PIL RGB image (fast: one X request)."""
        from PIL import Image
        from Xlib import X

        assert self._x is not None
        root = self._x.screen().root
        r = self._clip(rect)
        raw = root.get_image(r.x, r.y, r.w, r.h, X.ZPixmap, 0xFFFFFFFF)
        return Image.frombytes("RGB", (r.w, r.h), raw.data, "raw", "BGRX")

    def _clip(self, r: Rect) -> Rect:
        x, y = max(0, r.x), max(0, r.y)
        w = max(1, min(r.x + r.w, self.width) - x)
        h = max(1, min(r.y + r.h, self.height) - y)
        return Rect(x, y, w, h)

    def panel_colour(self) -> str | None:
        """The palette colour (gray/yellow/green/red) the tray panel shows, or None."""
        from luna_daemon.tray.icons import dominant_colour

        panel = self.panel()
        if panel is None:
            return None
        return dominant_colour(self.grab(panel.rect))

    def screenshot(self, path: str | os.PathLike) -> Path:
        """A PNG of the whole screen via ImageMagick ``import -window root``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["import", "-window", "root", str(path)], env=self.env(), check=True, timeout=30,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return path

    # ------------------------------------------------------------ touching
    def xdotool(self, *args: str) -> None:
        subprocess.run(["xdotool", *args], env=self.env(), check=True, timeout=15, capture_output=True)

    def right_click(self, x: int, y: int) -> None:
        self.xdotool("mousemove", str(x), str(y), "click", "3")

    def park_mouse(self) -> None:
        """Move the pointer to a corner where it touches no menu or icon (no hover effects)."""
        self.xdotool("mousemove", "5", str(self.height - 5))

    def keys(self, *keys: str, delay_ms: int = 60) -> None:
        self.xdotool("key", "--delay", str(delay_ms), *keys)

    # ------------------------------------------------------------ notifications
    def notifications(self) -> list[dict]:
        """Every Notify call seen on the bus so far: [{"summary", "body", "app"}, ...]."""
        try:
            text = self.notify_log.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        out = []
        for block in re.split(r"\n(?=method call )", text):
            if "member=Notify" not in block:
                continue
            strings = re.findall(r'^\s+string "(.*)"$', block, flags=re.M)
            if len(strings) >= 4:
                out.append({"app": strings[0], "summary": strings[2], "body": strings[3]})
        return out
