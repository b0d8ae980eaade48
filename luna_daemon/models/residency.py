"""Preload at start and warm start (restore the previous run's models).

A preload entry is ``"vae:<path>"`` or ``"clip:<clip_type>:<path>[,<path>...]"``; paths
obey ``model_roots`` like any load. The warm-start list is written to the state dir at
stop and read back at the next start.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from luna_daemon import fsutil
from luna_daemon.protocol import LunaError

log = logging.getLogger(__name__)


def parse_entry(entry: str) -> dict[str, Any]:
    kind, _, rest = entry.partition(":")
    if kind == "vae" and rest:
        return {"kind": "vae", "paths": [rest]}
    if kind == "clip" and rest:
        clip_type, _, paths = rest.partition(":")
        if paths:
            return {"kind": "clip", "clip_type": clip_type, "paths": paths.split(",")}
    raise ValueError(f"preload entry {entry!r} must be 'vae:<path>' or 'clip:<type>:<path>[,<path>]'")


def _load_all(daemon, specs: list[dict[str, Any]], *, uploads_ok: bool = False) -> None:
    """Load each spec. ``uploads_ok`` (warm start only): a model whose files all lie in the
    daemon's own upload store (checkpoint-tunnel state dicts, validated when uploaded) is
    loaded as the daemon's own load -- a client path never resolves there."""
    uploads = None
    if uploads_ok and daemon.registry is not None:
        from luna_daemon.models.uploads import upload_folder

        uploads = upload_folder(daemon.settings)
    for spec in specs:
        registry = daemon.registry
        if registry is None:
            return
        internal = uploads is not None and all(fsutil.within(Path(p).resolve(), [uploads]) for p in spec["paths"])
        if internal:
            registry.add_internal_root(uploads)
        try:
            registry.load(spec["kind"], spec["paths"], clip_type=spec.get("clip_type"),
                          device=spec.get("device"), dtype=spec.get("dtype"), internal=internal)
        except LunaError as exc:
            log.warning("preload of %s failed: %s", spec["paths"], exc.message)


def preload(daemon, entries: list[str]) -> None:
    specs = []
    for e in entries:
        try:
            specs.append(parse_entry(e))
        except ValueError as exc:
            log.warning("%s", exc)
    _load_all(daemon, specs)


def save_loaded(daemon) -> None:
    specs = [
        {"kind": e.kind, "paths": e.paths, "clip_type": e.options.get("clip_type"), "device": e.device, "dtype": e.dtype}
        for e in daemon.registry.entries()
    ]
    path = daemon.settings.state_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"models": specs}, indent=2), encoding="utf-8")


def restore_previous(daemon) -> None:
    path = daemon.settings.state_file
    if not fsutil.present(path):
        return
    try:
        # A small regular file (never a FIFO that would hang the start), holding an object.
        specs = json.loads(fsutil.read_small(path, "warm-start list").decode("utf-8")).get("models", [])
    except (LunaError, ValueError, AttributeError) as exc:
        log.warning("ignoring unreadable %s: %s", path, getattr(exc, "message", exc))
        return
    if not isinstance(specs, list):
        log.warning("ignoring %s: 'models' is not a list", path)
        return
    _load_all(daemon, [s for s in specs if _well_formed(s)], uploads_ok=True)


def _well_formed(spec: Any) -> bool:
    """A warm-start entry as :func:`save_loaded` writes it (the file may have been edited)."""
    return (isinstance(spec, dict) and isinstance(spec.get("kind"), str)
            and isinstance(spec.get("paths"), list) and bool(spec["paths"]) and all(isinstance(p, str) for p in spec["paths"])
            and all(spec.get(k) is None or isinstance(spec[k], str) for k in ("clip_type", "device", "dtype")))
