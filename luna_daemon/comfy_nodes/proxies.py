"""Proxy VAE and CLIP objects: ComfyUI's stock nodes use them unchanged, the daemon computes.

ComfyUI checks node links by type name only ("VAE", "CLIP"), so any object with the methods
the stock nodes call flows through a workflow. :class:`DaemonVAE` and :class:`DaemonCLIP`
provide that surface (``/work/shared/notes/comfyui-api.md`` sections a, c, d) and send each
call to the Luna Daemon, which runs ComfyUI's own ``comfy`` code on the shared weights:

* VAE: ``encode`` / ``decode`` / ``encode_tiled`` / ``decode_tiled`` (ComfyUI's keyword
  names), the compression helpers and the static attributes (ratios, channels, index
  formulas) taken from the daemon at load time. Pixels go to the daemon untouched (its VAE
  crops); results are float32 on this ComfyUI's ``intermediate_device()``.
* CLIP: ``tokenize`` is a daemon round trip returning the real nested structure (tuples,
  embedding tensors); ``encode_from_tokens`` / ``encode_from_tokens_scheduled`` return
  ComfyUI's shapes; ``clone`` / ``clip_layer`` / ``set_tokenizer_option`` keep per-object
  state; ``cond_stage_model.state_dict()`` has the real key names (meta tensors, no memory)
  so ComfyUI's LoRA key mapping works; ``add_patches`` serialises the LoRA patches into a
  content-addressed blob the daemon caches, and records it **on this object** (the clone
  LoraLoader made), returning the accepted keys.

Anything the daemon cannot do raises :class:`DaemonUnsupported` (or, for attributes,
``AttributeError``) with a message that says so -- nothing returns approximate data.
Tensors received from stock nodes may be inference tensors; they are never modified.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import sys
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from luna_daemon.client import DaemonError
from luna_daemon.models.engines.base import DEFAULT_DECODE_TILE, DEFAULT_ENCODE_TILE, TiledArgs

log = logging.getLogger("luna_daemon.comfy")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "float8_e4m3fn": None,
           "float8_e5m2": None, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool}
_BLOB_FORMAT = "luna-comfy-patches/1"


class DaemonUnsupported(RuntimeError):
    """A ComfyUI call the Luna Daemon cannot serve (the weights live in the daemon)."""


def intermediate_device() -> torch.device:
    """This ComfyUI's ``comfy.model_management.intermediate_device()`` (CPU without comfy).

    Only an already-imported ``comfy.model_management`` is used: importing it here could pick
    a device (or fail) in a process that is not ComfyUI."""
    mm = sys.modules.get("comfy.model_management")
    fn = getattr(mm, "intermediate_device", None)
    if callable(fn):
        try:
            return torch.device(fn())
        except Exception:
            log.debug("comfy intermediate_device() failed; using the CPU", exc_info=True)
    return torch.device("cpu")


def interrupt_check() -> Callable[[], None] | None:
    """ComfyUI's cancel, for a proxy waiting on the daemon: ``throw_exception_if_processing_
    interrupted`` (raises ``InterruptProcessingException`` and clears the flag, as a sampler
    would). ComfyUI's cancel only sets a flag in this process; without this a cancelled
    prompt would wait for the daemon's answer. None outside ComfyUI."""
    mm = sys.modules.get("comfy.model_management")
    fn = getattr(mm, "throw_exception_if_processing_interrupted", None)
    return fn if callable(fn) else None


