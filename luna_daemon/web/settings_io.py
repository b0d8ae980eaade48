"""The Settings page: what it shows, and validated saving to the TOML config file.

What a caller can rely on:

* :func:`describe` gives the page every field it shows with its effective value (as text
  the user can edit), where that value came from (default/file/env/flag), whether it is
  ``locked`` (scope-widening, with a ``hint`` saying where to change it), and the choices
  to offer -- devices are only the ones that exist here (plus ``auto``).
* Only the keys in :data:`EDITABLE` can be saved. Every other key -- in particular every
  key in :data:`SCOPE_WIDENING`, which changes what code the daemon imports, which files it
  reads or writes, or where it listens -- is refused (code ``read_only``) whatever the
  caller's session or token: those are changed in ``config.toml``, by ``LUNA_*``
  variables or flags, never by a web page (docs/monitor.md, "Settings a web page cannot
  change").
* :func:`save` writes only after every changed value passed ``Settings``' own validation
  (each field alone, for a message next to that field, then the whole new file through
  ``Settings.load``) plus the checks only this page can make (the device exists, the
  folder exists). The file is edited with ``tomlkit``, so every key, comment and the
  layout the user had are kept; the result goes to a temporary file in the same folder
  and is moved over ``config.toml`` atomically (the previous file is copied to
  ``config.toml.bak`` first). On any error nothing is written.
* Saved values are applied to the live Settings object (the one the daemon reads on its
  next start), except keys overridden by an environment variable or command-line flag,
  which keep winning. The result says which keys need a daemon restart.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import tomlkit
import tomlkit.exceptions

from luna_daemon.settings import FOREVER, Settings, SettingsError, split_size_pairs
from luna_daemon.settings_help import help_text

log = logging.getLogger(__name__)

# What the dashboard may save: devices, precision, memory and residency, notifications.
# An allow-list, so a setting added later is read-only here until someone decides.
EDITABLE = (
    "vae_device", "vae_dtype", "clip_device", "clip_dtype",
    "keep_alive", "max_model_bytes", "lora_cache_bytes", "notifications",
)
# Settings that widen what the daemon executes, reads, writes or where it listens. A web
# session must never change them (a page could be scripted by whoever got a session, and
# a logged-in tab is not the user confirming "import this folder's Python"):
#   engine, comfyui_root       -- which code is imported (comfyui_root's comfy/sd.py runs)
#   model_roots, preload       -- which files the daemon may read
#   config_dir, log_dir, state_dir -- where it writes (and what it reads back)
#   host, port, monitor_port, lock_port, allowed_origins -- who can reach it; a moved port
#       lets another program take the old one and receive ComfyUI's token and prompts
#   start_daemon_if_missing    -- the ComfyUI nodes start a process
SCOPE_WIDENING = frozenset({
    "engine", "comfyui_root", "model_roots", "preload", "config_dir", "log_dir", "state_dir",
    "host", "port", "monitor_port", "lock_port", "allowed_origins", "start_daemon_if_missing",
})
# Shown on the page (so the user sees the effective value and where it comes from) but
# read-only there, with a hint.
READ_ONLY = ("port", "monitor_port", "model_roots", "comfyui_root", "engine")
# Saves the page offers a daemon restart for. Every key the page may save applies live
# (config_watch.LIVE: read on each use); device / precision defaults, though, only reach
# models loaded from now on, and a restart reloads the loaded ones with the new value. The
# rest need a restart to apply at all (read-only here; listed for the file's own edits).
DAEMON_RESTART = frozenset({
    "vae_device", "vae_dtype", "clip_device", "clip_dtype",
    "port", "model_roots", "comfyui_root", "engine",
})
MAX_CHANGES = 64  # keys in one save; more is not a form, it is a flood
_KNOWN = frozenset(Settings().public_dict())

DTYPES = ("auto", "fp32", "fp16", "bf16")
ENGINES = ("auto", "comfy", "standalone")
_save_lock = threading.Lock()


# ----------------------------------------------------------------------------- display
def format_size(n: int) -> str:
    """Bytes as the largest exact binary unit (``1073741824`` -> ``1GiB``)."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def format_duration(seconds: float) -> str:
    if seconds == FOREVER or seconds < 0:
        return "forever"
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    return f"{seconds:g}s"


