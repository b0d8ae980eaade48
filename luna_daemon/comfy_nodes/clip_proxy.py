"""DaemonCLIP: ComfyUI's CLIP surface, computed by the Luna Daemon (see proxies.py), and
the serialisation of LoRA patches into the blobs the daemon caches."""

from __future__ import annotations

import hashlib
import math
import sys
from typing import Any

import torch


from luna_daemon.comfy_nodes._remote import (
    DaemonUnsupported, _BLOB_FORMAT, _Remote, _StackEntry, _TextEncoderKeys, _send_roots, _to_client, ensure_lora,
)


# ------------------------------------------------------------------------------------ CLIP



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
