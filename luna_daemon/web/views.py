"""JSON-safe views of the host for the dashboard, ``/api/*`` and ``/metrics``.

Every function here works in every daemon state: a stopped or failed daemon has no
registry, service or server, and the views then report zeros and empty lists rather than
raising. They read each daemon attribute once into a local, because a stop on another
thread may set it to None between two reads.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from luna_daemon import __version__

from luna_daemon.daemon import STATE_COLOURS  # noqa: F401  (used by the monitor)


def devices() -> list[str]:
    """Devices that exist in this process (``cpu`` first)."""
    from luna_daemon.models.devices import available_devices

    return available_devices()


def device_memory(dev: str) -> dict[str, int | None]:
    """Used/total bytes of ``dev``; None where unknown.

    A CUDA device is only queried once CUDA is initialised in this process (a model was
    loaded there): querying earlier would create a CUDA context just for the dashboard,
    costing hundreds of MB of VRAM.
    """
    from luna_daemon.models import devices

    if dev.startswith("cuda"):
        import torch

        if not torch.cuda.is_initialized():
            return {"used": None, "total": None}
    try:
        mem = devices.device_memory(dev)
    except Exception:  # a driver hiccup must not take the dashboard down
        return {"used": None, "total": None}
    return {"used": mem.get("used"), "total": mem.get("total")}


def lora_stats(lora_cache: Any) -> dict[str, int] | None:
    """``{"bytes", "hits", "misses"}`` (always) plus ``budget``/``entries``/``evictions``
    when the cache reports them, or None when there is no cache."""
    if lora_cache is None:
        return None
    try:
        raw = lora_cache.stats()
    except Exception:
        return None
    if not isinstance(raw, dict):
        return None
    out = {k: int(raw.get(k) or 0) for k in ("bytes", "hits", "misses")}
    for k in ("budget", "entries", "evictions"):
        if isinstance(raw.get(k), (int, float)) and not isinstance(raw.get(k), bool):
            out[k] = int(raw[k])
    return out


def models(host: Any) -> list[dict[str, Any]]:
    """``ps`` of the running daemon (empty when stopped), with a display ``file`` name."""
    reg = host.daemon.registry
    if reg is None:
        return []
    out = []
    for m in reg.ps():
        paths = m.get("paths") or []
        out.append({**m, "file": Path(paths[0]).name if paths else ""})
    return out


def status(host: Any, *, monitor_clients: int = 0) -> dict[str, Any]:
    """Everything the Status page shows; JSON-safe."""
    d = host.daemon
    snap = d.snapshot()
    reg, svc, lora = d.registry, d.service, d.lora_cache
    entries = reg.entries() if reg is not None else []
    by_dev = reg.bytes_by_device() if reg is not None else {}
    devs = []
    for dev in devices():
        devs.append({"name": dev, **device_memory(dev), "models_bytes": by_dev.get(dev, 0)})
    requests = svc.stats.snapshot() if svc is not None else {"total": 0, "errors": 0, "per_minute": 0, "by_op": {}}
    state = snap["state"]
    return {
        **snap,
        "colour": STATE_COLOURS.get(state, "gray"),
        "engine": snap.get("engine") or None,
        "engine_setting": host.settings.engine,
        "devices": devs,
        "queue": sum(e.executor.depth for e in entries),
        "requests": requests,
        "lora_cache": lora_stats(lora),
        "roots": reg.root_sources() if reg is not None else [],  # with where each came from
        "version": __version__,
        "pid": os.getpid(),
        "monitor_clients": monitor_clients,
        "log_file": str(host.settings.log_file),
        "config_file": host.settings.config_file,
        "time": time.time(),
    }
