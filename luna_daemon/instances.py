"""Several daemon instances from one ``config.toml``: the ``[[instances]]`` tables.

Pure (no torch, no sockets): every face, the host and the client may import it.

What a caller can rely on:

* :func:`instance_specs` is never empty. With no ``[[instances]]`` table it is one spec
  named ``"main"`` whose settings equal the loaded ones (today's single daemon on
  ``port``); with tables, one spec per table in file order, the first is the primary
  (the host's own daemon thread), the others run as child processes.
* Each spec's ``settings`` is a full, independent copy: the top-level settings with the
  table's keys applied (``sources[key] == "file"`` for those) and ``instance_name`` set.
* Table ``n`` (1-based) without ``port`` listens on ``port + n - 1`` (``0`` stays ``0``:
  a free port each); :meth:`Settings.load` has already refused duplicate names, duplicate
  ports and a port equal to ``monitor_port`` / ``lock_port``.
* :data:`ROLE_OF_OP` / :func:`serves` / :func:`pick` decide which instance serves an op.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import reprlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from luna_daemon.settings import _INTERNAL, Settings, SettingsError, _suggest

MAIN = "main"  # the one instance's name when config.toml has no [[instances]] table
# Every table past the first is a child process: a generated or pasted file with hundreds
# of tables must not fork hundreds of daemons.
MAX_INSTANCES = 16
NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
# The keys a table may set: what one daemon process reads for itself. Everything else is
# shared by the host and all its instances (folders, the monitor and lock ports, model
# roots, logging, the faces' options).
PER_INSTANCE_KEYS = frozenset({
    "port", "service", "engine", "vae_device", "clip_device", "vae_dtype", "clip_dtype",
    "keep_alive", "max_model_bytes", "lora_cache_bytes", "preload", "warm_start", "max_connections",
    "queue_size", "max_header_bytes", "max_body_bytes", "frame_timeout", "idle_timeout", "client_timeout",
    "stop_timeout", "shm", "comfy_fallback",
})
_TABLE_KEYS = PER_INSTANCE_KEYS | {"name"}

# Which kind of model an op needs; ops without a role (ping, hello, status, unload, ...)
# go to the primary or to the instance a caller names. Kept equal to the
# ``@op(..., service=...)`` kinds of luna_daemon/ops/ by tests/test_settings_instances.py.
ROLE_OF_OP: dict[str, str] = {
    **{op: "vae" for op in ("vae_load", "vae_encode", "vae_decode", "vae_load_sd")},
    **{op: "clip" for op in ("clip_load", "clip_tokenize", "clip_encode", "clip_load_sd",
                             "lora_has", "lora_put", "lora_load", "lora_list")},
}


def _raise(exc: SettingsError) -> None:
    raise exc


def _where(n: int, key: str = "") -> str:
    return f"instances[{n}]" + (f".{key}" if key else "")


def parse_tables(raw: Any, source: str, on_error: Callable[[SettingsError], None] | None = None) -> list[dict[str, Any]]:
    """The ``instances`` value of one source, coerced and checked key by key.

    Each bad key, table or name is passed to ``on_error`` (default: raised) with key
    ``instances[<n>].<key>`` (n 1-based, file order); a bad key is left out of its table,
    a table without a usable name is left out whole. Checks that need the other settings
    (ports against ``port`` / ``monitor_port`` / ``lock_port``) are :func:`port_problems`."""
    report = on_error or _raise
    if source != "file":
        what = "the LUNA_INSTANCES variable" if source == "env" else "a flag"
        raise SettingsError("instances", f"cannot come from {what}: write [[instances]] tables in config.toml "
                            "(unset it / leave it out)")
    if not isinstance(raw, list):
        got = "a single [instances] table" if isinstance(raw, dict) else f"{type(raw).__name__} {reprlib.repr(raw)}"
        raise SettingsError("instances", f"write one [[instances]] table (double brackets) per instance, each with "
                            f"name = \"...\"; got {got}")
    fmap = {f.name: f for f in fields(Settings)}
    out: list[dict[str, Any]] = []
    first_of: dict[str, int] = {}
    for n, table in enumerate(raw, 1):
        if n > MAX_INSTANCES:
            report(SettingsError(_where(n), f"at most {MAX_INSTANCES} instances; remove this table and the "
                                 f"{len(raw) - n} after it"))
            break
        if not isinstance(table, dict):
            report(SettingsError(_where(n), f"must be a table (name = \"...\", service = ...), got {reprlib.repr(table)}"))
            continue
        table = {str(k).replace("-", "_"): v for k, v in table.items()}
        name = table.get("name")
        if name is None:
            report(SettingsError(_where(n, "name"), "required: every [[instances]] table needs name = \"...\" "
                                 "(lower-case letters, digits, _ or -, e.g. \"vae\")"))
            continue
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            report(SettingsError(_where(n, "name"), f"must start with a lower-case letter and hold only a-z, 0-9, _ "
                                 f"or - (at most 32), e.g. \"vae\"; got {reprlib.repr(name)}"))
            continue
        if name in first_of:
            report(SettingsError(_where(n, "name"), f"{name!r} is already the name of instances[{first_of[name]}]; "
                                 "every instance needs its own name"))
            continue
        first_of[name] = n
        clean: dict[str, Any] = {"name": name}
        for key, value in table.items():
            if key == "name":
                continue
            try:
                clean[key] = _coerce_checked(fmap, key, value)
            except SettingsError as exc:
                sub = exc.key[len(key):] if exc.key.startswith(key) else ""  # e.g. ".cuda:0" of a size map
                report(SettingsError(_where(n, key + sub), exc.message, suggestion=exc.suggestion))
        out.append(clean)
    return out


def _coerce_checked(fmap: dict[str, dataclasses.Field], key: str, value: Any) -> Any:
    """``value`` coerced and validated by the same rules as the top-level ``key``."""
    if key not in PER_INSTANCE_KEYS:
        if key == "instances":
            raise SettingsError(key, "an instance cannot hold instances: write each [[instances]] table at the top level")
        if key in fmap and key not in _INTERNAL:
            raise SettingsError(key, "is a host setting: set it at the top of config.toml, it applies to every "
                                "instance")
        suggestion = _suggest(key, _TABLE_KEYS)
        keys = "" if suggestion else f" (a table takes name and {', '.join(sorted(PER_INSTANCE_KEYS))})"
        raise SettingsError(key, f"unknown instance setting{keys}", suggestion=suggestion)
    coerced = Settings._coerce(fmap[key], key, value)
    probe = Settings()  # defaults are valid: any complaint is about this one value
    setattr(probe, key, coerced)
    for exc in probe._invalid():
        if exc.key == key:
            raise exc
    return coerced


def default_port(base_port: int, index: int) -> int:
    """The port of table ``index`` (0-based) that sets none: ``port + index`` (0 stays 0)."""
    return 0 if base_port == 0 else base_port + index


def align_primary_port(settings: Settings) -> SettingsError | None:
    """Make the top-level ``port`` and the first table's ``port`` one value, so that every
    client that reads ``settings.port`` (ComfyUI's nodes, the CLI) reaches the primary.

    A ``port`` in the first table is taken as the top-level one when that is a default; a
    ``LUNA_PORT`` / ``--port`` (aimed at the primary) replaces the table's; a different
    top-level ``port`` in the same file is an error (returned, the table's value dropped)."""
    if not settings.instances or "port" not in settings.instances[0]:
        return None
    table = settings.instances[0]
    source = settings.sources.get("port", "default")
    if source == "default":
        settings.port = table["port"]
        settings.sources["port"] = "file"
    elif source in ("env", "flag"):
        table["port"] = settings.port
    elif table["port"] != settings.port:
        wrong = table.pop("port")
        return SettingsError(_where(1, "port"), f"{wrong} differs from the top-level port = {settings.port}; the first "
                             "table is the primary and listens on the top-level port: set it in one place")
    return None


def port_problems(settings: Settings):
    """The port conflicts of ``settings.instances`` (SettingsError, key ``instances[n].port``):
    a derived port past 65535, two instances on one port, an instance on the monitor or
    lock port. Port 0 (a free port) never conflicts."""
    taken: dict[int, str] = {}
    if settings.monitor_port:
        taken[settings.monitor_port] = "monitor_port (the dashboard)"
    if settings.lock_port:
        taken.setdefault(settings.lock_port, "lock_port (the single-instance lock)")
    for i, table in enumerate(settings.instances):
        explicit = "port" in table
        port = table["port"] if explicit else default_port(settings.port, i)
        how = "" if explicit else f" (no port set: port + {i} = {port})"
        if not 0 <= port <= 65535:
            yield SettingsError(_where(i + 1, "port"), f"would be {port}{how}; set port = <1..65535> in this table")
        elif port and port in taken:
            yield SettingsError(_where(i + 1, "port"), f"{port}{how} is already {taken[port]}; every instance needs "
                                "its own port")
        elif port:
            taken[port] = f"the port of instance {table['name']!r}"


@dataclass(frozen=True)
class InstanceSpec:
    """One configured daemon instance: its name, position (0 = primary) and settings."""

    name: str
    index: int
    settings: Settings

    @property
    def primary(self) -> bool:
        return self.index == 0

    @property
    def service(self) -> str:
        return self.settings.service

    @property
    def host(self) -> str:
        return self.settings.host

    @property
    def port(self) -> int:
        return self.settings.port

    def public(self) -> dict[str, Any]:
        """JSON-safe: name, service, host, port (as configured; 0 = a free one), devices, primary."""
        s = self.settings
        return {"name": self.name, "service": s.service, "host": s.host, "port": s.port,
                "vae_device": s.vae_device, "clip_device": s.clip_device, "primary": self.primary}


def _copy(settings: Settings, name: str) -> Settings:
    """An independent copy (lists and dicts copied; ``problems`` shallow: exceptions do not deep-copy)."""
    changes: dict[str, Any] = {}
    for f in fields(settings):
        if f.name == "problems":
            changes[f.name] = list(settings.problems)
        elif f.init and isinstance(getattr(settings, f.name), (list, dict)):
            changes[f.name] = copy.deepcopy(getattr(settings, f.name))
    new = dataclasses.replace(settings, **changes)
    new.instance_name = name
    return new


def instance_specs(settings: Settings) -> list[InstanceSpec]:
    """Every configured instance, primary first (see the module docstring); never empty."""
    if not settings.instances:
        return [InstanceSpec(MAIN, 0, _copy(settings, MAIN))]
    specs = []
    for i, table in enumerate(settings.instances):
        s = _copy(settings, table["name"])
        for key, value in table.items():
            if key != "name":
                setattr(s, key, copy.deepcopy(value))
                s.sources[key] = "file"
        if "port" not in table:
            s.port = default_port(settings.port, i)
            if i:
                s.sources["port"] = "file"  # derived from the table's place in the file
        specs.append(InstanceSpec(table["name"], i, s))
    return specs


def instance_spec(settings: Settings, name: str) -> InstanceSpec:
    """The instance called ``name``; SettingsError (key ``instance``) naming the configured ones."""
    specs = instance_specs(settings)
    for spec in specs:
        if spec.name == name:
            return spec
    raise SettingsError("instance", f"no instance named {name!r}; configured: {', '.join(s.name for s in specs)}")


def serves(service: str, role: str) -> bool:
    """Whether an instance of ``service`` (full | vae | clip) serves ops of ``role``."""
    return service == "full" or service == role


def _alive(entry: dict[str, Any]) -> bool:
    return entry.get("state") in (None, "running")


def pick(entries: list[dict[str, Any]], role: str | None, wanted: str = "auto") -> dict[str, Any] | None:
    """The entry (a :meth:`InstanceSpec.public` dict, maybe with ``state``) to send an op to.

    ``wanted`` a name: that entry, whatever it serves (None if no entry has that name).
    ``auto``: among the entries that serve ``role``, one that is running (or has no
    ``state``) before one that is not, then a dedicated one (service == role) before a
    full one, then file order; None if none serves it. ``role`` None (an op without a
    role): the primary (else the first entry)."""
    if wanted != "auto":
        return next((e for e in entries if e.get("name") == wanted), None)
    if role is None:
        return next((e for e in entries if e.get("primary")), entries[0] if entries else None)
    ranked = [(not _alive(e), e.get("service") != role, i, e)
              for i, e in enumerate(entries) if serves(str(e.get("service")), role)]
    return min(ranked, key=lambda r: r[:3])[3] if ranked else None
