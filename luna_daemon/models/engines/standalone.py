"""The standalone engine: diffusers ``AutoencoderKL`` + transformers CLIP text encoders.

It needs no ComfyUI. It reproduces the ComfyUI semantics the proxies rely on (layouts,
cropping, chunked tokens, CLIPSetLastLayer, token weights, LoRA maths), with these
documented differences from the ``comfy`` engine:

* **No prompt-weighting syntax.** ``tokenize`` does not parse ComfyUI's ``(text:1.2)`` /
  ``(text)`` / ``embedding:name`` syntax: brackets and colons are tokenized as plain text and
  every weight is 1.0. ``encode`` *does* honour weights other than 1.0 found in the tokens
  (e.g. tokens made by a ComfyUI-side tokenizer), with ComfyUI's formula
  ``empty + (z - empty) * w``, ``empty`` being the encoding of the empty prompt.
* **No textual-inversion embeddings** inside tokens (only integer ids): ``bad_args``.
* **Model kinds**: KL image VAEs in diffusers layout (folder or single ``.safetensors``) and
  the ``sd1`` / ``sdxl`` CLIP text encoders in transformers layout. Other clip types, the
  original-LDM VAE key layout and pickled weights are refused with a clear error. No pickle
  is ever loaded: weights are read with ``safetensors`` only.
* **Out-of-range CLIP layers** are an error (``bad_args``) instead of ComfyUI's silent
  fallback to the last layer.

Layer selection mirrors ComfyUI per model family: for ``sd1`` the default is the last layer
(after ``final_layer_norm``), and ``layer=-n`` takes the output of the n-th last transformer
layer *passed through* ``final_layer_norm``. For ``sdxl`` both encoders default to the
penultimate layer and never apply ``final_layer_norm`` to the selected layer (ComfyUI's
SDXL CLIP-L/CLIP-G do the same), so ``layer=-1`` there is the raw output of the last layer.
The pooled output always comes from the final, normalised layer at the first EOS token of the
first chunk: ``pooler_output`` for SD1's CLIP-L, ``text_embeds`` (projected) for SDXL's CLIP-G.

LoRA target names (``ClipModel.patchable_keys``) are the Hugging Face checkpoint names of the
text encoder's ``Linear`` weights, independent of the installed transformers version:
``text_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj.weight``,
``text_model.encoder.layers.{i}.mlp.fc{1,2}.weight`` and ``text_projection.weight`` (CLIP-G
only). Replacing dots by underscores (minus ``.weight``) gives the kohya suffix
(``lora_te_text_model_encoder_layers_0_self_attn_q_proj``). For ``sd1`` the names are bare
(an ``l:`` prefix is accepted too); for ``sdxl`` they are prefixed with the encoder key:
``l:text_model...`` for CLIP-L (kohya ``lora_te1_``) and ``g:text_model...`` /
``g:text_projection.weight`` for CLIP-G (kohya ``lora_te2_``).

LoRA stacks are applied functionally (``torch.func.functional_call``) on per-call *shells*:
structural copies of the module that share its parameter tensors. ``functional_call`` swaps
attributes on the module it is given for the duration of the call, so running it on the
shared module itself would let concurrent calls see each other's weights; a shell is owned by
one call at a time, and the shared weights are never written.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from luna_daemon import fsutil
from luna_daemon.protocol import LunaError

from .base import (DEFAULT_DECODE_TILE, DEFAULT_ENCODE_TILE, ClipModel, Engine, EngineError, LoraSpec, TiledArgs, VaeModel,
                   as_device, is_oom, module_nbytes, weights_read)
from .tiling import tiled_map_three_pass

logger = logging.getLogger(__name__)

# ComfyUI's defaults for tiled decode (latent pixels) and tiled encode (image pixels).

# Words of at most this many tokens move whole to the next chunk instead of being split
# (ComfyUI's SD tokenizer uses the same threshold).
MAX_WORD_LENGTH = 8

SUPPORTED_CLIP_TYPES = ("sd1", "sdxl")
_CLIP_TYPE_ALIASES = {"sd1": "sd1", "stable_diffusion": "sd1", "sd15": "sd1", "sdxl": "sdxl"}

DEFAULT_LORA_CACHE_ENTRIES = 4


# ------------------------------------------------------------------------------ helpers


def _default_dtype(device: torch.device, kind: str) -> torch.dtype:
    """The dtype used when the caller passes ``None``: fp32 on the CPU; on CUDA what ComfyUI
    picks by default (bf16 VAE where supported, fp16 text encoders)."""
    if device.type == "cuda":
        if kind == "vae":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.float16
    return torch.float32


def _single_path(paths: Sequence[str] | str, what: str) -> Path:
    if isinstance(paths, (str, Path)):
        paths = [str(paths)]
    paths = list(paths)
    if len(paths) != 1:
        raise EngineError("bad_args", f"{what} takes exactly one path, got {len(paths)}")
    return Path(paths[0])


def _check_exists(path: Path, what: str) -> None:
    if not fsutil.present(path, what):
        raise EngineError("not_found", f"{what} not found: {fsutil.short(path)}")
    fsutil.check_inside(path, what)


def _refuse_pickle(path: Path, what: str) -> EngineError:
    return EngineError(
        "model_error",
        f"{what} {path.name}: only .safetensors weights are supported by the standalone engine "
        f"(pickled .ckpt/.pt/.bin files are never loaded); convert the file to .safetensors",
    )


def _load_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Read every tensor of a .safetensors file into memory this process owns, reporting
    load progress tensor by tensor.

    safetensors maps the file and hands out views of the mapping. A daemon keeps models for
    days: had a weight stayed such a view, rewriting the file in place while it is loaded
    (``cp`` over it truncates first) would change the weights or kill the daemon with
    SIGBUS. So each tensor is copied out (this copy is the actual disk read).

    The file must be a regular file (inside the roots during a registry load): safetensors
    opens by name while holding the GIL, so a FIFO handed to it would freeze the process;
    it is given the checked, open file (:attr:`fsutil.RegularFile.os_path`)."""
    from safetensors import safe_open

    with fsutil.open_regular(path, what) as fh:
        try:
            state: dict[str, torch.Tensor] = {}
            with safe_open(fh.os_path, framework="pt", device="cpu") as f:
                for key in f.keys():
                    tensor = state[key] = f.get_tensor(key).clone()
                    weights_read(tensor.numel() * tensor.element_size())
            return state
        except Exception as exc:  # safetensors raises several types for a corrupt header
            raise EngineError("model_error", f"{what} {path}: cannot read safetensors file: {exc}") from exc


