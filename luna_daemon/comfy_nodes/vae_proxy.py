"""DaemonVAE: ComfyUI's VAE surface, computed by the Luna Daemon (see proxies.py)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from luna_daemon.models.engines.base import DEFAULT_DECODE_TILE, DEFAULT_ENCODE_TILE, TiledArgs
from luna_daemon.comfy_nodes._remote import (
    DaemonUnsupported, _DTYPES, _Remote, _to_client, intermediate_device,
)


# ------------------------------------------------------------------------------------- VAE


def _ratio(value: Any) -> Any:
    """The daemon's JSON ratio -> ComfyUI's: an int, or ``(lambda, s, s)`` for video VAEs."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value) if float(value).is_integer() else value
    if isinstance(value, list):
        out = []
        for item in value:
            if isinstance(item, dict) and item.get("temporal") in ("encode", "decode") and item.get("factor"):
                k = int(item["factor"])
                if item["temporal"] == "encode":
                    out.append(lambda frames, k=k: max(0, math.floor((frames + k - 1) / k)))
                else:
                    out.append(lambda latents, k=k: max(0, latents * k - (k - 1)))
            else:
                out.append(item)
        return tuple(out)
    return value


def _formula(value: Any) -> tuple | None:
    return tuple(value) if isinstance(value, list) else value


def _last(value: Any) -> Any:
    return value[-1] if isinstance(value, tuple) else value


def _tile(value: Any, default: int, name: str, minimum: int) -> int:
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _optional_tile(value: Any, name: str, minimum: int) -> int | None:
    return None if value is None else _tile(value, 0, name, minimum)


def _tiled(tile_x: Any, tile_y: Any, overlap: Any, default: TiledArgs, tile_t: Any = None, overlap_t: Any = None) -> dict:
    """The wire ``tiled`` argument; None means ComfyUI's default. ``exact``: the stock
    node has clamped the sizes already, so the daemon must not adjust them again. The
    temporal sizes travel as given (None = the VAE's own); image VAEs ignore them."""
    return {"tile_x": _tile(tile_x, default.tile_x, "tile_x", 1), "tile_y": _tile(tile_y, default.tile_y, "tile_y", 1),
            "overlap": _tile(overlap, default.overlap, "overlap", 0), "exact": True,
            "tile_t": _optional_tile(tile_t, "tile_t", 1), "overlap_t": _optional_tile(overlap_t, "overlap_t", 0)}


_DTYPE_SIZES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8}


def _memory_estimate(model: Any, what: str) -> Callable[..., float]:
    """``memory_used_encode`` / ``memory_used_decode`` rebuilt from the daemon's model of its
    VAE's estimate (``_memory_model`` in the comfy engine): reference bytes scaled by each
    dimension's ratio to the reference shape (clamped below at its floor), raised to the
    probed exponent."""

    def estimate(shape: Any, dtype: Any = torch.float32, *args: Any, **kwargs: Any) -> float:
        if not isinstance(model, dict):
            raise DaemonUnsupported(f"{what}: the Luna Daemon did not send this VAE's memory estimate (engine "
                                    "standalone, or an older daemon); ComfyUI's nodes do not need it")
        ref, exps = model["shape"], model["exponents"]
        floors = model.get("floors") or [1] * len(ref)
        shape = list(shape)
        if len(shape) != len(ref):
            raise DaemonUnsupported(f"{what}: expected a {len(ref)}-D shape like {ref}, got {shape}")
        size = float(model["bytes"])
        for got, base, exp, floor in zip(shape, ref, exps, floors):
            if exp:
                size *= (max(float(got), float(floor)) / float(base)) ** float(exp)
        return size * _DTYPE_SIZES.get(dtype, 4) / float(model.get("dtype_size", 4))

    return estimate


def _json_options(options: dict) -> dict:
    bad = [k for k, v in options.items()
           if not isinstance(k, str) or not (v is None or isinstance(v, (bool, int, float, str)))]
    if bad:
        raise DaemonUnsupported(f"VAE decode: vae_options {bad} are not numbers, strings or booleans, so they cannot "
                                "be sent to the Luna Daemon; load that VAE with ComfyUI's VAELoader")
    return dict(options)