def _to_client(value: Any) -> Any:
    """Floating tensors -> float32 on the intermediate device; containers recursively."""
    if isinstance(value, torch.Tensor):
        dev = intermediate_device()
        if value.is_floating_point():
            return value.to(device=dev, dtype=torch.float32)
        return value.to(device=dev)
    if isinstance(value, dict):
        return {k: _to_client(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_client(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_client(v) for v in value)
    return value


def _name_of(path: str) -> str:
    return Path(path).name if path else "?"


# ----------------------------------------------------------------------------- the handle


class _Remote:
    """What a proxy and all its clones share: the connection, the daemon's model id, the
    load answer (``info``), and how to register the model again after a daemon restart."""

    def __init__(self, conn: Any, kind: str, answer: dict, what: str,
                 reload: Callable[[], dict] | None = None):
        self.conn = conn
        self.kind = kind
        self.what = what
        self._reload = reload
        self._lock = threading.Lock()
        self._apply(answer)
        self._meta: _TextEncoderKeys | None = None

    def _apply(self, answer: dict) -> None:
        self.model_id = answer["model"]
        self.info = dict(answer.get("info") or {})
        self.daemon_device = answer.get("device")
        self.daemon_dtype = answer.get("dtype")

    @property
    def engine(self) -> str | None:
        return self.info.get("engine")

    def call(self, op: str, make_args: Callable[[str], dict], *, loras: list[_StackEntry] | None = None) -> Any:
        """Run ``op`` on this model. After a daemon restart (model or LoRA unknown, or the
        connection lost and back) the model is registered again and the call retried once."""
        for attempt in (0, 1):
            model_id = self.model_id
            try:
                return self.conn.call(op, make_args(model_id), check=interrupt_check())
            except DaemonError as exc:
                if attempt or exc.code != "not_found":
                    raise self._explain(exc) from None
                self._recover(model_id, loras, lora_only=bool(loras) and "LoRA" in exc.message)
        raise AssertionError("unreachable")

    def _recover(self, failed_id: str, loras: list[_StackEntry] | None, *, lora_only: bool = False) -> None:
        with self._lock:
            if self.model_id == failed_id and not lora_only:
                if self._reload is None:
                    raise DaemonError("not_found", f"{self.what} is no longer loaded in the Luna Daemon and cannot be "
                                                   "registered again from here; re-run its loader node")
                log.info("Luna Daemon lost %s (restarted or unloaded); registering it again", self.what)
                _send_roots(self.conn, force=True)  # a restarted daemon forgot this ComfyUI's folders too
                self._apply(self._reload())
        for entry in loras or ():
            ensure_lora(self.conn, entry.sha256, entry.blob)

    def _explain(self, exc: DaemonError) -> DaemonError:
        if exc.code == "busy":
            return DaemonError(exc.code, f"{exc.message} (the Luna Daemon is serving other ComfyUI instances; "
                                         "queue_size / max_connections in its config set the limits)")
        return exc

    # -- CLIP keys

    def text_encoder_keys(self) -> _TextEncoderKeys:
        with self._lock:
            if self._meta is None:
                entries = self.info.get("state_dict")
                if not entries:
                    raise DaemonUnsupported(
                        f"the Luna Daemon did not send the text encoder's state-dict keys for {self.what} (its engine is "
                        f"{self.engine or 'unknown'}); ComfyUI's LoRA loading needs the daemon to run engine = comfy")
                self._meta = _TextEncoderKeys(entries, self.what)
            return self._meta


def ensure_lora(conn: Any, sha256: str, blob: bytes) -> None:
    """Make the daemon hold ``blob`` (uploaded only when ``lora_has`` says it lacks it)."""
    if not conn.call("lora_has", {"sha256": sha256})["present"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # frombuffer over read-only bytes: never written
            data = torch.frombuffer(blob, dtype=torch.uint8)
        conn.call("lora_put", {"data": data, "sha256": sha256, "name": f"comfy-patches-{sha256[:12]}"})


class _TextEncoderKeys:
    """``cond_stage_model`` stand-in: ``state_dict()`` has the daemon model's real key names,
    shapes and dtypes as meta tensors (no memory). ComfyUI's LoRA key mapping only reads the
    keys; everything else says the text encoder lives in the daemon."""

    def __init__(self, entries: list, what: str):
        self._what = what
        self._shapes: OrderedDict[str, tuple[tuple[int, ...], torch.dtype]] = OrderedDict()
        for key, shape, dtype in entries:
            self._shapes[str(key)] = (tuple(int(d) for d in shape), _DTYPES.get(str(dtype)) or torch.float32)
        self._meta = OrderedDict((k, torch.empty(s, dtype=dt, device="meta")) for k, (s, dt) in self._shapes.items())

    def state_dict(self, *args: Any, **kwargs: Any) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict(self._meta)

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...] | None:
        item = self._shapes.get(key)
        return None if item is None else item[0]

    def __contains__(self, key: object) -> bool:
        return key in self._shapes

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"cond_stage_model.{name}: the text encoder of {self._what} lives in the Luna Daemon; "
                             "only state_dict() (key names, meta tensors) is available in ComfyUI")


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


# ------------------------------------------------------------------------------------ CLIP


@dataclass(frozen=True)
class _StackEntry:
    """One ``add_patches`` call: the daemon-side LoRA id, its strength and the blob (kept so
    a restarted daemon can be sent it again)."""

    sha256: str
    strength: float
    blob: bytes = b""

    def wire(self) -> dict:
        return {"lora": self.sha256, "strength": self.strength}


def _chunk_lists(tokens: Any) -> Any:
    """The daemon wants ``{encoder: [chunk, ...]}`` with list containers; items keep their
    tuples (and tensors)."""
    if not isinstance(tokens, dict):
        raise TypeError(f"tokens must be the dict tokenize() returned, got {type(tokens).__name__}")
    return {k: [list(c) if isinstance(c, (list, tuple)) else c for c in v] if isinstance(v, (list, tuple)) else v
            for k, v in tokens.items()}


_FROM_DAEMON = object()  # DaemonCLIP(layer_idx=...) default: the daemon model's own layer_idx
_HOOKS_MESSAGE = ("CLIP hooks (scheduled conditioning, hook keyframes) are not supported by the Luna Daemon; load the "
                  "text encoder with ComfyUI's own loader for hook workflows")


class DaemonCLIP:
    """A ComfyUI ``CLIP`` whose text encoder lives in the Luna Daemon.

    Per-object state (like ComfyUI's): ``layer_idx``, ``tokenizer_options`` and the LoRA
    stack. Clones share the daemon model and copy that state."""

    is_luna_proxy = True

    def __init__(self, remote: _Remote, *, layer_idx: Any = _FROM_DAEMON, tokenizer_options: dict | None = None,
                 loras: list[_StackEntry] | None = None):
        self._remote = remote
        self.layer_idx = remote.info.get("layer_idx") if layer_idx is _FROM_DAEMON else layer_idx
        self.tokenizer_options = dict(tokenizer_options or {})
        self._loras: list[_StackEntry] = list(loras or [])

    # -- identity

    @property
    def model_id(self) -> str:
        return self._remote.model_id

    @property
    def loras(self) -> list[dict]:
        """The LoRA stack this object applies: ``[{lora: sha256, strength}, ...]``."""
        return [e.wire() for e in self._loras]

    def __repr__(self) -> str:
        return (f"<DaemonCLIP {self._remote.what} id={self.model_id} layer={self.layer_idx} "
                f"loras={len(self._loras)}>")

    def __getattr__(self, name: str) -> Any:
        # Only called for names the proxy does not have (a property raising AttributeError
        # also lands here, so the messages for known internals live here too).
        if name.startswith("__") or name in ("_remote", "_loras"):
            raise AttributeError(name)
        if name == "patcher":
            raise AttributeError("CLIP.patcher: the Luna Daemon holds the text encoder, so there is no ModelPatcher in "
                                 "ComfyUI; hooks, CLIPAttentionMultiply, CLIPSave and CLIP merges need ComfyUI's own "
                                 "CLIP loader")
        raise AttributeError(f"'{name}' is not available on a Luna Daemon CLIP: the text encoder ({self._remote.what}) "
                             "runs in the Luna Daemon, so ComfyUI internals such as tokenizer or patcher do not exist "
                             "here; use ComfyUI's CLIPLoader for nodes that need them")

    # -- state ComfyUI nodes set

    @property
    def cond_stage_model(self) -> _TextEncoderKeys:
        return self._remote.text_encoder_keys()

    @property
    def use_clip_schedule(self) -> bool:
        return False

    @use_clip_schedule.setter
    def use_clip_schedule(self, value: bool) -> None:
        if value:
            raise DaemonUnsupported(_HOOKS_MESSAGE)

    @property
    def apply_hooks_to_conds(self) -> Any:
        return None

    @apply_hooks_to_conds.setter
    def apply_hooks_to_conds(self, value: Any) -> None:
        if value:
            raise DaemonUnsupported(_HOOKS_MESSAGE)

    def clone(self) -> DaemonCLIP:
        return DaemonCLIP(self._remote, layer_idx=self.layer_idx, tokenizer_options=self.tokenizer_options,
                          loras=self._loras)

    def clip_layer(self, layer_idx: int) -> None:
        self.layer_idx = layer_idx

    def set_tokenizer_option(self, option_name: str, value: Any) -> None:
        self.tokenizer_options[option_name] = value

    def add_hooks_to_dict(self, pooled_dict: dict) -> dict:
        return pooled_dict

    # -- tokenize / encode

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs: Any) -> dict:
        options = dict(kwargs)
        tokenizer_options = dict(options.get("tokenizer_options") or {})
        if self.tokenizer_options:
            tokenizer_options = {**self.tokenizer_options, **tokenizer_options}
        if tokenizer_options:
            options["tokenizer_options"] = tokenizer_options
        if return_word_ids:
            options["return_word_ids"] = True
        conn = self._remote.conn
        _send_roots(conn)
        # ``embedding:`` names resolve in this ComfyUI's embedding folders, as natively.
        dirs = getattr(conn, "embedding_directories", lambda: None)()

        def args(mid: str) -> dict:
            a = {"model": mid, "text": text, "options": options}
            if dirs is not None:
                a["embedding_directories"] = dirs
            return a

        out = self._remote.call("clip_tokenize", args)
        return out["tokens"]

    def encode_from_tokens(self, tokens: dict, return_pooled: Any = False, return_dict: bool = False) -> Any:
        wire = _chunk_lists(tokens)
        stack = list(self._loras)
        layer = self.layer_idx

        def args(mid: str) -> dict:
            a: dict[str, Any] = {"model": mid, "tokens": wire}
            if layer is not None:
                a["layer"] = int(layer)
            if stack:
                a["loras"] = [e.wire() for e in stack]
            if return_pooled == "unprojected":
                a["unprojected"] = True
            return a

        out = self._remote.call("clip_encode", args, loras=stack)
        cond = _to_client(out["cond"])
        pooled = _to_client(out.get("pooled_output"))
        if return_dict:
            result = {"cond": cond, "pooled_output": pooled}
            result.update(_to_client(out.get("extras") or {}))
            return result
        if return_pooled:
            return cond, pooled
        return cond

    def encode_from_tokens_scheduled(self, tokens: dict, unprojected: bool = False, add_dict: dict | None = None,
                                     show_pbar: bool = True) -> list:
        out = self.encode_from_tokens(tokens, return_pooled="unprojected" if unprojected else True, return_dict=True)
        cond = out.pop("cond")
        out.update(add_dict or {})
        return [[cond, out]]

    def encode(self, text: str) -> Any:
        return self.encode_from_tokens(self.tokenize(text))

    # -- LoRA

    def add_patches(self, patches: dict, strength_patch: float = 1.0, strength_model: float = 1.0) -> list:
        """Take the patches for this text encoder's weights, as ComfyUI's ``CLIP.add_patches``
        does: keys not in ``cond_stage_model`` are left for others (the UNet); the rest are
        sent to the daemon as one content-addressed LoRA and recorded on this object."""
        keys = self._remote.text_encoder_keys()
        accepted: list = []
        tensors: dict[str, torch.Tensor] = {}
        for k, patch in patches.items():
            key = k if isinstance(k, str) else (k[0] if isinstance(k, tuple) and k else None)
            if not isinstance(key, str) or key not in keys:
                continue
            if not isinstance(k, str):
                raise DaemonUnsupported(f"patch for {key} with an offset / function {k[1:]!r} cannot be applied by the "
                                        "Luna Daemon")
            tensors.update(_serialise_patch(key, patch, keys.shape(key)))
            accepted.append(k)
        if not accepted:
            return []
        if float(strength_model) != 1.0:
            raise DaemonUnsupported(f"add_patches with strength_model={strength_model} (the base weights scaled) is not "
                                    "supported by the Luna Daemon; only strength_patch (the LoRA strength) is")
        strength = float(strength_patch)
        if strength == 0.0:
            return accepted  # W + 0 * delta == W: nothing to send
        blob = _blob(tensors)
        sha = hashlib.sha256(blob).hexdigest()
        ensure_lora(self._remote.conn, sha, blob)
        self._loras.append(_StackEntry(sha, strength, blob))
        return accepted

    def get_key_patches(self, *args: Any, **kwargs: Any) -> dict:
        raise DaemonUnsupported("get_key_patches: the Luna Daemon CLIP has no local weights (CLIP merge nodes need "
                                "ComfyUI's own loader)")

    def load_model(self, *args: Any, **kwargs: Any) -> Any:
        raise DaemonUnsupported("load_model: the text encoder runs in the Luna Daemon, there is no model to load into "
                                "this ComfyUI (CLIPSave / CheckpointSave need ComfyUI's own loader)")

    def get_sd(self) -> dict:
        raise DaemonUnsupported("get_sd: the text-encoder weights live in the Luna Daemon and are not sent back "
                                "(CLIPSave / CheckpointSave need ComfyUI's own loader)")

    def load_sd(self, *args: Any, **kwargs: Any) -> Any:
        raise DaemonUnsupported("load_sd: the text encoder of a Luna Daemon CLIP cannot be changed from ComfyUI")


