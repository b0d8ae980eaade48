"""Helpers shared by the tray tests: ports, bounded waits, a headless pystray backend.

``headless_pystray()`` returns a stand-in for the ``pystray`` module whose ``Icon`` is a
minimal subclass of ``pystray._base.Icon`` -- the base every real backend extends -- that
records what it would draw (colours, notifications) instead of talking to a desktop.
Only the drawing is replaced; TrayApp, pystray's Menu/MenuItem machinery, the Host, the
daemon and every ping are real.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


from luna_daemon.netutil import free_port  # noqa: E402,F401  (the tray tests import it from here)


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def port_free(port: int) -> bool:
    """Nobody listens on ``port``: connecting is refused and a listener can bind it again."""
    if listening(port):
        return False
    with socket.socket() as s:
        # SO_REUSEADDR skips TIME_WAIT leftovers of closed connections; a live listener
        # would still make bind fail on Linux.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(1)
        except OSError:
            return False
    return True


def wait_until(pred, timeout: float, what: str, interval: float = 0.05):
    """Poll ``pred`` until truthy (returned); AssertionError naming ``what`` on timeout."""
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def luna_env(home: Path, **luna: object) -> dict:
    """os.environ without a display, with LUNA_HOME=home and LUNA_<KEY>=value."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUNA_")}
    for k in ("DISPLAY", "WAYLAND_DISPLAY", "PYSTRAY_BACKEND"):
        env.pop(k, None)
    env.update(LUNA_HOME=str(home), HF_HUB_OFFLINE="1", LUNA_ENGINE="standalone", PYTHONUNBUFFERED="1")
    for k, v in luna.items():
        env[f"LUNA_{k.upper()}"] = str(v)
    return env