def _read_json(path: Path, what: str) -> dict:
    """A config / sidecar: a regular file of at most ``fsutil.SMALL_FILE_CAP`` holding a JSON object."""
    data = fsutil.read_json(path, f"{what}: config", fsutil.SMALL_FILE_CAP)
    if not isinstance(data, dict):
        raise EngineError("model_error", f"{what}: {path} does not hold a JSON object")
    return data


def _folder_weights(folder: Path, stem: str, what: str) -> dict[str, torch.Tensor]:
    """Read ``<stem>.safetensors`` (or its shards / fp16 variant) from a model folder."""
    single = folder / f"{stem}.safetensors"
    if fsutil.present(single, what):
        return _load_safetensors(single, what)
    index = folder / f"{stem}.safetensors.index.json"
    if fsutil.present(index, what):
        weight_map = _read_json(index, what).get("weight_map", {})
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_load_safetensors(folder / shard, what))
        return state
    variants = sorted(folder.glob(f"{stem}.*.safetensors"))
    if variants:
        return _load_safetensors(variants[0], what)
    for pickled in (f"{stem}.bin", "pytorch_model.bin", "diffusion_pytorch_model.bin"):
        if fsutil.present(folder / pickled, what):
            raise _refuse_pickle(folder / pickled, what)
    raise EngineError("model_error", f"{what} folder {folder} has no {stem}.safetensors")


def _materialise(cls: Callable[..., nn.Module], init: Mapping[str, Any] | Any, state: Mapping[str, torch.Tensor],
                 key_for: Callable[[str], str], what: str) -> nn.Module:
    """Build ``cls(init)`` without random initialisation and fill it from ``state``.

    The skeleton is built on the meta device (no memory, no init cost even for multi-GB
    encoders) and the loaded tensors are assigned into it. ``key_for`` maps a module key to
    the key in ``state``. Missing weights are a ``model_error``; leftovers are logged.
    """
    with torch.device("meta"):
        module = cls(**init) if isinstance(init, Mapping) else cls(init)
    wanted = module.state_dict(keep_vars=True)
    fill: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for name, ref in wanted.items():
        src = key_for(name)
        tensor = state.get(src)
        if tensor is None:
            missing.append(src)
            continue
        if tuple(tensor.shape) != tuple(ref.shape):
            raise EngineError(
                "model_error",
                f"{what}: weight {src} has shape {tuple(tensor.shape)}, the inferred architecture "
                f"expects {tuple(ref.shape)}",
            )
        fill[name] = tensor
    if missing:
        raise EngineError(
            "model_error",
            f"{what}: {len(missing)} weights missing from the file, e.g. {', '.join(missing[:3])}",
        )
    used = {key_for(name) for name in wanted}
    leftovers = [k for k in state if k not in used]
    if leftovers:
        logger.debug("%s: %d unused weights ignored, e.g. %s", what, len(leftovers), leftovers[:3])
    module.load_state_dict(fill, strict=True, assign=True)
    # Non-persistent buffers are not in any checkpoint and are still meta here.
    for name, buf in list(module.named_buffers()):
        if not buf.is_meta:
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        if leaf == "position_ids":
            value = torch.arange(buf.shape[-1], dtype=torch.long).expand(buf.shape).contiguous()
            parent.register_buffer(leaf, value, persistent=False)
        else:
            raise EngineError("model_error", f"{what}: cannot initialise buffer {name}")
    for param in module.parameters():
        param.requires_grad_(False)
    return module.eval()


# ---------------------------------------------------------------------------------- VAE

_VAE_INIT_KEYS = (
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size",
    "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast",
    "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
)
# Keys of the original LDM / ComfyUI layout, recognised only to give a precise error.
_LDM_VAE_MARKERS = ("encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight")