def _is_lora_adapter(patch: Any) -> bool:
    wa = sys.modules.get("comfy.weight_adapter")
    cls = getattr(wa, "LoRAAdapter", None)
    if isinstance(cls, type) and isinstance(patch, cls):
        return True
    return type(patch).__name__ == "LoRAAdapter" and isinstance(getattr(patch, "weights", None), (tuple, list))


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def _serialise_patch(key: str, patch: Any, shape: tuple[int, ...] | None) -> dict[str, torch.Tensor]:
    """One ComfyUI patch -> tensors in ComfyUI's generic LoRA naming
    (``text_encoders.<key stem>.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha``)."""
    if not key.endswith(".weight"):
        raise DaemonUnsupported(f"patch for {key}: the Luna Daemon applies LoRA patches to .weight tensors only")
    stem = "text_encoders." + key[: -len(".weight")]
    shape = tuple(shape or ())
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    if _is_lora_adapter(patch):
        weights = list(patch.weights) + [None] * 6
        up, down, alpha, mid, dora_scale, reshape = weights[:6]
        for name, value in (("mid (LoCon)", mid), ("dora_scale (DoRA)", dora_scale), ("reshape", reshape)):
            if value is not None:
                raise DaemonUnsupported(f"LoRA patch for {key} has {name} weights, which the Luna Daemon does not "
                                        "support; only plain LoRA up/down (+ alpha) and diff patches are")
        if not isinstance(up, torch.Tensor) or not isinstance(down, torch.Tensor) or up.ndim < 2 or down.ndim < 2:
            raise DaemonUnsupported(f"LoRA patch for {key}: up/down are not matrices")
        rank = down.shape[0]
        if (shape and (up.shape[0] != shape[0] or up.reshape(up.shape[0], -1).shape[1] != rank
                       or down.reshape(rank, -1).shape[1] != fan_in)):
            raise ValueError(f"LoRA patch for {key}: up {tuple(up.shape)} @ down {tuple(down.shape)} does not match the "
                             f"weight's shape {shape}")
        out = {f"{stem}.lora_up.weight": _cpu(up), f"{stem}.lora_down.weight": _cpu(down)}
        if alpha is not None:
            out[f"{stem}.alpha"] = torch.tensor(float(alpha), dtype=torch.float64)
        return out
    if isinstance(patch, tuple) and patch:
        if isinstance(patch[0], str):
            kind, args = patch[0], patch[1] if len(patch) > 1 else ()
        else:
            kind, args = "diff", patch
        if kind != "diff":
            raise DaemonUnsupported(f"'{kind}' patch for {key} is not supported by the Luna Daemon (LoRA and diff "
                                    "patches are)")
        diff = args[0] if isinstance(args, (tuple, list)) and args else None
        extra = args[1] if isinstance(args, (tuple, list)) and len(args) > 1 else None
        if extra and not (isinstance(extra, dict) and not any(extra.values())):  # e.g. {"pad_weight": True}
            raise DaemonUnsupported(f"diff patch for {key} with options {extra!r} is not supported by the Luna Daemon")
        if not isinstance(diff, torch.Tensor):
            raise DaemonUnsupported(f"diff patch for {key} does not hold a tensor")
        if shape and tuple(diff.shape) != shape:
            raise ValueError(f"diff patch for {key} has shape {tuple(diff.shape)}, the weight has {shape}")
        # An exact LoRA form of a diff: up = diff as [out, fan_in], down = identity, no alpha
        # (the daemon computes strength * 1.0 * (up @ I) == strength * diff).
        up = _cpu(diff).reshape(diff.shape[0] if diff.ndim else 1, -1)
        down = torch.eye(up.shape[1], dtype=up.dtype)
        return {f"{stem}.lora_up.weight": up, f"{stem}.lora_down.weight": down}
    if isinstance(patch, list):
        raise DaemonUnsupported(f"merged (nested) patch for {key} is not supported by the Luna Daemon")
    name = getattr(patch, "name", None) or type(patch).__name__
    raise DaemonUnsupported(f"{name} patch for {key} is not supported by the Luna Daemon (LoHa, LoKr, GLoRA, OFT, "
                            "BOFT and 'set' patches need ComfyUI's own CLIP loader); plain LoRA and diff patches are")


