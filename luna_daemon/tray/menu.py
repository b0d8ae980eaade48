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
* Several instances (``[[instances]]`` in config.toml, :attr:`TrayState.instances` with
  more than one entry): the colour is the worst over the instances (red > yellow > green
  > gray; a stopped instance beside a green one was stopped on purpose: green), the status
  row names each instance, and one submenu per instance (keys ``instance:NAME`` holding
  ``start:NAME`` / ``stop:NAME`` / ``check:NAME``) sits after Check Status. With one
  instance (or none given) the view is exactly the single-daemon view.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

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
class InstanceState:
    """One daemon instance as the tray sees it (its state and the tray's own probe)."""

    name: str
    service: str = "full"
    daemon: str = "stopped"
    detail: str = ""
    health: str = UNKNOWN
    health_detail: str = ""
    models: int = 0
    clients: int = 0
    memory_bytes: int = 0
    port: int = 0
    # Memory saved (status's "sharing", docs/monitor.md): the counted client identities
    # ((pid, comfyui) pairs: the host total counts one using two instances once), models, bytes.
    sharing_ids: frozenset = frozenset()
    shared_models: int = 0
    saved_bytes: int = 0

    def with_(self, **changes) -> InstanceState:
        return replace(self, **changes)


# The primary's fields that TrayState reads through and takes as keywords.
PRIMARY_FIELDS = frozenset(f.name for f in fields(InstanceState)) - {"name"}
# The primary of a TrayState given no instances: the single daemon on the default port.
PRIMARY_NAME, DEFAULT_PORT = "main", 19283


@dataclass(frozen=True, init=False)
class TrayState:
    """Everything the tray shows: ``instances``, every configured instance in config order
    (the primary first; more than one = the multi view), and the tray's own fields.

    An instance's state has one definition, :class:`InstanceState`. The primary's fields
    read through (``s.daemon`` is ``s.primary.daemon``), and as keywords of the
    constructor and :meth:`with_` they change the primary, after ``instances`` is applied:
    ``TrayState(daemon="running", health=HEALTHY)`` is one running daemon named
    :data:`PRIMARY_NAME` on :data:`DEFAULT_PORT`."""

    instances: tuple[InstanceState, ...]
    autostart: bool = False
    autostart_supported: bool = True
    dashboard: bool = False
    busy: str = ""  # an action in progress that changes what may be clicked: "exiting"
    # Keys edited in config.toml that apply only after a restart (Host.config_status).
    restart_needed: tuple[str, ...] = ()

    def __init__(self, *, instances: tuple[InstanceState, ...] = (), autostart: bool = False,
                 autostart_supported: bool = True, dashboard: bool = False, busy: str = "",
                 restart_needed: tuple[str, ...] = (), **primary: Any):
        unknown = sorted(set(primary) - PRIMARY_FIELDS)
        if unknown:
            raise TypeError(f"TrayState got unexpected keyword argument(s): {', '.join(unknown)}")
        instances = tuple(instances) or (InstanceState(PRIMARY_NAME, port=DEFAULT_PORT),)
        if primary:
            instances = (instances[0].with_(**primary), *instances[1:])
        for key, value in (("instances", instances), ("autostart", autostart),
                           ("autostart_supported", autostart_supported), ("dashboard", dashboard),
                           ("busy", busy), ("restart_needed", tuple(restart_needed))):
            object.__setattr__(self, key, value)  # frozen: the dataclass way to initialise

    def __getattr__(self, key: str) -> Any:
        # Only called for names not found otherwise: the primary's fields.
        if key in PRIMARY_FIELDS:
            return getattr(self.primary, key)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {key!r}")

    @property
    def primary(self) -> InstanceState:
        return self.instances[0]

    def with_(self, **changes: Any) -> TrayState:
        own = {f.name: getattr(self, f.name) for f in fields(self)}
        return TrayState(**{**own, **changes})

    @property
    def multi(self) -> bool:
        return len(self.instances) > 1


@dataclass(frozen=True)
class ItemSpec:
    """One menu row. ``checked`` is None for a plain item; ``key == "-"`` is a separator."""

    key: str
    label: str = ""
    enabled: bool = True
    checked: bool | None = None
    submenu: tuple[ItemSpec, ...] = ()  # non-empty: this row opens these items

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
        """The row with ``key``, also inside a submenu."""
        for it in self.items:
            if it.key == key:
                return it
            for sub in it.submenu:
                if sub.key == key:
                    return sub
        raise KeyError(key)


