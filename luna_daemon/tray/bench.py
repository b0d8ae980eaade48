"""Startup benchmark: how long from launching Luna Daemon until it is green.

``startup_benchmark(repeats)`` (``luna-daemon bench --startup``) measures, per run:

* mode ``tray-xvfb`` (Linux with the virtual-session tools, see ``xsession``): launch
  ``python luna_daemon/tray_app.py`` on a private Xvfb + trayer + D-Bus + dunst, with
  the GTK backend, and time until the docked icon's pixels turn green on screen. This
  includes the default ``autostart_delay`` (1 s), i.e. what a user waits for.
* mode ``headless`` otherwise: launch ``luna-daemon serve`` and time until the first
  successful protocol ``ping``.

Every run uses a fresh temporary ``LUNA_HOME`` (default settings) and free ports, so it
never touches the user's config, running daemon or desktop. Returns
``{"lines", "median_s", "samples", "mode", ...}``; times are wall-clock seconds.
"""

from __future__ import annotations

import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from luna_daemon.netutil import free_port

log = logging.getLogger(__name__)

_POLL = 0.01
_TIMEOUT = 120.0


def _env(home: Path, base: dict | None = None) -> dict:
    env = {k: v for k, v in (base if base is not None else os.environ).items() if not k.startswith("LUNA_")}
    env.update(LUNA_HOME=str(home), LUNA_PORT=str(free_port()), LUNA_MONITOR_PORT=str(free_port()),
               LUNA_LOCK_PORT=str(free_port()), HF_HUB_OFFLINE="1")
    return env


def _stop(p: subprocess.Popen) -> int | None:
    if p.poll() is None:
        p.terminate()
        try:
            return p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
            return None
    return p.returncode


def _tray_script() -> str:
    return str(Path(__file__).resolve().parents[1] / "tray_app.py")


def _run_tray(session: Any, workdir: Path) -> tuple[float, float]:
    """One launch of the tray on ``session``: (seconds to docked, seconds to green)."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = session.env(_env(workdir / "luna"))
    env.update(PYSTRAY_BACKEND="gtk", XDG_CONFIG_HOME=str(workdir / "xdg"))
    out = open(workdir / "tray.out", "wb")
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, _tray_script()], env=env, cwd=str(workdir), stdout=out, stderr=subprocess.STDOUT)
    out.close()
    docked = green = None
    try:
        while time.perf_counter() - t0 < _TIMEOUT:
            if p.poll() is not None:
                raise RuntimeError(f"tray exited with {p.returncode}: {(workdir / 'tray.out').read_text(errors='replace')[-800:]}")
            if docked is None and session.docked_icons("tray_app.py"):
                docked = time.perf_counter() - t0
            if docked is not None and session.panel_colour() == "green":
                green = time.perf_counter() - t0
                break
            time.sleep(_POLL)
        if green is None:
            raise RuntimeError(f"the tray did not turn green within {_TIMEOUT:.0f}s")
    finally:
        _stop(p)
    end = time.monotonic() + 15
    while session.docked_icons("tray_app.py") and time.monotonic() < end:
        time.sleep(0.05)  # the next run must not see this run's icon
    return docked or green, green


def _run_headless(workdir: Path) -> float:
    from luna_daemon.client import DaemonUnavailable, wait_for_daemon

    workdir.mkdir(parents=True, exist_ok=True)
    env = _env(workdir / "luna")
    port = int(env["LUNA_PORT"])
    out = open(workdir / "serve.out", "wb")
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "luna_daemon", "serve"], env=env, cwd=str(workdir),
                         stdout=out, stderr=subprocess.STDOUT)
    out.close()
    try:
        try:
            wait_for_daemon("127.0.0.1", port, _TIMEOUT, proc=p, interval=_POLL)
        except DaemonUnavailable as exc:
            raise RuntimeError(f"{exc}: {(workdir / 'serve.out').read_text(errors='replace')[-800:]}") from None
        return time.perf_counter() - t0
    finally:
        _stop(p)


def startup_benchmark(repeats: int = 3) -> dict:
    """Launch → green, ``repeats`` times. See the module docstring for the two modes."""
    repeats = max(1, int(repeats))
    mode = "headless"
    why = ""
    if sys.platform.startswith("linux"):
        from luna_daemon.tray.xsession import missing_tools

        missing = missing_tools()
        if missing:
            why = "virtual tray session unavailable (missing: " + ", ".join(missing) + ")"
        else:
            mode = "tray-xvfb"
    else:
        why = "the virtual tray session is Linux-only"
    samples: list[float] = []
    docked: list[float] = []
    with tempfile.TemporaryDirectory(prefix="luna-bench-startup-") as tmp:
        root = Path(tmp)
        if mode == "tray-xvfb":
            from luna_daemon.tray.xsession import XSession

            with XSession(root / "x") as session:
                for i in range(repeats):
                    d, g = _run_tray(session, root / f"run{i}")
                    docked.append(d)
                    samples.append(g)
                    log.info("startup run %d: docked %.2fs, green %.2fs", i + 1, d, g)
        else:
            for i in range(repeats):
                samples.append(_run_headless(root / f"run{i}"))
                log.info("startup run %d: first ping %.2fs", i + 1, samples[-1])
    median = statistics.median(samples)
    from luna_daemon.settings import Settings

    delay = Settings().autostart_delay
    if mode == "tray-xvfb":
        lines = [
            f"startup: tray app under Xvfb (GTK backend, trayer), {repeats} run(s)",
            f"  launch → icon docked (gray): median {statistics.median(docked):.2f}s",
            f"  launch → icon green on screen: median {median:.2f}s "
            f"(min {min(samples):.2f}s, max {max(samples):.2f}s; includes autostart_delay {delay:g}s)",
        ]
    else:
        lines = [
            f"startup: 'luna-daemon serve' → first successful ping, {repeats} run(s)" + (f" ({why})" if why else ""),
            f"  median {median:.2f}s (min {min(samples):.2f}s, max {max(samples):.2f}s)",
        ]
    report: dict[str, Any] = {"lines": lines, "median_s": median, "samples": samples, "mode": mode}
    if mode == "tray-xvfb":
        report.update(docked_samples=docked, autostart_delay_s=delay)
    return report
