"""JSON-safe views of the host for the dashboard, ``/api/*`` and ``/metrics``.

Every function here works in every daemon state: a stopped or failed daemon has no
registry, service or server, and the views then report zeros and empty lists rather than
raising. They read each daemon attribute once into a local, because a stop on another
thread may set it to None between two reads. A child instance's numbers are the last
answers :class:`~luna_daemon.web.instances.ChildPoller` holds (the supervisor's heartbeat
``status``, its own ``ps``; never a blocking call).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from luna_daemon import __version__

from luna_daemon.daemon import STATE_COLOURS
from luna_daemon.web.instances import ChildPoller, instance_items, is_primary, log_file_of, overall_state


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


def _with_file(m: dict[str, Any], instance: str) -> dict[str, Any]:
    paths = m.get("paths") or []
    return {**m, "file": Path(paths[0]).name if paths else "", "instance": instance}


def models(host: Any, children: ChildPoller | None = None) -> list[dict[str, Any]]:
    """``ps`` of every running instance (the primary's live, a child's as last polled),
    each model with a display ``file`` name and its ``instance``; empty when stopped."""
    out: list[dict[str, Any]] = []
    for name, inst in instance_items(host):
        if is_primary(host, inst):
            reg = inst.registry
            out += [_with_file(m, name) for m in (reg.ps() if reg is not None else [])]
        elif children is not None and getattr(inst, "state", None) == "running":
            cached = children.get(name)
            out += [_with_file(m, name) for m in (cached["models"] if cached else [])]
    return out


def sharing(host: Any, children: ChildPoller | None = None) -> dict[str, Any]:
    """Memory saved (docs/monitor.md "Memory saved"): ``by_instance`` = each running
    instance's ``sharing`` (the primary's live, a child's as last polled) and ``total`` = the
    host's (``sharing.combine``: a client using two instances counts once) with ``text``,
    the one line every face shows: :data:`SHARING_STOPPED` while no instance runs (a
    stopped host measures nothing; its zeros are not a measurement), else the figure --
    0 clients included."""
    from luna_daemon.models.sharing import combine, summary

    by_instance: dict[str, dict[str, Any]] = {}
    items = instance_items(host)
    for name, inst in items:
        snap = None
        if is_primary(host, inst):
            reg = inst.registry
            snap = reg.sharing_snapshot() if reg is not None and hasattr(reg, "sharing_snapshot") else None
        elif children is not None and getattr(inst, "state", None) == "running":
            cached = children.get(name)
            snap = (cached["status"] or {}).get("sharing") if cached else None
        if isinstance(snap, dict):
            by_instance[name] = snap
    total = combine(by_instance.values())
    running = any(getattr(inst, "state", None) == "running" for _, inst in items)
    return {"by_instance": by_instance, "total": {**total, "text": summary(total) if running else SHARING_STOPPED}}


# The memory-saved line while no instance runs (static/app.js shows the same words).
SHARING_STOPPED = "Memory saved: — (stopped)"


def _instance_view(host: Any, name: str, inst: Any, children: ChildPoller | None) -> dict[str, Any]:
    """One instance's card: its snapshot plus colour, address, devices, queue, requests."""
    snap = dict(inst.snapshot())
    iset = getattr(inst, "settings", None) or host.settings
    state = snap.get("state", "stopped")
    view = {
        **snap,
        "name": name,
        "instance": snap.get("instance") or name,
        "primary": is_primary(host, inst),
        "service": snap.get("service") or iset.service,
        "devices": snap.get("devices") or {"vae": iset.vae_device, "clip": iset.clip_device},
        "colour": STATE_COLOURS.get(state, "gray"),
        # Port 0 in the config is "a free port": there is no address until it runs.
        "address": f"{snap.get('host', iset.host)}:{snap['port']}" if snap.get("port") else "",
        "log_file": log_file_of(host, name, inst),
    }
    if view["primary"]:
        reg, svc = inst.registry, inst.service
        view["queue"] = sum(e.executor.depth for e in reg.entries()) if reg is not None else 0
        view["requests"] = svc.stats.snapshot() if svc is not None else _NO_REQUESTS
    else:
        # The supervisor's last heartbeat answer (through the poller, which keeps it while
        # the child is down: its request counters stay visible), as in the snapshot.
        cached = children.get(name) if children is not None else None
        st = cached["status"] if cached else {}
        view["requests"] = st.get("requests") or _NO_REQUESTS
        for key in ("models", "clients", "in_flight", "queue"):
            value = st.get(key) if state == "running" and cached else view.get(key)
            view[key] = value if isinstance(value, int) and state == "running" else 0
        if state == "running" and cached and cached.get("models_time") is not None:
            # The count of the poller's ps list: the card then matches /api/models (which
            # lists that same answer) rather than a status from another moment.
            view["models"] = len(cached["models"])
    return view


_NO_REQUESTS = {"total": 0, "errors": 0, "per_minute": 0, "by_op": {}}


def instances(host: Any, children: ChildPoller | None = None) -> list[dict[str, Any]]:
    """One card per instance (config order, primary first)."""
    return [_instance_view(host, n, i, children) for n, i in instance_items(host)]


def status(host: Any, *, monitor_clients: int = 0, children: ChildPoller | None = None) -> dict[str, Any]:
    """Everything the Status page shows; JSON-safe. The top-level fields are the
    primary's (as before instances existed); ``instances`` has one card per instance and
    ``overall`` the host's worst state (``Host.overall_state``) with its colour."""
    d = host.daemon
    snap = d.snapshot()
    reg, svc, lora = d.registry, d.service, d.lora_cache
    entries = reg.entries() if reg is not None else []
    by_dev = reg.bytes_by_device() if reg is not None else {}
    devs = []
    for dev in devices():
        devs.append({"name": dev, **device_memory(dev), "models_bytes": by_dev.get(dev, 0)})
    requests = svc.stats.snapshot() if svc is not None else dict(_NO_REQUESTS)
    state = snap["state"]
    overall = overall_state(host)
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
        "instances": instances(host, children),
        "sharing": sharing(host, children),
        "overall": overall,
        "overall_colour": STATE_COLOURS.get(overall, "gray"),
    }
