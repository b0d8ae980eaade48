"""Proxy VAE and CLIP objects: ComfyUI's stock nodes use them unchanged, the daemon computes.

This module holds the loaders (by path, and the checkpoint tunnel); the proxy objects live in
``vae_proxy.py`` and ``clip_proxy.py``, what they share in ``_remote.py``.

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
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch

from luna_daemon.client import DaemonError
from luna_daemon.comfy_nodes._remote import (
    DaemonUnsupported, _Remote, _device_dtype_args, _load_in_roots, _name_of, log,
)
from luna_daemon.comfy_nodes.vae_proxy import DaemonVAE  # noqa: F401
from luna_daemon.comfy_nodes.clip_proxy import DaemonCLIP  # noqa: F401


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
    """What ``get_sd()`` returns, with the text encoder's original weights.

    ComfyUI patches LoRA weights into the shared module in place and leaves them there
    after an encode, keeping the originals in the patcher's ``backup`` (shared by all
    clones); those originals replace any live patched weight here. Tokenizer data that is a
    tensor (``spiece_model``: Wan's umT5, Lumina2's Gemma) travels too: ComfyUI's loader
    reads the tokenizer from the text-encoder file."""
    sd = dict(native.cond_stage_model.state_dict())
    tokenizer_sd = getattr(getattr(native, "tokenizer", None), "state_dict", None)
    for key, value in (tokenizer_sd() if callable(tokenizer_sd) else {}).items():
        if isinstance(value, torch.Tensor) and key not in sd:
            sd[key] = value
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
        local_class = type(getattr(native, "cond_stage_model", None)).__name__
        # The classes say which clip_type rebuilds this CLIP from files (SD3 vs SDXL vs Flux
        # share sub-model names; LTXV and Mochi share a model class but not a tokenizer).
        extra = {**_dtype_arg(_storage_dtype(weights)),  # the dtype this ComfyUI stores it in
                 "model_class": local_class, "tokenizer_class": type(getattr(native, "tokenizer", None)).__name__}
        blob, sha = _state_blob(weights)
        del weights
        answer = _register(conn, "clip_load_sd", blob, sha, extra)
        del blob
        remote = _Remote(conn, "clip", answer, f"checkpoint CLIP {sha[:12]}",
                         reload=_weak_reload(conn, native, "clip_load_sd", _unpatched_clip_weights, extra))
        built = remote.info.get("model_class")
        if built not in (None, local_class):
            if remote.engine in (None, "comfy"):  # the same code would give other encodings: never silently
                raise DaemonUnsupported(f"Luna Checkpoint Tunnel: the daemon built a {built} for this {local_class} "
                                        f"text encoder; load it with a Luna CLIP loader from its files instead")
            log.warning("Luna Checkpoint Tunnel: the daemon built %s for a %s text encoder", built, local_class)
        cached = DaemonCLIP(remote, layer_idx=None)
        with _TUNNEL_LOCK:
            _TUNNEL_CACHE[native] = cached
    return DaemonCLIP(cached._remote, layer_idx=getattr(native, "layer_idx", None),
                      tokenizer_options=dict(getattr(native, "tokenizer_options", {}) or {}))