def display_value(key: str, value: Any) -> Any:
    """The value as the page's input shows it."""
    if key == "keep_alive":
        return format_duration(value)
    if key == "lora_cache_bytes":
        return format_size(value)
    if key == "max_model_bytes":
        return ", ".join(f"{dev}={format_size(n)}" for dev, n in value.items())
    if key == "model_roots":
        return "\n".join(value)
    return value


def device_choices(existing: list[str]) -> list[str]:
    """``auto`` plus the devices that exist (``cuda`` as an alias of the first GPU)."""
    out = ["auto", *existing]
    if any(d.startswith("cuda:") for d in existing):
        out.insert(out.index("cpu") + 1 if "cpu" in out else 1, "cuda")
    return out


def read_only_hint(key: str) -> str:
    """The note at a read-only field: why, and where to change it instead."""
    return (f"Read-only here: it changes what the daemon runs, reads or listens on. Edit config.toml "
            f"(or set LUNA_{key.upper()}), then restart Luna Daemon.")


def refusal(settings: Settings, key: str) -> str:
    """The message for an attempt to save a key the dashboard may not change."""
    why = " (it changes what the daemon runs, reads or listens on)" if key in SCOPE_WIDENING else ""
    return (f"{key} cannot be changed from the dashboard{why}: edit it in "
            f"{settings.config_file or 'config.toml'} (or set LUNA_{key.upper()}) and restart Luna Daemon")


def describe(settings: Settings, existing_devices: list[str]) -> dict[str, Any]:
    """Everything the Settings page needs to render; JSON-safe."""
    fields = {}
    for key in (*EDITABLE, *READ_ONLY):
        src = settings.sources.get(key, "default")
        locked = key not in EDITABLE
        fields[key] = {
            "value": display_value(key, getattr(settings, key)),
            "source": src,
            "overridden": src in ("env", "flag"),
            "restart": "daemon" if key in DAEMON_RESTART else None,
            "locked": locked,
            "hint": read_only_hint(key) if locked else "",
            "help": help_text(key),  # settings_help.HELP: the README's settings table says the same
        }
    return {
        "file": settings.config_file,
        "fields": fields,
        "choices": {
            "device": device_choices(existing_devices),
            "dtype": list(DTYPES),
            "engine": list(ENGINES),
        },
    }


# ----------------------------------------------------------------------------- parsing
def _number_or_text(raw: Any, key: str) -> Any:
    if isinstance(raw, bool):
        raise SettingsError(key, "expected text or a number")
    if isinstance(raw, (int, float)):
        return raw
    text = str(raw).strip()
    if re.fullmatch(r"-?[0-9]+", text):
        return int(text)
    if re.fullmatch(r"-?[0-9]+\.[0-9]+", text):
        return float(text)
    return text


def _to_toml(key: str, raw: Any) -> Any:
    """The value as it will be written to TOML (natural TOML types, user's units kept)."""
    if key == "notifications":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise SettingsError(key, f"expected true or false, got {raw!r}")
    if key == "max_model_bytes":
        if isinstance(raw, dict):
            return {str(k).strip(): v for k, v in raw.items()}
        return {dev: _number_or_text(size, key) for dev, size in split_size_pairs(str(raw), key).items()}
    if key in ("keep_alive", "lora_cache_bytes"):
        value = _number_or_text(raw, key)
        if value == "":
            raise SettingsError(key, "must not be empty")
        return value
    return str(raw).strip()


