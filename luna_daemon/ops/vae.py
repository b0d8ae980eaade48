"""VAE ops: vae_load, vae_encode, vae_decode (tiling and ``vae_options`` checks)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from luna_daemon.models.engines.base import DEFAULT_DECODE_TILE, DEFAULT_ENCODE_TILE, TiledArgs
from luna_daemon.ops.table import Context, _arg, _tensor, op
from luna_daemon.protocol import ErrorCode, LunaError

if TYPE_CHECKING:
    from luna_daemon.service import Service


def _tiled(args: dict, default: TiledArgs) -> TiledArgs | None:
    t = args.get("tiled")
    if t is None or t is False:
        return None
    if t is True:
        return default
    if not isinstance(t, dict):
        raise LunaError(ErrorCode.BAD_ARGS, "tiled must be true/false or {tile_x, tile_y, overlap}")
    vals = {}
    for k in ("tile_x", "tile_y", "overlap"):
        v = t.get(k, getattr(default, k))
        if type(v) is not int or v < 0 or (k != "overlap" and v < 1):
            raise LunaError(ErrorCode.BAD_ARGS, f"tiled.{k} must be a positive integer")
        vals[k] = v
    # Video VAEs: temporal tile sizes, absent/None = the VAE's own (image VAEs ignore them).
    for k, least in (("tile_t", 1), ("overlap_t", 0)):
        v = t.get(k)
        if v is not None and (type(v) is not int or v < least):
            raise LunaError(ErrorCode.BAD_ARGS, f"tiled.{k} must be null or an integer >= {least}")
        vals[k] = v
    # ``exact: true`` (the ComfyUI proxies): pass the sizes on as given, like ComfyUI's own
    # decode_tiled / encode_tiled, instead of shrinking an overlap of half a tile or more.
    if vals["overlap"] * 2 >= min(vals["tile_x"], vals["tile_y"]) and t.get("exact") is not True:
        vals["overlap"] = min(vals["tile_x"], vals["tile_y"]) // 4
    return TiledArgs(**vals)


# [B, C, L] audio / 1-D, [B, C, h, w] image, [B, C, T, h, w] video latents (pixels likewise:
# [B, L, C], [B, H, W, C], [B, T, H, W, C]); the engine checks them against the loaded VAE.
_VAE_NDIMS = (3, 4, 5)


def _vae_options(args: dict) -> dict:
    """``vae_options`` (ComfyUI's ``decode(samples, vae_options=...)``, e.g. Hunyuan3D's
    ``num_chunks`` / ``octree_resolution``): a flat dict of JSON scalars."""
    options = args.get("vae_options")
    if options is None:
        return {}
    if not isinstance(options, dict) or not all(
            isinstance(k, str) and (v is None or isinstance(v, (bool, int, float, str))) for k, v in options.items()):
        raise LunaError(ErrorCode.BAD_ARGS, "vae_options must be a flat object of numbers, strings or booleans")
    return options


@op("vae_load", service="full vae")
def _vae_load(svc: Service, args: dict, ctx: Context) -> dict:
    return svc.load("vae", [_arg(args, "path", str)], args, ctx=ctx)


@op("vae_encode", service="full vae")
def _vae_encode(svc: Service, args: dict, ctx: Context) -> dict:
    model_id = svc._vae(args)
    pixels = _tensor(args, "pixels", _VAE_NDIMS)
    latent = svc.run_vae(ctx, model_id, lambda m, t: m.encode(pixels, t), _tiled(args, DEFAULT_ENCODE_TILE), DEFAULT_ENCODE_TILE)
    return {"latent": latent}


@op("vae_decode", service="full vae")
def _vae_decode(svc: Service, args: dict, ctx: Context) -> dict:
    model_id = svc._vae(args)
    latent = _tensor(args, "latent", _VAE_NDIMS)
    options = _vae_options(args)
    if options:
        def call(m, t):
            if not getattr(m, "supports_vae_options", False):
                raise LunaError(ErrorCode.BAD_ARGS, f"this VAE's engine does not take vae_options {sorted(options)} "
                                                    "(run the daemon with engine = comfy)")
            return m.decode(latent, t, options=options)
    else:
        def call(m, t):
            return m.decode(latent, t)
    image = svc.run_vae(ctx, model_id, call, _tiled(args, DEFAULT_DECODE_TILE), DEFAULT_DECODE_TILE)
    return {"image": image}
