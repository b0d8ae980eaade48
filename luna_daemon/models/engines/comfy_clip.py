"""ComfyClip: a ``comfy.sd.CLIP`` served by the comfy engine (see comfy.py), its LoRA stacks,
and the split of a checkpoint's CLIP state dict into the files ``load_clip`` reads."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .base import ClipModel, EngineError, LoraSpec, module_nbytes

from .comfy_runtime import (
    _comfy_call, _drop_dead_models, _embedding_folders, _keep_root_logging, _storage_dtype,
)

logger = logging.getLogger(__name__)

DEFAULT_LORA_CACHE_ENTRIES = 4

# Daemon clip_type names -> comfy.sd.CLIPType member names (anything else: NAME.upper()).
_CLIP_TYPE_ALIASES = {
    "sd1": "STABLE_DIFFUSION", "sd15": "STABLE_DIFFUSION", "sd1.5": "STABLE_DIFFUSION",
    "sd2": "STABLE_DIFFUSION", "sd21": "STABLE_DIFFUSION", "stable_diffusion": "STABLE_DIFFUSION",
    "sdxl": "STABLE_DIFFUSION", "sdxl_refiner": "STABLE_DIFFUSION", "sd35": "SD3", "sd3.5": "SD3",
}
# How many files a clip_type takes, where that is fixed.
_CLIP_FILE_COUNTS = {"sd1": 1, "sd15": 1, "sd1.5": 1, "sd2": 1, "sd21": 1, "sdxl_refiner": 1, "sdxl": 2, "flux": 2}


# ---------------------------------------------------------------------------- CLIP


class ComfyClip(ClipModel):
    """A ``comfy.sd.CLIP`` behind the ``ClipModel`` interface. Thread-safe."""

    def __init__(self, comfy: SimpleNamespace, clip: Any, *, clip_type: str, comfy_clip_type: str, source: str,
                 embedding_directories: list[str], lora_cache_entries: int = DEFAULT_LORA_CACHE_ENTRIES):
        self._comfy = comfy
        self._clip = clip
        self.clip_type = clip_type
        self.source = source
        self.device = torch.device(clip.patcher.load_device)
        self.dtype = _storage_dtype(clip.cond_stage_model)
        self._lora_cache: OrderedDict[tuple, Any] = OrderedDict()
        self._lora_cache_entries = max(0, int(lora_cache_entries))
        self._tokenize_lock = threading.Lock()
        state = clip.cond_stage_model.state_dict()
        self._shapes = {k: tuple(v.shape) for k, v in state.items()}
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
        self._patchable = sorted({v for v in key_map.values() if isinstance(v, str) and v in self._shapes})
        self._nbytes = module_nbytes(clip.cond_stage_model)
        with self._tokenize_lock, torch.inference_mode(), _keep_root_logging():
            self._token_keys = list(clip.tokenize("").keys())
        self._info = {
            "engine": "comfy",
            "clip_type": clip_type,
            "comfy_clip_type": comfy_clip_type,
            "model_class": type(clip.cond_stage_model).__name__,
            "tokenizer_keys": list(self._token_keys),
            "layer_idx": clip.layer_idx,
            "embedding_directories": list(embedding_directories),
            "state_dict": [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in state.items()],
            "patchable_keys": len(self._patchable),
        }

    def nbytes(self) -> int:
        return self._nbytes if self._clip is not None else 0

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def release(self) -> None:
        clip, self._clip = self._clip, None
        if clip is None:
            return
        with _comfy_call("CLIP release"):
            self._lora_cache.clear()
            del clip
            _drop_dead_models()
        self._nbytes = 0

    def _require(self) -> Any:
        clip = self._clip
        if clip is None:
            raise EngineError("model_error", f"CLIP {self.source} has been released")
        return clip

    # -- ClipModel

    def patchable_keys(self) -> list[str]:
        self._require()
        return list(self._patchable)

    # ``tokenize(..., embedding_directories=[...])`` looks ``embedding:`` names up there.
    supports_embedding_directories = True

    def tokenize(self, text: str, embedding_directories: Sequence[str] | None = None,
                 **options: Any) -> dict[str, list[list[tuple]]]:
        """The CLIP's own ``tokenize`` (weights syntax, ``embedding:`` names, per-encoder keys).

        ``embedding_directories`` (the calling ComfyUI's embedding folders, already checked
        to lie in the model roots) replace the folders found at load time for this call, so
        an ``embedding:`` resolves as in that ComfyUI; a name found nowhere is ComfyUI's own
        warning ("embedding:... does not exist, ignoring"), which reaches the caller."""
        clip = self._require()
        if not isinstance(text, str):
            raise EngineError("bad_args", f"tokenize expects a string, got {type(text).__name__}")
        with self._tokenize_lock, torch.inference_mode(), _keep_root_logging(), \
                _embedding_folders(clip, embedding_directories):
            try:
                return clip.tokenize(text, **options)
            except TypeError as exc:
                raise EngineError("bad_args", f"tokenize: {exc}") from exc

    def _check_tokens(self, tokens: Any) -> dict[str, Any]:
        """The token dict as ComfyUI's tokenizer made it, unchanged apart from the wire's
        number forms (a float id that is an integer becomes an int).

        Whatever shape a stock node gives it passes through: empty chunk lists
        (``CLIPTextEncodeSD3`` with ``empty_padding = none``), ``(token, weight, word_id)``
        items, embedding vectors (tensors) and image dicts (``{"type": "image", "data":
        tensor}``, Qwen-Image edit) as tokens, keys this CLIP does not read. Only what would
        crash ComfyUI's encoder in a confusing way is refused here, as ``bad_args`` naming
        the place; anything else ComfyUI itself rejects comes back as ``model_error``."""
        if not isinstance(tokens, Mapping) or not tokens:
            raise EngineError("bad_args", "tokens must be a non-empty dict {encoder_key: [chunk, ...]}")
        missing = [k for k in self._token_keys if k not in tokens]
        if missing:
            raise EngineError("bad_args", f"tokens lack the {', '.join(map(repr, missing))} encoder's chunks "
                                          f"(this CLIP uses {self._token_keys})")
        out: dict[str, Any] = {}
        for key, chunks in tokens.items():
            if key not in self._token_keys:
                out[key] = chunks  # not an encoder stream of this CLIP: ComfyUI ignores it, so do we
                continue
            if not isinstance(chunks, (list, tuple)):
                raise EngineError("bad_args", f"tokens[{key!r}] must be a list of chunks (it may be empty)")
            fixed = []
            for chunk in chunks:
                if not isinstance(chunk, (list, tuple)):
                    raise EngineError("bad_args", f"tokens[{key!r}]: every chunk must be a list of (token, weight) items")
                fixed.append([self._check_item(key, item) for item in chunk])
            out[key] = fixed
        return out

    @staticmethod
    def _check_item(key: str, item: Any) -> Any:
        if isinstance(item, Mapping):
            return item
        if not isinstance(item, (list, tuple)) or len(item) < 2:
            raise EngineError("bad_args", f"tokens[{key!r}]: expected (token, weight) items, got {item!r}")
        token, weight = item[0], item[1]
        if isinstance(token, bool) or not isinstance(token, (int, float, torch.Tensor, Mapping)):
            raise EngineError("bad_args", f"tokens[{key!r}]: bad token {token!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise EngineError("bad_args", f"tokens[{key!r}]: weight {weight!r} is not a number")
        if isinstance(token, float):
            if not token.is_integer():
                raise EngineError("bad_args", f"tokens[{key!r}]: token id {token!r} is not an integer")
            token = int(token)
        return (token, weight, *item[2:]) if token is not item[0] else tuple(item)

    # ``encode(..., unprojected=True)`` is ``encode_from_tokens(return_pooled="unprojected")``.
    supports_unprojected = True

    def encode(self, tokens: dict[str, list[list[tuple]]], layer: int | None = None,
               loras: Sequence[LoraSpec] = (), unprojected: bool = False) -> dict[str, Any]:
        """``encode_from_tokens(tokens, return_pooled=True, return_dict=True)`` on the loaded
        CLIP, a clone with ``clip_layer(layer)`` when a layer is given, patched with ``loras``.
        ``unprojected`` asks for ``return_pooled="unprojected"`` (GLIGEN's pooled output)."""
        clip = self._require()
        tokens = self._check_tokens(tokens)
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise EngineError("bad_args", f"layer must be an integer, got {layer!r}")
        active = [spec for spec in loras if float(spec.strength) != 0.0 and spec.weights]
        with _comfy_call(f"CLIP {Path(self.source).name} encode"):
            target = self._lora_clip(clip, active) if active else clip
            if layer is not None:
                target = target.clone()
                target.clip_layer(int(layer))
            out = target.encode_from_tokens(tokens, return_pooled="unprojected" if unprojected else True,
                                            return_dict=True)
            result: dict[str, Any] = {}
            for key, value in out.items():
                if isinstance(value, torch.Tensor):
                    value = value.float() if value.is_floating_point() else value
                    value = value.cpu().contiguous()
                result[key] = value
        return result

    # -- LoRA

    def _lora_clip(self, clip: Any, specs: Sequence[LoraSpec]) -> Any:
        """A clone of ``clip`` carrying ``specs`` (cached per stack). Caller holds the lock."""
        key = tuple((str(spec.sha256), float(spec.strength)) for spec in specs)
        cached = self._lora_cache.get(key)
        if cached is not None:
            self._lora_cache.move_to_end(key)
            return cached
        patched = clip.clone()
        for spec in specs:
            lora_sd: dict[str, torch.Tensor] = {}
            to_load: dict[str, str] = {}
            unknown = []
            for i, (target, triple) in enumerate(spec.weights.items()):
                shape = self._shapes.get(target)
                if shape is None:
                    unknown.append(target)
                    continue
                up, down, alpha = self._check_lora_pair(spec, target, triple, shape)
                prefix = f"luna_lora_{i}"
                to_load[prefix] = target
                lora_sd[prefix + ".lora_up.weight"] = up
                lora_sd[prefix + ".lora_down.weight"] = down
                if alpha is not None:
                    lora_sd[prefix + ".alpha"] = torch.tensor(alpha, dtype=torch.float64)  # .item() is exact
            # ComfyUI's own loader turns the pairs into the LoRAAdapter patches LoraLoader makes.
            patches = self._comfy.lora.load_lora(lora_sd, to_load)
            accepted = set(patched.add_patches(patches, float(spec.strength)))
            unknown += [k for k in to_load.values() if k not in accepted]
            if unknown:
                logger.warning("LoRA %s: %d of %d keys match no text-encoder weight and are ignored, e.g. %s",
                               spec.sha256[:12], len(unknown), len(spec.weights), unknown[:3])
        if self._lora_cache_entries:
            self._lora_cache[key] = patched
            while len(self._lora_cache) > self._lora_cache_entries:
                self._lora_cache.popitem(last=False)
        return patched

    @staticmethod
    def _check_lora_pair(spec: LoraSpec, target: str, triple: Any, shape: tuple[int, ...]
                         ) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        try:
            up, down, alpha = triple
        except (TypeError, ValueError):
            raise EngineError("bad_args", f"LoRA {spec.sha256[:12]} {target}: expected (up, down, alpha)") from None
        if not isinstance(up, torch.Tensor) or not isinstance(down, torch.Tensor) or up.ndim < 2 or down.ndim < 2:
            raise EngineError("bad_args", f"LoRA {spec.sha256[:12]} {target}: up/down must be matrices")
        rank = down.shape[0]
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        if (up.shape[0] != shape[0] or up.reshape(up.shape[0], -1).shape[1] != rank
                or down.reshape(rank, -1).shape[1] != fan_in):
            raise EngineError("bad_args", f"LoRA {spec.sha256[:12]} {target}: up {tuple(up.shape)} @ down "
                                          f"{tuple(down.shape)} does not match the weight's shape {shape}")
        return up, down, None if alpha is None else float(alpha)


# Checkpoint Tunnel: a ``comfy.sd.CLIP.get_sd()`` state dict -> standalone text-encoder files.
# Observed in ComfyUI v0.3.64: every sub-model of a CLIP's ``cond_stage_model`` keeps its
# weights under ``<name>.transformer.<key of the standalone file>`` (``clip_l.transformer.
# text_model.*``, ``t5xxl.transformer.encoder.*``, ``gemma2_2b.transformer.model.*``, ...) plus
# a ``<name>.logit_scale`` scalar, and tokenizers that carry data add it unprefixed
# (``spiece_model``: Wan's umT5, Lumina2's Gemma). Stripping the prefix gives the files
# ``comfy.sd.load_clip`` reads; this order is the file order passed to it.
_TE_SUBMODELS = ("clip_l", "clip_g", "clip_h", "t5xxl", "umt5xxl", "gemma2_2b", "llama", "qwen25_7b", "qwen25_3b")
_TOKENIZER_KEYS = ("spiece_model",)
_SD3_PARTS = ("clip_l", "clip_g", "t5xxl")
# (cond_stage_model class, tokenizer class) -> (clip_type, the sub-model sets load_clip rebuilds as
# that same class). The tokenizer matters: LTXV and Mochi share MochiTEModel_ but tokenize
# differently, and SD3 / SDXL / Flux share sub-model names. SD3: any non-empty subset, as
# load_clip builds SD3 from 1, 2 or 3 of those files with clip_type sd3 (3 files are SD3 anyway).
# HiDream is absent: its 3-encoder subsets load as SD3 from files, and ComfyUI's HiDream
# checkpoints carry no text encoder.
_SPLIT_CLASSES: dict[tuple[str, str], tuple[str, tuple[tuple[str, ...], ...]]] = {
    ("SD1ClipModel", "SD1Tokenizer"): ("sd1", (("clip_l",),)),
    ("SD2ClipModel", "SD2Tokenizer"): ("sd2", (("clip_h",),)),
    ("SDXLClipModel", "SDXLTokenizer"): ("sdxl", (("clip_l", "clip_g"),)),
    ("SDXLRefinerClipModel", "SDXLTokenizer"): ("sdxl_refiner", (("clip_g",),)),
    ("StableCascadeClipModel", "StableCascadeTokenizer"): ("stable_cascade", (("clip_g",),)),
    ("SD3ClipModel_", "SD3Tokenizer"): ("sd3", tuple(
        tuple(n for i, n in enumerate(_SD3_PARTS) if mask >> i & 1) for mask in range(1, 8))),
    ("FluxClipModel_", "FluxTokenizer"): ("flux", (("clip_l", "t5xxl"),)),
    ("PixArtTEModel_", "PixArtTokenizer"): ("chroma", (("t5xxl",),)),  # = pixart: the same model and tokenizer
    ("MochiTEModel_", "MochiT5Tokenizer"): ("mochi", (("t5xxl",),)),
    ("MochiTEModel_", "LTXVT5Tokenizer"): ("ltxv", (("t5xxl",),)),
    ("WanTEModel", "WanT5Tokenizer"): ("wan", (("umt5xxl",),)),
    ("LuminaTEModel_", "LuminaTokenizer"): ("lumina2", (("gemma2_2b",),)),
    ("HunyuanVideoClipModel_", "HunyuanVideoTokenizer"): ("hunyuan_video", (("clip_l", "llama"),)),
    ("QwenImageTEModel_", "QwenImageTokenizer"): ("qwen_image", (("qwen25_7b",),)),
    ("Omnigen2TEModel_", "Omnigen2Tokenizer"): ("omnigen2", (("qwen25_3b",),)),
}
# Without a class hint (older clients) only combinations one class explains are accepted.
_SPLIT_DEFAULTS = {("clip_l",): "sd1", ("clip_h",): "sd2", ("clip_g",): "sdxl_refiner", ("clip_l", "clip_g"): "sdxl",
                   ("clip_l", "clip_g", "t5xxl"): "sd3"}


def split_clip_parts(sd: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A ``comfy.sd.CLIP.get_sd()`` state dict -> ``[(sub-model, standalone state dict), ...]``
    in load order.

    ``<name>.transformer.<key>`` becomes ``<key>`` (``clip_l.transformer.text_model.*`` ->
    ``text_model.*``, ``t5xxl.transformer.encoder.*`` -> ``encoder.*``), the layout of a
    standalone text-encoder file. Per sub-model scalars outside ``transformer.``
    (``logit_scale``) are not model weights and are dropped. Tokenizer data (``spiece_model``)
    goes into the file of the one sub-model (ComfyUI reads it from that file). Raises
    ``bad_args`` naming the keys that belong to no known sub-model, or tokenizer data beside
    several sub-models."""
    groups: dict[str, dict[str, Any]] = {}
    tokenizer: dict[str, Any] = {}
    others: list[str] = []
    for key, value in sd.items():
        head, _, rest = key.partition(".")
        if head in _TE_SUBMODELS and rest:
            if rest.startswith("transformer."):
                groups.setdefault(head, {})[rest[len("transformer."):]] = value
            continue
        if key in _TOKENIZER_KEYS:
            tokenizer[key] = value
            continue
        others.append(key)
    if others or not groups:
        sample = ", ".join(sorted(others)[:3]) or "no weights of a known text-encoder sub-model"
        raise EngineError("bad_args", f"this text encoder cannot be split into files ComfyUI loads: it has {sample} "
                                      f"(known sub-models: {', '.join(_TE_SUBMODELS)}); load it with a Luna CLIP "
                                      f"loader from its files instead")
    names = [n for n in _TE_SUBMODELS if n in groups]
    if tokenizer:
        if len(names) != 1:
            raise EngineError("bad_args", f"tokenizer data ({', '.join(tokenizer)}) beside several text encoders "
                                          f"({', '.join(names)}) cannot be split into files ComfyUI loads")
        groups[names[0]].update(tokenizer)
    return [(n, groups[n]) for n in names]


def split_clip_type(names: Sequence[str], model_class: str | None = None, tokenizer_class: str | None = None) -> str:
    """The ``clip_type`` with which ``comfy.sd.load_clip`` rebuilds sub-models ``names`` (as
    split by :func:`split_clip_parts`) as the CLIP they came from: class ``model_class``
    (``type(clip.cond_stage_model).__name__``) with tokenizer ``tokenizer_class``. Without
    the classes only CLIP-L / CLIP-G / CLIP-H sets and SD3's three encoders are accepted.
    Anything else is ``bad_args`` naming the classes and sub-models."""
    names = tuple(names)
    listed = ", ".join(names) or "no sub-models"
    if not model_class and not tokenizer_class:
        clip_type = _SPLIT_DEFAULTS.get(names)
        if clip_type is None:
            raise EngineError("bad_args", f"text encoders {listed} fit several ComfyUI CLIP types; send model_class and "
                                          f"tokenizer_class (the Luna Checkpoint Tunnel does) to say which")
        return clip_type
    entry = _SPLIT_CLASSES.get((str(model_class), str(tokenizer_class)))
    if entry is None:
        known = ", ".join(sorted({m for m, _ in _SPLIT_CLASSES}))
        raise EngineError("bad_args", f"a {model_class} text encoder with a {tokenizer_class} cannot be rebuilt from "
                                      f"files by ComfyUI's load_clip (tunnelled CLIP classes: {known}); load it with a "
                                      f"Luna CLIP loader from its files instead")
    clip_type, allowed = entry
    if names not in allowed:
        raise EngineError("bad_args", f"a {model_class} text encoder with sub-models {listed} is not one ComfyUI builds "
                                      f"from files (expected {' or '.join('+'.join(a) for a in allowed)})")
    return clip_type


def split_clip_state_dict(sd: Mapping[str, Any], model_class: str | None = None, tokenizer_class: str | None = None
                          ) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """``(clip_type, [(sub-model, standalone sd), ...])``: :func:`split_clip_parts` and
    :func:`split_clip_type` together."""
    parts = split_clip_parts(sd)
    return split_clip_type([n for n, _ in parts], model_class, tokenizer_class), parts
