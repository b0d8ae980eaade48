"""ComfyVae: a ``comfy.sd.VAE`` served by the comfy engine (see comfy.py), and the KL VAE
configs for VAEs smaller than ComfyUI's SD size."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from luna_daemon import fsutil

from .base import EngineError, TiledArgs, VaeModel, module_nbytes

from .comfy_runtime import (
    _comfy_call, _drop_dead_models, _first_line, _jsonable_ratio, _jsonable, _memory_model,
)

logger = logging.getLogger(__name__)

# comfy's hard-coded KL VAE size (SD1/SD2/SDXL/SD3/Flux): detection handles these itself.
_SD_KL = {"ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "in_channels": 3, "out_ch": 3}

# -------------------------------------------------------------------- VAE configs


def _ddconfig_from_diffusers(cfg: Mapping[str, Any], what: str) -> dict[str, Any]:
    boc = [int(c) for c in cfg["block_out_channels"]]
    ch = boc[0]
    if any(c % ch for c in boc):
        raise EngineError("model_error", f"{what}: block_out_channels {boc} are not multiples of {ch}")
    if int(cfg.get("norm_num_groups", 32)) != 32:
        raise EngineError("model_error", f"{what}: ComfyUI's VAE uses 32 norm groups, the config says "
                                         f"{cfg.get('norm_num_groups')}")
    if cfg.get("use_quant_conv", True) is False or cfg.get("use_post_quant_conv", True) is False:
        raise EngineError("model_error", f"{what}: a KL VAE without quant convs cannot be given a config in ComfyUI")
    z = int(cfg.get("latent_channels", 4))
    if z != 4:
        raise EngineError("model_error", f"{what}: ComfyUI's configured KL VAE has 4 latent channels, the config "
                                         f"says {z}")
    return {"embed_dim": z, "ddconfig": {
        "double_z": True, "z_channels": z, "resolution": 256,
        "in_channels": int(cfg.get("in_channels", 3)), "out_ch": int(cfg.get("out_channels", 3)), "ch": ch,
        "ch_mult": [c // ch for c in boc], "num_res_blocks": int(cfg.get("layers_per_block", 2)),
        "attn_resolutions": [], "dropout": 0.0}}


def _sidecar_vae_config(path: Path) -> dict[str, Any] | None:
    sidecar = path.with_suffix(".json")
    what = f"VAE config {sidecar.name}"
    if not fsutil.present(sidecar, what):
        return None
    data = fsutil.read_json(sidecar, what)  # a small regular file inside the roots, else a typed error
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("params"), dict):
        return data
    if "ddconfig" in data:
        return {"params": data}
    if "block_out_channels" in data:
        return {"params": _ddconfig_from_diffusers(data, what)}
    return None  # e.g. the standalone engine's {"norm_num_groups": ...}: not a comfy config


def _count(sd: Mapping[str, Any], fmt: str) -> int:
    n = 0
    while fmt.format(n) in sd:
        n += 1
    return n


def _inferred_vae_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
    """A ``config`` for a 4-channel KL VAE whose sizes differ from SD's, from weight shapes
    (LDM or diffusers key layout); None where ComfyUI's own detection should run."""
    need = ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_in.weight", "decoder.conv_out.weight",
            "quant_conv.weight", "post_quant_conv.weight")
    if any(k not in sd for k in need):
        return None
    if "encoder.down.0.block.0.conv1.weight" in sd:
        level_fmt, block_fmt, attn = "encoder.down.{}.block.0.conv1.weight", "encoder.down.0.block.{}.conv1.weight", "encoder.mid.attn_1.q.weight"
    elif "encoder.down_blocks.0.resnets.0.conv1.weight" in sd:
        level_fmt, block_fmt = "encoder.down_blocks.{}.resnets.0.conv1.weight", "encoder.down_blocks.0.resnets.{}.conv1.weight"
        attn = next((k for k in sd if k.startswith("encoder.mid_block.attentions.0.")), None)
    else:
        return None
    if attn is None or attn not in sd:
        return None  # ComfyUI's KL VAE always has the mid-block attention
    ch = int(sd["encoder.conv_in.weight"].shape[0])
    levels = _count(sd, level_fmt)
    outs = [int(sd[level_fmt.format(i)].shape[0]) for i in range(levels)]
    z = int(sd["decoder.conv_in.weight"].shape[1])
    embed = int(sd["post_quant_conv.weight"].shape[1])
    if not levels or any(c % ch for c in outs) or any(c % 32 for c in outs) or z != 4 or embed != 4:
        return None
    if int(sd["encoder.conv_out.weight"].shape[0]) != 2 * z:
        return None
    ddconfig = {"double_z": True, "z_channels": z, "resolution": 256,
                "in_channels": int(sd["encoder.conv_in.weight"].shape[1]),
                "out_ch": int(sd["decoder.conv_out.weight"].shape[0]), "ch": ch, "ch_mult": [c // ch for c in outs],
                "num_res_blocks": _count(sd, block_fmt), "attn_resolutions": [], "dropout": 0.0}
    if all(ddconfig[k] == v for k, v in _SD_KL.items()):
        return None
    return {"params": {"embed_dim": embed, "ddconfig": ddconfig}}


# ----------------------------------------------------------------------------- VAE


class ComfyVae(VaeModel):
    """A ``comfy.sd.VAE`` behind the ``VaeModel`` interface: any class ComfyUI builds (image,
    video with 5-D latents, audio). Tensors go to ComfyUI's own ``encode`` / ``decode`` /
    ``*_tiled`` unchanged (its crop, frame folding and temporal tiling apply); only ranks the
    VAE cannot take are refused first, as ``bad_args``. ``info()`` carries every attribute a
    proxy mirrors, the memory estimates as :func:`_memory_model` models."""

    def __init__(self, vae: Any, *, source: str):
        self._vae = vae
        self.source = source
        self.device = torch.device(vae.device)
        self.dtype = vae.vae_dtype
        self._nbytes = module_nbytes(vae.first_stage_model)
        self._info = self._build_info(vae)

    @staticmethod
    def _build_info(vae: Any) -> dict[str, Any]:
        def call(name: str) -> Any:
            fn = getattr(vae, name, None)
            try:
                return _jsonable(fn()) if callable(fn) else None
            except Exception:  # noqa: BLE001 - an optional attribute of some comfy versions
                return None

        down_formula = getattr(vae, "downscale_index_formula", None)
        up_formula = getattr(vae, "upscale_index_formula", None)
        return {
            "engine": "comfy",
            "latent_channels": int(vae.latent_channels),
            "downscale_ratio": _jsonable_ratio(vae.downscale_ratio, down_formula, "encode"),
            "upscale_ratio": _jsonable_ratio(vae.upscale_ratio, up_formula, "decode"),
            "latent_dim": int(getattr(vae, "latent_dim", 2)),
            "output_channels": int(getattr(vae, "output_channels", 3)),
            "downscale_index_formula": _jsonable(down_formula),
            "upscale_index_formula": _jsonable(up_formula),
            "spacial_compression_encode": call("spacial_compression_encode"),
            "spacial_compression_decode": call("spacial_compression_decode"),
            "temporal_compression_decode": call("temporal_compression_decode"),
            "crop_input": bool(getattr(vae, "crop_input", True)),
            "not_video": bool(getattr(vae, "not_video", False)),
            "extra_1d_channel": _jsonable(getattr(vae, "extra_1d_channel", None)),
            "working_dtypes": _jsonable(getattr(vae, "working_dtypes", None)),
            "vae_dtype": _jsonable(vae.vae_dtype),
            "memory_used_encode": _memory_model(getattr(vae, "memory_used_encode", None), encode=True,
                                                dims=int(getattr(vae, "latent_dim", 2)), channels=3),
            "memory_used_decode": _memory_model(getattr(vae, "memory_used_decode", None), encode=False,
                                                dims=int(getattr(vae, "latent_dim", 2)),
                                                channels=int(vae.latent_channels)),
        }

    def nbytes(self) -> int:
        return self._nbytes if self._vae is not None else 0

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def release(self) -> None:
        vae, self._vae = self._vae, None
        if vae is None:
            return
        with _comfy_call("VAE release"):
            del vae
            _drop_dead_models()
        self._nbytes = 0

    def _require(self) -> Any:
        vae = self._vae
        if vae is None:
            raise EngineError("model_error", f"VAE {self.source} has been released")
        return vae

    def _what(self) -> str:
        return f"VAE {Path(self.source).name}"

    def _check_shape(self, vae: Any, tensor: torch.Tensor, what: str, layout: str) -> None:
        """The tensor ranks ComfyUI's VAE takes: ``latent_dim + 2``, and for a video VAE's
        encode also a 4-D batch of frames (one clip); anything else would fail deep in comfy."""
        dims = int(getattr(vae, "latent_dim", 2))
        ranks = {dims + 2}
        if what == "encode" and dims == 3:
            ranks.add(4)  # [T, H, W, C] frames: comfy treats them as one clip (or T images, not_video)
        if what == "decode" and getattr(vae, "extra_1d_channel", None) is not None:
            ranks.add(3)
        if tensor.ndim not in ranks:
            want = " or ".join(f"{r}-D" for r in sorted(ranks))
            raise EngineError("bad_args", f"{self._what()} {what} takes {want} {layout} tensors (latent_dim "
                                          f"{dims}), got shape {list(tensor.shape)}")

    def encode(self, pixels: torch.Tensor, tiled: TiledArgs | None = None) -> torch.Tensor:
        vae = self._require()
        if not isinstance(pixels, torch.Tensor) or pixels.ndim < 3 or not pixels.is_floating_point():
            raise EngineError("bad_args", "VAE encode expects a float tensor [B, H, W, C]")
        self._check_shape(vae, pixels, "encode", "pixel")
        if int(getattr(vae, "latent_dim", 2)) == 2 and pixels.ndim == 4 and pixels.shape[-1] > vae.output_channels:
            pixels = pixels[..., : vae.output_channels]  # what VAEEncode does (drops alpha)
        with _comfy_call(f"{self._what()} encode"):
            if tiled is None:
                out = vae.encode(pixels)
            else:
                out = vae.encode_tiled(pixels, tile_x=tiled.tile_x, tile_y=tiled.tile_y, overlap=tiled.overlap,
                                       tile_t=tiled.tile_t, overlap_t=tiled.overlap_t)
            return out.float().cpu().contiguous()

    # ``decode(..., options={...})`` is ComfyUI's ``decode(samples, vae_options=...)``.
    supports_vae_options = True

    def decode(self, latent: torch.Tensor, tiled: TiledArgs | None = None,
               options: Mapping[str, Any] | None = None) -> torch.Tensor:
        vae = self._require()
        if not isinstance(latent, torch.Tensor) or latent.ndim < 3 or not latent.is_floating_point():
            raise EngineError("bad_args", "VAE decode expects a float latent tensor [B, C, h, w] / [B, C, T, h, w]")
        if latent.shape[1] != vae.latent_channels:
            raise EngineError("bad_args", f"VAE decode expects {vae.latent_channels} latent channels, got {latent.shape[1]}")
        self._check_shape(vae, latent, "decode", "latent")
        if options and tiled is not None:
            raise EngineError("bad_args", "vae_options cannot be combined with a tiled decode (ComfyUI's decode_tiled "
                                          "takes none)")
        with _comfy_call(f"{self._what()} decode"):
            if tiled is None and options:
                try:
                    out = vae.decode(latent, vae_options=dict(options))
                except TypeError as exc:  # the model's decode() takes no such keyword
                    raise EngineError("bad_args", f"{self._what()} does not take vae_options {sorted(options)}: "
                                                  f"{_first_line(exc)}") from exc
            elif tiled is None:
                out = vae.decode(latent)
            else:
                out = vae.decode_tiled(latent, tile_x=tiled.tile_x, tile_y=tiled.tile_y, overlap=tiled.overlap,
                                       tile_t=tiled.tile_t, overlap_t=tiled.overlap_t)
            return out.float().cpu().contiguous()