def _blob(tensors: dict[str, torch.Tensor]) -> bytes:
    """Deterministic safetensors bytes (same patches -> same bytes -> same SHA-256)."""
    from safetensors.torch import save

    # One metadata entry only: safetensors writes a metadata map in hash order, which differs
    # between runs when it has several keys (and so would the SHA-256).
    return save(dict(sorted(tensors.items())), metadata={"luna": _BLOB_FORMAT})


# ----------------------------------------------------------------------------- factories


def _device_dtype_args(device: str | None, dtype: str | None) -> dict:
    out = {}
    if device and device != "default":
        out["device"] = device
    if dtype and dtype != "default":
        out["dtype"] = dtype
    return out


def _daemon_roots(conn: Any, message: str) -> list[Path]:
    """The model roots the daemon reads, from its ``forbidden_path`` message ("... outside
    the configured model_roots (a, b)"); else what this side's settings (the same config
    file) resolve to."""
    found = re.search(r"model_roots \((.*)\)\s*$", message)
    if found:
        return [Path(os.path.realpath(p)) for p in found.group(1).split(", ") if p]
    resolve = getattr(conn.settings, "resolved_model_roots", None)
    return [Path(os.path.realpath(p)) for p in resolve()] if callable(resolve) else []


def _forbidden_hint(conn: Any, exc: DaemonError, path: str) -> DaemonError:
    """A ``forbidden_path`` error plus what to change: ``comfyui_root`` only when the daemon
    does not already read this ComfyUI's ``models`` folder, else ``model_roots``."""
    if exc.code != "forbidden_path":
        return exc
    base = getattr(sys.modules.get("folder_paths"), "base_path", None)
    folder = Path(path).parent
    config = getattr(conn.settings, "config_file", "") or "the Luna Daemon config.toml"
    if base and Path(os.path.realpath(base)) / "models" not in _daemon_roots(conn, exc.message):
        advice = f'set comfyui_root = "{base}" (this ComfyUI\'s folder) or add "{folder}" to model_roots'
    elif base:
        advice = f'add "{folder}" to model_roots (the daemon already reads this ComfyUI\'s models folder)'
    else:
        advice = f'add "{folder}" to model_roots (or set comfyui_root to this ComfyUI\'s folder)'
    return DaemonError(exc.code, f"{exc.message}. The Luna Daemon only reads model files under its model_roots: "
                                 f"{advice} in {config}, then restart the daemon")


