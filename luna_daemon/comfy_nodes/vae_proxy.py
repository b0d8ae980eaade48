"""DaemonVAE: ComfyUI's VAE surface, computed by the Luna Daemon (see proxies.py)."""

from __future__ import annotations

import math
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


def _tiled(tile_x: Any, tile_y: Any, overlap: Any, default: TiledArgs) -> dict:
    """The wire ``tiled`` argument; None means ComfyUI's default. ``exact``: the stock
    node has clamped the sizes already, so the daemon must not adjust them again."""
    return {"tile_x": _tile(tile_x, default.tile_x, "tile_x", 1), "tile_y": _tile(tile_y, default.tile_y, "tile_y", 1),
            "overlap": _tile(overlap, default.overlap, "overlap", 0), "exact": True}


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

    def _image_only(self, what: str, tensor: Any, ndim: int) -> None:
        if self.latent_dim != 2:
            raise DaemonUnsupported(f"{what}: the Luna Daemon serves image VAEs only; {self._remote.what} is a "
                                    f"{self.latent_dim}-D (video/audio) VAE - load it with ComfyUI's VAELoader")
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != ndim:
            shape = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise DaemonUnsupported(f"{what}: the Luna Daemon takes {ndim}-D tensors here, got {shape}")

    def decode(self, samples_in: torch.Tensor, vae_options: dict | None = None) -> torch.Tensor:
        if vae_options:
            raise DaemonUnsupported(f"VAE decode with vae_options {sorted(vae_options)} is not supported by the Luna "
                                    "Daemon (used by Hunyuan3D); load that VAE with ComfyUI's VAELoader")
        return self._run("VAE decode", "vae_decode", "latent", samples_in, "image")

    def decode_tiled(self, samples: torch.Tensor, tile_x: int | None = 64, tile_y: int | None = 64,
                     overlap: int | None = 16, tile_t: int | None = None, overlap_t: int | None = None) -> torch.Tensor:
        # tile_t / overlap_t only matter for 3-D (video) latents, which _image_only refuses:
        # ComfyUI ignores them for image VAEs too.
        return self._run("VAE decode_tiled", "vae_decode", "latent", samples, "image",
                         _tiled(tile_x, tile_y, overlap, DEFAULT_DECODE_TILE))

    def encode(self, pixel_samples: torch.Tensor) -> torch.Tensor:
        return self._run("VAE encode", "vae_encode", "pixels", pixel_samples, "latent")

    def encode_tiled(self, pixel_samples: torch.Tensor, tile_x: int | None = 512, tile_y: int | None = 512,
                     overlap: int | None = 64, tile_t: int | None = None, overlap_t: int | None = None) -> torch.Tensor:
        return self._run("VAE encode_tiled", "vae_encode", "pixels", pixel_samples, "latent",
                         _tiled(tile_x, tile_y, overlap, DEFAULT_ENCODE_TILE))

    def _run(self, what: str, op: str, arg: str, tensor: torch.Tensor, result: str, tiled: dict | None = None) -> torch.Tensor:
        """One encode/decode on the daemon: an image tensor in, ``result`` out on the client's device."""
        self._image_only(what, tensor, 4)
        extra = {} if tiled is None else {"tiled": tiled}
        out = self._remote.call(op, lambda mid: {"model": mid, arg: tensor, **extra})
        return _to_client(out[result])

    def get_sd(self) -> dict:
        raise DaemonUnsupported(f"get_sd: the weights of {self._remote.what} live in the Luna Daemon and are not sent "
                                "back (VAESave / CheckpointSave need a VAE loaded with ComfyUI's own loader)")
