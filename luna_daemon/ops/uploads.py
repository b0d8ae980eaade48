"""Uploaded state dicts: vae_load_sd, clip_load_sd (the ComfyUI Checkpoint Tunnel; the
storage is models/uploads.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from luna_daemon.models.lora import SHA256_RE
from luna_daemon.models.uploads import store_upload
from luna_daemon.ops.table import Context, _arg, op
from luna_daemon.protocol import ErrorCode, LunaError

if TYPE_CHECKING:
    from luna_daemon.service import Service


def _sha_arg(args: dict) -> str:
    sha = _arg(args, "sha256", str).lower()
    if not SHA256_RE.fullmatch(sha):
        raise LunaError(ErrorCode.BAD_ARGS, "sha256 must be 64 hex digits")
    return sha


def _load_uploaded(svc: Service, kind: str, args: dict, ctx: Context) -> dict:
    sha = _sha_arg(args)
    paths, clip_type = store_upload(svc.settings, svc.registry, kind, sha, args.get("data"),
                                    model_class=args.get("model_class"), tokenizer_class=args.get("tokenizer_class"))
    out = {**svc.load(kind, [str(p) for p in paths], args, clip_type, internal=True, ctx=ctx), "sha256": sha}
    if clip_type is not None:
        out["clip_type"] = clip_type
    return out


@op("vae_load_sd", service="full vae")
def _vae_load_sd(svc: Service, args: dict, ctx: Context) -> dict:
    return _load_uploaded(svc, "vae", args, ctx)


@op("clip_load_sd", service="full clip")
def _clip_load_sd(svc: Service, args: dict, ctx: Context) -> dict:
    return _load_uploaded(svc, "clip", args, ctx)