def _send_roots(conn: Any, *, force: bool = False) -> None:
    """This ComfyUI's model folders to the daemon (:meth:`Connection.ensure_roots`)."""
    ensure = getattr(conn, "ensure_roots", None)
    if ensure is not None:
        ensure(force=force)


def _load_in_roots(conn: Any, op: str, args: dict, path: str) -> dict:
    """``op`` after this ComfyUI's folders were registered; on ``forbidden_path`` they are
    sent again once (a restarted daemon forgot them) before the error is explained."""
    _send_roots(conn)
    for attempt in (0, 1):
        try:
            return conn.call(op, args, check=interrupt_check())
        except DaemonError as exc:
            if attempt or exc.code != "forbidden_path" or getattr(conn, "ensure_roots", None) is None:
                raise _forbidden_hint(conn, exc, path) from None
            _send_roots(conn, force=True)
    raise AssertionError("unreachable")


def load_vae(conn: Any, path: str, *, device: str | None = None, dtype: str | None = None) -> DaemonVAE:
    """Ask the daemon to load the VAE file at ``path``; return its proxy."""
    args = {"path": str(path), **_device_dtype_args(device, dtype)}

    def load() -> dict:
        return _load_in_roots(conn, "vae_load", args, path)

    return DaemonVAE(_Remote(conn, "vae", load(), f"VAE {_name_of(path)}", reload=load))