def spawn(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    out = open(log, "wb")
    try:
        return subprocess.Popen(argv, env=env, cwd=str(ROOT), stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()


def stop_process(p: subprocess.Popen, timeout: float = 60) -> int:
    if p.poll() is None:
        p.terminate()
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
            raise AssertionError(f"process {p.args} ignored SIGTERM for {timeout}s")
    return p.returncode


def tray_script() -> list[str]:
    return [sys.executable, str(ROOT / "luna_daemon" / "tray_app.py")]


_pystray_cache: dict = {}


def import_pystray_base():
    """(pystray, pystray._base) importable without a display (dummy backend at import)."""
    if not _pystray_cache:
        old = os.environ.get("PYSTRAY_BACKEND")
        if "pystray" not in sys.modules:
            os.environ["PYSTRAY_BACKEND"] = "dummy"
        try:
            import pystray
            from pystray import _base
        finally:
            if old is None:
                os.environ.pop("PYSTRAY_BACKEND", None)
            else:
                os.environ["PYSTRAY_BACKEND"] = old
        _pystray_cache.update(pystray=pystray, base=_base)
    return _pystray_cache["pystray"], _pystray_cache["base"]


def headless_pystray() -> types.SimpleNamespace:
    from luna_daemon.tray.icons import dominant_colour

    pystray, _base = import_pystray_base()

    class HeadlessIcon(_base.Icon):
        """pystray Icon whose 'screen' is a list: the colours shown and notifications."""

        HAS_NOTIFICATION = True

        def __init__(self, *a, **kw):
            self.colours: list[str | None] = []
            self.notes: list[tuple[str, str]] = []
            self.menu_updates = 0
            self._stopped = threading.Event()
            super().__init__(*a, **kw)

        def _show(self):
            pass

        def _hide(self):
            pass

        def _update_icon(self):
            self.colours.append(dominant_colour(self.icon))
            self._icon_valid = True

        def _update_title(self):
            pass

        def _update_menu(self):
            self.menu_updates += 1

        def _run(self):
            self._mark_ready()
            self._stopped.wait()

        def _run_detached(self):
            self._mark_ready()

        def _stop(self):
            self._stopped.set()

        def _notify(self, message, title=None):
            self.notes.append((title or self.title, message))

        def _remove_notification(self):
            pass

        def activate(self, *labels: str) -> None:
            """What a user does: pick an enabled item by its label (through pystray's MenuItem);
            several labels walk into submenus first (``activate("clip: running", "Stop")``)."""
            items = self.menu.items
            for depth, label in enumerate(labels):
                item = next((i for i in items if i.text == label), None)
                if item is None:
                    raise AssertionError(f"no menu item {label!r}: {[i.text for i in items]}")
                assert item.enabled, f"{label!r} is disabled"
                if depth < len(labels) - 1:
                    assert item.submenu, f"{label!r} has no submenu"
                    items = item.submenu.items
                    continue
                item(self)
                self.update_menu()

    return types.SimpleNamespace(Icon=HeadlessIcon, Menu=pystray.Menu, MenuItem=pystray.MenuItem)


def instances_toml(instances: list[dict]) -> str:
    """``[[instances]]`` tables for config.toml (string / int / float values)."""
    def value(v: object) -> str:
        return f'"{v}"' if isinstance(v, str) else str(v)

    return "".join("[[instances]]\n" + "".join(f"{k} = {value(v)}\n" for k, v in t.items()) for t in instances)


def write_config(luna_home: Path, text: str) -> Path:
    path = luna_home / "config" / "config.toml"  # where Settings.load looks under LUNA_HOME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def start_tray_app(tmp_path: Path, *, monitor: bool = False, instances: list[dict] | None = None, **overrides):
    """A TrayApp (headless backend) around a real Host on free ports, run() on a thread;
    ``monitor``: with the dashboard (the Open Dashboard / Settings items enabled);
    ``instances``: ``[[instances]]`` tables written to the config file (several = the
    host supervises child processes).

    Returns (app, host, thread, result); ``result["code"]`` is run()'s return value.
    """
    from luna_daemon.host import Host
    from luna_daemon.settings import Settings
    from luna_daemon.tray.app import TrayApp

    base = dict(port=free_port(), monitor_port=free_port(), lock_port=0, engine="standalone",
                autostart_delay=0.3, health_interval=0.3, stop_timeout=10.0)
    base.update(overrides)
    if instances:
        write_config(tmp_path / "luna", instances_toml(instances))
    settings = Settings.load(env={"LUNA_HOME": str(tmp_path / "luna")}, overrides=base)
    host = Host(settings, log_to_stderr=False)
    host.acquire()
    if monitor:
        host.start_monitor()
    app = TrayApp(host, headless_pystray())
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("code", app.run()), name="test-tray-run")
    t.start()
    return app, host, t, result


def finish_tray_app(app, host, thread) -> None:
    if thread.is_alive():
        app.request_exit()
        thread.join(30)
    host.close(5)


def glyph_state(img) -> str | None:
    """The state whose *glyph* the icon in ``img`` (a screen grab around it) shows, or None.

    Colour-blind on purpose: grayscale only, and only over the dark side of the moon (the
    glyph's disc; the crescent, the one part whose brightness differs by colour, is left
    out), against each state's mark scaled to the size the icon occupies on screen -- so a
    tray that only changed colour fails.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    from luna_daemon.tray import icons
    from luna_daemon.tray.menu import COLOURS

    rgb = np.asarray(img.convert("RGB"), dtype=int)
    bg = rgb[0, 0]
    ys, xs = np.nonzero(np.abs(rgb - bg).sum(axis=-1) > 60)
    if len(ys) < 16:
        return None
    # The panel may clip the icon's edges: pad with "unknown" so the fit can overhang.
    pad = 4
    y0, x0 = int(ys.min()) + pad, int(xs.min()) + pad
    n = int(max(ys.max() - ys.min(), xs.max() - xs.min())) + 1
    gray = np.pad(np.asarray(img.convert("L"), dtype=float), pad, constant_values=np.nan)
    best, best_d = None, float("inf")
    # The bounding box of a scaled, blended, maybe clipped icon is only good to a pixel or
    # two: search sizes and offsets around it.
    for m in (n - 1, n, n + 1, n + 2, n + 3):
        shadow = icons.shapes(icons.BRAND, 64)[2]
        k, r = m / 64, shadow.r * m / 64 - 1.5
        region = Image.new("1", (m, m))
        ImageDraw.Draw(region).ellipse((shadow.cx * k - r, shadow.cy * k - r, shadow.cx * k + r, shadow.cy * k + r), fill=1)
        inside = np.asarray(region)
        for colour in COLOURS:
            ref = icons.mark(colour, 64).resize((m, m), Image.BILINEAR)
            base = Image.new("RGBA", ref.size, (*bg.tolist(), 255))
            want = np.asarray(Image.alpha_composite(base, ref).convert("L"), dtype=float)
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    ty, tx = y0 + dy, x0 + dx
                    if ty < 0 or tx < 0 or ty + m > gray.shape[0] or tx + m > gray.shape[1]:
                        continue
                    diff = np.abs(gray[ty:ty + m, tx:tx + m] - want)[inside]
                    diff = diff[~np.isnan(diff)]
                    if len(diff) < inside.sum() * 0.8:
                        continue
                    d = float(diff.mean())
                    if d < best_d:
                        best, best_d = colour, d
    return best if best_d < 20 else None