def _message(exc: SettingsError) -> str:
    # The bare message: the page shows it next to the field (no file / line / key prefix).
    return exc.message + (f" (did you mean {exc.suggestion!r}?)" if exc.suggestion else "")


def _extra_checks(key: str, value: Any, existing_devices: list[str]) -> None:
    """Checks Settings cannot make: does it exist on this machine?"""
    if key in ("vae_device", "clip_device"):
        allowed = device_choices(existing_devices)
        if value not in allowed:
            raise SettingsError(key, f"{value!r} is not a device on this machine; choose one of {', '.join(allowed)}")
    elif key == "max_model_bytes":
        for dev in value:
            if dev not in existing_devices and dev != "cuda":
                raise SettingsError(key, f"{dev!r} is not a device on this machine ({', '.join(existing_devices)})")


# ----------------------------------------------------------------------------- saving
def save(settings: Settings, changes: Any, existing_devices: list[str]) -> dict[str, Any]:
    """Validate ``changes`` ({key: value}) and write them to ``settings.config_file``.

    Returns ``{"ok": True, "saved", "restart", "overridden", "file"}`` or
    ``{"ok": False, "errors": {key: message}, "codes": {key: "invalid" | "read_only"}}``
    (then nothing was written or applied).
    """
    if not isinstance(changes, dict) or not changes:
        return {"ok": False, "errors": {"_": "nothing to save"}, "codes": {"_": "invalid"}}
    if len(changes) > MAX_CHANGES:
        return {"ok": False, "errors": {"_": f"at most {MAX_CHANGES} settings in one save"}, "codes": {"_": "invalid"}}
    errors: dict[str, str] = {}
    codes: dict[str, str] = {}
    values: dict[str, Any] = {}
    for key, raw in changes.items():
        if key not in EDITABLE:
            if key in _KNOWN:
                errors[key], codes[key] = refusal(settings, key), "read_only"
            else:
                errors[key], codes[key] = f"unknown setting {key[:64]!r}", "invalid"
            continue
        try:
            value = _to_toml(key, raw)
            # Settings' own coercion and validation, on this one value.
            Settings().with_overrides(**{key: value})
            _extra_checks(key, value, existing_devices)
        except SettingsError as exc:
            errors[key], codes[key] = _message(exc), "invalid"
            continue
        values[key] = value
    if errors:
        return {"ok": False, "errors": errors, "codes": codes}

    path = Path(settings.config_file)
    with _save_lock:
        try:
            doc = tomlkit.parse(path.read_text(encoding="utf-8")) if path.is_file() else tomlkit.document()
        except (OSError, tomlkit.exceptions.TOMLKitError) as exc:
            return {"ok": False, "errors": {"_": f"cannot read {path} ({exc}); fix or remove it first"},
                    "codes": {"_": "invalid"}}
        for key, value in values.items():
            doc[key] = value  # in place: the line's comment and position stay
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(tomlkit.dumps(doc), encoding="utf-8")
            try:
                # The whole new file through the same loader the daemon uses at startup;
                # env={} so only the file's own values are judged.
                checked = Settings.load(tmp, env={})
            except SettingsError as exc:
                where = exc.key if exc.key in values else "_"
                return {"ok": False, "errors": {where: _message(exc)}, "codes": {where: "invalid"}}
            if path.is_file():
                shutil.copy2(path, path.with_name(path.name + ".bak"))
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    old = {k: getattr(settings, k) for k in values}
    overridden, restart = [], []
    for key in values:
        if settings.sources.get(key) in ("env", "flag"):
            overridden.append(key)
            continue
        new = getattr(checked, key)
        setattr(settings, key, new)
        settings.sources[key] = "file"
        if new != old[key] and key in DAEMON_RESTART:
            restart.append(key)
    log.info("settings saved to %s: %s", path, ", ".join(sorted(values)))
    return {"ok": True, "saved": sorted(values), "restart": restart, "overridden": overridden, "file": str(path)}