# Worst first wins: any red is red; gray only when every instance is gray.
_RANK = {GRAY: 0, GREEN: 1, YELLOW: 2, RED: 3}


def instance_colour(daemon: str, health: str) -> str:
    """One daemon's colour from its state and the tray's last probe of it."""
    if daemon == "error":
        return RED
    if daemon in ("starting", "stopping"):
        return YELLOW
    if daemon == "running":
        return {HEALTHY: GREEN, FAILING: RED}.get(health, YELLOW)
    return GRAY


def colour_for(s: TrayState) -> str:
    if s.busy == "exiting":
        return YELLOW
    if s.multi:
        return max((instance_colour(i.daemon, i.health) for i in s.instances), key=_RANK.__getitem__)
    return instance_colour(s.primary.daemon, s.primary.health)


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
    if s.restart_needed and s.busy != "exiting" and s.primary.daemon != "error":
        # Short: the row must stay narrow; the title / Check Status name the keys.
        text += " · restart needed" + ("" if short else f" ({', '.join(s.restart_needed)})")
    return text


def _state_text(s: TrayState, *, short: bool) -> str:
    colour = colour_for(s)

    def reason(text: str) -> str:
        return short_reason(text) if short else " ".join(text.split())

    p = s.primary
    if s.busy == "exiting":
        return "Exiting…"
    if p.daemon == "error":
        return f"Error: {reason(p.detail or 'unknown')}"
    if p.daemon == "running" and colour == RED:
        return f"Not responding: {reason(p.health_detail or 'no answer to ping')}"
    if p.daemon == "running" and colour == YELLOW:
        return f"Running on port {p.port} · checking…"
    if p.daemon == "running":
        text = " · ".join(("Running", _plural(p.models, "model"), _plural(p.clients, "client"), fmt_bytes(p.memory_bytes)))
        if p.sharing_ids:
            text += f" · saved {fmt_bytes(p.saved_bytes)}" if short else f" · {saved_text(s)}"
        return text
    if p.daemon == "starting":
        return "Starting…"
    if p.daemon == "stopping":
        return "Stopping…"
    return "Stopped" + (f" ({reason(p.detail)})" if p.detail else "")


def sharing_changes(status: dict) -> dict:
    """InstanceState fields (TrayState keywords: the primary's) from a ``status`` answer's ``sharing``."""
    sh = status.get("sharing") if isinstance(status, dict) else None
    if not isinstance(sh, dict):
        return {}
    ids = frozenset((int(i[0]), str(i[1])) for i in sh.get("identities") or () if isinstance(i, (list, tuple)) and len(i) == 2)
    return {"sharing_ids": ids, "shared_models": int(sh.get("models") or 0), "saved_bytes": int(sh.get("saved_bytes") or 0)}


def saved_text(s: TrayState) -> str:
    """"3 ComfyUI instances share 2 models: saved 1.2 GiB" over every running instance
    (a client of two instances counts once); "" while no client uses a model."""
    from luna_daemon.models.sharing import summary

    parts = [i for i in s.instances if i.daemon == "running"]  # one instance: the primary
    ids = frozenset().union(*(p.sharing_ids for p in parts)) if parts else frozenset()
    if not ids:
        return ""
    return summary({"clients": len(ids), "models": sum(p.shared_models for p in parts),
                    "saved_bytes": sum(p.saved_bytes for p in parts)})


def status_line(s: TrayState) -> str:
    """The disabled first menu row: state · models · clients · memory, or a short reason.
    Several instances: ``clip: running · vae: error (exited with code 1…)``."""
    if s.multi:
        return _clip(_multi_text(s, short=True), STATUS_MAX)
    return _clip(_status_text(s, short=True), STATUS_MAX)


def full_status(s: TrayState) -> str:
    """The status line with the whole reason, never cut (one line; several instances: one
    line per instance)."""
    if s.multi:
        return _multi_text(s, short=False)
    return _status_text(s, short=False)


def title_for(s: TrayState) -> str:
    """Tooltip / title: app name + the status with the full reason (cut only at TITLE_MAX)."""
    if s.multi:  # every instance must fit: short reasons, the full ones are in Check Status
        return _clip(f"{APP_NAME} — {_multi_text(s, short=True, ports=True)}", TITLE_MAX)
    line = full_status(s)
    if s.primary.daemon == "running" and colour_for(s) == GREEN:
        line = f"{line} · port {s.primary.port}"
    return _clip(f"{APP_NAME} — {line}", TITLE_MAX)