def _block_indices(state: Mapping[str, Any], prefix: str) -> list[int]:
    found = set()
    for key in state:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _rename_legacy_vae_attention(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old diffusers files name the mid-block attention query/key/value/proj_attn."""
    renames = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".attentions." in key:
            for old, new in renames.items():
                key = key.replace(old, new)
            # Very old files stored these projections as 1x1 convolutions.
            if key.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")) and value.ndim == 4:
                value = value[:, :, 0, 0]
        out[key] = value
    return out


def infer_autoencoder_kl_config(state: Mapping[str, torch.Tensor], sidecar: Mapping[str, Any] | None = None,
                                *, what: str = "VAE") -> dict[str, Any]:
    """Infer ``AutoencoderKL(**config)`` from a diffusers-layout state dict.

    Shapes give block_out_channels, layers_per_block, latent/in/out channels and whether the
    quant convs and the mid-block attention exist. ``norm_num_groups`` (and other settings
    that leave no trace in shapes, e.g. ``act_fn``) come from ``sidecar`` when given, else
    the SD defaults (32 groups, silu). Raises ``EngineError("model_error")`` for state dicts
    that are not a diffusers AutoencoderKL.
    """
    if any(marker in state for marker in _LDM_VAE_MARKERS) or any(k.startswith("first_stage_model.") for k in state):
        raise EngineError(
            "model_error",
            f"{what} is in the original LDM/ComfyUI key layout (encoder.down.N.block...); the "
            f"standalone engine loads diffusers-layout VAEs only: use the comfy engine or a "
            f"diffusers-format VAE",
        )
    needed = ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_in.weight", "decoder.conv_out.weight")
    absent = [k for k in needed if k not in state]
    levels = _block_indices(state, "encoder.down_blocks.")
    if absent or not levels:
        raise EngineError(
            "model_error",
            f"{what} is not a diffusers AutoencoderKL state dict (missing {', '.join(absent) or 'encoder.down_blocks'})",
        )
    if levels != list(range(len(levels))):
        raise EngineError("model_error", f"{what}: encoder down blocks are not numbered 0..{len(levels) - 1}")
    channels = []
    for i in levels:
        key = f"encoder.down_blocks.{i}.resnets.0.conv2.weight"
        if key not in state:
            raise EngineError("model_error", f"{what}: missing {key}")
        channels.append(int(state[key].shape[0]))
    layers_per_block = len(_block_indices(state, "encoder.down_blocks.0.resnets."))
    latent_channels = int(state["decoder.conv_in.weight"].shape[1])
    if int(state["encoder.conv_out.weight"].shape[0]) != 2 * latent_channels:
        raise EngineError(
            "model_error",
            f"{what}: encoder output has {state['encoder.conv_out.weight'].shape[0]} channels, a KL VAE "
            f"with {latent_channels} latent channels needs {2 * latent_channels}",
        )
    config: dict[str, Any] = {}
    if sidecar:
        config.update({k: v for k, v in sidecar.items() if k in _VAE_INIT_KEYS})
    config.update(
        in_channels=int(state["encoder.conv_in.weight"].shape[1]),
        out_channels=int(state["decoder.conv_out.weight"].shape[0]),
        block_out_channels=tuple(channels),
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        use_quant_conv="quant_conv.weight" in state,
        use_post_quant_conv="post_quant_conv.weight" in state,
        mid_block_add_attention=any(k.startswith("encoder.mid_block.attentions.") for k in state),
    )
    groups = int(config.setdefault("norm_num_groups", 32))
    if any(c % groups for c in channels):
        raise EngineError(
            "model_error",
            f"{what}: norm_num_groups={groups} does not divide block_out_channels {tuple(channels)}; put "
            f'the right value in a sidecar JSON next to the file (e.g. {{"norm_num_groups": 16}})',
        )
    return config


def _vae_sidecar(path: Path) -> dict[str, Any] | None:
    """``<stem>.json`` next to the file, else a ``config.json`` that describes an AutoencoderKL."""
    own = path.with_suffix(".json")
    if fsutil.present(own, "VAE sidecar"):
        return _read_json(own, "VAE sidecar")
    shared = path.parent / "config.json"
    if fsutil.present(shared, "VAE sidecar"):
        data = _read_json(shared, "VAE sidecar")
        if data.get("_class_name", "AutoencoderKL") == "AutoencoderKL" and "block_out_channels" in data:
            return data
        logger.debug("ignoring %s: not an AutoencoderKL config", shared)
    return None


def _load_autoencoder(path: Path) -> tuple[nn.Module, str]:
    """Load an AutoencoderKL from a diffusers folder or a single diffusers-layout file."""
    from diffusers import AutoencoderKL

    what = f"VAE {path.name}"
    if path.is_dir() and not fsutil.present(path / "config.json", what) and fsutil.present(path / "vae" / "config.json", what):
        # A whole diffusers pipeline folder: its VAE lives in vae/.
        path = path / "vae"
    if path.is_dir():
        config_path = path / "config.json"
        if not fsutil.present(config_path, what):
            raise EngineError("model_error", f"VAE folder {path} has no config.json (expected a diffusers AutoencoderKL folder)")
        folder_config = _read_json(config_path, what)
        class_name = folder_config.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise EngineError("model_error", f"{what}: {class_name} is not supported by the standalone engine (AutoencoderKL only)")
        state = _rename_legacy_vae_attention(_folder_weights(path, "diffusion_pytorch_model", what))
        config = {k: v for k, v in folder_config.items() if k in _VAE_INIT_KEYS}
        layout = "folder"
    else:
        if path.suffix.lower() != ".safetensors":
            if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
                raise _refuse_pickle(path, "VAE")
            raise EngineError("model_error", f"{what}: unsupported file type {path.suffix!r} (expected .safetensors or a diffusers folder)")
        state = _rename_legacy_vae_attention(_load_safetensors(path, what))
        config = infer_autoencoder_kl_config(state, _vae_sidecar(path), what=what)
        layout = "file"
    module = _materialise(AutoencoderKL, config, state, lambda k: k, what)
    return module, layout


class StandaloneVae(VaeModel):
    """A diffusers ``AutoencoderKL`` behind the ``VaeModel`` interface (ComfyUI semantics).

    ``encode`` returns the raw latent mean (``latent_dist.mode()``, no scaling factor);
    ``decode`` returns pixels clamped to 0..1. Both accept the ComfyUI tiled geometry and,
    like ComfyUI, fall back to tiling when a plain call runs out of memory.
    """

    def __init__(self, module: nn.Module, *, device: torch.device, dtype: torch.dtype, source: str):
        self._module: nn.Module | None = module
        self.device = device
        self.dtype = dtype
        self.source = source
        cfg = module.config
        self.latent_channels = int(cfg.latent_channels)
        self.in_channels = int(cfg.in_channels)
        self.out_channels = int(cfg.out_channels)
        self.downscale_ratio = 2 ** (len(cfg.block_out_channels) - 1)
        self.upscale_ratio = self.downscale_ratio
        self._nbytes = module_nbytes(module)

    # -- LoadedModel

    def nbytes(self) -> int:
        return self._nbytes if self._module is not None else 0

    def info(self) -> dict[str, Any]:
        return {
            "latent_channels": self.latent_channels,
            "downscale_ratio": self.downscale_ratio,
            "upscale_ratio": self.upscale_ratio,
            "latent_dim": 2,
            "output_channels": 3,
            "downscale_index_formula": None,
            "upscale_index_formula": None,
        }

    def release(self) -> None:
        self._module = None
        self._nbytes = 0

    def _require(self) -> nn.Module:
        module = self._module
        if module is None:
            raise EngineError("model_error", f"VAE {self.source} has been released")
        return module

    # -- pixel helpers

    def crop_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Centre-crop H and W of BHWC pixels down to multiples of the downscale ratio."""
        ratio = self.downscale_ratio
        height, width = pixels.shape[1], pixels.shape[2]
        new_h, new_w = (height // ratio) * ratio, (width // ratio) * ratio
        if new_h == 0 or new_w == 0:
            raise EngineError("bad_args", f"image {height}x{width} is smaller than the VAE's {ratio}x{ratio} block")
        top, left = (height % ratio) // 2, (width % ratio) // 2
        return pixels[:, top:top + new_h, left:left + new_w, :]

    @staticmethod
    def _tile_geometry(tiled: TiledArgs, default: TiledArgs) -> tuple[int, int, int]:
        tile_x = default.tile_x if tiled.tile_x is None else int(tiled.tile_x)
        tile_y = default.tile_y if tiled.tile_y is None else int(tiled.tile_y)
        overlap = default.overlap if tiled.overlap is None else int(tiled.overlap)
        if tile_x <= 0 or tile_y <= 0 or overlap < 0:
            raise EngineError("bad_args", f"bad tile geometry: tile_x={tile_x} tile_y={tile_y} overlap={overlap}")
        return tile_x, tile_y, overlap

    # -- VaeModel

    def encode(self, pixels: torch.Tensor, tiled: TiledArgs | None = None) -> torch.Tensor:
        """BHWC 0..1 pixels -> raw BCHW latent (float32, CPU), H/W centre-cropped to the ratio.

        Extra channels beyond the VAE's input channels (alpha) are dropped.
        """
        module = self._require()
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or not pixels.is_floating_point():
            raise EngineError("bad_args", "VAE encode expects a float tensor [B, H, W, C]")
        if pixels.shape[-1] < self.in_channels:
            raise EngineError("bad_args", f"VAE encode needs {self.in_channels} channels, got {pixels.shape[-1]}")
        pixels = self.crop_pixels(pixels[..., : self.in_channels])
        ratio = self.downscale_ratio

        def encode_fn(x: torch.Tensor) -> torch.Tensor:
            return module.encode(x).latent_dist.mode()

        x = pixels.to(device=self.device, dtype=self.dtype).movedim(-1, 1) * 2.0 - 1.0
        latent = self._run(encode_fn, x, tiled, DEFAULT_ENCODE_TILE, scale=1.0 / ratio, align=ratio)
        return latent.float().cpu().contiguous()

    def decode(self, latent: torch.Tensor, tiled: TiledArgs | None = None) -> torch.Tensor:
        """BCHW latent -> BHWC float32 pixels in 0..1 (CPU)."""
        module = self._require()
        if not isinstance(latent, torch.Tensor) or latent.ndim != 4 or not latent.is_floating_point():
            raise EngineError("bad_args", "VAE decode expects a float tensor [B, C, h, w]")
        if latent.shape[1] != self.latent_channels:
            raise EngineError(
                "bad_args", f"VAE decode expects {self.latent_channels} latent channels, got {latent.shape[1]}")

        def decode_fn(z: torch.Tensor) -> torch.Tensor:
            return module.decode(z).sample

        z = latent.to(device=self.device, dtype=self.dtype)
        image = self._run(decode_fn, z, tiled, DEFAULT_DECODE_TILE, scale=float(self.upscale_ratio), align=1)
        image = ((image.float() + 1.0) / 2.0).clamp(0.0, 1.0)
        return image.movedim(1, -1).cpu().contiguous()

    def _empty_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _run(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tiled: TiledArgs | None,
             default: TiledArgs, *, scale: float, align: int) -> torch.Tensor:
        """Run ``fn`` whole or tiled. Out-of-memory propagates as ``EngineError("oom")``:
        the service owns the single tiled retry (and its warning event), for every engine."""
        try:
            with torch.inference_mode():
                if tiled is None:
                    return fn(x)
                tile_x, tile_y, overlap = self._tile_geometry(tiled, default)
                return tiled_map_three_pass(fn, x, tile_x=tile_x, tile_y=tile_y, overlap=overlap, scale=scale, align=align)
        except Exception as exc:
            if is_oom(exc):
                self._empty_cache()
                how = "tiled" if tiled is not None else "untiled"
                raise EngineError("oom", f"VAE {self.source} ran out of memory ({how}): {exc}") from exc
            raise


# --------------------------------------------------------------------------------- CLIP


def _normalise_clip_keys(state: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Map a CLIP text-encoder state dict onto HF checkpoint names (``text_model.*``,
    ``text_projection.weight``), whether its keys start at ``text_model.`` or ``embeddings.``
    (or sit under an outer prefix such as ``transformer.``)."""
    anchor = "embeddings.token_embedding.weight"
    hits = [k for k in state if k.endswith(anchor)]
    if len(hits) != 1:
        if any(k.startswith(("transformer.resblocks.", "resblocks.")) or k == "token_embedding.weight" for k in state):
            raise EngineError(
                "model_error",
                f"{what} is in the OpenCLIP key layout; the standalone engine loads Hugging Face CLIP text "
                f"encoders (text_model.* keys) only: use the comfy engine",
            )
        raise EngineError(
            "model_error",
            f"{what} is not a single CLIP text encoder ({'no' if not hits else len(hits)} "
            f"'{anchor}' weights found)",
        )
    prefix = hits[0][: -len(anchor)]
    if prefix and not prefix.endswith("text_model."):
        raise EngineError("model_error", f"{what}: unrecognised key prefix {prefix!r}")
    outer = prefix[: -len("text_model.")] if prefix else ""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(prefix):
            out["text_model." + key[len(prefix):]] = value
        elif key == outer + "text_projection.weight":
            out["text_projection.weight"] = value
    return out


def infer_clip_text_config(state: Mapping[str, torch.Tensor], sidecar: Mapping[str, Any] | None = None,
                           *, kind: str = "l", what: str = "CLIP") -> dict[str, Any]:
    """Infer ``CLIPTextConfig`` fields from a normalised (``text_model.*``) state dict.

    Shapes give vocab/hidden/intermediate sizes, layer count, max positions and (when
    ``text_projection.weight`` exists) ``projection_dim``. Attention heads, activation and
    layer-norm epsilon come from ``sidecar`` when given; otherwise heads = hidden // 64 and the
    activation is ``quick_gelu`` for kind "l" (OpenAI CLIP-L) and ``gelu`` for kind "g"
    (OpenCLIP bigG).
    """
    try:
        token = state["text_model.embeddings.token_embedding.weight"]
        positions = state["text_model.embeddings.position_embedding.weight"]
        fc1 = state["text_model.encoder.layers.0.mlp.fc1.weight"]
    except KeyError as exc:
        raise EngineError("model_error", f"{what}: missing CLIP weight {exc.args[0]}") from None
    config: dict[str, Any] = dict(sidecar or {})
    config.pop("architectures", None)
    inferred = {
        "vocab_size": int(token.shape[0]),
        "hidden_size": int(token.shape[1]),
        "max_position_embeddings": int(positions.shape[0]),
        "intermediate_size": int(fc1.shape[0]),
        "num_hidden_layers": len(_block_indices(state, "text_model.encoder.layers.")),
    }
    if "text_projection.weight" in state:
        inferred["projection_dim"] = int(state["text_projection.weight"].shape[0])
    for key, value in inferred.items():
        if key in config and config[key] != value:
            logger.warning("%s: sidecar says %s=%s but the weights say %s; using the weights", what, key, config[key], value)
        config[key] = value
    hidden = inferred["hidden_size"]
    if "num_attention_heads" not in config:
        if hidden % 64 or hidden < 64:
            raise EngineError(
                "model_error",
                f"{what}: cannot infer attention heads for hidden size {hidden}; add a sidecar "
                f'JSON next to the file with e.g. {{"num_attention_heads": 8}}',
            )
        config["num_attention_heads"] = hidden // 64
    if hidden % int(config["num_attention_heads"]):
        raise EngineError("model_error", f"{what}: {config['num_attention_heads']} heads do not divide hidden size {hidden}")
    config.setdefault("hidden_act", "quick_gelu" if kind == "l" else "gelu")
    config.setdefault("layer_norm_eps", 1e-5)
    return config


def _clip_sidecar(path: Path) -> dict[str, Any] | None:
    own = path.with_suffix(".json")
    candidates = [own, path.parent / "config.json"]
    for candidate in candidates:
        if not fsutil.present(candidate, "CLIP sidecar"):
            continue
        data = _read_json(candidate, "CLIP sidecar")
        if isinstance(data.get("text_config"), dict):
            data = data["text_config"]
        if candidate == own or data.get("model_type") in ("clip_text_model", "clip") or "num_attention_heads" in data:
            return data
    return None


# What transformers' tokenizer loading may open by name in a tokenizer folder.
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "chat_template.jinja", "chat_template.json")


def _has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and (
        (fsutil.present(folder / "vocab.json") and fsutil.present(folder / "merges.txt"))
        or fsutil.present(folder / "tokenizer.json")
    )


def _check_tokenizer_files(folder: Path, what: str) -> None:
    """transformers opens the tokenizer files by name (Python's open, which would block on a
    FIFO): each must be a small regular file inside the roots before it is handed over,
    and nothing else in the folder may be a FIFO or lead out of the roots."""
    fsutil.check_inside(folder, f"{what}: tokenizer folder")
    fsutil.check_folder_files(folder, f"{what}: tokenizer file")
    for name in _TOKENIZER_FILES:
        if fsutil.present(folder / name):
            fsutil.stat_regular(folder / name, f"{what}: tokenizer file", max_bytes=fsutil.SMALL_FILE_CAP,
                                limit_name="the 16 MiB limit for tokenizer files")


def _tokenizer_candidates(path: Path, role: str) -> list[Path]:
    if path.is_dir():
        # diffusers pipelines: text_encoder -> tokenizer, text_encoder_2 -> tokenizer_2.
        suffix = path.name[len("text_encoder"):] if path.name.startswith("text_encoder") else ""
        names = [f"tokenizer{suffix}"] + (["tokenizer_2", "tokenizer"] if role == "g" else ["tokenizer", "tokenizer_2"])
        return [path] + [path.parent / n for n in dict.fromkeys(names)]
    return [path.parent / f"{path.stem}_tokenizer", path.parent / "tokenizer"]


def _load_tokenizer(path: Path, role: str, what: str):
    from transformers import CLIPTokenizer

    candidates = _tokenizer_candidates(path, role)
    for folder in candidates:
        if _has_tokenizer(folder):
            _check_tokenizer_files(folder, what)
            try:
                tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
            except Exception as exc:
                raise EngineError("model_error", f"{what}: cannot load the tokenizer in {folder}: {exc}") from exc
            if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
                raise EngineError("model_error", f"{what}: tokenizer in {folder} has no start/end tokens")
            return tokenizer
    raise EngineError(
        "model_error",
        f"{what}: no CLIP tokenizer (vocab.json + merges.txt) found; looked in "
        + ", ".join(str(c) for c in candidates),
    )


class _ShellPool:
    """Structural copies of a module that share its parameter and buffer tensors.

    ``functional_call`` temporarily replaces attributes of the module it runs on; running
    it on a shell that only one call holds keeps concurrent calls (and the shared module)
    isolated while costing no weight memory.
    """

    def __init__(self, module: nn.Module):
        self._module = module
        self._free: list[nn.Module] = []
        self._lock = threading.Lock()
        self.created = 0

    def acquire(self) -> nn.Module:
        with self._lock:
            if self._free:
                return self._free.pop()
        # deepcopy with every tensor pre-seeded in the memo copies the module tree only.
        memo = {id(t): t for t in itertools.chain(self._module.parameters(), self._module.buffers())}
        shell = copy.deepcopy(self._module, memo)
        with self._lock:
            self.created += 1
        return shell

    def release(self, shell: nn.Module) -> None:
        with self._lock:
            self._free.append(shell)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


def _patch_nbytes(patch: dict[str, dict[str, torch.Tensor]]) -> int:
    """Bytes of one cached LoRA stack's patched weights ({encoder: {param: tensor}})."""
    return sum(t.numel() * t.element_size() for tensors in patch.values() for t in tensors.values())


class _LruCache:
    """A small thread-safe LRU. Values are built outside the lock (building may be slow);
    two threads missing the same key at once both build, and the first result is kept.
    ``nbytes`` is the sum of ``size_of(value)`` over the entries, kept as they come and go."""

    def __init__(self, max_entries: int, size_of: Callable[[Any], int] = lambda value: 0):
        self.max_entries = max(0, int(max_entries))
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._size_of = size_of
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def get_or_build(self, key: Any, build: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
        value = build()
        if self.max_entries == 0:
            return value
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
            self._data[key] = value
            self.nbytes += self._size_of(value)
            while len(self._data) > self.max_entries:
                self.nbytes -= self._size_of(self._data.popitem(last=False)[1])
        return value

    def values(self) -> list[Any]:
        with self._lock:
            return list(self._data.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.nbytes = 0


class _TextEncoder:
    """One CLIP text encoder (+ its tokenizer) with the ComfyUI behaviour of its slot."""

    def __init__(self, key: str, module: nn.Module, tokenizer: Any, *, pad_with_eos: bool, default_layer: int,
                 norm_selected_layer: bool, source: str):
        from transformers import CLIPTextModelWithProjection

        self.key = key
        self.module = module
        self.tokenizer = tokenizer
        self.source = source
        self.projected = isinstance(module, CLIPTextModelWithProjection)
        # transformers 4 nests CLIPTextModel's layers under .text_model, 5 does not.
        self.text = getattr(module, "text_model", module)
        cfg = module.config
        self.num_layers = int(cfg.num_hidden_layers)
        self.hidden_size = int(cfg.hidden_size)
        self.max_length = int(cfg.max_position_embeddings)
        self.vocab_size = int(cfg.vocab_size)
        self.pooled_dim = int(cfg.projection_dim) if self.projected else self.hidden_size
        self.bos_id = int(tokenizer.bos_token_id)
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = self.eos_id if pad_with_eos else 0
        self.default_layer = default_layer
        self.norm_selected_layer = norm_selected_layer
        # canonical HF checkpoint name -> this module's parameter name, Linear weights only.
        self.patchable: dict[str, str] = {}
        for name, sub in module.named_modules():
            if isinstance(sub, nn.Linear):
                live = f"{name}.weight"
                canonical = live if live.startswith(("text_model.", "text_projection.")) else "text_model." + live
                self.patchable[canonical] = live
        self.params = dict(module.named_parameters())
        self.shells = _ShellPool(module)
        self._tokenizer_lock = threading.Lock()

    # -- tokens

    def word_ids(self, words: list[str]) -> list[list[int]]:
        if not words:
            return []
        # Fast tokenizers are not safe to call from several threads at once.
        with self._tokenizer_lock:
            encoded = self.tokenizer(words, add_special_tokens=False)["input_ids"]
        return [list(ids) for ids in encoded]

    def chunk(self, groups: list[list[int]], return_word_ids: bool) -> list[list[tuple]]:
        """Pack token groups (one per word) into chunks of ``max_length``: BOS, content, EOS,
        padding. A word that does not fit moves whole to the next chunk unless it is longer
        than ``MAX_WORD_LENGTH`` tokens, in which case it is split."""

        def tok(token_id: int, word: int) -> tuple:
            return (token_id, 1.0, word) if return_word_ids else (token_id, 1.0)

        chunks: list[list[tuple]] = []
        current = [tok(self.bos_id, 0)]

        def close() -> None:
            current.append(tok(self.eos_id, 0))
            current.extend(tok(self.pad_id, 0) for _ in range(self.max_length - len(current)))
            chunks.append(list(current))

        for word_index, ids in enumerate(groups, start=1):
            splittable = len(ids) >= MAX_WORD_LENGTH
            while ids:
                room = self.max_length - 1 - len(current)
                if len(ids) <= room:
                    current.extend(tok(t, word_index) for t in ids)
                    ids = []
                    continue
                if splittable:
                    current.extend(tok(t, word_index) for t in ids[:room])
                    ids = ids[room:]
                close()
                current[:] = [tok(self.bos_id, 0)]
        close()
        return chunks

    def empty_chunk(self, length: int) -> list[int]:
        ids = [self.bos_id, self.eos_id]
        return (ids + [self.pad_id] * max(0, length - 2))[:length]

    def parse_chunks(self, raw: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate ``[[(id, weight, ...), ...], ...]`` -> ids [k, L] long, weights [k, L] float."""
        if not isinstance(raw, (list, tuple)) or not raw:
            raise EngineError("bad_args", f"tokens[{self.key!r}] must be a non-empty list of chunks")
        ids: list[list[int]] = []
        weights: list[list[float]] = []
        length = None
        for chunk in raw:
            if not isinstance(chunk, (list, tuple)) or not chunk:
                raise EngineError("bad_args", f"tokens[{self.key!r}]: every chunk must be a non-empty list")
            if length is None:
                length = len(chunk)
            elif len(chunk) != length:
                raise EngineError("bad_args", f"tokens[{self.key!r}]: chunks differ in length ({length} vs {len(chunk)})")
            row_ids, row_w = [], []
            for item in chunk:
                if not isinstance(item, (list, tuple)) or len(item) < 2:
                    raise EngineError("bad_args", f"tokens[{self.key!r}]: expected (token_id, weight) items, got {item!r}")
                token_id, weight = item[0], item[1]
                if isinstance(token_id, bool) or not isinstance(token_id, int):
                    raise EngineError(
                        "bad_args",
                        f"tokens[{self.key!r}]: token {type(token_id).__name__} is not an integer id; "
                        f"textual-inversion embeddings are supported by the comfy engine only",
                    )
                if not 0 <= token_id < self.vocab_size:
                    raise EngineError("bad_args", f"tokens[{self.key!r}]: token id {token_id} outside the vocabulary")
                if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                    raise EngineError("bad_args", f"tokens[{self.key!r}]: weight {weight!r} is not a finite number")
                row_ids.append(token_id)
                row_w.append(float(weight))
            ids.append(row_ids)
            weights.append(row_w)
        assert length is not None
        if length > self.max_length:
            raise EngineError("bad_args", f"tokens[{self.key!r}]: chunks of {length} exceed the encoder's {self.max_length} positions")
        return torch.tensor(ids, dtype=torch.long), torch.tensor(weights, dtype=torch.float32)

    # -- layers

    def hidden_index(self, layer: int | None) -> int:
        """CLIPSetLastLayer value -> index into transformers' ``hidden_states`` (0 = embeddings)."""
        if layer is None:
            layer = self.default_layer
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise EngineError("bad_args", f"layer must be an integer, got {layer!r}")
        if -self.num_layers <= layer <= -1:
            return self.num_layers + 1 + layer
        if 0 <= layer < self.num_layers:
            return layer + 1
        raise EngineError(
            "bad_args", f"layer {layer} is out of range for the {self.num_layers}-layer {self.key!r} text encoder "
                        f"(use -1 .. -{self.num_layers})")

    def forward(self, ids: torch.Tensor, hidden_index: int, params: Mapping[str, torch.Tensor] | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the encoder: (selected hidden states [N, L, D], pooled [N, P]), model dtype."""
        use_last = hidden_index == self.num_layers and self.norm_selected_layer
        kwargs: dict[str, Any] = {"input_ids": ids}
        if not use_last:
            kwargs["output_hidden_states"] = True
        if params:
            shell = self.shells.acquire()
            try:
                out = torch.func.functional_call(shell, dict(params), args=(), kwargs=kwargs, strict=False)
            finally:
                self.shells.release(shell)
        else:
            out = self.module(**kwargs)
        if use_last:
            hidden = out.last_hidden_state
        else:
            hidden = out.hidden_states[hidden_index]
            if self.norm_selected_layer:
                # LayerNorm weights are never LoRA targets, so the shared module's is right.
                hidden = self.text.final_layer_norm(hidden)
        pooled = out.text_embeds if self.projected else out.pooler_output
        return hidden, pooled


def _load_text_encoder(path: Path, role: str, *, projected: bool, pad_with_eos: bool, default_layer: int,
                       norm_selected_layer: bool, device: torch.device, dtype: torch.dtype) -> _TextEncoder:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    what = f"CLIP-{role.upper()} {path.name}"
    _check_exists(path, f"CLIP-{role.upper()} text encoder")
    if path.is_dir():
        config_path = path / "config.json"
        if not fsutil.present(config_path, what):
            raise EngineError("model_error", f"{what}: folder has no config.json (expected a transformers CLIP text encoder folder)")
        config_dict = _read_json(config_path, what)
        if isinstance(config_dict.get("text_config"), dict):
            config_dict = config_dict["text_config"]
        state = _normalise_clip_keys(_folder_weights(path, "model", what), what)
    else:
        suffix = path.suffix.lower()
        if suffix in (".ckpt", ".pt", ".pth", ".bin"):
            raise _refuse_pickle(path, "CLIP")
        if suffix != ".safetensors":
            raise EngineError("model_error", f"{what}: unsupported file type {path.suffix!r} (expected .safetensors or a folder)")
        state = _normalise_clip_keys(_load_safetensors(path, what), what)
        config_dict = infer_clip_text_config(state, _clip_sidecar(path), kind=role, what=what)
    if projected and "text_projection.weight" not in state:
        raise EngineError("model_error", f"{what}: CLIP-G needs a text_projection weight (CLIPTextModelWithProjection)")
    tokenizer = _load_tokenizer(path, role, what)
    config = CLIPTextConfig.from_dict({k: v for k, v in config_dict.items() if k != "architectures"})
    # Pool at the first end token, as ComfyUI does, whatever legacy id the config carries.
    config.bos_token_id = int(tokenizer.bos_token_id)
    config.eos_token_id = int(tokenizer.eos_token_id)
    cls = CLIPTextModelWithProjection if projected else CLIPTextModel

    def key_for(name: str) -> str:
        return name if name.startswith(("text_model.", "text_projection.")) else "text_model." + name

    try:
        module = _materialise(cls, config, state, key_for, what)
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError("model_error", f"{what}: cannot build the text encoder: {exc}") from exc
    module.to(device=device, dtype=dtype)
    return _TextEncoder(role, module, tokenizer, pad_with_eos=pad_with_eos, default_layer=default_layer,
                        norm_selected_layer=norm_selected_layer, source=str(path))


class StandaloneClip(ClipModel):
    """SD1 (CLIP-L) or SDXL (CLIP-L + CLIP-G) text encoding with ComfyUI semantics.

    Thread-safe: ``tokenize`` and ``encode`` may run concurrently, with different LoRA stacks;
    the shared weights are never modified. Patched weights per LoRA stack are kept in a
    small LRU (``lora_cache_entries``, keyed by the stack's ``(sha256, strength)`` pairs).
    """

    def __init__(self, clip_type: str, encoders: Mapping[str, _TextEncoder], *, device: torch.device,
                 dtype: torch.dtype, lora_cache_entries: int = DEFAULT_LORA_CACHE_ENTRIES):
        self.clip_type = clip_type
        self._encoders: dict[str, _TextEncoder] | None = dict(encoders)
        self.device = device
        self.dtype = dtype
        self._lora_cache = _LruCache(lora_cache_entries, size_of=_patch_nbytes)
        self._nbytes = module_nbytes(*(e.module for e in encoders.values()))
        self._info = self._build_info()

    # -- LoadedModel

    def nbytes(self) -> int:
        return self._nbytes if self._encoders is not None else 0

    def cache_nbytes(self) -> int:
        """Bytes held by the cached LoRA-patched weight copies (besides ``nbytes``)."""
        return self._lora_cache.nbytes

    def lora_cache_stats(self) -> dict[str, int]:
        return {"entries": len(self._lora_cache), "hits": self._lora_cache.hits, "misses": self._lora_cache.misses}

    def _build_info(self) -> dict[str, Any]:
        encoders = self._require()
        pooled = encoders["g"] if "g" in encoders else encoders["l"]
        return {
            "clip_type": self.clip_type,
            "encoders": list(encoders),
            "cond_dim": sum(e.hidden_size for e in encoders.values()),
            "pooled_dim": pooled.pooled_dim,
            "max_length": min(e.max_length for e in encoders.values()),
            "num_layers": {k: e.num_layers for k, e in encoders.items()},
            "default_layer": next(iter(encoders.values())).default_layer,
            "weight_syntax": False,
        }

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def release(self) -> None:
        encoders, self._encoders = self._encoders, None
        self._lora_cache.clear()
        if encoders:
            for enc in encoders.values():
                enc.shells.clear()

    def _require(self) -> dict[str, _TextEncoder]:
        encoders = self._encoders
        if encoders is None:
            raise EngineError("model_error", f"{self.clip_type} CLIP has been released")
        return encoders

    # -- ClipModel

    def patchable_keys(self) -> list[str]:
        encoders = self._require()
        if self.clip_type == "sd1":
            return list(encoders["l"].patchable)
        return [f"{key}:{name}" for key, enc in encoders.items() for name in enc.patchable]

    def tokenize(self, text: str, **options: Any) -> dict[str, list[list[tuple]]]:
        """Text -> ``{encoder_key: [chunk, ...]}``, chunks of 77 ``(id, 1.0)`` tuples.

        ``return_word_ids=True`` gives ``(id, 1.0, word_index)`` (0 for BOS/EOS/padding), as
        ComfyUI does. Other ComfyUI tokenizer options are accepted and ignored; the weighting
        syntax is not parsed (see the module docstring).
        """
        encoders = self._require()
        if not isinstance(text, str):
            raise EngineError("bad_args", f"tokenize expects a string, got {type(text).__name__}")
        return_word_ids = bool(options.pop("return_word_ids", False))
        if options:
            logger.debug("tokenize: ignoring options %s", sorted(options))
        words = text.split(" ")
        return {key: enc.chunk(enc.word_ids(words), return_word_ids) for key, enc in encoders.items()}

    def encode(self, tokens: dict[str, list[list[tuple]]], layer: int | None = None,
               loras: Sequence[LoraSpec] = ()) -> dict[str, Any]:
        """Tokens -> ``{"cond": float32 [1, 77*k, D], "pooled_output": float32 [1, P]}`` (CPU).

        SDXL: ``cond`` is CLIP-L's and CLIP-G's hidden states concatenated on the last
        dimension (cut to the shorter token count), ``pooled_output`` is CLIP-G's.
        """
        encoders = self._require()
        if not isinstance(tokens, Mapping):
            raise EngineError("bad_args", "tokens must be a dict {encoder_key: [chunk, ...]}")
        for key in encoders:
            if key not in tokens:
                raise EngineError("bad_args", f"tokens lack the {key!r} encoder's chunks (got {sorted(tokens)})")
        with torch.inference_mode():
            patched = self._patched_params(encoders, loras)
            outputs = {
                key: self._encode_one(enc, tokens[key], layer, patched.get(key)) for key, enc in encoders.items()
            }
        if self.clip_type == "sd1":
            cond, pooled = outputs["l"]
        else:
            cond_l, _ = outputs["l"]
            cond_g, pooled = outputs["g"]
            cut = min(cond_l.shape[1], cond_g.shape[1])
            cond = torch.cat([cond_l[:, :cut], cond_g[:, :cut]], dim=-1)
        return {"cond": cond.contiguous(), "pooled_output": pooled.contiguous()}

    def _encode_one(self, enc: _TextEncoder, raw_chunks: Any, layer: int | None,
                    params: Mapping[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        ids, weights = enc.parse_chunks(raw_chunks)
        hidden_index = enc.hidden_index(layer)
        sections, length = ids.shape
        weighted = bool((weights != 1.0).any())
        if weighted:
            empty = torch.tensor([enc.empty_chunk(length)], dtype=torch.long)
            ids = torch.cat([ids, empty], dim=0)
        try:
            hidden, pooled = enc.forward(ids.to(enc.module.device), hidden_index, params)
        except Exception as exc:
            if is_oom(exc):
                raise EngineError("oom", f"text encoder {enc.key!r} ran out of memory: {exc}") from exc
            raise
        hidden = hidden.float().cpu()
        z = hidden[:sections]
        if weighted:
            z_empty = hidden[sections:sections + 1]
            w = weights[:, :, None]
            # Positions at weight 1 keep their exact encoding, as in ComfyUI.
            z = torch.where(w != 1.0, z_empty + (z - z_empty) * w, z)
        cond = z.reshape(1, sections * length, z.shape[-1])
        return cond, pooled[0:1].float().cpu()

    # -- LoRA

    def _resolve_target(self, encoders: Mapping[str, _TextEncoder], target: str) -> tuple[str, str] | None:
        if self.clip_type == "sd1":
            name = target.removeprefix("l:")
            live = encoders["l"].patchable.get(name)
            return ("l", live) if live else None
        key, sep, name = target.partition(":")
        if not sep or key not in encoders:
            return None
        live = encoders[key].patchable.get(name)
        return (key, live) if live else None

    def _patched_params(self, encoders: Mapping[str, _TextEncoder], loras: Sequence[LoraSpec]
                        ) -> dict[str, dict[str, torch.Tensor]]:
        active = [spec for spec in loras if float(spec.strength) != 0.0 and spec.weights]
        if not active:
            return {}
        cache_key = tuple((str(spec.sha256), float(spec.strength)) for spec in active)
        return self._lora_cache.get_or_build(cache_key, lambda: self._build_patch(encoders, active))

    def _build_patch(self, encoders: Mapping[str, _TextEncoder], specs: Sequence[LoraSpec]
                     ) -> dict[str, dict[str, torch.Tensor]]:
        """Sum every spec's ``strength * (alpha / rank) * (up @ down)`` onto the base weights (float32
        maths, cast back to the weight dtype, as ComfyUI does) into new tensors."""
        sums: dict[tuple[str, str], torch.Tensor] = {}
        for spec in specs:
            unknown: list[str] = []
            strength = float(spec.strength)
            for target, triple in spec.weights.items():
                resolved = self._resolve_target(encoders, target)
                if resolved is None:
                    unknown.append(target)
                    continue
                try:
                    up, down, alpha = triple
                except (TypeError, ValueError):
                    raise EngineError("bad_args", f"LoRA {spec.sha256[:12]} {target}: expected (up, down, alpha)") from None
                scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
                base = encoders[resolved[0]].params[resolved[1]]
                up2 = up.reshape(up.shape[0], -1).to(device=base.device, dtype=torch.float32)
                down2 = down.reshape(down.shape[0], -1).to(device=base.device, dtype=torch.float32)
                if up2.shape[1] != down2.shape[0] or (up2.shape[0], down2.shape[1]) != tuple(base.shape):
                    raise EngineError(
                        "bad_args",
                        f"LoRA {spec.sha256[:12]} {target}: up {tuple(up.shape)} @ down {tuple(down.shape)} does not "
                        f"match the weight's shape {tuple(base.shape)}",
                    )
                delta = (up2 @ down2) * (float(scale) * strength)
                current = sums.get(resolved)
                sums[resolved] = (base.float() if current is None else current) + delta
            if unknown:
                logger.warning("LoRA %s: %d of %d keys match no text-encoder weight and are ignored, e.g. %s",
                               spec.sha256[:12], len(unknown), len(spec.weights), unknown[:3])
        patched: dict[str, dict[str, torch.Tensor]] = {}
        for (key, live), tensor in sums.items():
            base = encoders[key].params[live]
            patched.setdefault(key, {})[live] = tensor.to(base.dtype)
        return patched


# ------------------------------------------------------------------------------- engine


class StandaloneEngine(Engine):
    """Loads diffusers/transformers models; needs neither ComfyUI nor network access."""

    name = "standalone"

    def __init__(self, *, lora_cache_entries: int = DEFAULT_LORA_CACHE_ENTRIES):
        self.lora_cache_entries = lora_cache_entries

    @fsutil.errors_as(EngineError)
    def load_vae(self, paths: Sequence[str], device: torch.device, dtype: torch.dtype | None) -> StandaloneVae:
        """``paths`` = [diffusers AutoencoderKL folder | diffusers-layout ``.safetensors``]."""
        path = _single_path(paths, "load_vae")
        _check_exists(path, "VAE")
        device = as_device(device)
        dtype = dtype or _default_dtype(device, "vae")
        try:
            module, layout = _load_autoencoder(path)
        except LunaError:  # typed already (EngineError, or a file error from fsutil)
            raise
        except Exception as exc:
            raise EngineError("model_error", f"VAE {path.name}: cannot build the model: {exc}") from exc
        # nn.Module.to, not diffusers' override: that one warns about an (empty) list of
        # fp32-only modules on every dtype cast; AutoencoderKL has none.
        nn.Module.to(module, device=device, dtype=dtype)
        vae = StandaloneVae(module, device=device, dtype=dtype, source=str(path))
        logger.info("standalone VAE loaded from %s (%s, %d latent channels, %.1f MB, %s on %s)", path, layout,
                    vae.latent_channels, vae.nbytes() / 1e6, dtype, device)
        return vae

    @fsutil.errors_as(EngineError)
    def load_clip(self, paths: Sequence[str], clip_type: str, device: torch.device,
                  dtype: torch.dtype | None) -> StandaloneClip:
        """``sd1``: [CLIP-L]; ``sdxl``: [CLIP-L, CLIP-G]. Each path is a transformers folder
        or a ``.safetensors`` file (see the module docstring for tokenizer lookup)."""
        normalised = _CLIP_TYPE_ALIASES.get(str(clip_type).lower())
        if normalised is None:
            raise EngineError(
                "bad_args",
                f"clip_type {clip_type!r} is supported by the comfy engine only (standalone supports "
                f"{', '.join(SUPPORTED_CLIP_TYPES)})",
            )
        if isinstance(paths, (str, Path)):
            paths = [str(paths)]
        paths = [Path(p) for p in paths]
        wanted = 1 if normalised == "sd1" else 2
        if len(paths) != wanted:
            raise EngineError("bad_args", f"clip_type {normalised} takes {wanted} path(s), got {len(paths)}")
        device = as_device(device)
        dtype = dtype or _default_dtype(device, "clip")
        encoders: dict[str, _TextEncoder] = {}
        if normalised == "sd1":
            encoders["l"] = _load_text_encoder(paths[0], "l", projected=False, pad_with_eos=True, default_layer=-1,
                                               norm_selected_layer=True, device=device, dtype=dtype)
        else:
            # ComfyUI's SDXL encoders default to the penultimate layer without final norm.
            encoders["l"] = _load_text_encoder(paths[0], "l", projected=False, pad_with_eos=True, default_layer=-2,
                                               norm_selected_layer=False, device=device, dtype=dtype)
            encoders["g"] = _load_text_encoder(paths[1], "g", projected=True, pad_with_eos=False, default_layer=-2,
                                               norm_selected_layer=False, device=device, dtype=dtype)
        clip = StandaloneClip(normalised, encoders, device=device, dtype=dtype,
                              lora_cache_entries=self.lora_cache_entries)
        logger.info("standalone %s CLIP loaded from %s (%.1f MB, %s on %s)", normalised,
                    ", ".join(str(p) for p in paths), clip.nbytes() / 1e6, dtype, device)
        return clip
