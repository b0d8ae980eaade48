"""CLIP ops: clip_load, clip_tokenize (embedding folders), clip_encode (token checks,
LoRA stacks)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from luna_daemon import fsutil
from luna_daemon.ops.table import Context, _arg, _lora_cache, op
from luna_daemon.protocol import ErrorCode, LunaError

if TYPE_CHECKING:
    from luna_daemon.service import Service

# The service's logger: the op modules are its parts, and its log lines keep their name.
log = logging.getLogger("luna_daemon.service")


@op("clip_load", service="full clip")
def _clip_load(svc: Service, args: dict, ctx: Context) -> dict:
    paths = args.get("paths", [args["path"]] if isinstance(args.get("path"), str) else None)
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise LunaError(ErrorCode.BAD_ARGS, "clip_load needs 'paths' (a list of files) or 'path'")
    return svc.load("clip", paths, args, _arg(args, "clip_type", str, "sd1"), ctx=ctx)


@op("clip_tokenize", service="full clip")
def _clip_tokenize(svc: Service, args: dict, ctx: Context) -> dict:
    model_id = svc._clip(args)
    text = _arg(args, "text", str)
    options = dict(_arg(args, "options", dict, {}))
    options.pop("embedding_directories", None)  # only the checked top-level argument may set it
    dirs = _embedding_dirs(svc, args)
    model = svc.registry.get(model_id).model
    if dirs is not None and getattr(model, "supports_embedding_directories", False):
        options["embedding_directories"] = dirs
    elif "embedding:" in text and not getattr(model, "supports_embedding_directories", False):
        log.warning("the %s engine does not load textual-inversion embeddings: 'embedding:' names are tokenized "
                    "as plain text (set engine = comfy)", svc.registry.engine.name)
    return {"tokens": svc.run(ctx, model_id, lambda m: m.tokenize(text, **options))}


MAX_EMBEDDING_DIRS = 32


def _embedding_dirs(svc: Service, args: dict) -> list[str] | None:
    """The calling ComfyUI's embedding folders (``embedding_directories``) that lie inside
    the model roots; one outside them is left out with a warning. None: not given."""
    given = args.get("embedding_directories")
    if given is None:
        return None
    if not isinstance(given, list) or len(given) > MAX_EMBEDDING_DIRS or not all(isinstance(d, str) and d for d in given):
        raise LunaError(ErrorCode.BAD_ARGS, f"embedding_directories must be a list of at most {MAX_EMBEDDING_DIRS} folders")
    roots = svc.registry.roots()
    out: list[str] = []
    for d in given:
        real = Path(os.path.realpath(os.path.expanduser(d)))
        if not fsutil.within(real, roots):
            log.warning("embedding folder %s is not inside the daemon's model roots: its embeddings are not used "
                        "(the Luna nodes register it on first use; or add it to model_roots)", fsutil.short(d))
        elif str(real) not in out:
            out.append(str(real))
    return out


def _check_tokens(tokens: Any) -> dict:
    # Only the outer shape: the token dict must reach the engine exactly as ComfyUI's
    # tokenizer made it (empty chunk lists, tuple chunks, extra keys); each engine checks
    # the streams it reads and answers bad_args / model_error for the rest.
    if not isinstance(tokens, dict) or not tokens or not all(isinstance(k, str) for k in tokens):
        raise LunaError(ErrorCode.BAD_ARGS, "tokens must be a non-empty {encoder: [chunk, ...]} object")
    return tokens


@op("clip_encode", service="full clip")
def _clip_encode(svc: Service, args: dict, ctx: Context) -> dict:
    model_id = svc._clip(args)
    layer = _arg(args, "layer", int, None)
    unprojected = _arg(args, "unprojected", bool, False)
    if layer is not None and layer >= 0:
        raise LunaError(ErrorCode.BAD_ARGS, "layer counts from the end like CLIPSetLastLayer: -1 = last, -2 = penultimate ...")
    model = svc.registry.get(model_id).model
    stack = args.get("loras") or []
    loras = []
    if stack:
        loras = _lora_cache(svc).resolve_stack(stack, model.patchable_keys() if model is not None else [])
    extra: dict[str, Any] = {}
    if unprojected:  # only sent by clients that need it (GLIGEN's return_pooled="unprojected")
        if not getattr(model, "supports_unprojected", False):
            raise LunaError(ErrorCode.BAD_ARGS, "this engine cannot return the unprojected pooled output (use engine = comfy)")
        extra["unprojected"] = True
    if "tokens" in args:
        tokens = _check_tokens(args["tokens"])

        def call(m: Any) -> dict:
            return m.encode(tokens, layer=layer, loras=loras, **extra)
    else:
        text = _arg(args, "text", str)

        def call(m: Any) -> dict:
            return m.encode(m.tokenize(text), layer=layer, loras=loras, **extra)

    out = dict(svc.run(ctx, model_id, call))
    return {"cond": out.pop("cond"), "pooled_output": out.pop("pooled_output", None), "extras": out}