# Per-instance reasons in the shared status row: two instances must fit STATUS_MAX.
INSTANCE_REASON_MAX = 24


def instance_text(i: InstanceState, *, short: bool) -> str:
    """One instance's state in a few words (``running``, ``error (port in use…)``);
    ``short=False``: the whole reason and, when green, its counts and port."""

    def reason(text: str) -> str:
        return short_reason(text, INSTANCE_REASON_MAX) if short else " ".join(text.split())

    colour = instance_colour(i.daemon, i.health)
    if i.daemon == "error":
        return f"error ({reason(i.detail or 'unknown')})"
    if i.daemon == "running" and colour == RED:
        return "not responding" + ("" if short else f" ({reason(i.health_detail or 'no answer to ping')})")
    if i.daemon == "running" and colour == YELLOW:
        return "checking…"
    if i.daemon == "running":
        if short:
            return "running"
        return " · ".join((f"running on port {i.port}", _plural(i.models, "model"),
                           _plural(i.clients, "client"), fmt_bytes(i.memory_bytes)))
    if i.daemon in ("starting", "stopping"):
        return f"{i.daemon}…"
    return "stopped" + (f" ({reason(i.detail)})" if i.detail else "")


def _multi_text(s: TrayState, *, short: bool, ports: bool = False) -> str:
    if s.busy == "exiting":
        return "Exiting…"

    def one(i: InstanceState) -> str:
        text = f"{i.name}: {instance_text(i, short=short)}"
        if ports and i.daemon == "running" and instance_colour(i.daemon, i.health) == GREEN:
            text += f" (port {i.port})"
        return text

    sep = " · " if short else "\n"
    text = sep.join(one(i) for i in s.instances)
    saved = saved_text(s)
    if saved:
        text += sep + (saved.split(": ", 1)[1] if short else saved)  # short: "saved X"
    if s.restart_needed:
        text += sep + ("restart needed" if short else f"restart needed ({', '.join(s.restart_needed)})")
    return text


def _instance_item(i: InstanceState, exiting: bool) -> ItemSpec:
    # The service too where the name does not say it ("gpu1 (clip): running").
    who = i.name if i.service in (i.name, "") else f"{i.name} ({i.service})"
    label = _clip(f"{who}: {instance_text(i, short=True)}", STATUS_MAX)
    running = i.daemon == "running"
    sub = (
        ItemSpec(f"start:{i.name}", "Start", i.daemon in ("stopped", "error") and not exiting),
        ItemSpec(f"stop:{i.name}", "Stop", running and not exiting),
        ItemSpec(f"check:{i.name}", LABELS["check"], not exiting),
    )
    return ItemSpec(f"instance:{i.name}", label, not exiting, submenu=sub)


def build_view(s: TrayState) -> View:
    if s.multi:
        return _build_multi_view(s)
    exiting = s.busy == "exiting"
    st = s.primary.daemon
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
        item("unload", running and s.primary.models > 0),
        item("autostart", s.autostart_supported, s.autostart),
        SEPARATOR,
        item("exit", True),
    )
    return View(colour_for(s), title_for(s), status, items, full_status(s))


def _build_multi_view(s: TrayState) -> View:
    exiting = s.busy == "exiting"
    states = [i.daemon for i in s.instances]

    def item(key: str, enabled: bool, checked: bool | None = None) -> ItemSpec:
        return ItemSpec(key, LABELS[key], enabled and not exiting, checked)

    status = status_line(s)
    items = (
        ItemSpec("status", status, False),
        SEPARATOR,
        # Start / Stop Daemon act on every instance: enabled when one of them can.
        item("start", any(st in ("stopped", "error") for st in states)),
        item("stop", "running" in states),
        item("check", True),
        SEPARATOR,
        *(_instance_item(i, exiting) for i in s.instances),
        SEPARATOR,
        item("logs", True),
        item("dashboard", s.dashboard),
        item("settings", s.dashboard),
        SEPARATOR,
        item("unload", any(i.daemon == "running" and i.models > 0 for i in s.instances)),
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
    if isinstance(status.get("sharing"), dict):
        from luna_daemon.models.sharing import summary

        parts.append(summary(status["sharing"]))
    up = float(status.get("uptime") or 0)
    if up:
        parts.append(f"up {fmt_duration(up)}")
    return " · ".join(parts)

