"""Devices and precisions: which exist, how a user's spec resolves, memory per device,
and handing freed memory back (split out of the registry, which uses all of it).

What a caller can rely on: an unavailable device or unknown dtype is a ``bad_args``
LunaError listing what exists -- never a silent fallback."""

from __future__ import annotations

import gc
import os

import torch

from luna_daemon.protocol import ErrorCode, LunaError

DTYPE_ALIASES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_SHORT = {v: k for k, v in DTYPE_ALIASES.items()}


# --------------------------------------------------------------------------- devices
def available_devices() -> list[str]:
    """Devices torch can use in this process, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devs.append("mps")
    return devs


def resolve_device(spec: str | None) -> torch.device:
    """``auto`` -> first GPU if any, else CPU. An unavailable device is an error listing
    the devices that exist -- never a silent fallback."""
    spec = (spec or "auto").strip().lower()
    devs = available_devices()
    if spec == "auto":
        return torch.device(devs[1] if len(devs) > 1 else "cpu")
    if spec == "cuda":
        spec = "cuda:0"
    if spec not in devs:
        raise LunaError(ErrorCode.BAD_ARGS, f"device {spec!r} is not available; devices on this machine: {', '.join(devs)}")
    return torch.device(spec)


def resolve_dtype(spec: str | None) -> torch.dtype | None:
    """``auto`` -> None (the engine picks); fp32 / fp16 / bf16 -> torch dtype."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return None
    aliases = {**DTYPE_ALIASES, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if spec not in aliases:
        raise LunaError(ErrorCode.BAD_ARGS, f"dtype {spec!r} unknown; use auto, fp32, fp16 or bf16")
    return aliases[spec]


def device_memory(device: str) -> dict[str, int | None]:
    """Used / total bytes of a device (process RSS and system RAM for the CPU)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        free, total = torch.cuda.mem_get_info(idx)
        return {"used": total - free, "total": total, "allocated": torch.cuda.memory_allocated(idx)}
    if device == "cpu":
        import psutil

        return {"used": psutil.Process().memory_info().rss, "total": psutil.virtual_memory().total, "allocated": None}
    return {"used": None, "total": None, "allocated": None}


def release_memory() -> None:
    """Return freed memory: collect cycles, empty device caches, trim the C heap."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        try:
            torch.cuda.ipc_collect()
        except RuntimeError:
            pass
    mps = getattr(torch, "mps", None)
    if mps is not None and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        mps.empty_cache()
    _malloc_trim()


def _malloc_trim() -> None:
    # glibc keeps freed arenas mapped; malloc_trim hands them back so RSS really drops.
    if os.name != "posix":
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
