"""The tray's view model: a state snapshot in, colour + title + menu item specs out.

Pure on purpose (no pystray, no sockets, no clock): every rule about what the user sees
lives here and is unit-tested without a screen. ``luna_daemon.tray.app`` feeds it a
:class:`TrayState` and copies the resulting :class:`View` onto the real icon.

What a caller can rely on:

* :func:`colour_for` is green **only** for a daemon in state ``running`` whose last
  health probe (a real ``ping`` over the socket) succeeded *after* it entered
  ``running``; a failed probe makes it red with the reason, a probe not yet done keeps
  it yellow. Gray = stopped, yellow = starting / stopping / exiting, red = error.
* :func:`build_view` returns the items in the fixed order of :data:`MENU_KEYS` with
  separators (``key == "-"``) between groups; equal states give equal views, so a
  face can skip redrawing when nothing changed.
* Titles are at most :data:`TITLE_MAX` characters (the Windows tooltip limit is 127).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GRAY, YELLOW, GREEN, RED = "gray", "yellow", "green", "red"
COLOURS = (GRAY, YELLOW, GREEN, RED)

# Health of the last probe, as seen by the tray (independent of the daemon's own state).
UNKNOWN, HEALTHY, FAILING = "unknown", "ok", "failing"

APP_NAME = "Luna Daemon"
TITLE_MAX = 127
STATUS_MAX = 80

MENU_KEYS = (
    "status", "start", "stop", "check", "logs", "dashboard", "settings", "unload", "autostart", "exit",
)

LABELS = {
    "start": "Start Daemon",
    "stop": "Stop Daemon",
    "check": "Check Status",
    "logs": "View Logs",
    "dashboard": "Open Dashboard",
    "settings": "Settings…",
    "unload": "Unload All Models",
    "autostart": "Start at Login",
    "exit": "Exit",
}


@dataclass(frozen=True)
class TrayState:
    """Everything the tray shows. ``daemon`` is the Daemon's state string."""

    daemon: str = "stopped"
    detail: str = ""
    health: str = UNKNOWN
    health_detail: str = ""
    models: int = 0
    clients: int = 0
    memory_bytes: int = 0
    port: int = 19283
    autostart: bool = False
    autostart_supported: bool = True
    dashboard: bool = False
    busy: str = ""  # an action in progress that changes what may be clicked: "exiting"

    def with_(self, **changes) -> TrayState:
        return replace(self, **changes)


@dataclass(frozen=True)
class ItemSpec:
    """One menu row. ``checked`` is None for a plain item; ``key == "-"`` is a separator."""

    key: str
    label: str = ""
    enabled: bool = True
    checked: bool | None = None

    @property
    def separator(self) -> bool:
        return self.key == "-"


SEPARATOR = ItemSpec("-")


@dataclass(frozen=True)
class View:
    colour: str
    title: str
    status: str
    items: tuple[ItemSpec, ...]

    def item(self, key: str) -> ItemSpec:
        for it in self.items:
            if it.key == key:
                return it
        raise KeyError(key)


def colour_for(s: TrayState) -> str:
    if s.busy == "exiting":
        return YELLOW
    if s.daemon == "error":
        return RED
    if s.daemon in ("starting", "stopping"):
        return YELLOW
    if s.daemon == "running":
        return {HEALTHY: GREEN, FAILING: RED}.get(s.health, YELLOW)
    return GRAY


def format_bytes(n: int) -> str:
    if n < 1000**2:
        return f"{n / 1000:.0f} KB" if n else "0 MB"
    if n < 1000**3:
        return f"{n / 1000**2:.0f} MB"
    return f"{n / 1000**3:.1f} GB"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())  # tooltips and menu rows are one line
    return text if len(text) <= limit else text[: limit - 1] + "…"


def status_line(s: TrayState) -> str:
    """The disabled first menu row: state · models · clients · memory (or the reason)."""
    colour = colour_for(s)
    if s.busy == "exiting":
        text = "Exiting…"
    elif s.daemon == "error":
        text = f"Error: {s.detail or 'unknown'}"
    elif s.daemon == "running" and colour == RED:
        text = f"Not responding: {s.health_detail or 'no answer to ping'}"
    elif s.daemon == "running" and colour == YELLOW:
        text = f"Running on port {s.port} · checking…"
    elif s.daemon == "running":
        text = " · ".join(("Running", _plural(s.models, "model"), _plural(s.clients, "client"), format_bytes(s.memory_bytes)))
    elif s.daemon == "starting":
        text = "Starting…"
    elif s.daemon == "stopping":
        text = "Stopping…"
    else:
        text = "Stopped" + (f" ({s.detail})" if s.detail else "")
    return _clip(text, STATUS_MAX)


def title_for(s: TrayState) -> str:
    """Tooltip / title: app name + the status line, with the full reason for red."""
    colour = colour_for(s)
    line = status_line(s)
    if colour == RED:
        reason = s.detail if s.daemon == "error" else s.health_detail
        line = ("Error: " if s.daemon == "error" else "Not responding: ") + (reason or "unknown")
    elif s.daemon == "running" and colour == GREEN:
        line = f"{line} · port {s.port}"
    return _clip(f"{APP_NAME} — {line}", TITLE_MAX)


def build_view(s: TrayState) -> View:
    exiting = s.busy == "exiting"
    st = s.daemon
    running = st == "running"

    def item(key: str, enabled: bool, checked: bool | None = None) -> ItemSpec:
        return ItemSpec(key, LABELS[key], enabled and not exiting, checked)

    status = status_line(s)
    items = (
        ItemSpec("status", status, False),
        SEPARATOR,
        item("start", st in ("stopped", "error")),
        # Stop is offered while running even when the probe fails: a hung daemon must
        # still be stoppable. While starting, Daemon.stop would only queue behind start.
        item("stop", running),
        item("check", True),
        SEPARATOR,
        item("logs", True),
        item("dashboard", s.dashboard),
        item("settings", s.dashboard),
        SEPARATOR,
        item("unload", running and s.models > 0),
        item("autostart", s.autostart_supported, s.autostart),
        SEPARATOR,
        item("exit", True),
    )
    return View(colour_for(s), title_for(s), status, items)


def status_summary(status: dict) -> str:
    """One human paragraph from a protocol ``status`` result (for the notification)."""
    req = status.get("requests") or {}
    mem = sum(int((d or {}).get("models_bytes") or 0) for d in (status.get("devices") or {}).values())
    parts = [
        f"{str(status.get('state') or 'running').capitalize()} on port {status.get('port', '?')}",
        f"{_plural(int(status.get('models') or 0), 'model')} ({format_bytes(mem)})",
        _plural(int(status.get("clients") or 0), "client"),
        f"{int(req.get('total') or 0)} requests ({int(req.get('errors') or 0)} failed)",
        f"engine {status.get('engine', '?')}",
    ]
    up = float(status.get("uptime") or 0)
    if up:
        parts.append(f"up {_duration(up)}")
    return " · ".join(parts)


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {(s % 3600) // 60:02d}m"
