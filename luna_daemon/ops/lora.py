"""LoRA cache ops: lora_has, lora_put, lora_load, lora_list (the cache is models/lora.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from luna_daemon.ops.table import Context, _arg, _lora_cache, op
from luna_daemon.protocol import ErrorCode, LunaError

if TYPE_CHECKING:
    from luna_daemon.service import Service


@op("lora_has", service="full clip")
def _lora_has(svc: Service, args: dict, ctx: Context) -> dict:
    sha = _arg(args, "sha256", str).lower()
    return {"sha256": sha, "present": _lora_cache(svc).has(sha)}


@op("lora_put", service="full clip")
def _lora_put(svc: Service, args: dict, ctx: Context) -> dict:
    data = _arg(args, "data", torch.Tensor)
    if data.dtype != torch.uint8 or data.ndim != 1:
        raise LunaError(ErrorCode.BAD_ARGS, "data must be the LoRA file's bytes as a 1-D uint8 tensor")
    sha = _arg(args, "sha256", str, None)
    return _lora_cache(svc).put(memoryview(data.numpy()), sha, _arg(args, "name", str, ""))


@op("lora_load", service="full clip")
def _lora_load(svc: Service, args: dict, ctx: Context) -> dict:
    cache = _lora_cache(svc)
    path = svc.registry.resolve_path(_arg(args, "path", str))
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise LunaError(ErrorCode.BAD_ARGS, f"{path.name}: only .safetensors LoRA files are accepted (pickle-based formats are never loaded)")
    with svc.registry.confine():  # the file read must stay inside the model roots too
        return cache.load_path(path)


@op("lora_list", service="full clip")
def _lora_list(svc: Service, args: dict, ctx: Context) -> dict:
    cache = _lora_cache(svc)
    return {"loras": cache.list(), "stats": cache.stats()}
