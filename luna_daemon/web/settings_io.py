"""The Settings page: what it shows, and validated saving to the TOML config file.

What a caller can rely on:

* :func:`describe` gives the page every editable field with its effective value (as text
  the user can edit), where that value came from (default/file/env/flag), and the choices
  to offer -- devices are only the ones that exist here (plus ``auto``).
* :func:`save` writes only after every changed value passed ``Settings``' own validation
  (each field alone, for a message next to that field, then the whole new file through
  ``Settings.load``) plus the checks only this page can make (the device exists, the
  folder exists). The file is edited with ``tomlkit``, so every key, comment and the
  layout the user had are kept; the result goes to a temporary file in the same folder
  and is moved over ``config.toml`` atomically (the previous file is copied to
  ``config.toml.bak`` first). On any error nothing is written.
* Saved values are applied to the live Settings object (the one the daemon reads on its
  next start), except keys overridden by an environment variable or command-line flag,
  which keep winning. The result says which keys need a daemon restart and which a
  restart of the whole app.
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

log = logging.getLogger(__name__)

EDITABLE = (
    "vae_device", "vae_dtype", "clip_device", "clip_dtype",
    "keep_alive", "max_model_bytes", "lora_cache_bytes",
    "port", "monitor_port", "model_roots", "comfyui_root", "engine", "notifications",
)
# Read by the daemon when it starts (components, registry roots, default load options):
# a running daemon keeps the old value until stop + start.
DAEMON_RESTART = frozenset({
    "vae_device", "vae_dtype", "clip_device", "clip_dtype", "keep_alive", "lora_cache_bytes",
    "port", "model_roots", "comfyui_root", "engine",
})
# Bound by the host process itself (this web server): only a new app start uses it.
APP_RESTART = frozenset({"monitor_port"})
# Everything else is read when used (budgets on each load, notifications on each notice).

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


def describe(settings: Settings, existing_devices: list[str]) -> dict[str, Any]:
    """Everything the Settings page needs to render; JSON-safe."""
    fields = {}
    for key in EDITABLE:
        src = settings.sources.get(key, "default")
        fields[key] = {
            "value": display_value(key, getattr(settings, key)),
            "source": src,
            "overridden": src in ("env", "flag"),
            "restart": "daemon" if key in DAEMON_RESTART else "app" if key in APP_RESTART else None,
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
    if key in ("port", "monitor_port"):
        if isinstance(raw, bool):
            raise SettingsError(key, "expected a port number")
        try:
            return int(str(raw).strip())
        except ValueError:
            raise SettingsError(key, f"expected a port number 0..65535, got {raw!r}") from None
    if key == "notifications":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise SettingsError(key, f"expected true or false, got {raw!r}")
    if key == "model_roots":
        items = raw if isinstance(raw, list) else str(raw).splitlines()
        return [str(p).strip() for p in items if str(p).strip()]
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
    text = str(exc)
    prefix = f"{exc.key}: "
    return text[len(prefix):] if text.startswith(prefix) else text


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
    elif key == "model_roots":
        for p in value:
            if not Path(p).expanduser().is_dir():
                raise SettingsError(key, f"folder does not exist: {p}")
    elif key == "comfyui_root":
        if value and not Path(value).expanduser().is_dir():
            raise SettingsError(key, f"folder does not exist: {value}")


# ----------------------------------------------------------------------------- saving
def save(settings: Settings, changes: Any, existing_devices: list[str]) -> dict[str, Any]:
    """Validate ``changes`` ({key: value}) and write them to ``settings.config_file``.

    Returns ``{"ok": True, "saved", "restart", "app_restart", "overridden", "file"}`` or
    ``{"ok": False, "errors": {key: message}}`` (then nothing was written or applied).
    """
    if not isinstance(changes, dict) or not changes:
        return {"ok": False, "errors": {"_": "nothing to save"}}
    errors: dict[str, str] = {}
    values: dict[str, Any] = {}
    for key, raw in changes.items():
        if key not in EDITABLE:
            errors[str(key)] = "this setting cannot be changed from the dashboard (edit the config file)"
            continue
        try:
            value = _to_toml(key, raw)
            # Settings' own coercion and validation, on this one value.
            Settings().with_overrides(**{key: value})
            _extra_checks(key, value, existing_devices)
        except SettingsError as exc:
            errors[key] = _message(exc)
            continue
        values[key] = value
    if errors:
        return {"ok": False, "errors": errors}

    path = Path(settings.config_file)
    with _save_lock:
        try:
            doc = tomlkit.parse(path.read_text(encoding="utf-8")) if path.is_file() else tomlkit.document()
        except (OSError, tomlkit.exceptions.TOMLKitError) as exc:
            return {"ok": False, "errors": {"_": f"cannot read {path} ({exc}); fix or remove it first"}}
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
                return {"ok": False, "errors": {exc.key if exc.key in values else "_": _message(exc)}}
            if path.is_file():
                shutil.copy2(path, path.with_name(path.name + ".bak"))
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    old = {k: getattr(settings, k) for k in values}
    overridden, restart, app_restart = [], [], []
    for key in values:
        if settings.sources.get(key) in ("env", "flag"):
            overridden.append(key)
            continue
        new = getattr(checked, key)
        if key not in APP_RESTART:
            setattr(settings, key, new)
            settings.sources[key] = "file"
        if new != old[key]:
            if key in DAEMON_RESTART:
                restart.append(key)
            elif key in APP_RESTART:
                app_restart.append(key)
    log.info("settings saved to %s: %s", path, ", ".join(sorted(values)))
    return {"ok": True, "saved": sorted(values), "restart": restart, "app_restart": app_restart,
            "overridden": overridden, "file": str(path)}
