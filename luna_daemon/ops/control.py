"""Control ops: ping, hello, status, ps, register_roots, unload, shutdown, shm_register,
echo (no model work of their own; ``ping`` and ``hello`` need no token)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from luna_daemon import __version__, protocol
from luna_daemon.models.devices import available_devices, device_memory
from luna_daemon.ops.table import Context, _arg, op
from luna_daemon.protocol import ErrorCode, LunaError
from luna_daemon.shm import DEFAULT_MIN_BYTES, MIN_SEGMENT

if TYPE_CHECKING:
    from luna_daemon.service import Service

# The service's logger: the op modules are its parts, and its log lines keep their name.
log = logging.getLogger("luna_daemon.service")


@op("ping", auth=False)
def _ping(svc: Service, args: dict, ctx: Context) -> dict:
    return {"pong": True, "time": time.time()}


@op("hello", auth=False)
def _hello(svc: Service, args: dict, ctx: Context) -> dict:
    if "client" in args:
        svc.announce(ctx, args["client"])
    return {
        "protocol": protocol.VERSION, "daemon": __version__, "service": svc.settings.service,
        "engine": svc.registry.engine.name, "ops": svc.ops_for_service(), "devices": available_devices(),
        "shm": svc.settings.shm, **_shm_limits(svc), "auth": "token", "max_body_bytes": svc.settings.max_body_bytes,
        "instance": svc.instance_name, "instances": svc.instance_map(),
    }


@op("status")
def _status(svc: Service, args: dict, ctx: Context) -> dict:
    by_dev = svc.registry.bytes_by_device()
    devices = {d: {**device_memory(d), "models_bytes": by_dev.get(d, 0)} for d in available_devices()}
    return {
        "version": __version__, "service": svc.settings.service,
        "queue": sum(e.executor.depth for e in svc.registry.entries()),
        "devices": devices, "requests": svc.stats.snapshot(), "latency": svc.stats.latency(),
        "lora_cache": svc.lora_cache.stats() if svc.lora_cache is not None else None,
        **svc.status_provider(),
        "roots": svc.registry.root_sources(),
        "sharing": svc.registry.sharing_snapshot(),
    }


@op("ps")
def _ps(svc: Service, args: dict, ctx: Context) -> dict:
    return {"models": svc.registry.ps(), "roots": svc.registry.root_sources()}


# Folder kinds a ComfyUI instance registers (folder_paths names; "clip" is the legacy name
# of text_encoders). Only folders: nothing is read from them until a model is loaded.
ROOT_KINDS = ("vae", "clip", "text_encoders", "loras", "embeddings", "checkpoints", "diffusion_models")
MAX_REGISTER_FOLDERS = 64  # per request


@op("register_roots")
def _register_roots(svc: Service, args: dict, ctx: Context) -> dict:
    """A ComfyUI instance's model folders become model roots for this daemon's lifetime
    (the registry keeps at most MAX_CLIENT_ROOTS, never in config.toml); each refused
    folder (too broad, missing, over the limit) is also a warning in the answer."""
    folders = _arg(args, "folders", dict)
    client = _arg(args, "client", dict, {})
    pairs: list[tuple[str, str]] = []
    for kind, paths in folders.items():
        if kind not in ROOT_KINDS:
            raise LunaError(ErrorCode.BAD_ARGS, f"folders: unknown kind {protocol.shown(kind)}; kinds: {', '.join(ROOT_KINDS)}")
        if not isinstance(paths, list) or not all(isinstance(p, str) and 0 < len(p) <= 4096 for p in paths):
            raise LunaError(ErrorCode.BAD_ARGS, f"folders[{kind!r}] must be a list of folder paths")
        pairs += [(kind, p) for p in paths]
    if len(pairs) > MAX_REGISTER_FOLDERS:
        raise LunaError(ErrorCode.BAD_ARGS, f"at most {MAX_REGISTER_FOLDERS} folders per register_roots request")
    pid = client.get("pid")
    comfy = client.get("comfyui")
    what = "ComfyUI" + (f" {protocol.shown(comfy)[:300]}" if isinstance(comfy, str) and comfy else "")
    if type(pid) is int:
        what += f" (pid {pid})"
    source = f"{what} via {ctx.client}"
    added, refused = svc.registry.add_client_roots(pairs, source)
    for r in refused:
        log.warning("model folder %s of %s not added as a model root: %s", r["path"], what, r["reason"])
    if added:
        log.info("model roots added for %s: %s", what, ", ".join(a["path"] for a in added))
    return {"added": added, "refused": refused, "roots": svc.registry.root_sources()}


@op("unload")
def _unload(svc: Service, args: dict, ctx: Context) -> dict:
    if args.get("all") is True:
        return {"unloaded": svc.registry.unload_all()}
    return {"unloaded": [svc.registry.unload(_arg(args, "model", str))]}


@op("shutdown")
def _shutdown(svc: Service, args: dict, ctx: Context) -> dict:
    # The stop runs on another thread: it waits for in-flight requests, this one included.
    svc.on_shutdown()
    return {"stopping": True}


def _shm_limits(svc: Service) -> dict:
    return {"shm_min_segment": MIN_SEGMENT, "shm_max_segment": svc.settings.max_body_bytes, "shm_min_bytes": DEFAULT_MIN_BYTES}


@op("shm_register")
def _shm_register(svc: Service, args: dict, ctx: Context) -> dict:
    """Attach the caller's shared-memory segment ``{name, size}`` to this connection
    (docs/protocol.md "Shared memory"). It replaces the connection's previous segment,
    which is released; every segment is released when the connection ends."""
    if not svc.settings.shm:
        raise LunaError(ErrorCode.BAD_ARGS, "shared memory is off on this daemon (setting shm); send tensors in the body")
    segments = getattr(ctx, "segments", None)
    if segments is None:
        raise LunaError(ErrorCode.BAD_ARGS, "this connection cannot carry shared memory")
    seg = svc.shm.attach(args.get("name"), args.get("size"))
    for old in list(segments.values()):
        svc.shm.release(old)
    segments.clear()
    segments[seg.name] = seg
    return {"name": seg.name, "size": seg.size, **_shm_limits(svc)}


_ECHO_CACHE: dict[tuple, torch.Tensor] = {}


@op("echo")
def _echo(svc: Service, args: dict, ctx: Context) -> dict:
    """Diagnostics / benchmarks: returns the shapes of the tensors it got (with
    ``back: true`` the tensors themselves, under ``back``), plus an optional float32
    ``reply`` of ``reply_shape`` (zeros; cached so the benchmark measures transport)."""
    shape = args.get("reply_shape")
    out: dict[str, Any] = {"received": {k: list(v.shape) for k, v in args.items() if isinstance(v, torch.Tensor)}}
    if args.get("back") is True:
        out["back"] = {k: v for k, v in args.items() if isinstance(v, torch.Tensor)}
    if shape is not None:
        if not isinstance(shape, list) or len(shape) > 8 or not all(type(d) is int and d >= 0 for d in shape):
            raise LunaError(ErrorCode.BAD_ARGS, "reply_shape must be a list of non-negative ints")
        n = 4
        for d in shape:
            n *= d
        if n > svc.settings.max_body_bytes:
            raise LunaError(ErrorCode.TOO_LARGE, f"reply of {n} bytes exceeds max_body_bytes")
        key = tuple(shape)
        if key not in _ECHO_CACHE:
            _ECHO_CACHE.clear()
            _ECHO_CACHE[key] = torch.zeros(key, dtype=torch.float32)
        out["reply"] = _ECHO_CACHE[key]
    return out