def load_clip(conn: Any, paths: list[str], clip_type: str = "sd1", *, device: str | None = None,
              dtype: str | None = None) -> DaemonCLIP:
    """Ask the daemon to load the text-encoder file(s); return the CLIP proxy."""
    args = {"paths": [str(p) for p in paths], "clip_type": clip_type, **_device_dtype_args(device, dtype)}

    def load() -> dict:
        return _load_in_roots(conn, "clip_load", args, paths[0])

    answer = load()
    remote = _Remote(conn, "clip", answer, f"CLIP {', '.join(_name_of(p) for p in paths)}", reload=load)
    if remote.engine not in (None, "comfy"):
        log.warning("the Luna Daemon runs the %s engine: text encodings and LoRA keys follow that engine, not "
                    "ComfyUI's code (set engine = comfy and comfyui_root for exact parity)", remote.engine)
    return DaemonCLIP(remote)


# Checkpoint Tunnel: proxies for a checkpoint's own VAE / CLIP, registered by content.

_TUNNEL_CACHE: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_TUNNEL_LOCK = threading.Lock()


def _state_blob(sd: dict[str, torch.Tensor]) -> tuple[bytes, str]:
    """Deterministic safetensors bytes of a state dict and their SHA-256."""
    from safetensors.torch import save

    seen: set[int] = set()
    clean: dict[str, torch.Tensor] = {}
    for key in sorted(sd):
        t = sd[key]
        if not isinstance(t, torch.Tensor):
            continue  # tokenizer data (e.g. a SentencePiece model as bytes) is not a weight
        t = t.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen or not t.is_contiguous():
            t = t.contiguous().clone()  # shared / strided tensors: safetensors wants owned blocks
        elif ptr is not None:
            seen.add(ptr)
        clean[key] = t
    blob = save(clean)
    return blob, hashlib.sha256(blob).hexdigest()


