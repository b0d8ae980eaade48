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

from luna_daemon.units import fmt_bytes, fmt_duration

GRAY, YELLOW, GREEN, RED = "gray", "yellow", "green", "red"
COLOURS = (GRAY, YELLOW, GREEN, RED)

# Health of the last probe, as seen by the tray (independent of the daemon's own state).
UNKNOWN, HEALTHY, FAILING = "unknown", "ok", "failing"

APP_NAME = "Luna Daemon"
TITLE_MAX = 127
STATUS_MAX = 80
# The reason in the red status row: its first clause, cut to this. A whole error message
# made the GTK menu ~600 px wide; the full text is in the title and Check Status.
REASON_MAX = 40

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
    # Keys edited in config.toml that apply only after a restart (Host.config_status).
    restart_needed: tuple[str, ...] = ()

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
    status: str  # the menu row: one short line
    items: tuple[ItemSpec, ...]
    detail: str = ""  # the same with the full reason, uncut (Check Status notification)

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


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())  # tooltips and menu rows are one line
    return text if len(text) <= limit else text[: limit - 1] + "…"


def short_reason(reason: str, limit: int = REASON_MAX) -> str:
    """The first clause of an error message (up to ``; ``, ``. ``, ``: `` or `` (``), at most
    ``limit`` characters with an ellipsis: what fits a menu row."""
    text = " ".join(reason.split())
    cut = min((i for i in (text.find(sep) for sep in ("; ", ". ", ": ", " (")) if i >= 8), default=len(text))
    first = text[:cut].rstrip(" .;:")
    if cut < len(text) and len(first) < limit:
        return first + "…"  # say that there is more (in the title / Check Status)
    return _clip(first, limit)


def _status_text(s: TrayState, *, short: bool) -> str:
    text = _state_text(s, short=short)
    if s.restart_needed and s.busy != "exiting" and s.daemon != "error":
        # Short: the row must stay narrow; the title / Check Status name the keys.
        text += " · restart needed" + ("" if short else f" ({', '.join(s.restart_needed)})")
    return text


def _state_text(s: TrayState, *, short: bool) -> str:
    colour = colour_for(s)

    def reason(text: str) -> str:
        return short_reason(text) if short else " ".join(text.split())

    if s.busy == "exiting":
        return "Exiting…"
    if s.daemon == "error":
        return f"Error: {reason(s.detail or 'unknown')}"
    if s.daemon == "running" and colour == RED:
        return f"Not responding: {reason(s.health_detail or 'no answer to ping')}"
    if s.daemon == "running" and colour == YELLOW:
        return f"Running on port {s.port} · checking…"
    if s.daemon == "running":
        return " · ".join(("Running", _plural(s.models, "model"), _plural(s.clients, "client"), fmt_bytes(s.memory_bytes)))
    if s.daemon == "starting":
        return "Starting…"
    if s.daemon == "stopping":
        return "Stopping…"
    return "Stopped" + (f" ({reason(s.detail)})" if s.detail else "")


def status_line(s: TrayState) -> str:
    """The disabled first menu row: state · models · clients · memory, or a short reason."""
    return _clip(_status_text(s, short=True), STATUS_MAX)


def full_status(s: TrayState) -> str:
    """The status line with the whole reason, never cut (one line)."""
    return _status_text(s, short=False)


def title_for(s: TrayState) -> str:
    """Tooltip / title: app name + the status with the full reason (cut only at TITLE_MAX)."""
    line = full_status(s)
    if s.daemon == "running" and colour_for(s) == GREEN:
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
    return View(colour_for(s), title_for(s), status, items, full_status(s))


def status_summary(status: dict) -> str:
    """One human paragraph from a protocol ``status`` result (for the notification)."""
    req = status.get("requests") or {}
    mem = sum(int((d or {}).get("models_bytes") or 0) for d in (status.get("devices") or {}).values())
    parts = [
        f"{str(status.get('state') or 'running').capitalize()} on port {status.get('port', '?')}",
        f"{_plural(int(status.get('models') or 0), 'model')} ({fmt_bytes(mem)})",
        _plural(int(status.get("clients") or 0), "client"),
        f"{int(req.get('total') or 0)} requests ({int(req.get('errors') or 0)} failed)",
        f"engine {status.get('engine', '?')}",
    ]
    up = float(status.get("uptime") or 0)
    if up:
        parts.append(f"up {fmt_duration(up)}")
    return " · ".join(parts)

