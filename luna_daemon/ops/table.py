"""The op table and what the op groups share: argument checks, the LoRA cache accessor.

``@op(name, auth=..., service=...)`` puts a function into ``_OPS``; ``Service.handle``
finds an op with one dict lookup there (the hot path: keep it one lookup). An op is
called as ``fn(service, args, ctx)`` and returns its result or raises ``LunaError``.
"""

from __future__ import annotations

import concurrent.futures as cf
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch

from luna_daemon.protocol import ErrorCode, LunaError

if TYPE_CHECKING:  # the service imports this module, never the other way round
    from luna_daemon.service import Service


class Context(Protocol):
    """What the server provides to an op while it runs."""

    client: str
    supervisor: bool  # set by Service for a supervising connection (see is_supervisor_hello)

    def wait(self, fut: cf.Future) -> Any: ...


OpFn = Callable[["Service", dict, Context], Any]
_OPS: dict[str, tuple[OpFn, bool, frozenset[str]]] = {}  # name -> (fn, needs_token, service kinds)


def op(name: str, *, auth: bool = True, service: str = "full vae clip") -> Callable[[OpFn], OpFn]:
    def deco(fn: OpFn) -> OpFn:
        _OPS[name] = (fn, auth, frozenset(service.split()))
        return fn

    return deco


# ----------------------------------------------------------------------------- arg helpers
def _arg(args: dict, name: str, kind: type | tuple, default: Any = ..., *, allow_none: bool = False) -> Any:
    if name not in args or (args[name] is None and default is not ...):
        if default is ...:
            raise LunaError(ErrorCode.BAD_ARGS, f"missing argument {name!r}")
        return default
    value = args[name]
    if value is None and allow_none:
        return None
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise LunaError(ErrorCode.BAD_ARGS, f"argument {name!r} must be a number")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise LunaError(ErrorCode.BAD_ARGS, f"argument {name!r} must be {names}, got {type(value).__name__}")
    return value


def _tensor(args: dict, name: str, ndim: int | tuple[int, ...]) -> torch.Tensor:
    t = _arg(args, name, torch.Tensor)
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if t.ndim not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise LunaError(ErrorCode.BAD_ARGS, f"{name} must be {want}, got shape {list(t.shape)}")
    if not t.is_floating_point():
        raise LunaError(ErrorCode.BAD_ARGS, f"{name} must be a float tensor, got {t.dtype}")
    if t.numel() == 0:
        raise LunaError(ErrorCode.BAD_ARGS, f"{name} is empty (shape {list(t.shape)})")
    return t


# ------------------------------------------------------------- what op groups share
def _lora_cache(svc: Service):
    """The service's LoRA cache (clip_encode's stacks, the lora_* ops); ``bad_args`` without one."""
    if svc.lora_cache is None:
        raise LunaError(ErrorCode.BAD_ARGS, "this daemon has no LoRA support")
    return svc.lora_cache