def wire_dtype(dtype: Any) -> str | None:
    """The daemon's name (fp32 / fp16 / bf16) of a torch dtype; None for one it cannot store."""
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype)


def _dtype_arg(dtype: Any) -> dict:
    """``{"dtype": "fp16"}`` for a dtype the daemon stores, else {} (the daemon decides)."""
    name = wire_dtype(dtype)
    return {"dtype": name} if name else {}


def _storage_dtype(sd: dict) -> torch.dtype | None:
    """The floating dtype holding most of the weights (a few scalars may be fp32)."""
    sizes: dict[torch.dtype, int] = {}
    for t in sd.values():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
    return max(sizes, key=sizes.__getitem__) if sizes else None


def _register(conn: Any, op: str, blob: bytes, sha: str, extra: dict | None = None) -> dict:
    """Load by hash; upload the bytes only when the daemon does not have them yet."""
    args = {"sha256": sha, **(extra or {})}
    try:
        return conn.call(op, args)
    except DaemonError as exc:
        if exc.code != "not_found":
            raise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only bytes, never written
        data = torch.frombuffer(blob, dtype=torch.uint8)
    return conn.call(op, {**args, "data": data})


def _weak_reload(conn: Any, native: Any, op: str, sd_fn: Callable[[Any], dict],
                 extra: dict | None = None) -> Callable[[], dict]:
    ref = weakref.ref(native)

    def reload() -> dict:
        obj = ref()
        if obj is None:
            raise DaemonError("not_found", "the checkpoint this proxy came from is no longer loaded in ComfyUI; re-run the "
                                           "checkpoint loader and the Luna Checkpoint Tunnel")
        blob, sha = _state_blob(sd_fn(obj))
        return _register(conn, op, blob, sha, extra)

    return reload