class DaemonVAE:
    """A ComfyUI ``VAE`` whose weights live in the Luna Daemon."""

    is_luna_proxy = True

    def __init__(self, remote: _Remote):
        self._remote = remote
        info = remote.info
        self.latent_channels = int(info.get("latent_channels", 4))
        self.latent_dim = int(info.get("latent_dim", 2))
        self.output_channels = int(info.get("output_channels", 3))
        self.downscale_ratio = _ratio(info.get("downscale_ratio", 8))
        self.upscale_ratio = _ratio(info.get("upscale_ratio", 8))
        self.downscale_index_formula = _formula(info.get("downscale_index_formula"))
        self.upscale_index_formula = _formula(info.get("upscale_index_formula"))
        self.crop_input = bool(info.get("crop_input", True))
        self.not_video = bool(info.get("not_video", False))
        self.extra_1d_channel = info.get("extra_1d_channel")
        self.vae_dtype = _DTYPES.get(str(info.get("vae_dtype")), None) or torch.float32
        self.working_dtypes = [d for d in (_DTYPES.get(str(n)) for n in info.get("working_dtypes") or []) if d]
        self.disable_offload = False
        # ComfyUI's estimates (bytes for a [B, C, ...] shape and a dtype), as the daemon's VAE has them.
        self.memory_used_encode = _memory_estimate(info.get("memory_used_encode"), "memory_used_encode")
        self.memory_used_decode = _memory_estimate(info.get("memory_used_decode"), "memory_used_decode")

    # -- what the proxy is

    @property
    def model_id(self) -> str:
        return self._remote.model_id

    @property
    def device(self) -> torch.device:
        """Where results land in this process (the daemon's own device is ``daemon_device``)."""
        return intermediate_device()

    @property
    def output_device(self) -> torch.device:
        return intermediate_device()

    @property
    def daemon_device(self) -> str | None:
        return self._remote.daemon_device

    def __repr__(self) -> str:
        return f"<DaemonVAE {self._remote.what} id={self.model_id} on daemon {self.daemon_device}>"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_remote",):
            raise AttributeError(name)
        raise AttributeError(f"'{name}' is not available on a Luna Daemon VAE: the VAE ({self._remote.what}) runs in the "
                             "Luna Daemon, so ComfyUI internals such as first_stage_model or patcher do not exist here; "
                             "use ComfyUI's VAELoader for nodes that need them")

    # -- geometry (ComfyUI spells it "spacial")

    def spacial_compression_decode(self) -> Any:
        value = self._remote.info.get("spacial_compression_decode")
        return value if value is not None else _last(self.upscale_ratio)

    def spacial_compression_encode(self) -> Any:
        value = self._remote.info.get("spacial_compression_encode")
        return value if value is not None else _last(self.downscale_ratio)

    def temporal_compression_decode(self) -> Any:
        return self._remote.info.get("temporal_compression_decode")

    def throw_exception_if_invalid(self) -> None:
        """A daemon VAE is valid by construction (the daemon refused invalid weights)."""

    def vae_encode_crop_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Centre-crop each spatial size to a multiple of the encode compression (a view)."""
        if not self.crop_input:
            return pixels
        ratio = int(self.spacial_compression_encode())
        for dim in range(1, pixels.ndim - 1):
            size = pixels.shape[dim]
            keep = (size // ratio) * ratio
            if keep != size:
                pixels = pixels.narrow(dim, (size % ratio) // 2, keep)
        return pixels

    # -- calls

    def _check(self, what: str, tensor: Any) -> None:
        # The ranks the daemon's VAE takes are checked there, against the loaded model
        # (image, video and audio VAEs differ); here only what cannot be sent at all.
        if not isinstance(tensor, torch.Tensor) or tensor.ndim < 3:
            shape = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise DaemonUnsupported(f"{what}: the Luna Daemon takes 3-D to 5-D tensors here, got {shape}")

    def decode(self, samples_in: torch.Tensor, vae_options: dict | None = None) -> torch.Tensor:
        extra = {"vae_options": _json_options(vae_options)} if vae_options else {}
        return self._run("VAE decode", "vae_decode", "latent", samples_in, "image", extra)

    def decode_tiled(self, samples: torch.Tensor, tile_x: int | None = None, tile_y: int | None = None,
                     overlap: int | None = None, tile_t: int | None = None, overlap_t: int | None = None) -> torch.Tensor:
        # None x / y / overlap = ComfyUI's 2-D defaults (64 / 64 / 16). For a video latent
        # ComfyUI builds the overlap triple from ``overlap`` and fails on None, so that is
        # refused here with the reason; the temporal sizes travel as given (None included).
        if isinstance(samples, torch.Tensor) and samples.ndim == 5 and None in (tile_x, tile_y, overlap):
            raise DaemonUnsupported("VAE decode_tiled of a video latent needs tile_x, tile_y and overlap (VAEDecodeTiled "
                                    "always passes them)")
        return self._run("VAE decode_tiled", "vae_decode", "latent", samples, "image",
                         {"tiled": _tiled(tile_x, tile_y, overlap, DEFAULT_DECODE_TILE, tile_t, overlap_t)})

    def encode(self, pixel_samples: torch.Tensor) -> torch.Tensor:
        return self._run("VAE encode", "vae_encode", "pixels", pixel_samples, "latent")

    def encode_tiled(self, pixel_samples: torch.Tensor, tile_x: int | None = None, tile_y: int | None = None,
                     overlap: int | None = None, tile_t: int | None = None, overlap_t: int | None = None) -> torch.Tensor:
        if isinstance(pixel_samples, torch.Tensor) and self.latent_dim == 3 and None in (tile_x, tile_y, overlap):
            raise DaemonUnsupported("VAE encode_tiled with a video VAE needs tile_x, tile_y and overlap (VAEEncodeTiled "
                                    "always passes them)")
        return self._run("VAE encode_tiled", "vae_encode", "pixels", pixel_samples, "latent",
                         {"tiled": _tiled(tile_x, tile_y, overlap, DEFAULT_ENCODE_TILE, tile_t, overlap_t)})

    def _run(self, what: str, op: str, arg: str, tensor: torch.Tensor, result: str, extra: dict | None = None) -> torch.Tensor:
        """One encode/decode on the daemon: the tensor in, ``result`` out on the client's device."""
        self._check(what, tensor)
        out = self._remote.call(op, lambda mid: {"model": mid, arg: tensor, **(extra or {})})
        return _to_client(out[result])

    def get_sd(self) -> dict:
        raise DaemonUnsupported(f"get_sd: the weights of {self._remote.what} live in the Luna Daemon and are not sent "
                                "back (VAESave / CheckpointSave need a VAE loaded with ComfyUI's own loader)")
