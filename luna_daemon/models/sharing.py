"""Which client processes use which loaded model, and the memory that sharing saves.

A client announces who it is once per connection (``hello`` with ``client: {pid, comfyui,
name}``, docs/protocol.md); :func:`parse_identity` checks it. The service then records, per
model, each identity that loaded it or ran an op on it (:meth:`Sharing.used`), and the
server tells when an announced connection ends (:meth:`Sharing.disconnected`).

The rule (docs/monitor.md "Memory saved"): an identity counts as a user of a loaded model
while it has a connection open to this daemon, or for ``window`` seconds after its last use
of that model. ``saved_bytes`` = Σ over models of ``bytes × (users − 1)``: what the
clients would hold with a copy each, minus the one copy the daemon holds.

Bounded: at most :data:`MAX_USERS_PER_MODEL` identities per model (the least recently
active one is dropped first), strings of at most :data:`MAX_TEXT` characters, and a model's
record goes when it is unloaded (:meth:`Sharing.forget`). Thread-safe; the hot path
(:meth:`used`) is one dict store under a lock.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

from luna_daemon.protocol import ErrorCode, LunaError

MAX_USERS_PER_MODEL = 256
# Longest ``comfyui`` / ``name`` accepted. Longer is refused, not cut: cutting could merge
# two different instance ids into one identity.
MAX_TEXT = 1024
MAX_PID = 2**32 - 1  # Windows pids are DWORDs; Linux's are far below
# Seconds an identity without an open connection still counts after its last use of a
# model: longer than the daemon's idle_timeout (300 s), so a ComfyUI between prompts whose
# pooled connection was closed idle still counts. ``LUNA_SHARING_WINDOW_S`` overrides it
# (tests; read when the daemon starts).
DEFAULT_WINDOW_S = 600.0
WINDOW_ENV = "LUNA_SHARING_WINDOW_S"


class Identity(NamedTuple):
    """Who a client is: its process id and its ComfyUI instance id ("" outside ComfyUI)."""

    pid: int
    comfyui: str


def _text(value: Any, key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise LunaError(ErrorCode.BAD_ARGS, f"hello client.{key} must be a string, got {type(value).__name__}")
    if len(value) > MAX_TEXT:
        raise LunaError(ErrorCode.BAD_ARGS, f"hello client.{key} is {len(value)} characters long; at most {MAX_TEXT}")
    # Control characters replaced: the text reaches logs, the tray and the dashboard.
    return "".join(ch if ch.isprintable() else "?" for ch in value)


def parse_identity(value: Any) -> tuple[Identity, str]:
    """``hello``'s ``client`` object → (identity, display name). Raises ``bad_args`` for
    anything but ``{"pid": int > 0, "comfyui": str, "name": str}`` (comfyui / name optional;
    other keys ignored) and strings of at most MAX_TEXT characters."""
    if not isinstance(value, dict):
        raise LunaError(ErrorCode.BAD_ARGS, f"hello client must be an object {{pid, comfyui, name}}, got {type(value).__name__}")
    pid = value.get("pid")
    if type(pid) is not int or not 0 < pid <= MAX_PID:
        raise LunaError(ErrorCode.BAD_ARGS, "hello client.pid must be the client's process id (an integer > 0)")
    return Identity(pid, _text(value.get("comfyui"), "comfyui")), _text(value.get("name"), "name")


def window_from_env(default: float = DEFAULT_WINDOW_S) -> float:
    raw = os.environ.get(WINDOW_ENV)
    try:
        value = float(raw) if raw else default
    except ValueError:
        return default
    return value if value >= 0 else default


class Sharing:
    """Per-model client usage (see the module docstring for the rule)."""

    def __init__(self, window: float | None = None, clock=time.monotonic):
        self.window = window_from_env() if window is None else window
        self._clock = clock
        self._lock = threading.Lock()
        self._users: dict[str, dict[Identity, float]] = {}  # model id -> identity -> last use
        self._open: dict[Identity, int] = {}  # identity -> open announced connections
        self._names: dict[Identity, str] = {}  # display names of identities in _open or _users

    # ------------------------------------------------------------ recording
    def connected(self, identity: Identity, name: str = "") -> None:
        with self._lock:
            self._open[identity] = self._open.get(identity, 0) + 1
            if name or identity not in self._names:
                self._names[identity] = name

    def disconnected(self, identity: Identity) -> None:
        with self._lock:
            n = self._open.get(identity, 0) - 1
            if n > 0:
                self._open[identity] = n
            else:
                self._open.pop(identity, None)
                self._drop_name_locked(identity)

    def used(self, model_id: str, identity: Identity | None) -> None:
        """``identity`` loaded or ran an op on ``model_id`` now (None: an anonymous client)."""
        if identity is None:
            return
        now = self._clock()
        with self._lock:
            users = self._users.get(model_id)
            if users is None:
                users = self._users[model_id] = {}
            if identity not in users and len(users) >= MAX_USERS_PER_MODEL:
                # Full: drop the least recently active one (open connections count as now).
                victim = min(users, key=lambda i: (i in self._open, users[i]))
                del users[victim]
                self._drop_name_locked(victim)
            users[identity] = now

    def forget(self, model_id: str) -> None:
        """The model was unloaded: its users no longer share it."""
        with self._lock:
            for identity in self._users.pop(model_id, {}):
                self._drop_name_locked(identity)

    def _drop_name_locked(self, identity: Identity) -> None:
        if identity not in self._open and not any(identity in u for u in self._users.values()):
            self._names.pop(identity, None)

    # ------------------------------------------------------------ reading
    def snapshot(self, models: Iterable[Any]) -> dict[str, Any]:
        """The ``status`` op's ``sharing`` object for the loaded ``models`` (registry
        entries: ``id``, ``kind``, ``paths``, ``nbytes``): ``clients`` (identities that count
        for at least one model), ``models`` (models with at least one), ``saved_bytes``,
        ``per_model`` ([{model, kind, name, bytes, users, saved_bytes}], most saved first),
        ``identities`` ([[pid, comfyui], ...]: a host unions them across instances) and
        ``window_s``."""
        now = self._clock()
        per_model, everyone = [], set()
        with self._lock:
            for m in models:
                users = self._users.get(m.id)
                if not users:
                    continue
                counted = [i for i, t in users.items() if i in self._open or now - t <= self.window]
                if not counted:
                    continue
                everyone.update(counted)
                saved = m.nbytes * (len(counted) - 1)
                name = os.path.basename(m.paths[0]) if m.paths else m.id
                per_model.append({"model": m.id, "kind": m.kind, "name": name, "bytes": m.nbytes,
                                  "users": len(counted), "saved_bytes": saved})
        per_model.sort(key=lambda p: (-p["saved_bytes"], p["model"]))
        return {"clients": len(everyone), "models": len(per_model),
                "saved_bytes": sum(p["saved_bytes"] for p in per_model), "per_model": per_model,
                "identities": sorted([i.pid, i.comfyui] for i in everyone), "window_s": self.window}


def combine(snapshots: Iterable[dict | None]) -> dict[str, Any]:
    """Several instances' ``sharing`` objects as one host total: each instance holds its own
    copy of its models, so models and saved bytes add up; a client (same pid and comfyui)
    using two instances counts once."""
    clients: set[tuple[int, str]] = set()
    models = saved = 0
    for s in snapshots:
        if not isinstance(s, dict):
            continue
        models += int(s.get("models") or 0)
        saved += int(s.get("saved_bytes") or 0)
        for ident in s.get("identities") or []:
            if isinstance(ident, (list, tuple)) and len(ident) == 2:
                clients.add((ident[0], str(ident[1])))
    return {"clients": len(clients), "models": models, "saved_bytes": saved}


def summary(sharing: dict | None) -> str:
    """``"3 ComfyUI instances share 2 models: saved 1.2 GiB"`` (the faces' one line)."""
    from luna_daemon.units import fmt_bytes

    s = sharing or {}
    n, m = int(s.get("clients") or 0), int(s.get("models") or 0)
    inst = "instance" if n == 1 else "instances"
    verb = "uses" if n == 1 else "share"
    return f"{n} ComfyUI {inst} {verb} {m} model{'' if m == 1 else 's'}: saved {fmt_bytes(int(s.get('saved_bytes') or 0))}"