def _unpatched_clip_weights(native: Any) -> dict[str, torch.Tensor]:
    """The text encoder's original weights (``get_sd()`` without tokenizer data).

    ComfyUI patches LoRA weights into the shared module in place and leaves them there
    after an encode, keeping the originals in the patcher's ``backup`` (shared by all
    clones); those originals replace any live patched weight here."""
    sd = dict(native.cond_stage_model.state_dict())
    backup = getattr(getattr(native, "patcher", None), "backup", None) or {}
    for key, entry in list(backup.items()):
        weight = getattr(entry, "weight", None)
        if weight is None and isinstance(entry, tuple) and entry:
            weight = entry[0]
        if key in sd and isinstance(weight, torch.Tensor):
            sd[key] = weight
    return sd


def tunnel_vae(conn: Any, native: Any) -> Any:
    """A :class:`DaemonVAE` for the weights of ComfyUI VAE ``native`` (same object -> same proxy)."""
    if getattr(native, "is_luna_proxy", False) or native is None:
        return native
    if getattr(native, "first_stage_model", True) is None:
        log.warning("Luna Checkpoint Tunnel: the checkpoint has no valid VAE; passing it through unchanged")
        return native
    with _TUNNEL_LOCK:
        cached = _TUNNEL_CACHE.get(native)
    if cached is not None:
        return cached
    blob, sha = _state_blob(native.get_sd())
    extra = _dtype_arg(getattr(native, "vae_dtype", None))  # the dtype this ComfyUI chose for it
    answer = _register(conn, "vae_load_sd", blob, sha, extra)
    del blob
    proxy = DaemonVAE(_Remote(conn, "vae", answer, f"checkpoint VAE {sha[:12]}",
                              reload=_weak_reload(conn, native, "vae_load_sd", lambda v: v.get_sd(), extra)))
    with _TUNNEL_LOCK:
        _TUNNEL_CACHE[native] = proxy
    return proxy


def tunnel_clip(conn: Any, native: Any) -> Any:
    """A :class:`DaemonCLIP` for the text encoder of ComfyUI CLIP ``native``; its
    ``layer_idx`` and ``tokenizer_options`` carry over. A CLIP that already carries patches
    (a LoraLoader before the tunnel) is refused: put LoRA loaders after the tunnel."""
    if getattr(native, "is_luna_proxy", False) or native is None:
        return native
    patcher = getattr(native, "patcher", None)
    if getattr(patcher, "patches", None):
        raise DaemonUnsupported("Luna Checkpoint Tunnel: this CLIP already has LoRA patches; connect the LoRA loaders "
                                "after the tunnel so the daemon applies them")
    with _TUNNEL_LOCK:
        cached = _TUNNEL_CACHE.get(native)
    if cached is None:
        weights = _unpatched_clip_weights(native)
        extra = _dtype_arg(_storage_dtype(weights))  # the dtype this ComfyUI stores it in
        blob, sha = _state_blob(weights)
        del weights
        answer = _register(conn, "clip_load_sd", blob, sha, extra)
        del blob
        remote = _Remote(conn, "clip", answer, f"checkpoint CLIP {sha[:12]}",
                         reload=_weak_reload(conn, native, "clip_load_sd", _unpatched_clip_weights, extra))
        local_class = type(getattr(native, "cond_stage_model", None)).__name__
        if remote.info.get("model_class") not in (None, local_class):
            log.warning("Luna Checkpoint Tunnel: the daemon built %s for a %s text encoder",
                        remote.info.get("model_class"), local_class)
        cached = DaemonCLIP(remote, layer_idx=None)
        with _TUNNEL_LOCK:
            _TUNNEL_CACHE[native] = cached
    return DaemonCLIP(cached._remote, layer_idx=getattr(native, "layer_idx", None),
                      tokenizer_options=dict(getattr(native, "tokenizer_options", {}) or {}))
